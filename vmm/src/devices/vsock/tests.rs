//! Device tests: a simulated driver (the shared `DriverRing`) on RX and TX rings in one guest
//! memory, real Unix sockets in a tempdir, and `process_queue` / `backend_event` called
//! as the transport and the I/O loop would (the loop replaced by `Harness::pump`, which
//! polls exactly what the device has registered, level-triggered).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use super::connection::*;
use super::muxer::*;
use super::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::test_ring::DriverRing;
use crate::devices::virtio::{Queues, VirtioDevice};
use crate::devices::GuestMemory;
use crate::event_loop::Registrar;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

use tempfile::TempDir;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

const MEM_SIZE: usize = 16 << 20;
const CID: u64 = 3;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
const RX_BUFS: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const RX_SLOTS: usize = 256;
const TX_BUFS: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x2_0000;
const TX_SLOTS: usize = 64;
/// What our simulated guest advertises per connection.
const GUEST_BUF: u32 = 256 * 1024;
/// Linux's RX buffer: a 4 KiB payload after the header.
const LINUX_RX: u32 = 4096 + HEADER_LEN as u32;

/// A packet the guest received.
type Packet = (Header, Vec<u8>);

struct Harness {
    mem: GuestMemory,
    dev: Vsock,
    rx: DriverRing,
    tx: DriverRing,
    rx_slots: Vec<usize>,
    tx_slots: Vec<usize>,
    /// Descriptor sizes of each RX chain.
    rx_pieces: Vec<u32>,
    /// Descriptor sizes TX packets are cut into (the rest goes in one more).
    tx_pieces: Vec<usize>,
    /// Malformed RX chains were made available: empty returns are expected.
    odd_rx_ok: bool,
    uds: PathBuf,
    dir: TempDir,
}

fn guest_hdr(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        socket_type: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

impl Harness {
    fn inactive() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dev = Vsock::new(CID, uds.clone(), Registrar::detached().unwrap()).unwrap();
        let rx = DriverRing::new(&mem, RX_RING, QUEUE_SIZE);
        let tx = DriverRing::new(&mem, TX_RING, QUEUE_SIZE);
        Harness {
            mem,
            dev,
            rx,
            tx,
            rx_slots: (0..RX_SLOTS).rev().collect(),
            tx_slots: (0..TX_SLOTS).rev().collect(),
            rx_pieces: vec![LINUX_RX],
            tx_pieces: Vec::new(),
            odd_rx_ok: false,
            uds,
            dir,
        }
    }

    fn new() -> Self {
        let mut h = Harness::inactive();
        h.dev.activate(0);
        h
    }

    fn with_limits(limits: Limits) -> Self {
        let mut h = Harness::inactive();
        h.dev.limits = limits;
        h.dev.activate(0);
        h
    }

    fn notify(&mut self, index: usize) -> bool {
        let mut queues = Queues::new(vec![
            Some(&mut self.rx.queue),
            Some(&mut self.tx.queue),
            None,
        ]);
        self.dev.process_queue(index, &mut queues, &self.mem)
    }

    fn event(&mut self, tag: u32, events: EventSet) -> bool {
        let mut queues = Queues::new(vec![
            Some(&mut self.rx.queue),
            Some(&mut self.tx.queue),
            None,
        ]);
        self.dev.backend_event(tag, events, &mut queues, &self.mem)
    }

    /// What is ready among the fds the device registered, as the I/O loop would see it.
    /// The transport passes no events to a device that is not activated.
    fn ready(&self) -> Vec<(u32, EventSet)> {
        if !self.dev.activated {
            return Vec::new();
        }
        let epoll = Epoll::new().unwrap();
        for (fd, tag, events) in self.dev.watch_list() {
            let events = events - EventSet::EDGE_TRIGGERED;
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(events, u64::from(tag)),
                )
                .unwrap();
        }
        let mut events = vec![EpollEvent::default(); 4096];
        let n = epoll.wait(0, &mut events).unwrap();
        events[..n]
            .iter()
            .map(|e| (e.data() as u32, e.event_set()))
            .collect()
    }

    /// Runs the I/O loop until nothing the device watches is ready. A device that leaves
    /// an fd ready without consuming it would spin the real loop: that fails here.
    fn pump(&mut self) -> bool {
        let mut used = false;
        for _ in 0..1000 {
            let ready = self.ready();
            if ready.is_empty() {
                return used;
            }
            for (tag, events) in ready {
                used |= self.event(tag, events);
            }
        }
        panic!(
            "the device keeps fds ready without consuming them: {:?}",
            self.ready()
        );
    }

    /// Makes up to `n` more RX chains available (without notifying).
    fn fill_rx(&mut self, n: usize) -> usize {
        let mut added = 0;
        while added < n {
            let Some(slot) = self.rx_slots.pop() else {
                break;
            };
            let mut addr = RX_BUFS + slot as u64 * RX_SLOT;
            let pieces: Vec<(u64, u32, bool)> = self
                .rx_pieces
                .iter()
                .map(|&len| {
                    let p = (addr, len, true);
                    addr += u64::from(len) + 8;
                    p
                })
                .collect();
            if !self.rx.add(&self.mem, &pieces, slot) {
                self.rx_slots.push(slot);
                break;
            }
            added += 1;
        }
        added
    }

    /// Fills the RX ring and notifies, as the driver does after consuming packets.
    fn refill_rx(&mut self) -> bool {
        self.fill_rx(usize::MAX);
        self.notify(RX_QUEUE)
    }

    /// Packets the device put in RX buffers since the last call, checked for framing.
    fn rx_packets(&mut self) -> Vec<Packet> {
        let mut out = Vec::new();
        for (pieces, len, slot) in self.rx.take_used(&self.mem) {
            if len == 0 && self.odd_rx_ok {
                // A malformed chain the test made available, returned unused.
                self.rx_slots.push(slot);
                continue;
            }
            let mut bytes = Vec::new();
            for (addr, plen) in pieces {
                let mut b = vec![0; plen as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                bytes.extend_from_slice(&b);
            }
            let len = len as usize;
            assert!(len >= HEADER_LEN && len <= bytes.len(), "used length {len}");
            let h = Header::from_bytes(bytes[..HEADER_LEN].try_into().unwrap());
            assert_eq!(len, HEADER_LEN + h.len as usize, "{h:?}");
            assert_eq!(
                (h.src_cid, h.dst_cid, h.socket_type),
                (HOST_CID, CID, TYPE_STREAM)
            );
            out.push((h, bytes[HEADER_LEN..len].to_vec()));
            self.rx_slots.push(slot);
        }
        out
    }

    /// Refills RX, runs the loop, and returns everything the guest received, until the
    /// device has nothing more.
    fn drain(&mut self) -> Vec<Packet> {
        let mut all = Vec::new();
        for _ in 0..10_000 {
            self.refill_rx();
            self.pump();
            let got = self.rx_packets();
            if got.is_empty() {
                return all;
            }
            all.extend(got);
        }
        panic!("the device never stops sending");
    }

    /// Lays a packet out in a TX buffer per `tx_pieces` and makes it available.
    fn post_tx(&mut self, h: Header, payload: &[u8]) {
        let mut bytes = Header {
            len: payload.len() as u32,
            ..h
        }
        .to_bytes()
        .to_vec();
        bytes.extend_from_slice(payload);
        let slot = self.tx_slots.pop().expect("a free TX buffer");
        let mut addr = TX_BUFS + slot as u64 * TX_SLOT;
        let mut pieces = Vec::new();
        let mut off = 0;
        for &n in self.tx_pieces.iter().chain(std::iter::once(&usize::MAX)) {
            if off >= bytes.len() {
                break;
            }
            let n = n.min(bytes.len() - off);
            self.mem
                .write_slice(&bytes[off..off + n], GuestAddress(addr))
                .unwrap();
            pieces.push((addr, n as u32, false));
            // A gap: the pieces are not contiguous.
            addr += n as u64 + 16;
            off += n;
        }
        assert!(self.tx.add(&self.mem, &pieces, slot));
    }

    /// Posts and notifies one packet; every TX chain comes back at once, with length 0.
    fn send(&mut self, h: Header, payload: &[u8]) -> bool {
        self.post_tx(h, payload);
        let used = self.notify(TX_QUEUE);
        self.reclaim_tx();
        used
    }

    fn reclaim_tx(&mut self) {
        for (_, len, slot) in self.tx.take_used(&self.mem) {
            assert_eq!(len, 0);
            self.tx_slots.push(slot);
        }
        assert!(self.tx.outstanding() == 0, "TX chains left unused");
    }

    /// How the I/O loop watches connection `key`'s host stream (`None`: not at all).
    fn watched(&self, key: ConnKey) -> Option<EventSet> {
        self.dev.conns.get(&key).and_then(|c| c.watched)
    }

    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(host_port_path(&self.uds, port)).unwrap()
    }

    /// Host → guest connection to `guest_port`, through the REQUEST/RESPONSE handshake.
    fn host_connect(&mut self, guest_port: u32) -> (UnixStream, Peer) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let pkts = self.drain();
        let request = pkts
            .iter()
            .find(|(h, _)| h.op == Op::Request as u16 && h.dst_port == guest_port)
            .map(|(h, _)| *h)
            .expect("a REQUEST");
        let mut peer = Peer::new(guest_port, request.src_port);
        peer.learn(&request);
        assert_eq!(request.buf_alloc, BUF_ALLOC);
        self.send(peer.hdr(Op::Response), &[]);
        assert_eq!(read_line(&mut s), format!("OK {}", request.src_port));
        s.set_nonblocking(true).unwrap();
        (s, peer)
    }

    /// Guest → host connection from `guest_port` to the listener on `host_port`.
    fn guest_connect(
        &mut self,
        listener: &UnixListener,
        guest_port: u32,
        host_port: u32,
    ) -> (UnixStream, Peer) {
        let mut peer = Peer::new(guest_port, host_port);
        self.send(peer.hdr(Op::Request), &[]);
        let pkts = self.drain();
        let response = pkts
            .iter()
            .find(|(h, _)| h.dst_port == guest_port && h.src_port == host_port)
            .map(|(h, _)| *h)
            .expect("an answer");
        assert_eq!(response.op, Op::Response as u16, "{response:?}");
        peer.learn(&response);
        let (s, _) = listener.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (s, peer)
    }
}

