//! A private containerd for CRI tests: Debian's containerd with its own config, root,
//! state and socket under one temporary directory, a CNI bridge network of its own
//! (Debian's containernetworking-plugins), runc and cocoon runtime entries, and the local
//! busybox image imported with `ctr`. It never touches the host's containerd.
//!
//! Cleanup ([`Drop`]) leaves nothing: containerd and every process started under it
//! (shims, containers, VMMs) are killed, everything mounted under its directory is
//! unmounted, the network namespaces it created, its bridge and cgroups are removed, and
//! the directory is deleted.

use crate::residue::{self, Scope};
use crate::{image, paths, vmm};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The cocoon runtime handler (the `RuntimeClass` handler name).
pub const COCOON: &str = "cocoon";
/// The runc runtime handler.
pub const RUNC: &str = "runc";
/// The shim containerd starts for [`COCOON`].
pub const COCOON_SHIM: &str = "containerd-shim-cocoon-v1";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {output}")]
    Command {
        what: String,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("containerd did not come up within {timeout:?}; last log lines:\n{log}")]
    NotReady { timeout: Duration, log: String },
    #[error("containerd exited early ({status}); last log lines:\n{log}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("a private containerd needs root (mounts, network namespaces, cgroups)")]
    NotRoot,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerdError {
    let context = context.into();
    move |source| ContainerdError::Io { context, source }
}

/// Runs a command to completion; a non-zero exit is an error naming it, with its output.
fn run(cmd: &mut Command) -> Result<String, ContainerdError> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(io(format!("run {what}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(ContainerdError::Command {
            what,
            status: out.status,
            output: text.trim().to_string(),
        });
    }
    Ok(text)
}

/// Where containerd and its tools are, and what it adds to its `PATH`.
#[derive(Debug, Clone)]
pub struct Options {
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub cni_bin_dir: PathBuf,
    /// Prepended to containerd's `PATH`: where it finds `containerd-shim-cocoon-v1`.
    pub shim_dirs: Vec<PathBuf>,
    /// Parent of the temporary directory: must allow overlayfs upper layers (not an
    /// overlayfs itself, as the lab's /tmp is), hence /run by default.
    pub base_parent: PathBuf,
    pub ready_timeout: Duration,
    /// TOML appended to the cocoon runtime's config (e.g. a `[liveness]` table).
    pub cocoon_config_extra: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            containerd: env_path("COCOON_CONTAINERD", "/usr/bin/containerd"),
            ctr: env_path("COCOON_CTR", "/usr/bin/ctr"),
            cni_bin_dir: env_path("COCOON_CNI_BIN_DIR", "/usr/lib/cni"),
            shim_dirs: default_shim_dirs(),
            base_parent: PathBuf::from("/run"),
            ready_timeout: Duration::from_secs(120),
            cocoon_config_extra: String::new(),
        }
    }
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// `$COCOON_SHIM_DIR`, else the cargo target directory of the running test
/// (`target/<profile>`, where `cargo build -p containerd-shim-cocoon-v1` puts the shim).
pub fn default_shim_dirs() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("COCOON_SHIM_DIR") {
        return vec![PathBuf::from(d)];
    }
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test binary>
        if let Some(profile) = exe.parent().and_then(Path::parent) {
            dirs.push(profile.to_path_buf());
        }
    }
    dirs
}

/// The shim binary containerd will find for [`COCOON`], if any.
pub fn find_cocoon_shim(opts: &Options) -> Option<PathBuf> {
    opts.shim_dirs
        .iter()
        .map(|d| d.join(COCOON_SHIM))
        .find(|p| p.is_file())
}

/// What a cocoon pod needs before containerd starts: the shim, containerd, ctr and the
/// given files. The error names the first thing missing and how to get it.
pub fn preflight(opts: &Options, files: &[(&str, PathBuf)]) -> Result<(), String> {
    if find_cocoon_shim(opts).is_none() {
        return Err(format!(
            "{COCOON_SHIM} not found in {:?}: build it with `cargo build -p \
             containerd-shim-cocoon-v1` (or set COCOON_SHIM_DIR)",
            opts.shim_dirs
        ));
    }
    let tools = [
        ("containerd", opts.containerd.clone()),
        ("ctr", opts.ctr.clone()),
    ];
    for (what, p) in files.iter().cloned().chain(tools) {
        if !p.is_file() {
            return Err(format!(
                "the {what} {} is missing: run `make deps guest`",
                p.display()
            ));
        }
    }
    Ok(())
}

