//! VMM configuration: command-line flags or one JSON file (parsed by `vmm-api`), validated
//! here before anything is created. Every error names what is wrong and where.

use std::path::{Path, PathBuf};
pub use vmm_api::config::{DriveConfig, NetConfig, ParseError, VmConfig, VsockConfig};

/// Guest memory bounds, MiB. Below the minimum our kernel and initramfs do not fit.
pub const MIN_MEMORY_MIB: u64 = 64;
/// vCPUs are described by an MP table with 8-bit APIC IDs; the IOAPIC takes the next ID.
pub const MAX_VCPUS_MPTABLE: u32 = 254;
/// Drive slots, vsock and net together: each needs an MMIO window and an IOAPIC pin
/// (5..=23; 4 is COM1, and the last pin is the balloon's, which is always there).
pub const MAX_DRIVES: usize = 18;
/// The x86 kernel's COMMAND_LINE_SIZE.
pub const MAX_CMDLINE: usize = 2048;

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("/dev/kvm: {0} (is KVM loaded, and may this user open /dev/kvm?)")]
    Kvm(String),
    #[error("kernel {path}: {why}")]
    Kernel { path: PathBuf, why: String },
    #[error("initramfs {path}: {why}")]
    Initramfs { path: PathBuf, why: String },
    #[error("memory {mib} MiB is {why}")]
    Memory { mib: u64, why: String },
    #[error("vcpus {count}: {why}")]
    Vcpus { count: u32, why: String },
    #[error("drive {index} ({path}): {why}")]
    Drive {
        index: usize,
        path: PathBuf,
        why: String,
    },
    #[error("{count} devices requested (drives, vsock, net); at most {MAX_DRIVES} are supported")]
    TooManyDrives { count: usize },
    #[error(
        "kernel command line is {len} bytes after the VMM's additions; the limit is {MAX_CMDLINE}"
    )]
    Cmdline { len: usize },
    #[error("serial output {path}: {why}")]
    Serial { path: PathBuf, why: String },
    #[error("vsock {path}: {why}")]
    Vsock { path: PathBuf, why: String },
    #[error("net: {0}")]
    Net(String),
    #[error("control socket {path}: {why}")]
    ControlSocket { path: PathBuf, why: String },
}

pub const USAGE: &str = "\
cocoon-vmm: a KVM virtual machine monitor for one Cocoon pod sandbox

Usage:
  cocoon-vmm --config FILE.json
  cocoon-vmm --kernel VMLINUX [--initramfs CPIO] [--cmdline TEXT] [--vcpus N]
             [--memory-mib N] [--serial stdout|none|FILE] [--drive SPEC]...
             [--vsock SPEC] [--net SPEC] [--control-socket PATH] [--log FILE]

  --drive SPEC   one drive slot, in order (slot 0 is the first --drive):
                 `empty`, `empty,ro`, or `path=FILE[,ro][,serial=ID]`
  --vsock SPEC   `PATH[,cid=N]`: virtio-vsock; host side on Unix sockets (docs/vsock.md)
  --net SPEC     `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]` (an open TAP fd, IFF_VNET_HDR)
  The JSON file has the same fields: kernel, initramfs, cmdline, vcpus, memory_mib,
  serial, drives [{path, read_only, serial}], vsock {path, cid}, net {tap | fd, mac},
  control_socket, log.

Exit status: 0 the guest powered off or reset, or a control-socket shutdown;
1 the VM failed while running; 2 bad configuration (nothing was started).
";

/// Checks everything that can be checked without creating the VM. `kvm_max_vcpus` and
/// `host_mem_mib` come from the host (KVM_CAP_MAX_VCPUS, MemTotal).
pub fn validate(
    config: &VmConfig,
    kvm_max_vcpus: u32,
    host_mem_mib: u64,
) -> Result<(), ConfigError> {
    check_kernel(&config.kernel)?;
    if let Some(initrd) = &config.initramfs {
        let why = match std::fs::metadata(initrd) {
            Err(e) => Some(e.to_string()),
            Ok(m) if !m.is_file() => Some("not a regular file".into()),
            Ok(m) if m.len() == 0 => Some("empty file".into()),
            Ok(_) => None,
        };
        if let Some(why) = why {
            return Err(ConfigError::Initramfs {
                path: initrd.clone(),
                why,
            });
        }
    }
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::Memory {
            mib: config.memory_mib,
            why: format!("too small: at least {MIN_MEMORY_MIB} MiB"),
        });
    }
    if config.memory_mib > host_mem_mib {
        return Err(ConfigError::Memory {
            mib: config.memory_mib,
            why: format!("too large: this host has {host_mem_mib} MiB"),
        });
    }
    let max_vcpus = kvm_max_vcpus.min(MAX_VCPUS_MPTABLE);
    if config.vcpus == 0 || config.vcpus > max_vcpus {
        return Err(ConfigError::Vcpus {
            count: config.vcpus,
            why: format!("must be 1..={max_vcpus} (KVM allows {kvm_max_vcpus})"),
        });
    }
    let devices = config.drives.len()
        + usize::from(config.vsock.is_some())
        + usize::from(config.net.is_some());
    if devices > MAX_DRIVES {
        return Err(ConfigError::TooManyDrives { count: devices });
    }
    if let Some(v) = &config.vsock {
        if v.cid < 3 || v.cid > u64::from(u32::MAX) - 1 {
            return Err(ConfigError::Vsock {
                path: v.path.clone(),
                why: format!("guest cid {} must be 3..=4294967294", v.cid),
            });
        }
        let dir = v.path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            return Err(ConfigError::Vsock {
                path: v.path.clone(),
                why: format!("directory {} does not exist", dir.display()),
            });
        }
    }
    if let Some(n) = &config.net {
        let why = match (&n.tap, n.fd) {
            (Some(_), Some(_)) | (None, None) => Some("give exactly one of tap=NAME or fd=N"),
            // SAFETY: F_GETFD only queries the descriptor table entry.
            (None, Some(fd)) if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 => {
                Some("fd is not an open file descriptor")
            }
            (Some(name), None) if name.len() >= 16 => Some("TAP names are at most 15 bytes"),
            _ => None,
        };
        let bad_mac = n.mac.as_deref().is_some_and(|m| parse_mac(m).is_none());
        if let Some(why) = why.or(bad_mac.then_some("mac must look like 02:00:00:00:00:01")) {
            return Err(ConfigError::Net(why.into()));
        }
    }
    for (index, d) in config.drives.iter().enumerate() {
        if let Some(path) = &d.path {
            let why = match std::fs::metadata(path) {
                Err(e) => Some(e.to_string()),
                Ok(m) if !(m.is_file() || is_block_device(&m)) => {
                    Some("not a regular file or block device".into())
                }
                Ok(_) => None,
            };
            if let Some(why) = why {
                return Err(ConfigError::Drive {
                    index,
                    path: path.clone(),
                    why,
                });
            }
        }
    }
    let len = crate::vm::kernel_cmdline(config).len();
    if len >= MAX_CMDLINE {
        return Err(ConfigError::Cmdline { len });
    }
    if !matches!(config.serial.as_str(), "stdout" | "none") {
        let path = Path::new(&config.serial);
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = parent.filter(|d| !d.is_dir()) {
            return Err(ConfigError::Serial {
                path: path.into(),
                why: format!("directory {} does not exist", dir.display()),
            });
        }
    }
    if let Some(sock) = &config.control_socket {
        let parent = sock.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = parent.filter(|d| !d.is_dir()) {
            return Err(ConfigError::ControlSocket {
                path: sock.clone(),
                why: format!("directory {} does not exist", dir.display()),
            });
        }
    }
    Ok(())
}