/// The guest's end of one connection, with its credit bookkeeping.
#[derive(Debug, Clone)]
struct Peer {
    guest_port: u32,
    host_port: u32,
    buf_alloc: u32,
    /// Bytes consumed from the device (our fwd_cnt).
    fwd_cnt: u32,
    /// fwd_cnt as last told to the device.
    fwd_cnt_told: u32,
    /// Payload bytes sent to the device.
    sent: u32,
    host_buf_alloc: u32,
    host_fwd_cnt: u32,
}

impl Peer {
    fn new(guest_port: u32, host_port: u32) -> Self {
        Peer {
            guest_port,
            host_port,
            buf_alloc: GUEST_BUF,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            sent: 0,
            host_buf_alloc: 0,
            host_fwd_cnt: 0,
        }
    }

    fn hdr(&mut self, op: Op) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        Header {
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
            ..guest_hdr(op, self.guest_port, self.host_port)
        }
    }

    fn learn(&mut self, h: &Header) {
        self.host_buf_alloc = h.buf_alloc;
        self.host_fwd_cnt = h.fwd_cnt;
    }

    /// What the device lets us send now.
    fn credit(&self) -> u32 {
        self.host_buf_alloc
            .saturating_sub(self.sent.wrapping_sub(self.host_fwd_cnt))
    }

    fn owns(&self, h: &Header) -> bool {
        h.dst_port == self.guest_port && h.src_port == self.host_port
    }
}

/// Back to blocking I/O, with a timeout so that a missing EOF fails instead of hanging.
fn blocking(s: &UnixStream) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Reads what is available without blocking; `None` at end of file.
fn read_available(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return if out.is_empty() { None } else { Some(out) },
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(out),
            Err(e) => panic!("host read: {e}"),
        }
    }
}

/// Whether the host end sees the stream closed (EOF or reset) right now.
fn host_sees_close(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("host read: {e}"),
        }
    }
}

fn pattern(stream: u64, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
    (x >> 56) as u8
}

fn pattern_bytes(stream: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern(stream, offset + i))
        .collect()
}

/// FNV-1a, to compare large transfers.
fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn ops(pkts: &[Packet]) -> Vec<Op> {
    pkts.iter()
        .map(|(h, _)| Op::from_raw(h.op).unwrap())
        .collect()
}

fn key_of(peer: &Peer) -> ConnKey {
    ConnKey {
        local_port: peer.host_port,
        peer_port: peer.guest_port,
    }
}

// ---- Construction and identity ----

#[test]
fn identity_and_config_space() {
    let h = Harness::new();
    assert_eq!(h.dev.device_type(), 19);
    assert_eq!(h.dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(h.dev.device_features(), 0);
    let mut c = [0xffu8; 8];
    h.dev.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), CID);
    let mut b = [0xffu8; 4];
    h.dev.read_config(6, &mut b);
    assert_eq!(b, [0; 4]);
    h.dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    let mut one = [0u8; 1];
    h.dev.read_config(0, &mut one);
    assert_eq!(one, [3]);
    assert_eq!(h.dev.uds_path(), h.uds.as_path());
}

#[test]
fn socket_is_private_and_removed_on_drop() {
    let h = Harness::new();
    let meta = std::fs::symlink_metadata(&h.uds).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let uds = h.uds.clone();
    let dir = h.dir;
    drop(h.dev);
    assert!(!uds.exists());
    // Nothing left behind under a temporary name either.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn constructor_checks_what_is_at_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let reg = || Registrar::detached().unwrap();
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(cid, path.clone(), reg()),
            Err(VsockError::InvalidCid(c)) if c == cid
        ));
    }
    // A regular file is never replaced.
    std::fs::write(&path, b"data").unwrap();
    assert!(matches!(
        Vsock::new(CID, path.clone(), reg()),
        Err(VsockError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    std::fs::remove_file(&path).unwrap();
    // A live listener is not taken over.
    let live = UnixListener::bind(&path).unwrap();
    let err = Vsock::new(CID, path.clone(), reg()).unwrap_err();
    assert!(matches!(err, VsockError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("v.sock"));
    drop(live);
    // The dead socket file it left is stale: replaced.
    assert!(path.exists());
    let dev = Vsock::new(CID, path.clone(), reg()).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    // Drop removes only the socket it created.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"someone else's").unwrap();
    drop(dev);
    assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
}

#[test]
fn connect_line_parsing() {
    assert_eq!(parse_connect_line(b"CONNECT 5000"), Some(5000));
    assert_eq!(parse_connect_line(b"CONNECT 0"), Some(0));
    assert_eq!(parse_connect_line(b"CONNECT 7\r"), Some(7));
    assert_eq!(
        parse_connect_line(b"CONNECT 4294967294"),
        Some(u32::MAX - 1)
    );
    for bad in [
        &b"CONNECT 4294967295"[..],
        b"CONNECT 4294967296",
        b"CONNECT 99999999999",
        b"CONNECT ",
        b"CONNECT -1",
        b"CONNECT +1",
        b"CONNECT 1 ",
        b"CONNECT  1",
        b"connect 1",
        b"CONNECT\t1",
        b"",
    ] {
        assert_eq!(
            parse_connect_line(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        host_port_path(Path::new("/run/v.sock"), 52),
        Path::new("/run/v.sock_52")
    );
}

// ---- Host → guest connections ----

#[test]
fn host_connect_request_response_ok() {
    let mut h = Harness::new();
    let (mut s, mut peer) = h.host_connect(5000);
    assert!(peer.host_port >= FIRST_LOCAL_PORT);
    assert_eq!(h.dev.connection_count(), 1);

    // Data both ways.
    s.write_all(b"ping").unwrap();
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Rw]);
    assert!(peer.owns(&pkts[0].0));
    assert_eq!(pkts[0].1, b"ping");
    let hdr = peer.hdr(Op::Rw);
    h.send(hdr, b"pong");
    let mut b = [0u8; 4];
    blocking(&s);
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");

    // Host ports are unique among live connections.
    let (_s2, peer2) = h.host_connect(5000);
    assert_ne!(peer2.host_port, peer.host_port);
    assert_eq!(h.dev.connection_count(), 2);
}

#[test]
fn host_connect_guest_rst_closes_the_stream() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 6000\n").unwrap();
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Request]);
    let req = pkts[0].0;
    // No listener in the guest: it answers RST.
    let rst = guest_hdr(Op::Rst, req.dst_port, req.src_port);
    h.send(rst, &[]);
    assert_eq!(h.dev.connection_count(), 0);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap(), 0, "EOF, no OK line");
    // Nothing is sent back for an RST.
    assert!(h.drain().is_empty());
}

