//! `scripts/install.sh` (`make install`, and so `make demo`): staged into a scratch root
//! with `DESTDIR`, from stand-in build outputs, so it runs anywhere in milliseconds.

use cocoon_integration::paths;
use cocoon_runtime::config::Config;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PREFIX: &str = "/opt/cocoon-test";
const CONFIG: &str = "/etc/cocoon-test/config.toml";

/// (source under the scratch dir, installed path under PREFIX, mode)
const FILES: [(&str, &str, u32); 5] = [
    (
        "release/containerd-shim-cocoon-v1",
        "bin/containerd-shim-cocoon-v1",
        0o755,
    ),
    ("release/cocoon", "bin/cocoon", 0o755),
    ("build/cocoon-vmm", "bin/cocoon-vmm", 0o755),
    ("build/vmlinux", "share/cocoon/vmlinux", 0o644),
    ("build/initramfs.cpio", "share/cocoon/initramfs.cpio", 0o644),
];

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        for (src, _, _) in FILES {
            write(&dir.path().join(src), &format!("old {src}"));
        }
        Scratch { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn installed(&self, rel: &str) -> PathBuf {
        self.root().join(PREFIX.trim_start_matches('/')).join(rel)
    }

    fn config(&self) -> PathBuf {
        self.root().join(CONFIG.trim_start_matches('/'))
    }

    fn install(&self) -> Output {
        Command::new(paths::repo_root().join("scripts/install.sh"))
            .env("PREFIX", PREFIX)
            .env("CONFIG", CONFIG)
            .env("DESTDIR", self.root())
            .env("BUILD", self.dir.path().join("build"))
            .env("RELEASE", self.dir.path().join("release"))
            .output()
            .expect("run scripts/install.sh")
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install.sh failed: {text}");
    text
}

#[test]
fn installs_every_file_and_a_config_the_runtime_reads() {
    let s = Scratch::new();
    ok(&s.install());
    for (src, dst, mode) in FILES {
        let path = s.installed(dst);
        assert_eq!(read(&path), format!("old {src}"), "{}", path.display());
        let m = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(m, mode, "mode of {}", path.display());
    }
    let config = Config::load(&s.config()).expect("the written config parses");
    assert_eq!(config.vmm, Path::new(PREFIX).join("bin/cocoon-vmm"));
    assert_eq!(
        config.kernel,
        Path::new(PREFIX).join("share/cocoon/vmlinux")
    );
    assert_eq!(
        config.initramfs,
        Path::new(PREFIX).join("share/cocoon/initramfs.cpio")
    );
    // Everything else as documented defaults.
    let defaults = Config::default();
    assert_eq!(config.default_memory_mib, defaults.default_memory_mib);
    assert_eq!(config.writable_disk_size, defaults.writable_disk_size);
    assert_eq!(config.state_dir, defaults.state_dir);
    assert_eq!(config.image_dir, defaults.image_dir);
    assert_eq!(config.kernel_cmdline, defaults.kernel_cmdline);
}

#[test]
fn reinstall_keeps_the_operators_config_and_running_binaries() {
    let s = Scratch::new();
    ok(&s.install());
    let edited =
        format!("{}default_vcpus = 2\n", read(&s.config())).replace("default_vcpus = 1\n", "");
    std::fs::write(s.config(), &edited).expect("edit config");
    // A "running" shim: its file stays open across the upgrade.
    let mut running =
        std::fs::File::open(s.installed("bin/containerd-shim-cocoon-v1")).expect("open");
    write(
        &s.dir.path().join("release/containerd-shim-cocoon-v1"),
        "new shim",
    );

    let text = ok(&s.install());
    assert!(text.contains("left as it is"), "{text}");
    assert_eq!(read(&s.config()), edited);
    assert_eq!(Config::load(&s.config()).expect("parses").default_vcpus, 2);
    assert_eq!(
        read(&s.installed("bin/containerd-shim-cocoon-v1")),
        "new shim"
    );
    let mut old = String::new();
    running.read_to_string(&mut old).expect("read old");
    assert_eq!(old, "old release/containerd-shim-cocoon-v1");
    let leftovers: Vec<_> = std::fs::read_dir(s.installed("bin"))
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn a_missing_build_output_installs_nothing() {
    let s = Scratch::new();
    std::fs::remove_file(s.dir.path().join("build/vmlinux")).expect("rm");
    let out = s.install();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmlinux missing"), "{err}");
    assert!(!s.root().exists(), "something was installed");
}
