//! containerd's Task API for one pod, one function per verb (one module each):
//! [`Service::create`], [`Service::start`], [`Service::state`], [`Service::exec`],
//! [`Service::kill`], [`Service::wait`], [`Service::delete`], [`Service::pids`],
//! [`Service::resize_pty`], [`Service::close_io`], [`Service::pause`],
//! [`Service::resume`], [`Service::update`], [`Service::stats`], [`Service::connect`],
//! [`Service::shutdown`]. The shim only converts containerd's messages to these calls.
//!
//! One `Service` serves one pod: the sandbox container (CRI annotation
//! `io.kubernetes.cri.container-type=sandbox`) boots the VM ([`crate::sandbox::Pod`]);
//! there is no pause process, the sandbox task's pid is the VMM's, its exit is the VM's
//! end, and killing it stops the VM. The pod's other containers run in the VM through
//! the agent.
//!
//! Per pod, three threads watch the VM: the monitor (VMM exit: every process still
//! running is marked exited with status 255 and a log line saying why, so no call
//! hangs), the event poller (agent `GetEvents` → exit and OOM events; an exit is
//! published only after the process's output reached EOF) and the console forwarder;
//! a fourth keeps copied host files in sync.

mod close_io;
mod connect;
mod create;
mod delete;
mod error;
mod exec;
mod kill;
mod pause;
mod pids;
mod resize_pty;
mod shutdown;
mod start;
mod state;
mod stats;
mod update;
mod wait;

pub use error::{ErrorCode, TaskError};
pub use stats::Stats;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime};

use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::error::chain;
use crate::events::{EventSink, GuestEvent, TaskEvent, VM_GONE_EXIT_STATUS};
use crate::sandbox::Pod;
use crate::stdio::{ProcessIo, StdioPaths};

/// How long an exit waits for the process's output to reach EOF before it is published.
pub const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The agent's long-poll for events.
const EVENT_POLL: Duration = Duration::from_secs(5);
/// How a process killed by SIGKILL exits, as a shell reports it.
const SIGKILL_EXIT_STATUS: u32 = 128 + 9;

/// One rootfs mount as containerd passes it in CreateTaskRequest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// containerd's CreateTaskRequest, as far as Cocoon uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateRequest {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<RootfsMount>,
    pub stdio: StdioPaths,
}

/// A process's life as containerd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

/// What `State` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessState {
    pub id: String,
    pub exec_id: String,
    pub bundle: PathBuf,
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioPaths,
    pub exit: Option<Exit>,
}

#[derive(Debug)]
struct ProcInner {
    status: Status,
    pid: u32,
    exit: Option<Exit>,
}

/// A container's init process or an exec.
pub(crate) struct Proc {
    container_id: String,
    exec_id: String,
    stdio: StdioPaths,
    /// The OCI process (JSON) of an exec, until it starts.
    process_json: Vec<u8>,
    inner: Mutex<ProcInner>,
    cv: Condvar,
    io: Mutex<Arc<ProcessIo>>,
    /// A SIGKILL was asked for: if the VM dies before the agent reports the exit, the
    /// process still ends as killed (137), not as lost with the VM (255).
    sigkill_requested: AtomicBool,
}

