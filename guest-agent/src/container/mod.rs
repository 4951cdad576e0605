//! Container lifecycle on youki's libcontainer.
//!
//! - `create` and `exec` (they fork and `waitpid`), `start` (it `chdir`s and may run
//!   hooks) and `delete` (hooks) run in a helper child ([`helper`]); kill, pause and
//!   resume run in the agent (signals and cgroup files only).
//! - A created container's init, and every exec'd process, end up children of the agent
//!   (PID 1, or a subreaper in host tests) once the helper exits; their exits come from
//!   the agent's reaper.
//! - Stdio: [`process`]; cgroup files: [`cgroup`]; OOM events: [`oom`].

mod cgroup;
mod helper;
mod oom;
mod process;
mod rootfs;
mod spec;

pub use helper::helper_main;

use crate::error::{AgentError, Result};
use crate::events::events;
use crate::reaper::{reaper, ExitInfo};
use cgroup::{unix_nanos, Cgroup};
use cocoon_agent_protocol::api;
use cocoon_agent_protocol::stdio::{format_reply, valid_id, StdioHeader};
use helper::{HelperCommand, HelperOp};
use libcontainer::container::Container as LcContainer;
use libcontainer::error::LibcontainerError;
use libcontainer::oci_spec::runtime::LinuxResources;
use nix::sys::signal::Signal;
use oom::{OomState, OomWatcher, WatchId};
use process::{ConsoleSocket, ProcessIo};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long `remove` waits for the container's processes to die after SIGKILL.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where things live; [`Containers::new`] uses the agent's paths.
#[derive(Debug, Clone)]
pub struct Config {
    /// libcontainer's state root.
    pub oci_root: PathBuf,
    /// Bundles: `<id>/config.json`, `<id>/rootfs`.
    pub containers_dir: PathBuf,
    /// Short paths for console sockets (a Unix socket path has 108 bytes).
    pub run_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub helper: HelperCommand,
    /// Use MS_MOVE + chroot instead of pivot_root (the guest's root is the initramfs).
    pub no_pivot: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            oci_root: crate::paths::OCI_ROOT.into(),
            containers_dir: crate::paths::CONTAINERS_DIR.into(),
            run_dir: crate::paths::RUN_DIR.into(),
            cgroup_root: cgroup::CGROUP_ROOT.into(),
            helper: HelperCommand::default(),
            no_pivot: rootfs::root_is_initramfs(),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy)]
struct Exit {
    status: i32,
    at_ns: i64,
    oom_killed: bool,
}

/// A container's init or exec'd process.
struct Proc {
    exec_id: String,
    pid: u32,
    io: ProcessIo,
    /// The cgroup's OOM kill count when the process started.
    oom_baseline: u64,
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
}

impl Proc {
    fn exit(&self) -> Option<Exit> {
        *lock(&self.exit)
    }

    fn wait(&self, timeout: Option<Duration>) -> Option<Exit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut exit = lock(&self.exit);
        loop {
            if let Some(e) = *exit {
                return Some(e);
            }
            exit = match deadline {
                None => self.exited.wait(exit).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.exited
                        .wait_timeout(exit, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Started,
}

struct Container {
    id: String,
    bundle: PathBuf,
    rootfs_mounted: bool,
    cgroup: Cgroup,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// Exec ids being set up (reserved, not yet in `execs`).
    pending_execs: Mutex<HashSet<String>>,
    phase: Mutex<Phase>,
    /// Serialises libcontainer calls that read-modify-write its state file.
    lc: Mutex<()>,
    oom: Arc<OomState>,
    oom_watch: Mutex<Option<WatchId>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::not_found("process", format!("{}/{exec_id}", self.id)))
    }

    fn all_processes(&self) -> Vec<Arc<Proc>> {
        let mut all = vec![Arc::clone(&self.init)];
        all.extend(lock(&self.execs).values().cloned());
        all
    }
}

/// The agent's containers.
pub struct Containers {
    cfg: Config,
    table: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created (reserved, not yet in `table`).
    creating: Mutex<HashSet<String>>,
    oom_watcher: OomWatcher,
    seq: AtomicU64,
}

impl Default for Containers {
    fn default() -> Self {
        Self::new()
    }
}

/// Maps libcontainer's errors: a wrong state is the caller's precondition.
fn lc_error(context: String) -> impl FnOnce(LibcontainerError) -> AgentError {
    move |e| match e {
        LibcontainerError::IncorrectStatus(s) => {
            AgentError::FailedPrecondition(format!("{context}: container is {s}"))
        }
        other => AgentError::Failed {
            context,
            message: other.to_string(),
        },
    }
}

/// Releases a reservation when dropped (create/exec that failed half-way).
struct Reservation<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.id);
    }
}

