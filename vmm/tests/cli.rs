//! Bad input ends `cocoon-vmm` with status 2 and one message naming what is wrong,
//! before any VM exists. These need no guest, so they run on any host with /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VMM: &str = env!("CARGO_BIN_EXE_cocoon-vmm");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn vmlinux() -> String {
    let k = repo().join("build/vmlinux");
    assert!(k.is_file(), "{} missing: run `make kernel`", k.display());
    k.display().to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(VMM)
        .args(args)
        .output()
        .expect("run cocoon-vmm")
}

fn assert_bad(out: Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(want), "{stderr:?} should mention {want:?}");
    assert_eq!(stderr.lines().count(), 1, "one clear message: {stderr:?}");
}

#[test]
fn missing_kernel() {
    assert_bad(
        run(&["--kernel", "/nonexistent/vmlinux"]),
        "kernel /nonexistent/vmlinux",
    );
}

#[test]
fn non_elf_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bz = dir.path().join("bzImage");
    std::fs::write(&bz, b"MZ not an elf at all, just bytes").expect("write");
    assert_bad(
        run(&["--kernel", &bz.display().to_string()]),
        "not an ELF file",
    );
}

#[test]
fn memory_out_of_range() {
    let k = vmlinux();
    assert_bad(run(&["--kernel", &k, "--memory-mib", "8"]), "too small");
    assert_bad(
        run(&["--kernel", &k, "--memory-mib", "100000000"]),
        "too large",
    );
}

#[test]
fn vcpus_beyond_limit() {
    let k = vmlinux();
    assert_bad(run(&["--kernel", &k, "--vcpus", "100000"]), "vcpus 100000");
    assert_bad(run(&["--kernel", &k, "--vcpus", "0"]), "vcpus 0");
}

#[test]
fn missing_disk_file() {
    let k = vmlinux();
    assert_bad(
        run(&[
            "--kernel",
            &k,
            "--drive",
            "empty",
            "--drive",
            "path=/nonexistent.img",
        ]),
        "drive 1 (/nonexistent.img)",
    );
}

#[test]
fn too_many_slots() {
    let k = vmlinux();
    let mut args = vec!["--kernel", k.as_str()];
    for _ in 0..19 {
        args.extend(["--drive", "empty"]);
    }
    assert_bad(run(&args), "at most 18");
}

#[test]
fn bad_json_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/k", "memory": 5}"#).expect("write");
    assert_bad(
        run(&["--config", &cfg.display().to_string()]),
        "unknown field `memory`",
    );
}

#[test]
fn no_dev_kvm() {
    // A private mount namespace where /dev is an empty tmpfs.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {VMM} --kernel {}",
            vmlinux()
        ))
        .output()
        .expect("unshare");
    assert_bad(out, "/dev/kvm: No such file");
}

#[test]
fn no_permission_on_dev_kvm() {
    // Whatever this host's /dev/kvm mode, the VMM runs as nobody against a root-only node
    // bound over /dev/kvm in a private mount namespace.
    let dir = tempfile::tempdir().expect("tempdir");
    let node = dir.path().join("kvm");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mknod -m 600 {node} c 10 232 && mount --bind {node} /dev/kvm && \
             exec setpriv --reuid=65534 --regid=65534 --clear-groups {VMM} --kernel {}",
            vmlinux(),
            node = node.display()
        ))
        .output()
        .expect("unshare");
    assert_bad(out, "/dev/kvm: Permission denied");
}
