//! A process's stdio as the agent holds it: the pipe ends (or the pty master) that the
//! host's stdio connections are joined to.
//!
//! Output is never read before the host attaches: it waits in the pipe (or pty) buffer,
//! and a process that fills it blocks — bounded memory, nothing lost. Each stream can be
//! attached once.

use crate::error::{AgentError, Result};
use cocoon_agent_protocol::api;
use cocoon_agent_protocol::stdio::Stream;
use nix::fcntl::OFlag;
use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

const COPY_BUF: usize = 32 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The ends the process gets (handed to the helper, then to libcontainer).
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

enum Output {
    /// The host did not ask for it (the process has /dev/null), or it is merged.
    Unavailable(&'static str),
    Waiting(File),
    Attached,
}

/// The agent's end of a process's stdin.
pub enum Input {
    Unavailable(&'static str),
    /// The write end (a pipe, or a dup of the pty master).
    Open(Arc<File>),
    Closed,
}

/// The agent's side of one process's stdio.
pub struct ProcessIo {
    stdin: Arc<Mutex<Input>>,
    stdin_attached: Mutex<bool>,
    stdout: Mutex<Output>,
    stderr: Mutex<Output>,
    /// The pty master, kept for resizes and so that the terminal outlives a closed stdin.
    master: Option<File>,
}

fn dev_null() -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(AgentError::io("open /dev/null"))?;
    Ok(f.into())
}

fn pipe() -> Result<(File, File)> {
    // CLOEXEC: no other child of the agent may hold a pipe end, or EOF never comes.
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| AgentError::io("create a pipe")(e.into()))?;
    Ok((File::from(r), File::from(w)))
}

const NOT_REQUESTED: &str = "was not requested when the process was created";

impl ProcessIo {
    /// Pipes for the streams `stdio` asks for, /dev/null for the others.
    pub fn pipes(stdio: &api::Stdio) -> Result<(ProcessIo, ChildStdio)> {
        let (stdin, child_in) = if stdio.stdin {
            let (r, w) = pipe()?;
            (Input::Open(Arc::new(w)), OwnedFd::from(r))
        } else {
            (Input::Unavailable(NOT_REQUESTED), dev_null()?)
        };
        let output = |wanted: bool| -> Result<(Output, OwnedFd)> {
            if wanted {
                let (r, w) = pipe()?;
                Ok((Output::Waiting(r), OwnedFd::from(w)))
            } else {
                Ok((Output::Unavailable(NOT_REQUESTED), dev_null()?))
            }
        };
        let (stdout, child_out) = output(stdio.stdout)?;
        let (stderr, child_err) = output(stdio.stderr)?;
        Ok((
            ProcessIo {
                stdin: Arc::new(Mutex::new(stdin)),
                stdin_attached: Mutex::new(false),
                stdout: Mutex::new(stdout),
                stderr: Mutex::new(stderr),
                master: None,
            },
            ChildStdio {
                stdin: child_in,
                stdout: child_out,
                stderr: child_err,
            },
        ))
    }

    /// A terminal process: stdin and stdout are the pty master, stderr is merged.
    pub fn terminal(master: File, stdio: &api::Stdio) -> Result<ProcessIo> {
        let dup = |what: &str| {
            master.try_clone().map_err(AgentError::io(format!(
                "duplicate the pty master for {what}"
            )))
        };
        let stdin = if stdio.stdin {
            Input::Open(Arc::new(dup("stdin")?))
        } else {
            Input::Unavailable(NOT_REQUESTED)
        };
        let stdout = if stdio.stdout {
            Output::Waiting(dup("stdout")?)
        } else {
            Output::Unavailable(NOT_REQUESTED)
        };
        Ok(ProcessIo {
            stdin: Arc::new(Mutex::new(stdin)),
            stdin_attached: Mutex::new(false),
            stdout: Mutex::new(stdout),
            stderr: Mutex::new(Output::Unavailable("is merged into the terminal (stdout)")),
            master: Some(master),
        })
    }

    pub fn is_terminal(&self) -> bool {
        self.master.is_some()
    }