#[test]
fn host_connect_line_rules() {
    let mut h = Harness::new();
    let closed = |h: &mut Harness, bytes: &[u8]| {
        let mut s = UnixStream::connect(&h.uds).unwrap();
        s.write_all(bytes).unwrap();
        h.pump();
        s.set_nonblocking(true).unwrap();
        host_sees_close(&mut s)
    };
    assert!(closed(&mut h, b"HELLO\n"));
    assert!(closed(&mut h, b"CONNECT 99999999999\n"));
    assert!(closed(&mut h, &[b'C'; CONNECT_LINE_MAX]));
    assert!(closed(&mut h, b"CONNECT 1"[..].repeat(8).as_slice()));
    // Incomplete but short: waits.
    assert!(!closed(&mut h, b"CONNECT 12"));
    assert!(h.drain().is_empty());

    // A line in pieces, CRLF, and data right behind it.
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONN").unwrap();
    h.pump();
    s.write_all(b"ECT 7\r\nearly bytes").unwrap();
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Request]);
    assert_eq!(pkts[0].0.dst_port, 7);
    let mut peer = Peer::new(7, pkts[0].0.src_port);
    h.send(peer.hdr(Op::Response), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", peer.host_port));
    s.write_all(b", then more").unwrap();
    let data: Vec<u8> = h.drain().into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(data, b"early bytes, then more");
}

#[test]
fn host_handshake_times_out() {
    let mut h = Harness::with_limits(Limits {
        handshake_timeout: Duration::from_millis(40),
        ..DEFAULT_LIMITS
    });
    // No CONNECT line at all.
    let mut silent = UnixStream::connect(&h.uds).unwrap();
    h.pump();
    silent.set_nonblocking(true).unwrap();
    assert!(!host_sees_close(&mut silent));
    // A CONNECT the guest never answers.
    let mut unanswered = UnixStream::connect(&h.uds).unwrap();
    unanswered.write_all(b"CONNECT 9\n").unwrap();
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Request]);
    assert_eq!(h.dev.connection_count(), 1);

    std::thread::sleep(Duration::from_millis(80));
    let pkts = h.drain();
    assert!(host_sees_close(&mut silent));
    unanswered.set_nonblocking(true).unwrap();
    assert!(host_sees_close(&mut unanswered));
    assert_eq!(h.dev.connection_count(), 0);
    // The guest is told to forget the request.
    assert_eq!(ops(&pkts), vec![Op::Rst]);
    assert_eq!(pkts[0].0.dst_port, 9);
    // Nothing left to time: the timer is off, so the loop goes quiet.
    assert!(!h.dev.timer_armed);
}

#[test]
fn host_connections_wait_for_the_driver() {
    let mut h = Harness::inactive();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    h.pump();
    assert!(h.dev.pending_hosts.is_empty());
    h.dev.activate(0);
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Request]);
    let mut peer = Peer::new(5000, pkts[0].0.src_port);
    h.send(peer.hdr(Op::Response), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", peer.host_port));
}

// ---- Guest → host connections ----

#[test]
fn guest_request_reaches_a_listener() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (mut s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    assert_eq!(peer.host_buf_alloc, BUF_ALLOC);
    h.send(peer.hdr(Op::Rw), b"hello");
    blocking(&s);
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    s.write_all(b"world").unwrap();
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Rw]);
    assert!(peer.owns(&pkts[0].0));
    assert_eq!(pkts[0].1, b"world");
    // Two guest sockets to the same host port are two connections.
    let (_s2, _) = h.guest_connect(&listener, 1026, 5000);
    assert_eq!(h.dev.connection_count(), 2);
}

#[test]
fn guest_request_without_listener_gets_rst() {
    let mut h = Harness::new();
    h.send(guest_hdr(Op::Request, 1025, 6001), &[]);
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Rst]);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (6001, 1025));
    assert_eq!(h.dev.connection_count(), 0);
    // A stale socket file with nobody listening: the same.
    drop(h.listen(6002));
    h.send(guest_hdr(Op::Request, 1025, 6002), &[]);
    assert_eq!(ops(&h.drain()), vec![Op::Rst]);
}

#[test]
fn control_replies_wait_for_rx_buffers() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    // No RX buffers: RESPONSEs and RSTs are owed, not lost.
    for port in 0..20 {
        h.send(guest_hdr(Op::Request, 2000 + port, 5000), &[]);
        h.send(guest_hdr(Op::Request, 3000 + port, 4999), &[]);
    }
    assert!(h.rx_packets().is_empty());
    let pkts = h.drain();
    let count = |op: Op| pkts.iter().filter(|(p, _)| p.op == op as u16).count();
    assert_eq!((count(Op::Response), count(Op::Rst)), (20, 20));
    for _ in 0..20 {
        listener.accept().unwrap();
    }
}

// ---- Data transfer and credit ----

/// Host → guest bulk data through the credit machinery, the guest consuming and
/// returning credit like Linux does; checks order and contents, and that the device
/// never exceeds the guest's credit.
fn bulk_host_to_guest(rx_pieces: Vec<u32>, total: usize) {
    let mut h = Harness::new();
    h.rx_pieces = rx_pieces;
    let (s, mut peer) = h.host_connect(5000);
    let writer = std::thread::spawn(move || {
        let mut s = s;
        blocking(&s);
        let mut hash = FNV_START;
        let mut off = 0;
        while off < total {
            let n = (total - off).min(100_003);
            let chunk = pattern_bytes(1, off as u64, n);
            hash = fnv(hash, &chunk);
            s.write_all(&chunk).unwrap();
            off += n;
        }
        s.shutdown(Shutdown::Write).unwrap();
        (hash, s)
    });
    let mut got = 0usize;
    let mut hash = FNV_START;
    let mut ended = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ended {
        assert!(Instant::now() < deadline, "stalled at {got} of {total}");
        h.refill_rx();
        h.pump();
        let pkts = h.rx_packets();
        if pkts.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for (hdr, data) in pkts {
            assert!(peer.owns(&hdr));
            match Op::from_raw(hdr.op).unwrap() {
                Op::Rw => {
                    assert!(!data.is_empty());
                    // Within the credit the guest gave.
                    let in_flight = (got + data.len()) as u32 - peer.fwd_cnt_told;
                    assert!(in_flight <= peer.buf_alloc, "{in_flight} in flight");
                    assert_eq!(data, pattern_bytes(1, got as u64, data.len()), "at {got}");
                    hash = fnv(hash, &data);
                    got += data.len();
                }
                Op::Shutdown => {
                    assert_eq!(hdr.flags, SHUTDOWN_SEND);
                    ended = true;
                }
                Op::CreditRequest => {
                    let reply = peer.hdr(Op::CreditUpdate);
                    h.send(reply, &[]);
                }
                op => panic!("unexpected {op:?}"),
            }
        }
        // The guest application reads everything; the driver returns credit once 64 KiB
        // have been consumed since it last told.
        peer.fwd_cnt = got as u32;
        if peer.fwd_cnt - peer.fwd_cnt_told >= 64 * 1024 {
            let update = peer.hdr(Op::CreditUpdate);
            h.send(update, &[]);
        }
    }
    let (sent_hash, _s) = writer.join().unwrap();
    assert_eq!(got, total);
    assert_eq!(hash, sent_hash);
}

