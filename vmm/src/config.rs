//! VMM configuration: command-line flags or one JSON file, validated before anything is
//! created. Every error names what is wrong and where.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Guest memory bounds, MiB. Below the minimum our kernel and initramfs do not fit.
pub const MIN_MEMORY_MIB: u64 = 64;
/// vCPUs are described by an MP table with 8-bit APIC IDs; the IOAPIC takes the next ID.
pub const MAX_VCPUS_MPTABLE: u32 = 254;
/// Drive slots, vsock and net together: each needs an MMIO window and an IOAPIC pin
/// (5..=23; 4 is COM1, and the last pin is the balloon's, which is always there).
pub const MAX_DRIVES: usize = 18;
/// The x86 kernel's COMMAND_LINE_SIZE.
pub const MAX_CMDLINE: usize = 2048;

/// A drive slot: empty, or with a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Backing file; `None` leaves the slot empty until a swap.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A read-only slot offers VIRTIO_BLK_F_RO: the guest cannot write, whatever is swapped in.
    #[serde(default)]
    pub read_only: bool,
    /// Device serial the guest sees (`/sys/block/vdX/serial`); default `slot<N>`.
    #[serde(default)]
    pub serial: Option<String>,
}

/// The vsock device: host side is Unix sockets (docs/vsock.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Host processes connect here (`CONNECT <port>`); guest connections to host port P
    /// go to `<path>_<P>`.
    pub path: PathBuf,
    /// The guest's context ID (3 and up).
    #[serde(default = "default_cid")]
    pub cid: u64,
}

