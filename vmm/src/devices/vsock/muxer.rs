//! The host side of the device: the Unix listener and the `CONNECT` handshake of host
//! connections, the connection table and its I/O-loop tags, RSTs owed to the guest, and
//! the handshake/linger timer.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnKey, ConnState, Connection, CREDIT_UPDATE_THRESHOLD};
use super::device::Vsock;
use super::packet::{Header, Op, HOST_CID, TYPE_STREAM};
use super::{
    sys, VsockError, CONNECT_LINE_MAX, FIRST_LOCAL_PORT, FIRST_STREAM_TAG, HANDSHAKE_TIMEOUT,
    LINGER_TIMEOUT, MAX_CONNECTIONS, MAX_PENDING_HOSTS, MAX_QUEUED_RSTS,
};
use crate::devices::guest_warn::guest_warn;
use crate::devices::virtio::mmio::NOTIFY_TAG_BASE;
use crate::event_loop::Registrar;

/// Where guest connections to host port `port` go: `<uds_path>_<port>`.
pub use vmm_api::vsock::host_port_path;

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
pub(super) struct Limits {
    pub(super) max_connections: usize,
    pub(super) handshake_timeout: Duration,
    pub(super) linger_timeout: Duration,
}

impl Limits {
    /// Deadlines are checked this often while any is pending.
    pub(super) fn tick(&self) -> Duration {
        (self.handshake_timeout.min(self.linger_timeout) / 4)
            .clamp(Duration::from_millis(5), Duration::from_secs(1))
    }
}

pub(super) const DEFAULT_LIMITS: Limits = Limits {
    max_connections: MAX_CONNECTIONS,
    handshake_timeout: HANDSHAKE_TIMEOUT,
    linger_timeout: LINGER_TIMEOUT,
};

/// A host connection that has not sent its CONNECT line yet.
#[derive(Debug)]
pub(super) struct PendingHost {
    pub(super) stream: UnixStream,
    pub(super) line: [u8; CONNECT_LINE_MAX],
    pub(super) len: usize,
    pub(super) deadline: Instant,
    pub(super) watched: Option<EventSet>,
}

pub(super) enum LineRead {
    /// Read everything available, no newline yet.
    Incomplete,
    /// `CONNECT <port>` and the bytes read past its newline.
    Connect(u32, Vec<u8>),
    Closed,
    Junk,
}

impl PendingHost {
    pub(super) fn read_line(&mut self) -> LineRead {
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
pub(super) enum TagOwner {
    Pending,
    Conn(ConnKey),
    /// A connection the guest has left, still handing its last data to the host.
    Draining,
}

/// Makes the I/O loop watch `fd` for `want` (nothing: not registered at all, so that a
/// hung-up stream does not report HUP over and over), tracking it in `current`.
pub(super) fn set_watch(
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
pub(super) fn clear_stale(path: &Path) -> Result<(), VsockError> {
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
pub(super) fn bind_private(path: &Path) -> Result<(UnixListener, (u64, u64)), VsockError> {
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

impl Vsock {
    pub(super) fn alloc_tag(&mut self) -> u32 {
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
    pub(super) fn alloc_local_port(&mut self) -> Option<u32> {
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

    pub(super) fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let tick = self.limits.tick();
        match self.timer.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => warn!(error = %e, "vsock: cannot arm the timer; timeouts are late"),
        }
    }

    pub(super) fn disarm_timer(&mut self) {
        if self.timer_armed {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    pub(super) fn insert_conn(&mut self, conn: Connection) {
        let key = conn.key;
        self.tags.insert(conn.tag, TagOwner::Conn(key));
        *self.local_ports.entry(key.local_port).or_insert(0) += 1;
        self.conns.insert(key, conn);
    }

    /// Closes a connection's host stream and forgets it; with `send_rst`, tells the guest.
    pub(super) fn kill(&mut self, key: ConnKey, send_rst: bool) {
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
    pub(super) fn guest_reset(&mut self, key: ConnKey) {
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
    pub(super) fn drain_event(&mut self, tag: u32, events: EventSet) {
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
    pub(super) fn close_draining(&mut self, mut conn: Connection) {
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
    pub(super) fn forget(&mut self, key: ConnKey) -> Option<Connection> {
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
    pub(super) fn push_rst(&mut self, ports: Header) {
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
    pub(super) fn reply_rst(&mut self, h: &Header) {
        self.push_rst(Header {
            src_port: h.dst_port,
            dst_port: h.src_port,
            ..Header::default()
        });
    }

    /// Brings a connection's bookkeeping up to date after anything changed: shutdowns,
    /// owed credit packets, closing when both directions are over, what the I/O loop
    /// watches, and its place in the ready list.
    pub(super) fn refresh(&mut self, key: ConnKey) {
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

    // ---- Host side ----

    pub(super) fn accept_all(&mut self) {
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

    pub(super) fn add_pending(&mut self, stream: UnixStream) {
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

    pub(super) fn drop_pending(&mut self, tag: u32) -> Option<PendingHost> {
        let mut pending = self.pending_hosts.remove(&tag)?;
        self.tags.remove(&tag);
        if pending.watched.take().is_some() {
            let _ = self.registrar.remove(pending.stream.as_raw_fd());
        }
        Some(pending)
    }

    pub(super) fn pending_event(&mut self, tag: u32) {
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
    pub(super) fn host_connect(&mut self, stream: UnixStream, port: u32, early: Vec<u8>) {
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

    pub(super) fn conn_event(&mut self, key: ConnKey, events: EventSet) {
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

    pub(super) fn timer_tick(&mut self) {
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
}
