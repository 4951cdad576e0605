//! Host configuration (`/etc/cocoon/config.toml`) and the size of a pod's VM.
//!
//! One small TOML file configures every shim on a node. A missing file means all
//! defaults; a key we don't know is an error naming the key (a typo must not silently
//! fall back to a default). All keys, with their defaults:
//!
//! ```toml
//! vmm = "/usr/local/bin/cocoon-vmm"                     # the VMM binary
//! kernel = "/usr/local/share/cocoon/vmlinux"            # guest kernel (ELF, PVH note)
//! initramfs = "/usr/local/share/cocoon/initramfs.cpio"  # guest initramfs (the agent)
//! kernel_cmdline = "quiet"       # appended to the guest kernel command line (see below)
//! default_vcpus = 1              # a pod's vCPUs when nothing else says
//! default_memory_mib = 256       # a pod's memory; also the guest's own share when limits are set
//! max_vcpus = 16                 # no pod gets more
//! max_memory_mib = 16384
//! drive_slots = 8                # block drive slots per VM: 2 per container (image + writable)
//! writable_disk_size = "10G"     # a container's writable disk without an ephemeral-storage limit
//! image_dir = "/var/lib/cocoon/images"  # shared read-only image disks (EROFS)
//! state_dir = "/run/cocoon"      # per-sandbox directories: sockets, logs, pid files, disks
//! log_level = "info"             # tracing filter for the shim: a level or `target=level,...`
//!
//! [liveness]                     # when a pod VM counts as unresponsive or dead (crate::liveness)
//! stop_timeout_secs = 10         # a stop-path agent call (kill, remove, shutdown) unanswered this long: VM dead
//! ping_interval_secs = 5         # the idle health check pings the agent this often
//! unresponsive_after_secs = 20   # no answer this long: marked unresponsive (logged, `cocoon ps`)
//! dead_after_secs = 120          # no answer this long: VM declared dead, pod's processes exit 255 (0: never)
//! ```
//!
//! `quiet` keeps the guest's boot log (`console.log`, `cocoon console`) to warnings and
//! errors: each console character costs a VM exit, which in the test lab made a pod start
//! 2-3 s slower. `kernel_cmdline = ""` (or `"loglevel=7"`) brings the full log back.
//!
//! The guest files live under `/usr/local/share/cocoon` because they are installed by
//! `make install`-style copies, not by a distribution package; the VMM sits beside other
//! locally installed binaries in `/usr/local/bin`. Sizes take `K`, `M`, `G`, `T` (binary)
//! suffixes or plain bytes (see [`crate::disk::parse_size`]).
//!
//! # The size of a pod's VM
//!
//! [`VmSize::for_pod`] decides vCPUs and memory at sandbox creation:
//! 1. the base is `default_vcpus` / `default_memory_mib`, unless the pod annotations
//!    `io.cocoon.vcpus` / `io.cocoon.memory-mib` (positive integers, within the caps)
//!    replace them;
//! 2. when the containers' limits are known and set, memory = base + the sum of the
//!    memory limits (the base stays as the guest's own overhead: kernel, agent, page
//!    cache), and vCPUs = max(base, ceil(sum of CPU limits)). Containers without a
//!    limit add nothing.
//! 3. a result over `max_vcpus` / `max_memory_mib` is an error, not a silent cut: the pod
//!    would otherwise get less than its limits promise.
//!
//! At sandbox creation the containers do not exist yet; containerd passes the sum of their
//! limits (which kubelet puts into the PodSandboxConfig) as the sandbox annotations
//! `io.kubernetes.cri.sandbox-cpu-quota`, `-cpu-period` and `-memory`:
//! [`ContainerLimits::from_sandbox_annotations`] reads them.
//!
//! Pod annotations reach the shim only when containerd is told to pass them. In
//! containerd's config (`/etc/containerd/config.toml`, version 2, containerd 1.6/1.7):
//!
//! ```toml
//! [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cocoon]
//!   runtime_type = "io.containerd.cocoon.v1"
//!   pod_annotations = ["io.cocoon.*"]
//! ```
//!
//! (containerd 2.x, config version 3: the same two keys under
//! `[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.cocoon]`.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tracing::debug;

use crate::disk::parse_size;
use crate::error::{Error, Result};

