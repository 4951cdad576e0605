//! The control socket: one JSON request per line, one JSON reply line for each
//! (docs/vmm.md). The VMM parses [`Request`] and answers a [`Reply`]; clients use
//! [`ControlClient`].

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest reply line a client reads; a stats reply is far below it.
const MAX_REPLY: u64 = 1 << 20;
/// How much of an unparsable reply an error quotes.
const QUOTE_CHARS: usize = 200;

/// One control request. The VMM refuses unknown ops and unknown fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Put a raw image file into a drive slot.
    Swap {
        slot: usize,
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        serial: Option<String>,
    },
    /// Empty a drive slot.
    Eject { slot: usize },
    // Struct variants (not unit ones) so that unknown fields are refused for them too.
    /// Stop all vCPUs.
    Pause {},
    /// Restart all vCPUs.
    Resume {},
    /// Stop the vCPUs, flush disks, exit with status 0.
    Shutdown {},
    /// Report [`Stats`].
    Stats {},
}

/// The answer to one request: `{"ok":true}`, `{"ok":false,"error":"..."}`, or for
/// [`Request::Stats`] `{"ok":true,"stats":{...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            error: None,
            stats: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(message.into()),
            stats: None,
        }
    }

    pub fn stats(stats: Stats) -> Reply {
        Reply {
            stats: Some(stats),
            ..Reply::ok()
        }
    }
}

/// Snapshot of the VM's resource use and state. Unknown fields are ignored when parsing,
/// so a client still reads a newer VMM (a VMM outlives shim upgrades); fields added later
/// need `#[serde(default)]` for the converse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub paused: bool,
    /// The VMM process's resident memory, guest memory excluded.
    pub vmm_rss_kib: u64,
    /// Guest memory pages the host has had to back so far.
    pub guest_touched_kib: u64,
    /// Guest memory the guest reported free and the VMM dropped (virtio-balloon free
    /// page reporting), and in how many reports.
    pub free_page_reported_kib: u64,
    pub free_page_reports: u64,
    /// Every drive slot, in slot order.
    pub slots: Vec<SlotStats>,
}

/// One drive slot; an empty slot has an empty serial and capacity 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStats {
    pub slot: usize,
    pub serial: String,
    pub read_only: bool,
    pub capacity_sectors: u64,
}

/// Why a control exchange failed. Each variant says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("connecting to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("setting timeouts on {path}: {source}")]
    Timeouts { path: PathBuf, source: io::Error },
    /// Only a swap path that is not UTF-8 has no JSON form.
    #[error("encoding the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("writing to {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("reading from {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("no reply from {path} within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("the VMM closed the connection without a reply")]
    Closed,
    #[error("reply {text:?} is not a control reply: {source}")]
    BadReply {
        text: String,
        source: serde_json::Error,
    },
    /// The VMM answered `ok: false`; this is its message.
    #[error("{0}")]
    Refused(String),
    #[error("the stats reply carries no stats")]
    NoStats,
}

