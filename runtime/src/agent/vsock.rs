//! Reaching the agent's ports: the VMM's hybrid vsock socket or plain Unix sockets.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cocoon_agent_protocol::{AGENT_PORT, STDIO_PORT};

use super::{AgentError, Result};

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
