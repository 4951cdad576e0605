//! Test guests: an initramfs whose `/init` is a shell script run by Debian's static
//! busybox, for VM tests that need the guest to do something specific.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's `busybox-static`.
pub const BUSYBOX: &str = "/bin/busybox";

/// Writes `<dir>/<name>.cpio`: busybox plus `/init` running `script` after the basics
/// (busybox applets installed, proc/sys/dev mounted). The script ends the VM itself.
pub fn busybox_initramfs(dir: &Path, name: &str, script: &str) -> std::io::Result<PathBuf> {
    busybox_initramfs_with(dir, name, script, &[])
}

/// As [`busybox_initramfs`], plus `extra` host files at the given guest paths.
pub fn busybox_initramfs_with(
    dir: &Path,
    name: &str,
    script: &str,
    extra: &[(&Path, &str)],
) -> std::io::Result<PathBuf> {
    let init = dir.join(format!("{name}.init"));
    let body = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev\n\
         {script}\n"
    );
    std::fs::write(&init, body)?;
    let mut perms = std::fs::metadata(&init)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&init, perms)?;
    let out = dir.join(format!("{name}.cpio"));
    let status = Command::new("python3")
        .arg(crate::paths::repo_root().join("rootfs/mkinitramfs.py"))
        .arg(&init)
        .arg(&out)
        .arg(format!("{BUSYBOX}:bin/busybox"))
        .args(
            extra
                .iter()
                .map(|(src, dest)| format!("{}:{dest}", src.display())),
        )
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "mkinitramfs.py failed: {status}"
        )));
    }
    Ok(out)
}

/// A sparse ext4 image of `mib` MiB made with mkfs.ext4.
pub fn ext4_image(path: &Path, mib: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "mkfs.ext4 {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Reads a file out of an ext4 image without mounting it (debugfs).
pub fn ext4_cat(image: &Path, file: &str) -> std::io::Result<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
