//! One process stdio stream: a header line, the agent's `ok`/`err` reply, then bytes.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cocoon_agent_protocol::stdio::{parse_reply, StdioHeader};
use cocoon_agent_protocol::STDIO_PORT;

use super::{read_line, set_timeouts, AgentError, Endpoint, Line, Result};

/// Longest stdio reply line we read (`err <reason>`): generous, but bounded.
const MAX_STDIO_REPLY: usize = 4096;

/// [`AgentClient::open_stdio`] without a ttrpc connection.
pub fn open_stdio(
    endpoint: &Endpoint,
    header: &StdioHeader,
    timeout: Duration,
) -> Result<UnixStream> {
    let text = header.to_string();
    let what = text.trim_end().to_string();
    let mut s = endpoint.connect(STDIO_PORT, timeout)?;
    set_timeouts(&s, Some(timeout))
        .map_err(AgentError::io(format!("stdio `{what}`: set timeout")))?;
    s.write_all(text.as_bytes())
        .map_err(AgentError::io(format!("stdio `{what}`: send header")))?;
    let reply = match read_line(&mut s, MAX_STDIO_REPLY) {
        Ok(Line::Complete(l)) => l,
        Ok(Line::Eof) => {
            return Err(AgentError::StdioRefused {
                header: what,
                reason: "closed without a reply".into(),
            })
        }
        Ok(Line::TooLong) => {
            return Err(AgentError::StdioRefused {
                header: what,
                reason: format!("reply longer than {MAX_STDIO_REPLY} bytes"),
            })
        }
        Err(e) => return Err(AgentError::io(format!("stdio `{what}`: read reply"))(e)),
    };
    parse_reply(&reply).map_err(|reason| AgentError::StdioRefused {
        header: what.clone(),
        reason,
    })?;
    set_timeouts(&s, None).map_err(AgentError::io(format!("stdio `{what}`: clear timeout")))?;
    Ok(s)
}
