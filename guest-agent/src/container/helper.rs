//! `cocoon-agent oci <op> --flag value ...`: libcontainer calls that fork and wait, run
//! in a single-threaded child of the agent so that they never race the agent's reaper
//! (the only `waitpid(-1)` caller) and never `chdir` under the agent's other threads.
//!
//! Protocol between the agent and its helper:
//! - argv: the op (`create`, `start`, `exec`, `delete`) and `--flag value` pairs;
//! - fds 3, 4, 5 (when `--stdio 1`): the container process's stdin, stdout, stderr;
//! - fd 2: a log file; on failure it holds libcontainer's errors and the final reason;
//! - exit status 0 on success; pids are read from `--pid-file`.

use super::process::ChildStdio;
use crate::error::{AgentError, Result};
use crate::reaper::reaper;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// First descriptor of the container's stdio in the helper.
const STDIO_FD_BASE: RawFd = 3;
/// Test builds run the helper as the test binary, which takes its argv for itself.
#[cfg(test)]
pub const TEST_ARGS_ENV: &str = "COCOON_TEST_OCI_HELPER_ARGS";
/// Longest helper log kept in an error message.
const MAX_LOG_IN_ERROR: usize = 2048;

/// How the agent starts its helper: `/proc/self/exe oci ...` in the agent.
#[derive(Debug, Clone)]
pub struct HelperCommand {
    program: PathBuf,
    prefix: Vec<String>,
    /// Pass the op arguments in this environment variable instead of argv.
    args_env: Option<&'static str>,
}

impl Default for HelperCommand {
    fn default() -> Self {
        HelperCommand {
            program: "/proc/self/exe".into(),
            prefix: vec!["oci".into()],
            args_env: None,
        }
    }
}

impl HelperCommand {
    /// For tests: an agent binary at `program` (`program oci ...`).
    #[cfg(test)]
    pub fn agent(program: PathBuf) -> Self {
        HelperCommand {
            program,
            ..HelperCommand::default()
        }
    }

    /// For tests: run `program prefix...` with the op arguments in [`TEST_ARGS_ENV`].
    #[cfg(test)]
    pub fn via_env(program: PathBuf, prefix: Vec<String>) -> Self {
        HelperCommand {
            program,
            prefix,
            args_env: Some(TEST_ARGS_ENV),
        }
    }
}

/// One helper run as the agent asks for it.
pub struct HelperOp<'a> {
    pub op: &'static str,
    pub container_id: &'a str,
    pub flags: Vec<(&'static str, String)>,
    pub stdio: Option<ChildStdio>,
    pub log: PathBuf,
}

impl HelperOp<'_> {
    fn args(&self) -> Vec<String> {
        let mut args = vec![self.op.to_string()];
        for (k, v) in &self.flags {
            args.push(format!("--{k}"));
            args.push(v.clone());
        }
        if self.stdio.is_some() {
            args.push("--stdio".into());
            args.push("1".into());
        }
        args
    }
}

