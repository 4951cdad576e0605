//! One stream connection between a guest port and a host Unix stream: its state, credit
//! accounting in both directions, and the guest data the host stream could not take yet.
//!
//! Nothing here touches the virtqueues or the I/O loop; the device decides when to call
//! in and what to do with the outcome.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer we advertise per connection: guest data the host stream has not taken
/// yet never exceeds it.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded bytes the guest has not heard about that trigger a CREDIT_UPDATE.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// Keep a drained guest-data buffer's allocation only up to this size.
const TX_BUF_KEEP: usize = 64 * 1024;

/// A connection's identity: the host-side port (CID 2) and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: a REQUEST is queued or sent, the guest's RESPONSE awaited.
    Connecting,
    Established,
}

/// Control packets owed to the guest, at most one of each.
#[derive(Debug, Default)]
pub struct PendingCtl {
    pub request: bool,
    pub response: bool,
    pub credit_update: bool,
    pub credit_request: bool,
    /// SHUTDOWN flags to send; 0 for none.
    pub shutdown: u32,
}

impl PendingCtl {
    pub fn any(&self) -> bool {
        self.request
            || self.response
            || self.credit_update
            || self.credit_request
            || self.shutdown != 0
    }
}

/// Why a connection has to be reset.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error("guest sent data after SHUTDOWN(SEND)")]
    DataAfterShutdown,
    #[error("guest sent {len} bytes with {in_flight} in flight, beyond our credit of {BUF_ALLOC}")]
    CreditExceeded { len: usize, in_flight: u32 },
    #[error("host stream: {0}")]
    Host(io::Error),
}

#[derive(Debug)]
pub struct Connection {
    pub key: ConnKey,
    /// The I/O loop tag of `stream`.
    pub tag: u32,
    pub stream: UnixStream,
    pub state: ConnState,
    /// Handshake or linger deadline; past it the connection is reset.
    pub deadline: Option<Instant>,
    /// What `stream` is registered for with the I/O loop (`None`: not registered).
    pub watched: Option<EventSet>,
    /// In the device's ready list.
    pub queued: bool,
    pub pending: PendingCtl,

    // Host → guest.
    /// Host bytes read but not sent yet: what came past the CONNECT line, and what a
    /// read brought beyond the RX buffer it was for (reads go as far as the guest's
    /// credit, so one syscall fills many small guest buffers). Never more than the
    /// guest's credit at the time of the read.
    pub staged: VecDeque<u8>,
    /// The stream reported input that has not been read yet.
    pub host_readable: bool,
    /// The stream reached end of file.
    pub host_eof: bool,
    /// The stream hung up: the host side can no longer take data.
    pub host_hup: bool,
    /// Payload bytes sent to the guest (wrapping, as on the wire).
    pub sent_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// A CREDIT_REQUEST went out since the guest's credit last ran out.
    pub credit_requested: bool,

    // Guest → host.
    /// Device bytes for the host ahead of guest data (the `OK <port>` line).
    pub host_out: Vec<u8>,
    /// Guest data the stream could not take yet; at most `BUF_ALLOC` bytes.
    pub tx_buf: VecDeque<u8>,
    /// Guest payload bytes received (wrapping).
    pub rx_cnt: u32,
    /// Guest payload bytes written to the stream (wrapping).
    pub fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it.
    pub last_fwd_cnt_sent: u32,
    pub guest_shut_send: bool,
    pub guest_shut_rcv: bool,
    pub host_write_shut: bool,
    pub host_read_shut: bool,
}

