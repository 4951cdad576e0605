//! Reading a child's console output line by line, with deadlines.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Instant;

/// Lines of a stream, read on a thread so the caller can wait with a deadline.
pub struct Lines {
    rx: Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

/// What waiting for the next line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Line(String),
    /// The deadline passed first.
    Deadline,
    /// The stream ended (the child closed it or exited).
    Closed,
}

impl Lines {
    /// Starts reading `stream`. Serial consoles end lines with `\r\n`; the `\r` is dropped,
    /// and bytes that are not UTF-8 are replaced rather than ending the stream.
    pub fn spawn(stream: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        let line = text.trim_end_matches(['\n', '\r']).replace('\r', "");
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Lines {
            rx,
            reader: Some(reader),
        }
    }

    /// Waits for the next line until `deadline`.
    pub fn next_before(&self, deadline: Instant) -> Next {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(wait) {
            Ok(line) => Next::Line(line),
            Err(RecvTimeoutError::Timeout) => Next::Deadline,
            Err(RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }

    /// Collects whatever is left once the writer is gone (call after the child exited).
    pub fn drain(&mut self) -> Vec<String> {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.rx.try_iter().collect()
    }
}

/// Reads a whole stream into a string on a thread (for a child's stderr).
pub fn collect(mut stream: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn splits_serial_lines_and_reports_close() {
        let lines = Lines::spawn(&b"one\r\ntwo\n\xffthree"[..]);
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(lines.next_before(later), Next::Line("one".into()));
        assert_eq!(lines.next_before(later), Next::Line("two".into()));
        assert_eq!(lines.next_before(later), Next::Line("\u{fffd}three".into()));
        assert_eq!(lines.next_before(later), Next::Closed);
    }

    #[test]
    fn deadline_passes_on_a_silent_stream() {
        let (r, _w) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let lines = Lines::spawn(r);
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(lines.next_before(soon), Next::Deadline);
    }
}
