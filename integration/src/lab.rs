//! The test lab: a Linux VM under QEMU's software emulation (TCG) with AMD SVM and nested
//! paging emulated, whose kernel has KVM built in. Inside it /dev/kvm is real KVM, so
//! VM-level tests run there on hosts whose own KVM cannot boot Linux (PVM, or none).
//!
//! The lab's root is the host's `/`, shared read-only over virtio-9p, so binaries built on
//! the host run inside unchanged. A per-run job directory is shared writable: it carries
//! the command in, and its exit status and any files (`$COCOON_LAB_OUT`) back out. QEMU is
//! the only host process; it dies with its parent and is killed at the deadline, and the
//! job directory is removed afterwards, so a run leaves nothing behind.

use crate::console::{self, Lines, Next};
use crate::paths;
use std::fmt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const UP_MARKER: &str = "cocoon-lab: up";
const EXIT_MARKER: &str = "cocoon-lab: exit ";

/// How to boot the lab.
#[derive(Debug, Clone)]
pub struct Lab {
    pub kernel: PathBuf,
    pub init: PathBuf,
    pub qemu: PathBuf,
    pub bios: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    /// How long the lab may take to reach its init script; past that it is "silent".
    pub boot_timeout: Duration,
}

/// A command to run inside the lab.
#[derive(Debug, Clone)]
pub struct Job {
    pub argv: Vec<String>,
    /// Working directory inside the lab (host paths are the same there).
    pub cwd: PathBuf,
    /// Extra environment, on top of `RUST_LOG`, `RUST_BACKTRACE` and `COCOON_*` passed
    /// through from the caller.
    pub env: Vec<(String, String)>,
    /// Time the command may run, counted from the moment the lab is up.
    pub timeout: Duration,
    /// Where files the command writes to `$COCOON_LAB_OUT` are copied afterwards.
    pub out_dir: Option<PathBuf>,
    /// Echo the command's output to stderr as it arrives.
    pub echo: bool,
}

impl Job {
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        Job {
            argv: argv.into_iter().map(Into::into).collect(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            env: Vec::new(),
            timeout: Duration::from_secs(600),
            out_dir: None,
            echo: true,
        }
    }
}

/// How a lab run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran and exited with this status.
    Exited(i32),
    /// The command was still running at the deadline; the lab was killed.
    TimedOut,
    /// The lab kernel panicked.
    Panicked,
    /// The lab itself failed (never came up, or stopped without an exit status): an
    /// infrastructure failure, not a test result.
    InfraFailure(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(c) => write!(f, "command exited with status {c}"),
            Outcome::TimedOut => write!(f, "command timed out; the lab was killed"),
            Outcome::Panicked => write!(f, "the lab kernel panicked"),
            Outcome::InfraFailure(why) => write!(f, "test lab infrastructure failure: {why}"),
        }
    }
}

/// After a lab kernel fault line, this long without any console line ends the run. Not
/// the fault line alone: a test's failure report may quote a nested guest's panic, and
/// what follows it then is more output, not silence.
const FAULT_SILENCE: Duration = Duration::from_secs(60);

/// Whether a console line is the lab kernel reporting a fault of its own (an oops, a
/// panic): kernel messages carry a timestamp, and print even under `quiet`. The lab
/// kernel does not recover from these; seen: a stack guard page hit in the page fault
/// entry of a thread running a nested guest, the kernel then silent for good.
fn is_kernel_fault(line: &str) -> bool {
    let Some((stamp, msg)) = line.strip_prefix('[').and_then(|r| r.split_once("] ")) else {
        return false;
    };
    stamp.trim().parse::<f64>().is_ok()
        && [
            "BUG: ",
            "Oops: ",
            "general protection fault",
            "Kernel panic",
            "stack guard page",
        ]
        .iter()
        .any(|m| msg.starts_with(m))
}