impl Proc {
    fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, pid: u32) -> Proc {
        Proc {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            process_json: Vec::new(),
            inner: Mutex::new(ProcInner {
                status: Status::Created,
                pid,
                exit: None,
            }),
            cv: Condvar::new(),
            io: Mutex::new(Arc::new(ProcessIo::none())),
            sigkill_requested: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcInner> {
        // A poisoned lock only means another thread panicked mid-update; the data is
        // plain values and still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io(&self) -> Arc<ProcessIo> {
        self.io.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_io(&self, io: ProcessIo) {
        *self.io.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(io);
    }

    /// Records the exit (once); false if it had already exited.
    fn set_exited(&self, exit: Exit) -> bool {
        let mut g = self.lock();
        if g.exit.is_some() {
            return false;
        }
        g.exit = Some(exit);
        g.status = Status::Stopped;
        drop(g);
        self.cv.notify_all();
        true
    }

    fn label(&self) -> String {
        if self.exec_id.is_empty() {
            self.container_id.clone()
        } else {
            format!("{}/{}", self.container_id, self.exec_id)
        }
    }
}

/// A container of the pod, and what it holds in the VM.
#[derive(Debug, Clone)]
pub(crate) struct Container {
    id: String,
    bundle: PathBuf,
    is_sandbox: bool,
    image_key: Option<String>,
    image_serial: String,
    writable_serial: String,
    writable_disk: Option<PathBuf>,
}

pub(crate) struct Shared {
    config: Config,
    sink: Arc<dyn EventSink>,
    pod: Mutex<Option<Arc<Pod>>>,
    containers: Mutex<HashMap<String, Container>>,
    procs: Mutex<HashMap<(String, String), Arc<Proc>>>,
}

/// The Task API of one pod. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    pub fn new(config: Config, sink: Arc<dyn EventSink>) -> Service {
        Service {
            shared: Arc::new(Shared {
                config,
                sink,
                pod: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                procs: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    fn publish(&self, event: TaskEvent) {
        debug!(topic = event.topic(), ?event, "event");
        self.shared.sink.publish(event);
    }

    fn pod(&self) -> Option<Arc<Pod>> {
        self.shared
            .pod
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The running pod, or why there is none.
    fn running_pod(&self) -> Result<Arc<Pod>, TaskError> {
        let pod = self.pod().ok_or_else(|| {
            TaskError::FailedPrecondition(
                "this shim has no pod sandbox (create the sandbox container first)".into(),
            )
        })?;
        pod.check_running()?;
        Ok(pod)
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.shared
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn procs(&self) -> MutexGuard<'_, HashMap<(String, String), Arc<Proc>>> {
        self.shared.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> Result<Container, TaskError> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("container {id} not found")))
    }

    fn proc(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>, TaskError> {
        self.procs()
            .get(&(id.to_string(), exec_id.to_string()))
            .cloned()
            .ok_or_else(|| {
                if exec_id.is_empty() {
                    TaskError::NotFound(format!("container {id} not found"))
                } else {
                    TaskError::NotFound(format!("exec {exec_id} of container {id} not found"))
                }
            })
    }

    /// Whether any task is left (the shim may exit when none is).
    pub fn is_empty(&self) -> bool {
        self.containers().is_empty()
    }

    /// Starts the pod's watcher threads.
    fn watch(&self, pod: &Arc<Pod>) {
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            if let Err(e) = thread::Builder::new().name(name.into()).spawn(f) {
                error!(sandbox = %pod.id, thread = name, error = %e, "cannot start thread");
            }
        };
        let (svc, p) = (self.clone(), pod.clone());
        spawn(
            "vm-monitor",
            Box::new(move || {
                let reason = p.wait_vm_end();
                svc.vm_ended(&p, &reason);
            }),
        );
        let (svc, p) = (self.clone(), pod.clone());
        spawn("agent-events", Box::new(move || svc.poll_events(&p)));
        let p = pod.clone();
        spawn("liveness", Box::new(move || p.watch_liveness()));
        let p = pod.clone();
        spawn("console", Box::new(move || p.forward_console()));
        let p = pod.clone();
        spawn(
            "file-sync",
            Box::new(move || {
                while !p.wait_ended(crate::sandbox::SYNC_INTERVAL) {
                    p.sync_files();
                }
            }),
        );
    }

    /// The event poller: agent events until the VM ends.
    fn poll_events(&self, pod: &Arc<Pod>) {
        let agent = pod.agent.with_timeout(Duration::from_secs(10));
        loop {
            if pod.ended().is_some() {
                return;
            }
            match agent.get_events(EVENT_POLL) {
                Ok(events) => {
                    let now = SystemTime::now();
                    for e in &events {
                        match crate::events::from_agent(e, now) {
                            Some(ev) => self.guest_event(ev),
                            None => debug!(sandbox = %pod.id, "unknown agent event ignored"),
                        }
                    }
                }
                Err(e) => {
                    if pod.wait_ended(Duration::from_millis(500)) {
                        return;
                    }
                    warn!(sandbox = %pod.id, error = %chain(&e), "polling agent events");
                }
            }
        }
    }

    /// Handles one decoded agent event.
    fn guest_event(&self, ev: GuestEvent) {
        match ev {
            GuestEvent::Exited {
                container_id,
                exec_id,
                pid,
                exit_status,
                exited_at,
                oom_killed,
            } => {
                let proc = self
                    .procs()
                    .get(&(container_id.clone(), exec_id.clone()))
                    .cloned();
                let Some(proc) = proc else {
                    debug!(container = %container_id, exec = %exec_id, "exit of an unknown process");
                    return;
                };
                info!(container = %container_id, exec = %exec_id, pid, exit_status, oom_killed,
                    "process exited");
                self.finish(&proc, exit_status, exited_at, OUTPUT_DRAIN_TIMEOUT);
            }
            GuestEvent::Oom { container_id } => {
                warn!(container = %container_id, "OOM kill in the container");
                self.publish(TaskEvent::Oom { container_id });
            }
        }
    }

    /// Marks `proc` exited once its output drained, and publishes the exit.
    fn finish(&self, proc: &Proc, status: u32, at: SystemTime, drain: Duration) {
        if proc.lock().exit.is_some() {
            return;
        }
        let io = proc.io();
        if !io.wait_output(drain) {
            warn!(process = %proc.label(), "output did not reach EOF in time: exit published anyway");
        }
        io.release();
        let pid = proc.lock().pid;
        if proc.set_exited(Exit { status, at }) {
            self.publish(TaskEvent::Exit {
                container_id: proc.container_id.clone(),
                id: if proc.exec_id.is_empty() {
                    proc.container_id.clone()
                } else {
                    proc.exec_id.clone()
                },
                pid,
                exit_status: status,
                exited_at: at,
            });
        }
    }

    /// The VM ended: every process still running has exited with it (137 if a SIGKILL
    /// was asked for it, 255 otherwise).
    fn vm_ended(&self, pod: &Pod, reason: &str) {
        let requested = pod.stop_requested.load(Ordering::SeqCst);
        if requested && !pod.is_declared_dead() {
            info!(sandbox = %pod.id, "VM stopped");
        } else {
            error!(sandbox = %pod.id, reason, "VM ended: marking the pod's processes exited");
        }
        let now = SystemTime::now();
        let procs: Vec<Arc<Proc>> = self.procs().values().cloned().collect();
        let sandbox_proc = procs.iter().find(|p| p.container_id == pod.id).cloned();
        for p in procs.iter().filter(|p| p.container_id != pod.id) {
            let status = if p.sigkill_requested.load(Ordering::SeqCst) {
                SIGKILL_EXIT_STATUS
            } else {
                VM_GONE_EXIT_STATUS
            };
            self.finish(p, status, now, Duration::from_secs(1));
        }
        if let Some(p) = sandbox_proc {
            // A stop the sandbox's kill asked for is the SIGKILL containerd sent.
            let status = if requested {
                SIGKILL_EXIT_STATUS
            } else {
                VM_GONE_EXIT_STATUS
            };
            self.finish(&p, status, now, Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    pub(crate) struct Recorder(pub StdMutex<Vec<TaskEvent>>);

    impl EventSink for Recorder {
        fn publish(&self, event: TaskEvent) {
            self.0.lock().expect("lock").push(event);
        }
    }

    #[test]
    fn guest_exits_become_one_task_exit_each() {
        let rec = Arc::new(Recorder::default());
        let svc = Service::new(Config::default(), rec.clone());
        let p = Arc::new(Proc::new("c1", "", StdioPaths::default(), 7));
        svc.procs().insert(("c1".into(), String::new()), p.clone());
        let p2 = Arc::new(Proc::new("c1", "e1", StdioPaths::default(), 9));
        svc.procs().insert(("c1".into(), "e1".into()), p2.clone());
        let at = SystemTime::now();
        let exited = |exec: &str, pid, status| GuestEvent::Exited {
            container_id: "c1".into(),
            exec_id: exec.into(),
            pid,
            exit_status: status,
            exited_at: at,
            oom_killed: false,
        };
        svc.guest_event(exited("e1", 9, 3));
        svc.guest_event(exited("", 7, 137));
        svc.guest_event(exited("", 7, 137)); // duplicate: ignored
        svc.guest_event(exited("", 99, 1)); // unknown container... same key: ignored too
        svc.guest_event(GuestEvent::Oom {
            container_id: "c1".into(),
        });
        let events = rec.0.lock().expect("lock").clone();
        assert_eq!(
            events,
            vec![
                TaskEvent::Exit {
                    container_id: "c1".into(),
                    id: "e1".into(),
                    pid: 9,
                    exit_status: 3,
                    exited_at: at
                },
                TaskEvent::Exit {
                    container_id: "c1".into(),
                    id: "c1".into(),
                    pid: 7,
                    exit_status: 137,
                    exited_at: at
                },
                TaskEvent::Oom {
                    container_id: "c1".into()
                },
            ]
        );
        assert_eq!(p.lock().status, Status::Stopped);
        assert_eq!(p2.lock().exit.map(|e| e.status), Some(3));
        // Wait returns the recorded exit at once.
        assert_eq!(svc.wait("c1", "e1").expect("wait").status, 3);
    }

    #[test]
    fn calls_without_a_pod_fail_clearly() {
        let svc = Service::new(Config::default(), Arc::new(crate::events::NullSink));
        let err = svc.kill("nope", "", 9, false).expect_err("no task");
        assert_eq!(err.code(), ErrorCode::NotFound);
        assert!(svc.is_empty());
        assert!(svc.shutdown());
        let err = svc.pids("nope").expect_err("no task");
        assert_eq!(err.code(), ErrorCode::NotFound);
    }
}
