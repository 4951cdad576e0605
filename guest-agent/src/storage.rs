//! AddStorage / RemoveStorage: the host puts a disk (an EROFS image disk or a container's
//! ext4 writable disk) into an empty virtio-blk drive slot at run time; the agent finds it
//! by its virtio serial, waits until it has media, and mounts it.
//!
//! An empty slot is a virtio-blk device of size 0; the swap changes its capacity, which
//! the kernel shows in `/sys/block/vdX/size`. Polling sysfs every few milliseconds is
//! simpler than a uevent socket and costs nothing measurable for the few ms a swap takes.

use crate::error::{AgentError, Result};
use crate::files::validate_abs_path;
use cocoon_agent_protocol::api;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A virtio-blk serial is at most 20 bytes (VIRTIO_BLK_ID_BYTES); a longer one would be
/// truncated by the device and never match.
pub const MAX_SERIAL_LEN: usize = 20;
/// How long AddStorage waits for the disk when the request says 0.
pub const DEFAULT_TIMEOUT_MS: u32 = 5000;
const POLL: Duration = Duration::from_millis(5);

/// This thread's mount table: `thread-self` rather than `self`, which is the main
/// thread's (they only differ in tests, which give a thread its own mount namespace).
const MOUNTINFO: &str = "/proc/thread-self/mountinfo";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FsType {
    Erofs,
    Ext4,
}