/// Where the configuration is read from by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cocoon/config.toml";
/// Environment variable that names another configuration file (tests, experiments).
pub const CONFIG_ENV: &str = "COCOON_CONFIG";

/// Pod annotation: the VM's vCPU count (base, before container limits are added).
pub const ANNOTATION_VCPUS: &str = "io.cocoon.vcpus";
/// Pod annotation: the VM's memory in MiB (base, before container limits are added).
pub const ANNOTATION_MEMORY_MIB: &str = "io.cocoon.memory-mib";

/// containerd's sandbox annotations carrying the sum of the pod's container limits.
pub const ANNOTATION_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const ANNOTATION_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const ANNOTATION_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The smallest VM `cocoon-vmm` accepts.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The most vCPUs `cocoon-vmm` accepts (APIC IDs in the MP table).
pub const VMM_MAX_VCPUS: u32 = 254;
/// The most drive slots a pod VM can have: `cocoon-vmm` takes 18 virtio devices, and the
/// vsock and the NIC are two of them.
pub const VMM_MAX_DRIVE_SLOTS: u32 = 16;

/// The node's Cocoon configuration. See the module documentation for the file format.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The `cocoon-vmm` binary.
    pub vmm: PathBuf,
    /// The guest kernel (ELF vmlinux with a PVH note).
    pub kernel: PathBuf,
    /// The guest initramfs (uncompressed cpio with the agent as /init).
    pub initramfs: PathBuf,
    /// Extra guest kernel command-line parameters. `quiet` by default: every console
    /// character is a VM exit, and a full boot log costs seconds under emulation.
    pub kernel_cmdline: String,
    pub default_vcpus: u32,
    pub default_memory_mib: u32,
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// Block drive slots per VM (empty at boot, filled as containers are created).
    pub drive_slots: u32,
    /// Size of a container's writable disk when it has no ephemeral-storage limit.
    #[serde(deserialize_with = "deserialize_size")]
    pub writable_disk_size: u64,
    /// Shared, reference-counted read-only image disks.
    pub image_dir: PathBuf,
    /// Per-sandbox state directories (`<state_dir>/<sandbox id>`).
    pub state_dir: PathBuf,
    /// The shim's tracing filter.
    pub log_level: String,
    /// When a pod VM that does not answer is marked unresponsive or declared dead.
    pub liveness: Liveness,
}

/// The liveness rule's thresholds (`[liveness]`), see [`crate::liveness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Liveness {
    /// How long a stop-path agent call (SIGKILL, container removal, storage removal) may
    /// go unanswered before the VM is declared dead.
    pub stop_timeout_secs: u64,
    /// How often the idle health check pings the agent.
    pub ping_interval_secs: u64,
    /// Silence after which the VM is marked unresponsive (logged with its signature,
    /// shown by `cocoon ps`); the mark goes when the agent answers again.
    pub unresponsive_after_secs: u64,
    /// Silence after which the VM is declared dead and killed; 0: never (the stop path
    /// still declares it dead when a stop-path call goes unanswered).
    pub dead_after_secs: u64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            stop_timeout_secs: 10,
            ping_interval_secs: 5,
            unresponsive_after_secs: 20,
            dead_after_secs: 120,
        }
    }
}

impl Liveness {
    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout_secs)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }

    pub fn unresponsive_after(&self) -> Duration {
        Duration::from_secs(self.unresponsive_after_secs)
    }

    /// `None`: the health check never kills.
    pub fn dead_after(&self) -> Option<Duration> {
        (self.dead_after_secs > 0).then(|| Duration::from_secs(self.dead_after_secs))
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.stop_timeout_secs == 0 || self.ping_interval_secs == 0 {
            return Err(
                "liveness: stop_timeout_secs and ping_interval_secs must be at least 1".into(),
            );
        }
        if self.unresponsive_after_secs < self.ping_interval_secs {
            return Err(format!(
                "liveness: unresponsive_after_secs {} must be at least ping_interval_secs ({})",
                self.unresponsive_after_secs, self.ping_interval_secs
            ));
        }
        if self.dead_after_secs != 0 && self.dead_after_secs <= self.unresponsive_after_secs {
            return Err(format!(
                "liveness: dead_after_secs {} must be 0 (never) or above unresponsive_after_secs ({})",
                self.dead_after_secs, self.unresponsive_after_secs
            ));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vmm: "/usr/local/bin/cocoon-vmm".into(),
            kernel: "/usr/local/share/cocoon/vmlinux".into(),
            initramfs: "/usr/local/share/cocoon/initramfs.cpio".into(),
            kernel_cmdline: "quiet".into(),
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: 16,
            max_memory_mib: 16384,
            drive_slots: 8,
            writable_disk_size: 10 << 30,
            image_dir: "/var/lib/cocoon/images".into(),
            state_dir: "/run/cocoon".into(),
            log_level: "info".into(),
            liveness: Liveness::default(),
        }
    }
}