/// The network device: a TAP opened by name, or an open TAP fd inherited from the parent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default)]
    pub tap: Option<String>,
    #[serde(default)]
    pub fd: Option<i32>,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`; default: a locally administered one.
    #[serde(default)]
    pub mac: Option<String>,
}

fn default_cid() -> u64 {
    3
}

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

/// The whole VM description.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Appended to the VMM's own command line (console, virtio-mmio devices).
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// `"stdout"` (default), `"none"`, or a file path.
    #[serde(default = "default_serial")]
    pub serial: String,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Unix socket for control requests (created with mode 0600).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// The VMM's own log file (default: stderr).
    #[serde(default)]
    pub log: Option<PathBuf>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub net: Option<NetConfig>,
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_serial() -> String {
    "stdout".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Usage(String),
    #[error("reading config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    ParseFile {
        path: PathBuf,
        source: serde_json::Error,
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

impl VmConfig {
    /// Parses command-line arguments (without the program name).
    pub fn from_args(args: &[String]) -> Result<Self, ConfigError> {
        let mut it = args.iter();
        let usage = |m: String| ConfigError::Usage(m);
        let mut cfg = VmConfig {
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline: String::new(),
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
            serial: default_serial(),
            drives: Vec::new(),
            control_socket: None,
            log: None,
            vsock: None,
            net: None,
        };
        let mut config_file = None;
        let mut flags_seen = false;
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| usage(format!("{flag} needs a value")))
            };
            match flag.as_str() {
                "--config" => {
                    config_file = Some(PathBuf::from(value()?));
                    continue;
                }
                "--kernel" => cfg.kernel = value()?.into(),
                "--initramfs" => cfg.initramfs = Some(value()?.into()),
                "--cmdline" => cfg.cmdline = value()?,
                "--vcpus" => {
                    let v = value()?;
                    cfg.vcpus = v
                        .parse()
                        .map_err(|_| usage(format!("--vcpus: '{v}' is not a number")))?;
                }
                "--memory-mib" => {
                    let v = value()?;
                    cfg.memory_mib = v
                        .parse()
                        .map_err(|_| usage(format!("--memory-mib: '{v}' is not a number")))?;
                }
                "--serial" => cfg.serial = value()?,
                "--drive" => cfg.drives.push(parse_drive(&value()?)?),
                "--control-socket" => cfg.control_socket = Some(value()?.into()),
                "--log" => cfg.log = Some(value()?.into()),
                "--vsock" => cfg.vsock = Some(parse_vsock(&value()?)?),
                "--net" => cfg.net = Some(parse_net(&value()?)?),
                other => return Err(usage(format!("unknown argument '{other}'; see --help"))),
            }
            flags_seen = true;
        }
        match (config_file, flags_seen) {
            (Some(_), true) => Err(usage("--config cannot be combined with other flags".into())),
            (Some(path), false) => Self::from_file(&path),
            (None, _) if cfg.kernel.as_os_str().is_empty() => {
                Err(usage("--kernel (or --config) is required".into()))
            }
            (None, _) => Ok(cfg),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.into(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.into(),
            source,
        })
    }

    /// Checks everything that can be checked without creating the VM. `kvm_max_vcpus` and
    /// `host_mem_mib` come from the host (KVM_CAP_MAX_VCPUS, MemTotal).
    pub fn validate(&self, kvm_max_vcpus: u32, host_mem_mib: u64) -> Result<(), ConfigError> {
        check_kernel(&self.kernel)?;
        if let Some(initrd) = &self.initramfs {
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
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::Memory {
                mib: self.memory_mib,
                why: format!("too small: at least {MIN_MEMORY_MIB} MiB"),
            });
        }
        if self.memory_mib > host_mem_mib {
            return Err(ConfigError::Memory {
                mib: self.memory_mib,
                why: format!("too large: this host has {host_mem_mib} MiB"),
            });
        }
        let max_vcpus = kvm_max_vcpus.min(MAX_VCPUS_MPTABLE);
        if self.vcpus == 0 || self.vcpus > max_vcpus {
            return Err(ConfigError::Vcpus {
                count: self.vcpus,
                why: format!("must be 1..={max_vcpus} (KVM allows {kvm_max_vcpus})"),
            });
        }
        let devices =
            self.drives.len() + usize::from(self.vsock.is_some()) + usize::from(self.net.is_some());
        if devices > MAX_DRIVES {
            return Err(ConfigError::TooManyDrives { count: devices });
        }
        if let Some(v) = &self.vsock {
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
        if let Some(n) = &self.net {
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
        for (index, d) in self.drives.iter().enumerate() {
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
        let len = crate::vm::kernel_cmdline(self).len();
        if len >= MAX_CMDLINE {
            return Err(ConfigError::Cmdline { len });
        }
        if !matches!(self.serial.as_str(), "stdout" | "none") {
            let path = Path::new(&self.serial);
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(dir) = parent.filter(|d| !d.is_dir()) {
                return Err(ConfigError::Serial {
                    path: path.into(),
                    why: format!("directory {} does not exist", dir.display()),
                });
            }
        }
        if let Some(sock) = &self.control_socket {
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

/// `PATH[,cid=N]`.
fn parse_vsock(spec: &str) -> Result<VsockConfig, ConfigError> {
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
        ConfigError::Usage(format!("--vsock '{spec}': give the socket path first"))
    })?;
    let mut cfg = VsockConfig {
        path: path.into(),
        cid: default_cid(),
    };
    for part in parts {
        match part.split_once('=') {
            Some(("cid", v)) => {
                cfg.cid = v.parse().map_err(|_| {
                    ConfigError::Usage(format!("--vsock '{spec}': cid '{v}' is not a number"))
                })?
            }
            _ => {
                return Err(ConfigError::Usage(format!(
                    "--vsock '{spec}': unknown part '{part}' (PATH[,cid=N])"
                )))
            }
        }
    }
    Ok(cfg)
}

/// `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]`.
fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    let mut cfg = NetConfig {
        tap: None,
        fd: None,
        mac: None,
    };
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("tap", v)) if !v.is_empty() => cfg.tap = Some(v.into()),
            Some(("fd", v)) => {
                cfg.fd = Some(v.parse().map_err(|_| {
                    ConfigError::Usage(format!("--net '{spec}': fd '{v}' is not a number"))
                })?)
            }
            Some(("mac", v)) => cfg.mac = Some(v.into()),
            _ => {
                return Err(ConfigError::Usage(format!(
                    "--net '{spec}': unknown part '{part}' (tap=NAME | fd=N, mac=MAC)"
                )))
            }
        }
    }
    Ok(cfg)
}

/// `empty`, `empty,ro`, or `path=FILE[,ro][,serial=ID]`.
fn parse_drive(spec: &str) -> Result<DriveConfig, ConfigError> {
    let mut d = DriveConfig {
        path: None,
        read_only: false,
        serial: None,
    };
    let mut empty = false;
    for part in spec.split(',') {
        match part.split_once('=') {
            None if part == "empty" => empty = true,
            None if part == "ro" => d.read_only = true,
            Some(("path", p)) if !p.is_empty() => d.path = Some(p.into()),
            Some(("serial", s)) => d.serial = Some(s.into()),
            _ => {
                return Err(ConfigError::Usage(format!(
                    "--drive '{spec}': unknown part '{part}' (empty | path=FILE, ro, serial=ID)"
                )))
            }
        }
    }
    if empty == d.path.is_some() {
        return Err(ConfigError::Usage(format!(
            "--drive '{spec}': give either `empty` or `path=FILE`"
        )));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_parse() {
        let c = VmConfig::from_args(&args(
            "--kernel /k --vcpus 2 --memory-mib 512 --drive empty,ro \
             --drive path=/d.img,serial=data --serial none",
        ))
        .expect("parse");
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.serial, "none");
        assert_eq!(c.drives.len(), 2);
        assert!(c.drives[0].read_only && c.drives[0].path.is_none());
        assert_eq!(c.drives[1].path.as_deref(), Some(Path::new("/d.img")));
        assert_eq!(c.drives[1].serial.as_deref(), Some("data"));
    }

    #[test]
    fn vsock_and_net_flags_parse() {
        let c = VmConfig::from_args(&args(
            "--kernel /k --vsock /run/v.sock,cid=7 --net fd=3,mac=02:00:00:00:00:09",
        ))
        .expect("parse");
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                path: "/run/v.sock".into(),
                cid: 7
            })
        );
        let n = c.net.expect("net");
        assert_eq!((n.fd, n.tap), (Some(3), None));
        assert_eq!(
            parse_mac(n.mac.as_deref().unwrap_or("")),
            Some([2, 0, 0, 0, 0, 9])
        );
        assert!(VmConfig::from_args(&args("--kernel /k --vsock /v,port=1")).is_err());
        assert!(VmConfig::from_args(&args("--kernel /k --net bridge=br0")).is_err());
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0g"), None);
    }

    #[test]
    fn bad_flags_are_named() {
        let e = |s: &str| VmConfig::from_args(&args(s)).expect_err(s).to_string();
        assert!(e("--vcpus 2").contains("--kernel"));
        assert!(e("--kernel /k --vcpus x").contains("'x' is not a number"));
        assert!(e("--kernel /k --bogus").contains("'--bogus'"));
        assert!(e("--kernel /k --drive empty,path=/x").contains("either"));
        assert!(e("--kernel /k --drive path=/x,rw").contains("'rw'"));
        assert!(e("--kernel").contains("needs a value"));
        assert!(e("--config /c.json --vcpus 2").contains("cannot be combined"));
    }

    #[test]
    fn json_file_parses_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.json");
        std::fs::write(
            &good,
            r#"{"kernel":"/k","vcpus":2,"drives":[{"read_only":true},{"path":"/x"}]}"#,
        )
        .expect("write");
        let c =
            VmConfig::from_args(&["--config".into(), good.display().to_string()]).expect("parse");
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_mib, 256);
        assert!(c.drives[0].read_only);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"kernel":"/k","vcpu":2}"#).expect("write");
        let e = VmConfig::from_file(&bad)
            .expect_err("unknown field")
            .to_string();
        assert!(e.contains("bad.json") && e.contains("vcpu"), "{e}");
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
        assert!(base.validate(64, 1024).is_ok());

        let check = |mutate: &dyn Fn(&mut VmConfig), want: &str| {
            let mut c = base.clone();
            mutate(&mut c);
            let e = c.validate(64, 1024).expect_err(want).to_string();
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
        assert!(ok.validate(64, 1024).is_ok());
    }
}
