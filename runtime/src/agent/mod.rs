//! The host side of the guest agent's protocol (`cocoon-agent-protocol`).
//!
//! - [`AgentClient`]: the ttrpc API on guest vsock port [`AGENT_PORT`](cocoon_agent_protocol::AGENT_PORT), with a timeout on
//!   every call and typed helpers.
//! - [`AgentClient::open_stdio`]: one process stream on guest port [`STDIO_PORT`](cocoon_agent_protocol::STDIO_PORT).
//! - [`ReadyListener`]: the host port [`READY_PORT`](cocoon_agent_protocol::READY_PORT) the agent reports ready to.
//!
//! Guest ports are reached through the VMM's hybrid vsock socket (`CONNECT <port>` /
//! `OK <host port>`, docs/vsock.md), or, for host-side tests of `cocoon-agent serve`,
//! through plain Unix sockets ([`Endpoint::Unix`]).
//!
//! Everything the agent sends is untrusted: reply lines are length-bounded and parsed,
//! never unwrapped, and every wait has a deadline.

mod client;
mod ready;
mod stdio;
#[cfg(test)]
mod tests;
mod vsock;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use cocoon_agent_protocol::api;
// The one bounded line reader that never reads ahead (ready line, stdio replies).
use vmm_api::vsock::{read_line, Line};

pub use client::AgentClient;
pub use ready::ReadyListener;
pub use stdio::open_stdio;
pub use vsock::{vsock_connect, Endpoint};

pub use api::{
    AddStorageRequest, CopyFileRequest, Event, HelloResponse, Rootfs, SetupNetworkRequest,
    SetupSandboxRequest, SetupSandboxResponse, StatsContainerResponse, Stdio, WaitProcessResponse,
};
pub use cocoon_agent_protocol::stdio::Stream;
pub use ttrpc::Code;

/// Per-call timeout when the caller has no better idea.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

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