/// A connection to a VMM's control socket. Requests on one connection are answered in
/// order; every read and write waits at most the timeout given at connect.
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    timeout: Duration,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path, timeout: Duration) -> Result<ControlClient, ControlError> {
        let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.into(),
            source,
        })?;
        let timeouts = |source| ControlError::Timeouts {
            path: path.into(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(timeouts)?;
        stream.set_write_timeout(Some(timeout)).map_err(timeouts)?;
        let writer = stream.try_clone().map_err(timeouts)?;
        Ok(ControlClient {
            path: path.into(),
            timeout,
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends `request` and reads its reply; a refusal (`ok: false`) is
    /// [`ControlError::Refused`] with the VMM's message.
    pub fn request(&mut self, request: &Request) -> Result<Reply, ControlError> {
        let mut line = serde_json::to_string(request).map_err(ControlError::Encode)?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| ControlError::Write {
                path: self.path.clone(),
                source,
            })?;
        let mut text = String::new();
        match (&mut self.reader).take(MAX_REPLY).read_line(&mut text) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ControlError::Timeout {
                    path: self.path.clone(),
                    timeout: self.timeout,
                })
            }
            Err(source) => {
                return Err(ControlError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(ControlError::Closed);
        }
        let reply: Reply = serde_json::from_str(text).map_err(|source| ControlError::BadReply {
            text: text.chars().take(QUOTE_CHARS).collect(),
            source,
        })?;
        if !reply.ok {
            return Err(ControlError::Refused(
                reply
                    .error
                    .unwrap_or_else(|| "the VMM refused without a message".into()),
            ));
        }
        Ok(reply)
    }

    /// [`Request::Stats`], unwrapped.
    pub fn stats(&mut self) -> Result<Stats, ControlError> {
        self.request(&Request::Stats {})?
            .stats
            .ok_or(ControlError::NoStats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// `value` serialises to exactly `json`, and `json` parses back to `value`.
    fn round_trip<T>(value: &T, json: &str)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        assert_eq!(serde_json::to_string(value).expect("serialise"), json);
        assert_eq!(&serde_json::from_str::<T>(json).expect("parse"), value);
    }

    fn sample_stats() -> Stats {
        Stats {
            vcpus: 2,
            memory_mib: 512,
            paused: true,
            vmm_rss_kib: 3100,
            guest_touched_kib: 41000,
            free_page_reported_kib: 9000,
            free_page_reports: 12,
            slots: vec![
                SlotStats {
                    slot: 0,
                    serial: "img-a".into(),
                    read_only: true,
                    capacity_sectors: 2048,
                },
                SlotStats {
                    slot: 1,
                    serial: String::new(),
                    read_only: false,
                    capacity_sectors: 0,
                },
            ],
        }
    }

    #[test]
    fn requests_are_todays_json() {
        round_trip(
            &Request::Swap {
                slot: 2,
                path: "/d.img".into(),
                read_only: true,
                serial: Some("img-a".into()),
            },
            r#"{"op":"swap","slot":2,"path":"/d.img","read_only":true,"serial":"img-a"}"#,
        );
        round_trip(
            &Request::Swap {
                slot: 1,
                path: "/x".into(),
                read_only: false,
                serial: None,
            },
            r#"{"op":"swap","slot":1,"path":"/x","read_only":false}"#,
        );
        round_trip(&Request::Eject { slot: 0 }, r#"{"op":"eject","slot":0}"#);
        round_trip(&Request::Pause {}, r#"{"op":"pause"}"#);
        round_trip(&Request::Resume {}, r#"{"op":"resume"}"#);
        round_trip(&Request::Shutdown {}, r#"{"op":"shutdown"}"#);
        round_trip(&Request::Stats {}, r#"{"op":"stats"}"#);
    }

    #[test]
    fn requests_parse_in_any_key_order_with_optional_fields_left_out() {
        // The runtime used to send its keys sorted; tests send swaps without read_only.
        assert_eq!(
            serde_json::from_str::<Request>(
                r#"{"op":"swap","path":"/d.img","read_only":true,"serial":"s","slot":3}"#
            )
            .expect("sorted keys"),
            Request::Swap {
                slot: 3,
                path: "/d.img".into(),
                read_only: true,
                serial: Some("s".into()),
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"swap","slot":1,"path":"/x"}"#)
                .expect("minimal swap"),
            Request::Swap {
                slot: 1,
                path: "/x".into(),
                read_only: false,
                serial: None,
            }
        );
    }

    #[test]
    fn requests_parse_strictly() {
        for bad in [
            r#"{"op":"swap","slot":-1,"path":"/x"}"#,
            r#"{"op":"swap","path":"/x"}"#,
            r#"{"op":"explode"}"#,
            r#"{"op":"pause","extra":1}"#,
            r#"{"slot":0}"#,
            r#"not json"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_are_todays_json() {
        round_trip(&Reply::ok(), r#"{"ok":true}"#);
        round_trip(
            &Reply::error("drive slot 7 does not exist"),
            r#"{"ok":false,"error":"drive slot 7 does not exist"}"#,
        );
        round_trip(
            &Reply::stats(sample_stats()),
            concat!(
                r#"{"ok":true,"stats":{"vcpus":2,"memory_mib":512,"paused":true,"#,
                r#""vmm_rss_kib":3100,"guest_touched_kib":41000,"#,
                r#""free_page_reported_kib":9000,"free_page_reports":12,"slots":["#,
                r#"{"slot":0,"serial":"img-a","read_only":true,"capacity_sectors":2048},"#,
                r#"{"slot":1,"serial":"","read_only":false,"capacity_sectors":0}]}}"#
            ),
        );
    }

    #[test]
    fn replies_from_a_newer_vmm_still_parse() {
        let reply: Reply = serde_json::from_str(
            r#"{"ok":true,"since":1,"stats":{"vcpus":1,"memory_mib":256,"paused":false,
            "vmm_rss_kib":1,"guest_touched_kib":2,"free_page_reported_kib":0,
            "free_page_reports":0,"slots":[],"vcpu_exits":[3,4]}}"#,
        )
        .expect("parse");
        assert_eq!(reply.stats.map(|s| s.memory_mib), Some(256));
    }

    fn socket_path() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmm-api-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// A control socket that answers each request line with the next of `replies` (raw
    /// lines), then closes; returns the request lines it read.
    fn serve(replies: Vec<String>) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let path = socket_path();
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut out = conn.try_clone().expect("clone");
            let mut lines = BufReader::new(conn).lines();
            let mut seen = Vec::new();
            for reply in replies {
                seen.push(lines.next().expect("a request").expect("read"));
                out.write_all(format!("{reply}\n").as_bytes())
                    .expect("write");
            }
            seen
        });
        (path, server)
    }

    #[test]
    fn client_sends_lines_and_reads_typed_replies() {
        let stats = serde_json::to_string(&Reply::stats(sample_stats())).expect("json");
        let (path, server) = serve(vec![
            r#"{"ok":true}"#.into(),
            r#"{"ok":false,"error":"drive slot 9 does not exist"}"#.into(),
            stats,
            r#"{"ok":true}"#.into(),
            "garbage".into(),
        ]);
        let mut c = ControlClient::connect(&path, Duration::from_secs(5)).expect("connect");
        assert_eq!(c.request(&Request::Pause {}).expect("pause"), Reply::ok());
        let refused = c.request(&Request::Eject { slot: 9 });
        assert!(
            matches!(&refused, Err(ControlError::Refused(m)) if m == "drive slot 9 does not exist"),
            "{refused:?}"
        );
        assert_eq!(c.stats().expect("stats"), sample_stats());
        assert!(matches!(c.stats(), Err(ControlError::NoStats)));
        let bad = c.request(&Request::Resume {}).expect_err("garbage");
        assert!(
            matches!(&bad, ControlError::BadReply { text, .. } if text == "garbage"),
            "{bad}"
        );
        let seen = server.join().expect("server");
        assert!(matches!(
            c.request(&Request::Resume {}),
            Err(ControlError::Closed | ControlError::Write { .. })
        ));
        assert_eq!(
            seen,
            [
                r#"{"op":"pause"}"#,
                r#"{"op":"eject","slot":9}"#,
                r#"{"op":"stats"}"#,
                r#"{"op":"stats"}"#,
                r#"{"op":"resume"}"#,
            ]
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn client_errors_name_the_socket_and_the_wait() {
        let missing = socket_path();
        let e = ControlClient::connect(&missing, Duration::from_secs(1)).expect_err("absent");
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );

        // A VMM that reads the request but does not answer in time.
        let path = socket_path();
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).expect("read");
            std::thread::sleep(Duration::from_millis(600));
        });
        let mut c = ControlClient::connect(&path, Duration::from_millis(200)).expect("connect");
        let e = c.request(&Request::Stats {}).expect_err("silent");
        assert!(
            matches!(e, ControlError::Timeout { .. }) && e.to_string().contains("200ms"),
            "{e}"
        );
        server.join().expect("server");
        let _ = std::fs::remove_file(&path);
    }
}
