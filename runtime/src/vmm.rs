//! Starting and supervising a sandbox's `cocoon-vmm` process, its control socket, and
//! the allocation of its block drive slots.
//!
//! One `cocoon-vmm` runs per pod ([`start`]). It is started
//! - inside the pod's network namespace (`setns` in the child between fork and exec), so
//!   the VMM and its TAP live where the CNI veth is;
//! - with the TAP fd the runtime opened there ([`crate::podnet`]) inherited under the same
//!   number (`--net fd=N,mac=<veth MAC>`);
//! - with N empty drive slots; container disks are swapped in later over the control
//!   socket, since Linux has no virtio-mmio hotplug (see docs/vmm.md);
//! - in a session and process group of its own (`setsid`), with stdin closed and
//!   stdout/stderr appended to the sandbox's `vmm.log`, so signals and terminals of the
//!   shim don't reach it;
//! - **without** `PR_SET_PDEATHSIG`: the VM is the pod, and it must survive a restart or
//!   crash of the shim (a new shim finds it again through the pid file). Ending it is
//!   explicit: [`VmmProcess::shutdown`] or [`VmmProcess::kill`], also by a new shim
//!   process after a restart.
//!
//! The pid file (`<sandbox dir>/vmm.pid`) holds the pid and the process start time
//! (`/proc/<pid>/stat` field 22). Before signalling a VMM found through it, the runtime
//! opens a pidfd for the pid, then checks that the process has that start time and that
//! its command line carries this sandbox's `--control-socket`. The signal goes through the
//! pidfd, so a reused pid is never killed, not even in a race.
//!
//! The control socket speaks one JSON object per line each way (docs/vmm.md; the types
//! and the client are `vmm-api`'s): swap, eject, pause, resume, stats, shutdown.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vmm_api::control::{ControlClient, ControlError, Reply, Request, Stats};

use crate::config::{Config, VmSize};
use crate::error::{chain, tail, Error, Result};
use crate::sys;

/// The longest path a Unix socket address takes (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;
/// The longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`); longer ones are cut by the VMM.
pub const MAX_SERIAL_LEN: usize = 20;
/// How long [`start`] waits for the VMM's control socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a control request may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything needed to start one sandbox's VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmSpec {
    pub sandbox_id: String,
    /// The `cocoon-vmm` binary.
    pub vmm_binary: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// Appended to the guest kernel command line (empty: nothing).
    pub cmdline_extra: String,
    /// Empty drive slots to create (filled later with [`VmmProcess::swap`]).
    pub drive_slots: u32,
    /// Host side of the guest's vsock (docs/vsock.md).
    pub vsock_socket: PathBuf,
    /// Guest vsock CID; `None`: the VMM's default (3).
    pub vsock_cid: Option<u32>,
    pub control_socket: PathBuf,
    /// The guest serial console.
    pub console_log: PathBuf,
    /// The VMM's own log, and its stdout/stderr.
    pub vmm_log: PathBuf,
    /// Where the pid and start time are recorded.
    pub pid_file: PathBuf,
    /// The open TAP for the guest NIC, inherited by the VMM under this number.
    pub tap_fd: Option<RawFd>,
    /// The guest NIC's MAC (the CNI veth's).
    pub guest_mac: Option<String>,
    /// The pod's network namespace, which the VMM is started in.
    pub netns: Option<PathBuf>,
}

impl VmmSpec {
    /// A spec with the standard file layout of the sandbox directory
    /// (`<state_dir>/<sandbox id>/{vsock.sock,control.sock,console.log,vmm.log,vmm.pid}`),
    /// without network (set `tap_fd`, `guest_mac`, `netns` for that).
    pub fn for_sandbox(config: &Config, sandbox_id: &str, size: VmSize) -> Result<VmmSpec> {
        let ok = !sandbox_id.is_empty()
            && sandbox_id.len() <= 128
            && sandbox_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !sandbox_id.starts_with('.');
        if !ok {
            return Err(Error::Vmm {
                sandbox_id: sandbox_id.into(),
                message: "sandbox id must be 1..128 of [A-Za-z0-9._-], not starting with '.'"
                    .into(),
            });
        }
        let dir = config.sandbox_dir(sandbox_id);
        Ok(VmmSpec {
            sandbox_id: sandbox_id.into(),
            vmm_binary: config.vmm.clone(),
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            kernel: config.kernel.clone(),
            initramfs: Some(config.initramfs.clone()),
            cmdline_extra: config.kernel_cmdline.clone(),
            drive_slots: config.drive_slots,
            vsock_socket: dir.join("vsock.sock"),
            vsock_cid: None,
            control_socket: dir.join("control.sock"),
            console_log: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            pid_file: dir.join("vmm.pid"),
            tap_fd: None,
            guest_mac: None,
            netns: None,
        })
    }

