//! The VMM process: started in the pod's network namespace, found again through its pid
//! file, shut down or killed through a pidfd.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vmm_api::control::Request;

use super::{VmmSpec, START_TIMEOUT};
use crate::error::{chain, tail, Error, Result};
use crate::sys;

/// A running (or once running) VMM.
#[derive(Debug)]
pub struct VmmProcess {
    pub(super) sandbox_id: String,
    pub(super) pid: u32,
    pub(super) start_time: u64,
    pub(super) control_socket: PathBuf,
    pub(super) pid_file: PathBuf,
    /// Set when this process spawned the VMM (and so must reap it).
    pub(super) child: Option<Child>,
}

/// Starts the VMM of `spec` and waits until its control socket is up. On failure the
/// VMM is gone again and the error carries the end of its log.
pub fn start(spec: &VmmSpec) -> Result<VmmProcess> {
    spec.check()?;
    if let Some(old) =
        VmmProcess::from_pid_file(&spec.sandbox_id, &spec.pid_file, &spec.control_socket)?
    {
        return Err(spec.err(format!("a VMM is already running (pid {})", old.pid)));
    }
    if let Some(dir) = spec.pid_file.parent() {
        fs::create_dir_all(dir).map_err(Error::io("creating sandbox directory", dir))?;
    }
    remove_if_socket(&spec.control_socket)?;

    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.vmm_log)
        .map_err(Error::io("opening VMM log", &spec.vmm_log))?;
    let log2 = log
        .try_clone()
        .map_err(Error::io("opening VMM log", &spec.vmm_log))?;
    let netns = match &spec.netns {
        Some(path) => Some(File::open(path).map_err(Error::io("opening network namespace", path))?),
        None => None,
    };
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let tap_fd = spec.tap_fd;

    let mut cmd = Command::new(&spec.vmm_binary);
    cmd.args(spec.args())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setsid, setns, fcntl) on fds that are open in the
    // child (`netns` and the caller's TAP fd live until after spawn returns); it
    // allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(fd) = tap_fd {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        spec.err(format!(
            "starting {} (in netns {:?}): {e}",
            spec.vmm_binary.display(),
            spec.netns
        ))
    })?;
    drop(netns);
    let pid = child.id();
    let start_time = proc_start_time(pid).unwrap_or(0);
    let mut vmm = VmmProcess {
        sandbox_id: spec.sandbox_id.clone(),
        pid,
        start_time,
        control_socket: spec.control_socket.clone(),
        pid_file: spec.pid_file.clone(),
        child: Some(child),
    };
    if let Err(e) = write_pid_file(&spec.pid_file, pid, start_time) {
        let _ = vmm.kill();
        return Err(e);
    }
    info!(sandbox = %spec.sandbox_id, pid, vcpus = spec.vcpus, memory_mib = spec.memory_mib,
        slots = spec.drive_slots, "VMM started");

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = vmm.try_exit_status() {
            let _ = fs::remove_file(&spec.pid_file);
            return Err(spec.err(format!(
                "cocoon-vmm exited at start ({status}): {}",
                log_tail(&spec.vmm_log)
            )));
        }
        if is_socket(&spec.control_socket) {
            debug!(sandbox = %spec.sandbox_id, pid, "VMM control socket up");
            return Ok(vmm);
        }
        if Instant::now() > deadline {
            let _ = vmm.kill();
            return Err(spec.err(format!(
                "control socket {} did not appear within {:?}: {}",
                spec.control_socket.display(),
                START_TIMEOUT,
                log_tail(&spec.vmm_log)
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl VmmProcess {
    /// The VMM recorded in `pid_file`, if that process still runs and is this sandbox's
    /// VMM (same start time, `--control-socket <control_socket>` on its command line).
    /// For a shim that restarted and must find (or clean up) its VMM.
    pub fn from_pid_file(
        sandbox_id: &str,
        pid_file: &Path,
        control_socket: &Path,
    ) -> Result<Option<VmmProcess>> {
        let text = match fs::read_to_string(pid_file) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading pid file", pid_file)(e)),
        };
        let mut parts = text.split_whitespace();
        let (Some(Ok(pid)), Some(Ok(start_time))) = (
            parts.next().map(str::parse::<u32>),
            parts.next().map(str::parse::<u64>),
        ) else {
            warn!(sandbox = %sandbox_id, pid_file = %pid_file.display(), "unreadable pid file");
            return Ok(None);
        };
        if !is_our_vmm(pid, start_time, control_socket) || proc_state(pid) == Some('Z') {
            debug!(sandbox = %sandbox_id, pid, "VMM of the pid file is gone");
            return Ok(None);
        }
        Ok(Some(VmmProcess {
            sandbox_id: sandbox_id.into(),
            pid,
            start_time,
            control_socket: control_socket.into(),
            pid_file: pid_file.into(),
            child: None,
        }))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub(super) fn err(&self, message: impl Into<String>) -> Error {
        Error::Vmm {
            sandbox_id: self.sandbox_id.clone(),
            message: message.into(),
        }
    }

    /// Asks the VMM to stop (it flushes writable disks and exits 0) and waits up to
    /// `timeout`; kills it if it does not answer or does not exit in time.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        if !self.is_alive() {
            let _ = fs::remove_file(&self.pid_file);
            return Ok(());
        }
        match self.control(&Request::Shutdown {}) {
            Ok(_) => {
                if self.wait_exit(timeout)? {
                    info!(sandbox = %self.sandbox_id, pid = self.pid, "VMM shut down");
                    let _ = fs::remove_file(&self.pid_file);
                    return Ok(());
                }
                warn!(sandbox = %self.sandbox_id, pid = self.pid, "VMM did not exit: killing");
            }
            Err(e) => {
                warn!(sandbox = %self.sandbox_id, pid = self.pid, error = %chain(&e),
                    "VMM shutdown request failed: killing");
            }
        }
        self.kill()
    }

    /// SIGKILLs the VMM (if it is still ours and alive), waits for it to end (reaps it if
    /// we are its parent) and removes the pid file.
    pub fn kill(&mut self) -> Result<()> {
        if self.try_exit_status().is_some() {
            let _ = fs::remove_file(&self.pid_file);
            return Ok(());
        }
        let pidfd = match sys::pidfd_open(self.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                let _ = fs::remove_file(&self.pid_file);
                return Ok(());
            }
            Err(e) => return Err(self.err(format!("pidfd_open({}): {e}", self.pid))),
        };
        // The pidfd now pins the process the pid names; check it is our VMM.
        if !is_our_vmm(self.pid, self.start_time, &self.control_socket) {
            warn!(sandbox = %self.sandbox_id, pid = self.pid,
                "pid no longer names this sandbox's VMM: not killing");
            let _ = fs::remove_file(&self.pid_file);
            return Ok(());
        }
        match sys::pidfd_send_signal(&pidfd, libc::SIGKILL) {
            Ok(()) => info!(sandbox = %self.sandbox_id, pid = self.pid, "VMM killed"),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(self.err(format!("killing pid {}: {e}", self.pid))),
        }
        if !self.wait_exit(Duration::from_secs(10))? {
            return Err(self.err(format!("pid {} did not end after SIGKILL", self.pid)));
        }
        let _ = fs::remove_file(&self.pid_file);
        Ok(())
    }

    /// Whether the VMM still runs.
    pub fn is_alive(&mut self) -> bool {
        if let Some(child) = &mut self.child {
            match child.try_wait() {
                Ok(Some(_)) => return false,
                Ok(None) => return true,
                Err(_) => {} // reaped by someone else (a shim-wide reaper): ask /proc
            }
        }
        is_our_vmm(self.pid, self.start_time, &self.control_socket)
            && proc_state(self.pid) != Some('Z')
    }

    /// The exit status, if we are the VMM's parent and it has ended.
    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for the VMM to end; true if it has.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        if let Some(child) = &mut self.child {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        debug!(sandbox = %self.sandbox_id, pid = self.pid, %status, "VMM exited");
                        return Ok(true);
                    }
                    Ok(None) => {}
                    // ECHILD: someone else reaped it.
                    Err(_) => break,
                }
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Not our child: a pidfd becomes readable when the process ends.
        let pidfd = match sys::pidfd_open(self.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(true),
            Err(e) => return Err(self.err(format!("pidfd_open({}): {e}", self.pid))),
        };
        if !is_our_vmm(self.pid, self.start_time, &self.control_socket) {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        Ok(
            sys::poll_readable(pidfd.as_fd(), Some(left)).unwrap_or(false)
                || proc_state(self.pid) == Some('Z'),
        )
    }
}