fn check_id(what: &'static str, id: &str) -> Result<()> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "invalid {what} {id:?}: use letters, digits, '_', '-', '.' (at most 128)"
        )))
    }
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).map_err(AgentError::io(format!("write {}", path.display())))
}

fn parse_signal(signal: i32) -> Result<Signal> {
    Signal::try_from(signal)
        .map_err(|_| AgentError::InvalidArgument(format!("unknown signal {signal}")))
}

impl Containers {
    pub fn new() -> Self {
        Self::with_config(Config::default())
    }

    pub fn with_config(cfg: Config) -> Self {
        Containers {
            cfg,
            table: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            oom_watcher: OomWatcher::default(),
            seq: AtomicU64::new(0),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::not_found("container", id))
    }

    fn console_socket(&self) -> Result<ConsoleSocket> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        ConsoleSocket::bind(
            &self
                .cfg
                .run_dir
                .join(format!("tty-{}-{n}.sock", std::process::id())),
        )
    }

    /// Sets up stdio per `stdio`: pipes now, or a console socket whose pty master is
    /// collected after the helper ran.
    fn prepare_stdio(
        &self,
        stdio: &api::Stdio,
    ) -> Result<(
        Option<ProcessIo>,
        Option<process::ChildStdio>,
        Option<ConsoleSocket>,
    )> {
        if stdio.terminal {
            Ok((None, None, Some(self.console_socket()?)))
        } else {
            let (io, child) = ProcessIo::pipes(stdio)?;
            Ok((Some(io), Some(child), None))
        }
    }

    /// Creates the container (its init waits for `start`); returns the init pid.
    pub fn create(&self, req: &api::CreateContainerRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        check_id("container id", id)?;
        {
            let table = lock(&self.table);
            let mut creating = lock(&self.creating);
            if table.contains_key(id) || !creating.insert(id.to_string()) {
                return Err(AgentError::AlreadyExists {
                    what: "container",
                    id: id.to_string(),
                });
            }
        }
        let _reserved = Reservation {
            set: &self.creating,
            id: id.to_string(),
        };
        let bundle = self.cfg.containers_dir.join(id);
        let mut mounted = false;
        let result = self.create_in(req, &bundle, &mut mounted);
        if let Err(e) = &result {
            tracing::warn!(container_id = id, "create failed: {e}");
            self.cleanup_failed_create(id, &bundle, mounted);
        }
        let container = result?;
        let pid = container.init.pid;
        let init = Arc::clone(&container.init);
        let oom = Arc::clone(&container.oom);
        let watch = self.oom_watcher.watch(&container.oom);
        *lock(&container.oom_watch) = watch;
        let cgroup = container.cgroup.clone();
        lock(&self.table).insert(id.to_string(), Arc::clone(&container));
        drop(_reserved);
        let container_id = id.to_string();
        reaper().on_exit(pid as i32, move |info| {
            process_exited(&container_id, &init, &oom, info);
            // With a shared pid namespace nothing kills the rest for us (runc's shim
            // does the same); with its own, the kernel already did.
            if let Err(e) = cgroup.signal_all(Signal::SIGKILL) {
                tracing::debug!(container_id, "killing what is left: {e}");
            }
        });
        tracing::info!(container_id = id, pid, "container created");
        Ok(pid)
    }

    fn create_in(
        &self,
        req: &api::CreateContainerRequest,
        bundle: &Path,
        mounted: &mut bool,
    ) -> Result<Arc<Container>> {
        let id = req.container_id.as_str();
        if self.cfg.oci_root.join(id).exists() {
            return Err(AgentError::AlreadyExists {
                what: "container state",
                id: id.to_string(),
            });
        }
        std::fs::create_dir_all(bundle).map_err(AgentError::io(format!(
            "create bundle {}",
            bundle.display()
        )))?;
        std::fs::create_dir_all(&self.cfg.oci_root).map_err(AgentError::io(format!(
            "create {}",
            self.cfg.oci_root.display()
        )))?;
        let default_stdio = api::Stdio::new();
        let stdio = req.stdio.as_ref().unwrap_or(&default_stdio);
        let rootfs = match req.rootfs.as_ref() {
            Some(r) if !r.image_mount.is_empty() || !r.writable_mount.is_empty() => {
                if r.image_mount.is_empty() || r.writable_mount.is_empty() {
                    return Err(AgentError::InvalidArgument(format!(
                        "container {id}: rootfs needs both image_mount and writable_mount"
                    )));
                }
                let target = bundle.join("rootfs");
                rootfs::mount_overlay(
                    Path::new(&r.image_mount),
                    Path::new(&r.writable_mount),
                    &target,
                )?;
                *mounted = true;
                Some(target)
            }
            _ => None,
        };
        let spec = spec::prepare_spec(&req.spec_json, id, rootfs.as_deref(), stdio.terminal)?;
        let cgroups_path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .unwrap_or_else(|| spec::default_cgroups_path(id));
        let config = serde_json::to_vec_pretty(&spec).map_err(AgentError::failed(format!(
            "container {id}: serialise the spec"
        )))?;
        write_file(&bundle.join("config.json"), &config)?;

        let (io, child, console) = self.prepare_stdio(stdio)?;
        let pid_file = bundle.join("init.pid");
        let mut flags = vec![
            ("id", id.to_string()),
            ("root", self.cfg.oci_root.display().to_string()),
            ("bundle", bundle.display().to_string()),
            ("pid-file", pid_file.display().to_string()),
        ];
        if let Some(c) = &console {
            flags.push(("console-socket", c.path().display().to_string()));
        }
        if self.cfg.no_pivot {
            flags.push(("no-pivot", "1".to_string()));
        }
        self.cfg.helper.run(HelperOp {
            op: "create",
            container_id: id,
            flags,
            stdio: child,
            log: bundle.join("oci-create.log"),
        })?;
        let pid = helper::read_pid_file(&pid_file)?;
        let io = match (io, console) {
            (Some(io), _) => io,
            (None, Some(c)) => ProcessIo::terminal(c.receive_master()?, stdio)?,
            (None, None) => {
                return Err(AgentError::Failed {
                    context: format!("container {id}"),
                    message: "no stdio".to_string(),
                })
            }
        };
        let cgroup = Cgroup::new(&self.cfg.cgroup_root, &cgroups_path);
        let oom = Arc::new(OomState::new(id, cgroup.clone()));
        let init = Arc::new(Proc {
            exec_id: String::new(),
            pid,
            io,
            oom_baseline: cgroup.oom_kills().unwrap_or(0),
            exit: Mutex::new(None),
            exited: Condvar::new(),
        });
        Ok(Arc::new(Container {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            rootfs_mounted: *mounted,
            cgroup,
            init,
            execs: Mutex::new(HashMap::new()),
            pending_execs: Mutex::new(HashSet::new()),
            phase: Mutex::new(Phase::Created),
            lc: Mutex::new(()),
            oom,
            oom_watch: Mutex::new(None),
        }))
    }

    /// Best effort: whatever a failed create left (libcontainer cleans up after its own
    /// failures, not after a helper that died).
    fn cleanup_failed_create(&self, id: &str, bundle: &Path, mounted: bool) {
        if self.cfg.oci_root.join(id).exists() {
            let r = self.cfg.helper.run(HelperOp {
                op: "delete",
                container_id: id,
                flags: vec![
                    ("id", id.to_string()),
                    ("root", self.cfg.oci_root.display().to_string()),
                ],
                stdio: None,
                log: bundle.join("oci-cleanup.log"),
            });
            if let Err(e) = r {
                tracing::warn!(container_id = id, "cleanup after failed create: {e}");
            }
        }
        if let Err(e) = remove_bundle(bundle, mounted) {
            tracing::warn!(container_id = id, "cleanup after failed create: {e}");
        }
    }

    /// Starts the user's process; returns the init pid.
    pub fn start(&self, container_id: &str) -> Result<u32> {
        let c = self.get(container_id)?;
        let _lc = lock(&c.lc);
        {
            let phase = lock(&c.phase);
            if *phase != Phase::Created {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {container_id} is already started"
                )));
            }
        }
        if c.init.exit().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {container_id} has exited before it was started"
            )));
        }
        self.cfg.helper.run(HelperOp {
            op: "start",
            container_id,
            flags: vec![
                ("id", container_id.to_string()),
                ("root", self.cfg.oci_root.display().to_string()),
            ],
            stdio: None,
            log: c.bundle.join("oci-start.log"),
        })?;
        *lock(&c.phase) = Phase::Started;
        tracing::info!(container_id, pid = c.init.pid, "container started");
        Ok(c.init.pid)
    }

    /// Runs another process in the running container; returns its pid.
    pub fn exec(&self, req: &api::ExecProcessRequest) -> Result<u32> {
        let c = self.get(&req.container_id)?;
        let id = c.id.as_str();
        let exec_id = req.exec_id.as_str();
        check_id("exec id", exec_id)?;
        if *lock(&c.phase) != Phase::Started || c.init.exit().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        {
            let execs = lock(&c.execs);
            let mut pending = lock(&c.pending_execs);
            if execs.contains_key(exec_id) || !pending.insert(exec_id.to_string()) {
                return Err(AgentError::AlreadyExists {
                    what: "exec",
                    id: format!("{id}/{exec_id}"),
                });
            }
        }
        let _reserved = Reservation {
            set: &c.pending_execs,
            id: exec_id.to_string(),
        };
        let default_stdio = api::Stdio::new();
        let stdio = req.stdio.as_ref().unwrap_or(&default_stdio);
        let process = spec::prepare_process(&req.process_json, id, stdio.terminal)?;
        let process_file = c.bundle.join(format!("exec-{exec_id}.json"));
        let pid_file = c.bundle.join(format!("exec-{exec_id}.pid"));
        let json = serde_json::to_vec(&process).map_err(AgentError::failed(format!(
            "container {id}: serialise exec {exec_id}"
        )))?;
        write_file(&process_file, &json)?;
        let result = (|| -> Result<Arc<Proc>> {
            let (io, child, console) = self.prepare_stdio(stdio)?;
            let mut flags = vec![
                ("id", id.to_string()),
                ("root", self.cfg.oci_root.display().to_string()),
                ("process", process_file.display().to_string()),
                ("pid-file", pid_file.display().to_string()),
            ];
            if let Some(con) = &console {
                flags.push(("console-socket", con.path().display().to_string()));
            }
            let baseline = c.cgroup.oom_kills().unwrap_or(0);
            self.cfg.helper.run(HelperOp {
                op: "exec",
                container_id: id,
                flags,
                stdio: child,
                log: c.bundle.join(format!("oci-exec-{exec_id}.log")),
            })?;
            let pid = helper::read_pid_file(&pid_file)?;
            let io = match (io, console) {
                (Some(io), _) => io,
                (None, Some(con)) => ProcessIo::terminal(con.receive_master()?, stdio)?,
                (None, None) => {
                    return Err(AgentError::Failed {
                        context: format!("container {id}: exec {exec_id}"),
                        message: "no stdio".to_string(),
                    })
                }
            };
            Ok(Arc::new(Proc {
                exec_id: exec_id.to_string(),
                pid,
                io,
                oom_baseline: baseline,
                exit: Mutex::new(None),
                exited: Condvar::new(),
            }))
        })();
        let _ = std::fs::remove_file(&process_file);
        let _ = std::fs::remove_file(&pid_file);
        let p = result?;
        lock(&c.execs).insert(exec_id.to_string(), Arc::clone(&p));
        drop(_reserved);
        let pid = p.pid;
        let oom = Arc::clone(&c.oom);
        let container_id = id.to_string();
        reaper().on_exit(pid as i32, move |info| {
            process_exited(&container_id, &p, &oom, info)
        });
        tracing::info!(container_id = id, exec_id, pid, "exec started");
        Ok(pid)
    }

    /// Signals a process; `all` (init only): every process of the container.
    pub fn signal(&self, container_id: &str, exec_id: &str, signal: i32, all: bool) -> Result<()> {
        let c = self.get(container_id)?;
        let sig = parse_signal(signal)?;
        if all {
            if !exec_id.is_empty() {
                return Err(AgentError::InvalidArgument(
                    "`all` is only for the container's init process (exec id \"\")".into(),
                ));
            }
            let _lc = lock(&c.lc);
            let ctx = format!("container {container_id}: signal {sig} to all");
            let mut lc = LcContainer::load(self.cfg.oci_root.join(container_id))
                .map_err(lc_error(ctx.clone()))?;
            return lc.kill(sig, true).map_err(lc_error(ctx));
        }
        let p = c.process(exec_id)?;
        let name = || format!("{container_id}/{}", p.exec_id);
        if p.exit().is_some() {
            // As runc's shim: a finished process is not found.
            return Err(AgentError::not_found("running process", name()));
        }
        let pid = nix::unistd::Pid::from_raw(p.pid as i32);
        match nix::sys::signal::kill(pid, sig) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::ESRCH) => Err(AgentError::not_found("running process", name())),
            Err(e) => Err(AgentError::io(format!(
                "signal {sig} to {} (pid {})",
                name(),
                p.pid
            ))(e.into())),
        }
    }

    /// Blocks until the process exited; at once if it has.
    pub fn wait(&self, container_id: &str, exec_id: &str) -> Result<api::WaitProcessResponse> {
        let p = self.get(container_id)?.process(exec_id)?;
        let e = p
            .wait(None)
            .ok_or_else(|| AgentError::Timeout("waiting".into()))?;
        let mut r = api::WaitProcessResponse::new();
        r.exit_status = e.status;
        r.exited_at_ns = e.at_ns;
        r.oom_killed = e.oom_killed;
        Ok(r)
    }

    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        self.get(container_id)?.process(exec_id)?.io.close_stdin();
        Ok(())
    }

    pub fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<()> {
        self.get(container_id)?
            .process(exec_id)?
            .io
            .resize(rows, cols)
            .map_err(|e| match e {
                AgentError::FailedPrecondition(m) => {
                    AgentError::FailedPrecondition(format!("{container_id}/{exec_id}: {m}"))
                }
                other => other,
            })
    }

    pub fn list_processes(&self, container_id: &str) -> Result<Vec<u32>> {
        self.get(container_id)?.cgroup.pids()
    }

    pub fn stats(&self, container_id: &str) -> Result<api::StatsContainerResponse> {
        self.get(container_id)?.cgroup.stats()
    }

    pub fn pause(&self, container_id: &str) -> Result<()> {
        let c = self.get(container_id)?;
        let _lc = lock(&c.lc);
        let ctx = format!("container {container_id}: pause");
        LcContainer::load(self.cfg.oci_root.join(container_id))
            .and_then(|mut lc| lc.pause())
            .map_err(lc_error(ctx))
    }

    pub fn resume(&self, container_id: &str) -> Result<()> {
        let c = self.get(container_id)?;
        let _lc = lock(&c.lc);
        let ctx = format!("container {container_id}: resume");
        LcContainer::load(self.cfg.oci_root.join(container_id))
            .and_then(|mut lc| lc.resume())
            .map_err(lc_error(ctx))
    }

    /// Applies new OCI LinuxResources to the running container's cgroup.
    pub fn update(&self, container_id: &str, resources_json: &[u8]) -> Result<()> {
        let c = self.get(container_id)?;
        let resources: LinuxResources = serde_json::from_slice(resources_json).map_err(|e| {
            AgentError::InvalidArgument(format!(
                "container {container_id}: bad LinuxResources JSON: {e}"
            ))
        })?;
        use libcgroups::common::CgroupManager;
        let ctx = format!("container {container_id}: update resources");
        let manager = libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path: c.cgroup.path().to_path_buf(),
            systemd_cgroup: false,
            container_name: container_id.to_string(),
        })
        .map_err(AgentError::failed(ctx.clone()))?;
        manager
            .apply(&libcgroups::common::ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(AgentError::failed(ctx))
    }

    /// Kills what is left (SIGKILL to all), deletes the libcontainer state and cgroup,
    /// unmounts the rootfs overlay and forgets the container. Works in every state.
    pub fn remove(&self, container_id: &str) -> Result<()> {
        let c = self.get(container_id)?;
        let _lc = lock(&c.lc);
        let mut errors = Vec::new();
        if let Err(e) = c.cgroup.signal_all(Signal::SIGKILL) {
            errors.push(e.to_string());
        }
        // A frozen v1 cgroup holds its SIGKILLed processes: libcontainer thaws it.
        if let Ok(mut lc) = LcContainer::load(self.cfg.oci_root.join(container_id)) {
            if let Err(e) = lc.kill(Signal::SIGKILL, true) {
                tracing::debug!(container_id, "libcontainer kill: {e}");
            }
        }
        // Let the exits reach their waiters (and the event queue) before we go.
        let deadline = Instant::now() + REMOVE_WAIT;
        for p in c.all_processes() {
            let left = deadline.saturating_duration_since(Instant::now());
            if p.wait(Some(left)).is_none() {
                tracing::warn!(container_id, pid = p.pid, "process did not die on SIGKILL");
            }
        }
        if let Err(e) = self.cfg.helper.run(HelperOp {
            op: "delete",
            container_id,
            flags: vec![
                ("id", container_id.to_string()),
                ("root", self.cfg.oci_root.display().to_string()),
            ],
            stdio: None,
            log: c.bundle.join("oci-delete.log"),
        }) {
            errors.push(e.to_string());
        }
        if let Err(e) = remove_bundle(&c.bundle, c.rootfs_mounted) {
            errors.push(e.to_string());
        }
        if !errors.is_empty() {
            return Err(AgentError::Failed {
                context: format!("remove container {container_id}"),
                message: errors.join("; "),
            });
        }
        if let Some(w) = lock(&c.oom_watch).take() {
            self.oom_watcher.unwatch(w);
        }
        lock(&self.table).remove(container_id);
        tracing::info!(container_id, "container removed");
        Ok(())
    }

    /// Joins a host stdio connection to its stream: answers `ok` (or `err <reason>`,
    /// then returns the error) and copies until the stream ends, on the calling thread.
    pub fn attach_stdio(&self, header: &StdioHeader, mut conn: File) -> Result<()> {
        let pump = self
            .get(&header.container_id)
            .and_then(|c| c.process(&header.exec_id))
            .and_then(|p| p.io.take(header.stream));
        let pump = match pump {
            Ok(p) => p,
            Err(e) => {
                let _ = conn.write_all(format_reply(&Err(e.to_string())).as_bytes());
                return Err(e);
            }
        };
        conn.write_all(format_reply(&Ok(())).as_bytes())
            .map_err(AgentError::io("answer a stdio connection"))?;
        tracing::debug!(
            container_id = %header.container_id,
            exec_id = %header.exec_id,
            stream = ?header.stream,
            "stdio attached"
        );
        pump.run(conn);
        Ok(())
    }

    /// A container with the given init stdio and no process behind it (stdio tests).
    #[cfg(test)]
    fn insert_fake(&self, id: &str, io: ProcessIo) {
        let cgroup = Cgroup::fake_v2(Path::new("/nonexistent"), Path::new("/x"));
        let c = Container {
            id: id.to_string(),
            bundle: PathBuf::from("/nonexistent"),
            rootfs_mounted: false,
            cgroup: cgroup.clone(),
            init: Arc::new(Proc {
                exec_id: String::new(),
                pid: 0,
                io,
                oom_baseline: 0,
                exit: Mutex::new(None),
                exited: Condvar::new(),
            }),
            execs: Mutex::new(HashMap::new()),
            pending_execs: Mutex::new(HashSet::new()),
            phase: Mutex::new(Phase::Started),
            lc: Mutex::new(()),
            oom: Arc::new(OomState::with_report(id, cgroup, |_| {})),
            oom_watch: Mutex::new(None),
        };
        lock(&self.table).insert(id.to_string(), Arc::new(c));
    }
}

