//! The PID 1 duties: kernel filesystems, cgroup v2, uptime, power-off.

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::sync;
use std::path::Path;

/// A kernel filesystem the agent could not mount.
#[derive(Debug, thiserror::Error)]
#[error("mount {fstype} on {target}: {source}")]
pub struct MountError {
    fstype: &'static str,
    target: &'static str,
    source: std::io::Error,
}

/// Mounts what the agent and containers need: proc, sysfs, devtmpfs, devpts, /dev/shm,
/// a tmpfs /run and cgroup v2. One result per mount so that one failure does not hide
/// the others.
pub fn mount_kernel_filesystems() -> Vec<Result<(), MountError>> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    [
        ("proc", "/proc", nodev, None),
        ("sysfs", "/sys", nodev, None),
        (
            "devtmpfs",
            "/dev",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "devpts",
            "/dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        ("tmpfs", "/dev/shm", nodev, Some("mode=1777")),
        (
            "tmpfs",
            "/run",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        ("cgroup2", "/sys/fs/cgroup", nodev, Some("nsdelegate")),
    ]
    .into_iter()
    .map(|(fstype, target, flags, data)| {
        let wrap = |source: std::io::Error| MountError {
            fstype,
            target,
            source,
        };
        std::fs::create_dir_all(target).map_err(wrap)?;
        mount(Some(fstype), Path::new(target), Some(fstype), flags, data)
            .or_else(|e| if e == Errno::EBUSY { Ok(()) } else { Err(e) })
            .map_err(|e| wrap(e.into()))
    })
    .collect()
}

/// Controllers handed down to container cgroups.
const CONTROLLERS: &str = "+cpu +cpuset +io +memory +pids";

/// Lets child cgroups use the controllers containers are limited by.
pub fn enable_cgroup_controllers() -> std::io::Result<()> {
    std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", CONTROLLERS)
}

/// Free page reporting (the VMM's balloon) hands back free blocks of at least this order:
/// 2^4 pages, 64 KiB. The kernel's default, 2 MiB, misses what boot leaves fragmented:
/// the freed initramfs and the kernel's freed init and section-alignment gaps (~4 MiB,
/// poisoned when freed, so touched). Linux 6.1 overrides a command-line value with the
/// driver's when the balloon probes: only a write after boot takes effect.
const PAGE_REPORTING_ORDER: &str = "4";
const PAGE_REPORTING_ORDER_PARAM: &str =
    "/sys/module/page_reporting/parameters/page_reporting_order";

/// Lowers the free page reporting order (a kernel without page reporting has no such
/// parameter: then there is nothing to tune).
pub fn tune_free_page_reporting() -> std::io::Result<()> {
    match std::fs::write(PAGE_REPORTING_ORDER_PARAM, PAGE_REPORTING_ORDER) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Set in the environment of the agent re-executed from the new root.
const SWITCHED_ENV: &str = "COCOON_ROOT_SWITCHED";

/// Moves the agent off the initramfs onto a tmpfs root, the way `switch_root` does, and
/// re-executes it from there; returns only when that already happened (or on failure).
///
/// The initramfs (rootfs) can never be unmounted or pivoted away, so pivot_root(2) fails
/// for every mount namespace whose root it is; containers would need chroot, which a
/// process with CAP_SYS_CHROOT can escape. From a tmpfs root, libcontainer uses
/// pivot_root. The initramfs files are deleted so their memory is not held twice.
pub fn switch_root_off_initramfs() -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if std::env::var_os(SWITCHED_ENV).is_some() {
        return Ok(());
    }
    let new = Path::new("/newroot");
    std::fs::create_dir_all(new)?;
    mount(
        Some("tmpfs"),
        new,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    std::fs::copy("/init", new.join("init"))?;
    for dir in ["proc", "sys", "dev", "run", "tmp"] {
        std::fs::create_dir_all(new.join(dir))?;
    }
    std::fs::set_permissions(
        new.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;
    // Free the initramfs: everything on the root filesystem except the new root.
    let root_dev = std::fs::metadata("/")?.dev();
    for entry in std::fs::read_dir("/")?.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if path == new || meta.dev() != root_dev {
            continue;
        }
        let _ = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
    std::env::set_current_dir(new)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    std::env::set_current_dir("/")?;
    let err = std::os::unix::process::CommandExt::exec(
        std::process::Command::new("/init").env(SWITCHED_ENV, "1"),
    );
    Err(err)
}

/// Guest uptime in milliseconds, counting time the VM was suspended too.
pub fn uptime_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Flushes filesystems and ends the VM. Returns only on failure.
///
/// Power-off needs a firmware method (ACPI); without one the kernel would only halt the
/// CPU and the VMM would never learn the guest is done. Then the agent resets instead:
/// with `reboot=t` that is a triple fault, which ends VMMs run with "no reboot".
pub fn power_off() -> Errno {
    sync();
    let mode = if Path::new("/sys/firmware/acpi").exists() {
        RebootMode::RB_POWER_OFF
    } else {
        RebootMode::RB_AUTOBOOT
    };
    match reboot(mode) {
        Err(e) => e,
        Ok(never) => match never {},
    }
}
