//! The PID 1 duties: kernel filesystems, uptime, reaping, power-off.

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{sync, Pid};
use std::path::Path;

/// A kernel filesystem the agent could not mount.
#[derive(Debug, thiserror::Error)]
#[error("mount {fstype} on {target}: {source}")]
pub struct MountError {
    fstype: &'static str,
    target: &'static str,
    source: std::io::Error,
}

/// Mounts proc, sysfs and devtmpfs; one result per mount so that one failure does not
/// hide the others.
pub fn mount_kernel_filesystems() -> Vec<Result<(), MountError>> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    [
        ("proc", "/proc", nodev),
        ("sysfs", "/sys", nodev),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC),
    ]
    .into_iter()
    .map(|(fstype, target, flags)| {
        let wrap = |source: std::io::Error| MountError {
            fstype,
            target,
            source,
        };
        std::fs::create_dir_all(target).map_err(wrap)?;
        mount(
            Some(fstype),
            Path::new(target),
            Some(fstype),
            flags,
            None::<&str>,
        )
        .or_else(|e| if e == Errno::EBUSY { Ok(()) } else { Err(e) })
        .map_err(|e| wrap(e.into()))
    })
    .collect()
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

/// Reaps every child that exits, forever. SIGCHLD is blocked and waited for, so no
/// signal handler runs in PID 1.
pub fn reap_forever() -> ! {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    // Blocking cannot fail for a valid signal set; if it did, the loop still reaps on
    // each wake-up below.
    let _ = chld.thread_block();
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        if chld.wait().is_err() {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}
