//! `cocoon check`: whether this host can run Cocoon sandboxes, one line per item with a
//! fix hint for each problem.

use std::path::Path;
use std::process::Command;

use crate::config::Config;
use crate::host::{detect_kvm, Kvm};

use super::procfs;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: &'static str,
    pub ok: bool,
    /// A failing required item makes `cocoon check` exit 1; others only warn.
    pub required: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it, shown when the item fails.
    pub fix: Option<String>,
}

impl Item {
    fn ok(name: &'static str, detail: impl Into<String>) -> Item {
        Item {
            name,
            ok: true,
            required: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Item {
        Item {
            name,
            ok: false,
            required: true,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn check(
        name: &'static str,
        ok: bool,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Item {
        if ok {
            Item::ok(name, detail)
        } else {
            Item::fail(name, detail, fix)
        }
    }
}

/// The report's text: `OK  `, `FAIL` or `WARN` (a failing optional item), the item,
/// what was found, and an indented fix line under each failure.
pub fn render(items: &[Item]) -> String {
    let width = items.iter().map(|i| i.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for item in items {
        let mark = match (item.ok, item.required) {
            (true, _) => "OK  ",
            (false, true) => "FAIL",
            (false, false) => "WARN",
        };
        out.push_str(&format!(
            "{mark} {:width$}  {}\n",
            item.name,
            item.detail,
            width = width
        ));
        if let (false, Some(fix)) = (item.ok, &item.fix) {
            out.push_str(&format!("     {:width$}  fix: {fix}\n", "", width = width));
        }
    }
    out
}

/// How many required items failed.
pub fn failures(items: &[Item]) -> usize {
    items.iter().filter(|i| i.required && !i.ok).count()
}

/// Runs every check. `config` is the loaded configuration or why it could not be
/// loaded (then the defaults are checked, and the configuration item fails).
/// The shim binary containerd looks for, for `runtime_type = "io.containerd.cocoon.v1"`.
const SHIM: &str = "containerd-shim-cocoon-v1";

pub fn run(config: std::result::Result<(&Config, &Path), (String, &Path)>) -> Vec<Item> {
    let default = Config::default();
    let mut items = Vec::new();
    let config = match config {
        Ok((config, path)) => {
            let detail = if path.exists() {
                format!("{}", path.display())
            } else {
                format!("{} absent: built-in defaults", path.display())
            };
            items.push(Item::ok("config", detail));
            config
        }
        Err((message, path)) => {
            items.push(Item::fail(
                "config",
                message,
                format!(
                    "correct {} (every key is documented in runtime/src/config.rs)",
                    path.display()
                ),
            ));
            &default
        }
    };

    let kvm = detect_kvm();
    let kvm_fix = match &kvm {
        Kvm::Hardware { .. } => String::new(),
        Kvm::Pvm | Kvm::Unknown => "stock guest kernels need hardware virtualization: enable \
            nested virtualization on this VM or use bare metal"
            .into(),
        Kvm::Absent => "load kvm_intel or kvm_amd (modprobe) and check /dev/kvm permissions".into(),
    };
    items.push(Item::check(
        "kvm",
        kvm.boots_stock_kernel(),
        kvm.to_string(),
        kvm_fix,
    ));

    items.push(char_device(
        "tun",
        Path::new("/dev/net/tun"),
        "modprobe tun (pods get their network through a TAP device)",
    ));

    items.push(containerd());

    for (name, path, what) in [
        ("kernel", &config.kernel, "guest kernel"),
        ("initramfs", &config.initramfs, "guest initramfs"),
    ] {
        items.push(Item::check(
            name,
            path.is_file(),
            format!(
                "{what} {} {}",
                path.display(),
                if path.is_file() { "present" } else { "missing" }
            ),
            format!("build and install it (make install), or set `{name}` in the config",),
        ));
    }

    let vmm_ok = procfs::is_executable(&config.vmm);
    let vmm_detail = if vmm_ok {
        format!("{} executable", config.vmm.display())
    } else if config.vmm.exists() {
        format!("{} is not an executable file", config.vmm.display())
    } else {
        format!("{} missing", config.vmm.display())
    };
    items.push(Item::check(
        "vmm",
        vmm_ok,
        vmm_detail,
        format!(
            "install cocoon-vmm at {} (make install), or set `vmm` in the config",
            config.vmm.display()
        ),
    ));

    // containerd starts `containerd-shim-cocoon-v1` by name from its own PATH.
    let shim = procfs::find_in_path(SHIM);
    items.push(Item::check(
        "shim",
        shim.is_some(),
        match &shim {
            Some(p) => format!("{} (runtime_type io.containerd.cocoon.v1)", p.display()),
            None => format!("{SHIM} not found in PATH"),
        },
        "make install (puts it in /usr/local/bin, in containerd's PATH)",
    ));

    for (program, package, use_) in [
        ("mkfs.erofs", "erofs-utils", "image disks"),
        ("mkfs.ext4", "e2fsprogs", "writable disks"),
    ] {
        let found = procfs::find_in_path(program);
        items.push(Item::check(
            program,
            found.is_some(),
            match &found {
                Some(p) => format!("{} ({use_})", p.display()),
                None => format!("not found in PATH (needed for {use_})"),
            },
            format!("apt-get install {package}"),
        ));
    }

    let cgroups = procfs::cgroup_mounts();
    items.push(Item::check(
        "cgroups",
        cgroups.v2.is_some() || !cgroups.v1.is_empty(),
        cgroups.describe(),
        "mount cgroup2 on /sys/fs/cgroup (systemd does this at boot)",
    ));
    items
}

fn char_device(name: &'static str, path: &Path, fix: &str) -> Item {
    use std::os::unix::fs::FileTypeExt;
    let ok = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device());
    Item::check(
        name,
        ok,
        format!(
            "{} {}",
            path.display(),
            if ok {
                "present"
            } else {
                "missing or not a character device"
            }
        ),
        fix,
    )
}

fn containerd() -> Item {
    match Command::new("containerd").arg("--version").output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            Item::ok("containerd", parse_containerd_version(&text))
        }
        Ok(out) => Item::fail(
            "containerd",
            format!(
                "`containerd --version` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            "reinstall containerd (1.6 or later)",
        ),
        Err(e) => Item::fail(
            "containerd",
            format!("cannot run `containerd --version`: {e}"),
            "apt-get install containerd (1.6 or later)",
        ),
    }
}

/// `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3` →
/// `containerd 1.6.20~ds1`; anything else is shown as printed.
pub fn parse_containerd_version(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["containerd", _, version, ..] => format!("containerd {version}"),
        _ if line.is_empty() => "containerd (no version printed)".into(),
        _ => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_marks_and_fix_lines() {
        let items = vec![
            Item::ok("kvm", "hardware KVM"),
            Item::fail("tun", "missing", "modprobe tun"),
            Item {
                required: false,
                ..Item::fail("x", "odd", "do y")
            },
        ];
        let text = render(&items);
        assert_eq!(
            text,
            "OK   kvm  hardware KVM\n\
             FAIL tun  missing\n\
             \x20         fix: modprobe tun\n\
             WARN x    odd\n\
             \x20         fix: do y\n"
        );
        assert_eq!(failures(&items), 1);
    }

    #[test]
    fn containerd_version_is_short() {
        assert_eq!(
            parse_containerd_version(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n"
            ),
            "containerd 1.6.20~ds1"
        );
        assert_eq!(parse_containerd_version("v2.0.0\n"), "v2.0.0");
        assert_eq!(
            parse_containerd_version(""),
            "containerd (no version printed)"
        );
    }

    #[test]
    fn a_bad_config_fails_but_the_rest_is_checked() {
        let items = run(Err((
            "bad key".into(),
            Path::new("/etc/cocoon/config.toml"),
        )));
        assert!(!items[0].ok && items[0].detail == "bad key");
        assert!(items.iter().any(|i| i.name == "cgroups"));
        assert!(failures(&items) >= 1);
    }
}