/// The record of one lab run.
#[derive(Debug)]
pub struct LabRun {
    pub outcome: Outcome,
    /// The command's output (console lines after the lab came up, markers removed).
    pub output: Vec<String>,
    /// Every console line, kernel messages included.
    pub console: Vec<String>,
    /// QEMU's own error output.
    pub qemu_stderr: String,
    /// From starting QEMU to the lab's init running the command.
    pub boot: Option<Duration>,
    pub wall: Duration,
    /// The QEMU process of the last attempt (gone by the time this is returned).
    pub qemu_pid: u32,
    /// The job directory of the last attempt (removed by the time this is returned).
    pub job_dir: PathBuf,
    /// 2 when the first attempt was a silent lab and it was retried.
    pub attempts: u32,
}

impl LabRun {
    /// The last `n` console lines, for failure reports.
    pub fn console_tail(&self, n: usize) -> String {
        let skip = self.console.len().saturating_sub(n);
        self.console[skip..].join("\n")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("test lab {what} {path} is missing: {hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("test lab job directory: {0}")]
    JobDir(std::io::Error),
    #[error("cannot start {qemu} for the test lab: {source}")]
    Spawn {
        qemu: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for the test lab's QEMU: {0}")]
    Wait(std::io::Error),
    #[error("copying lab output {from} to {to}: {source}")]
    CopyOut {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

impl Lab {
    /// The lab as `make lab-kernel` builds it; fails, naming the fix, when parts are missing.
    pub fn from_build() -> Result<Self, LabError> {
        let lab = Lab {
            kernel: paths::lab_kernel(),
            init: paths::lab_init(),
            qemu: paths::qemu(),
            bios: paths::qboot(),
            memory_mib: 4096,
            cpus: 2,
            boot_timeout: Duration::from_secs(120),
        };
        let check = |what, path: &Path, hint| {
            if path.is_file() {
                Ok(())
            } else {
                Err(LabError::Missing {
                    what,
                    path: path.to_path_buf(),
                    hint,
                })
            }
        };
        check("kernel", &lab.kernel, "run `make lab-kernel`")?;
        check("init script", &lab.init, "is the repository complete?")?;
        check(
            "firmware",
            &lab.bios,
            "install QEMU 10 from bookworm-backports (scripts/install-deps.sh)",
        )?;
        Ok(lab)
    }

    /// Runs `job` in a fresh lab; a lab that stays silent is retried once.
    pub fn run(&self, job: &Job) -> Result<LabRun, LabError> {
        let first = self.run_once(job)?;
        if first.boot.is_some() || !matches!(first.outcome, Outcome::InfraFailure(_)) {
            return Ok(first);
        }
        eprintln!("cocoon-lab: {} — retrying once", first.outcome);
        let mut second = self.run_once(job)?;
        second.attempts = 2;
        Ok(second)
    }

    /// Runs `job` in a fresh lab, once.
    pub fn run_once(&self, job: &Job) -> Result<LabRun, LabError> {
        let dir = JobDir::new(job)?;
        let start = Instant::now();
        let mut child = self
            .command(dir.path(), false)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LabError::Spawn {
                qemu: self.qemu.clone(),
                source,
            })?;
        let qemu_pid = child.id();
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            unreachable!("stdout and stderr were set to piped")
        };
        let mut lines = Lines::spawn(stdout);
        let stderr = console::collect(stderr);

        let mut console = Vec::new();
        let mut output = Vec::new();
        let mut up_at: Option<Instant> = None;
        let mut faulted_at: Option<Instant> = None;
        let mut last_line_at = Instant::now();
        let mut timed_out = false;
        let mut done = false;
        let mut handle =
            |line: String, up_at: &mut Option<Instant>, faulted_at: &mut Option<Instant>| {
                if faulted_at.is_none() && is_kernel_fault(&line) {
                    *faulted_at = Some(Instant::now());
                }
                if up_at.is_none() && line.contains(UP_MARKER) {
                    *up_at = Some(Instant::now());
                } else if line.starts_with(EXIT_MARKER) {
                    // What follows is the lab powering off, not the command's output.
                    done = true;
                } else if up_at.is_some() && !done {
                    if job.echo {
                        eprintln!("lab| {line}");
                    }
                    output.push(line.clone());
                }
                console.push(line);
            };
        loop {
            let mut deadline = match up_at {
                None => start + self.boot_timeout,
                Some(t) => t + job.timeout,
            };
            if faulted_at.is_some() {
                // `oops=panic` normally ends QEMU at once; a kernel that hung while
                // printing is ended here rather than at the job's timeout.
                deadline = deadline.min(last_line_at + FAULT_SILENCE);
            }
            match lines.next_before(deadline) {
                Next::Line(l) => {
                    last_line_at = Instant::now();
                    handle(l, &mut up_at, &mut faulted_at)
                }
                Next::Closed => break,
                Next::Deadline => {
                    timed_out = faulted_at.is_none();
                    let _ = child.kill();
                    break;
                }
            }
        }
        child.wait().map_err(LabError::Wait)?;
        for l in lines.drain() {
            handle(l, &mut up_at, &mut faulted_at);
        }
        let qemu_stderr = stderr.join().unwrap_or_default();

        let outcome = match dir.status() {
            Some(code) => Outcome::Exited(code),
            None if faulted_at.is_some() || console.iter().any(|l| l.contains("Kernel panic")) => {
                Outcome::Panicked
            }
            None if up_at.is_none() && timed_out => Outcome::InfraFailure(format!(
                "the lab stayed silent for {:?} (never reached its init)",
                self.boot_timeout
            )),
            None if up_at.is_none() => Outcome::InfraFailure(format!(
                "QEMU stopped before the lab came up: {}",
                qemu_stderr.trim()
            )),
            None if timed_out => Outcome::TimedOut,
            None => {
                Outcome::InfraFailure("the lab stopped without recording an exit status".into())
            }
        };
        if let Some(to) = &job.out_dir {
            dir.copy_out(to)?;
        }
        Ok(LabRun {
            outcome,
            output,
            console,
            qemu_stderr,
            boot: up_at.map(|t| t - start),
            wall: start.elapsed(),
            qemu_pid,
            job_dir: dir.path().to_path_buf(),
            attempts: 1,
        })
    }

    /// An interactive shell inside the lab on this terminal (Ctrl-A X quits QEMU).
    pub fn shell(&self) -> Result<ExitStatus, LabError> {
        let dir = JobDir::interactive()?;
        let mut child =
            self.command(dir.path(), true)
                .spawn()
                .map_err(|source| LabError::Spawn {
                    qemu: self.qemu.clone(),
                    source,
                })?;
        child.wait().map_err(LabError::Wait)
    }

    fn command(&self, job_dir: &Path, interactive: bool) -> Command {
        let mut c = Command::new(&self.qemu);
        c.args(["-machine", "q35", "-accel", "tcg,thread=multi"])
            .args(["-cpu", "EPYC,+svm,+npt"])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-m", &self.memory_mib.to_string()])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", if interactive { "mon:stdio" } else { "stdio" }])
            .arg("-bios")
            .arg(&self.bios)
            .arg("-kernel")
            .arg(&self.kernel)
            .args([
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            ])
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=labjob,security_model=none,multidevs=remap",
                job_dir.display()
            ))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 root=hostroot rootfstype=9p \
                 rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose ro \
                 init={} panic=-1 oops=panic quiet",
                self.init.display()
            ));
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on the calling (child) process;
        // it allocates nothing and is async-signal-safe, as pre_exec requires.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }
}

