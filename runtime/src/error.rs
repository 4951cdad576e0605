//! The runtime's error type, shared by the sandbox building blocks (`config`, `image`,
//! `disk`, `podnet`, `vmm`), and the helper that runs host tools (`mkfs.erofs`, `ip`, `tc`,
//! ...) and turns their failures into errors that say what was run and what it printed.
//!
//! An error's `Display` says only its own layer and keeps the cause as its `source()`;
//! [`chain`] is the one printer, walking the causes once.
//!
//! Every variant names the thing it is about (a file, a device, a network namespace, a
//! sandbox or image key), because these errors end up in containerd's and kubelet's events,
//! far from the code that raised them.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What went wrong in the host runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem or system call on a named path failed.
    #[error("{action} {path}")]
    Io {
        /// What we were doing, e.g. "reading config file".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `/etc/cocoon/config.toml` (or the file given instead) is not valid.
    #[error("config file {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A pod annotation (or a limit derived from one) has a value we cannot use.
    #[error("pod annotation {key}={value:?}: {reason}")]
    Annotation {
        key: String,
        value: String,
        reason: String,
    },
    /// The VM size the pod asks for is outside what the configuration allows.
    #[error("pod VM size: {0}")]
    VmSize(String),
    /// A size text like "10G" that does not parse.
    #[error("size {value:?}: {reason}")]
    Size { value: String, reason: String },
    /// A host tool could not be started at all (missing binary, no permission).
    #[error("cannot run `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// A host tool ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// Pod network setup or teardown in a network namespace.
    #[error("pod network in {netns}: {message}")]
    Net { netns: PathBuf, message: String },
    /// Building or using a read-only image disk.
    #[error("image disk {key}: {message}")]
    Image { key: String, message: String },
    /// The VMM process of a sandbox: starting, supervising, control requests.
    #[error("VMM of sandbox {sandbox_id}: {message}")]
    Vmm { sandbox_id: String, message: String },
    /// No free drive slot (or an unknown one) in a sandbox's VM.
    #[error("drive slots: {0}")]
    Slots(String),
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`] for `path`; meant for `map_err(Error::io("opening", &p))`.
    pub fn io(action: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Error {
        let path = path.as_ref().to_path_buf();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}

/// `err` and its causes, outermost first, joined by ": ": how every error is printed
/// (CLI, logs, replies to containerd), so that no cause is lost and none appears twice.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// The command line of `cmd`, for messages: program and arguments, space-separated.
pub(crate) fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured. A non-zero exit
/// becomes [`Error::Command`] carrying the command line and its (trimmed) stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let line = command_line(cmd);
    let output = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
    if output.status.success() {
        return Ok(output);
    }
    Err(Error::Command {
        command: line,
        status: output.status.to_string(),
        stderr: tail(&String::from_utf8_lossy(&output.stderr), 2000),
    })
}

/// [`run`] with `input` (small: it must fit the pipe, a few KiB) written to the command's
/// stdin, for batch modes such as `tc -batch -`.
pub(crate) fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<Output> {
    use std::io::Write as _;
    let line = command_line(cmd);
    let spawn_err = |source| Error::Spawn {
        program: line.clone(),
        source,
    };
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    // Written before waiting: the input fits the pipe, so this cannot block on the child.
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(input));
    let output = child.wait_with_output().map_err(spawn_err)?;
    if !output.status.success() {
        return Err(Error::Command {
            command: line,
            status: output.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&output.stderr), 2000),
        });
    }
    match written {
        Some(Err(source)) => Err(spawn_err(source)),
        _ => Ok(output),
    }
}

/// The last `max` bytes (at a char boundary) of `text`, trimmed: enough of a tool's
/// stderr or a log to see why it failed, without flooding an event.
pub(crate) fn tail(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_command_names_itself_and_its_stderr() {
        let err =
            run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("sh -c echo boom"), "{text}");
        assert!(text.contains("boom"), "{text}");
        assert!(text.contains('3'), "{text}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run(&mut Command::new("/nonexistent/cocoon-tool")).expect_err("must fail");
        assert!(matches!(err, Error::Spawn { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/cocoon-tool"));
    }

    #[test]
    fn chain_prints_each_cause_once() {
        let err =
            Error::io("reading config file", "/etc/x")(io::Error::from_raw_os_error(libc::ENOTDIR));
        let os = io::Error::from_raw_os_error(libc::ENOTDIR).to_string();
        let text = chain(&err);
        assert_eq!(text, format!("reading config file /etc/x: {os}"));
        assert_eq!(text.matches(&os).count(), 1, "{text}");
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("  short \n", 10), "short");
        let long = "é".repeat(10);
        let t = tail(&long, 5);
        assert!(t.starts_with("..."));
        assert!(long.ends_with(t.trim_start_matches("...")));
    }
}
