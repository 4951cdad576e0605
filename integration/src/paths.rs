//! Where the repository, build outputs and host tools are.

use std::path::{Path, PathBuf};

/// The repository root (this crate lives in `<root>/integration`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `build/` (or `$COCOON_BUILD_DIR`): kernels, initramfs, agent.
pub fn build_dir() -> PathBuf {
    std::env::var_os("COCOON_BUILD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("build"))
}

/// The guest kernel, uncompressed ELF with the PVH entry point.
pub fn guest_vmlinux() -> PathBuf {
    build_dir().join("vmlinux")
}

/// The guest initramfs (newc cpio, `cocoon-agent` as `/init`).
pub fn guest_initramfs() -> PathBuf {
    build_dir().join("initramfs.cpio")
}

/// The test lab's kernel.
pub fn lab_kernel() -> PathBuf {
    build_dir().join("lab").join("bzImage")
}

/// The test lab's PID 1 script.
pub fn lab_init() -> PathBuf {
    repo_root().join("integration").join("lab").join("init.sh")
}

/// The QEMU binary (`$COCOON_QEMU` or `qemu-system-x86_64` from PATH).
pub fn qemu() -> PathBuf {
    std::env::var_os("COCOON_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// QEMU's qboot firmware: boots `-kernel` in milliseconds where SeaBIOS stalls.
pub fn qboot() -> PathBuf {
    PathBuf::from("/usr/share/qemu/qboot.rom")
}

/// The static guest-side test program (`make probe`).
pub fn probe() -> PathBuf {
    build_dir().join("cocoon-vsock-probe")
}