/// The writable share of one lab run: `run.sh` in, `status` and `out/` back out.
struct JobDir(tempfile::TempDir);

impl JobDir {
    fn new(job: &Job) -> Result<Self, LabError> {
        let dir = Self::empty()?;
        std::fs::write(dir.path().join("run.sh"), job_script(job)).map_err(LabError::JobDir)?;
        Ok(dir)
    }

    fn interactive() -> Result<Self, LabError> {
        let dir = Self::empty()?;
        std::fs::write(dir.path().join("interactive"), b"").map_err(LabError::JobDir)?;
        Ok(dir)
    }

    fn empty() -> Result<Self, LabError> {
        let dir = tempfile::Builder::new()
            .prefix("cocoon-lab.")
            .tempdir()
            .map_err(LabError::JobDir)?;
        std::fs::create_dir(dir.path().join("out")).map_err(LabError::JobDir)?;
        Ok(JobDir(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn status(&self) -> Option<i32> {
        std::fs::read_to_string(self.path().join("status"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn copy_out(&self, to: &Path) -> Result<(), LabError> {
        copy_tree(&self.path().join("out"), to)
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), LabError> {
    let err = |source| LabError::CopyOut {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(to).map_err(err)?;
    for entry in std::fs::read_dir(from).map_err(err)? {
        let entry = entry.map_err(err)?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(err)?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|source| LabError::CopyOut {
                from: src.clone(),
                to: dst.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the lab's init runs: working directory, environment, then the command with
/// stderr folded into stdout (both reach the host over the console).
fn job_script(job: &Job) -> String {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            (k.starts_with("COCOON_") && k != "COCOON_IN_LAB" && k != "COCOON_LAB_OUT")
                || k == "RUST_LOG"
                || k == "RUST_BACKTRACE"
        })
        .collect();
    env.extend(job.env.iter().cloned());
    let mut s = String::from("# generated by the cocoon test lab runner\n");
    s += &format!(
        "cd {} || exit 125\n",
        shell_quote(&job.cwd.to_string_lossy())
    );
    for (k, v) in env {
        if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            s += &format!("export {k}={}\n", shell_quote(&v));
        }
    }
    let argv: Vec<String> = job.argv.iter().map(|a| shell_quote(a)).collect();
    s += &format!("exec {} 2>&1\n", argv.join(" "));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_script_quotes_everything() {
        let mut job = Job::new(["sh", "-c", "echo 'it''s' $HOME"]);
        job.cwd = PathBuf::from("/work/a b");
        job.env = vec![("X".into(), "a'b".into()), ("bad key".into(), "v".into())];
        let s = job_script(&job);
        assert!(s.contains("cd '/work/a b' || exit 125\n"), "{s}");
        assert!(s.contains("export X='a'\\''b'\n"), "{s}");
        assert!(!s.contains("bad key"), "{s}");
        assert!(
            s.ends_with("exec 'sh' '-c' 'echo '\\''it'\\'''\\''s'\\'' $HOME' 2>&1\n"),
            "{s}"
        );
    }

    #[test]
    fn kernel_faults_are_told_from_other_lines() {
        for fault in [
            "[  100.325487] BUG: TASK stack guard page was hit at 0000000086185647",
            "[    3.1] Oops: 0000 [#1] PREEMPT SMP NOPTI",
            "[ 12.000001] general protection fault, probably for non-canonical address",
            "[   9.5] Kernel panic - not syncing: Fatal exception",
        ] {
            assert!(is_kernel_fault(fault), "{fault}");
        }
        for other in [
            "[   29.546873] kvm [465]: vcpu0, guest rIP: 0xffffffff810032cd Unhandled WRMSR",
            "test cocoon::exit_codes ... BUG: in the test's own words",
            "[x] BUG: not a timestamp",
            "lab| [  1.0] BUG: echoed",
            "",
        ] {
            assert!(!is_kernel_fault(other), "{other}");
        }
    }

    #[test]
    fn copy_tree_copies_nested_files() {
        let from = tempfile::tempdir().expect("tempdir");
        let to = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(from.path().join("d")).expect("mkdir");
        std::fs::write(from.path().join("d/f"), b"x").expect("write");
        copy_tree(from.path(), &to.path().join("o")).expect("copy");
        assert_eq!(std::fs::read(to.path().join("o/d/f")).expect("read"), b"x");
    }
}