/// Duplicates `fd` to a number at or above 10, close-on-exec, so that the dup2 calls in
/// the child (to 3, 4, 5) cannot overwrite a source that happens to be 3..5.
fn dup_high(fd: &OwnedFd) -> Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
        .map_err(|e| AgentError::io("duplicate a stdio descriptor")(e.into()))?;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl HelperCommand {
    /// Runs the helper to completion (through the reaper). Err carries the helper's log.
    pub fn run(&self, op: HelperOp<'_>) -> Result<()> {
        let ctx = format!("container {}: oci {}", op.container_id, op.op);
        let log = std::fs::File::create(&op.log).map_err(AgentError::io(format!(
            "{ctx}: create {}",
            op.log.display()
        )))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.prefix)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let args = op.args();
        match self.args_env {
            Some(var) => {
                cmd.env(var, args.join("\u{1f}"));
            }
            None => {
                cmd.args(&args);
            }
        }
        let high = match &op.stdio {
            Some(s) => vec![
                dup_high(&s.stdin)?,
                dup_high(&s.stdout)?,
                dup_high(&s.stderr)?,
            ],
            None => Vec::new(),
        };
        let sources: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
        if !sources.is_empty() {
            // SAFETY: the closure runs in the forked child before exec and only calls
            // dup2, which is async-signal-safe; it allocates nothing and takes no locks.
            unsafe {
                cmd.pre_exec(move || {
                    for (i, src) in sources.iter().enumerate() {
                        let target = STDIO_FD_BASE + i as RawFd;
                        if libc::dup2(*src, target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        tracing::debug!(
            container_id = op.container_id,
            op = op.op,
            "running oci helper"
        );
        let exit = reaper()
            .run(&mut cmd)
            .map_err(AgentError::io(format!("{ctx}: start the helper")))?;
        drop(high);
        drop(op.stdio);
        if exit.status == 0 {
            let _ = std::fs::remove_file(&op.log);
            return Ok(());
        }
        let text = std::fs::read_to_string(&op.log).unwrap_or_default();
        let _ = std::fs::remove_file(&op.log);
        Err(AgentError::Failed {
            context: ctx,
            message: format!(
                "helper exited with status {}: {}",
                exit.status,
                log_tail(&text)
            ),
        })
    }
}

/// The end of a helper log, on one line.
fn log_tail(text: &str) -> String {
    let text = text.trim();
    let start = text.len().saturating_sub(MAX_LOG_IN_ERROR);
    let start = (start..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    let tail = text[start..].replace('\n', " | ");
    if tail.is_empty() {
        "no output".to_string()
    } else {
        tail
    }
}

// ---- the helper side ----

struct Args {
    op: String,
    flags: HashMap<String, String>,
}

impl Args {
    fn parse(args: &[String]) -> std::result::Result<Args, String> {
        let (op, rest) = args.split_first().ok_or("missing op")?;
        let mut flags = HashMap::new();
        let mut it = rest.iter();
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {flag:?}"))?;
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            flags.insert(name.to_string(), value.clone());
        }
        Ok(Args {
            op: op.clone(),
            flags,
        })
    }

    fn get(&self, name: &str) -> std::result::Result<&str, String> {
        self.flags
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        self.flags.get(name).map(PathBuf::from)
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.get(name).is_some_and(|v| v == "1")
    }
}

/// The `oci` mode of the agent binary. Returns the exit status.
pub fn helper_main(args: &[String]) -> ExitCode {
    prepare_process();
    ExitCode::from(helper_status(args))
}

/// Logging to stderr (the log file) and signal dispositions for the container.
pub fn prepare_process() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COCOON_AGENT_LOG")
        // libcgroups warns about every v1 controller it does not find: errors only.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
    // Rust ignores SIGPIPE at start-up and an ignored signal stays ignored across exec:
    // the container's processes must get the default.
    // SAFETY: resetting a disposition to SIG_DFL installs no handler; the helper is
    // single-threaded here.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
}

/// The helper's work; 0 on success, 1 (with the reason on stderr) on failure.
pub fn helper_status(args: &[String]) -> u8 {
    match run_helper(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cocoon-agent oci: {e}");
            1
        }
    }
}

/// The error and its causes on one line (libcontainer nests them deeply).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn inherited_stdio() -> std::result::Result<[OwnedFd; 3], String> {
    let mut fds = Vec::with_capacity(3);
    for i in 0..3 {
        let fd = STDIO_FD_BASE + i;
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
            .map_err(|e| format!("stdio descriptor {fd} is not open: {e}"))?;
        // SAFETY: the agent placed the container's stdio at 3..5 for this process and
        // nothing else in the helper owns them; F_GETFD just checked they are open.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let [a, b, c]: [OwnedFd; 3] = fds.try_into().map_err(|_| "stdio".to_string())?;
    Ok([a, b, c])
}

fn run_helper(args: &[String]) -> std::result::Result<(), String> {
    let args = Args::parse(args)?;
    let id = args.get("id")?.to_string();
    let root = PathBuf::from(args.get("root")?);
    let lc = |what: &str| {
        let what = what.to_string();
        move |e: libcontainer::error::LibcontainerError| format!("{what}: {}", chain(&e))
    };
    let builder = || -> std::result::Result<ContainerBuilder, String> {
        let mut b = ContainerBuilder::new(id.clone(), SyscallType::default())
            .with_root_path(&root)
            .map_err(lc("root path"))?
            .with_pid_file(args.path("pid-file"))
            .map_err(lc("pid file"))?
            .with_console_socket(args.path("console-socket"));
        if args.flag("stdio") {
            let [i, o, e] = inherited_stdio()?;
            b = b.with_stdin(i).with_stdout(o).with_stderr(e);
        }
        b.validate_id().map_err(lc("container id"))
    };
    match args.op.as_str() {
        "create" => {
            let bundle = args.get("bundle")?;
            builder()?
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .with_no_pivot(args.flag("no-pivot"))
                .build()
                .map_err(lc("create"))?;
            Ok(())
        }
        "exec" => {
            let process = args.get("process")?;
            builder()?
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(lc("exec"))?;
            Ok(())
        }
        "start" => {
            let mut c = Container::load(root.join(&id)).map_err(lc("load state"))?;
            c.start().map_err(lc("start"))
        }
        "delete" => {
            let dir = root.join(&id);
            if !dir.exists() {
                return Ok(());
            }
            let mut c = Container::load(dir).map_err(lc("load state"))?;
            c.delete(true).map_err(lc("delete"))
        }
        other => Err(format!("unknown op {other:?}")),
    }
}

/// Reads a pid file written by libcontainer.
pub fn read_pid_file(path: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(path)
        .map_err(AgentError::io(format!("read pid file {}", path.display())))?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| AgentError::Failed {
            context: format!("read pid file {}", path.display()),
            message: format!("not a pid: {text:?}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn helper_args_round_trip() {
        let op = HelperOp {
            op: "create",
            container_id: "c1",
            flags: vec![("id", "c1".into()), ("no-pivot", "1".into())],
            stdio: None,
            log: "/x".into(),
        };
        let args = Args::parse(&op.args()).expect("parse");
        assert_eq!(args.op, "create");
        assert_eq!(args.get("id"), Ok("c1"));
        assert!(args.flag("no-pivot"));
        assert!(!args.flag("stdio"));
        assert!(args.get("bundle").is_err());
        assert!(Args::parse(&[]).is_err());
        assert!(Args::parse(&strings(&["create", "--id"])).is_err());
        assert!(Args::parse(&strings(&["create", "id"])).is_err());
    }

    #[test]
    fn helper_rejects_bad_requests_with_a_message() {
        for bad in [
            strings(&["create", "--id", "c1"]),
            strings(&["frobnicate", "--id", "c1", "--root", "/nonexistent"]),
        ] {
            assert!(run_helper(&bad).is_err(), "{bad:?}");
        }
        // Deleting what libcontainer never created is fine.
        let root = tempfile::tempdir().expect("tempdir");
        let root_s = root.path().to_string_lossy().to_string();
        assert_eq!(
            run_helper(&strings(&["delete", "--id", "c1", "--root", &root_s])),
            Ok(())
        );
    }

    #[test]
    fn log_tails_are_bounded_and_single_line() {
        assert_eq!(log_tail(""), "no output");
        assert_eq!(log_tail("a\nb\n"), "a | b");
        let long = "é".repeat(3000);
        assert!(log_tail(&long).len() <= MAX_LOG_IN_ERROR);
    }

    #[test]
    fn pid_files_parse() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("pid");
        std::fs::write(&p, "1234").expect("write");
        assert_eq!(read_pid_file(&p).ok(), Some(1234));
        std::fs::write(&p, "0").expect("write");
        assert!(read_pid_file(&p).is_err());
        assert!(read_pid_file(&t.path().join("none")).is_err());
    }
}
