//! The stdio port: each host connection names one stream of one process in a header
//! line (see `cocoon_agent_protocol::stdio`), then carries that stream.

use crate::container::Containers;
use cocoon_agent_protocol::stdio::{format_reply, StdioHeader, MAX_HEADER_LEN};
use std::fs::File;
use std::io::{Read, Write};

/// Why no header could be read.
#[derive(Debug, PartialEq, Eq)]
enum ReadHeader {
    /// The peer closed (or failed) before a full line.
    Closed,
    TooLong,
}

/// Reads one line, byte by byte so that nothing after the newline is consumed (it
/// belongs to the stream), up to [`MAX_HEADER_LEN`] bytes including the newline.
fn read_header_line(conn: &mut impl Read) -> Result<Vec<u8>, ReadHeader> {
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte) {
            Ok(0) => return Err(ReadHeader::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(ReadHeader::Closed),
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(line);
        }
        if line.len() >= MAX_HEADER_LEN {
            return Err(ReadHeader::TooLong);
        }
    }
}

/// Serves one accepted connection on the stdio port, on the calling thread (one thread
/// per connection): reads the header, then [`Containers::attach_stdio`] answers `ok` and
/// copies until the stream ends. Bad headers are answered `err <reason>` and closed.
pub fn serve_connection(containers: &Containers, mut conn: File) {
    let refuse = |conn: &mut File, reason: String| {
        tracing::warn!("stdio connection refused: {reason}");
        let _ = conn.write_all(format_reply(&Err(reason)).as_bytes());
    };
    let line = match read_header_line(&mut conn) {
        Ok(line) => line,
        Err(ReadHeader::Closed) => return,
        Err(ReadHeader::TooLong) => {
            return refuse(
                &mut conn,
                format!("stdio header longer than {MAX_HEADER_LEN} bytes"),
            )
        }
    };
    let header = match StdioHeader::parse(&line) {
        Ok(h) => h,
        Err(e) => return refuse(&mut conn, e.to_string()),
    };
    if let Err(e) = containers.attach_stdio(&header, conn) {
        tracing::warn!(
            container_id = %header.container_id,
            exec_id = %header.exec_id,
            "stdio connection refused: {e}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::test_support::{fake_containers, FakeProcess};
    use cocoon_agent_protocol::stdio::parse_reply;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    fn pair() -> (File, File) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (File::from(OwnedFd::from(a)), File::from(OwnedFd::from(b)))
    }

    fn read_line(f: &mut File) -> Vec<u8> {
        read_header_line(f).expect("reply line")
    }

    /// Sends `header` (and `extra`) and serves the connection on a thread; returns the
    /// host end and the server thread.
    fn connect(
        containers: &std::sync::Arc<Containers>,
        header: &[u8],
    ) -> (File, std::thread::JoinHandle<()>) {
        let (agent, mut host) = pair();
        host.write_all(header).expect("write header");
        let c = std::sync::Arc::clone(containers);
        let t = std::thread::spawn(move || serve_connection(&c, agent));
        (host, t)
    }

    #[test]
    fn header_is_read_without_over_reading() {
        let mut input: &[u8] = b"stdio v1 c - stdin\nPAYLOAD";
        assert_eq!(
            read_header_line(&mut input).as_deref(),
            Ok(&b"stdio v1 c - stdin\n"[..])
        );
        assert_eq!(input, b"PAYLOAD");
        let mut long: &[u8] = &[b'a'; MAX_HEADER_LEN + 10];
        assert_eq!(read_header_line(&mut long), Err(ReadHeader::TooLong));
        let mut cut: &[u8] = b"stdio v1";
        assert_eq!(read_header_line(&mut cut), Err(ReadHeader::Closed));
    }

    #[test]
    fn streams_attach_once_and_carry_data_both_ways() {
        let (containers, FakeProcess { stdin, stdout, .. }) = fake_containers("c1");
        let containers = std::sync::Arc::new(containers);

        // Output written before the host attaches is kept.
        let mut stdout = File::from(stdout);
        stdout.write_all(b"hello\n").expect("write");
        drop(stdout);
        let (mut host, t) = connect(&containers, b"stdio v1 c1 - stdout\n");
        assert_eq!(parse_reply(&read_line(&mut host)), Ok(()));
        let mut out = String::new();
        host.read_to_string(&mut out).expect("read");
        assert_eq!(out, "hello\n");
        t.join().expect("server");

        // A second attach of the same stream is refused.
        let (mut host, t) = connect(&containers, b"stdio v1 c1 - stdout\n");
        let reply = parse_reply(&read_line(&mut host));
        assert!(
            reply
                .as_ref()
                .is_err_and(|r| r.contains("already attached")),
            "{reply:?}"
        );
        t.join().expect("server");

        // Stdin: bytes right after the header belong to the stream.
        let (mut host, t) = connect(&containers, b"stdio v1 c1 - stdin\nfirst ");
        assert_eq!(parse_reply(&read_line(&mut host)), Ok(()));
        host.write_all(b"second").expect("write");
        drop(host);
        let mut got = String::new();
        File::from(stdin)
            .read_to_string(&mut got)
            .expect("read to EOF");
        assert_eq!(got, "first second");
        t.join().expect("server");
    }

    #[test]
    fn bad_headers_and_unknown_processes_are_refused() {
        let (containers, _p) = fake_containers("c2");
        let containers = std::sync::Arc::new(containers);
        for (header, want) in [
            (&b"hello\n"[..], "not `stdio v1"),
            (b"stdio v1 nope - stdout\n", "not found"),
            (b"stdio v1 c2 e9 stdout\n", "not found"),
            (b"stdio v1 c2 - stderr\n", "not requested"),
            (b"stdio v1 ../x - stdout\n", "invalid container id"),
        ] {
            let (mut host, t) = connect(&containers, header);
            let reply = parse_reply(&read_line(&mut host));
            assert!(
                reply.as_ref().is_err_and(|r| r.contains(want)),
                "{:?}: {reply:?}",
                String::from_utf8_lossy(header)
            );
            let mut rest = Vec::new();
            host.read_to_end(&mut rest).expect("closed after the reply");
            assert!(rest.is_empty());
            t.join().expect("server");
        }
        let (mut host, t) = connect(&containers, &[b'x'; MAX_HEADER_LEN + 1]);
        assert!(parse_reply(&read_line(&mut host)).is_err());
        t.join().expect("server");
    }
}
