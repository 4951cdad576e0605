//! Process stdio over vsock: one connection per stream, to guest port [`STDIO_PORT`].
//!
//! The host connects and sends one header line naming the stream:
//!
//! ```text
//! stdio v1 <container_id> <exec_id or -> <stdin|stdout|stderr>\n
//! ```
//!
//! The agent answers `ok\n` or `err <reason>\n`. After `ok`, the connection is the
//! stream: for stdout/stderr the agent writes the process's output and closes at EOF
//! (every writer of the pipe or pty gone); for stdin the host writes and closes (or shuts
//! down its write side) to close the process's stdin.
//!
//! [`STDIO_PORT`]: crate::STDIO_PORT

use std::fmt;

/// Longest header line accepted, newline included.
pub const MAX_HEADER_LEN: usize = 512;

/// One of a process's three standard streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdin => "stdin",
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The header that opens a stdio connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioHeader {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stream: Stream,
}

/// Why a header line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("stdio header longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
    #[error("stdio header is not `stdio v1 <container> <exec|-> <stream>`: {0:?}")]
    Malformed(String),
    #[error("invalid {what} {value:?}: use letters, digits, '_', '-', '.' (at most 128)")]
    BadId { what: &'static str, value: String },
    #[error("unknown stream {0:?}: expected stdin, stdout or stderr")]
    BadStream(String),
}

/// Whether `id` is a usable container or exec id: what containerd generates (hex) and
/// what people type, but nothing that could escape a path or split a header.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl fmt::Display for StdioHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exec = if self.exec_id.is_empty() {
            "-"
        } else {
            &self.exec_id
        };
        writeln!(
            f,
            "stdio v1 {} {} {}",
            self.container_id,
            exec,
            self.stream.as_str()
        )
    }
}

impl StdioHeader {
    /// Parses one header line (with or without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        if line.len() > MAX_HEADER_LEN {
            return Err(HeaderError::TooLong);
        }
        let text = std::str::from_utf8(line)
            .map_err(|_| HeaderError::Malformed(String::from_utf8_lossy(line).into_owned()))?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        let malformed = || HeaderError::Malformed(text.to_string());
        let words: Vec<&str> = text.split(' ').collect();
        let [magic, version, container, exec, stream] = words[..] else {
            return Err(malformed());
        };
        if magic != "stdio" || version != "v1" {
            return Err(malformed());
        }
        if !valid_id(container) {
            return Err(HeaderError::BadId {
                what: "container id",
                value: container.to_string(),
            });
        }
        let exec_id = match exec {
            "-" => String::new(),
            e if valid_id(e) => e.to_string(),
            e => {
                return Err(HeaderError::BadId {
                    what: "exec id",
                    value: e.to_string(),
                })
            }
        };
        let stream = match stream {
            "stdin" => Stream::Stdin,
            "stdout" => Stream::Stdout,
            "stderr" => Stream::Stderr,
            s => return Err(HeaderError::BadStream(s.to_string())),
        };
        Ok(StdioHeader {
            container_id: container.to_string(),
            exec_id,
            stream,
        })
    }
}

/// The agent's answer to a header: `Ok(())` is `ok`, `Err(reason)` is `err <reason>`.
pub fn format_reply(result: &Result<(), String>) -> String {
    match result {
        Ok(()) => "ok\n".to_string(),
        Err(reason) => format!("err {}\n", reason.replace('\n', " ")),
    }
}

/// Parses the agent's answer line.
pub fn parse_reply(line: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\n');
    match text {
        "ok" => Ok(()),
        t => Err(t.strip_prefix("err ").unwrap_or(t).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for (exec, stream) in [("", Stream::Stdout), ("e1", Stream::Stdin)] {
            let h = StdioHeader {
                container_id: "abc123".into(),
                exec_id: exec.into(),
                stream,
            };
            let line = h.to_string();
            assert!(line.ends_with('\n'));
            assert_eq!(StdioHeader::parse(line.as_bytes()), Ok(h));
        }
        assert_eq!(
            StdioHeader::parse(b"stdio v1 c - stderr").map(|h| h.stream),
            Ok(Stream::Stderr)
        );
    }

    #[test]
    fn header_rejects_bad_input() {
        assert_eq!(
            StdioHeader::parse(&[b'a'; MAX_HEADER_LEN + 1]),
            Err(HeaderError::TooLong)
        );
        assert!(matches!(
            StdioHeader::parse(b"stdio v2 c - stdout\n"),
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            StdioHeader::parse(b"stdio v1 c -  stdout\n"),
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            StdioHeader::parse(b"stdio v1 ../x - stdout\n"),
            Err(HeaderError::BadId { .. })
        ));
        assert!(matches!(
            StdioHeader::parse(b"stdio v1 c a/b stdout\n"),
            Err(HeaderError::BadId { .. })
        ));
        assert_eq!(
            StdioHeader::parse(b"stdio v1 c - stdpipe\n"),
            Err(HeaderError::BadStream("stdpipe".into()))
        );
        assert!(StdioHeader::parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn ids_are_path_safe() {
        assert!(valid_id("0123abcdef"));
        assert!(valid_id("exec-1.2_x"));
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn replies_round_trip() {
        assert_eq!(parse_reply(format_reply(&Ok(())).as_bytes()), Ok(()));
        let err = format_reply(&Err("no such\nprocess".into()));
        assert_eq!(err, "err no such process\n");
        assert_eq!(parse_reply(err.as_bytes()), Err("no such process".into()));
    }
}