/// A running private containerd.
pub struct Containerd {
    pub opts: Options,
    /// Everything lives under here.
    pub base: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// host-local IPAM's leases.
    pub cni_ipam_dir: PathBuf,
    /// Pod log directories (kubelet's /var/log/pods).
    pub pod_logs: PathBuf,
    /// Host directories for volumes the tests mount.
    pub volumes: PathBuf,
    /// The CNI bridge and its subnet (`a.b.c.0/24`).
    pub bridge: String,
    pub subnet_prefix: String,
    /// Pods' cgroup parent (cgroupfs path, relative to each hierarchy's root).
    pub cgroup_parent: String,
    pub stream_port: u16,
    /// The cocoon runtime's config (`$COCOON_CONFIG` for the shims), unless the caller's
    /// environment already names one.
    pub cocoon_config: PathBuf,
    /// Its image-disk cache and per-sandbox state, private to this containerd.
    pub cocoon_images: PathBuf,
    pub cocoon_state: PathBuf,
    child: Option<Child>,
    netns_before: BTreeSet<String>,
    /// Host directories containerd and CNI create on first use outside our directory,
    /// which did not exist before: removed at cleanup if empty.
    host_dirs_created: Vec<PathBuf>,
}

/// Directories outside the private one that containerd 1.6 or libcni create when needed
/// (deepest first).
const HOST_DIRS: [&str; 4] = [
    "/run/containerd/s",
    "/run/containerd",
    "/var/lib/cni/results",
    "/var/lib/cni",
];