/// Sizes in the file may be strings with suffixes ("10G") or plain byte counts.
fn deserialize_size<'de, D: Deserializer<'de>>(de: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    match Raw::deserialize(de)? {
        Raw::Bytes(n) => Ok(n),
        Raw::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

impl Config {
    /// Loads the file named by `$COCOON_CONFIG`, or else `/etc/cocoon/config.toml`.
    pub fn load_default() -> Result<Config> {
        match std::env::var_os(CONFIG_ENV) {
            Some(path) if !path.is_empty() => Config::load(Path::new(&path)),
            _ => Config::load(Path::new(DEFAULT_CONFIG_PATH)),
        }
    }

    /// Loads `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                debug!(config = %path.display(), "no config file, using defaults");
                return Ok(Config::default());
            }
            Err(e) => return Err(Error::io("reading config file", path)(e)),
        };
        Config::parse(&text, path)
    }

    /// Parses and validates the text of a config file (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.validate().map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.max_vcpus == 0 || self.max_vcpus > VMM_MAX_VCPUS {
            return Err(format!(
                "max_vcpus {} must be 1..={VMM_MAX_VCPUS}",
                self.max_vcpus
            ));
        }
        if self.default_vcpus == 0 || self.default_vcpus > self.max_vcpus {
            return Err(format!(
                "default_vcpus {} must be 1..=max_vcpus ({})",
                self.default_vcpus, self.max_vcpus
            ));
        }
        if self.max_memory_mib < MIN_MEMORY_MIB {
            return Err(format!(
                "max_memory_mib {} must be at least {MIN_MEMORY_MIB}",
                self.max_memory_mib
            ));
        }
        if self.default_memory_mib < MIN_MEMORY_MIB || self.default_memory_mib > self.max_memory_mib
        {
            return Err(format!(
                "default_memory_mib {} must be {MIN_MEMORY_MIB}..=max_memory_mib ({})",
                self.default_memory_mib, self.max_memory_mib
            ));
        }
        if self.drive_slots == 0 || self.drive_slots > VMM_MAX_DRIVE_SLOTS {
            return Err(format!(
                "drive_slots {} must be 1..={VMM_MAX_DRIVE_SLOTS}",
                self.drive_slots
            ));
        }
        if self.writable_disk_size < crate::disk::MIN_WRITABLE_DISK_BYTES {
            return Err(format!(
                "writable_disk_size {} is below the minimum of {}",
                crate::disk::format_size(self.writable_disk_size),
                crate::disk::format_size(crate::disk::MIN_WRITABLE_DISK_BYTES)
            ));
        }
        for (key, path) in [
            ("vmm", &self.vmm),
            ("kernel", &self.kernel),
            ("initramfs", &self.initramfs),
            ("image_dir", &self.image_dir),
            ("state_dir", &self.state_dir),
        ] {
            if !path.is_absolute() {
                return Err(format!("{key} {:?} must be an absolute path", path));
            }
        }
        if self.log_level.trim().is_empty() {
            return Err("log_level must not be empty".into());
        }
        self.liveness.validate()
    }

    /// The state directory of one sandbox.
    pub fn sandbox_dir(&self, sandbox_id: &str) -> PathBuf {
        self.state_dir.join(sandbox_id)
    }
}

/// Resource limits of one container, as far as they size the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerLimits {
    /// CPU limit in millicores (1000 = one CPU).
    pub cpu_millis: Option<u64>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
}