fn is_block_device(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_block_device()
}

/// The kernel must be a 64-bit x86 ELF (`vmlinux`): we boot it through its PVH entry.
fn check_kernel(path: &Path) -> Result<(), ConfigError> {
    let err = |why: String| ConfigError::Kernel {
        path: path.into(),
        why,
    };
    let mut header = [0u8; 20];
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    use std::io::Read;
    f.read_exact(&mut header)
        .map_err(|_| err("too short to be an ELF kernel".into()))?;
    if header[..4] != *b"\x7fELF" {
        return Err(err(
            "not an ELF file (give the uncompressed vmlinux, not a bzImage)".into(),
        ));
    }
    // EI_CLASS = ELFCLASS64, e_machine = EM_X86_64 (62).
    if header[4] != 2 || u16::from_le_bytes([header[18], header[19]]) != 62 {
        return Err(err("not a 64-bit x86 ELF".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("02:00:00:00:00:09"), Some([2, 0, 0, 0, 0, 9]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0g"), None);
    }

    fn elf_kernel(dir: &Path) -> PathBuf {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[18] = 62;
        let p = dir.join("vmlinux");
        std::fs::write(&p, h).expect("write");
        p
    }

    #[test]
    fn validation_names_each_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = elf_kernel(dir.path());
        let base =
            VmConfig::from_args(&["--kernel".into(), kernel.display().to_string()]).expect("parse");
        assert!(validate(&base, 64, 1024).is_ok());

        let check = |mutate: &dyn Fn(&mut VmConfig), want: &str| {
            let mut c = base.clone();
            mutate(&mut c);
            let e = validate(&c, 64, 1024).expect_err(want).to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        };
        check(&|c| c.kernel = dir.path().join("nope"), "No such file");
        let bz = dir.path().join("bzImage");
        std::fs::write(&bz, [0u8; 64]).expect("write");
        check(&|c| c.kernel = bz.clone(), "not an ELF");
        check(&|c| c.memory_mib = 16, "too small");
        check(&|c| c.memory_mib = 4096, "too large");
        check(&|c| c.vcpus = 0, "vcpus 0");
        check(&|c| c.vcpus = 65, "1..=64");
        check(
            &|c| c.initramfs = Some(dir.path().join("missing.cpio")),
            "initramfs",
        );
        check(
            &|c| {
                c.drives = vec![DriveConfig {
                    path: Some(dir.path().join("disk.img")),
                    read_only: false,
                    serial: None,
                }]
            },
            "drive 0",
        );
        check(
            &|c| {
                c.drives = vec![
                    DriveConfig {
                        path: None,
                        read_only: false,
                        serial: None
                    };
                    20
                ]
            },
            "at most",
        );
        check(
            &|c| c.serial = "/nonexistent-dir/console.log".into(),
            "serial output",
        );
        check(&|c| c.cmdline = "x".repeat(MAX_CMDLINE), "command line");
        let vsock = |cid| VsockConfig {
            path: dir.path().join("v.sock"),
            cid,
        };
        check(&|c| c.vsock = Some(vsock(2)), "guest cid 2");
        let net = |tap: Option<&str>, fd: Option<i32>, mac: Option<&str>| NetConfig {
            tap: tap.map(Into::into),
            fd,
            mac: mac.map(Into::into),
        };
        check(&|c| c.net = Some(net(None, None, None)), "exactly one");
        check(
            &|c| c.net = Some(net(None, Some(9999), None)),
            "not an open file",
        );
        check(
            &|c| c.net = Some(net(Some("tap0"), None, Some("zz"))),
            "mac must",
        );
        let mut ok = base.clone();
        ok.vsock = Some(vsock(3));
        ok.net = Some(net(Some("tap0"), None, Some("02:00:00:00:00:01")));
        assert!(validate(&ok, 64, 1024).is_ok());
    }
}