    /// Claims `stream` for a host connection; the second claim of a stream fails.
    pub fn take(&self, stream: Stream) -> Result<Pump> {
        let taken = |what: &str, why: &str| AgentError::FailedPrecondition(format!("{what} {why}"));
        match stream {
            Stream::Stdin => {
                let mut attached = lock(&self.stdin_attached);
                match &*lock(&self.stdin) {
                    Input::Unavailable(why) => return Err(taken("stdin", why)),
                    Input::Closed => return Err(taken("stdin", "is closed")),
                    Input::Open(_) if *attached => {
                        return Err(taken("stdin", "is already attached"))
                    }
                    Input::Open(_) => {}
                }
                *attached = true;
                Ok(Pump::Input {
                    slot: Arc::clone(&self.stdin),
                    close_at_eof: !self.is_terminal(),
                })
            }
            Stream::Stdout | Stream::Stderr => {
                let (slot, name) = if stream == Stream::Stdout {
                    (&self.stdout, "stdout")
                } else {
                    (&self.stderr, "stderr")
                };
                let mut slot = lock(slot);
                match std::mem::replace(&mut *slot, Output::Attached) {
                    Output::Waiting(reader) => Ok(Pump::Output(reader)),
                    Output::Unavailable(why) => {
                        *slot = Output::Unavailable(why);
                        Err(taken(name, why))
                    }
                    Output::Attached => Err(taken(name, "is already attached")),
                }
            }
        }
    }