/// Writes `<pid> <start time>` atomically.
pub(super) fn write_pid_file(path: &Path, pid: u32, start_time: u64) -> Result<()> {
    let tmp = path.with_extension("pid.tmp");
    fs::write(&tmp, format!("{pid} {start_time}\n"))
        .map_err(Error::io("writing pid file", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io("writing pid file", path))
}

/// `/proc/<pid>/stat` after the command name (which may contain spaces and parens).
fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The process start time in clock ticks since boot (field 22).
pub(super) fn proc_start_time(pid: u32) -> Option<u64> {
    proc_stat_fields(pid)?.get(19)?.parse().ok()
}

/// The process state letter (field 3).
pub(super) fn proc_state(pid: u32) -> Option<char> {
    proc_stat_fields(pid)?.first()?.chars().next()
}

/// Whether `pid` is the VMM started at `start_time` with this control socket.
pub(super) fn is_our_vmm(pid: u32, start_time: u64, control_socket: &Path) -> bool {
    if pid == 0 || proc_start_time(pid) != Some(start_time) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = control_socket.as_os_str().as_encoded_bytes();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"--control-socket" && w[1] == want)
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Removes a stale socket file at `path` (nothing else).
fn remove_if_socket(path: &Path) -> Result<()> {
    if is_socket(path) {
        fs::remove_file(path).map_err(Error::io("removing stale socket", path))?;
    }
    Ok(())
}

/// The end of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) if !bytes.is_empty() => tail(&String::from_utf8_lossy(&bytes), 1500),
        Ok(_) => format!("{} is empty", path.display()),
        Err(e) => format!("{}: {e}", path.display()),
    }
}
