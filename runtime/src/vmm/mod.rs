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

mod control;
mod process;
mod slots;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{Config, VmSize};
use crate::error::{Error, Result};

pub use process::{start, VmmProcess};
pub use slots::Slots;

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