#[test]
fn bulk_host_to_guest_single_descriptor_buffers() {
    bulk_host_to_guest(vec![LINUX_RX], 4 << 20);
}

#[test]
fn bulk_host_to_guest_split_and_odd_buffers() {
    // Older Linux: the header in its own descriptor; then odd splits.
    bulk_host_to_guest(vec![HEADER_LEN as u32, 4096], 2 << 20);
    bulk_host_to_guest(vec![7, 50, 3001, 999], 1 << 20);
}

/// Guest → host bulk data respecting the device's credit, packets cut into descriptors
/// per `tx_pieces`.
fn bulk_guest_to_host(tx_pieces: Vec<usize>, total: usize) {
    let mut h = Harness::new();
    h.tx_pieces = tx_pieces;
    let listener = h.listen(5000);
    let (s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    let reader = std::thread::spawn(move || {
        let mut s = s;
        blocking(&s);
        let mut hash = FNV_START;
        let mut got = 0usize;
        let mut buf = vec![0u8; 70_001];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            assert_eq!(buf[..n], pattern_bytes(2, got as u64, n)[..], "at {got}");
            hash = fnv(hash, &buf[..n]);
            got += n;
        }
        (got, hash)
    });
    let sizes = [1usize, 4096, 65536, 3000, 777, 65535, 12345];
    let mut sent = 0usize;
    let mut hash = FNV_START;
    let mut i = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent < total {
        assert!(Instant::now() < deadline, "stalled at {sent} of {total}");
        let credit = peer.credit() as usize;
        let n = sizes[i % sizes.len()].min(total - sent).min(credit);
        if n == 0 {
            // Out of credit: wait for the host to drain and the device to tell us.
            std::thread::sleep(Duration::from_millis(1));
            h.pump();
            for (hdr, _) in h.drain() {
                assert!(peer.owns(&hdr));
                assert_eq!(hdr.op, Op::CreditUpdate as u16, "{hdr:?}");
                peer.learn(&hdr);
            }
            continue;
        }
        i += 1;
        let data = pattern_bytes(2, sent as u64, n);
        hash = fnv(hash, &data);
        let hdr = peer.hdr(Op::Rw);
        h.send(hdr, &data);
        peer.sent = peer.sent.wrapping_add(n as u32);
        sent += n;
        let buffered = h.dev.conns[&key_of(&peer)].tx_buf.len();
        assert!(buffered <= BUF_ALLOC as usize);
    }
    let shutdown = Header {
        flags: SHUTDOWN_SEND,
        ..peer.hdr(Op::Shutdown)
    };
    h.send(shutdown, &[]);
    // The rest drains as the host reads; its end of file follows the data.
    while h
        .dev
        .conns
        .get(&key_of(&peer))
        .is_some_and(|c| !c.host_write_shut)
    {
        assert!(Instant::now() < deadline, "never flushed");
        std::thread::sleep(Duration::from_millis(1));
        h.pump();
        h.drain();
    }
    let (got, got_hash) = reader.join().unwrap();
    assert_eq!((got, got_hash), (total, hash));
}

#[test]
fn bulk_guest_to_host_single_descriptor_packets() {
    bulk_guest_to_host(Vec::new(), 4 << 20);
}

#[test]
fn bulk_guest_to_host_split_packets() {
    // Header alone (older Linux), then splits inside the header and the payload.
    bulk_guest_to_host(vec![HEADER_LEN], 1 << 20);
    bulk_guest_to_host(vec![1, 43, 2, 100, 5], 1 << 20);
    bulk_guest_to_host(vec![45, 333], 1 << 20);
}

#[test]
fn host_not_reading_caps_what_the_device_buffers() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (mut s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    // The guest sends everything its credit allows; the host reads nothing.
    let mut sent = 0usize;
    loop {
        let n = (peer.credit() as usize).min(MAX_PAYLOAD as usize);
        if n == 0 {
            break;
        }
        let data = pattern_bytes(3, sent as u64, n);
        let hdr = peer.hdr(Op::Rw);
        h.send(hdr, &data);
        peer.sent = peer.sent.wrapping_add(n as u32);
        sent += n;
        for (hdr, _) in h.drain() {
            assert_eq!(hdr.op, Op::CreditUpdate as u16);
            peer.learn(&hdr);
        }
    }
    let conn = &h.dev.conns[&key_of(&peer)];
    assert!(conn.tx_buf.len() <= BUF_ALLOC as usize);
    assert!(!conn.tx_buf.is_empty(), "the host stream filled up");
    // What the device claims forwarded really reached the stream.
    assert_eq!(sent, conn.tx_buf.len() + conn.fwd_cnt as usize);
    assert_eq!(h.watched(key_of(&peer)), Some(EventSet::IN | EventSet::OUT));
    // Going over the credit resets the connection.
    let hdr = peer.hdr(Op::Rw);
    h.send(hdr, &[0xee]);
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Rst]);
    assert!(peer.owns(&pkts[0].0));
    assert_eq!(h.dev.connection_count(), 0);
    // The host gets what was forwarded, then the close.
    let mut got = Vec::new();
    while let Some(more) = read_available(&mut s) {
        got.extend(more);
    }
    assert!(got.len() < sent);
    assert_eq!(got, pattern_bytes(3, 0, got.len()));
}

#[test]
fn host_draining_returns_credit_to_the_guest() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (mut s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    while peer.credit() > 0 {
        let n = peer.credit().min(MAX_PAYLOAD) as usize;
        let hdr = peer.hdr(Op::Rw);
        h.send(hdr, &vec![7; n]);
        peer.sent += n as u32;
        for (hdr, _) in h.drain() {
            peer.learn(&hdr);
        }
    }
    assert_eq!(peer.credit(), 0);
    // The host reads everything: the device flushes its buffer and tells the guest.
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < peer.sent as usize {
        assert!(Instant::now() < deadline);
        got += read_available(&mut s).unwrap().len();
        h.pump();
    }
    let pkts = h.drain();
    assert!(!pkts.is_empty());
    for (hdr, _) in &pkts {
        assert_eq!(hdr.op, Op::CreditUpdate as u16);
        peer.learn(hdr);
    }
    // Updates go out per CREDIT_UPDATE_THRESHOLD forwarded: the guest may be that much
    // behind, never more.
    assert!(peer.credit() > BUF_ALLOC - CREDIT_UPDATE_THRESHOLD);
    // A CREDIT_REQUEST is answered at once, with the exact count.
    let hdr = peer.hdr(Op::CreditRequest);
    h.send(hdr, &[]);
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::CreditUpdate]);
    peer.learn(&pkts[0].0);
    assert_eq!(peer.host_fwd_cnt, peer.sent);
    assert_eq!(peer.credit(), BUF_ALLOC);
}

#[test]
fn guest_credit_bounds_host_reads() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let pkts = h.drain();
    let mut peer = Peer::new(5000, pkts[0].0.src_port);
    peer.buf_alloc = 10_000;
    h.send(peer.hdr(Op::Response), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", peer.host_port));
    s.write_all(&pattern_bytes(4, 0, 100_000)).unwrap();

    let pkts = h.drain();
    let data: Vec<u8> = pkts
        .iter()
        .filter(|(p, _)| p.op == Op::Rw as u16)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(data, pattern_bytes(4, 0, 10_000));
    // Out of credit with data waiting: one CREDIT_REQUEST, and the stream is not
    // watched for input (the loop stays quiet: pump would fail otherwise).
    assert_eq!(ops(&pkts).last(), Some(&Op::CreditRequest));
    let key = key_of(&peer);
    assert_eq!(h.watched(key), None);
    assert!(h.drain().is_empty());
    // Credit returned: reading resumes, again only as far as the credit goes.
    peer.fwd_cnt = 10_000;
    h.send(peer.hdr(Op::CreditUpdate), &[]);
    let data: Vec<u8> = h
        .drain()
        .into_iter()
        .filter(|(p, _)| p.op == Op::Rw as u16)
        .flat_map(|(_, d)| d)
        .collect();
    assert_eq!(data, pattern_bytes(4, 10_000, 10_000));
    // A guest claiming to have consumed more than it got earns nothing.
    peer.fwd_cnt = 50_000;
    h.send(peer.hdr(Op::CreditUpdate), &[]);
    assert!(h.drain().iter().all(|(p, _)| p.op != Op::Rw as u16));
}