/// Writes as much of `buf` as the non-blocking stream takes.
fn write_some(stream: &mut UnixStream, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match stream.write(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Connection {
    pub fn new(key: ConnKey, tag: u32, stream: UnixStream, state: ConnState) -> Self {
        Connection {
            key,
            tag,
            stream,
            state,
            deadline: None,
            watched: None,
            queued: false,
            pending: PendingCtl::default(),
            staged: VecDeque::new(),
            host_readable: false,
            host_eof: false,
            host_hup: false,
            sent_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            host_out: Vec::new(),
            tx_buf: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
            host_read_shut: false,
        }
    }

    /// Bytes the guest can take now: its buffer minus what is in flight. A guest claiming
    /// to have forwarded more than it got gets no credit.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.sent_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Takes the credit fields every guest packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Host data is known to be waiting (read ahead, or reported by the I/O loop).
    pub fn data_waiting(&self) -> bool {
        !self.staged.is_empty() || self.host_readable
    }

    /// Host → guest is open: established and neither side shut it.
    fn h2g_open(&self) -> bool {
        self.state == ConnState::Established && !self.guest_shut_rcv && !self.host_eof
    }

    pub fn can_send_data(&self) -> bool {
        self.h2g_open() && self.data_waiting() && self.peer_credit() > 0
    }

    /// Something for an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        self.pending.any() || self.can_send_data()
    }

    /// Watch the stream for input: only when we could forward it right away.
    fn wants_input(&self) -> bool {
        self.h2g_open() && !self.data_waiting() && self.peer_credit() > 0
    }

    /// Bytes are waiting for the host stream.
    pub fn wants_output(&self) -> bool {
        !self.host_out.is_empty() || !self.tx_buf.is_empty()
    }

    /// What to watch the stream for.
    pub fn interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.wants_input() {
            events |= EventSet::IN;
        }
        if self.wants_output() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Both directions are over: nothing more can flow either way.
    pub fn finished(&self) -> bool {
        let h2g_done = self.guest_shut_rcv || (self.host_eof && self.pending.shutdown == 0);
        let g2h_done = self.host_write_shut || self.host_hup;
        self.state == ConnState::Established && h2g_done && g2h_done
    }

    /// Takes guest payload: straight to the stream, the rest buffered within our credit.
    ///
    /// The credit is checked against what the guest was told: bytes it sent beyond the
    /// last `fwd_cnt` we reported may not exceed `BUF_ALLOC`. As that `fwd_cnt` never
    /// exceeds what was written, the buffer never holds more than `BUF_ALLOC` either.
    pub fn take_guest_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.guest_shut_send {
            return Err(ConnError::DataAfterShutdown);
        }
        let in_flight = self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        if u64::from(in_flight) + data.len() as u64 > u64::from(BUF_ALLOC) {
            return Err(ConnError::CreditExceeded {
                len: data.len(),
                in_flight,
            });
        }
        // data.len() <= MAX_PAYLOAD.
        self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
        let mut data = data;
        if !self.wants_output() {
            let n = write_some(&mut self.stream, data).map_err(ConnError::Host)?;
            // n <= MAX_PAYLOAD.
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
            data = &data[n..];
        }
        self.tx_buf.extend(data);
        Ok(())
    }

    /// Writes what is waiting for the host stream, as far as it takes it; returns whether
    /// it took anything.
    pub fn flush(&mut self) -> Result<bool, ConnError> {
        let mut progress = false;
        while !self.host_out.is_empty() {
            let n = write_some(&mut self.stream, &self.host_out).map_err(ConnError::Host)?;
            if n == 0 {
                return Ok(progress);
            }
            progress = true;
            self.host_out.drain(..n);
        }
        loop {
            let (front, _) = self.tx_buf.as_slices();
            if front.is_empty() {
                break;
            }
            let len = front.len();
            let n = write_some(&mut self.stream, front).map_err(ConnError::Host)?;
            // n <= BUF_ALLOC.
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
            self.tx_buf.drain(..n);
            progress |= n > 0;
            if n < len {
                break;
            }
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > TX_BUF_KEEP {
            self.tx_buf = VecDeque::new();
        }
        Ok(progress)
    }

    /// Carries the guest's shutdowns over to the stream once nothing is left to write.
    pub fn apply_shutdowns(&mut self) {
        if self.guest_shut_rcv && !self.host_read_shut {
            self.host_read_shut = true;
            self.host_readable = false;
            self.staged = VecDeque::new();
            // The host's writes fail from now on (EPIPE); failure here means the stream
            // is gone already, which the next I/O shows.
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if self.guest_shut_send && !self.host_write_shut && !self.wants_output() {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// Reads host data, retrying interrupted reads.
    pub fn read_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// The host reached end of file: the guest is told with a SHUTDOWN (SEND, plus RCV
    /// when the host hung up altogether).
    pub fn host_ended(&mut self) {
        self.host_eof = true;
        self.host_readable = false;
        self.pending.shutdown |= SHUTDOWN_SEND;
        if self.host_hup {
            self.pending.shutdown |= SHUTDOWN_RCV;
        }
    }

    /// The control packet that goes before any data, if owed.
    pub fn take_control_first(&mut self) -> Option<(Op, u32)> {
        if std::mem::take(&mut self.pending.request) {
            Some((Op::Request, 0))
        } else if std::mem::take(&mut self.pending.response) {
            Some((Op::Response, 0))
        } else {
            None
        }
    }

    /// The control packet that goes when no data can: credit, then SHUTDOWN.
    pub fn take_control_after(&mut self) -> Option<(Op, u32)> {
        if std::mem::take(&mut self.pending.credit_request) {
            Some((Op::CreditRequest, 0))
        } else if std::mem::take(&mut self.pending.credit_update) {
            Some((Op::CreditUpdate, 0))
        } else if self.pending.shutdown != 0 {
            Some((Op::Shutdown, std::mem::take(&mut self.pending.shutdown)))
        } else {
            None
        }
    }

    /// A packet header from us on this connection; the guest learns our credit from it.
    pub fn header(&mut self, guest_cid: u64, op: Op, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            socket_type: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }
}
