//! Container images and OCI runtime specs for agent tests.
//!
//! - [`busybox_rootfs`]: a root filesystem directory made of Debian's static busybox
//!   (`busybox-static`), its applets as symlinks, and `/etc/passwd`, `/etc/group`;
//! - [`erofs_image`]: that directory as a read-only EROFS image disk (`mkfs.erofs`, from
//!   `erofs-utils`), as the runtime will ship image layers to the guest;
//! - [`writable_disk`]: a sparse ext4 disk for a container's writable layer;
//! - [`SpecBuilder`]: an OCI runtime spec shaped like the one containerd's CRI plugin
//!   writes (default capabilities, mounts, masked and read-only paths, rlimits), with the
//!   pod's namespaces joined by path.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's `busybox-static`: one static binary with every applet.
pub const BUSYBOX: &str = "/bin/busybox";

/// The `PATH` containerd gives containers whose image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's default capability set (`oci.defaultUnixCaps`).
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// containerd's default masked paths.
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// containerd's default read-only paths.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{BUSYBOX} is missing: install Debian's busybox-static (scripts/install-deps.sh)")]
    NoBusybox,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let context = context.into();
    move |source| OciError::Io { context, source }
}

fn run(tool: &str, cmd: &mut Command, hint: &str) -> Result<(), OciError> {
    let out = cmd
        .output()
        .map_err(io(format!("run {tool} (install {hint})")))?;
    if !out.status.success() {
        return Err(OciError::Tool {
            tool: tool.to_string(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Fills `dir` with a busybox root filesystem: `/bin/busybox` and its applets in `/bin`,
/// the usual mount points, `/etc/passwd` and `/etc/group` with root and nobody.
pub fn busybox_rootfs(dir: &Path) -> Result<(), OciError> {
    use std::os::unix::fs::PermissionsExt;
    if !Path::new(BUSYBOX).is_file() {
        return Err(OciError::NoBusybox);
    }
    for d in [
        "bin", "dev", "etc", "proc", "sys", "root", "run", "tmp", "var/tmp", "mnt",
    ] {
        let p = dir.join(d);
        std::fs::create_dir_all(&p).map_err(io(format!("create {}", p.display())))?;
    }
    for d in ["tmp", "var/tmp"] {
        let p = dir.join(d);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o1777))
            .map_err(io(format!("chmod {}", p.display())))?;
    }
    let bin = dir.join("bin/busybox");
    std::fs::copy(BUSYBOX, &bin).map_err(io(format!("copy {BUSYBOX} to {}", bin.display())))?;
    let list = Command::new(&bin)
        .arg("--list")
        .output()
        .map_err(io("busybox --list"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        // Applet names are plain words; anything else would be a path trick.
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = dir.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)
                .map_err(io(format!("symlink {}", link.display())))?;
        }
    }
    let etc = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ];
    for (name, text) in etc {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io(format!("write {}", p.display())))?;
    }
    Ok(())
}

/// Makes a read-only EROFS image of `dir` at `image` (uncompressed, all files root's).
pub fn erofs_image(dir: &Path, image: &Path) -> Result<(), OciError> {
    run(
        "mkfs.erofs",
        Command::new("mkfs.erofs")
            .args(["--quiet", "--all-root", "-T0"])
            .arg(image)
            .arg(dir),
        "erofs-utils",
    )
}

/// A sparse ext4 disk of `mib` MiB whose root directory is root's, for a container's
/// writable layer.
pub fn writable_disk(path: &Path, mib: u64) -> Result<(), OciError> {
    let f = std::fs::File::create(path).map_err(io(format!("create {}", path.display())))?;
    f.set_len(mib << 20)
        .map_err(io(format!("size {}", path.display())))?;
    drop(f);
    run(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0"])
            .arg(path),
        "e2fsprogs",
    )
}

/// A busybox image set up in `dir`: `dir/rootfs` and `dir/image.erofs`.
pub fn busybox_image(dir: &Path) -> Result<(PathBuf, PathBuf), OciError> {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs)?;
    let image = dir.join("image.erofs");
    erofs_image(&rootfs, &image)?;
    Ok((rootfs, image))
}

/// Guest paths of the pod's shared namespaces (from the agent's SetupSandbox answer).
/// Empty strings mean "a new namespace".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNamespaces {
    pub net: String,
    pub ipc: String,
    pub uts: String,
    pub pid: String,
}