#[test]
fn empty_rx_queue_stops_watching_host_input() {
    let mut h = Harness::new();
    // A handshake with just the one RX buffer the REQUEST needs: none are left after.
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    h.fill_rx(1);
    h.notify(RX_QUEUE);
    h.pump();
    let pkts = h.rx_packets();
    assert_eq!(ops(&pkts), vec![Op::Request]);
    let mut peer = Peer::new(5000, pkts[0].0.src_port);
    h.send(peer.hdr(Op::Response), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", peer.host_port));
    let key = key_of(&peer);
    assert_eq!(h.watched(key), Some(EventSet::IN));

    // No RX buffers: the host's data makes the device stop watching for input (and
    // the loop goes quiet instead of spinning).
    s.write_all(&pattern_bytes(5, 0, 50_000)).unwrap();
    h.pump();
    assert!(h.rx_packets().is_empty());
    assert_eq!(h.watched(key), None);
    assert!(h.ready().is_empty());
    // A few buffers: filled, still not watching since data is left.
    h.fill_rx(3);
    assert!(h.notify(RX_QUEUE));
    let first: Vec<u8> = h.rx_packets().into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(first, pattern_bytes(5, 0, 3 * 4096));
    assert_eq!(h.watched(key), None);
    // Enough buffers: the rest arrives, and input is watched again once drained.
    let rest: Vec<u8> = h.drain().into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(rest, pattern_bytes(5, 3 * 4096, 50_000 - 3 * 4096));
    assert_eq!(h.watched(key), Some(EventSet::IN));
}

#[test]
fn many_concurrent_connections() {
    const N: u32 = 128;
    let mut h = Harness::new();
    let listener = h.listen(7000);
    let mut conns = Vec::new();
    for i in 0..N {
        conns.push(h.host_connect(5000 + i));
        conns.push(h.guest_connect(&listener, 20_000 + i, 7000));
    }
    assert_eq!(h.dev.connection_count(), 2 * N as usize);
    // Every host stream writes its own pattern at once; the device interleaves them.
    for (i, (s, _)) in conns.iter_mut().enumerate() {
        s.write_all(&pattern_bytes(i as u64, 0, 10_000 + i))
            .unwrap();
    }
    let mut received: HashMap<usize, Vec<u8>> = HashMap::new();
    for (hdr, data) in h.drain() {
        assert_eq!(hdr.op, Op::Rw as u16);
        let i = conns.iter().position(|(_, p)| p.owns(&hdr)).unwrap();
        received.entry(i).or_default().extend(data);
    }
    for i in 0..conns.len() {
        assert_eq!(
            received[&i],
            pattern_bytes(i as u64, 0, 10_000 + i),
            "stream {i}"
        );
    }
    // And guest → host on every one.
    for (i, (_, peer)) in conns.iter_mut().enumerate() {
        let data = pattern_bytes(1000 + i as u64, 0, 3000);
        let hdr = peer.hdr(Op::Rw);
        h.send(hdr, &data);
    }
    for (i, (s, _)) in conns.iter_mut().enumerate() {
        assert_eq!(
            read_available(s).unwrap(),
            pattern_bytes(1000 + i as u64, 0, 3000)
        );
    }
}

// ---- Shutdown and reset ----

#[test]
fn guest_shutdown_send_gives_host_eof_after_the_data() {
    let mut h = Harness::new();
    let (mut s, mut peer) = h.host_connect(5000);
    let hdr = peer.hdr(Op::Rw);
    h.send(hdr, b"last words");
    let shutdown = Header {
        flags: SHUTDOWN_SEND,
        ..peer.hdr(Op::Shutdown)
    };
    h.send(shutdown, &[]);
    blocking(&s);
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words");
    // The other direction still works.
    s.write_all(b"reply").unwrap();
    let pkts = h.drain();
    assert_eq!(pkts[0].1, b"reply");
    // More data from the guest now is a protocol error.
    let hdr = peer.hdr(Op::Rw);
    h.send(hdr, b"x");
    assert_eq!(ops(&h.drain()), vec![Op::Rst]);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn guest_shutdown_rcv_stops_host_writes() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (mut s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    let shutdown = Header {
        flags: SHUTDOWN_RCV,
        ..peer.hdr(Op::Shutdown)
    };
    h.send(shutdown, &[]);
    assert_eq!(h.watched(key_of(&peer)), None);
    // The host can no longer write; the guest still can.
    assert_eq!(
        s.write(b"unwanted").unwrap_err().kind(),
        ErrorKind::BrokenPipe
    );
    let hdr = peer.hdr(Op::Rw);
    h.send(hdr, b"still talking");
    assert_eq!(read_available(&mut s).unwrap(), b"still talking");
    assert!(h.drain().is_empty());
}

#[test]
fn guest_full_shutdown_closes_after_flushing() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (mut s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    // Fill the host stream so some data stays buffered in the device.
    let mut sent = 0;
    while peer.credit() > 0 {
        let n = peer.credit().min(MAX_PAYLOAD) as usize;
        let hdr = peer.hdr(Op::Rw);
        h.send(hdr, &pattern_bytes(6, sent as u64, n));
        peer.sent += n as u32;
        sent += n;
        for (hdr, _) in h.drain() {
            peer.learn(&hdr);
        }
    }
    assert!(!h.dev.conns[&key_of(&peer)].tx_buf.is_empty());
    let shutdown = Header {
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        ..peer.hdr(Op::Shutdown)
    };
    h.send(shutdown, &[]);
    // Not closed while data waits for the host.
    assert_eq!(h.dev.connection_count(), 1);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline);
        match read_available(&mut s) {
            Some(more) => got.extend(more),
            None => break,
        }
        h.pump();
    }
    assert_eq!(got, pattern_bytes(6, 0, sent));
    // Then the device closes the stream and confirms with RST.
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Rst]);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn full_shutdown_with_a_stuck_host_lingers_then_resets() {
    let mut h = Harness::with_limits(Limits {
        linger_timeout: Duration::from_millis(30),
        ..DEFAULT_LIMITS
    });
    let listener = h.listen(5000);
    let (_s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    while peer.credit() > 0 {
        let n = peer.credit().min(MAX_PAYLOAD) as usize;
        let hdr = peer.hdr(Op::Rw);
        h.send(hdr, &vec![1; n]);
        peer.sent += n as u32;
        for (hdr, _) in h.drain() {
            peer.learn(&hdr);
        }
    }
    let shutdown = Header {
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        ..peer.hdr(Op::Shutdown)
    };
    h.send(shutdown, &[]);
    assert_eq!(h.dev.connection_count(), 1);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(ops(&h.drain()), vec![Op::Rst]);
    assert_eq!(h.dev.connection_count(), 0);
}

/// Sends guest data until the device's credit is used up (the host reads nothing, so its
/// stream fills and the rest waits in the device); returns the byte count.
fn fill_guest_credit(h: &mut Harness, peer: &mut Peer, stream: u64) -> usize {
    let mut sent = 0;
    while peer.credit() > 0 {
        let n = peer.credit().min(MAX_PAYLOAD) as usize;
        let hdr = peer.hdr(Op::Rw);
        h.send(hdr, &pattern_bytes(stream, sent as u64, n));
        peer.sent += n as u32;
        sent += n;
        for (hdr, _) in h.drain() {
            peer.learn(&hdr);
        }
    }
    sent
}

/// Reads the host end `chunk` bytes at a time (pausing `pause` between reads and running
/// the device's I/O loop) until EOF; everything read.
fn read_slowly(h: &mut Harness, s: &mut UnixStream, chunk: usize, pause: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; chunk];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no EOF after {} bytes",
            got.len()
        );
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("host read after {} bytes: {e}", got.len()),
        }
        h.pump();
        std::thread::sleep(pause);
    }
}

