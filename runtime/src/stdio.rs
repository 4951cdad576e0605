//! A process's standard streams: containerd's FIFOs (or files) on the host side, the
//! agent's stdio connections (vsock port 1025) on the guest side, one copy thread per
//! stream.
//!
//! - Output FIFOs are opened read-write, so the open never blocks and a containerd that
//!   restarts (closing its read end for a while) does not make our writes fail: the
//!   process just blocks on a full pipe until someone reads again.
//! - The stdin FIFO is opened read-only in its copy thread (blocking until containerd
//!   opens its write end); its EOF, or `CloseIO`, shuts our side of the agent stream,
//!   which closes the process's stdin.
//! - Paths may also be `file://` URIs or plain files (appended to); `binary://` loggers
//!   are not supported.
//!
//! [`ProcessIo::wait_output`] waits until stdout and stderr reached EOF: the exit event
//! is published only after it, so `crictl logs` has all the output.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cocoon_agent_protocol::stdio::StdioHeader;
use tracing::{debug, warn};

use crate::agent::{AgentClient, Stdio, Stream};

/// The stdio of a task as containerd gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("stdio {what} {path:?}: {reason}")]
    Path {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
}

impl StdioPaths {
    /// What the agent must prepare. With a terminal, stderr is merged into stdout.
    pub fn agent_stdio(&self) -> Stdio {
        Stdio {
            terminal: self.terminal,
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            ..Default::default()
        }
    }

    /// Checks the paths before anything is created (a clear error up front).
    pub fn check(&self) -> Result<(), StdioError> {
        for (what, p) in [
            ("stdin", &self.stdin),
            ("stdout", &self.stdout),
            ("stderr", &self.stderr),
        ] {
            if !p.is_empty() {
                host_path(what, p)?;
            }
        }
        Ok(())
    }
}

/// The host path of a stdio URI.
fn host_path(what: &'static str, uri: &str) -> Result<PathBuf, StdioError> {
    let err = |reason: &str| StdioError::Path {
        what,
        path: uri.to_string(),
        reason: reason.to_string(),
    };
    let path = if let Some(p) = uri.strip_prefix("file://") {
        p
    } else if let Some(p) = uri.strip_prefix("fifo://") {
        p
    } else if uri.contains("://") {
        return Err(err(
            "only FIFOs and files are supported (binary:// loggers are not)",
        ));
    } else {
        uri
    };
    if !path.starts_with('/') {
        return Err(err("not an absolute path"));
    }
    Ok(PathBuf::from(path))
}

/// Opens an output path: FIFOs read-write (never blocks), files for appending.
fn open_output(path: &Path) -> io::Result<File> {
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    if is_fifo {
        OpenOptions::new().read(true).write(true).open(path)
    } else {
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
    }
}

/// Counts copy threads still running.
#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    done: Condvar,
}

impl Pending {
    fn add(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c += 1;
        }
    }

    fn finish(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c = c.saturating_sub(1);
        }
        self.done.notify_all();
    }

    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut c) = self.count.lock() else {
            return false;
        };
        while *c > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.done.wait_timeout(c, left) {
                Ok((g, _)) => c = g,
                Err(_) => return false,
            }
        }
        true
    }
}

/// The host side of one process's streams.
pub struct ProcessIo {
    /// Our handle on the agent's stdin stream, to close it on `CloseIO`.
    stdin: Mutex<Option<UnixStream>>,
    stdin_path: Option<PathBuf>,
    output: Arc<Pending>,
}

impl ProcessIo {
    /// A process without streams.
    pub fn none() -> ProcessIo {
        ProcessIo {
            stdin: Mutex::new(None),
            stdin_path: None,
            output: Arc::new(Pending::default()),
        }
    }

