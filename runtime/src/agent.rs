//! The host side of the guest agent's protocol (`cocoon-agent-protocol`).
//!
//! - [`AgentClient`]: the ttrpc API on guest vsock port [`AGENT_PORT`], with a timeout on
//!   every call and typed helpers.
//! - [`AgentClient::open_stdio`]: one process stream on guest port [`STDIO_PORT`].
//! - [`ReadyListener`]: the host port [`READY_PORT`] the agent reports ready to.
//!
//! Guest ports are reached through the VMM's hybrid vsock socket (`CONNECT <port>` /
//! `OK <host port>`, docs/vsock.md), or, for host-side tests of `cocoon-agent serve`,
//! through plain Unix sockets ([`Endpoint::Unix`]).
//!
//! Everything the agent sends is untrusted: reply lines are length-bounded and parsed,
//! never unwrapped, and every wait has a deadline.

use cocoon_agent_protocol::api;
use cocoon_agent_protocol::stdio::{parse_reply, StdioHeader};
use cocoon_agent_protocol::{ReadyLine, AGENT_PORT, PROTOCOL_VERSION, READY_PORT, STDIO_PORT};
use std::io::{Read, Write};
use std::os::fd::{AsFd, IntoRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sys;

pub use api::{
    AddStorageRequest, CopyFileRequest, Event, HelloResponse, Rootfs, SetupNetworkRequest,
    SetupSandboxRequest, SetupSandboxResponse, StatsContainerResponse, Stdio, WaitProcessResponse,
};
pub use cocoon_agent_protocol::stdio::Stream;
pub use ttrpc::Code;

/// Per-call timeout when the caller has no better idea.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest stdio reply line we read (`err <reason>`): generous, but bounded.
const MAX_STDIO_REPLY: usize = 4096;
/// Longest ready line we read.
const MAX_READY_LINE: usize = 256;

/// Why talking to the agent failed. Every variant names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VMM closed the stream or answered something else than `OK <port>`: usually
    /// nothing listens on that guest port (yet).
    #[error("vsock handshake with guest port {port} via {path}: {reason}")]
    Handshake {
        path: PathBuf,
        port: u32,
        reason: String,
    },
    /// The agent answered the call with a non-OK ttrpc status.
    #[error("{call}: agent says {code:?}: {message}")]
    Status {
        call: &'static str,
        code: Code,
        message: String,
    },
    #[error("{call}: no answer within {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    /// The ttrpc connection broke or a message could not be coded.
    #[error("{call}: ttrpc transport: {message}")]
    Transport { call: &'static str, message: String },
    #[error("agent speaks protocol version {agent}, this host speaks {host}")]
    ProtocolVersion { agent: u32, host: u32 },
    #[error("stdio stream `{header}`: agent refused: {reason}")]
    StdioRefused { header: String, reason: String },
    #[error("ready report on {path}: {reason}")]
    Ready { path: PathBuf, reason: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    /// The ttrpc status code, when the agent answered with one.
    pub fn code(&self) -> Option<Code> {
        match self {
            AgentError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The agent did not answer at all: the call timed out or its connection broke
    /// (as opposed to an answer that says no).
    pub fn is_no_answer(&self) -> bool {
        matches!(
            self,
            AgentError::Timeout { .. } | AgentError::Transport { .. }
        )
    }

    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }

    /// Sorts a ttrpc error into status, timeout or transport.
    fn from_ttrpc(call: &'static str, timeout: Duration, e: ttrpc::Error) -> AgentError {
        match e {
            ttrpc::Error::RpcStatus(s) => AgentError::Status {
                call,
                code: s.code(),
                message: s.message().to_string(),
            },
            // ttrpc 0.10 reports its client-side deadline only as text.
            ttrpc::Error::Others(m) if m.contains("Receiver timeout") => {
                AgentError::Timeout { call, timeout }
            }
            other => AgentError::Transport {
                call,
                message: other.to_string(),
            },
        }
    }
}

/// How to reach the agent's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The VMM's hybrid vsock socket (`cocoon-vmm --vsock PATH`).
    Vsock(PathBuf),
    /// Plain Unix sockets of `cocoon-agent serve --agent unix:.. --stdio unix:..`.
    Unix { agent: PathBuf, stdio: PathBuf },
}

impl Endpoint {
    /// A connected stream to guest port `port` (only [`AGENT_PORT`] and [`STDIO_PORT`] for
    /// Unix endpoints), with no timeouts left set on it.
    pub fn connect(&self, port: u32, timeout: Duration) -> Result<UnixStream> {
        match self {
            Endpoint::Vsock(path) => vsock_connect(path, port, timeout),
            Endpoint::Unix { agent, stdio } => {
                let path = match port {
                    AGENT_PORT => agent,
                    STDIO_PORT => stdio,
                    other => {
                        return Err(AgentError::Handshake {
                            path: agent.clone(),
                            port: other,
                            reason: "a Unix endpoint has only the agent and stdio ports".into(),
                        })
                    }
                };
                UnixStream::connect(path).map_err(|source| AgentError::Connect {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
}

/// `<vsock socket>_<port>`: where guest connections to host port `port` arrive.
pub fn vsock_host_port_path(vsock: &Path, port: u32) -> PathBuf {
    let mut p = vsock.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects to guest port `port` through the VMM's hybrid vsock socket at `path`.
pub fn vsock_connect(path: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    let (s, host_port) = vmm_api::vsock::connect(path, port, timeout).map_err(|e| match e {
        vmm_api::vsock::VsockError::Connect { path, source } => {
            AgentError::Connect { path, source }
        }
        vmm_api::vsock::VsockError::Handshake { path, port, reason } => {
            AgentError::Handshake { path, port, reason }
        }
    })?;
    tracing::debug!(path = %path.display(), port, host_port, "vsock connected");
    Ok(s)
}

enum Line {
    Complete(Vec<u8>),
    Eof,
    TooLong,
}

/// Reads one `\n`-terminated line byte by byte: whatever follows the newline belongs to
/// the stream's next user (ttrpc, the process output), so nothing may be read ahead.
fn read_line(s: &mut impl Read, max: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(Line::Eof),
            Ok(_) if b[0] == b'\n' => return Ok(Line::Complete(line)),
            Ok(_) if line.len() + 1 >= max => return Ok(Line::TooLong),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn set_timeouts(s: &UnixStream, t: Option<Duration>) -> std::io::Result<()> {
    s.set_read_timeout(t)?;
    s.set_write_timeout(t)
}

/// A ttrpc connection to the agent. Clones share the connection and may call
/// concurrently (a blocking `WaitProcess` does not hold up other calls).
#[derive(Clone)]
pub struct AgentClient {
    inner: api::AgentClient,
    endpoint: Endpoint,
    timeout: Duration,
    in_flight: Arc<InFlight>,
}

/// The calls waiting for an answer on one connection (shared by its clones): when the
/// agent falls silent, which request was it given last.
#[derive(Default)]
struct InFlight {
    next: AtomicU64,
    calls: Mutex<Vec<(u64, &'static str, Instant)>>,
}

impl InFlight {
    fn calls(&self) -> MutexGuard<'_, Vec<(u64, &'static str, Instant)>> {
        // Plain values: a panicked holder leaves nothing half-updated.
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes its call from [`InFlight`] when the call returns.
struct InFlightGuard<'a>(&'a InFlight, u64);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.calls().retain(|(id, _, _)| *id != self.1);
    }
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Builds the proto's `(container_id, exec_id)` request.
fn process_request(container_id: &str, exec_id: &str) -> api::ProcessRequest {
    api::ProcessRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    }
}

fn container_request(container_id: &str) -> api::ContainerRequest {
    api::ContainerRequest {
        container_id: container_id.to_string(),
        ..Default::default()
    }
}

impl AgentClient {
    /// Connects to the agent's ttrpc port. `timeout` bounds the handshake and, by default,
    /// every call.
    pub fn connect(endpoint: Endpoint, timeout: Duration) -> Result<Self> {
        let stream = endpoint.connect(AGENT_PORT, timeout)?;
        // ttrpc takes the descriptor over and closes it with the last clone.
        let client =
            ttrpc::Client::new(stream.into_raw_fd()).map_err(|e| AgentError::Transport {
                call: "connect",
                message: e.to_string(),
            })?;
        Ok(AgentClient {
            inner: api::AgentClient::new(client),
            endpoint,
            timeout,
            in_flight: Arc::default(),
        })
    }

    /// Connects and says hello (checks the protocol version) in one go.
    pub fn connect_checked(endpoint: Endpoint, timeout: Duration) -> Result<(Self, HelloResponse)> {
        let client = Self::connect(endpoint, timeout)?;
        let hello = client.hello()?;
        Ok((client, hello))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The calls on this connection still waiting for an answer, oldest first, with how
    /// long each has waited.
    pub fn in_flight(&self) -> Vec<(&'static str, Duration)> {
        let now = Instant::now();
        self.in_flight
            .calls()
            .iter()
            .map(|(_, name, at)| (*name, now.saturating_duration_since(*at)))
            .collect()
    }

    /// The same connection with another default per-call timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        AgentClient {
            timeout,
            ..self.clone()
        }
    }

    fn call<T>(
        &self,
        name: &'static str,
        timeout: Option<Duration>,
        f: impl FnOnce(&api::AgentClient, ttrpc::context::Context) -> ttrpc::Result<T>,
    ) -> Result<T> {
        // `None`: no deadline (calls that block by design, like WaitProcess).
        let ctx = match timeout {
            Some(t) => ttrpc::context::with_duration(t),
            None => ttrpc::context::Context::default(),
        };
        let started = Instant::now();
        let id = self.in_flight.next.fetch_add(1, Ordering::Relaxed);
        self.in_flight.calls().push((id, name, started));
        let _guard = InFlightGuard(&self.in_flight, id);
        let result = f(&self.inner, ctx)
            .map_err(|e| AgentError::from_ttrpc(name, timeout.unwrap_or_default(), e));
        tracing::trace!(call = name, elapsed = ?started.elapsed(), ok = result.is_ok(), "agent call");
        result
    }

    /// Protocol version and agent facts; fails when the agent speaks another version.
    pub fn hello(&self) -> Result<HelloResponse> {
        let r = self.call("Hello", Some(self.timeout), |c, ctx| {
            c.hello(ctx, &api::HelloRequest::default())
        })?;
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(AgentError::ProtocolVersion {
                agent: r.protocol_version,
                host: PROTOCOL_VERSION,
            });
        }
        tracing::debug!(agent_version = %r.agent_version, uptime_ms = r.uptime_ms, "agent hello");
        Ok(r)
    }

    pub fn setup_sandbox(&self, req: &SetupSandboxRequest) -> Result<SetupSandboxResponse> {
        self.call("SetupSandbox", Some(self.timeout), |c, ctx| {
            c.setup_sandbox(ctx, req)
        })
    }

    pub fn setup_network(&self, req: &SetupNetworkRequest) -> Result<()> {
        self.call("SetupNetwork", Some(self.timeout), |c, ctx| {
            c.setup_network(ctx, req)
        })
        .map(drop)
    }

    /// Mounts the disk with virtio serial `req.serial`; returns the guest's device path.
    /// The call's deadline covers the agent's own wait for the disk to appear.
    pub fn add_storage(&self, req: &AddStorageRequest) -> Result<String> {
        let wait = Duration::from_millis(u64::from(if req.timeout_ms == 0 {
            5000
        } else {
            req.timeout_ms
        }));
        self.call("AddStorage", Some(self.timeout + wait), |c, ctx| {
            c.add_storage(ctx, req)
        })
        .map(|r| r.device)
    }

    pub fn remove_storage(&self, mount_point: &str) -> Result<()> {
        let req = api::RemoveStorageRequest {
            mount_point: mount_point.to_string(),
            ..Default::default()
        };
        self.call("RemoveStorage", Some(self.timeout), |c, ctx| {
            c.remove_storage(ctx, &req)
        })
        .map(drop)
    }

    pub fn copy_file(&self, req: &CopyFileRequest) -> Result<()> {
        self.call("CopyFile", Some(self.timeout), |c, ctx| {
            c.copy_file(ctx, req)
        })
        .map(drop)
    }

    /// Creates a container from an OCI spec (JSON); `rootfs` = `None` uses the spec's
    /// `root.path` as is. Returns the init process's guest pid.
    pub fn create_container(
        &self,
        container_id: &str,
        spec_json: &[u8],
        rootfs: Option<Rootfs>,
        stdio: Stdio,
    ) -> Result<u32> {
        let req = api::CreateContainerRequest {
            container_id: container_id.to_string(),
            spec_json: spec_json.to_vec(),
            rootfs: rootfs.into(),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.call("CreateContainer", Some(self.timeout), |c, ctx| {
            c.create_container(ctx, &req)
        })
        .map(|r| r.pid)
    }

    pub fn start_container(&self, container_id: &str) -> Result<u32> {
        let req = container_request(container_id);
        self.call("StartContainer", Some(self.timeout), |c, ctx| {
            c.start_container(ctx, &req)
        })
        .map(|r| r.pid)
    }

    /// Starts a process (OCI `process` object as JSON) in a running container.
    pub fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: Stdio,
    ) -> Result<u32> {
        let req = api::ExecProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            process_json: process_json.to_vec(),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.call("ExecProcess", Some(self.timeout), |c, ctx| {
            c.exec_process(ctx, &req)
        })
        .map(|r| r.pid)
    }

    pub fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let req = api::SignalProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        self.call("SignalProcess", Some(self.timeout), |c, ctx| {
            c.signal_process(ctx, &req)
        })
        .map(drop)
    }

    /// Waits for the process to exit; `timeout` = `None` waits as long as it takes.
    pub fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
        timeout: Option<Duration>,
    ) -> Result<WaitProcessResponse> {
        let req = process_request(container_id, exec_id);
        self.call("WaitProcess", timeout, |c, ctx| c.wait_process(ctx, &req))
    }

    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let req = process_request(container_id, exec_id);
        self.call("CloseStdin", Some(self.timeout), |c, ctx| {
            c.close_stdin(ctx, &req)
        })
        .map(drop)
    }

    pub fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<()> {
        let req = api::ResizeTtyRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            rows,
            cols,
            ..Default::default()
        };
        self.call("ResizeTty", Some(self.timeout), |c, ctx| {
            c.resize_tty(ctx, &req)
        })
        .map(drop)
    }

    pub fn list_processes(&self, container_id: &str) -> Result<Vec<u32>> {
        let req = container_request(container_id);
        self.call("ListProcesses", Some(self.timeout), |c, ctx| {
            c.list_processes(ctx, &req)
        })
        .map(|r| r.pids)
    }

    pub fn stats_container(&self, container_id: &str) -> Result<StatsContainerResponse> {
        let req = container_request(container_id);
        self.call("StatsContainer", Some(self.timeout), |c, ctx| {
            c.stats_container(ctx, &req)
        })
    }

    pub fn pause_container(&self, container_id: &str) -> Result<()> {
        let req = container_request(container_id);
        self.call("PauseContainer", Some(self.timeout), |c, ctx| {
            c.pause_container(ctx, &req)
        })
        .map(drop)
    }

    pub fn resume_container(&self, container_id: &str) -> Result<()> {
        let req = container_request(container_id);
        self.call("ResumeContainer", Some(self.timeout), |c, ctx| {
            c.resume_container(ctx, &req)
        })
        .map(drop)
    }

    /// Updates the container's resources (OCI `LinuxResources` as JSON).
    pub fn update_container(&self, container_id: &str, resources_json: &[u8]) -> Result<()> {
        let req = api::UpdateContainerRequest {
            container_id: container_id.to_string(),
            resources_json: resources_json.to_vec(),
            ..Default::default()
        };
        self.call("UpdateContainer", Some(self.timeout), |c, ctx| {
            c.update_container(ctx, &req)
        })
        .map(drop)
    }

    pub fn remove_container(&self, container_id: &str) -> Result<()> {
        let req = container_request(container_id);
        self.call("RemoveContainer", Some(self.timeout), |c, ctx| {
            c.remove_container(ctx, &req)
        })
        .map(drop)
    }

    /// Events (exits, OOM kills) that arrive within `wait`; empty when none did.
    pub fn get_events(&self, wait: Duration) -> Result<Vec<Event>> {
        let req = api::GetEventsRequest {
            timeout_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        self.call("GetEvents", Some(self.timeout + wait), |c, ctx| {
            c.get_events(ctx, &req)
        })
        .map(|r| r.events)
    }

    /// Asks the agent to flush filesystems and power the VM off. The connection usually
    /// dies with the VM before an answer arrives, so a transport error here is success.
    pub fn shutdown(&self) -> Result<()> {
        match self.call("Shutdown", Some(self.timeout), |c, ctx| {
            c.shutdown(ctx, &api::Empty::default())
        }) {
            Ok(_) | Err(AgentError::Transport { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens one stdio stream of a process (port [`STDIO_PORT`]): for stdout/stderr read
    /// it to EOF; for stdin write and close (or shut down writing) to close its stdin.
    pub fn open_stdio(&self, header: &StdioHeader) -> Result<UnixStream> {
        open_stdio(&self.endpoint, header, self.timeout)
    }
}

/// [`AgentClient::open_stdio`] without a ttrpc connection.
pub fn open_stdio(
    endpoint: &Endpoint,
    header: &StdioHeader,
    timeout: Duration,
) -> Result<UnixStream> {
    let text = header.to_string();
    let what = text.trim_end().to_string();
    let mut s = endpoint.connect(STDIO_PORT, timeout)?;
    set_timeouts(&s, Some(timeout))
        .map_err(AgentError::io(format!("stdio `{what}`: set timeout")))?;
    s.write_all(text.as_bytes())
        .map_err(AgentError::io(format!("stdio `{what}`: send header")))?;
    let reply = match read_line(&mut s, MAX_STDIO_REPLY) {
        Ok(Line::Complete(l)) => l,
        Ok(Line::Eof) => {
            return Err(AgentError::StdioRefused {
                header: what,
                reason: "closed without a reply".into(),
            })
        }
        Ok(Line::TooLong) => {
            return Err(AgentError::StdioRefused {
                header: what,
                reason: format!("reply longer than {MAX_STDIO_REPLY} bytes"),
            })
        }
        Err(e) => return Err(AgentError::io(format!("stdio `{what}`: read reply"))(e)),
    };
    parse_reply(&reply).map_err(|reason| AgentError::StdioRefused {
        header: what.clone(),
        reason,
    })?;
    set_timeouts(&s, None).map_err(AgentError::io(format!("stdio `{what}`: clear timeout")))?;
    Ok(s)
}

/// How often [`ReadyListener::wait_while`] asks whether the guest is still there.
const LIVENESS_POLL: Duration = Duration::from_millis(200);

/// The listener the agent reports ready to: `<vsock socket>_1026`, bound before the VMM
/// starts (the guest's connect fails at once when nothing listens). Removed on drop.
#[derive(Debug)]
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Binds `<vsock>_<READY_PORT>` for a VM started with `--vsock <vsock>`.
    pub fn for_vsock(vsock: &Path) -> Result<Self> {
        Self::bind(&vsock_host_port_path(vsock, READY_PORT))
    }

    /// Binds a plain path (host tests: `cocoon-agent serve --ready unix:<path>`). A stale
    /// socket file there is replaced; any other file is an error.
    pub fn bind(path: &Path) -> Result<Self> {
        let fail = |reason: String| AgentError::Ready {
            path: path.to_path_buf(),
            reason,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(|e| fail(format!("remove stale socket: {e}")))?
            }
            Ok(_) => return Err(fail("exists and is not a socket".into())),
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|e| fail(format!("bind: {e}")))?;
        // Non-blocking: accept after poll must not hang if the peer already went away.
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(format!("set non-blocking: {e}")))?;
        Ok(ReadyListener {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for the agent to connect and send its ready line.
    pub fn wait(&self, timeout: Duration) -> Result<ReadyLine> {
        self.wait_while(timeout, || Ok(()))
    }

    /// [`ReadyListener::wait`], giving up early when `alive` (asked a few times a second)
    /// says why the guest can no longer report, e.g. "the VMM exited with status 1".
    pub fn wait_while(
        &self,
        timeout: Duration,
        mut alive: impl FnMut() -> std::result::Result<(), String>,
    ) -> Result<ReadyLine> {
        let deadline = Instant::now() + timeout;
        let fail = |reason: String| AgentError::Ready {
            path: self.path.clone(),
            reason,
        };
        let mut conn = loop {
            match self.listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(fail(format!("the agent did not report within {timeout:?}")));
                    }
                    alive().map_err(|why| fail(format!("no report: {why}")))?;
                    // A timeout or an interrupted poll: the loop checks the deadline.
                    let wait = left.min(LIVENESS_POLL).max(Duration::from_millis(1));
                    match sys::poll_readable(self.listener.as_fd(), Some(wait)) {
                        Err(e) if e.kind() != std::io::ErrorKind::Interrupted => {
                            return Err(fail(format!("poll: {e}")));
                        }
                        _ => {}
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(format!("accept: {e}"))),
            }
        };
        // Accepted sockets do not inherit O_NONBLOCK on Linux; the read is bounded by the
        // time left.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        conn.set_read_timeout(Some(left))
            .map_err(|e| fail(format!("set timeout: {e}")))?;
        let line = match read_line(&mut conn, MAX_READY_LINE) {
            Ok(Line::Complete(l)) => l,
            Ok(Line::Eof) => return Err(fail("closed before a full line".into())),
            Ok(Line::TooLong) => return Err(fail("line too long".into())),
            Err(e) if is_timeout(&e) => {
                return Err(fail(format!("no full line within {timeout:?}")))
            }
            Err(e) => return Err(fail(format!("read: {e}"))),
        };
        let text = String::from_utf8_lossy(&line);
        let ready = ReadyLine::parse(&text).map_err(|e| fail(format!("{e}: {text:?}")))?;
        tracing::debug!(path = %self.path.display(), uptime_ms = ready.uptime_ms, "agent ready");
        Ok(ready)
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_agent_protocol::stdio::Stream;
    use std::sync::Arc;
    use std::thread;

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    /// A fake VMM vsock socket: accepts one connection, checks the CONNECT line and
    /// answers with `reply` (None: close at once; Some("") : never answer).
    fn fake_vmm(path: &Path, reply: Option<&'static [u8]>) -> thread::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(path).expect("bind fake vmm");
        thread::spawn(move || {
            let (mut c, _) = listener.accept().expect("accept");
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while c.read(&mut b).expect("read CONNECT") == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            match reply {
                None => {}
                Some(b"") => thread::sleep(Duration::from_millis(800)),
                Some(r) => {
                    c.write_all(r).expect("write reply");
                    thread::sleep(Duration::from_millis(200));
                }
            }
            line
        })
    }

    #[test]
    fn vsock_handshake_leaves_guest_data_in_the_stream() {
        let dir = tempdir();
        let sock = dir.path().join("v.sock");
        let server = fake_vmm(&sock, Some(b"OK 1073741824\nguest-data"));
        let mut s = vsock_connect(&sock, 1024, Duration::from_secs(5)).expect("handshake");
        let mut buf = [0u8; 10];
        s.read_exact(&mut buf).expect("guest data");
        assert_eq!(&buf, b"guest-data");
        assert_eq!(server.join().expect("server"), b"CONNECT 1024");
    }

    #[test]
    fn vsock_handshake_errors_name_the_port() {
        let dir = tempdir();
        for (i, (reply, want)) in [
            (None, "closed without OK"),
            (Some(&b"NO\n"[..]), "expected `OK <port>`"),
            (Some(&b"OK x\n"[..]), "expected `OK <port>`"),
            (Some(&[b'O'; 100][..]), "too long"),
        ]
        .into_iter()
        .enumerate()
        {
            let sock = dir.path().join(format!("v{i}.sock"));
            let server = fake_vmm(&sock, reply);
            let err = vsock_connect(&sock, 1025, Duration::from_secs(5)).expect_err("must fail");
            let text = err.to_string();
            assert!(
                matches!(err, AgentError::Handshake { port: 1025, .. }) && text.contains(want),
                "{text}"
            );
            server.join().expect("server");
        }
    }

    #[test]
    fn vsock_handshake_times_out() {
        let dir = tempdir();
        let sock = dir.path().join("v.sock");
        let server = fake_vmm(&sock, Some(b""));
        let started = Instant::now();
        let err = vsock_connect(&sock, 1024, Duration::from_millis(200)).expect_err("timeout");
        assert!(err.to_string().contains("no OK within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        server.join().expect("server");
    }

    #[test]
    fn connect_to_missing_socket_names_the_path() {
        let dir = tempdir();
        let sock = dir.path().join("absent.sock");
        let err = vsock_connect(&sock, 1024, Duration::from_secs(1)).expect_err("no socket");
        assert!(matches!(err, AgentError::Connect { .. }));
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }

    fn header(container: &str, stream: Stream) -> StdioHeader {
        StdioHeader {
            container_id: container.into(),
            exec_id: String::new(),
            stream,
        }
    }

    /// A fake stdio port: reads a header line, answers `reply`, then sends `data`.
    fn fake_stdio(
        path: &Path,
        reply: &'static str,
        data: &'static str,
    ) -> thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).expect("bind fake stdio");
        thread::spawn(move || {
            let (mut c, _) = listener.accept().expect("accept");
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while c.read(&mut b).expect("read header") == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            c.write_all(reply.as_bytes()).expect("reply");
            c.write_all(data.as_bytes()).expect("data");
            String::from_utf8_lossy(&line).into_owned()
        })
    }

    #[test]
    fn stdio_stream_opens_and_refusals_carry_the_reason() {
        let dir = tempdir();
        let endpoint = Endpoint::Unix {
            agent: dir.path().join("agent.sock"),
            stdio: dir.path().join("stdio.sock"),
        };
        let server = fake_stdio(&dir.path().join("stdio.sock"), "ok\n", "hello\n");
        let mut s = open_stdio(
            &endpoint,
            &header("c1", Stream::Stdout),
            Duration::from_secs(5),
        )
        .expect("open stdout");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read output");
        assert_eq!(out, "hello\n");
        assert_eq!(server.join().expect("server"), "stdio v1 c1 - stdout");

        std::fs::remove_file(dir.path().join("stdio.sock")).expect("rm");
        let server = fake_stdio(
            &dir.path().join("stdio.sock"),
            "err no such container\n",
            "",
        );
        let err = open_stdio(
            &endpoint,
            &header("nope", Stream::Stderr),
            Duration::from_secs(5),
        )
        .expect_err("refused");
        match &err {
            AgentError::StdioRefused { header, reason } => {
                assert_eq!(header, "stdio v1 nope - stderr");
                assert_eq!(reason, "no such container");
            }
            other => panic!("wrong error {other:?}"),
        }
        server.join().expect("server");
    }

    #[test]
    fn unix_endpoint_has_only_agent_and_stdio_ports() {
        let e = Endpoint::Unix {
            agent: "/nonexistent/a".into(),
            stdio: "/nonexistent/s".into(),
        };
        assert!(matches!(
            e.connect(READY_PORT, Duration::from_secs(1)),
            Err(AgentError::Handshake {
                port: READY_PORT,
                ..
            })
        ));
    }

    #[test]
    fn ready_listener_reads_the_line_and_cleans_up() {
        let dir = tempdir();
        let vsock = dir.path().join("vm.sock");
        let listener = ReadyListener::for_vsock(&vsock).expect("bind");
        assert_eq!(listener.path(), dir.path().join("vm.sock_1026"));
        let path = listener.path().to_path_buf();
        let agent = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            let mut c = UnixStream::connect(&path).expect("connect");
            c.write_all(b"cocoon-agent ready uptime_ms=42\n")
                .expect("write");
        });
        let ready = listener.wait(Duration::from_secs(5)).expect("ready");
        assert_eq!(ready.uptime_ms, 42);
        agent.join().expect("agent thread");
        let path = listener.path().to_path_buf();
        drop(listener);
        assert!(!path.exists(), "ready socket left behind");
    }

    #[test]
    fn ready_wait_ends_early_when_the_guest_is_gone() {
        let dir = tempdir();
        let listener = ReadyListener::for_vsock(&dir.path().join("vm.sock")).expect("bind");
        let t = std::time::Instant::now();
        let mut asked = 0;
        let e = listener
            .wait_while(Duration::from_secs(30), || {
                asked += 1;
                if asked < 3 {
                    Ok(())
                } else {
                    Err("the VMM exited with status 1".into())
                }
            })
            .expect_err("no agent");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(e.to_string().contains("VMM exited with status 1"), "{e}");
    }

    #[test]
    fn ready_listener_times_out_and_rejects_garbage() {
        let dir = tempdir();
        let listener = ReadyListener::bind(&dir.path().join("r.sock")).expect("bind");
        let started = Instant::now();
        let err = listener
            .wait(Duration::from_millis(150))
            .expect_err("timeout");
        assert!(err.to_string().contains("did not report"), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(150));

        let path = listener.path().to_path_buf();
        let agent = thread::spawn(move || {
            let mut c = UnixStream::connect(&path).expect("connect");
            c.write_all(b"hello\n").expect("write");
        });
        let err = listener.wait(Duration::from_secs(5)).expect_err("garbage");
        assert!(
            err.to_string().contains("not a cocoon-agent ready line"),
            "{err}"
        );
        agent.join().expect("agent thread");

        // A rebind replaces a stale socket but never another file.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).expect("bind stale"));
        assert!(ReadyListener::bind(&stale).is_ok());
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write file");
        assert!(ReadyListener::bind(&file).is_err());
    }

    /// A ttrpc server with a few canned answers, to check the client's error mapping.
    struct FakeAgent {
        version: u32,
    }

    impl api::Agent for FakeAgent {
        fn hello(
            &self,
            _ctx: &ttrpc::TtrpcContext,
            _: api::HelloRequest,
        ) -> ttrpc::Result<HelloResponse> {
            Ok(HelloResponse {
                protocol_version: self.version,
                agent_version: "fake".into(),
                ..Default::default()
            })
        }

        fn wait_process(
            &self,
            _ctx: &ttrpc::TtrpcContext,
            req: api::ProcessRequest,
        ) -> ttrpc::Result<WaitProcessResponse> {
            if req.container_id == "slow" {
                thread::sleep(Duration::from_millis(500));
            }
            Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::NOT_FOUND,
                format!("container {:?} not found", req.container_id),
            )))
        }
    }

    fn fake_agent(path: &Path, version: u32) -> ttrpc::Server {
        let service = api::create_agent(Arc::new(FakeAgent { version }));
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", path.display()))
            .expect("bind fake agent")
            .register_service(service);
        server.start().expect("start fake agent");
        server
    }

    #[test]
    fn client_checks_version_and_maps_status_and_timeouts() {
        let dir = tempdir();
        let agent = dir.path().join("agent.sock");
        let server = fake_agent(&agent, PROTOCOL_VERSION);
        let endpoint = Endpoint::Unix {
            agent: agent.clone(),
            stdio: dir.path().join("stdio.sock"),
        };
        let (client, hello) =
            AgentClient::connect_checked(endpoint.clone(), Duration::from_secs(5)).expect("hello");
        assert_eq!(hello.agent_version, "fake");
        let err = client.wait_process("c9", "", None).expect_err("not found");
        assert_eq!(err.code(), Some(Code::NOT_FOUND), "{err}");
        assert!(err.to_string().contains("WaitProcess") && err.to_string().contains("c9"));
        let err = client
            .wait_process("slow", "", Some(Duration::from_millis(100)))
            .expect_err("timeout");
        assert!(
            matches!(
                err,
                AgentError::Timeout {
                    call: "WaitProcess",
                    ..
                }
            ),
            "{err}"
        );
        drop(client);
        server.shutdown();

        let agent2 = dir.path().join("agent2.sock");
        let server = fake_agent(&agent2, PROTOCOL_VERSION + 1);
        let endpoint = Endpoint::Unix {
            agent: agent2,
            stdio: dir.path().join("stdio.sock"),
        };
        let err = AgentClient::connect_checked(endpoint, Duration::from_secs(5))
            .expect_err("version mismatch");
        assert!(matches!(err, AgentError::ProtocolVersion { .. }), "{err}");
        server.shutdown();
    }
}