/// Linux resets a connection it closed when the host side has not closed within 8 s (its
/// close timeout). Data the guest sent before its SHUTDOWN may still be waiting for a
/// slow host then: the host must still get all of it, then EOF, not an EOF in the middle
/// that looks like the end of the stream.
#[test]
fn guest_rst_after_its_shutdown_still_delivers_the_data() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (mut s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    let sent = fill_guest_credit(&mut h, &mut peer, 11);
    assert!(!h.dev.conns[&key_of(&peer)].tx_buf.is_empty());
    let shutdown = Header {
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        ..peer.hdr(Op::Shutdown)
    };
    h.send(shutdown, &[]);
    // The guest's close timeout fires before the host has read anything.
    h.send(peer.hdr(Op::Rst), &[]);
    // The connection is over for the guest: its ports are free and nothing answers.
    assert_eq!(h.dev.connection_count(), 0);
    assert!(h.drain().is_empty());
    let got = read_slowly(&mut h, &mut s, 64 * 1024, Duration::ZERO);
    assert_eq!(got.len(), sent);
    assert!(got == pattern_bytes(11, 0, sent), "data differs");
    assert!(h.dev.draining.is_empty());
    assert!(h.dev.tags.is_empty());
    assert!(h.ready().is_empty());
}

/// An RST without SHUTDOWN(SEND) first is an abort: the stream is closed at once.
#[test]
fn guest_rst_mid_stream_closes_at_once() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (mut s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    let sent = fill_guest_credit(&mut h, &mut peer, 12);
    h.send(peer.hdr(Op::Rst), &[]);
    assert_eq!(h.dev.connection_count(), 0);
    assert!(h.dev.draining.is_empty());
    let got = read_slowly(&mut h, &mut s, 64 * 1024, Duration::ZERO);
    assert!(got.len() < sent);
    assert!(h.dev.tags.is_empty());
}

/// The linger deadline ends a host that stopped reading, not one that reads slowly: each
/// time the host stream takes some of the guest's last data, the deadline moves, both
/// while the connection lingers and after the guest's RST.
#[test]
fn slow_host_gets_the_guest_data_left_at_close() {
    for rst in [false, true] {
        let mut h = Harness::with_limits(Limits {
            linger_timeout: Duration::from_secs(5),
            ..DEFAULT_LIMITS
        });
        let listener = h.listen(5000);
        let (mut s, mut peer) = h.guest_connect(&listener, 1025, 5000);
        let sent = fill_guest_credit(&mut h, &mut peer, 13);
        let shutdown = Header {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..peer.hdr(Op::Shutdown)
        };
        h.send(shutdown, &[]);
        if rst {
            h.send(peer.hdr(Op::Rst), &[]);
        }
        let deadline = |h: &Harness| {
            h.dev
                .conns
                .values()
                .chain(h.dev.draining.values())
                .next()
                .and_then(|c| c.deadline)
                .expect("a deadline")
        };
        let first = deadline(&h);
        std::thread::sleep(Duration::from_millis(20));
        // The host empties its stream once: the device writes more and moves the deadline.
        let mut got = read_available(&mut s).unwrap();
        h.pump();
        assert!(deadline(&h) > first, "rst={rst}: deadline did not move");
        got.extend(read_slowly(&mut h, &mut s, 64 * 1024, Duration::ZERO));
        assert_eq!(got.len(), sent, "rst={rst}");
        assert!(got == pattern_bytes(13, 0, sent), "data differs");
        assert_eq!(h.dev.connection_count(), 0);
        assert!(h.dev.draining.is_empty());
    }
}

/// Draining connections count against the connection limit (each holds guest data).
#[test]
fn draining_connections_count_against_the_limit() {
    let mut h = Harness::with_limits(Limits {
        max_connections: 1,
        ..DEFAULT_LIMITS
    });
    let listener = h.listen(5000);
    let (_s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    fill_guest_credit(&mut h, &mut peer, 14);
    let shutdown = Header {
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        ..peer.hdr(Op::Shutdown)
    };
    h.send(shutdown, &[]);
    h.send(peer.hdr(Op::Rst), &[]);
    assert_eq!(h.dev.draining.len(), 1);
    let mut other = Peer::new(1026, 5000);
    h.send(other.hdr(Op::Request), &[]);
    assert_eq!(ops(&h.drain()), vec![Op::Rst]);
}

#[test]
fn host_half_close_gives_guest_shutdown_send() {
    let mut h = Harness::new();
    let (mut s, mut peer) = h.host_connect(5000);
    s.write_all(b"request").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Rw, Op::Shutdown]);
    assert_eq!(pkts[0].1, b"request");
    assert_eq!(pkts[1].0.flags, SHUTDOWN_SEND);
    // The host still reads the guest's answer.
    let hdr = peer.hdr(Op::Rw);
    h.send(hdr, b"answer");
    assert_eq!(read_available(&mut s).unwrap(), b"answer");
    // The guest closes too: the connection ends with RST and the host sees EOF.
    let shutdown = Header {
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        ..peer.hdr(Op::Shutdown)
    };
    h.send(shutdown, &[]);
    assert_eq!(ops(&h.drain()), vec![Op::Rst]);
    assert!(host_sees_close(&mut s));
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn host_close_ends_the_connection() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (s, peer) = h.guest_connect(&listener, 1025, 5000);
    let mut s = s;
    s.write_all(b"bye").unwrap();
    drop(s);
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Rw, Op::Shutdown, Op::Rst]);
    assert_eq!(pkts[0].1, b"bye");
    assert_eq!(pkts[1].0.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    assert!(pkts.iter().all(|(p, _)| peer.owns(p)));
    assert_eq!(h.dev.connection_count(), 0);
    assert!(h.dev.tags.is_empty());
}

#[test]
fn host_close_with_guest_data_pending_resets() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (s, mut peer) = h.guest_connect(&listener, 1025, 5000);
    let mut sent = 0;
    while peer.credit() > 0 {
        let n = peer.credit().min(MAX_PAYLOAD) as usize;
        let hdr = peer.hdr(Op::Rw);
        h.send(hdr, &vec![2; n]);
        peer.sent += n as u32;
        sent += n;
        for (hdr, _) in h.drain() {
            peer.learn(&hdr);
        }
    }
    assert!(sent > 0);
    drop(s);
    assert_eq!(ops(&h.drain()), vec![Op::Rst]);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn guest_rst_closes_the_host_stream() {
    let mut h = Harness::new();
    let (mut s, mut peer) = h.host_connect(5000);
    h.send(peer.hdr(Op::Rst), &[]);
    assert!(host_sees_close(&mut s));
    assert_eq!(h.dev.connection_count(), 0);
    assert!(h.drain().is_empty());
    // Later packets for it are answered with RST.
    let hdr = peer.hdr(Op::Rw);
    h.send(hdr, b"late");
    assert_eq!(ops(&h.drain()), vec![Op::Rst]);
}

#[test]
fn reset_drops_connections_and_keeps_the_listener() {
    let mut h = Harness::new();
    let listener = h.listen(5000);
    let (mut a, _) = h.host_connect(5000);
    let (mut b, _) = h.guest_connect(&listener, 1025, 5000);
    let mut waiting = UnixStream::connect(&h.uds).unwrap();
    waiting.write_all(b"CONN").unwrap();
    h.pump();
    h.dev.reset();
    assert!(host_sees_close(&mut a));
    assert!(host_sees_close(&mut b));
    assert_eq!(h.dev.connection_count(), 0);
    // Only the listener and the (disarmed) timer stay registered.
    let tags: Vec<u32> = h.dev.watch_list().iter().map(|w| w.1).collect();
    assert_eq!(tags, vec![TAG_LISTENER, TAG_TIMER]);
    assert!(!h.dev.timer_armed);

    // The driver comes back (fresh rings): the waiting host finishes its line.
    h.rx = DriverRing::new(&h.mem, RX_RING, QUEUE_SIZE);
    h.tx = DriverRing::new(&h.mem, TX_RING, QUEUE_SIZE);
    h.rx_slots = (0..RX_SLOTS).rev().collect();
    h.tx_slots = (0..TX_SLOTS).rev().collect();
    h.dev.activate(0);
    waiting.write_all(b"ECT 5001\n").unwrap();
    let pkts = h.drain();
    assert_eq!(ops(&pkts), vec![Op::Request]);
    assert_eq!(pkts[0].0.dst_port, 5001);
    let (_c, _) = h.host_connect(5000);
    assert_eq!(h.dev.connection_count(), 2);
}

