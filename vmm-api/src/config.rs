//! The VM description `cocoon-vmm` takes: command-line flags or one JSON file (`--config`),
//! the same fields either way. Parsing only; the VMM validates against the host.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why flags or a config file do not describe a VM.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
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
}

/// A drive slot: empty, or with a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// The whole VM description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl VmConfig {
    /// Parses command-line arguments (without the program name).
    pub fn from_args(args: &[String]) -> Result<Self, ParseError> {
        let mut it = args.iter();
        let usage = |m: String| ParseError::Usage(m);
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

    pub fn from_file(path: &Path) -> Result<Self, ParseError> {
        let text = std::fs::read_to_string(path).map_err(|source| ParseError::ReadFile {
            path: path.into(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ParseError::ParseFile {
            path: path.into(),
            source,
        })
    }
}

/// `PATH[,cid=N]`.
fn parse_vsock(spec: &str) -> Result<VsockConfig, ParseError> {
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
        ParseError::Usage(format!("--vsock '{spec}': give the socket path first"))
    })?;
    let mut cfg = VsockConfig {
        path: path.into(),
        cid: default_cid(),
    };
    for part in parts {
        match part.split_once('=') {
            Some(("cid", v)) => {
                cfg.cid = v.parse().map_err(|_| {
                    ParseError::Usage(format!("--vsock '{spec}': cid '{v}' is not a number"))
                })?
            }
            _ => {
                return Err(ParseError::Usage(format!(
                    "--vsock '{spec}': unknown part '{part}' (PATH[,cid=N])"
                )))
            }
        }
    }
    Ok(cfg)
}

/// `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]`.
fn parse_net(spec: &str) -> Result<NetConfig, ParseError> {
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
                    ParseError::Usage(format!("--net '{spec}': fd '{v}' is not a number"))
                })?)
            }
            Some(("mac", v)) => cfg.mac = Some(v.into()),
            _ => {
                return Err(ParseError::Usage(format!(
                    "--net '{spec}': unknown part '{part}' (tap=NAME | fd=N, mac=MAC)"
                )))
            }
        }
    }
    Ok(cfg)
}

/// `empty`, `empty,ro`, or `path=FILE[,ro][,serial=ID]`.
fn parse_drive(spec: &str) -> Result<DriveConfig, ParseError> {
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
                return Err(ParseError::Usage(format!(
                    "--drive '{spec}': unknown part '{part}' (empty | path=FILE, ro, serial=ID)"
                )))
            }
        }
    }
    if empty == d.path.is_some() {
        return Err(ParseError::Usage(format!(
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
        assert_eq!(n.mac.as_deref(), Some("02:00:00:00:00:09"));
        assert!(VmConfig::from_args(&args("--kernel /k --vsock /v,port=1")).is_err());
        assert!(VmConfig::from_args(&args("--kernel /k --net bridge=br0")).is_err());
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
    fn json_fills_defaults_and_rejects_unknown_fields() {
        let c: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","vcpus":2,"drives":[{"read_only":true},{"path":"/x"}],
                "vsock":{"path":"/v.sock"},"net":{"tap":"tap0"}}"#,
        )
        .expect("parse");
        assert_eq!(
            (c.vcpus, c.memory_mib, c.serial.as_str()),
            (2, 256, "stdout")
        );
        assert!(c.drives[0].read_only && c.drives[0].path.is_none());
        assert_eq!(c.vsock.as_ref().map(|v| v.cid), Some(3));
        assert_eq!(c.net.as_ref().and_then(|n| n.tap.as_deref()), Some("tap0"));
        let again: VmConfig =
            serde_json::from_str(&serde_json::to_string(&c).expect("serialise")).expect("parse");
        assert_eq!(again, c);
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","vcpu":2}"#)
            .expect_err("unknown field")
            .to_string();
        assert!(e.contains("vcpu"), "{e}");
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let path = std::env::temp_dir().join(format!("vmm-api-{}-bad.json", std::process::id()));
        std::fs::write(&path, r#"{"kernel":"/k","vcpu":2}"#).expect("write");
        let e = VmConfig::from_args(&["--config".into(), path.display().to_string()])
            .expect_err("unknown field")
            .to_string();
        let _ = std::fs::remove_file(&path);
        assert!(e.contains("-bad.json") && e.contains("vcpu"), "{e}");
        let e = VmConfig::from_file(&path).expect_err("gone").to_string();
        assert!(e.starts_with("reading config file"), "{e}");
    }
}
