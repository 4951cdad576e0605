//! What the Cocoon guest agent and the host agree on.
//!
//! - the ttrpc API ([`api`], generated from `proto/agent.proto`), served by the agent on
//!   vsock port [`AGENT_PORT`];
//! - process stdio streams on vsock port [`STDIO_PORT`] ([`stdio`]);
//! - the ready handshake: the agent prints one [`ReadyLine`] on the console and sends the
//!   same line to the host's vsock port [`READY_PORT`];
//! - kernel command line parameters that steer the agent ([`SELFTEST_PARAM`]).

use std::fmt;

pub mod stdio;

/// Generated protobuf messages and ttrpc client/server code.
pub mod api {
    #[allow(
        clippy::all,
        clippy::unwrap_used,
        unused,
        missing_docs,
        nonstandard_style
    )]
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }
    #[allow(
        clippy::all,
        clippy::unwrap_used,
        unused,
        missing_docs,
        nonstandard_style
    )]
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
    pub use agent::*;
    pub use agent_ttrpc::*;
}

/// Version of the agent API; `Hello` reports it. Bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Guest vsock port of the agent's ttrpc server.
pub const AGENT_PORT: u32 = 1024;
/// Guest vsock port for process stdio streams.
pub const STDIO_PORT: u32 = 1025;
/// Host vsock port (a Unix listener at `<vsock socket>_1026`) the agent reports ready to.
pub const READY_PORT: u32 = 1026;

/// Kernel command line parameter: `cocoon.selftest=1` makes the agent power the VM off
/// right after it reports ready (image checks, boot benchmarks).
pub const SELFTEST_PARAM: &str = "cocoon.selftest";

const READY_PREFIX: &str = "cocoon-agent ready uptime_ms=";

/// The agent's console line announcing it is up: `cocoon-agent ready uptime_ms=<ms>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyLine {
    /// Guest uptime (CLOCK_BOOTTIME) when the agent became ready, in milliseconds.
    pub uptime_ms: u64,
}

/// Why a console line is not a ready line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadyLineError {
    #[error("not a cocoon-agent ready line")]
    NotReadyLine,
    #[error("bad uptime_ms value {0:?} in ready line")]
    BadUptime(String),
}

impl fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{READY_PREFIX}{}", self.uptime_ms)
    }
}

impl ReadyLine {
    /// Parses one console line. Serial consoles add `\r` and sometimes noise before the
    /// text (kernel messages interleave), so the line only has to contain the ready text.
    pub fn parse(line: &str) -> Result<Self, ReadyLineError> {
        let start = line
            .find(READY_PREFIX)
            .ok_or(ReadyLineError::NotReadyLine)?;
        let value = line[start + READY_PREFIX.len()..].trim_end_matches(['\r', '\n']);
        let digits = value.split_whitespace().next().unwrap_or("");
        digits
            .parse::<u64>()
            .map(|uptime_ms| ReadyLine { uptime_ms })
            .map_err(|_| ReadyLineError::BadUptime(digits.to_string()))
    }

    /// Finds the first ready line in a console transcript.
    pub fn find_in(console: &str) -> Option<Self> {
        console.lines().find_map(|l| Self::parse(l).ok())
    }
}

/// Whether a kernel command line asks for `param=1`.
pub fn cmdline_flag(cmdline: &str, param: &str) -> bool {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .any(|(k, v)| k == param && v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips() {
        let line = ReadyLine { uptime_ms: 1234 };
        assert_eq!(line.to_string(), "cocoon-agent ready uptime_ms=1234");
        assert_eq!(ReadyLine::parse(&line.to_string()), Ok(line));
    }

    #[test]
    fn ready_line_tolerates_console_noise() {
        assert_eq!(
            ReadyLine::parse("[    1.2] x cocoon-agent ready uptime_ms=77\r"),
            Ok(ReadyLine { uptime_ms: 77 })
        );
        let console = "Linux version 6.1\nsomething\ncocoon-agent ready uptime_ms=9\nbye\n";
        assert_eq!(
            ReadyLine::find_in(console),
            Some(ReadyLine { uptime_ms: 9 })
        );
    }

    #[test]
    fn ready_line_rejects_garbage() {
        assert_eq!(ReadyLine::parse("hello"), Err(ReadyLineError::NotReadyLine));
        assert_eq!(
            ReadyLine::parse("cocoon-agent ready uptime_ms=-1"),
            Err(ReadyLineError::BadUptime("-1".into()))
        );
        assert_eq!(
            ReadyLine::parse("cocoon-agent ready uptime_ms="),
            Err(ReadyLineError::BadUptime(String::new()))
        );
        assert_eq!(ReadyLine::find_in("no\nready\n"), None);
    }

    #[test]
    fn cmdline_flag_matches_whole_parameters_only() {
        let cmdline = "console=ttyS0 cocoon.selftest=1 quiet";
        assert!(cmdline_flag(cmdline, SELFTEST_PARAM));
        assert!(!cmdline_flag("cocoon.selftest=0", SELFTEST_PARAM));
        assert!(!cmdline_flag("xcocoon.selftest=1", SELFTEST_PARAM));
        assert!(!cmdline_flag("cocoon.selftest", SELFTEST_PARAM));
    }
}
