//! virtio-vsock (virtio 1.1 §5.10), stream sockets only, mapped to host Unix sockets with
//! no host vsock module: the "hybrid vsock" scheme Firecracker uses. docs/vsock.md gives
//! the host-side protocol.
//!
//! - Host → guest: a host process connects to the device's Unix listener and writes
//!   `CONNECT <port>\n`; the device picks a free host port, sends the guest a REQUEST and,
//!   on the guest's RESPONSE, writes `OK <host port>\n`. From then on the Unix stream is
//!   the connection.
//! - Guest → host: a REQUEST to CID 2 port P connects to the Unix listener `<path>_<P>`.
//!
//! Guest packets arrive on the TX queue and are handled synchronously on the notifying
//! vCPU; host streams are non-blocking and watched by the VMM's I/O loop, which calls
//! `backend_event` with the tag they were registered with. Everything read from the guest
//! or a host peer is checked: malformed packets are dropped, or answered with RST when
//! they name a connection. Memory is bounded: guest data waiting for a slow host stream
//! never exceeds the credit we advertise, host data is read only as far as the guest's
//! credit and its RX buffers allow, and owed control packets are per-connection flags or
//! a capped RST list.

mod connection;
pub mod packet;
mod sys;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, info, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::virtio_mmio::{guest_warn, Queues, VirtioDevice, WarnLimiter, NOTIFY_TAG_BASE};
use super::GuestMemory;
use crate::event_loop::Registrar;
use connection::{ConnKey, ConnState, Connection};
pub use connection::{BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
pub use packet::{
    parse_rx_buffer, parse_tx_packet, read_segments, write_rx_packet, Header, Op, PacketError,
    RxBuffer, Segment, TxError, TxPacket, HEADER_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TYPE_STREAM,
};

/// Virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Device → guest packets.
pub const RX_QUEUE: usize = 0;
/// Guest → device packets.
pub const TX_QUEUE: usize = 1;
/// Transport events (never used: this device does not migrate).
pub const EVENT_QUEUE: usize = 2;
/// I/O loop tag of the Unix listener (registered edge-triggered).
pub const TAG_LISTENER: u32 = 0;
/// I/O loop tag of the handshake/linger timer.
pub const TAG_TIMER: u32 = 1;
/// Host streams get tags from here up.
const FIRST_STREAM_TAG: u32 = 2;
/// Live connections at most; guest REQUESTs beyond get RST, host ones are closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host connections still owing their CONNECT line at most; more are closed at once.
pub const MAX_PENDING_HOSTS: usize = 256;
/// Longest `CONNECT <port>\n` line, newline included.
pub const CONNECT_LINE_MAX: usize = 64;
/// For the CONNECT line, and then for the guest's RESPONSE.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// For the host stream to take the guest data left when the guest closed.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(10);
/// RSTs owed to the guest that belong to no live connection (answers to stray packets,
/// closes of connections already forgotten), at most.
const MAX_QUEUED_RSTS: usize = 4096;
/// Host ports for host-initiated connections are picked from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Host-side errors of the vsock device, each naming the socket path involved.
#[derive(Debug, Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (3..=4294967294)")]
    InvalidCid(u64),
    #[error("vsock socket {}: something that is not a socket is in the way", .path.display())]
    NotASocket { path: PathBuf },
    #[error("vsock socket {}: a live listener is already there", .path.display())]
    InUse { path: PathBuf },
    #[error("vsock socket {}: cannot inspect or remove the old socket", .path.display())]
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock socket {}: cannot bind the listener", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock socket {}: cannot register with the I/O loop", .path.display())]
    Register {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock socket {}: cannot create the timer", .path.display())]
    Timer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where guest connections to host port `port` go: `<uds_path>_<port>`.
pub fn host_port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(uds_path.as_os_str());
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Parses a `CONNECT <port>` line (without its newline; a trailing `\r` is accepted).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // ASCII digits only, so valid UTF-8. u32::MAX is VMADDR_PORT_ANY, not a port.
    std::str::from_utf8(digits)
        .ok()?
        .parse::<u32>()
        .ok()
        .filter(|&p| p != u32::MAX)
}

/// Timeouts and limits; tests shorten them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_connections: usize,
    handshake_timeout: Duration,
    linger_timeout: Duration,
}

impl Limits {
    /// Deadlines are checked this often while any is pending.
    fn tick(&self) -> Duration {
        (self.handshake_timeout.min(self.linger_timeout) / 4)
            .clamp(Duration::from_millis(5), Duration::from_secs(1))
    }
}

const DEFAULT_LIMITS: Limits = Limits {
    max_connections: MAX_CONNECTIONS,
    handshake_timeout: HANDSHAKE_TIMEOUT,
    linger_timeout: LINGER_TIMEOUT,
};

/// A host connection that has not sent its CONNECT line yet.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: [u8; CONNECT_LINE_MAX],
    len: usize,
    deadline: Instant,
    watched: Option<EventSet>,
}

enum LineRead {
    /// Read everything available, no newline yet.
    Incomplete,
    /// `CONNECT <port>` and the bytes read past its newline.
    Connect(u32, Vec<u8>),
    Closed,
    Junk,
}

