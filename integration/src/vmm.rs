//! Running `cocoon-vmm` in tests: start it, read the guest console line by line, talk to
//! its control socket, and collect how it ended.

use crate::console::{self, Lines, Next};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_api::control::{ControlClient, ControlError, Reply, Request};

/// The `cocoon-vmm` binary: `$COCOON_VMM`, else the workspace's debug build.
pub fn vmm_binary() -> PathBuf {
    std::env::var_os("COCOON_VMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::paths::repo_root().join("target/debug/cocoon-vmm"))
}

/// Why [`RunningVmm::control`] got no reply.
#[derive(Debug, thiserror::Error)]
pub enum VmControlError {
    #[error("the VMM was started without --control-socket")]
    NoControlSocket,
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A running `cocoon-vmm`.
pub struct RunningVmm {
    child: Child,
    lines: Lines,
    stderr: Option<JoinHandle<String>>,
    /// Console lines read so far.
    pub console: Vec<String>,
    pub started: Instant,
    pub control_socket: Option<PathBuf>,
}

/// How a `cocoon-vmm` run ended.
#[derive(Debug)]
pub struct VmmOutcome {
    /// `None` if it had to be killed at the deadline.
    pub status: Option<ExitStatus>,
    pub console: Vec<String>,
    pub stderr: String,
    pub wall: Duration,
}

impl VmmOutcome {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Console and stderr, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "status {:?}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.console.join("\n"),
            self.stderr
        )
    }
}

/// Starts `cocoon-vmm` with `args` (serial console on stdout).
pub fn start(args: &[String]) -> std::io::Result<RunningVmm> {
    start_with(Command::new(vmm_binary()), args)
}

/// Starts `cocoon-vmm` through `launcher` (e.g. `ip netns exec NS cocoon-vmm`).
pub fn start_in(launcher: &[&str], args: &[String]) -> std::io::Result<RunningVmm> {
    let mut c = Command::new(launcher.first().copied().unwrap_or("env"));
    c.args(launcher.iter().skip(1)).arg(vmm_binary());
    start_with(c, args)
}

fn start_with(mut command: Command, args: &[String]) -> std::io::Result<RunningVmm> {
    let control_socket = args
        .iter()
        .position(|a| a == "--control-socket")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("stdout and stderr were set to piped")
    };
    Ok(RunningVmm {
        child,
        lines: Lines::spawn(out),
        stderr: Some(console::collect(err)),
        console: Vec::new(),
        started: Instant::now(),
        control_socket,
    })
}

/// Runs `cocoon-vmm` with `args` to completion (killed after `timeout`).
pub fn run(args: &[String], timeout: Duration) -> std::io::Result<VmmOutcome> {
    start(args)?.finish(timeout)
}

impl RunningVmm {
    /// Reads console lines until one satisfies `want`; `None` if the VMM ended or the
    /// timeout passed first.
    pub fn wait_for(&mut self, want: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.next_before(deadline) {
                Next::Line(l) => {
                    self.console.push(l.clone());
                    if want(&l) {
                        return Some(l);
                    }
                }
                Next::Deadline | Next::Closed => return None,
            }
        }
    }

    /// Sends one control request and returns the reply; a refusal is
    /// [`ControlError::Refused`].
    pub fn control(&self, request: &Request) -> Result<Reply, VmControlError> {
        let path = self
            .control_socket
            .as_deref()
            .ok_or(VmControlError::NoControlSocket)?;
        Ok(control_request(path, request)?)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the VMM has ended (`None` while it runs).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the VMM to exit, killing it after `timeout`.
    pub fn finish(mut self, timeout: Duration) -> std::io::Result<VmmOutcome> {
        let deadline = Instant::now() + timeout;
        let mut killed = false;
        loop {
            match self.lines.next_before(deadline) {
                Next::Line(l) => self.console.push(l),
                Next::Closed => break,
                Next::Deadline => {
                    killed = true;
                    let _ = self.child.kill();
                    break;
                }
            }
        }
        let status = self.child.wait()?;
        self.console.extend(self.lines.drain());
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Ok(VmmOutcome {
            status: (!killed).then_some(status),
            console: std::mem::take(&mut self.console),
            stderr,
            wall: self.started.elapsed(),
        })
    }
}

impl Drop for RunningVmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request on a control socket, retried briefly while the VMM creates the socket.
pub fn control_request(path: &Path, request: &Request) -> Result<Reply, ControlError> {
    control_request_within(path, request, Duration::from_secs(30))
}

/// [`control_request`], waiting at most `timeout` for the answer.
pub fn control_request_within(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, ControlError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match ControlClient::connect(path, timeout) {
            Ok(c) => break c,
            Err(ControlError::Connect { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    };
    client.request(request)
}
