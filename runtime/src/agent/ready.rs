//! The ready report: the agent connects to host port 1026 and sends one line.

use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_agent_protocol::{ReadyLine, READY_PORT};

use vmm_api::vsock::host_port_path;

use super::{is_timeout, read_line, AgentError, Line, Result};
use crate::sys;

/// Longest ready line we read.
const MAX_READY_LINE: usize = 256;

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
        Self::bind(&host_port_path(vsock, READY_PORT))
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