impl PendingHost {
    fn read_line(&mut self) -> LineRead {
        loop {
            if let Some(pos) = self.line[..self.len].iter().position(|&b| b == b'\n') {
                return match parse_connect_line(&self.line[..pos]) {
                    Some(port) => LineRead::Connect(port, self.line[pos + 1..self.len].to_vec()),
                    None => LineRead::Junk,
                };
            }
            if self.len == CONNECT_LINE_MAX {
                return LineRead::Junk;
            }
            match io::Read::read(&mut self.stream, &mut self.line[self.len..]) {
                Ok(0) => return LineRead::Closed,
                Ok(n) => self.len += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineRead::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return LineRead::Closed,
            }
        }
    }
}

/// Who owns an I/O loop tag.
#[derive(Debug, Clone, Copy)]
enum TagOwner {
    Pending,
    Conn(ConnKey),
    /// A connection the guest has left, still handing its last data to the host.
    Draining,
}

/// Outcome of filling one RX buffer from a connection.
enum Fill {
    /// Used length.
    Used(u32),
    /// Nothing to send after all (the host had no data): the buffer goes back.
    Nothing,
    /// The host stream failed: the connection is reset with this buffer.
    Reset,
}

/// Makes the I/O loop watch `fd` for `want` (nothing: not registered at all, so that a
/// hung-up stream does not report HUP over and over), tracking it in `current`.
fn set_watch(
    registrar: &Registrar,
    fd: RawFd,
    tag: u32,
    current: &mut Option<EventSet>,
    want: EventSet,
) -> io::Result<()> {
    if want.is_empty() {
        if current.take().is_some() {
            registrar.remove(fd)?;
        }
        return Ok(());
    }
    match *current {
        None => registrar.add(fd, tag, want)?,
        Some(now) if now == want => return Ok(()),
        Some(_) => registrar.modify(fd, tag, want)?,
    }
    *current = Some(want);
    Ok(())
}