impl ContainerLimits {
    /// From an OCI spec's `linux.resources`: CFS quota/period (µs) and the memory limit.
    /// Unset, zero or negative values (runc's "unlimited" is -1) mean no limit.
    pub fn from_oci(quota: Option<i64>, period: Option<u64>, memory: Option<i64>) -> Self {
        let cpu_millis = match (quota, period) {
            (Some(q), Some(p)) if q > 0 && p > 0 => {
                // q > 0 was just checked, so the cast is lossless.
                Some((q as u64).saturating_mul(1000).div_ceil(p))
            }
            _ => None,
        };
        let memory_bytes = memory.filter(|m| *m > 0).map(|m| m as u64);
        ContainerLimits {
            cpu_millis,
            memory_bytes,
        }
    }

    /// The sum of the pod's container limits that containerd puts on the sandbox
    /// container (`io.kubernetes.cri.sandbox-cpu-quota`/`-cpu-period`/`-memory`).
    /// Missing annotations mean no limit; garbage is an error naming the annotation.
    pub fn from_sandbox_annotations(annotations: &HashMap<String, String>) -> Result<Self> {
        fn get<T: std::str::FromStr>(
            annotations: &HashMap<String, String>,
            key: &str,
        ) -> Result<Option<T>> {
            match annotations.get(key) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| Error::Annotation {
                    key: key.into(),
                    value: v.clone(),
                    reason: "not an integer".into(),
                }),
            }
        }
        let quota: Option<i64> = get(annotations, ANNOTATION_SANDBOX_CPU_QUOTA)?;
        let period: Option<u64> = get(annotations, ANNOTATION_SANDBOX_CPU_PERIOD)?;
        let memory: Option<i64> = get(annotations, ANNOTATION_SANDBOX_MEMORY)?;
        Ok(ContainerLimits::from_oci(quota, period, memory))
    }
}

/// How big a pod's VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl VmSize {
    /// The VM size for a pod: see the module documentation for the rules.
    pub fn for_pod(
        config: &Config,
        annotations: &HashMap<String, String>,
        limits: &[ContainerLimits],
    ) -> Result<VmSize> {
        let base_vcpus = annotation_u32(annotations, ANNOTATION_VCPUS, 1, config.max_vcpus)?
            .unwrap_or(config.default_vcpus);
        let base_memory = annotation_u32(
            annotations,
            ANNOTATION_MEMORY_MIB,
            MIN_MEMORY_MIB,
            config.max_memory_mib,
        )?
        .unwrap_or(config.default_memory_mib);

        let cpu_millis: Option<u64> = limits
            .iter()
            .filter_map(|l| l.cpu_millis)
            .fold(None, |acc, m| Some(acc.unwrap_or(0u64).saturating_add(m)));
        let memory_bytes: Option<u64> = limits
            .iter()
            .filter_map(|l| l.memory_bytes)
            .fold(None, |acc, m| Some(acc.unwrap_or(0u64).saturating_add(m)));

        let vcpus = match cpu_millis {
            Some(m) => u64::from(base_vcpus).max(m.div_ceil(1000)),
            None => u64::from(base_vcpus),
        };
        let memory = match memory_bytes {
            Some(b) => u64::from(base_memory).saturating_add(b.div_ceil(1 << 20)),
            None => u64::from(base_memory),
        };
        if vcpus > u64::from(config.max_vcpus) {
            return Err(Error::VmSize(format!(
                "the containers' CPU limits add up to {} millicores, {vcpus} vCPUs, over max_vcpus {}",
                cpu_millis.unwrap_or(0),
                config.max_vcpus
            )));
        }
        if memory > u64::from(config.max_memory_mib) {
            return Err(Error::VmSize(format!(
                "{base_memory} MiB for the guest plus the containers' memory limits ({} MiB) \
                 is {memory} MiB, over max_memory_mib {}",
                memory_bytes.unwrap_or(0).div_ceil(1 << 20),
                config.max_memory_mib
            )));
        }
        // Both were just checked against u32 caps.
        Ok(VmSize {
            vcpus: vcpus as u32,
            memory_mib: memory as u32,
        })
    }
}