impl Containerd {
    /// Writes the config and CNI network, starts containerd, waits for its socket and
    /// imports the busybox image.
    pub fn start(opts: Options) -> Result<Self, ContainerdError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(ContainerdError::NotRoot);
        }
        std::fs::create_dir_all(&opts.base_parent)
            .map_err(io(format!("create {}", opts.base_parent.display())))?;
        let base = tempfile::Builder::new()
            // Short: sandbox sockets under it must fit a Unix socket path (107 bytes).
            .prefix("ccri.")
            .tempdir_in(&opts.base_parent)
            .map_err(io("create the private containerd's directory"))?
            .keep();
        let tag = std::process::id() % 10000;
        let mut c = Containerd {
            root: base.join("root"),
            state: base.join("state"),
            socket: base.join("containerd.sock"),
            config: base.join("config.toml"),
            log: base.join("containerd.log"),
            cni_conf_dir: base.join("cni/net.d"),
            cni_ipam_dir: base.join("cni/ipam"),
            pod_logs: base.join("pods"),
            volumes: base.join("volumes"),
            bridge: format!("ccri{tag}"),
            // 10.200-249.x.0/24: private, spread by pid so runs side by side differ.
            subnet_prefix: format!("10.{}.{}", 200 + tag % 50, (tag / 50) % 250),
            cgroup_parent: format!("/cocoon-cri-{tag}"),
            stream_port: free_port()?,
            cocoon_config: base.join("cocoon.toml"),
            cocoon_images: base.join("images"),
            cocoon_state: base.join("s"),
            base,
            opts,
            child: None,
            netns_before: residue::netns_names(),
            host_dirs_created: HOST_DIRS
                .iter()
                .map(PathBuf::from)
                .filter(|d| !d.exists())
                .collect(),
        };
        for d in [
            &c.root,
            &c.state,
            &c.cni_conf_dir,
            &c.cni_ipam_dir,
            &c.pod_logs,
            &c.volumes,
            &c.cocoon_images,
            &c.cocoon_state,
        ] {
            std::fs::create_dir_all(d).map_err(io(format!("create {}", d.display())))?;
        }
        std::fs::write(&c.config, c.render_config())
            .map_err(io(format!("write {}", c.config.display())))?;
        std::fs::write(&c.cocoon_config, c.render_cocoon_config())
            .map_err(io(format!("write {}", c.cocoon_config.display())))?;
        let conflist = c.cni_conf_dir.join("10-cocoon-test.conflist");
        std::fs::write(&conflist, c.render_cni())
            .map_err(io(format!("write {}", conflist.display())))?;
        c.create_bridge()?;
        c.spawn()?;
        c.import_busybox()?;
        Ok(c)
    }

    /// containerd's `config.toml` (version 2, as containerd 1.6 reads it).
    pub fn render_config(&self) -> String {
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        let mut s = String::new();
        let _ = write!(
            s,
            r#"# Private containerd for Cocoon's CRI tests (integration/src/containerd.rs).
version = 2
root = "{root}"
state = "{state}"
# Plugins that would probe or write host paths, or need kernel features we do not use.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""

# Collect garbage (removed snapshots) right after every deletion, so that "removed"
# means "gone from disk" by the time a test looks.
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0ms"
  startup_delay = "0ms"

[{cri}]
  sandbox_image = "{image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "{port}"
  enable_tls_streaming = false
  # This host refuses negative oom_score_adj values.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        Root = "{state}/runc"
        SystemdCgroup = false
    [{cri}.containerd.runtimes.cocoon]
      runtime_type = "io.containerd.cocoon.v1"
      pod_annotations = ["io.cocoon.*"]
  [{cri}.cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
            root = self.root.display(),
            state = self.state.display(),
            sock = self.socket.display(),
            image = image::BUSYBOX_REF,
            port = self.stream_port,
            cni_bin = self.opts.cni_bin_dir.display(),
            cni_conf = self.cni_conf_dir.display(),
        );
        s
    }

    /// The cocoon runtime's config: this build's VMM, guest kernel and initramfs
    /// (`$COCOON_VMM`, `$COCOON_BUILD_DIR` move them), and state under our directory.
    pub fn render_cocoon_config(&self) -> String {
        format!(
            "# Cocoon runtime config for the CRI tests (integration/src/containerd.rs).\n\
             vmm = \"{}\"\nkernel = \"{}\"\ninitramfs = \"{}\"\n\
             image_dir = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"debug\"\n{}",
            vmm::vmm_binary().display(),
            paths::guest_vmlinux().display(),
            paths::guest_initramfs().display(),
            self.cocoon_images.display(),
            self.cocoon_state.display(),
            self.opts.cocoon_config_extra,
        )
    }

    /// The pod network: a bridge with host-local IPAM (leases kept under our directory);
    /// containerd's CRI adds the loopback plugin for `lo` itself. No masquerading: no
    /// iptables rules to leave behind.
    pub fn render_cni(&self) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "cocoon-test",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": format!("{}.0/24", self.subnet_prefix) }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": self.cni_ipam_dir,
                },
            }],
        })
        .to_string()
    }

    /// The bridge exists before the first pod (the bridge plugin would create it on the
    /// first ADD): residue snapshots then compare like with like.
    fn create_bridge(&self) -> Result<(), ContainerdError> {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["link", "add", &self.bridge, "type", "bridge"]))?;
        run(Command::new("ip").args(["link", "set", &self.bridge, "up"]))?;
        Ok(())
    }

    fn spawn(&mut self) -> Result<(), ContainerdError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(format!("open {}", self.log.display())))?;
        let log2 = log.try_clone().map_err(io("dup the containerd log"))?;
        let mut path = std::env::join_paths(&self.opts.shim_dirs)
            .map_err(|e| io("join shim dirs for PATH")(std::io::Error::other(e)))?;
        let rest = std::env::var_os("PATH").unwrap_or_else(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        if !path.is_empty() {
            path.push(":");
        }
        path.push(rest);
        let mut cmd = Command::new(&self.opts.containerd);
        if std::env::var_os("COCOON_CONFIG").is_none() {
            // containerd passes its environment on to the shims it starts.
            cmd.env("COCOON_CONFIG", &self.cocoon_config);
        }
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!(
                "start {} (Debian's containerd: scripts/install-deps.sh)",
                self.opts.containerd.display()
            )))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until containerd answers on its socket (`ctr version`).
    fn wait_ready(&mut self) -> Result<(), ContainerdError> {
        let timeout = self.opts.ready_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(ContainerdError::Exited {
                        status,
                        log: self.log_tail(30),
                    });
                }
            }
            if self.socket.exists() && self.ctr(&["version"]).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ContainerdError::NotReady {
                    timeout,
                    log: self.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// containerd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `ctr` against this containerd in the `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String, ContainerdError> {
        run(Command::new(&self.opts.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args))
    }

    /// Builds the busybox image and imports it (the CRI plugin sees it under
    /// [`image::BUSYBOX_REF`]; no registry is ever contacted for it).
    pub fn import_busybox(&self) -> Result<(), ContainerdError> {
        let work = self.base.join("image");
        let archive = image::busybox_oci_archive(&work)?;
        self.ctr(&["images", "import", &archive.to_string_lossy()])?;
        let _ = std::fs::remove_dir_all(&work);
        let listed = self.ctr(&["images", "list", "-q"])?;
        if !listed.lines().any(|l| l.trim() == image::BUSYBOX_REF) {
            return Err(ContainerdError::Command {
                what: "ctr images import".into(),
                status: std::process::ExitStatus::default(),
                output: format!("{} is not listed afterwards: {listed}", image::BUSYBOX_REF),
            });
        }
        Ok(())
    }

    /// Runs containerd's garbage collection now and waits for it: removed containers'
    /// snapshots go when nothing references them any more, which the GC scheduler may
    /// otherwise leave for a later deletion to trigger. (Deleting a lease with `--sync`
    /// runs a full collection.)
    pub fn collect_garbage(&self) -> Result<(), ContainerdError> {
        let out = self.ctr(&["leases", "create"])?;
        let id = out
            .split_whitespace()
            .next()
            .ok_or_else(|| ContainerdError::Command {
                what: "ctr leases create".into(),
                status: std::process::ExitStatus::default(),
                output: "no lease id in its output".into(),
            })?
            .to_string();
        self.ctr(&["leases", "delete", "--sync", &id])?;
        Ok(())
    }

    /// containerd's own view, for failure reports: containers, tasks, snapshots.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for what in [
            &["containers", "list"][..],
            &["tasks", "list"],
            &["snapshots", "list"],
        ] {
            let out = self.ctr(what).unwrap_or_else(|e| e.to_string());
            let _ = writeln!(s, "$ ctr {}\n{}", what.join(" "), out.trim_end());
        }
        s
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 10 s). Shims and their pods stay up,
    /// as they do when a node's containerd restarts.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops and starts containerd again with the same config and directories.
    pub fn restart(&mut self) -> Result<(), ContainerdError> {
        self.stop();
        self.spawn()
    }

    /// The last `n` lines of containerd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Log lines that mention `needle` (for failure reports about one pod).
    pub fn log_lines_with(&self, needle: &str, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// cgroup directories that may hold pods' cgroups (v2, or every v1 hierarchy).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let rel = self.cgroup_parent.trim_start_matches('/');
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            return vec![root.join(rel)];
        }
        std::fs::read_dir(root)
            .map(|d| d.flatten().map(|e| e.path().join(rel)).collect::<Vec<_>>())
            .unwrap_or_default()
    }

    /// What residue checks look at for pods of this containerd: processes started under
    /// it, its directories, the CNI cache, shim sockets and cocoon's own state.
    pub fn residue_scope(&self) -> Scope {
        Scope {
            process_needle: self.base.display().to_string(),
            daemon_pid: self.pid(),
            dirs: vec![
                self.root.clone(),
                self.state.clone(),
                self.cni_ipam_dir.clone(),
                // containerd 1.6 keeps shim sockets here whatever its state dir is.
                PathBuf::from("/run/containerd/s"),
                // libcni's result cache (not configurable through containerd).
                PathBuf::from("/var/lib/cni"),
                self.cocoon_images.clone(),
                self.cocoon_state.clone(),
                // The runtime's defaults, for a $COCOON_CONFIG that keeps them.
                PathBuf::from("/var/lib/cocoon"),
                PathBuf::from("/run/cocoon"),
            ],
            cgroups: self.cgroup_dirs(),
        }
    }

    /// Removes everything this containerd and its pods left, without asking containerd.
    fn cleanup(&mut self) {
        self.stop();
        let needle = self.base.display().to_string();
        // Shims are found by their `-address <our socket>` argument, the rest as their
        // descendants; a few rounds catch processes forked meanwhile.
        for _ in 0..5 {
            let procs = residue::processes_of(&needle, None);
            if procs.is_empty() {
                break;
            }
            for p in &procs {
                // SAFETY: kill(2) with a pid read from /proc; at worst it is gone already.
                unsafe { libc::kill(p.pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Deepest mounts first.
        let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|p| p.starts_with(&needle))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").args(["-l", &p]).status();
        }
        for ns in residue::netns_names().difference(&self.netns_before) {
            if ns.starts_with("cni-") {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        for d in self.cgroup_dirs() {
            remove_cgroup_tree(&d);
        }
        let _ = std::fs::remove_dir_all(&self.base);
        for d in &self.host_dirs_created {
            // Only if empty: something else may have put files there meanwhile.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Removes a cgroup directory and its children (cgroupfs only allows rmdir).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A free TCP port on 127.0.0.1 for the streaming server (containerd 1.6 would put port
/// 0 into the URLs it hands out, so it needs a real one).
fn free_port() -> Result<u16, ContainerdError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
    Ok(l.local_addr().map_err(io("read the free port"))?.port())
}