#[test]
fn connection_limit() {
    let mut h = Harness::with_limits(Limits {
        max_connections: 4,
        ..DEFAULT_LIMITS
    });
    let listener = h.listen(5000);
    let _conns: Vec<_> = (0..3)
        .map(|i| h.guest_connect(&listener, 1000 + i, 5000))
        .collect();
    let (_host, _) = h.host_connect(6000);
    h.send(guest_hdr(Op::Request, 2000, 5000), &[]);
    assert_eq!(ops(&h.drain()), vec![Op::Rst]);
    let mut refused = UnixStream::connect(&h.uds).unwrap();
    refused.write_all(b"CONNECT 6000\n").unwrap();
    h.pump();
    assert!(host_sees_close(&mut refused));
    assert_eq!(h.dev.connection_count(), 4);
}

// ---- Hostile input ----

#[test]
fn bad_packets_are_dropped_or_reset() {
    let mut h = Harness::new();
    // For no connection: RST, except for an RST.
    h.send(guest_hdr(Op::Rw, 1, 2), b"data");
    h.send(guest_hdr(Op::Response, 1, 2), &[]);
    h.send(guest_hdr(Op::Rst, 1, 2), &[]);
    assert_eq!(ops(&h.drain()), vec![Op::Rst, Op::Rst]);

    // Spoofed source CID: dropped silently.
    let spoofed = Header {
        src_cid: 99,
        ..guest_hdr(Op::Request, 1, 2)
    };
    h.send(spoofed, &[]);
    // Another destination CID, or a non-stream socket: RST.
    let elsewhere = Header {
        dst_cid: 7,
        ..guest_hdr(Op::Request, 1, 2)
    };
    h.send(elsewhere, &[]);
    let dgram = Header {
        socket_type: 3,
        ..guest_hdr(Op::Request, 1, 2)
    };
    h.send(dgram, &[]);
    assert_eq!(ops(&h.drain()), vec![Op::Rst, Op::Rst]);

    // On a live connection, each of these resets it and closes the host stream.
    let listener = h.listen(5000);
    type MakeBad = fn(&mut Peer) -> Packet;
    let cases: [(&str, MakeBad); 6] = [
        ("bad type", |p| {
            let h = Header {
                socket_type: 2,
                ..p.hdr(Op::Rw)
            };
            (h, vec![1])
        }),
        ("unknown op", |p| {
            let h = Header {
                op: 99,
                ..p.hdr(Op::Rw)
            };
            (h, vec![])
        }),
        ("payload on a control packet", |p| {
            (p.hdr(Op::CreditUpdate), vec![1, 2, 3])
        }),
        ("unknown shutdown flags", |p| {
            let h = Header {
                flags: 4,
                ..p.hdr(Op::Shutdown)
            };
            (h, vec![])
        }),
        ("second request", |p| (p.hdr(Op::Request), vec![])),
        ("response on an established connection", |p| {
            (p.hdr(Op::Response), vec![])
        }),
    ];
    for (i, (what, make)) in cases.iter().enumerate() {
        let (mut s, mut peer) = h.guest_connect(&listener, 3000 + i as u32, 5000);
        let (hdr, payload) = make(&mut peer);
        h.send(hdr, &payload);
        let pkts = h.drain();
        assert_eq!(ops(&pkts), vec![Op::Rst], "{what}");
        assert!(peer.owns(&pkts[0].0), "{what}");
        assert!(host_sees_close(&mut s), "{what}");
        assert_eq!(h.dev.connection_count(), 0, "{what}");
    }

    // A length beyond the chain, on a live connection.
    let (mut s, mut peer) = h.guest_connect(&listener, 4000, 5000);
    let hdr = Header {
        len: 100,
        ..peer.hdr(Op::Rw)
    };
    let slot = h.tx_slots.pop().unwrap();
    let addr = TX_BUFS + slot as u64 * TX_SLOT;
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(addr))
        .unwrap();
    assert!(h.tx.add(&h.mem, &[(addr, 44 + 99, false)], slot));
    h.notify(TX_QUEUE);
    h.reclaim_tx();
    assert_eq!(ops(&h.drain()), vec![Op::Rst]);
    assert!(host_sees_close(&mut s));
}

#[test]
fn malformed_chains_never_panic() {
    let mut h = Harness::new();
    h.odd_rx_ok = true;
    // Live connections go to 5001; random REQUESTs reach 5000 too, whose listener
    // nobody accepts on (its backlog fills and further connects fail).
    let listener = h.listen(5001);
    let _unserved = h.listen(5000);
    let mut live: Vec<(UnixStream, Peer)> = (0..4)
        .map(|i| h.guest_connect(&listener, 100 + i, 5001))
        .collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000u64 {
        // A header that is nearly right, for a live connection or not.
        let r = next();
        let (src_port, dst_port) = match r % 4 {
            0 => (live[(r >> 8) as usize % live.len()].1.guest_port, 5001),
            1 => ((next() % 4) as u32 + 100, 5000),
            _ => (next() as u32, next() as u32),
        };
        let mut hdr = guest_hdr(Op::Rw, src_port, dst_port);
        hdr.op = (next() % 9) as u16;
        hdr.len =
            [0, 1, 44, 100, 4096, MAX_PAYLOAD, MAX_PAYLOAD + 1, u32::MAX][(next() % 8) as usize];
        hdr.flags = (next() % 5) as u32;
        hdr.buf_alloc = next() as u32;
        hdr.fwd_cnt = next() as u32;
        match next() % 12 {
            0 => hdr.src_cid = next(),
            1 => hdr.dst_cid = next() % 4,
            2 => hdr.socket_type = (next() % 3) as u16,
            _ => {}
        }
        let slot = h.tx_slots.pop().unwrap();
        let base = TX_BUFS + slot as u64 * TX_SLOT;
        h.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(base))
            .unwrap();
        let count = (next() % 5) as usize + 1;
        let pieces: Vec<(u64, u32, bool)> = (0..count)
            .map(|i| {
                let r = next();
                let addr = match r % 10 {
                    0 => r,
                    1 => MEM_SIZE as u64 - (r >> 8) % 64,
                    2 => RX_RING + (r >> 8) % 0x2000,
                    _ if i == 0 => base,
                    _ => base + 44 + (r >> 8) % 0x1000,
                };
                let len = match (r >> 32) % 6 {
                    0 => u32::MAX,
                    1 => (r >> 40) as u32 % 44,
                    2 => 44,
                    _ => ((r >> 40) % 0x1_0000) as u32,
                };
                (addr, len, (r >> 30) % 10 == 0)
            })
            .collect();
        assert!(h.tx.add(&h.mem, &pieces, slot));
        h.notify(TX_QUEUE);
        h.reclaim_tx();

        // Odd RX chains now and then: writable and readable mixes, tiny, out of range.
        if round % 7 == 0 && h.rx.free.len() >= 2 && !h.rx_slots.is_empty() {
            let r = next();
            let slot = h.rx_slots.pop().unwrap();
            let addr = RX_BUFS + slot as u64 * RX_SLOT;
            let pieces = match r % 4 {
                0 => vec![(addr, 20, true)],
                1 => vec![(addr, 100, false)],
                2 => vec![(MEM_SIZE as u64 - 10, 4096, true)],
                _ => vec![(addr, 44, true), (addr + 100, 1, true)],
            };
            assert!(h.rx.add(&h.mem, &pieces, slot));
        }
        if round % 3 == 0 {
            // Host side activity on whatever connections are left.
            for (s, _) in &mut live {
                let _ = s.write(b"noise");
                let mut sink = [0u8; 65536];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            }
            h.fill_rx(4);
            h.notify(RX_QUEUE);
            h.pump();
            h.rx.take_used(&h.mem)
                .into_iter()
                .for_each(|(_, _, slot)| h.rx_slots.push(slot));
        }
        if live.len() < 2 {
            let port = 200 + round as u32;
            live.push(h.guest_connect(&listener, port, 5001));
        }
        live.retain(|(_, p)| h.dev.conns.contains_key(&key_of(p)));
        if live.is_empty() {
            live.push(h.guest_connect(&listener, 100_000 + round as u32, 5001));
        }
    }
    // Still serving afterwards.
    let (mut s, mut peer) = h.guest_connect(&listener, 9999, 5001);
    let hdr = peer.hdr(Op::Rw);
    h.send(hdr, b"ok");
    assert_eq!(read_available(&mut s).unwrap(), b"ok");
}