/// Reads a positive integer annotation within `min..=max`.
fn annotation_u32(
    annotations: &HashMap<String, String>,
    key: &str,
    min: u32,
    max: u32,
) -> Result<Option<u32>> {
    let Some(value) = annotations.get(key) else {
        return Ok(None);
    };
    let err = |reason: String| Error::Annotation {
        key: key.into(),
        value: value.clone(),
        reason,
    };
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| err("not a positive integer".into()))?;
    if n < u64::from(min) || n > u64::from(max) {
        return Err(err(format!("must be {min}..={max}")));
    }
    // Checked against a u32 bound just above.
    Ok(Some(n as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/cocoon/config.toml"))
    }

    #[test]
    fn missing_file_gives_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Config::load(&dir.path().join("none.toml")).expect("load");
        assert_eq!(c, Config::default());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn file_overrides_and_sizes_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            r#"
vmm = "/opt/cocoon/cocoon-vmm"
default_vcpus = 2
default_memory_mib = 512
drive_slots = 12
writable_disk_size = "2G"
state_dir = "/tmp/cocoon-state"
"#,
        )
        .expect("write");
        let c = Config::load(&path).expect("load");
        assert_eq!(c.vmm, Path::new("/opt/cocoon/cocoon-vmm"));
        assert_eq!(c.default_vcpus, 2);
        assert_eq!(c.default_memory_mib, 512);
        assert_eq!(c.drive_slots, 12);
        assert_eq!(c.writable_disk_size, 2 << 30);
        assert_eq!(c.kernel, Config::default().kernel);
        assert_eq!(
            c.sandbox_dir("abc"),
            Path::new("/tmp/cocoon-state/abc").to_path_buf()
        );
        let c = parse("writable_disk_size = 1073741824").expect("bytes");
        assert_eq!(c.writable_disk_size, 1 << 30);
    }

    #[test]
    fn liveness_table_parses_and_is_checked() {
        let c = parse("[liveness]\nstop_timeout_secs = 3\ndead_after_secs = 0\n").expect("parse");
        assert_eq!(c.liveness.stop_timeout(), Duration::from_secs(3));
        assert_eq!(c.liveness.dead_after(), None);
        assert_eq!(
            c.liveness.unresponsive_after(),
            Liveness::default().unresponsive_after()
        );
        for (text, want) in [
            ("[liveness]\nstop_timeout_secs = 0", "stop_timeout_secs"),
            (
                "[liveness]\nunresponsive_after_secs = 2",
                "unresponsive_after_secs 2",
            ),
            ("[liveness]\ndead_after_secs = 20", "dead_after_secs 20"),
            ("[liveness]\ndead_after = 20", "dead_after"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("default_vcpu = 2").expect_err("typo").to_string();
        assert!(e.contains("default_vcpu"), "{e}");
        assert!(e.contains("/etc/cocoon/config.toml"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, want) in [
            ("default_vcpus = 0", "default_vcpus"),
            ("default_vcpus = 20", "default_vcpus"),
            ("max_vcpus = 300", "max_vcpus"),
            ("default_memory_mib = 32", "default_memory_mib"),
            ("drive_slots = 17", "drive_slots"),
            ("drive_slots = 0", "drive_slots"),
            ("writable_disk_size = \"1M\"", "writable_disk_size"),
            ("writable_disk_size = \"ten\"", "ten"),
            ("kernel = \"vmlinux\"", "kernel"),
            ("log_level = \"\"", "log_level"),
            ("default_vcpus = \"two\"", "default_vcpus"),
            ("this is not toml", "config.toml"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn defaults_without_annotations_or_limits() {
        let c = Config::default();
        let s = VmSize::for_pod(&c, &HashMap::new(), &[]).expect("size");
        assert_eq!(
            s,
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        // Containers without limits add nothing.
        let s =
            VmSize::for_pod(&c, &HashMap::new(), &[ContainerLimits::default(); 3]).expect("size");
        assert_eq!(s.memory_mib, 256);
    }

    #[test]
    fn annotations_replace_the_base() {
        let c = Config::default();
        let a = ann(&[(ANNOTATION_VCPUS, "4"), (ANNOTATION_MEMORY_MIB, " 1024 ")]);
        let s = VmSize::for_pod(&c, &a, &[]).expect("size");
        assert_eq!(
            s,
            VmSize {
                vcpus: 4,
                memory_mib: 1024
            }
        );
    }

    #[test]
    fn garbage_annotations_are_named() {
        let c = Config::default();
        for (key, value, why) in [
            (ANNOTATION_VCPUS, "two", "not a positive integer"),
            (ANNOTATION_VCPUS, "-1", "not a positive integer"),
            (ANNOTATION_VCPUS, "1.5", "not a positive integer"),
            (ANNOTATION_VCPUS, "0", "1..=16"),
            (ANNOTATION_VCPUS, "17", "1..=16"),
            (ANNOTATION_MEMORY_MIB, "32", "64..=16384"),
            (
                ANNOTATION_MEMORY_MIB,
                "99999999999999999999",
                "not a positive",
            ),
            (ANNOTATION_MEMORY_MIB, "1G", "not a positive integer"),
        ] {
            let e = VmSize::for_pod(&c, &ann(&[(key, value)]), &[])
                .expect_err(value)
                .to_string();
            assert!(
                e.contains(key) && e.contains(value) && e.contains(why),
                "{e}"
            );
        }
    }

    #[test]
    fn limits_add_to_the_base() {
        let c = Config::default();
        let limits = [
            ContainerLimits {
                cpu_millis: Some(500),
                memory_bytes: Some(128 << 20),
            },
            ContainerLimits {
                cpu_millis: Some(1200),
                memory_bytes: Some((64 << 20) + 1),
            },
            ContainerLimits::default(),
        ];
        let s = VmSize::for_pod(&c, &HashMap::new(), &limits).expect("size");
        // 256 base + 128 + 65 (64 MiB + 1 byte rounds up).
        assert_eq!(
            s,
            VmSize {
                vcpus: 2,
                memory_mib: 449
            }
        );
        // A larger base vCPU count wins over a small CPU sum.
        let s = VmSize::for_pod(&c, &ann(&[(ANNOTATION_VCPUS, "4")]), &limits).expect("size");
        assert_eq!(s.vcpus, 4);
    }

    #[test]
    fn limits_over_the_caps_are_errors() {
        let c = Config::default();
        let big = [ContainerLimits {
            cpu_millis: Some(16_001),
            memory_bytes: None,
        }];
        let e = VmSize::for_pod(&c, &HashMap::new(), &big).expect_err("cpu");
        assert!(e.to_string().contains("max_vcpus 16"), "{e}");
        let big = [ContainerLimits {
            cpu_millis: None,
            memory_bytes: Some(u64::MAX),
        }];
        let e = VmSize::for_pod(&c, &HashMap::new(), &big).expect_err("memory");
        assert!(e.to_string().contains("max_memory_mib 16384"), "{e}");
    }

    #[test]
    fn oci_limits_convert() {
        let l = ContainerLimits::from_oci(Some(150_000), Some(100_000), Some(1 << 30));
        assert_eq!(l.cpu_millis, Some(1500));
        assert_eq!(l.memory_bytes, Some(1 << 30));
        let l = ContainerLimits::from_oci(Some(-1), Some(100_000), Some(-1));
        assert_eq!(l, ContainerLimits::default());
        let l = ContainerLimits::from_oci(Some(1), Some(100_000), Some(0));
        assert_eq!(l.cpu_millis, Some(1));
        assert_eq!(
            ContainerLimits::from_oci(Some(5), None, None).cpu_millis,
            None
        );
    }

    #[test]
    fn sandbox_annotations_carry_the_sum() {
        let a = ann(&[
            (ANNOTATION_SANDBOX_CPU_QUOTA, "250000"),
            (ANNOTATION_SANDBOX_CPU_PERIOD, "100000"),
            (ANNOTATION_SANDBOX_MEMORY, "536870912"),
        ]);
        let l = ContainerLimits::from_sandbox_annotations(&a).expect("parse");
        assert_eq!(l.cpu_millis, Some(2500));
        assert_eq!(l.memory_bytes, Some(512 << 20));
        let s = VmSize::for_pod(&Config::default(), &a, &[l]).expect("size");
        assert_eq!(
            s,
            VmSize {
                vcpus: 3,
                memory_mib: 768
            }
        );
        // kubelet sends 0 for "no limit".
        let a = ann(&[(ANNOTATION_SANDBOX_MEMORY, "0")]);
        let l = ContainerLimits::from_sandbox_annotations(&a).expect("parse");
        assert_eq!(l, ContainerLimits::default());
        let a = ann(&[(ANNOTATION_SANDBOX_MEMORY, "lots")]);
        let e = ContainerLimits::from_sandbox_annotations(&a).expect_err("garbage");
        assert!(e.to_string().contains(ANNOTATION_SANDBOX_MEMORY), "{e}");
    }
}