    /// Connects the process's streams (as asked in `paths`) to the agent's and starts
    /// the copy threads. Call right after the agent created the process.
    pub fn attach(
        agent: &AgentClient,
        container_id: &str,
        exec_id: &str,
        paths: &StdioPaths,
    ) -> Result<ProcessIo, StdioError> {
        let header = |stream| StdioHeader {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stream,
        };
        let label = if exec_id.is_empty() {
            container_id.to_string()
        } else {
            format!("{container_id}/{exec_id}")
        };
        let io = ProcessIo::none();
        let outputs = [
            ("stdout", &paths.stdout, Stream::Stdout),
            ("stderr", &paths.stderr, Stream::Stderr),
        ];
        for (what, uri, stream) in outputs {
            if uri.is_empty() || (paths.terminal && stream == Stream::Stderr) {
                continue;
            }
            let path = host_path(what, uri)?;
            let file = open_output(&path).map_err(|e| StdioError::Path {
                what,
                path: uri.clone(),
                reason: e.to_string(),
            })?;
            let conn = agent.open_stdio(&header(stream))?;
            io.output.add();
            let pending = io.output.clone();
            let label = label.clone();
            thread::Builder::new()
                .name(format!("{what}-{label}"))
                .spawn(move || {
                    copy_output(conn, file, &label, what);
                    pending.finish();
                })
                .map_err(|e| StdioError::Path {
                    what,
                    path: uri.clone(),
                    reason: format!("starting copy thread: {e}"),
                })?;
        }
        let mut stdin_path = None;
        if !paths.stdin.is_empty() {
            let path = host_path("stdin", &paths.stdin)?;
            let conn = agent.open_stdio(&header(Stream::Stdin))?;
            let ours = conn.try_clone().map_err(|e| StdioError::Path {
                what: "stdin",
                path: paths.stdin.clone(),
                reason: e.to_string(),
            })?;
            if let Ok(mut s) = io.stdin.lock() {
                *s = Some(ours);
            }
            let p = path.clone();
            let label = label.clone();
            thread::Builder::new()
                .name(format!("stdin-{label}"))
                .spawn(move || copy_stdin(&p, conn, &label))
                .map_err(|e| StdioError::Path {
                    what: "stdin",
                    path: paths.stdin.clone(),
                    reason: format!("starting copy thread: {e}"),
                })?;
            stdin_path = Some(path);
        }
        Ok(ProcessIo { stdin_path, ..io })
    }

    /// Closes the process's stdin (containerd's `CloseIO`).
    pub fn close_stdin(&self) {
        if let Ok(mut s) = self.stdin.lock() {
            if let Some(s) = s.take() {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }

    /// Waits up to `timeout` until stdout and stderr reached EOF; false on timeout (a
    /// process that left children holding its output open).
    pub fn wait_output(&self, timeout: Duration) -> bool {
        self.output.wait(timeout)
    }

    /// Ends the stdin copy thread if it still waits for containerd to open the FIFO.
    pub fn release(&self) {
        self.close_stdin();
        if let Some(path) = &self.stdin_path {
            // A blocked read-only open returns once a writer appears; this one closes at
            // once, so the thread reads EOF (unless containerd still writes).
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path);
        }
    }
}

fn copy_output(mut from: UnixStream, mut to: File, label: &str, what: &str) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!(process = label, stream = what, error = %e, "agent stream ended");
                break;
            }
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            warn!(process = label, stream = what, error = %e, "writing output: dropping the rest");
            // Keep draining so the process does not block on a full pipe forever.
            continue;
        }
        total += n as u64;
    }
    debug!(
        process = label,
        stream = what,
        bytes = total,
        "output copied to EOF"
    );
}

fn copy_stdin(path: &Path, mut to: UnixStream, label: &str) {
    let mut from = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            warn!(process = label, path = %path.display(), error = %e, "opening stdin");
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    debug!(process = label, "stdin closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_stdio_follows_the_paths() {
        let p = StdioPaths {
            stdin: "/run/x/stdin".into(),
            stdout: "/run/x/stdout".into(),
            stderr: "/run/x/stderr".into(),
            terminal: true,
        };
        let s = p.agent_stdio();
        assert!(s.terminal && s.stdin && s.stdout && !s.stderr);
        let s = StdioPaths {
            terminal: false,
            stdin: String::new(),
            ..p
        }
        .agent_stdio();
        assert!(!s.terminal && !s.stdin && s.stdout && s.stderr);
    }

    #[test]
    fn uris() {
        assert_eq!(
            host_path("stdout", "file:///var/log/x").expect("file"),
            PathBuf::from("/var/log/x")
        );
        assert!(host_path("stdout", "binary:///usr/bin/logger?x=1")
            .expect_err("binary")
            .to_string()
            .contains("binary://"));
        assert!(host_path("stdout", "relative").is_err());
        let paths = StdioPaths {
            stdout: "binary:///x".into(),
            ..Default::default()
        };
        assert!(paths.check().is_err());
        assert!(StdioPaths::default().check().is_ok());
    }

    #[test]
    fn output_fifo_opens_without_a_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("out");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("cstr");
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut f = open_output(&fifo).expect("open");
        f.write_all(b"x").expect("write");
    }

    #[test]
    fn pending_counts_down() {
        let p = Arc::new(Pending::default());
        assert!(p.wait(Duration::from_millis(1)));
        p.add();
        assert!(!p.wait(Duration::from_millis(20)));
        let q = p.clone();
        let t = thread::spawn(move || q.finish());
        assert!(p.wait(Duration::from_secs(5)));
        t.join().expect("join");
    }
}
