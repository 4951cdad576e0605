//! The ttrpc client of the agent API: one typed method per call, each with a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cocoon_agent_protocol::api;
use cocoon_agent_protocol::stdio::StdioHeader;
use cocoon_agent_protocol::{AGENT_PORT, PROTOCOL_VERSION};
use std::os::unix::net::UnixStream;

use std::os::fd::IntoRawFd;

use super::{
    open_stdio, AddStorageRequest, AgentError, CopyFileRequest, Endpoint, Event, HelloResponse,
    Result, Rootfs, SetupNetworkRequest, SetupSandboxRequest, SetupSandboxResponse,
    StatsContainerResponse, Stdio, WaitProcessResponse,
};

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
