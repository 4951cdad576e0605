//! The virtio-vsock device: guest packets from the TX queue applied to their
//! connections, RX buffers filled with owed RSTs and connection data, and the
//! `VirtioDevice` entry points.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{debug, info, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, ConnState, Connection};
use super::muxer::{
    bind_private, clear_stale, host_port_path, set_watch, Limits, PendingHost, TagOwner,
    DEFAULT_LIMITS,
};
use super::packet::{
    parse_rx_buffer, parse_tx_packet, read_segments, write_rx_packet, Header, Op, RxBuffer,
    TxError, TxPacket, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{
    sys, VsockError, EVENT_QUEUE, FIRST_LOCAL_PORT, FIRST_STREAM_TAG, QUEUE_SIZE, RX_QUEUE,
    TAG_LISTENER, TAG_TIMER, TX_QUEUE, VIRTIO_ID_VSOCK,
};
use crate::devices::guest_warn::{guest_warn, WarnLimiter};
use crate::devices::virtio::{read_config_bytes, Queues, VirtioDevice};
use crate::devices::GuestMemory;
use crate::event_loop::Registrar;

/// Outcome of filling one RX buffer from a connection.
enum Fill {
    /// Used length.
    Used(u32),
    /// Nothing to send after all (the host had no data): the buffer goes back.
    Nothing,
    /// The host stream failed: the connection is reset with this buffer.
    Reset,
}

/// The virtio-vsock device.
pub struct Vsock {
    pub(super) guest_cid: u64,
    pub(super) uds_path: PathBuf,
    /// (device, inode) of the socket file we created, so Drop removes only ours.
    pub(super) socket_id: (u64, u64),
    pub(super) listener: UnixListener,
    pub(super) registrar: Registrar,
    pub(super) timer: TimerFd,
    pub(super) timer_armed: bool,
    /// accept() failed (e.g. out of fds): retried on the next timer tick, since the
    /// edge-triggered listener reports only new connections.
    pub(super) accept_retry: bool,
    pub(super) activated: bool,
    pub(super) queue_max_sizes: [u16; 3],
    pub(super) conns: HashMap<ConnKey, Connection>,
    /// Connections the guest reset after shutting its sending side, by tag: the data it
    /// sent before is still written to the host (until the linger deadline), then the
    /// stream is closed. They count against the connection limit.
    pub(super) draining: HashMap<u32, Connection>,
    pub(super) pending_hosts: HashMap<u32, PendingHost>,
    pub(super) tags: HashMap<u32, TagOwner>,
    /// Live connections per host port.
    pub(super) local_ports: HashMap<u32, u32>,
    pub(super) next_tag: u32,
    pub(super) next_local_port: u32,
    /// Connections with something for an RX buffer, served round-robin.
    pub(super) ready: VecDeque<ConnKey>,
    /// RSTs for the guest that belong to no live connection.
    pub(super) rst_queue: VecDeque<Header>,
    pub(super) bounce: Vec<u8>,
    pub(super) limits: Limits,
    pub(super) warn: WarnLimiter,
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
    pub(super) fn live_connections(&self) -> usize {
        self.conns.len() + self.draining.len()
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
    pub(super) fn watch_list(&self) -> Vec<(std::os::fd::RawFd, u32, EventSet)> {
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
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
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