    /// Closes the process's stdin (a pipe: the process reads EOF), attached or not. On a
    /// terminal nothing is written: the agent just stops forwarding (as runc's shim).
    pub fn close_stdin(&self) {
        let mut slot = lock(&self.stdin);
        if matches!(*slot, Input::Open(_)) {
            *slot = Input::Closed;
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let master = self.master.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition("the process has no terminal".to_string())
        })?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for
        // the call; the descriptor is the open pty master.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(AgentError::io("resize the terminal")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// A claimed stream, ready to be joined to its connection.
pub enum Pump {
    Output(File),
    Input {
        slot: Arc<Mutex<Input>>,
        close_at_eof: bool,
    },
}

impl Pump {
    /// Copies until the stream ends (blocking the calling thread), then closes `conn`:
    /// output until every writer of the pipe/pty is gone; input until the host closes,
    /// which closes the process's stdin (pipes only).
    pub fn run(self, mut conn: File) {
        match self {
            Pump::Output(mut reader) => {
                let mut buf = vec![0u8; COPY_BUF];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        // A pty master reads EIO once the last slave fd closed: EOF.
                        Err(_) => break,
                    };
                    if conn.write_all(&buf[..n]).is_err() {
                        // The host went away: drop the read end; the process gets EPIPE.
                        break;
                    }
                }
            }
            Pump::Input { slot, close_at_eof } => {
                let mut buf = vec![0u8; COPY_BUF];
                loop {
                    let n = match conn.read(&mut buf) {
                        Ok(n) if n > 0 => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        // EOF, or a connection reset: either way the host's stdin ended.
                        _ => {
                            if close_at_eof {
                                let mut s = lock(&slot);
                                if matches!(*s, Input::Open(_)) {
                                    *s = Input::Closed;
                                }
                            }
                            break;
                        }
                    };
                    // Hold the writer only while writing, so close_stdin closes at once.
                    let writer = match &*lock(&slot) {
                        Input::Open(w) => Arc::clone(w),
                        _ => break,
                    };
                    if (&*writer).write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// A Unix socket on which libcontainer sends a new process's pty master
/// (`--console-socket`).
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> Result<ConsoleSocket> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(AgentError::io(format!(
            "bind console socket {}",
            path.display()
        )))?;
        Ok(ConsoleSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pty master, once the helper returned (the container sent it before it
    /// reported ready, so it is waiting in the socket).
    pub fn receive_master(&self) -> Result<File> {
        let ctx = || format!("receive the pty master on {}", self.path.display());
        self.listener
            .set_nonblocking(true)
            .map_err(AgentError::io(ctx()))?;
        let (stream, _) = self.listener.accept().map_err(AgentError::io(ctx()))?;
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(std::time::Duration::from_secs(5))))
            .map_err(AgentError::io(ctx()))?;
        let mut name = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| AgentError::io(ctx())(e.into()))?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(|e| AgentError::io(ctx())(e.into()))? {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(r) = cmsg {
                fds.extend(r);
            }
        }
        let mut owned = fds.into_iter().map(|fd| {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process just now;
            // nothing else owns them.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        });
        let master = owned.next().ok_or_else(|| AgentError::Failed {
            context: ctx(),
            message: "no descriptor in the message".to_string(),
        })?;
        Ok(File::from(master))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn stdio(stdin: bool, stdout: bool, stderr: bool) -> api::Stdio {
        let mut s = api::Stdio::new();
        s.stdin = stdin;
        s.stdout = stdout;
        s.stderr = stderr;
        s
    }

    fn socket_file() -> (File, File) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (File::from(OwnedFd::from(a)), File::from(OwnedFd::from(b)))
    }

    #[test]
    fn output_waits_in_the_pipe_until_attached_once() {
        let (io, child) = ProcessIo::pipes(&stdio(false, true, false)).expect("pipes");
        let mut out = File::from(child.stdout);
        out.write_all(b"early output").expect("write");
        drop(out);
        assert!(matches!(
            io.take(Stream::Stderr),
            Err(AgentError::FailedPrecondition(_))
        ));
        let pump = io.take(Stream::Stdout).expect("take");
        assert!(matches!(
            io.take(Stream::Stdout),
            Err(AgentError::FailedPrecondition(_))
        ));
        let (agent_end, mut host_end) = socket_file();
        pump.run(agent_end);
        let mut got = String::new();
        host_end.read_to_string(&mut got).expect("read");
        assert_eq!(got, "early output");
    }

    #[test]
    fn stdin_eof_from_host_closes_the_pipe() {
        let (io, child) = ProcessIo::pipes(&stdio(true, false, false)).expect("pipes");
        let pump = io.take(Stream::Stdin).expect("take");
        assert!(io.take(Stream::Stdin).is_err(), "stdin is attached once");
        let (agent_end, mut host_end) = socket_file();
        let t = std::thread::spawn(move || pump.run(agent_end));
        host_end.write_all(b"input").expect("write");
        drop(host_end);
        let mut got = String::new();
        File::from(child.stdin)
            .read_to_string(&mut got)
            .expect("read");
        assert_eq!(got, "input");
        t.join().expect("pump");
    }

    #[test]
    fn close_stdin_closes_an_attached_or_unattached_pipe() {
        let (io, child) = ProcessIo::pipes(&stdio(true, false, false)).expect("pipes");
        io.close_stdin();
        let mut got = Vec::new();
        File::from(child.stdin)
            .read_to_end(&mut got)
            .expect("EOF at once");
        assert!(got.is_empty());
        assert!(
            io.take(Stream::Stdin).is_err(),
            "a closed stdin cannot be attached"
        );

        // Attached and idle: close_stdin still closes it at once.
        let (io, child) = ProcessIo::pipes(&stdio(true, false, false)).expect("pipes");
        let pump = io.take(Stream::Stdin).expect("take");
        let (agent_end, host_end) = socket_file();
        let t = std::thread::spawn(move || pump.run(agent_end));
        io.close_stdin();
        let mut got = Vec::new();
        File::from(child.stdin).read_to_end(&mut got).expect("EOF");
        drop(host_end);
        t.join().expect("pump");
    }

    #[test]
    fn resize_needs_a_terminal_and_works_on_a_pty() {
        let (io, _child) = ProcessIo::pipes(&stdio(false, false, false)).expect("pipes");
        assert!(matches!(
            io.resize(24, 80),
            Err(AgentError::FailedPrecondition(_))
        ));
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let io =
            ProcessIo::terminal(File::from(pty.master), &stdio(true, true, true)).expect("tty");
        assert!(io.is_terminal());
        io.resize(33, 111).expect("resize");
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into the valid, exclusively borrowed struct.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(rc, 0);
        assert_eq!((size.ws_row, size.ws_col), (33, 111));
        assert!(
            io.take(Stream::Stderr).is_err(),
            "stderr is merged on a terminal"
        );
        // Output from the slave reaches the host; the pump ends (EIO) when the slave closes.
        let pump = io.take(Stream::Stdout).expect("stdout");
        let mut slave = File::from(pty.slave);
        slave.write_all(b"tty out\n").expect("write");
        drop(slave);
        let (agent_end, mut host_end) = socket_file();
        pump.run(agent_end);
        let mut got = String::new();
        host_end.read_to_string(&mut got).expect("read");
        assert_eq!(got, "tty out\r\n");
    }

    #[test]
    fn console_socket_passes_a_descriptor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = ConsoleSocket::bind(&dir.path().join("c.sock")).expect("bind");
        assert!(sock.receive_master().is_err(), "nobody connected yet");
        let client = UnixStream::connect(sock.path()).expect("connect");
        let (r, mut w) = pipe().expect("pipe");
        let fds = [r.as_raw_fd()];
        nix::sys::socket::sendmsg::<()>(
            client.as_raw_fd(),
            &[std::io::IoSlice::new(b"/dev/ptmx")],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        drop(r);
        let mut got = sock.receive_master().expect("receive");
        w.write_all(b"x").expect("write");
        drop(w);
        let mut s = String::new();
        got.read_to_string(&mut s).expect("read");
        assert_eq!(s, "x");
        let path = sock.path().to_path_buf();
        drop(sock);
        assert!(!path.exists());
    }
}