/// The socket at `path` must be absent, or a socket nobody listens on (then removed).
fn clear_stale(path: &Path) -> Result<(), VsockError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(VsockError::Stale {
                path: path.into(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(VsockError::NotASocket { path: path.into() });
    }
    match sys::connect_nonblocking(path) {
        // Accepting, or with a full backlog: alive.
        Ok(_) => return Err(VsockError::InUse { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(VsockError::InUse { path: path.into() })
        }
        Err(_) => {}
    }
    info!(path = %path.display(), "vsock: removing stale socket");
    std::fs::remove_file(path).map_err(|source| VsockError::Stale {
        path: path.into(),
        source,
    })
}

/// Binds a listener at `path` with mode 0600: bound under a temporary name and renamed,
/// so it is never reachable with wider permissions. Returns it with the socket file's
/// (device, inode).
fn bind_private(path: &Path) -> Result<(UnixListener, (u64, u64)), VsockError> {
    let err = |source| VsockError::Bind {
        path: path.into(),
        source,
    };
    let mut tmp = OsString::from(path.as_os_str());
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&tmp);
    }
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::symlink_metadata(path))
        .and_then(|meta| listener.set_nonblocking(true).map(|()| meta));
    match placed {
        Ok(meta) => Ok((listener, (meta.dev(), meta.ino()))),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(err(e))
        }
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// (device, inode) of the socket file we created, so Drop removes only ours.
    socket_id: (u64, u64),
    listener: UnixListener,
    registrar: Registrar,
    timer: TimerFd,
    timer_armed: bool,
    /// accept() failed (e.g. out of fds): retried on the next timer tick, since the
    /// edge-triggered listener reports only new connections.
    accept_retry: bool,
    activated: bool,
    queue_max_sizes: [u16; 3],
    conns: HashMap<ConnKey, Connection>,
    /// Connections the guest reset after shutting its sending side, by tag: the data it
    /// sent before is still written to the host (until the linger deadline), then the
    /// stream is closed. They count against the connection limit.
    draining: HashMap<u32, Connection>,
    pending_hosts: HashMap<u32, PendingHost>,
    tags: HashMap<u32, TagOwner>,
    /// Live connections per host port.
    local_ports: HashMap<u32, u32>,
    next_tag: u32,
    next_local_port: u32,
    /// Connections with something for an RX buffer, served round-robin.
    ready: VecDeque<ConnKey>,
    /// RSTs for the guest that belong to no live connection.
    rst_queue: VecDeque<Header>,
    bounce: Vec<u8>,
    limits: Limits,
    warn: WarnLimiter,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("activated", &self.activated)
            .field("connections", &self.conns.len())
            .field("pending_hosts", &self.pending_hosts.len())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for guest `guest_cid` whose host side is the Unix listener at `uds_path`
    /// (mode 0600, non-blocking). A stale socket file there is replaced; anything else
    /// there, or a socket someone listens on, is an error. The listener (tag
    /// [`TAG_LISTENER`]) and a timer ([`TAG_TIMER`]) are registered with `registrar`; host
    /// streams get tags from 2 up.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        registrar: Registrar,
    ) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        clear_stale(&uds_path)?;
        let (listener, socket_id) = bind_private(&uds_path)?;
        let remove_socket = |e| {
            let _ = std::fs::remove_file(&uds_path);
            e
        };
        let timer_err = |source| VsockError::Timer {
            path: uds_path.clone(),
            source,
        };
        let timer = TimerFd::new()
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
            .and_then(|t| sys::set_nonblocking(&t).map(|()| t))
            .map_err(timer_err)
            .map_err(remove_socket)?;
        let register_err = |source| VsockError::Register {
            path: uds_path.clone(),
            source,
        };
        registrar
            .add(
                listener.as_raw_fd(),
                TAG_LISTENER,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            )
            .and_then(|()| registrar.add(timer.as_raw_fd(), TAG_TIMER, EventSet::IN))
            .map_err(register_err)
            .map_err(remove_socket)?;
        info!(path = %uds_path.display(), guest_cid, "vsock: listening");
        Ok(Vsock {
            guest_cid,
            uds_path,
            socket_id,
            listener,
            registrar,
            timer,
            timer_armed: false,
            accept_retry: false,
            activated: false,
            queue_max_sizes: [QUEUE_SIZE; 3],
            conns: HashMap::new(),
            draining: HashMap::new(),
            pending_hosts: HashMap::new(),
            tags: HashMap::new(),
            local_ports: HashMap::new(),
            next_tag: FIRST_STREAM_TAG,
            next_local_port: FIRST_LOCAL_PORT,
            ready: VecDeque::new(),
            rst_queue: VecDeque::new(),
            bounce: vec![0; MAX_PAYLOAD as usize],
            limits: DEFAULT_LIMITS,
            warn: WarnLimiter::default(),
        })
    }

    /// The listener host processes connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Live connections (established or in their handshake with the guest).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// What the connection limit counts: live connections and those still draining.
    fn live_connections(&self) -> usize {
        self.conns.len() + self.draining.len()
    }

    fn alloc_tag(&mut self) -> u32 {
        // At most MAX_PENDING_HOSTS + max_connections tags are in use: this ends.
        loop {
            let tag = self.next_tag;
            // Tags from NOTIFY_TAG_BASE up are the transport's queue notifications.
            self.next_tag = match tag + 1 {
                next if next >= NOTIFY_TAG_BASE => FIRST_STREAM_TAG,
                next => next,
            };
            if !self.tags.contains_key(&tag) {
                return tag;
            }
        }
    }

    /// A host port no live connection uses.
    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=self.limits.max_connections {
            let port = self.next_local_port;
            self.next_local_port = if port >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            if !self.local_ports.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let tick = self.limits.tick();
        match self.timer.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => warn!(error = %e, "vsock: cannot arm the timer; timeouts are late"),
        }
    }

    fn disarm_timer(&mut self) {
        if self.timer_armed {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    fn insert_conn(&mut self, conn: Connection) {
        let key = conn.key;
        self.tags.insert(conn.tag, TagOwner::Conn(key));
        *self.local_ports.entry(key.local_port).or_insert(0) += 1;
        self.conns.insert(key, conn);
    }

    /// Closes a connection's host stream and forgets it; with `send_rst`, tells the guest.
    fn kill(&mut self, key: ConnKey, send_rst: bool) {
        let Some(mut conn) = self.forget(key) else {
            return;
        };
        if conn.watched.take().is_some() {
            let _ = self.registrar.remove(conn.stream.as_raw_fd());
        }
        debug!(
            local_port = key.local_port,
            peer_port = key.peer_port,
            rst = send_rst,
            "vsock: connection closed"
        );
        if send_rst {
            self.push_rst(Header {
                src_port: key.local_port,
                dst_port: key.peer_port,
                ..Header::default()
            });
        }
    }

    /// The guest reset connection `key`. Linux sends this RST on its own when the host
    /// side has not closed within 8 s of the guest's `close()` (its close timeout), while
    /// the data the guest sent before its SHUTDOWN(SEND) may still be waiting for a slow
    /// host: closing the stream now would give the host an EOF in the middle of the data,
    /// indistinguishable from the end. So that data is still written (until the linger
    /// deadline) before the stream is closed. Without a SHUTDOWN(SEND) first, the guest
    /// aborted the stream: it is closed at once.
    fn guest_reset(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if !conn.guest_shut_send || !conn.wants_output() {
            self.kill(key, false);
            return;
        }
        let Some(mut conn) = self.forget(key) else {
            return;
        };
        // Nothing goes to the guest any more, and nothing is read from the host.
        conn.pending = Default::default();
        conn.host_readable = false;
        conn.staged = VecDeque::new();
        let linger = self.limits.linger_timeout;
        let deadline = *conn.deadline.get_or_insert_with(|| Instant::now() + linger);
        let tag = conn.tag;
        if let Err(e) = set_watch(
            &self.registrar,
            conn.stream.as_raw_fd(),
            tag,
            &mut conn.watched,
            EventSet::OUT,
        ) {
            warn!(
                local_port = key.local_port,
                peer_port = key.peer_port,
                error = %e,
                "vsock: cannot watch the host stream, undelivered guest data dropped"
            );
            self.close_draining(conn);
            return;
        }
        debug!(
            local_port = key.local_port,
            peer_port = key.peer_port,
            buffered = conn.tx_buf.len(),
            left_ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            "vsock: guest reset after closing; still writing its data to the host"
        );
        self.tags.insert(tag, TagOwner::Draining);
        self.draining.insert(tag, conn);
        self.arm_timer();
    }

    /// Host stream `tag` of a draining connection is ready: write more, close when done.
    fn drain_event(&mut self, tag: u32, events: EventSet) {
        let linger = self.limits.linger_timeout;
        let Some(conn) = self.draining.get_mut(&tag) else {
            return;
        };
        let failed = events.intersects(EventSet::ERROR | EventSet::HANG_UP)
            || match conn.flush() {
                Ok(progress) => {
                    if progress {
                        conn.deadline = Some(Instant::now() + linger);
                    }
                    false
                }
                Err(_) => true,
            };
        if failed || !conn.wants_output() {
            if let Some(conn) = self.draining.remove(&tag) {
                self.tags.remove(&tag);
                if failed {
                    debug!(
                        local_port = conn.key.local_port,
                        peer_port = conn.key.peer_port,
                        "vsock: host stream failed while draining, guest data dropped"
                    );
                }
                self.close_draining(conn);
            }
        }
    }

    /// Closes a draining connection's stream; the host reads EOF after what was written.
    fn close_draining(&mut self, mut conn: Connection) {
        if conn.watched.take().is_some() {
            let _ = self.registrar.remove(conn.stream.as_raw_fd());
        }
        self.tags.remove(&conn.tag);
        debug!(
            local_port = conn.key.local_port,
            peer_port = conn.key.peer_port,
            undelivered = conn.tx_buf.len(),
            "vsock: drained connection closed"
        );
    }

    /// Removes a live connection from every index without closing its stream.
    fn forget(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        self.tags.remove(&conn.tag);
        if conn.queued {
            // Keeps the ready list to live connections, whatever the guest churns.
            self.ready.retain(|k| *k != key);
        }
        if let Some(n) = self.local_ports.get_mut(&key.local_port) {
            *n -= 1;
            if *n == 0 {
                self.local_ports.remove(&key.local_port);
            }
        }
        Some(conn)
    }

    /// Queues an RST to the guest from host port `src_port` to guest port `dst_port`.
    fn push_rst(&mut self, ports: Header) {
        if self.rst_queue.len() >= MAX_QUEUED_RSTS {
            guest_warn!(
                self.warn,
                local_port = ports.src_port,
                peer_port = ports.dst_port,
                "vsock: too many RSTs owed to the guest, one dropped"
            );
            return;
        }
        self.rst_queue.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: ports.src_port,
            dst_port: ports.dst_port,
            len: 0,
            socket_type: TYPE_STREAM,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Answers guest packet `h` with an RST.
    fn reply_rst(&mut self, h: &Header) {
        self.push_rst(Header {
            src_port: h.dst_port,
            dst_port: h.src_port,
            ..Header::default()
        });
    }

    /// Brings a connection's bookkeeping up to date after anything changed: shutdowns,
    /// owed credit packets, closing when both directions are over, what the I/O loop
    /// watches, and its place in the ready list.
    fn refresh(&mut self, key: ConnKey) {
        let linger = self.limits.linger_timeout;
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.apply_shutdowns();
        if conn.guest_shut_send {
            // It sends no more: our credit is of no use to it.
            conn.pending.credit_update = false;
        } else if conn.fwd_cnt.wrapping_sub(conn.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            conn.pending.credit_update = true;
        }
        if conn.state == ConnState::Established
            && !conn.guest_shut_rcv
            && conn.data_waiting()
            && conn.peer_credit() == 0
            && !conn.credit_requested
        {
            conn.pending.credit_request = true;
            conn.credit_requested = true;
        }
        if conn.guest_shut_send
            && conn.guest_shut_rcv
            && conn.wants_output()
            && conn.deadline.is_none()
        {
            conn.deadline = Some(Instant::now() + linger);
        }
        if conn.finished() {
            self.kill(key, true);
            return;
        }
        let want = conn.interest();
        if let Err(e) = set_watch(
            &self.registrar,
            conn.stream.as_raw_fd(),
            conn.tag,
            &mut conn.watched,
            want,
        ) {
            warn!(
                local_port = key.local_port,
                peer_port = key.peer_port,
                error = %e,
                "vsock: cannot watch the host stream, connection reset"
            );
            self.kill(key, true);
            return;
        }
        if !conn.queued && conn.has_rx_work() {
            conn.queued = true;
            self.ready.push_back(key);
        }
        if conn.deadline.is_some() {
            self.arm_timer();
        }
    }

    // ---- Guest packets ----

    fn process_tx(&mut self, queues: &mut Queues<'_>, mem: &GuestMemory) -> bool {
        let Some(txq) = queues.get(TX_QUEUE) else {
            guest_warn!(self.warn, "vsock: TX notify without a ready TX queue");
            return false;
        };
        // Snapshot what is available now (at most the queue size); later chains come
        // with their own notification, or the transport runs another pass for them.
        let chains: Vec<(u16, Vec<Descriptor>)> = match txq.iter(mem) {
            Ok(iter) => iter.map(|c| (c.head_index(), c.collect())).collect(),
            Err(e) => {
                guest_warn!(self.warn, error = %e, "vsock: cannot read the TX available ring");
                return false;
            }
        };
        let mut used = false;
        for (head, descs) in chains {
            match parse_tx_packet(&descs, mem, self.guest_cid) {
                Ok(pkt) => self.guest_packet(&pkt, mem),
                Err(e) => self.bad_packet(&e),
            }
            match txq.add_used(mem, head, 0) {
                Ok(()) => used = true,
                Err(e) => {
                    guest_warn!(self.warn, head, error = %e, "vsock: cannot return a TX chain")
                }
            }
        }
        used
    }

    /// A chain that failed `parse_tx_packet`: dropped, and answered with RST when its
    /// header names a connection of this guest (never an RST with an RST).
    fn bad_packet(&mut self, e: &TxError) {
        let Some(h) = e.header else {
            guest_warn!(self.warn, error = %e, "vsock: malformed TX chain dropped");
            return;
        };
        guest_warn!(
            self.warn,
            local_port = h.dst_port,
            peer_port = h.src_port,
            op = h.op,
            error = %e,
            "vsock: bad packet"
        );
        if h.src_cid != self.guest_cid || h.op == Op::Rst as u16 {
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.dst_cid == HOST_CID && self.conns.contains_key(&key) {
            self.kill(key, true);
        } else {
            self.reply_rst(&h);
        }
    }

    fn guest_packet(&mut self, pkt: &TxPacket, mem: &GuestMemory) {
        let h = pkt.header;
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match pkt.op {
                Op::Request => self.guest_connect(key, &h),
                Op::Rst => {}
                op => {
                    debug!(
                        local_port = key.local_port,
                        peer_port = key.peer_port,
                        ?op,
                        "vsock: packet for no connection, reset"
                    );
                    self.reply_rst(&h);
                }
            }
            return;
        };
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        let verdict: Result<(), String> = match (conn.state, pkt.op) {
            (_, Op::Rst) => {
                debug!(
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    "vsock: guest reset the connection"
                );
                self.guest_reset(key);
                return;
            }
            (ConnState::Connecting, Op::Response) => {
                conn.state = ConnState::Established;
                conn.deadline = None;
                conn.host_out = format!("OK {}\n", key.local_port).into_bytes();
                debug!(
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    "vsock: guest accepted a host connection"
                );
                conn.flush().map(|_| ()).map_err(|e| e.to_string())
            }
            (ConnState::Established, Op::Rw) => {
                let len = h.len as usize;
                // len <= MAX_PAYLOAD == bounce.len(), checked by the parser.
                match self.bounce.get_mut(..len) {
                    Some(buf) => match read_segments(mem, &pkt.payload, buf) {
                        Ok(()) => conn.take_guest_data(buf).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    None => Err(format!("payload of {len} bytes")),
                }
            }
            (ConnState::Established, Op::CreditUpdate) => Ok(()),
            (ConnState::Established, Op::CreditRequest) => {
                conn.pending.credit_update = true;
                Ok(())
            }
            (ConnState::Established, Op::Shutdown) => {
                if h.flags & !(SHUTDOWN_RCV | SHUTDOWN_SEND) != 0 {
                    Err(format!("SHUTDOWN with unknown flags {:#x}", h.flags))
                } else {
                    conn.guest_shut_rcv |= h.flags & SHUTDOWN_RCV != 0;
                    conn.guest_shut_send |= h.flags & SHUTDOWN_SEND != 0;
                    debug!(
                        local_port = key.local_port,
                        peer_port = key.peer_port,
                        flags = h.flags,
                        "vsock: guest shut the connection down"
                    );
                    Ok(())
                }
            }
            (state, op) => Err(format!("{op:?} in state {state:?}")),
        };
        match verdict {
            Ok(()) => self.refresh(key),
            Err(why) => {
                guest_warn!(
                    self.warn,
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    why,
                    "vsock: connection reset"
                );
                self.kill(key, true);
            }
        }
    }

    /// A guest REQUEST naming no connection: connect to `<path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, h: &Header) {
        if self.live_connections() >= self.limits.max_connections {
            guest_warn!(
                self.warn,
                local_port = key.local_port,
                peer_port = key.peer_port,
                limit = self.limits.max_connections,
                "vsock: connection limit reached, guest REQUEST reset"
            );
            self.reply_rst(h);
            return;
        }
        let path = host_port_path(&self.uds_path, key.local_port);
        match sys::connect_nonblocking(&path) {
            Ok(stream) => {
                let tag = self.alloc_tag();
                let mut conn = Connection::new(key, tag, stream, ConnState::Established);
                conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
                conn.pending.response = true;
                self.insert_conn(conn);
                debug!(
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    path = %path.display(),
                    "vsock: guest connected to the host"
                );
                self.refresh(key);
            }
            Err(e) => {
                debug!(
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    path = %path.display(),
                    error = %e,
                    "vsock: no host listener, guest REQUEST reset"
                );
                self.reply_rst(h);
            }
        }
    }

    // ---- Host side ----

    fn accept_all(&mut self) {
        // Edge-triggered: the backlog must be drained every time.
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_pending(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    warn!(
                        path = %self.uds_path.display(),
                        error = %e,
                        "vsock: accept failed, retrying shortly"
                    );
                    self.accept_retry = true;
                    self.arm_timer();
                    break;
                }
            }
        }
    }

    fn add_pending(&mut self, stream: UnixStream) {
        if self.pending_hosts.len() >= MAX_PENDING_HOSTS
            || self.live_connections() >= self.limits.max_connections
        {
            warn!(
                connections = self.conns.len(),
                pending = self.pending_hosts.len(),
                "vsock: too many host connections, one closed"
            );
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            warn!(error = %e, "vsock: cannot make a host stream non-blocking, closed");
            return;
        }
        let tag = self.alloc_tag();
        let mut pending = PendingHost {
            stream,
            line: [0; CONNECT_LINE_MAX],
            len: 0,
            deadline: Instant::now() + self.limits.handshake_timeout,
            watched: None,
        };
        if self.activated {
            let fd = pending.stream.as_raw_fd();
            if let Err(e) = set_watch(&self.registrar, fd, tag, &mut pending.watched, EventSet::IN)
            {
                warn!(error = %e, "vsock: cannot watch a host stream, closed");
                return;
            }
        }
        self.tags.insert(tag, TagOwner::Pending);
        self.pending_hosts.insert(tag, pending);
        self.arm_timer();
    }

    fn drop_pending(&mut self, tag: u32) -> Option<PendingHost> {
        let mut pending = self.pending_hosts.remove(&tag)?;
        self.tags.remove(&tag);
        if pending.watched.take().is_some() {
            let _ = self.registrar.remove(pending.stream.as_raw_fd());
        }
        Some(pending)
    }

    fn pending_event(&mut self, tag: u32) {
        let Some(pending) = self.pending_hosts.get_mut(&tag) else {
            return;
        };
        match pending.read_line() {
            LineRead::Incomplete => {}
            LineRead::Closed => {
                debug!("vsock: host closed before its CONNECT line");
                self.drop_pending(tag);
            }
            LineRead::Junk => {
                let len = pending.len;
                warn!(len, "vsock: host sent no valid CONNECT line, closed");
                self.drop_pending(tag);
            }
            LineRead::Connect(port, early) => {
                if let Some(pending) = self.drop_pending(tag) {
                    self.host_connect(pending.stream, port, early);
                }
            }
        }
    }

    /// A valid `CONNECT <port>`: a new connection, REQUEST owed to the guest.
    fn host_connect(&mut self, stream: UnixStream, port: u32, early: Vec<u8>) {
        if self.live_connections() >= self.limits.max_connections {
            warn!(
                peer_port = port,
                limit = self.limits.max_connections,
                "vsock: connection limit reached, host connection closed"
            );
            return;
        }
        let Some(local_port) = self.alloc_local_port() else {
            warn!(
                peer_port = port,
                "vsock: no free host port, host connection closed"
            );
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let tag = self.alloc_tag();
        let mut conn = Connection::new(key, tag, stream, ConnState::Connecting);
        conn.staged = early.into();
        conn.pending.request = true;
        conn.deadline = Some(Instant::now() + self.limits.handshake_timeout);
        self.insert_conn(conn);
        debug!(
            local_port,
            peer_port = port,
            "vsock: host connecting to the guest"
        );
        self.refresh(key);
    }

    fn conn_event(&mut self, key: ConnKey, events: EventSet) {
        let linger = self.limits.linger_timeout;
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            debug!(
                local_port = key.local_port,
                peer_port = key.peer_port,
                "vsock: host stream error, connection reset"
            );
            self.kill(key, true);
            return;
        }
        if events.contains(EventSet::HANG_UP) {
            conn.host_hup = true;
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP)
            && conn.state == ConnState::Established
            && !conn.host_eof
            && !conn.guest_shut_rcv
        {
            conn.host_readable = true;
        }
        if conn.wants_output() {
            match conn.flush() {
                // The linger deadline only ends a host that stopped reading.
                Ok(true) if conn.state == ConnState::Established && conn.deadline.is_some() => {
                    conn.deadline = Some(Instant::now() + linger);
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(
                        local_port = key.local_port,
                        peer_port = key.peer_port,
                        error = %e,
                        "vsock: host stream write failed, connection reset"
                    );
                    self.kill(key, true);
                    return;
                }
            }
            if conn.host_hup && conn.wants_output() {
                debug!(
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    "vsock: host hung up with guest data unwritten, connection reset"
                );
                self.kill(key, true);
                return;
            }
        }
        self.refresh(key);
    }

    fn timer_tick(&mut self) {
        // Non-blocking: a stale readiness report reads nothing.
        let _ = self.timer.wait();
        if std::mem::take(&mut self.accept_retry) {
            self.accept_all();
        }
        let now = Instant::now();
        // Until the driver is ready, host connections wait (their clock starts then).
        let activated = self.activated;
        let expired: Vec<u32> = self
            .pending_hosts
            .iter()
            .filter(|(_, p)| activated && p.deadline <= now)
            .map(|(&tag, _)| tag)
            .collect();
        for tag in expired {
            debug!("vsock: host sent no CONNECT line in time, closed");
            self.drop_pending(tag);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(|c| c.key)
            .collect();
        for key in expired {
            debug!(
                local_port = key.local_port,
                peer_port = key.peer_port,
                "vsock: connection timed out, reset"
            );
            self.kill(key, true);
        }
        let expired: Vec<u32> = self
            .draining
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&tag, _)| tag)
            .collect();
        for tag in expired {
            if let Some(conn) = self.draining.remove(&tag) {
                debug!(
                    local_port = conn.key.local_port,
                    peer_port = conn.key.peer_port,
                    "vsock: host did not take the guest's last data in time"
                );
                self.close_draining(conn);
            }
        }
        if !self.accept_retry
            && self.pending_hosts.is_empty()
            && self.draining.is_empty()
            && self.conns.values().all(|c| c.deadline.is_none())
        {
            self.disarm_timer();
        }
    }

    // ---- RX ----

    /// The next connection in the ready list with something for the guest.
    fn next_ready(&mut self) -> Option<ConnKey> {
        while let Some(key) = self.ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            if conn.has_rx_work() {
                return Some(key);
            }
        }
        None
    }

    fn requeue_front(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.queued = true;
            self.ready.push_front(key);
        }
    }

    /// Fills RX buffers with owed RSTs, then round-robin from ready connections, until
    /// either runs out. Returns whether any buffer was used.
    fn process_rx(&mut self, queues: &mut Queues<'_>, mem: &GuestMemory) -> bool {
        let Some(rxq) = queues.get(RX_QUEUE) else {
            return false;
        };
        let mut used = false;
        // Each empty-handed visit clears what made a connection ready, so a streak longer
        // than the connection count would be a bug: never spin on it under the lock.
        let mut empty_visits = 0usize;
        loop {
            let source = if self.rst_queue.is_empty() {
                match self.next_ready() {
                    Some(key) => Some(key),
                    None => break,
                }
            } else {
                None
            };
            let Some(chain) = rxq.pop_descriptor_chain(mem) else {
                if let Some(key) = source {
                    self.requeue_front(key);
                }
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let len = match parse_rx_buffer(&descs, mem) {
                Err(e) => {
                    guest_warn!(self.warn, head, error = %e, "vsock: unusable RX buffer returned empty");
                    if let Some(key) = source {
                        self.requeue_front(key);
                    }
                    0
                }
                Ok(buf) => match source {
                    None => match self.rst_queue.pop_front() {
                        Some(rst) => self.write_packet(mem, &buf, &rst, 0),
                        None => 0,
                    },
                    Some(key) => match self.fill_from_conn(key, &buf, mem) {
                        Fill::Used(len) => {
                            self.refresh(key);
                            len
                        }
                        Fill::Nothing => {
                            rxq.go_to_previous_position();
                            self.refresh(key);
                            empty_visits += 1;
                            if empty_visits > self.conns.len() {
                                warn!("vsock: RX fill made no progress, deferred");
                                break;
                            }
                            continue;
                        }
                        Fill::Reset => {
                            let rst = Header {
                                src_cid: HOST_CID,
                                dst_cid: self.guest_cid,
                                src_port: key.local_port,
                                dst_port: key.peer_port,
                                socket_type: TYPE_STREAM,
                                op: Op::Rst as u16,
                                ..Header::default()
                            };
                            self.kill(key, false);
                            self.write_packet(mem, &buf, &rst, 0)
                        }
                    },
                },
            };
            empty_visits = 0;
            match rxq.add_used(mem, head, len) {
                Ok(()) => used = true,
                Err(e) => {
                    guest_warn!(self.warn, head, error = %e, "vsock: cannot return an RX chain")
                }
            }
        }
        used
    }

    /// Writes a packet with `payload_len` bytes of the bounce buffer; the used length.
    fn write_packet(
        &mut self,
        mem: &GuestMemory,
        buf: &RxBuffer,
        h: &Header,
        payload_len: usize,
    ) -> u32 {
        let payload = self.bounce.get(..payload_len).unwrap_or_default();
        match write_rx_packet(mem, buf, h, payload) {
            Ok(len) => len,
            Err(e) => {
                guest_warn!(
                    self.warn,
                    local_port = h.src_port,
                    peer_port = h.dst_port,
                    error = %e,
                    "vsock: cannot write an RX packet"
                );
                0
            }
        }
    }

    /// One packet from connection `key` into `buf`: owed REQUEST/RESPONSE first, then
    /// data as far as the guest's credit and the buffer allow, then credit packets and
    /// SHUTDOWN.
    fn fill_from_conn(&mut self, key: ConnKey, buf: &RxBuffer, mem: &GuestMemory) -> Fill {
        let guest_cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else {
            return Fill::Nothing;
        };
        let (header, payload_len) = if let Some((op, flags)) = conn.take_control_first() {
            (conn.header(guest_cid, op, flags), 0)
        } else if conn.can_send_data() {
            // Each bound is at most MAX_PAYLOAD == bounce.len().
            let room = buf
                .payload_room()
                .min(u64::from(conn.peer_credit()))
                .min(u64::from(MAX_PAYLOAD)) as usize;
            if room == 0 {
                // A buffer with no room past the header: tell the guest our credit.
                (conn.header(guest_cid, Op::CreditUpdate, 0), 0)
            } else if !conn.staged.is_empty() {
                let n = room.min(conn.staged.len());
                let (front, back) = conn.staged.as_slices();
                let from_front = n.min(front.len());
                self.bounce[..from_front].copy_from_slice(&front[..from_front]);
                self.bounce[from_front..n].copy_from_slice(&back[..n - from_front]);
                conn.staged.drain(..n);
                (conn.header(guest_cid, Op::Rw, 0), n)
            } else {
                // As much as the guest can take, not just this buffer's worth: the rest
                // is staged for the next buffers (at most MAX_PAYLOAD == bounce.len()).
                let ahead = (conn.peer_credit().min(MAX_PAYLOAD) as usize).max(room);
                match conn.read_host(&mut self.bounce[..ahead]) {
                    Ok(0) => {
                        debug!(
                            local_port = key.local_port,
                            peer_port = key.peer_port,
                            hung_up = conn.host_hup,
                            "vsock: host stream ended"
                        );
                        conn.host_ended();
                        match conn.take_control_after() {
                            Some((op, flags)) => (conn.header(guest_cid, op, flags), 0),
                            None => return Fill::Nothing,
                        }
                    }
                    Ok(n) => {
                        if let Some(rest) = self.bounce.get(room..n) {
                            conn.staged.extend(rest);
                        }
                        (conn.header(guest_cid, Op::Rw, 0), n.min(room))
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.host_readable = false;
                        return Fill::Nothing;
                    }
                    Err(e) => {
                        debug!(
                            local_port = key.local_port,
                            peer_port = key.peer_port,
                            error = %e,
                            "vsock: host stream read failed, connection reset"
                        );
                        return Fill::Reset;
                    }
                }
            }
        } else if let Some((op, flags)) = conn.take_control_after() {
            (conn.header(guest_cid, op, flags), 0)
        } else {
            return Fill::Nothing;
        };
        if payload_len > 0 {
            // payload_len <= MAX_PAYLOAD.
            conn.sent_cnt = conn.sent_cnt.wrapping_add(payload_len as u32);
        }
        let len = self.write_packet(mem, buf, &header, payload_len);
        if len == 0 {
            // The packet is lost: the connection cannot go on consistently.
            self.kill(key, true);
        }
        Fill::Used(len)
    }

    // ---- Test hooks ----

    /// What the I/O loop watches: (fd, tag, events) for every registered fd.
    #[cfg(test)]
    fn watch_list(&self) -> Vec<(RawFd, u32, EventSet)> {
        let mut list = vec![
            (
                self.listener.as_raw_fd(),
                TAG_LISTENER,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (self.timer.as_raw_fd(), TAG_TIMER, EventSet::IN),
        ];
        for (&tag, p) in &self.pending_hosts {
            if let Some(events) = p.watched {
                list.push((p.stream.as_raw_fd(), tag, events));
            }
        }
        for conn in self.conns.values().chain(self.draining.values()) {
            if let Some(events) = conn.watched {
                list.push((conn.stream.as_raw_fd(), conn.tag, events));
            }
        }
        list
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        // Stream sockets only: no VIRTIO_VSOCK_F_SEQPACKET.
        0
    }

    /// `struct virtio_vsock_config`: `guest_cid`, le64.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio_mmio::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        guest_warn!(
            self.warn,
            offset,
            len = data.len(),
            "vsock: config space write ignored"
        );
    }

    fn activate(&mut self, _acked_features: u64) {
        self.activated = true;
        // Host connections kept across a reset are watched again; those that queued up
        // while the driver was not ready are accepted now.
        let tags: Vec<u32> = self.pending_hosts.keys().copied().collect();
        // Their handshake time starts now: a host may connect long before the guest's
        // driver is up (the runtime does, while the VM boots).
        let deadline = Instant::now() + self.limits.handshake_timeout;
        for tag in tags {
            if let Some(p) = self.pending_hosts.get_mut(&tag) {
                p.deadline = deadline;
                let fd = p.stream.as_raw_fd();
                if set_watch(&self.registrar, fd, tag, &mut p.watched, EventSet::IN).is_err() {
                    self.drop_pending(tag);
                }
            }
        }
        self.accept_all();
        if !self.pending_hosts.is_empty() {
            self.arm_timer();
        }
        debug!(guest_cid = self.guest_cid, "vsock: activated");
    }

    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>, mem: &GuestMemory) -> bool {
        let used = match index {
            // New RX buffers: the fill below uses them.
            RX_QUEUE | EVENT_QUEUE => false,
            TX_QUEUE => self.process_tx(queues, mem),
            _ => {
                guest_warn!(self.warn, index, "vsock: notify for a missing queue");
                return false;
            }
        };
        self.process_rx(queues, mem) | used
    }

    fn backend_event(
        &mut self,
        tag: u32,
        events: EventSet,
        queues: &mut Queues<'_>,
        mem: &GuestMemory,
    ) -> bool {
        match tag {
            TAG_LISTENER => self.accept_all(),
            TAG_TIMER => self.timer_tick(),
            _ => match self.tags.get(&tag) {
                Some(TagOwner::Pending) => self.pending_event(tag),
                Some(&TagOwner::Conn(key)) => self.conn_event(key, events),
                Some(TagOwner::Draining) => self.drain_event(tag, events),
                // Stale: the fd was closed after the loop saw it ready.
                None => {}
            },
        }
        self.process_rx(queues, mem)
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        let count = keys.len();
        for key in keys {
            self.kill(key, false);
        }
        let draining: Vec<Connection> = self.draining.drain().map(|(_, c)| c).collect();
        for conn in draining {
            self.close_draining(conn);
        }
        // Host connections still owing their CONNECT line wait, unwatched, for the next
        // activation (the transport passes no events while the device is reset).
        for p in self.pending_hosts.values_mut() {
            let fd = p.stream.as_raw_fd();
            let _ = set_watch(&self.registrar, fd, 0, &mut p.watched, EventSet::empty());
        }
        self.ready.clear();
        self.rst_queue.clear();
        self.accept_retry = false;
        self.disarm_timer();
        self.activated = false;
        debug!(closed = count, "vsock: reset, connections closed");
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Only the socket we created: someone may have replaced it since.
        let ours = std::fs::symlink_metadata(&self.uds_path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.socket_id);
        if ours {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}