    /// The `cocoon-vmm` arguments (without the program).
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: OsString| {
            args.push(flag.into());
            args.push(value);
        };
        push("--kernel", self.kernel.clone().into());
        if let Some(initramfs) = &self.initramfs {
            push("--initramfs", initramfs.clone().into());
        }
        if !self.cmdline_extra.trim().is_empty() {
            push("--cmdline", self.cmdline_extra.trim().into());
        }
        push("--vcpus", self.vcpus.to_string().into());
        push("--memory-mib", self.memory_mib.to_string().into());
        push("--serial", self.console_log.clone().into());
        for _ in 0..self.drive_slots {
            push("--drive", "empty".into());
        }
        let mut vsock: OsString = self.vsock_socket.clone().into();
        if let Some(cid) = self.vsock_cid {
            vsock.push(format!(",cid={cid}"));
        }
        push("--vsock", vsock);
        if let Some(fd) = self.tap_fd {
            let mut net = format!("fd={fd}");
            if let Some(mac) = &self.guest_mac {
                net.push_str(&format!(",mac={mac}"));
            }
            push("--net", net.into());
        }
        push("--control-socket", self.control_socket.clone().into());
        push("--log", self.vmm_log.clone().into());
        args
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Vmm {
            sandbox_id: self.sandbox_id.clone(),
            message: message.into(),
        }
    }

    /// Checks what would otherwise fail later with a less clear message.
    fn check(&self) -> Result<()> {
        for (what, path) in [
            ("VMM binary", &self.vmm_binary),
            ("guest kernel", &self.kernel),
        ]
        .into_iter()
        .chain(self.initramfs.iter().map(|p| ("guest initramfs", p)))
        {
            if !path.is_file() {
                return Err(self.err(format!("{what} {} does not exist", path.display())));
            }
        }
        // Guest-initiated vsock connections go to `<path>_<port>`: up to 11 more bytes.
        for (path, extra) in [(&self.control_socket, 0), (&self.vsock_socket, 11)] {
            if path.as_os_str().len() + extra > SUN_PATH_MAX {
                return Err(self.err(format!(
                    "socket path {} is too long for a Unix socket ({} bytes at most)",
                    path.display(),
                    SUN_PATH_MAX - extra
                )));
            }
        }
        if let Some(fd) = self.tap_fd {
            if fd <= 2 {
                return Err(self.err(format!("TAP fd {fd} would be taken by stdio")));
            }
        }
        Ok(())
    }
}