impl FsType {
    fn parse(s: &str) -> Result<FsType> {
        match s {
            "erofs" => Ok(FsType::Erofs),
            "ext4" => Ok(FsType::Ext4),
            other => Err(AgentError::InvalidArgument(format!(
                "unsupported fstype {other:?} (erofs or ext4)"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Ext4 => "ext4",
        }
    }
}

/// Mount options split as mount(8) does: flags for mount(2), the rest for the file system.
#[derive(Debug, PartialEq, Eq)]
struct MountOptions {
    flags: MsFlags,
    data: String,
}

fn parse_options(fstype: FsType, read_only: bool, options: &str) -> Result<MountOptions> {
    if options.contains('\0') {
        return Err(AgentError::InvalidArgument(
            "mount options contain a NUL byte".into(),
        ));
    }
    let mut flags = MsFlags::empty();
    let mut ro = read_only || fstype == FsType::Erofs;
    let mut rw = false;
    let mut data = Vec::new();
    for opt in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (set, clear) = match opt {
            "ro" => {
                ro = true;
                continue;
            }
            "rw" => {
                rw = true;
                continue;
            }
            "defaults" => continue,
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
            "bind" | "rbind" | "remount" | "move" | "shared" | "private" | "slave"
            | "unbindable" | "rshared" | "rprivate" | "rslave" | "runbindable" => {
                return Err(AgentError::InvalidArgument(format!(
                    "mount option {opt:?} is not supported for a disk"
                )))
            }
            other => {
                data.push(other);
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    if rw && ro {
        return Err(AgentError::InvalidArgument(format!(
            "mount option \"rw\" conflicts with a read-only {} mount",
            fstype.name()
        )));
    }
    if ro {
        flags.insert(MsFlags::MS_RDONLY);
    }
    Ok(MountOptions {
        flags,
        data: data.join(","),
    })
}

fn validate_serial(serial: &str) -> Result<()> {
    if serial.is_empty() {
        return Err(AgentError::InvalidArgument("serial is empty".into()));
    }
    if serial.len() > MAX_SERIAL_LEN {
        return Err(AgentError::InvalidArgument(format!(
            "serial {serial:?} is longer than {MAX_SERIAL_LEN} bytes (virtio-blk truncates it)"
        )));
    }
    if serial.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(AgentError::InvalidArgument(format!(
            "serial {serial:?} has whitespace or control characters"
        )));
    }
    Ok(())
}

/// The name (`vdb`) of the block device under `sys_root/block` whose serial is `serial`
/// and which has media (non-zero size).
fn find_disk(sys_root: &Path, serial: &str) -> Option<String> {
    let entries = std::fs::read_dir(sys_root.join("block")).ok()?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names.into_iter().find(|name| {
        let dir = sys_root.join("block").join(name);
        let Ok(found) = std::fs::read(dir.join("serial")) else {
            return false;
        };
        // The kernel prints the serial with a newline; some versions keep NUL padding.
        let found = String::from_utf8_lossy(&found);
        if found.trim_end_matches(['\n', '\0', ' ']) != serial {
            return false;
        }
        std::fs::read_to_string(dir.join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|sectors| sectors > 0)
    })
}

/// Polls [`find_disk`] until it finds the disk or `timeout` passes.
fn wait_for_disk(sys_root: &Path, serial: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(name) = find_disk(sys_root, serial) {
            return Ok(name);
        }
        if Instant::now() >= deadline {
            return Err(AgentError::Timeout(format!(
                "after {} ms waiting for a disk with serial {serial:?}",
                timeout.as_millis()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// `dev_root/name`, created from `sys_root/block/name/dev` ("major:minor") when devtmpfs
/// has not made it (yet).
fn ensure_device_node(sys_root: &Path, dev_root: &Path, name: &str) -> Result<PathBuf> {
    let node = dev_root.join(name);
    if node.exists() {
        return Ok(node);
    }
    let devno = std::fs::read_to_string(sys_root.join("block").join(name).join("dev")).map_err(
        AgentError::io(format!("reading the device number of {name}")),
    )?;
    let (major, minor) = devno
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| AgentError::Failed {
            context: format!("device number of {name}"),
            message: format!("unexpected {:?}", devno.trim()),
        })?;
    match mknod(
        &node,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        makedev(major, minor),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(node),
        Err(e) => Err(AgentError::io(format!("creating {}", node.display()))(
            e.into(),
        )),
    }
}

/// Undoes the octal escapes (`\040` for a space) of a mountinfo path field.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(oct) = bytes.get(i + 1..i + 4) {
                if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                    let v = oct
                        .iter()
                        .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                    if let Ok(v) = u8::try_from(v) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `mountinfo` (the text of /proc/<pid>/mountinfo) has a mount at `path`.
pub(crate) fn mounted_at(mountinfo: &str, path: &Path) -> bool {
    let want = path.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == want)
}

fn is_mounted(path: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(AgentError::io("reading mountinfo"))?;
    Ok(mounted_at(&text, path))
}

/// Mounts `device` at `mount_point` (created when missing).
fn mount_device(
    device: &Path,
    mount_point: &Path,
    fstype: FsType,
    opts: &MountOptions,
) -> Result<()> {
    if is_mounted(mount_point)? {
        return Err(AgentError::AlreadyExists {
            what: "mount at",
            id: mount_point.display().to_string(),
        });
    }
    std::fs::create_dir_all(mount_point).map_err(AgentError::io(format!(
        "creating mount point {}",
        mount_point.display()
    )))?;
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    mount(
        Some(device),
        mount_point,
        Some(fstype.name()),
        opts.flags,
        data,
    )
    .map_err(|e| {
        AgentError::io(format!(
            "mounting {} ({}, options {:?}) on {}",
            device.display(),
            fstype.name(),
            opts.data,
            mount_point.display()
        ))(e.into())
    })
}

/// AddStorage: returns the device path (`/dev/vdb`).
pub fn add(req: &api::AddStorageRequest) -> Result<String> {
    add_in(Path::new("/sys"), Path::new("/dev"), req)
}

fn add_in(sys_root: &Path, dev_root: &Path, req: &api::AddStorageRequest) -> Result<String> {
    validate_serial(&req.serial)?;
    let fstype = FsType::parse(&req.fstype)?;
    let mount_point = validate_abs_path(&req.mount_point, "mount_point")?;
    let opts = parse_options(fstype, req.read_only, &req.options)?;
    if is_mounted(&mount_point)? {
        return Err(AgentError::AlreadyExists {
            what: "mount at",
            id: mount_point.display().to_string(),
        });
    }
    let timeout_ms = if req.timeout_ms == 0 {
        DEFAULT_TIMEOUT_MS
    } else {
        req.timeout_ms
    };
    let started = Instant::now();
    let name = wait_for_disk(
        sys_root,
        &req.serial,
        Duration::from_millis(timeout_ms.into()),
    )?;
    let device = ensure_device_node(sys_root, dev_root, &name)?;
    mount_device(&device, &mount_point, fstype, &opts)?;
    tracing::info!(
        serial = %req.serial,
        device = %device.display(),
        mount_point = %mount_point.display(),
        fstype = fstype.name(),
        read_only = opts.flags.contains(MsFlags::MS_RDONLY),
        waited_ms = started.elapsed().as_millis() as u64,
        "storage mounted"
    );
    Ok(device.display().to_string())
}

/// RemoveStorage: flushes and unmounts. A busy mount is an error, never a lazy detach:
/// the host pulls the disk right after this returns.
pub fn remove(mount_point: &str) -> Result<()> {
    let path = validate_abs_path(mount_point, "mount_point")?;
    if !is_mounted(&path)? {
        return Err(AgentError::not_found(
            "mount at",
            path.display().to_string(),
        ));
    }
    nix::unistd::sync();
    match umount2(&path, MntFlags::empty()) {
        Ok(()) => {
            tracing::info!(mount_point = %path.display(), "storage unmounted");
            Ok(())
        }
        Err(nix::errno::Errno::EBUSY) => Err(AgentError::FailedPrecondition(format!(
            "{} is busy (still used by a container or a mount below it)",
            path.display()
        ))),
        Err(e) => Err(AgentError::io(format!("unmounting {}", path.display()))(
            e.into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn fake_disk(sys: &Path, name: &str, serial: &str, size: u64) {
        let d = sys.join("block").join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("serial"), format!("{serial}\n")).expect("serial");
        std::fs::write(d.join("size"), format!("{size}\n")).expect("size");
        std::fs::write(d.join("dev"), "254:16\n").expect("dev");
    }

    #[test]
    fn finds_disk_by_serial_with_media() {
        let sys = tempfile::tempdir().expect("tempdir");
        fake_disk(sys.path(), "vda", "cocoon-slot-0", 0);
        fake_disk(sys.path(), "vdb", "cocoon-slot-1", 2048);
        fake_disk(sys.path(), "vdc", "cocoon-slot-10", 2048);
        std::fs::create_dir_all(sys.path().join("block/loop0")).expect("mkdir");
        assert_eq!(find_disk(sys.path(), "cocoon-slot-1"), Some("vdb".into()));
        assert_eq!(find_disk(sys.path(), "cocoon-slot-10"), Some("vdc".into()));
        // Present but empty: not yet.
        assert_eq!(find_disk(sys.path(), "cocoon-slot-0"), None);
        assert_eq!(find_disk(sys.path(), "cocoon-slot"), None);
        assert_eq!(find_disk(Path::new("/nonexistent"), "x"), None);
    }

    #[test]
    fn waits_for_the_swap_then_times_out_naming_the_serial() {
        let sys = tempfile::tempdir().expect("tempdir");
        fake_disk(sys.path(), "vdb", "s1", 0);
        let size = sys.path().join("block/vdb/size");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            std::fs::write(size, "8\n").expect("write size");
        });
        let t = Instant::now();
        let found = wait_for_disk(sys.path(), "s1", Duration::from_secs(5));
        writer.join().expect("writer");
        assert_eq!(found.ok(), Some("vdb".into()));
        assert!(t.elapsed() < Duration::from_secs(1));

        let err = wait_for_disk(sys.path(), "s2", Duration::from_millis(20)).expect_err("timeout");
        assert!(matches!(err, AgentError::Timeout(_)), "{err}");
        assert!(err.to_string().contains("\"s2\""), "{err}");
    }

    #[test]
    fn device_node_made_when_devtmpfs_has_none() {
        let sys = tempfile::tempdir().expect("tempdir");
        let dev = tempfile::tempdir().expect("tempdir");
        fake_disk(sys.path(), "vdb", "s", 8);
        let node = ensure_device_node(sys.path(), dev.path(), "vdb").expect("mknod");
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(&node).expect("stat");
        assert!(meta.file_type().is_block_device());
        assert_eq!(meta.rdev(), makedev(254, 16));
        // Existing node: left alone.
        assert_eq!(
            ensure_device_node(sys.path(), dev.path(), "vdb").ok(),
            Some(node)
        );
    }

    #[test]
    fn request_validation() {
        assert!(validate_serial("cocoon-0").is_ok());
        for bad in ["", "a b", "x\n", "123456789012345678901"] {
            assert!(validate_serial(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            FsType::parse("xfs"),
            Err(AgentError::InvalidArgument(_))
        ));
        let err = add(&api::AddStorageRequest {
            serial: "s".into(),
            fstype: "ext4".into(),
            mount_point: "/a/../b".into(),
            ..Default::default()
        })
        .expect_err("bad mount point");
        assert!(matches!(err, AgentError::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let o = parse_options(
            FsType::Ext4,
            false,
            "noatime, nosuid,data=ordered,,errors=remount-ro",
        )
        .expect("ok");
        assert_eq!(o.flags, MsFlags::MS_NOATIME | MsFlags::MS_NOSUID);
        assert_eq!(o.data, "data=ordered,errors=remount-ro");
        let o = parse_options(FsType::Ext4, true, "").expect("ok");
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        let o = parse_options(FsType::Ext4, false, "ro").expect("ok");
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        let o = parse_options(FsType::Erofs, false, "").expect("ok");
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        assert!(parse_options(FsType::Erofs, false, "rw").is_err());
        assert!(parse_options(FsType::Ext4, true, "rw").is_err());
        assert!(parse_options(FsType::Ext4, false, "bind").is_err());
        let o = parse_options(FsType::Ext4, false, "nodev,dev").expect("ok");
        assert_eq!(o.flags, MsFlags::empty());
    }

    #[test]
    fn mountinfo_matching() {
        let text = "22 1 0:21 / /run rw,nosuid - tmpfs tmpfs rw\n\
                    40 22 254:16 / /run/cocoon/a\\040b rw - ext4 /dev/vdb rw\n\
                    41 22 254:32 / /run/cocoon/img ro - erofs /dev/vdc ro\n";
        assert!(mounted_at(text, Path::new("/run")));
        assert!(mounted_at(text, Path::new("/run/cocoon/a b")));
        assert!(mounted_at(text, Path::new("/run/cocoon/img")));
        assert!(!mounted_at(text, Path::new("/run/cocoon")));
        assert_eq!(unescape_mountinfo("a\\134b\\"), "a\\b\\");
        assert_eq!(unescape_mountinfo("\\04"), "\\04");
    }

    use crate::sandbox::test_support::in_private_mount_ns;

    /// A loop device over a fresh image; detached on drop.
    struct Loop(String);
    impl Loop {
        fn new(image: &Path) -> Loop {
            let out = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(image)
                .output()
                .expect("losetup");
            assert!(out.status.success(), "losetup: {:?}", out);
            Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
    }
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().expect("spawn");
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }

    #[test]
    fn mounts_and_unmounts_ext4_and_erofs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ext4 = dir.path().join("rw.img");
        std::fs::File::create(&ext4)
            .and_then(|f| f.set_len(16 << 20))
            .expect("image");
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&ext4));
        let src = dir.path().join("src");
        std::fs::create_dir(&src).expect("mkdir");
        std::fs::write(src.join("hello"), "from erofs").expect("write");
        let erofs = dir.path().join("ro.img");
        run(Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&erofs)
            .arg(&src));
        let ext4_loop = Loop::new(&ext4);
        let erofs_loop = Loop::new(&erofs);
        let mnt = dir.path().join("mnt");
        let rw = mnt.join("rw");
        let ro = mnt.join("ro");

        in_private_mount_ns(|| {
            let opts = parse_options(FsType::Ext4, false, "noatime").expect("opts");
            mount_device(Path::new(&ext4_loop.0), &rw, FsType::Ext4, &opts).expect("mount ext4");
            std::fs::write(rw.join("f"), "data").expect("write on ext4");
            let again = mount_device(Path::new(&ext4_loop.0), &rw, FsType::Ext4, &opts)
                .expect_err("second mount");
            assert!(matches!(again, AgentError::AlreadyExists { .. }), "{again}");

            let opts = parse_options(FsType::Erofs, false, "").expect("opts");
            mount_device(Path::new(&erofs_loop.0), &ro, FsType::Erofs, &opts).expect("mount erofs");
            assert_eq!(
                std::fs::read_to_string(ro.join("hello")).expect("read"),
                "from erofs"
            );
            assert!(std::fs::write(ro.join("x"), "").is_err());

            // Busy: a process's cwd... here an open file keeps it busy.
            let held = std::fs::File::open(rw.join("f")).expect("open");
            let busy = remove(&rw.to_string_lossy()).expect_err("busy");
            assert!(matches!(busy, AgentError::FailedPrecondition(_)), "{busy}");
            assert!(busy.to_string().contains("busy"), "{busy}");
            drop(held);
            remove(&rw.to_string_lossy()).expect("unmount ext4");
            remove(&ro.to_string_lossy()).expect("unmount erofs");
            let gone = remove(&rw.to_string_lossy()).expect_err("not mounted");
            assert!(matches!(gone, AgentError::NotFound { .. }), "{gone}");

            // The whole AddStorage path: a fake sysfs names the loop device as the disk
            // with our serial, which appears after a while; /dev is a tmpfs of this
            // namespace (the host's /tmp may be nodev), so the node is made by mknod.
            let sys = dir.path().join("sys");
            let dev = dir.path().join("dev");
            std::fs::create_dir(&dev).expect("mkdir dev");
            mount(
                Some("tmpfs"),
                &dev,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .expect("tmpfs dev");
            let loop_name = ext4_loop.0.trim_start_matches("/dev/");
            let devno = std::fs::read_to_string(format!("/sys/block/{loop_name}/dev"))
                .expect("loop dev number");
            fake_disk(&sys, "vdz", "cocoon-w-1", 0);
            std::fs::write(sys.join("block/vdz/dev"), devno).expect("dev");
            let size = sys.join("block/vdz/size");
            let swap = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                std::fs::write(size, "32768\n").expect("size");
            });
            let req = api::AddStorageRequest {
                serial: "cocoon-w-1".into(),
                fstype: "ext4".into(),
                mount_point: rw.to_string_lossy().into_owned(),
                read_only: true,
                timeout_ms: 2000,
                ..Default::default()
            };
            let device = add_in(&sys, &dev, &req).expect("add");
            swap.join().expect("swap");
            assert_eq!(device, dev.join("vdz").display().to_string());
            assert_eq!(std::fs::read_to_string(rw.join("f")).expect("read"), "data");
            assert!(std::fs::write(rw.join("g"), "").is_err(), "read-only");
            let again = add_in(&sys, &dev, &req).expect_err("mounted twice");
            assert!(matches!(again, AgentError::AlreadyExists { .. }), "{again}");
            remove(&rw.to_string_lossy()).expect("unmount");
            let missing = api::AddStorageRequest {
                serial: "cocoon-w-2".into(),
                timeout_ms: 30,
                ..req
            };
            let err = add_in(&sys, &dev, &missing).expect_err("no such disk");
            assert!(matches!(err, AgentError::Timeout(_)), "{err}");
        });
    }
}
