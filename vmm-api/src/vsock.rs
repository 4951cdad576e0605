//! The host side of `cocoon-vmm`'s hybrid vsock (docs/vsock.md): connect to the VMM's
//! Unix socket, send `CONNECT <guest port>\n`, read `OK <host port>\n`; from then on the
//! stream is the connection to the guest.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest handshake line either side sends, newline included.
const MAX_LINE: usize = 64;

/// Why a connection to a guest port was not made.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    /// The VMM closed the stream or answered something else than `OK <port>`: usually
    /// nothing listens on that guest port (yet).
    #[error("vsock handshake with guest port {port} via {path}: {reason}")]
    Handshake {
        path: PathBuf,
        port: u32,
        reason: String,
    },
}

/// Where guest connections to host port `port` arrive: the Unix socket
/// `<vsock socket>_<port>` (`uds` is the VMM's `--vsock` socket).
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects to guest port `port` through the VMM's hybrid vsock socket at `path`,
/// waiting at most `timeout` for each step of the handshake. Returns the stream (blocking,
/// no timeouts set, at the guest's first byte) and the host port the VMM gave it.
pub fn connect(path: &Path, port: u32, timeout: Duration) -> Result<(UnixStream, u32), VsockError> {
    let mut s = UnixStream::connect(path).map_err(|source| VsockError::Connect {
        path: path.into(),
        source,
    })?;
    let fail = |reason: String| VsockError::Handshake {
        path: path.into(),
        port,
        reason,
    };
    set_timeouts(&s, Some(timeout)).map_err(|e| fail(format!("set socket timeout: {e}")))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| fail(format!("send CONNECT: {e}")))?;
    let line = match read_line(&mut s, MAX_LINE) {
        Ok(Line::Complete(l)) => l,
        Ok(Line::Eof) => return Err(fail("closed without OK (no listener in the guest?)".into())),
        Ok(Line::TooLong) => return Err(fail("reply line too long".into())),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(fail(format!("no OK within {timeout:?}")));
        }
        Err(e) => return Err(fail(format!("read reply: {e}"))),
    };
    let host_port = parse_ok_line(&line).map_err(fail)?;
    // ttrpc and stream users expect a plain blocking socket.
    set_timeouts(&s, None).map_err(|e| fail(format!("clear socket timeout: {e}")))?;
    Ok((s, host_port))
}

/// Parses the VMM's `OK <host port>` line (without its newline).
fn parse_ok_line(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| format!("non-UTF-8 reply {line:?}"))?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    text.strip_prefix("OK ")
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| format!("expected `OK <port>`, got {text:?}"))
}

/// What [`read_line`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The line without its `\n`.
    Complete(Vec<u8>),
    /// The stream ended before a newline.
    Eof,
    /// No newline within the bound.
    TooLong,
}

/// Reads one `\n`-terminated line of fewer than `max` bytes, byte by byte: whatever
/// follows the newline belongs to the stream's next user (the guest's data, ttrpc, a
/// process's output), so nothing may be read ahead.
pub fn read_line(s: &mut impl Read, max: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(Line::Eof),
            Ok(_) if b[0] == b'\n' => return Ok(Line::Complete(line)),
            Ok(_) if line.len() + 1 >= max => return Ok(Line::TooLong),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn set_timeouts(s: &UnixStream, t: Option<Duration>) -> io::Result<()> {
    s.set_read_timeout(t)?;
    s.set_write_timeout(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_are_beside_the_socket() {
        assert_eq!(
            host_port_path(Path::new("/run/cocoon/sb/vsock.sock"), 1026),
            Path::new("/run/cocoon/sb/vsock.sock_1026")
        );
    }
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    fn socket_path() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmm-api-vsock-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// A VMM's vsock socket that reads one CONNECT line and answers `reply` (nothing:
    /// close; empty: stay silent a while); returns the line it read.
    fn fake_vmm(path: &Path, reply: Option<&'static [u8]>) -> std::thread::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (mut c, _) = listener.accept().expect("accept");
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while c.read(&mut b).expect("read CONNECT") == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            match reply {
                None => {}
                Some(b"") => std::thread::sleep(Duration::from_millis(800)),
                Some(r) => {
                    c.write_all(r).expect("write reply");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            line
        })
    }

    #[test]
    fn handshake_leaves_guest_data_in_the_stream() {
        let sock = socket_path();
        let server = fake_vmm(&sock, Some(b"OK 1073741824\nguest-data"));
        let (mut s, host_port) = connect(&sock, 1024, Duration::from_secs(5)).expect("handshake");
        assert_eq!(host_port, 1 << 30);
        let mut buf = [0u8; 10];
        s.read_exact(&mut buf).expect("guest data");
        assert_eq!(&buf, b"guest-data");
        assert_eq!(s.read_timeout().ok(), Some(None), "timeouts cleared");
        assert_eq!(server.join().expect("server"), b"CONNECT 1024");
        let _ = std::fs::remove_file(&sock);
    }

    #[test]
    fn handshake_errors_name_the_port_and_the_reason() {
        for (reply, want) in [
            (None, "closed without OK"),
            (Some(&b"NO\n"[..]), "expected `OK <port>`"),
            (Some(&[b'O'; 100][..]), "too long"),
            (Some(&b""[..]), "no OK within 200ms"),
        ] {
            let sock = socket_path();
            let server = fake_vmm(&sock, reply);
            let started = Instant::now();
            let err = connect(&sock, 1025, Duration::from_millis(200)).expect_err(want);
            let text = err.to_string();
            assert!(
                matches!(err, VsockError::Handshake { port: 1025, .. })
                    && text.contains(want)
                    && text.contains(&sock.display().to_string()),
                "{text}"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
            server.join().expect("server");
            let _ = std::fs::remove_file(&sock);
        }
        let absent = socket_path();
        let err = connect(&absent, 1024, Duration::from_secs(1)).expect_err("no socket");
        assert!(matches!(err, VsockError::Connect { .. }), "{err}");
    }

    #[test]
    fn ok_line_parsing() {
        assert_eq!(parse_ok_line(b"OK 1073741824"), Ok(1 << 30));
        assert_eq!(parse_ok_line(b"OK 5\r"), Ok(5));
        for bad in [&b"OK"[..], b"OK -1", b"ok 5", b"OK 5 6", b"\xff"] {
            assert!(parse_ok_line(bad).is_err(), "{bad:?}");
        }
    }
}