/// A running (or once running) VMM.
#[derive(Debug)]
pub struct VmmProcess {
    sandbox_id: String,
    pid: u32,
    start_time: u64,
    control_socket: PathBuf,
    pid_file: PathBuf,
    /// Set when this process spawned the VMM (and so must reap it).
    child: Option<Child>,
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

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Vmm {
            sandbox_id: self.sandbox_id.clone(),
            message: message.into(),
        }
    }

    fn control_err(&self, request: &Request, e: ControlError) -> Error {
        self.err(format!("control request {request:?}: {e}"))
    }

    /// Sends one control request on a new connection and returns the VMM's reply; a
    /// refusal becomes an error carrying the VMM's message.
    pub fn control(&self, request: &Request) -> Result<Reply> {
        ControlClient::connect(&self.control_socket, CONTROL_TIMEOUT)
            .and_then(|mut c| c.request(request))
            .map_err(|e| self.control_err(request, e))
    }

    /// Puts `path` into drive slot `slot` with the virtio-blk serial `serial`.
    pub fn swap(&self, slot: u32, path: &Path, read_only: bool, serial: &str) -> Result<()> {
        if path.to_str().is_none() {
            return Err(self.err(format!("disk path {} is not UTF-8", path.display())));
        }
        self.control(&Request::Swap {
            slot: slot as usize,
            path: path.into(),
            read_only,
            serial: Some(serial.into()),
        })?;
        debug!(sandbox = %self.sandbox_id, slot, disk = %path.display(), serial, "drive swapped in");
        Ok(())
    }

    /// Empties drive slot `slot`.
    pub fn eject(&self, slot: u32) -> Result<()> {
        self.control(&Request::Eject {
            slot: slot as usize,
        })?;
        debug!(sandbox = %self.sandbox_id, slot, "drive ejected");
        Ok(())
    }

    pub fn pause(&self) -> Result<()> {
        self.control(&Request::Pause {}).map(drop)
    }

    pub fn resume(&self) -> Result<()> {
        self.control(&Request::Resume {}).map(drop)
    }

    /// The VMM's stats (vcpus, memory, RSS, slots; see docs/vmm.md).
    pub fn stats(&self) -> Result<Stats> {
        let request = Request::Stats {};
        self.control(&request)?
            .stats
            .ok_or_else(|| self.control_err(&request, ControlError::NoStats))
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
fn write_pid_file(path: &Path, pid: u32, start_time: u64) -> Result<()> {
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
fn proc_start_time(pid: u32) -> Option<u64> {
    proc_stat_fields(pid)?.get(19)?.parse().ok()
}

/// The process state letter (field 3).
fn proc_state(pid: u32) -> Option<char> {
    proc_stat_fields(pid)?.first()?.chars().next()
}

/// Whether `pid` is the VMM started at `start_time` with this control socket.
fn is_our_vmm(pid: u32, start_time: u64, control_socket: &Path) -> bool {
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

/// Which container disk sits in which drive slot of a VM, by virtio-blk serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    serials: Vec<Option<String>>,
}

impl Slots {
    /// `count` empty slots.
    pub fn new(count: u32) -> Slots {
        Slots {
            serials: vec![None; count as usize],
        }
    }

    /// Rebuilds the table from the VMM's `stats` (after a shim restart): a slot with a
    /// non-empty serial is in use.
    pub fn from_stats(stats: &Stats, count: u32) -> Result<Slots> {
        let mut slots = Slots::new(count);
        for entry in stats.slots.iter().filter(|e| !e.serial.is_empty()) {
            let cell = slots.serials.get_mut(entry.slot).ok_or_else(|| {
                Error::Slots(format!("slot {} is beyond {count} slots", entry.slot))
            })?;
            *cell = Some(entry.serial.clone());
        }
        Ok(slots)
    }

    /// Takes the lowest free slot for `serial` (1..=20 printable ASCII bytes, unique in
    /// the VM).
    pub fn allocate(&mut self, serial: &str) -> Result<u32> {
        if serial.is_empty()
            || serial.len() > MAX_SERIAL_LEN
            || !serial.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Error::Slots(format!(
                "serial {serial:?} must be 1..={MAX_SERIAL_LEN} printable ASCII characters"
            )));
        }
        if let Some(slot) = self.slot_of(serial) {
            return Err(Error::Slots(format!(
                "serial {serial:?} is already in slot {slot}"
            )));
        }
        let total = self.serials.len();
        let (index, cell) = self
            .serials
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.is_none())
            .ok_or_else(|| {
                Error::Slots(format!(
                    "all {total} drive slots are in use: too many containers for this pod \
                     (each takes 2; raise drive_slots in /etc/cocoon/config.toml)"
                ))
            })?;
        *cell = Some(serial.to_string());
        // The slot count came from a u32.
        Ok(index as u32)
    }

    /// Frees the slot holding `serial`; returns it.
    pub fn release(&mut self, serial: &str) -> Option<u32> {
        let slot = self.slot_of(serial)?;
        self.serials[slot as usize] = None;
        Some(slot)
    }

    /// The slot holding `serial`.
    pub fn slot_of(&self, serial: &str) -> Option<u32> {
        self.serials
            .iter()
            .position(|s| s.as_deref() == Some(serial))
            .map(|i| i as u32)
    }

    /// How many slots are free.
    pub fn free(&self) -> usize {
        self.serials.iter().filter(|s| s.is_none()).count()
    }

    /// The used slots and their serials, in slot order.
    pub fn used(&self) -> impl Iterator<Item = (u32, &str)> {
        self.serials
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_deref().map(|s| (i as u32, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn spec(dir: &Path) -> VmmSpec {
        let config = Config {
            state_dir: dir.to_path_buf(),
            drive_slots: 2,
            kernel_cmdline: " quiet ".into(),
            ..Config::default()
        };
        VmmSpec::for_sandbox(
            &config,
            "sb1",
            VmSize {
                vcpus: 2,
                memory_mib: 512,
            },
        )
        .expect("spec")
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn arguments_for_a_full_spec() {
        let mut s = spec(Path::new("/run/cocoon"));
        s.tap_fd = Some(7);
        s.guest_mac = Some("7e:1a:0e:e2:1f:69".into());
        s.vsock_cid = Some(9);
        assert_eq!(
            strings(&s.args()),
            [
                "--kernel",
                "/usr/local/share/cocoon/vmlinux",
                "--initramfs",
                "/usr/local/share/cocoon/initramfs.cpio",
                "--cmdline",
                "quiet",
                "--vcpus",
                "2",
                "--memory-mib",
                "512",
                "--serial",
                "/run/cocoon/sb1/console.log",
                "--drive",
                "empty",
                "--drive",
                "empty",
                "--vsock",
                "/run/cocoon/sb1/vsock.sock,cid=9",
                "--net",
                "fd=7,mac=7e:1a:0e:e2:1f:69",
                "--control-socket",
                "/run/cocoon/sb1/control.sock",
                "--log",
                "/run/cocoon/sb1/vmm.log",
            ]
        );
    }

    #[test]
    fn arguments_for_a_minimal_spec() {
        let mut s = spec(Path::new("/run/cocoon"));
        s.initramfs = None;
        s.cmdline_extra.clear();
        s.drive_slots = 0;
        let args = strings(&s.args());
        for absent in ["--initramfs", "--cmdline", "--drive", "--net"] {
            assert!(!args.iter().any(|a| a == absent), "{absent}: {args:?}");
        }
        assert!(args
            .windows(2)
            .any(|w| w == ["--vsock", "/run/cocoon/sb1/vsock.sock"]));
    }

    #[test]
    fn bad_specs_are_named() {
        let config = Config::default();
        let size = VmSize {
            vcpus: 1,
            memory_mib: 256,
        };
        for id in ["", "../x", "a/b", ".hidden"] {
            let e = VmmSpec::for_sandbox(&config, id, size).expect_err(id);
            assert!(e.to_string().contains("sandbox id"), "{e}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec(dir.path());
        // Not the defaults: this host may have Cocoon installed there.
        s.vmm_binary = dir.path().join("no-vmm");
        s.kernel = dir.path().join("no-vmlinux");
        let e = start(&s).expect_err("no binary").to_string();
        assert!(e.contains("VMM binary") && e.contains("sb1"), "{e}");
        s.vmm_binary = "/bin/sh".into();
        let e = start(&s).expect_err("no kernel").to_string();
        assert!(
            e.contains(&format!("guest kernel {}", s.kernel.display())),
            "{e}"
        );
        s.kernel = "/bin/sh".into();
        s.initramfs = None;
        s.vsock_socket = dir.path().join("x".repeat(100));
        let e = start(&s).expect_err("long").to_string();
        assert!(e.contains("too long for a Unix socket"), "{e}");
    }

    #[test]
    fn slots_allocate_lowest_free_and_say_when_full() {
        let mut slots = Slots::new(3);
        assert_eq!(slots.allocate("img-a").ok(), Some(0));
        assert_eq!(slots.allocate("rw-a").ok(), Some(1));
        assert!(slots.allocate("img-a").is_err(), "duplicate serial");
        assert_eq!(slots.allocate("img-b").ok(), Some(2));
        let e = slots.allocate("rw-b").expect_err("full").to_string();
        assert!(e.contains("all 3 drive slots are in use"), "{e}");
        assert_eq!(slots.release("rw-a"), Some(1));
        assert_eq!(slots.release("rw-a"), None);
        assert_eq!(slots.free(), 1);
        assert_eq!(slots.allocate("rw-b").ok(), Some(1));
        assert_eq!(slots.slot_of("img-b"), Some(2));
        assert_eq!(
            slots.used().collect::<Vec<_>>(),
            [(0, "img-a"), (1, "rw-b"), (2, "img-b")]
        );
        for bad in ["", "a serial with spaces", "x23456789012345678901"] {
            assert!(Slots::new(1).allocate(bad).is_err(), "{bad:?}");
        }
    }

    fn stats_with(slots: &[(usize, &str)]) -> Stats {
        Stats {
            vcpus: 1,
            memory_mib: 256,
            paused: false,
            vmm_rss_kib: 0,
            guest_touched_kib: 0,
            free_page_reported_kib: 0,
            free_page_reports: 0,
            slots: slots
                .iter()
                .map(|&(slot, serial)| vmm_api::SlotStats {
                    slot,
                    serial: serial.into(),
                    read_only: false,
                    capacity_sectors: if serial.is_empty() { 0 } else { 8 },
                })
                .collect(),
        }
    }

    #[test]
    fn slots_come_back_from_stats() {
        let stats = stats_with(&[(0, "img-a"), (1, ""), (2, "rw-a")]);
        let slots = Slots::from_stats(&stats, 4).expect("stats");
        assert_eq!(
            slots.used().collect::<Vec<_>>(),
            [(0, "img-a"), (2, "rw-a")]
        );
        assert_eq!(slots.free(), 2);
        assert_eq!(
            Slots::from_stats(&stats_with(&[]), 4)
                .map(|s| s.free())
                .ok(),
            Some(4)
        );
        let e = Slots::from_stats(&stats_with(&[(9, "x")]), 4).expect_err("beyond");
        assert!(e.to_string().contains("slot 9 is beyond 4 slots"), "{e}");
    }

    /// A stand-in for cocoon-vmm (Python): records what it was given and where it runs,
    /// and answers control requests from a script of exact request and reply lines (see
    /// [`fake_script`]), so that it knows nothing of the protocol; it exits after the
    /// script's last request. `FAIL` in the kernel path makes it exit 2 at once, like a
    /// configuration error.
    const FAKE_VMM: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys
args = sys.argv[1:]
def val(flag):
    return args[args.index(flag) + 1]
if "FAIL" in val("--kernel"):
    print("cocoon-vmm: kernel FAIL: not an ELF file", file=sys.stderr)
    sys.exit(2)
with open(sys.argv[0] + ".script") as f:
    script = json.load(f)
ctl = val("--control-socket")
facts = {"args": args, "netns": os.readlink("/proc/self/ns/net"),
         "sid": os.getsid(0) == os.getpid()}
if "--net" in args:
    fd = int(val("--net").split(",")[0].split("=")[1])
    facts["tap"] = os.readlink("/proc/self/fd/%d" % fd)
with open(ctl + ".facts", "w") as f:
    json.dump(facts, f)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(ctl + ".tmp")
s.listen(4)
os.rename(ctl + ".tmp", ctl)
while True:
    c, _ = s.accept()
    line = c.makefile().readline().rstrip("\n")
    c.sendall((script["replies"].get(line, script["refusal"]) + "\n").encode())
    c.close()
    if line == script["exit_after"]:
        os.unlink(ctl)
        sys.exit(0)
"#;

    /// What the stand-in answers: the exact lines of the requests the tests send.
    #[derive(serde::Serialize)]
    struct FakeScript {
        replies: std::collections::BTreeMap<String, String>,
        refusal: String,
        exit_after: String,
    }

    fn fake_script() -> FakeScript {
        fn line(v: &impl serde::Serialize) -> String {
            serde_json::to_string(v).expect("json")
        }
        let ok = Reply::ok();
        let pairs: [(Request, Reply); 4] = [
            (
                Request::Swap {
                    slot: 0,
                    path: "/tmp/x.img".into(),
                    read_only: true,
                    serial: Some("img".into()),
                },
                ok.clone(),
            ),
            (Request::Eject { slot: 0 }, ok.clone()),
            (Request::Stats {}, Reply::stats(stats_with(&[(0, "img")]))),
            (Request::Shutdown {}, ok),
        ];
        FakeScript {
            replies: pairs.iter().map(|(q, r)| (line(q), line(r))).collect(),
            refusal: line(&Reply::error("the stand-in has no reply to this request")),
            exit_after: line(&Request::Shutdown {}),
        }
    }

    fn fake_spec(dir: &Path) -> VmmSpec {
        let vmm = dir.join("fake-vmm");
        fs::write(&vmm, FAKE_VMM).expect("write fake");
        let script = serde_json::to_string(&fake_script()).expect("script");
        fs::write(dir.join("fake-vmm.script"), script).expect("write script");
        fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let kernel = dir.join("vmlinux");
        fs::write(&kernel, b"x").expect("kernel");
        let mut s = spec(dir);
        s.vmm_binary = vmm;
        s.kernel = kernel;
        s.initramfs = None;
        s
    }

    fn python_available() -> bool {
        Command::new("python3")
            .arg("-c")
            .arg("")
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn start_in_netns_with_tap_control_and_shutdown() {
        if !python_available() {
            eprintln!("skipped: python3 (for the stand-in VMM) is missing");
            return;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let ns = format!(
            "cocoon-rt-vmm-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        struct DelNs(String);
        impl Drop for DelNs {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns add {ns} && ip link add eth0 netns {ns} type veth peer name p0 netns {ns}"
            ))
            .status()
            .is_ok_and(|s| s.success());
        let _del = DelNs(ns.clone());
        assert!(ok, "netns setup");
        let netns = PathBuf::from(format!("/var/run/netns/{ns}"));
        let pod = crate::podnet::setup(&netns).expect("podnet").expect("eth0");

        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = fake_spec(dir.path());
        let tap = pod.tap_fd.as_ref().expect("tap");
        s.tap_fd = Some(tap.as_raw_fd());
        s.guest_mac = Some(pod.mac.clone());
        s.netns = Some(netns.clone());
        let mut vmm = start(&s).expect("start");
        assert!(vmm.is_alive());
        drop(pod); // the VMM holds the TAP now

        let facts: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(dir.path().join("sb1/control.sock.facts")).expect("facts"),
        )
        .expect("json");
        let ns_ino = fs::metadata(&netns).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let want = format!("net:[{}]", ns_ino.expect("ino"));
        assert_eq!(facts["netns"], want);
        assert_eq!(facts["tap"], "/dev/net/tun");
        assert_eq!(facts["sid"], true);

        // Control requests.
        vmm.swap(0, Path::new("/tmp/x.img"), true, "img")
            .expect("swap");
        vmm.eject(0).expect("eject");
        let stats = vmm.stats().expect("stats");
        assert_eq!(
            Slots::from_stats(&stats, 2).expect("slots").slot_of("img"),
            Some(0)
        );
        let e = vmm.resume().expect_err("refused").to_string();
        assert!(e.contains("has no reply") && e.contains("sb1"), "{e}");

        // A second start for the same sandbox is refused while this one runs.
        let e = start(&s).expect_err("twice").to_string();
        assert!(e.contains("already running"), "{e}");

        // A new shim finds it through the pid file.
        let found = VmmProcess::from_pid_file("sb1", &s.pid_file, &s.control_socket)
            .expect("pid file")
            .expect("found");
        assert_eq!(found.pid(), vmm.pid());

        vmm.shutdown(Duration::from_secs(5)).expect("shutdown");
        assert!(!vmm.is_alive());
        assert!(!s.pid_file.exists());
        // The TAP went with the VMM.
        let links = Command::new("ip")
            .args(["-n", &ns, "link", "show"])
            .output()
            .expect("ip");
        assert!(!String::from_utf8_lossy(&links.stdout).contains(crate::podnet::TAP_NAME));
        crate::podnet::teardown(&netns).expect("teardown");
    }

    #[test]
    fn failed_start_reports_the_log_and_leaves_no_pid_file() {
        if !python_available() {
            eprintln!("skipped: python3 (for the stand-in VMM) is missing");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = fake_spec(dir.path());
        let bad = dir.path().join("FAIL-vmlinux");
        fs::write(&bad, b"x").expect("kernel");
        s.kernel = bad;
        let e = start(&s).expect_err("fails").to_string();
        assert!(
            e.contains("exit status: 2") && e.contains("not an ELF file"),
            "{e}"
        );
        assert!(!s.pid_file.exists());
    }

    #[test]
    fn kill_by_pid_file_from_a_new_process_view() {
        if !python_available() {
            eprintln!("skipped: python3 (for the stand-in VMM) is missing");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let s = fake_spec(dir.path());
        let mut vmm = start(&s).expect("start");
        // As a restarted shim: no Child handle, only the pid file.
        let mut found = VmmProcess::from_pid_file("sb1", &s.pid_file, &s.control_socket)
            .expect("read")
            .expect("alive");
        assert!(found.child.is_none() && found.is_alive());
        // The spawning handle still reaps it (pidfd wait sees the exit either way).
        let reaper = std::thread::spawn(move || {
            let _ = vmm.wait_exit(Duration::from_secs(10));
            vmm
        });
        found.kill().expect("kill");
        assert!(!found.is_alive());
        assert!(!s.pid_file.exists());
        let mut vmm = reaper.join().expect("join");
        assert!(!vmm.is_alive());
        found.kill().expect("kill again is fine");
    }

    #[test]
    fn pid_files_never_name_a_stranger() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("vmm.pid");
        let ctl = dir.path().join("control.sock");
        // A live process that is not a VMM of this sandbox (no --control-socket <ctl>).
        let mut stranger = Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = stranger.id();
        let start_time = proc_start_time(pid).expect("start time");
        write_pid_file(&pid_file, pid, start_time).expect("write");
        let found = VmmProcess::from_pid_file("sb1", &pid_file, &ctl).expect("read");
        // Same command line but a different start time: a reused pid.
        let mut lookalike = Command::new("sh")
            .args(["-c", "sleep 30; :", "sh", "--control-socket"])
            .arg(&ctl)
            .spawn()
            .expect("sh");
        let lpid = lookalike.id();
        let lstart = proc_start_time(lpid).expect("start");
        std::thread::sleep(Duration::from_millis(50));
        assert!(is_our_vmm(lpid, lstart, &ctl), "the real one matches");
        write_pid_file(&pid_file, lpid, lstart + 1).expect("write");
        let reused = VmmProcess::from_pid_file("sb1", &pid_file, &ctl).expect("read");
        // A VmmProcess with a stale identity refuses to kill.
        let mut stale = VmmProcess {
            sandbox_id: "sb1".into(),
            pid: lpid,
            start_time: lstart + 1,
            control_socket: ctl.clone(),
            pid_file: pid_file.clone(),
            child: None,
        };
        stale.kill().expect("kill is a no-op");
        let lookalike_alive = lookalike.try_wait().expect("try_wait").is_none();
        let stranger_alive = stranger.try_wait().expect("try_wait").is_none();
        let _ = stranger.kill();
        let _ = lookalike.kill();
        let _ = stranger.wait();
        let _ = lookalike.wait();
        assert!(found.is_none(), "a stranger was taken for the VMM");
        assert!(reused.is_none(), "a reused pid was taken for the VMM");
        assert!(lookalike_alive && stranger_alive, "a stranger was killed");
        // Garbage and missing pid files are "no VMM".
        fs::write(&pid_file, "garbage").expect("write");
        assert!(VmmProcess::from_pid_file("sb1", &pid_file, &ctl)
            .expect("read")
            .is_none());
        fs::remove_file(&pid_file).expect("rm");
        assert!(VmmProcess::from_pid_file("sb1", &pid_file, &ctl)
            .expect("read")
            .is_none());
    }

    #[test]
    fn proc_stat_parsing() {
        let me = std::process::id();
        assert!(proc_state(me).is_some());
        assert!(proc_start_time(me).is_some());
        assert!(proc_start_time(u32::MAX).is_none());
    }
}