impl From<&cocoon_agent_protocol::api::SetupSandboxResponse> for PodNamespaces {
    fn from(r: &cocoon_agent_protocol::api::SetupSandboxResponse) -> Self {
        PodNamespaces {
            net: r.net_ns.clone(),
            ipc: r.ipc_ns.clone(),
            uts: r.uts_ns.clone(),
            pid: r.pid_ns.clone(),
        }
    }
}

/// An OCI runtime spec like containerd's CRI plugin writes for a container.
#[derive(Debug, Clone)]
pub struct SpecBuilder {
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    terminal: bool,
    root_path: String,
    root_readonly: bool,
    pod: PodNamespaces,
    memory_limit: Option<u64>,
    pids_limit: Option<i64>,
    cgroups_path: Option<String>,
    nofile: u64,
    cgroup_ns: bool,
    host_network: bool,
    host_pid: bool,
    extra_caps: Vec<String>,
}

impl SpecBuilder {
    /// A spec running `args` as root in `/`, with a root path of `rootfs` (replaced by the
    /// agent when it builds an overlay rootfs).
    pub fn new<S: AsRef<str>>(args: &[S]) -> Self {
        SpecBuilder {
            args: args.iter().map(|a| a.as_ref().to_string()).collect(),
            env: vec![DEFAULT_PATH.to_string()],
            cwd: "/".into(),
            terminal: false,
            root_path: "rootfs".into(),
            root_readonly: false,
            pod: PodNamespaces::default(),
            memory_limit: None,
            pids_limit: None,
            cgroups_path: None,
            nofile: 1024,
            cgroup_ns: false,
            host_network: false,
            host_pid: false,
            extra_caps: Vec::new(),
        }
    }

    pub fn env(mut self, var: &str) -> Self {
        self.env.push(var.to_string());
        self
    }

    pub fn cwd(mut self, cwd: &str) -> Self {
        self.cwd = cwd.to_string();
        self
    }

    pub fn terminal(mut self, terminal: bool) -> Self {
        self.terminal = terminal;
        self
    }

    pub fn root(mut self, path: &Path, readonly: bool) -> Self {
        self.root_path = path.display().to_string();
        self.root_readonly = readonly;
        self
    }

    /// Joins the pod's namespaces (net, ipc, uts; pid when shared).
    pub fn pod(mut self, pod: PodNamespaces) -> Self {
        self.pod = pod;
        self
    }

    /// `linux.resources.memory.limit` in bytes.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// `linux.resources.pids.limit`.
    pub fn pids_limit(mut self, limit: i64) -> Self {
        self.pids_limit = Some(limit);
        self
    }

    pub fn cgroups_path(mut self, path: &str) -> Self {
        self.cgroups_path = Some(path.to_string());
        self
    }

    /// A cgroup namespace of its own (containerd's CRI does this on cgroup v2 hosts):
    /// inside, `/sys/fs/cgroup` is the container's own cgroup.
    pub fn cgroup_namespace(mut self, on: bool) -> Self {
        self.cgroup_ns = on;
        self
    }