#[test]
fn spurious_and_stale_events_are_harmless() {
    let mut h = Harness::new();
    let (mut s, peer) = h.host_connect(5000);
    let tag = h.dev.conns[&key_of(&peer)].tag;
    // Readiness that is not there (another event in the same batch consumed it).
    let all = EventSet::IN | EventSet::OUT;
    assert!(!h.event(tag, all));
    assert!(!h.event(TAG_TIMER, EventSet::IN));
    assert!(!h.event(TAG_LISTENER, EventSet::IN));
    assert!(!h.event(12345, all));
    assert!(h.drain().is_empty());
    // And the connection still works.
    s.write_all(b"x").unwrap();
    assert_eq!(h.drain()[0].1, b"x");
    // Notifying a queue that does not exist does nothing.
    assert!(!h.notify(7));
    assert!(!h.notify(EVENT_QUEUE));
}

#[test]
fn works_behind_the_mmio_transport() {
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::{Irq, MmioDevice};
    use crate::event_loop::BackendHandler;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("t.sock");
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let dev = Vsock::new(7, uds.clone(), Registrar::detached().unwrap()).unwrap();
    let irq = Irq::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut t = MmioTransport::new(dev, mem, irq);
    let read = |t: &mut MmioTransport<Vsock>, offset: u64| {
        let mut b = [0u8; 4];
        t.mmio_read(offset, &mut b);
        u32::from_le_bytes(b)
    };
    // DeviceID, QueueNumMax of queue 2, and the CID in config space.
    assert_eq!(read(&mut t, 0x008), VIRTIO_ID_VSOCK);
    t.mmio_write(0x030, &2u32.to_le_bytes());
    assert_eq!(read(&mut t, 0x034), u32::from(QUEUE_SIZE));
    assert_eq!(read(&mut t, 0x100), 7);
    assert_eq!(read(&mut t, 0x104), 0);
    // Host events before the driver is up reach nothing; the host waits.
    let _host = UnixStream::connect(&uds).unwrap();
    t.handle(TAG_LISTENER, EventSet::IN);
    assert!(t.device().pending_hosts.is_empty());
    assert!(format!("{t:?}").contains("Vsock"));
}

/// The real I/O loop (epoll thread, edge-triggered listener, level-triggered streams)
/// drives the device, and stays idle when the device cannot make progress: out of RX
/// buffers, and then with a hung-up host stream.
#[test]
fn real_event_loop_drives_the_device_without_spinning() {
    use crate::event_loop::{BackendHandler, EventLoop};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    struct Wired {
        dev: Vsock,
        rx: Queue,
        tx: Queue,
        mem: GuestMemory,
        calls: Arc<AtomicUsize>,
    }
    impl BackendHandler for Wired {
        fn handle(&mut self, tag: u32, events: EventSet) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut q = Queues::new(vec![Some(&mut self.rx), Some(&mut self.tx), None]);
            self.dev.backend_event(tag, events, &mut q, &self.mem);
        }
    }
    fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    /// Loop wake-ups over a quiet period.
    fn wakeups(calls: &AtomicUsize) -> usize {
        let before = calls.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        calls.load(Ordering::SeqCst) - before
    }

    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("loop.sock");
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut lp = EventLoop::new().unwrap();
    let dev = Vsock::new(CID, uds.clone(), lp.registrar(1)).unwrap();
    let mut rx = DriverRing::new(&mem, RX_RING, QUEUE_SIZE);
    let mut tx = DriverRing::new(&mem, TX_RING, QUEUE_SIZE);
    const BUFFERS: usize = 16;
    for slot in 0..BUFFERS {
        let addr = RX_BUFS + slot as u64 * RX_SLOT;
        assert!(rx.add(&mem, &[(addr, LINUX_RX, true)], slot));
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let wired = Arc::new(Mutex::new(Wired {
        dev,
        rx: std::mem::replace(&mut rx.queue, Queue::new(QUEUE_SIZE).unwrap()),
        tx: std::mem::replace(&mut tx.queue, Queue::new(QUEUE_SIZE).unwrap()),
        mem: mem.clone(),
        calls: calls.clone(),
    }));
    lp.set_handler(1, wired.clone());
    // A host connection made before the driver is ready waits for it.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let (thread, stopper) = lp.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    wired.lock().unwrap().dev.activate(0);
    let rx_packets = |rx: &mut DriverRing| -> Vec<Packet> {
        rx.take_used(&mem)
            .into_iter()
            .map(|(spans, len, _)| {
                let mut b = vec![0u8; len as usize];
                mem.read_slice(&mut b, GuestAddress(spans[0].0)).unwrap();
                let h = Header::from_bytes(b[..HEADER_LEN].try_into().unwrap());
                (h, b[HEADER_LEN..].to_vec())
            })
            .collect()
    };
    // The listener is edge-triggered: a second connection after activation is what
    // wakes the loop for both.
    let mut s2 = UnixStream::connect(&uds).unwrap();
    s2.write_all(b"CONNECT 5001\n").unwrap();
    // The two may land in separate polls: what one poll takes is kept.
    let mut requests: Vec<Packet> = Vec::new();
    let requests = wait_for("two REQUESTs", || {
        requests.extend(
            rx_packets(&mut rx)
                .into_iter()
                .filter(|(h, _)| h.op == Op::Request as u16),
        );
        (requests.len() == 2).then(|| requests.clone())
    });
    let request = requests
        .iter()
        .find(|(h, _)| h.dst_port == 5000)
        .map(|(h, _)| *h)
        .unwrap();
    let mut peer = Peer::new(5000, request.src_port);
    // The guest accepts, as the vCPU would: under the transport's lock.
    {
        let response = peer.hdr(Op::Response).to_bytes();
        let addr = TX_BUFS;
        mem.write_slice(&response, GuestAddress(addr)).unwrap();
        assert!(tx.add(&mem, &[(addr, HEADER_LEN as u32, false)], 0));
        let mut w = wired.lock().unwrap();
        let w = &mut *w;
        let mut q = Queues::new(vec![Some(&mut w.rx), Some(&mut w.tx), None]);
        w.dev.process_queue(TX_QUEUE, &mut q, &w.mem);
    }
    assert_eq!(read_line(&mut s), format!("OK {}", peer.host_port));
    assert!(wakeups(&calls) <= 2, "the loop spins while idle");

    // More host data than the RX buffers left hold: they fill, then the loop goes quiet.
    let total = BUFFERS * 4096 * 2;
    s.write_all(&pattern_bytes(9, 0, total)).unwrap();
    let got = wait_for("the RX buffers to fill", || {
        let used = rx_packets(&mut rx);
        (!used.is_empty()).then_some(used)
    });
    let mut data: Vec<u8> = got.into_iter().flat_map(|(_, d)| d).collect();
    std::thread::sleep(Duration::from_millis(50));
    data.extend(rx_packets(&mut rx).into_iter().flat_map(|(_, d)| d));
    assert_eq!(data, pattern_bytes(9, 0, data.len()));
    assert!(data.len() < total);
    assert!(wakeups(&calls) <= 2, "the loop spins with no RX buffers");
    // The host hangs up while the device is not reading it: still quiet.
    drop(s);
    assert!(wakeups(&calls) <= 2, "the loop spins on a hung-up stream");

    stopper.stop();
    thread.join().unwrap();
}