/// Records an exit (reaper thread): wakes waiters and queues the event; an OOM kill seen
/// now is reported first.
fn process_exited(container_id: &str, p: &Proc, oom: &OomState, info: ExitInfo) {
    let kills = oom.check();
    let exit = Exit {
        status: info.status,
        at_ns: unix_nanos(info.at),
        oom_killed: kills.is_some_and(|k| k > p.oom_baseline),
    };
    tracing::info!(
        container_id,
        exec_id = %p.exec_id,
        pid = p.pid,
        status = exit.status,
        oom_killed = exit.oom_killed,
        "process exited"
    );
    // The event first: whoever a wait wakes up finds it queued.
    let mut e = api::ProcessExited::new();
    e.container_id = container_id.to_string();
    e.exec_id = p.exec_id.clone();
    e.pid = p.pid;
    e.exit_status = exit.status;
    e.exited_at_ns = exit.at_ns;
    e.oom_killed = exit.oom_killed;
    events().process_exited(e);
    *lock(&p.exit) = Some(exit);
    p.exited.notify_all();
}

/// Unmounts the rootfs (when the agent mounted it) and removes the bundle directory. A
/// rootfs that stays mounted is never recursed into.
fn remove_bundle(bundle: &Path, mounted: bool) -> Result<()> {
    let rootfs = bundle.join("rootfs");
    if mounted {
        rootfs::unmount(&rootfs)?;
    }
    if rootfs::is_mount_point(&rootfs) {
        return Err(AgentError::FailedPrecondition(format!(
            "{} is still mounted",
            rootfs.display()
        )));
    }
    match std::fs::remove_dir_all(bundle) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(format!("remove {}", bundle.display()))(e)),
    }
}

/// Containers without processes behind them, for tests of the stdio plumbing.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::os::fd::OwnedFd;

    /// The process's ends of a fake init's stdio (stdin and stdout requested).
    pub struct FakeProcess {
        pub stdin: OwnedFd,
        pub stdout: OwnedFd,
    }

    pub fn fake_containers(id: &str) -> (Containers, FakeProcess) {
        let containers = Containers::with_config(Config {
            oci_root: "/nonexistent/oci".into(),
            containers_dir: "/nonexistent/containers".into(),
            run_dir: "/nonexistent/run".into(),
            cgroup_root: "/nonexistent/cgroup".into(),
            helper: HelperCommand::default(),
            no_pivot: false,
        });
        let mut stdio = api::Stdio::new();
        stdio.stdin = true;
        stdio.stdout = true;
        let (io, child) = ProcessIo::pipes(&stdio).expect("pipes");
        containers.insert_fake(id, io);
        (
            containers,
            FakeProcess {
                stdin: child.stdin,
                stdout: child.stdout,
            },
        )
    }
}

#[cfg(test)]
mod tests;