    /// No network namespace entry: the container shares the network namespace of the
    /// runtime (in the guest: the agent's), as a `hostNetwork` pod would.
    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }

    /// No PID namespace entry: the container sees the runtime's processes (`hostPID`).
    pub fn host_pid(mut self, on: bool) -> Self {
        self.host_pid = on;
        self
    }

    /// A capability beyond containerd's defaults (`CAP_...`), in every set.
    pub fn capability(mut self, cap: &str) -> Self {
        self.extra_caps.push(cap.to_string());
        self
    }

    /// The OCI `process` object (also what ExecProcess takes).
    pub fn process(&self) -> Value {
        let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
        caps.extend(self.extra_caps.iter().cloned());
        json!({
            "terminal": self.terminal,
            "user": {"uid": 0, "gid": 0, "additionalGids": [0]},
            "args": self.args,
            "env": self.env,
            "cwd": self.cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": self.nofile, "soft": self.nofile}],
            "noNewPrivileges": true,
            "oomScoreAdj": 0,
        })
    }

    pub fn process_json(&self) -> Vec<u8> {
        self.process().to_string().into_bytes()
    }

    fn namespaces(&self) -> Value {
        let ns = |kind: &str, path: &str| {
            if path.is_empty() {
                json!({"type": kind})
            } else {
                json!({"type": kind, "path": path})
            }
        };
        let mut all = Vec::new();
        if !self.host_pid {
            all.push(ns("pid", &self.pod.pid));
        }
        all.extend([
            ns("ipc", &self.pod.ipc),
            ns("uts", &self.pod.uts),
            ns("mount", ""),
        ]);
        if !self.host_network {
            all.push(ns("network", &self.pod.net));
        }
        if self.cgroup_ns {
            all.push(ns("cgroup", ""));
        }
        Value::Array(all)
    }

    pub fn build(&self) -> Value {
        let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
        if let Some(limit) = self.memory_limit {
            resources["memory"] = json!({"limit": limit});
        }
        if let Some(limit) = self.pids_limit {
            resources["pids"] = json!({"limit": limit});
        }
        let mut linux = json!({
            "resources": resources,
            "namespaces": self.namespaces(),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        });
        if let Some(p) = &self.cgroups_path {
            linux["cgroupsPath"] = json!(p);
        }
        json!({
            "ociVersion": "1.1.0",
            "process": self.process(),
            "root": {"path": self.root_path, "readonly": self.root_readonly},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc",
                 "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                 "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                 "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                 "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            ],
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
            },
            "linux": linux,
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        self.build().to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_has_containerd_shape() {
        let pod = PodNamespaces {
            net: "/run/cocoon/sandbox/ns/net".into(),
            ipc: "/run/cocoon/sandbox/ns/ipc".into(),
            uts: "/run/cocoon/sandbox/ns/uts".into(),
            pid: String::new(),
        };
        let spec = SpecBuilder::new(&["sh", "-c", "echo hi"])
            .terminal(true)
            .pod(pod)
            .memory_limit(16 << 20)
            .build();
        assert_eq!(spec["process"]["args"][2], "echo hi");
        assert_eq!(spec["process"]["terminal"], true);
        assert_eq!(spec["process"]["capabilities"]["bounding"][0], "CAP_CHOWN");
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 16 << 20);
        let ns = spec["linux"]["namespaces"]
            .as_array()
            .expect("namespaces array");
        let find = |t: &str| ns.iter().find(|n| n["type"] == t).cloned();
        assert_eq!(
            find("network").map(|n| n["path"].clone()),
            Some(json!("/run/cocoon/sandbox/ns/net"))
        );
        assert_eq!(find("pid").map(|n| n.get("path").is_none()), Some(true));
        assert_eq!(spec["mounts"].as_array().map(Vec::len), Some(7));
        let round: Value =
            serde_json::from_slice(&SpecBuilder::new(&["true"]).to_json()).expect("valid JSON");
        assert!(round["linux"]["resources"].get("memory").is_none());
        assert!(round["linux"]["resources"].get("pids").is_none());
        let types = |spec: &Value| -> Vec<String> {
            spec["linux"]["namespaces"]
                .as_array()
                .expect("namespaces array")
                .iter()
                .map(|n| n["type"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        assert_eq!(
            types(&round),
            ["pid", "ipc", "uts", "mount", "network"].map(String::from)
        );
        let host = SpecBuilder::new(&["true"])
            .host_network(true)
            .host_pid(true)
            .cgroup_namespace(true)
            .pids_limit(32)
            .capability("CAP_SYS_PTRACE")
            .build();
        assert_eq!(
            types(&host),
            ["ipc", "uts", "mount", "cgroup"].map(String::from)
        );
        assert_eq!(host["linux"]["resources"]["pids"]["limit"], 32);
        let caps = host["process"]["capabilities"]["effective"]
            .as_array()
            .expect("caps");
        assert_eq!(caps.len(), DEFAULT_CAPS.len() + 1);
        assert_eq!(caps.last(), Some(&json!("CAP_SYS_PTRACE")));
    }

    #[test]
    fn busybox_rootfs_has_applets_and_users() {
        if !Path::new(BUSYBOX).is_file() {
            panic!("{}", OciError::NoBusybox);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        busybox_rootfs(dir.path()).expect("rootfs");
        let sh = std::fs::read_link(dir.path().join("bin/sh")).expect("bin/sh symlink");
        assert_eq!(sh, Path::new("busybox"));
        let passwd = std::fs::read_to_string(dir.path().join("etc/passwd")).expect("passwd");
        assert!(passwd.starts_with("root:x:0:0:"));
    }
}

/// A pod VM for agent tests and benchmarks: the real guest (`build/vmlinux`,
/// `build/initramfs.cpio` with the agent as `/init`) under `cocoon-vmm`, with empty drive
/// slots, vsock, the serial console in a file, and a connected, hello-checked agent client.
/// Needs a KVM that boots stock Linux (see `vmtest`).
pub mod pod_vm {
    use crate::{paths, vmm};
    use cocoon_agent_protocol::ReadyLine;
    use cocoon_runtime::agent::{
        AddStorageRequest, AgentClient, Endpoint, HelloResponse, ReadyListener,
    };
    use std::path::{Path, PathBuf};
    use std::time::Duration;
    use vmm_api::control::Request;

    /// Boot to ready, generous for nested KVM under TCG.
    pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
    /// Per-call agent timeout, generous for the same reason.
    pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

    #[derive(Debug, Clone)]
    pub struct PodVmConfig {
        /// Read-write empty slots after slot 0 (read-only, for the image).
        pub writable_slots: usize,
        pub memory_mib: u32,
        pub vcpus: u32,
    }

    /// A virtio-net device for the pod VM: a TAP (opened or created by `cocoon-vmm`),
    /// optionally in a network namespace the VMM is started in (`ip netns exec`).
    #[derive(Debug, Clone)]
    pub struct PodVmNet {
        pub netns: Option<String>,
        pub tap: String,
        /// `aa:bb:cc:dd:ee:ff`, the guest NIC's address.
        pub mac: String,
    }

    impl Default for PodVmConfig {
        fn default() -> Self {
            PodVmConfig {
                writable_slots: 4,
                memory_mib: 512,
                vcpus: 2,
            }
        }
    }

    pub struct PodVm {
        vm: Option<vmm::RunningVmm>,
        dir: tempfile::TempDir,
        pub vsock: PathBuf,
        pub client: AgentClient,
        pub ready: ReadyLine,
        pub hello: HelloResponse,
        pub slots: usize,
    }

    fn need_file(p: &Path, hint: &str) -> Result<(), String> {
        if p.is_file() {
            Ok(())
        } else {
            Err(format!("{} missing: {hint}", p.display()))
        }
    }

    impl PodVm {
        /// Boots the VM, waits for the agent's ready report and says hello.
        pub fn boot(cfg: &PodVmConfig) -> Result<PodVm, String> {
            Self::boot_with_net(cfg, None)
        }

        /// [`PodVm::boot`] with a network device (`--net tap=..,mac=..`).
        pub fn boot_with_net(cfg: &PodVmConfig, net: Option<&PodVmNet>) -> Result<PodVm, String> {
            need_file(&paths::guest_vmlinux(), "run `make guest`")?;
            need_file(&paths::guest_initramfs(), "run `make guest`")?;
            need_file(&vmm::vmm_binary(), "run `cargo build -p cocoon-vmm`")?;
            let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
            let vsock = dir.path().join("vsock.sock");
            // Before the VMM starts: the agent's report fails at once without a listener.
            let ready = ReadyListener::for_vsock(&vsock).map_err(|e| e.to_string())?;
            let mut args: Vec<String> = vec![
                "--kernel".into(),
                paths::guest_vmlinux().display().to_string(),
                "--initramfs".into(),
                paths::guest_initramfs().display().to_string(),
                "--cmdline".into(),
                "quiet".into(),
                "--vcpus".into(),
                cfg.vcpus.to_string(),
                "--memory-mib".into(),
                cfg.memory_mib.to_string(),
                "--serial".into(),
                dir.path().join("serial.log").display().to_string(),
                "--log".into(),
                dir.path().join("vmm.log").display().to_string(),
                "--vsock".into(),
                vsock.display().to_string(),
                "--control-socket".into(),
                dir.path().join("control.sock").display().to_string(),
                "--drive".into(),
                "empty,ro".into(),
            ];
            for _ in 0..cfg.writable_slots {
                args.extend(["--drive".into(), "empty".into()]);
            }
            if let Some(n) = net {
                args.extend(["--net".into(), format!("tap={},mac={}", n.tap, n.mac)]);
            }
            let vm = match net.and_then(|n| n.netns.as_deref()) {
                Some(ns) => vmm::start_in(&["ip", "netns", "exec", ns], &args)
                    .map_err(|e| format!("start cocoon-vmm in network namespace {ns}: {e}"))?,
                None => vmm::start(&args).map_err(|e| format!("start cocoon-vmm: {e}"))?,
            };
            let mut vm = vm;
            let ready_line = ready.wait_while(BOOT_TIMEOUT, || match vm.exited() {
                None => Ok(()),
                Some(status) => Err(format!("cocoon-vmm ended ({status})")),
            });
            let ready_line = match ready_line {
                Ok(r) => r,
                Err(e) => {
                    // End the VMM first so the console file is complete; its stderr
                    // says why a VMM refused to start.
                    let stderr = vm
                        .finish(std::time::Duration::from_secs(1))
                        .map(|o| o.stderr)
                        .unwrap_or_default();
                    return Err(format!(
                        "{e}\n{}\n--- vmm stderr ---\n{}",
                        transcript_of(dir.path()),
                        stderr.trim()
                    ));
                }
            };
            let client = AgentClient::connect(Endpoint::Vsock(vsock.clone()), CALL_TIMEOUT)
                .and_then(|c| c.hello().map(|h| (c, h)));
            let (client, hello) = match client {
                Ok(x) => x,
                Err(e) => return Err(format!("agent Hello: {e}\n{}", transcript_of(dir.path()))),
            };
            Ok(PodVm {
                vm: Some(vm),
                dir,
                vsock,
                client,
                ready: ready_line,
                hello,
                slots: 1 + cfg.writable_slots,
            })
        }

        /// A scratch directory that lives as long as the VM.
        pub fn dir(&self) -> &Path {
            self.dir.path()
        }

        /// Puts `path` into drive slot `slot` over the VMM's control socket.
        pub fn swap(
            &self,
            slot: usize,
            path: &Path,
            read_only: bool,
            serial: &str,
        ) -> Result<(), String> {
            let vm = self.vm.as_ref().ok_or("the VM is gone")?;
            vm.control(&Request::Swap {
                slot,
                path: path.into(),
                read_only,
                serial: Some(serial.into()),
            })
            .map_err(|e| format!("swap {} into slot {slot}: {e}", path.display()))?;
            Ok(())
        }

        /// Empties drive slot `slot` over the VMM's control socket.
        pub fn eject(&self, slot: usize) -> Result<(), String> {
            let vm = self.vm.as_ref().ok_or("the VM is gone")?;
            vm.control(&Request::Eject { slot })
                .map_err(|e| format!("eject slot {slot}: {e}"))?;
            Ok(())
        }

        /// Swaps `path` into `slot` and has the agent mount it at `mount_point`; returns
        /// the guest device.
        pub fn add_disk(
            &self,
            slot: usize,
            path: &Path,
            fstype: &str,
            read_only: bool,
            serial: &str,
            mount_point: &str,
        ) -> Result<String, String> {
            self.swap(slot, path, read_only, serial)?;
            let req = AddStorageRequest {
                serial: serial.into(),
                fstype: fstype.into(),
                mount_point: mount_point.into(),
                read_only,
                timeout_ms: 30_000,
                ..Default::default()
            };
            self.client
                .add_storage(&req)
                .map_err(|e| format!("AddStorage {serial} ({fstype}) at {mount_point}: {e}"))
        }

        /// The last lines of the guest console and of the VMM log, for failure messages.
        pub fn transcript(&self) -> String {
            let mut t = transcript_of(self.dir.path());
            if let Some(vm) = &self.vm {
                let stats = vmm::control_request_within(
                    &self.dir.path().join("control.sock"),
                    &Request::Stats {},
                    Duration::from_secs(5),
                )
                .map(|reply| format!("{:?}", reply.stats))
                .unwrap_or_else(|e| format!("no answer: {e}"));
                t.push_str(&format!(
                    "\n--- vmm threads (pid {}) ---\n{}\n--- vmm stats ---\n{stats}",
                    vm.pid(),
                    cocoon_runtime::liveness::signature(vm.pid(), Duration::from_secs(1))
                ));
            }
            t
        }

        /// How the VMM ended, once it has (`None` while the VM runs).
        pub fn ended(&mut self) -> Option<String> {
            self.vm.as_mut()?.exited().map(|status| status.to_string())
        }

        /// Asks the agent to power the VM off and waits for the VMM to end.
        pub fn shutdown(mut self) -> Result<vmm::VmmOutcome, String> {
            let vm = self.vm.take().ok_or("the VM is gone")?;
            self.client.shutdown().map_err(|e| e.to_string())?;
            vm.finish(Duration::from_secs(60))
                .map_err(|e| format!("waiting for cocoon-vmm: {e}"))
        }
    }

    fn tail(path: &Path, n: usize) -> String {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn transcript_of(dir: &Path) -> String {
        format!(
            "--- guest console (last lines) ---\n{}\n--- vmm log (last lines) ---\n{}",
            tail(&dir.join("serial.log"), 40),
            tail(&dir.join("vmm.log"), 10)
        )
    }
}
