//! Booting the guest image (`build/vmlinux` + `build/initramfs.cpio`) under QEMU's
//! `microvm` machine: an independent check of the image, with or without KVM.

use crate::console::{self, Lines, Next};
use cocoon_agent_protocol::ReadyLine;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How QEMU runs the guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: works anywhere, slow.
    Tcg,
    /// KVM with the host CPU model: needs a KVM that boots stock kernels.
    Kvm,
}

/// What booting the guest gave.
#[derive(Debug)]
pub struct GuestBoot {
    /// Every console line.
    pub console: Vec<String>,
    /// The agent's ready line, if it came.
    pub ready: Option<ReadyLine>,
    /// Host wall time from starting QEMU to the ready line.
    pub ready_at: Option<Duration>,
    /// QEMU's exit status (`None` when it was killed at the deadline).
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    /// Host wall time from starting QEMU until it exited or was killed.
    pub wall: Duration,
    /// QEMU's own error output.
    pub qemu_stderr: String,
}

impl GuestBoot {
    /// The console as one string, for assertion messages.
    pub fn console_text(&self) -> String {
        self.console.join("\n")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{what} {path} is missing: {hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("cannot start {qemu}: {source}")]
    Spawn {
        qemu: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for QEMU: {0}")]
    Wait(std::io::Error),
}

/// A guest boot to run.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Appended to the base command line (`console=ttyS0 reboot=t panic=-1 quiet`).
    pub cmdline_extra: String,
    pub timeout: Duration,
}

/// The base kernel command line for QEMU boots.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";

impl GuestSpec {
    /// The project's guest image, told to power off once ready (`cocoon.selftest=1`).
    pub fn selftest(accel: Accel) -> Self {
        GuestSpec {
            kernel: crate::paths::guest_vmlinux(),
            initramfs: crate::paths::guest_initramfs(),
            accel,
            memory_mib: 256,
            cpus: 1,
            cmdline_extra: format!("{}=1", cocoon_agent_protocol::SELFTEST_PARAM),
            timeout: Duration::from_secs(120),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(crate::paths::qemu());
        let (accel, cpu) = match self.accel {
            Accel::Tcg => ("tcg", "max"),
            Accel::Kvm => ("kvm", "host"),
        };
        // No ACPI: QEMU 10 loads the initramfs of a PVH (ELF vmlinux) boot over microvm's
        // ACPI tables at the top of RAM, and the guest hangs parsing them.
        c.args(["-M", "microvm,acpi=off", "-accel", accel, "-cpu", cpu])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .arg("-append")
            .arg(format!("{BASE_CMDLINE} {}", self.cmdline_extra));
        c
    }
}

fn require(what: &'static str, path: &Path, hint: &'static str) -> Result<(), QemuError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(QemuError::Missing {
            what,
            path: path.to_path_buf(),
            hint,
        })
    }
}

/// Boots the guest and waits until QEMU exits or the timeout passes (then kills it).
pub fn boot_guest(spec: &GuestSpec) -> Result<GuestBoot, QemuError> {
    require("guest kernel", &spec.kernel, "run `make kernel`")?;
    require("guest initramfs", &spec.initramfs, "run `make rootfs`")?;
    let start = Instant::now();
    let mut child = spec
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| QemuError::Spawn {
            qemu: crate::paths::qemu(),
            source,
        })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("stdout and stderr were set to piped")
    };
    let mut lines = Lines::spawn(stdout);
    let stderr = console::collect(stderr);
    let deadline = start + spec.timeout;
    let mut console = Vec::new();
    let mut timed_out = false;
    let mut ready_at = None;
    loop {
        match lines.next_before(deadline) {
            Next::Line(l) => {
                if ready_at.is_none() && ReadyLine::parse(&l).is_ok() {
                    ready_at = Some(start.elapsed());
                }
                console.push(l)
            }
            Next::Closed => break,
            Next::Deadline => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().map_err(QemuError::Wait)?;
    let wall = start.elapsed();
    console.extend(lines.drain());
    let ready = console.iter().find_map(|l| ReadyLine::parse(l).ok());
    Ok(GuestBoot {
        ready,
        ready_at,
        status: (!timed_out).then_some(status),
        timed_out,
        wall,
        qemu_stderr: stderr.join().unwrap_or_default(),
        console,
    })
}
