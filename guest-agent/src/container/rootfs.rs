//! The container rootfs: an overlay of the image disk (lower, read-only) and the
//! container's own writable disk (`upper`, `work`).

use super::spec::overlay_options;
use crate::error::{AgentError, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::Path;

/// Mounts the overlay at `target` (created when missing).
pub fn mount_overlay(image_mount: &Path, writable_mount: &Path, target: &Path) -> Result<()> {
    if !image_mount.is_dir() {
        return Err(AgentError::InvalidArgument(format!(
            "rootfs image_mount {} is not a directory (was the image disk added?)",
            image_mount.display()
        )));
    }
    if !writable_mount.is_dir() {
        return Err(AgentError::InvalidArgument(format!(
            "rootfs writable_mount {} is not a directory (was the writable disk added?)",
            writable_mount.display()
        )));
    }
    let upper = writable_mount.join("upper");
    let work = writable_mount.join("work");
    let options = overlay_options(image_mount, &upper, &work)?;
    for dir in [&upper, &work, &target.to_path_buf()] {
        std::fs::create_dir_all(dir)
            .map_err(AgentError::io(format!("create {}", dir.display())))?;
    }
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| {
        AgentError::io(format!("mount overlay ({options}) on {}", target.display()))(e.into())
    })
}

/// Unmounts what is mounted at `target`; nothing mounted is fine. A busy mount is
/// detached (lazy): the container's mount namespace may still pin it for a moment.
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => umount2(target, MntFlags::MNT_DETACH)
            .map_err(|e| AgentError::io(format!("unmount {}", target.display()))(e.into())),
        Err(e) => Err(AgentError::io(format!("unmount {}", target.display()))(
            e.into(),
        )),
    }
}

/// Whether `path` is a mount point (checked through /proc/self/mountinfo, so bind
/// mounts count too).
pub fn is_mount_point(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|info| crate::storage::mounted_at(&info, path))
}

/// Whether "/" is the initramfs (rootfs): pivot_root(2) cannot move it, so containers
/// must use libcontainer's no-pivot mode (MS_MOVE + chroot).
pub fn root_is_initramfs() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    root_is_initramfs_in(&info)
}

fn root_is_initramfs_in(mountinfo: &str) -> bool {
    mountinfo.lines().any(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|sep| fields.get(sep + 1));
        fields.get(4) == Some(&"/") && matches!(fstype, Some(&"rootfs"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_helpers() {
        let initramfs = "1 1 0:2 / / rw - rootfs rootfs rw\n20 1 0:5 / /proc rw - proc proc rw\n";
        let disk = "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n";
        assert!(root_is_initramfs_in(initramfs));
        assert!(!root_is_initramfs_in(disk));
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
    }

    #[test]
    fn overlay_needs_existing_disks() {
        let t = tempfile::tempdir().expect("tempdir");
        let err = mount_overlay(&t.path().join("no"), t.path(), &t.path().join("m"))
            .expect_err("missing image");
        assert!(matches!(err, AgentError::InvalidArgument(_)), "{err}");
        let err = mount_overlay(t.path(), &t.path().join("no"), &t.path().join("m"))
            .expect_err("missing writable");
        assert!(err.to_string().contains("writable"), "{err}");
    }

    #[test]
    fn overlay_mounts_and_unmounts_when_root() {
        if !nix::unistd::geteuid().is_root() {
            crate::cannot_run("needs root");
            return;
        }
        let t = tempfile::tempdir().expect("tempdir");
        let (image, disk, target) = (
            t.path().join("image"),
            t.path().join("disk"),
            t.path().join("rootfs"),
        );
        std::fs::create_dir_all(&image).expect("mkdir");
        std::fs::create_dir_all(&disk).expect("mkdir");
        std::fs::write(image.join("from-image"), "i").expect("write");
        mount_overlay(&image, &disk, &target).expect("mount");
        assert!(is_mount_point(&target));
        std::fs::write(target.join("new"), "n").expect("write");
        assert_eq!(
            std::fs::read_to_string(target.join("from-image"))
                .ok()
                .as_deref(),
            Some("i")
        );
        unmount(&target).expect("unmount");
        assert!(!is_mount_point(&target));
        assert!(
            disk.join("upper/new").exists(),
            "writes land on the writable disk"
        );
        unmount(&target).expect("unmounting twice is fine");
    }
}
