#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use super::device::*;
use super::*;

use std::io;
use std::os::unix::io::AsRawFd;

use virtio_bindings::virtio_net::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::test_ring::{self, DriverRing};
use crate::devices::virtio::{Queues, VirtioDevice};
use crate::devices::GuestMemory;
use crate::event_loop::Registrar;

use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::net::tap::TAP_FLAGS;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::{Irq, MmioDevice};
use crate::event_loop::{BackendHandler, EventLoop};

const MEM_SIZE: usize = 0x40_0000;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x4000;
const BUF: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0xc0, 0xc0, 0x01];
const R: bool = false;
const W: bool = true;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// Everything offered, as a Linux guest accepts it.
const ALL: u64 = DEVICE_FEATURES | VERSION_1;
const NO_MRG: u64 = ALL & !bit(VIRTIO_NET_F_MRG_RXBUF);

fn memory() -> GuestMemory {
    test_ring::memory(MEM_SIZE)
}

fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// A frame with a virtio-net header (`flags`, `gso_type`, the rest a pattern, and
/// num_buffers 0xeeee) followed by `len` payload bytes.
fn frame_with(flags: u8, gso: u8, len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![flags, gso, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0xee, 0xee];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed));
    f
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    frame_with(0, 0, len, seed)
}

struct Rig<'a> {
    mem: &'a GuestMemory,
    rx: DriverRing,
    tx: DriverRing,
    net: Net,
    peer: UnixDatagram,
    registrar: Registrar,
}

impl<'a> Rig<'a> {
    /// A device on a socket pair, activated with `features`.
    fn new(mem: &'a GuestMemory, features: u64) -> Self {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        let tap = Tap::from_socket_for_tests(ours, "sock-tap").unwrap();
        Self::with_tap(mem, tap, peer, features)
    }

    /// A device on `tap`, whose far side is `peer`.
    fn with_tap(mem: &'a GuestMemory, tap: Tap, peer: UnixDatagram, features: u64) -> Self {
        let registrar = Registrar::detached().unwrap();
        let mut net = Net::new(tap, MAC, registrar.clone()).unwrap();
        net.activate(features);
        Rig {
            mem,
            rx: DriverRing::new(mem, RX_RING, QUEUE_SIZE),
            tx: DriverRing::new(mem, TX_RING, QUEUE_SIZE),
            net,
            peer,
            registrar,
        }
    }

    fn notify(&mut self, index: usize) -> bool {
        let mut queues = Queues::new(vec![Some(&mut self.rx.queue), Some(&mut self.tx.queue)]);
        self.net.process_queue(index, &mut queues, self.mem)
    }

    fn event(&mut self, events: EventSet) -> bool {
        let mut queues = Queues::new(vec![Some(&mut self.rx.queue), Some(&mut self.tx.queue)]);
        self.net
            .backend_event(TAP_TAG, events, &mut queues, self.mem)
    }

    /// Puts `bytes` in guest memory at `addr` and makes them one transmit chain.
    fn post_tx(&mut self, addr: u64, bytes: &[u8]) -> u16 {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.tx.post(self.mem, &[(addr, bytes.len() as u32, R)])
    }

    /// Everything the device wrote to the TAP so far.
    fn sent(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; MAX_BUFFER_LEN + 100];
        loop {
            match self.peer.recv(&mut buf) {
                Ok(n) => frames.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return frames,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Whether the TAP fd is registered with the I/O loop (adding it again fails).
    fn registered(&self) -> bool {
        let fd = self.net.tap().as_raw_fd();
        match self.registrar.add(fd, 99, EventSet::IN) {
            Ok(()) => {
                self.registrar.remove(fd).unwrap();
                false
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
                true
            }
        }
    }

    /// The contents of used RX entry `i`, whose chain is the 4 KiB buffer at `addr`.
    fn rx_data(&self, i: u16, addr: u64) -> Vec<u8> {
        let (_, len) = self.rx.used_elem(self.mem, i);
        guest_bytes(self.mem, addr, len as usize)
    }
}

/// What the guest should see for `frame`: num_buffers set, the rest unchanged.
fn expected(frame: &[u8], num_buffers: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    f
}

fn buf_addr(i: u64) -> u64 {
    BUF + i * 0x1_0000
}

// ---- transmit ----

#[test]
fn tx_frame_reaches_tap_with_header_intact() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    // A TSO frame: NEEDS_CSUM, TCPv4 with ECN, all negotiated.
    let f = frame_with(HDR_F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 1500, 1);
    let head = rig.post_tx(BUF, &f);
    assert!(rig.notify(TX_QUEUE));
    assert_eq!(rig.sent(), vec![f]);
    assert_eq!(rig.tx.used_idx(rig.mem), 1);
    assert_eq!(rig.tx.used_elem(rig.mem, 0), (head, 0));
    // Nothing new: nothing used, no interrupt.
    assert!(!rig.notify(TX_QUEUE));
    assert!(rig.sent().is_empty());
}

#[test]
fn tx_frame_split_across_descriptors() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    let f = frame(300, 2);
    // Header split 5 + 7, the second part running into the frame; an empty
    // descriptor; the frame in scattered pieces.
    let pieces: &[(u64, usize, usize)] = &[
        (buf_addr(3), 0, 5),
        (buf_addr(1) + 7, 5, 40),
        (buf_addr(2), 40, 40),
        (buf_addr(0) + 1, 40, 200),
        (buf_addr(5) + 3, 200, 312),
    ];
    let mut descs = Vec::new();
    for &(addr, from, to) in pieces {
        mem.write_slice(&f[from..to], GuestAddress(addr)).unwrap();
        descs.push((addr, (to - from) as u32, R));
    }
    rig.tx.post(rig.mem, &descs);
    assert!(rig.notify(TX_QUEUE));
    assert_eq!(rig.sent(), vec![f]);
    assert_eq!(rig.tx.used_elem(rig.mem, 0).1, 0);
}

#[test]
fn tx_bad_chains_are_returned_and_dropped() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL & !bit(VIRTIO_NET_F_HOST_TSO6));
    let good = frame(100, 3);
    mem.write_slice(&good, GuestAddress(BUF)).unwrap();
    let big = vec![0u8; MAX_BUFFER_LEN + 1];
    mem.write_slice(&big, GuestAddress(buf_addr(8))).unwrap();
    let hdr_only = |flags: u8, gso: u8| {
        let f = frame_with(flags, gso, 100, 4);
        mem.write_slice(&f, GuestAddress(buf_addr(4))).unwrap();
        (buf_addr(4), f.len() as u32, R)
    };
    let len = good.len() as u32;
    let cases: Vec<Vec<(u64, u32, bool)>> = vec![
        // Device-writable descriptors.
        vec![(BUF, len, W)],
        vec![(BUF, 12, R), (BUF + 12, len - 12, W)],
        // Over the size limit, in one descriptor and across two.
        vec![(buf_addr(8), MAX_BUFFER_LEN as u32 + 1, R)],
        vec![(buf_addr(8), MAX_BUFFER_LEN as u32, R), (BUF, 1, R)],
        vec![(BUF, u32::MAX, R)],
        // Shorter than header + Ethernet header.
        vec![(BUF, 25, R)],
        vec![(BUF, 0, R)],
        // Outside guest memory, or wrapping around the address space.
        vec![(MEM_SIZE as u64 - 10, len, R)],
        vec![(u64::MAX - 5, len, R)],
        vec![(BUF, 12, R), (MEM_SIZE as u64, 100, R)],
    ];
    let mut heads = Vec::new();
    for case in &cases {
        heads.push(rig.tx.post(rig.mem, case));
    }
    // Headers the driver has no right to send: DATA_VALID, an unknown GSO type, ECN
    // without GSO, a GSO type not negotiated (HOST_TSO6).
    heads.push(
        rig.tx
            .post(rig.mem, &[hdr_only(VIRTIO_NET_HDR_F_DATA_VALID as u8, 0)]),
    );
    heads.push(rig.tx.post(rig.mem, &[hdr_only(0, 5)]));
    heads.push(rig.tx.post(rig.mem, &[hdr_only(0, GSO_ECN)]));
    heads.push(
        rig.tx
            .post(rig.mem, &[hdr_only(HDR_F_NEEDS_CSUM, GSO_TCPV6)]),
    );
    // A chain whose NEXT leads out of the descriptor table: cut short.
    heads.push(rig.tx.post_raw(
        rig.mem,
        &[Descriptor::new(
            BUF,
            len,
            VRING_DESC_F_NEXT as u16,
            QUEUE_SIZE + 44,
        )],
    ));
    // A head out of the table: dropped, and cannot even be returned.
    rig.tx.publish(rig.mem, QUEUE_SIZE + 1);
    // And a good one last, plus the largest frame allowed.
    let at_limit = frame(MAX_FRAME_LEN, 9);
    let last = rig.tx.post(rig.mem, &[(BUF, len, R)]);
    let limit = rig.post_tx(buf_addr(20), &at_limit);

    assert!(rig.notify(TX_QUEUE));
    assert_eq!(rig.sent(), vec![good, at_limit]);
    let count = heads.len() as u16 + 2;
    assert_eq!(rig.tx.used_idx(rig.mem), count);
    let used: Vec<(u16, u32)> = (0..count).map(|i| rig.tx.used_elem(rig.mem, i)).collect();
    for (i, head) in heads.iter().enumerate() {
        assert_eq!(used[i], (*head, 0), "case {i}");
    }
    assert_eq!(used[heads.len()], (last, 0));
    assert_eq!(used[heads.len() + 1], (limit, 0));
}

#[test]
fn tx_header_validation() {
    let hdr = |flags: u8, gso: u8| [flags, gso, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(validate_tx_header(&hdr(0, 0), VERSION_1), Ok(()));
    assert_eq!(
        validate_tx_header(&hdr(HDR_F_NEEDS_CSUM, 0), VERSION_1),
        Err(TxError::BadFlags(1))
    );
    assert_eq!(validate_tx_header(&hdr(HDR_F_NEEDS_CSUM, 0), ALL), Ok(()));
    assert_eq!(
        validate_tx_header(&hdr(2, 0), ALL),
        Err(TxError::BadFlags(2))
    );
    for (gso, feature) in [
        (GSO_TCPV4, VIRTIO_NET_F_HOST_TSO4),
        (GSO_TCPV6, VIRTIO_NET_F_HOST_TSO6),
        (GSO_UDP, VIRTIO_NET_F_HOST_UFO),
    ] {
        let h = hdr(HDR_F_NEEDS_CSUM, gso);
        assert_eq!(validate_tx_header(&h, ALL), Ok(()), "gso {gso}");
        assert_eq!(
            validate_tx_header(&h, ALL & !bit(feature)),
            Err(TxError::BadGso(gso))
        );
        let ecn = hdr(HDR_F_NEEDS_CSUM, gso | GSO_ECN);
        assert_eq!(validate_tx_header(&ecn, ALL), Ok(()));
        assert_eq!(
            validate_tx_header(&ecn, ALL & !bit(VIRTIO_NET_F_HOST_ECN)),
            Err(TxError::BadGso(gso | GSO_ECN))
        );
    }
    for gso in [2, 5, 6, 0x7f, GSO_ECN] {
        assert_eq!(
            validate_tx_header(&hdr(0, gso), ALL),
            Err(TxError::BadGso(gso))
        );
    }
    assert_eq!(validate_tx_header(&[0], ALL), Err(TxError::TooShort(1)));
}

#[test]
fn tx_waits_for_a_writable_tap_and_keeps_order() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    // Large frames fill the socket's send buffer after a few.
    let frames: Vec<Vec<u8>> = (0..8).map(|i| frame(60_000, i)).collect();
    for (i, f) in frames.iter().enumerate() {
        rig.post_tx(buf_addr(i as u64), f);
    }
    assert!(rig.notify(TX_QUEUE));
    let first = rig.tx.used_idx(rig.mem);
    assert!((1..8).contains(&first), "{first} sent before blocking");
    assert!(rig.net.tx_blocked);
    assert_eq!(rig.net.watching, Some(EventSet::IN | EventSet::OUT));
    // Notifies while blocked leave the chains alone.
    assert!(!rig.notify(TX_QUEUE));
    assert_eq!(rig.tx.used_idx(rig.mem), first);

    let mut received = rig.sent();
    let mut rounds = 0;
    while rig.tx.used_idx(rig.mem) < 8 {
        rounds += 1;
        assert!(rounds < 20, "transmit never resumed");
        assert!(rig.event(EventSet::OUT));
        received.extend(rig.sent());
    }
    received.extend(rig.sent());
    assert!(received == frames, "frames lost, duplicated or reordered");
    assert!(!rig.net.tx_blocked);
    assert_eq!(rig.net.watching, Some(EventSet::IN));
    // Spurious writability changes nothing.
    assert!(!rig.event(EventSet::OUT));
}

// ---- receive ----

#[test]
fn rx_frame_lands_in_a_chain_with_its_header() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    let head = rig.rx.post(rig.mem, &[(BUF, 4096, W)]);
    let f = frame_with(HDR_F_NEEDS_CSUM, 0, 200, 5);
    rig.peer.send(&f).unwrap();
    assert!(rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_idx(rig.mem), 1);
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (head, f.len() as u32));
    assert_eq!(rig.rx_data(0, BUF), expected(&f, 1));
    // Nothing more to read: nothing used.
    assert!(!rig.event(EventSet::IN));
    assert_eq!(rig.net.watching, Some(EventSet::IN));
}

#[test]
fn rx_chain_split_across_descriptors_without_mrg_rxbuf() {
    let mem = memory();
    let mut rig = Rig::new(&mem, NO_MRG);
    // Header split 4 + 8 + data; one empty descriptor.
    let head = rig.rx.post(
        rig.mem,
        &[
            (buf_addr(2), 4, W),
            (buf_addr(1) + 1, 20, W),
            (buf_addr(3), 0, W),
            (buf_addr(0), 2000, W),
        ],
    );
    let f = frame(1000, 6);
    rig.peer.send(&f).unwrap();
    assert!(rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (head, f.len() as u32));
    let mut got = guest_bytes(&mem, buf_addr(2), 4);
    got.extend(guest_bytes(&mem, buf_addr(1) + 1, 20));
    got.extend(guest_bytes(&mem, buf_addr(0), f.len() - 24));
    assert_eq!(got, expected(&f, 1));
}

#[test]
fn rx_flags_cleared_without_guest_csum() {
    let mem = memory();
    let mut rig = Rig::new(&mem, VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
    assert_eq!(rig.net.tap().offload(), 0);
    rig.rx.post(rig.mem, &[(BUF, 4096, W)]);
    let f = frame_with(VIRTIO_NET_HDR_F_DATA_VALID as u8, 0, 60, 7);
    rig.peer.send(&f).unwrap();
    assert!(rig.event(EventSet::IN));
    let mut want = expected(&f, 1);
    want[0] = 0;
    assert_eq!(rig.rx_data(0, BUF), want);
}

#[test]
fn rx_mrg_rxbuf_spreads_a_jumbo_frame_over_4k_chains() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    let heads: Vec<u16> = (0..4)
        .map(|i| rig.rx.post(rig.mem, &[(buf_addr(i), 4096, W)]))
        .collect();
    let f = frame(9000, 8);
    rig.peer.send(&f).unwrap();
    assert!(rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_idx(rig.mem), 3);
    let want = expected(&f, 3);
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (heads[0], 4096));
    assert_eq!(rig.rx.used_elem(rig.mem, 1), (heads[1], 4096));
    assert_eq!(rig.rx.used_elem(rig.mem, 2), (heads[2], 9012 - 8192));
    let mut got = Vec::new();
    for i in 0..3 {
        got.extend(rig.rx_data(i, buf_addr(u64::from(i))));
    }
    assert!(got == want);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);

    // The fourth chain takes the next frame alone.
    let small = frame(100, 9);
    rig.peer.send(&small).unwrap();
    assert!(rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_elem(rig.mem, 3), (heads[3], 112));
    assert_eq!(rig.rx_data(3, buf_addr(3)), expected(&small, 1));
}

#[test]
fn rx_without_mrg_rxbuf_needs_one_big_enough_chain() {
    let mem = memory();
    let mut rig = Rig::new(&mem, NO_MRG);
    // A chain that cannot hold even a header is returned at once.
    let useless = rig.rx.post(rig.mem, &[(buf_addr(1), 0, W)]);
    let head = rig.rx.post(rig.mem, &[(BUF, 1000, W)]);
    rig.peer.send(&frame(2000, 1)).unwrap();
    let f = frame(500, 2);
    rig.peer.send(&f).unwrap();
    // The big frame is dropped; the chain too small for it is kept for the next one.
    assert!(rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_idx(rig.mem), 2);
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (useless, 0));
    assert_eq!(rig.rx.used_elem(rig.mem, 1), (head, 512));
    assert_eq!(rig.rx_data(1, BUF), expected(&f, 1));
    assert_eq!(rig.net.rx_pending, None);
}

#[test]
fn rx_without_buffers_keeps_the_frame_and_stops_watching() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    let a = frame(300, 1);
    let b = frame(400, 2);
    rig.peer.send(&a).unwrap();
    rig.peer.send(&b).unwrap();
    assert!(!rig.event(EventSet::IN));
    assert_eq!(rig.net.rx_pending, Some(a.len()));
    assert_eq!(rig.net.watching, Some(EventSet::empty()));
    // A stray wake-up reads nothing more.
    assert!(!rig.event(EventSet::IN));
    // Notified without buffers: still waiting.
    assert!(!rig.notify(RX_QUEUE));
    assert_eq!(rig.net.watching, Some(EventSet::empty()));

    let first = rig.rx.post(rig.mem, &[(BUF, 4096, W)]);
    assert!(rig.notify(RX_QUEUE));
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (first, a.len() as u32));
    assert_eq!(rig.rx_data(0, BUF), expected(&a, 1));
    assert_eq!(rig.net.rx_pending, None);
    assert_eq!(rig.net.watching, Some(EventSet::IN));
    // `b` waited in the TAP.
    let second = rig.rx.post(rig.mem, &[(buf_addr(1), 4096, W)]);
    assert!(rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_elem(rig.mem, 1), (second, b.len() as u32));
    assert_eq!(rig.rx_data(1, buf_addr(1)), expected(&b, 1));
}

#[test]
fn rx_partial_buffers_are_put_back_until_the_frame_fits() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    // A bad chain, then one good 4 KiB chain: not enough for 9000 bytes.
    let bad = rig.rx.post(rig.mem, &[(BUF, 12, R)]);
    let g1 = rig.rx.post(rig.mem, &[(buf_addr(1), 4096, W)]);
    let f = frame(9000, 3);
    rig.peer.send(&f).unwrap();
    assert!(rig.event(EventSet::IN));
    // The bad chain comes back; the good one is left on the ring.
    assert_eq!(rig.rx.used_idx(rig.mem), 1);
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (bad, 0));
    assert_eq!(rig.net.rx_pending, Some(f.len()));
    // More buffers, with a bad one in between.
    let bad2 = rig.rx.post(rig.mem, &[(buf_addr(2), 8, W)]);
    let g2 = rig.rx.post(rig.mem, &[(buf_addr(3), 4096, W)]);
    let g3 = rig.rx.post(rig.mem, &[(buf_addr(4), 4096, W)]);
    assert!(rig.notify(RX_QUEUE));
    // The bad chain first, then the frame's buffers back to back.
    assert_eq!(rig.rx.used_idx(rig.mem), 5);
    assert_eq!(rig.rx.used_elem(rig.mem, 1), (bad2, 0));
    assert_eq!(rig.rx.used_elem(rig.mem, 2), (g1, 4096));
    assert_eq!(rig.rx.used_elem(rig.mem, 3), (g2, 4096));
    assert_eq!(rig.rx.used_elem(rig.mem, 4), (g3, 820));
    let mut got = rig.rx_data(2, buf_addr(1));
    got.extend(rig.rx_data(3, buf_addr(3)));
    got.extend(rig.rx_data(4, buf_addr(4)));
    assert!(got == expected(&f, 3));
}

#[test]
fn rx_bad_chains_are_returned_unused() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    let bad: Vec<u16> = vec![
        rig.rx.post(rig.mem, &[(BUF, 4096, R)]),
        rig.rx.post(rig.mem, &[(BUF, 4, W), (BUF + 4, 4096, R)]),
        rig.rx.post(rig.mem, &[(MEM_SIZE as u64 - 100, 4096, W)]),
        rig.rx.post(rig.mem, &[(u64::MAX - 10, 4096, W)]),
        // Shorter than the header (MRG_RXBUF), or empty.
        rig.rx.post(rig.mem, &[(BUF, 11, W)]),
        rig.rx.post(rig.mem, &[(BUF, 0, W)]),
        rig.rx.post_raw(
            rig.mem,
            &[Descriptor::new(
                BUF,
                4096,
                (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                QUEUE_SIZE,
            )],
        ),
    ];
    let good = rig.rx.post(rig.mem, &[(buf_addr(1), 4096, W)]);
    let f = frame(1000, 4);
    rig.peer.send(&f).unwrap();
    assert!(rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_idx(rig.mem), bad.len() as u16 + 1);
    for (i, head) in bad.iter().enumerate() {
        assert_eq!(rig.rx.used_elem(rig.mem, i as u16), (*head, 0), "case {i}");
    }
    assert_eq!(
        rig.rx.used_elem(rig.mem, bad.len() as u16),
        (good, f.len() as u32)
    );
    assert_eq!(rig.rx_data(bad.len() as u16, buf_addr(1)), expected(&f, 1));
    assert_eq!(guest_bytes(&mem, MEM_SIZE as u64 - 100, 100), vec![0; 100]);
}

#[test]
fn rx_frame_larger_than_the_whole_ring_is_dropped() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    let heads: Vec<u16> = (0..u64::from(QUEUE_SIZE))
        .map(|i| rig.rx.post(rig.mem, &[(BUF + i * 16, 16, W)]))
        .collect();
    rig.peer.send(&frame(9000, 1)).unwrap();
    let f = frame(2, 2);
    rig.peer.send(&f).unwrap();
    assert!(rig.event(EventSet::IN));
    // Not kept waiting for buffers that cannot come: the next frame gets through.
    assert_eq!(rig.net.rx_pending, None);
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (heads[0], 14));
    assert_eq!(rig.rx_data(0, BUF), expected(&f, 1));
}

#[test]
fn rx_reads_at_most_a_budget_per_wake_up() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    rig.net.rx_budget = 3;
    for i in 0..10 {
        rig.rx.post(rig.mem, &[(buf_addr(i), 4096, W)]);
    }
    for i in 0..7 {
        rig.peer.send(&frame(64, i)).unwrap();
    }
    for want in [3, 6, 7, 7] {
        rig.event(EventSet::IN);
        assert_eq!(rig.rx.used_idx(rig.mem), want);
    }
    assert_eq!(rig.net.watching, Some(EventSet::IN));
}

#[test]
fn rx_tap_frames_too_short_for_a_header_are_dropped() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    let head = rig.rx.post(rig.mem, &[(BUF, 4096, W)]);
    rig.peer.send(&[1, 2, 3]).unwrap();
    rig.peer.send(&[]).unwrap();
    let f = frame(20, 1);
    rig.peer.send(&f).unwrap();
    assert!(rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_idx(rig.mem), 1);
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (head, f.len() as u32));
}

// ---- lifecycle ----

#[test]
fn activation_registers_and_reset_forgets() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    assert!(rig.registered());
    rig.peer.send(&frame(100, 1)).unwrap();
    rig.event(EventSet::IN);
    assert!(rig.net.rx_pending.is_some());

    rig.net.reset();
    assert!(!rig.registered());
    assert_eq!(rig.net.rx_pending, None);
    // Not active: notifications and events do nothing.
    let head = rig.rx.post(rig.mem, &[(BUF, 4096, W)]);
    assert!(!rig.notify(RX_QUEUE));
    assert!(!rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_idx(rig.mem), 0);

    rig.net.activate(ALL);
    assert!(rig.registered());
    let b = frame(50, 2);
    rig.peer.send(&b).unwrap();
    assert!(rig.event(EventSet::IN));
    // The frame from before the reset is gone.
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (head, b.len() as u32));
    assert_eq!(rig.rx_data(0, BUF), expected(&b, 1));
}

#[test]
fn tap_error_or_hang_up_stops_watching() {
    for events in [EventSet::ERROR, EventSet::HANG_UP | EventSet::IN] {
        let mem = memory();
        let mut rig = Rig::new(&mem, ALL);
        assert!(!rig.event(events));
        assert!(!rig.registered());
        assert_eq!(rig.net.watching, None);
        // Further events are ignored; transmit still works.
        rig.rx.post(rig.mem, &[(BUF, 4096, W)]);
        rig.peer.send(&frame(10, 1)).unwrap();
        assert!(!rig.event(EventSet::IN));
        assert_eq!(rig.rx.used_idx(rig.mem), 0);
        let f = frame(30, 2);
        rig.post_tx(buf_addr(1), &f);
        assert!(rig.notify(TX_QUEUE));
        assert_eq!(rig.sent(), vec![f]);
    }
}

#[test]
fn missing_queues_and_unknown_tags_are_harmless() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    rig.peer.send(&frame(10, 1)).unwrap();
    let mut none = Queues::new(vec![None, None]);
    assert!(!rig.net.process_queue(0, &mut none, &mem));
    assert!(!rig.net.process_queue(1, &mut none, &mem));
    assert!(!rig.net.process_queue(2, &mut none, &mem));
    assert!(!rig.net.backend_event(7, EventSet::IN, &mut none, &mem));
    // Input with no receive queue: wait for the driver to enable it.
    assert!(!rig
        .net
        .backend_event(TAP_TAG, EventSet::IN, &mut none, &mem));
    assert_eq!(rig.net.watching, Some(EventSet::empty()));
    let head = rig.rx.post(rig.mem, &[(BUF, 4096, W)]);
    rig.notify(RX_QUEUE);
    assert_eq!(rig.net.watching, Some(EventSet::IN));
    assert!(rig.event(EventSet::IN));
    assert_eq!(rig.rx.used_elem(rig.mem, 0), (head, 22));
}

#[test]
fn config_space_holds_mac_and_link_status() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ALL);
    let mut c = [0xffu8; 10];
    rig.net.read_config(0, &mut c);
    assert_eq!(c, [0x02, 0, 0, 0xc0, 0xc0, 0x01, 1, 0, 0, 0]);
    let mut b = [0u8; 2];
    rig.net.read_config(6, &mut b);
    assert_eq!(u16::from_le_bytes(b), VIRTIO_NET_S_LINK_UP as u16);
    rig.net.read_config(4, &mut b);
    assert_eq!(b, [0xc0, 0x01]);
    rig.net.read_config(8, &mut b);
    assert_eq!(b, [0, 0]);
    rig.net.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0]);
    // Read-only.
    rig.net.write_config(0, &[0xaa; 6]);
    rig.net.read_config(0, &mut c[..6]);
    assert_eq!(c[..6], MAC);
    assert_eq!(rig.net.mac(), MAC);
}

#[test]
fn invalid_macs_are_refused() {
    for mac in [[0u8; 6], [0x01, 0, 0x5e, 0, 0, 1], [0xff; 6]] {
        let (ours, _peer) = UnixDatagram::pair().unwrap();
        let tap = Tap::from_socket_for_tests(ours, "t").unwrap();
        let err = Net::new(tap, mac, Registrar::detached().unwrap()).unwrap_err();
        assert!(matches!(err, NetError::InvalidMac { .. }), "{err}");
    }
}

#[test]
fn features_offered() {
    let mem = memory();
    let rig = Rig::new(&mem, ALL);
    let f = rig.net.device_features();
    for feature in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
    ] {
        assert!(has(f, feature), "feature {feature}");
    }
    assert_eq!(f.count_ones(), 13);
    assert_eq!(rig.net.device_type(), 1);
    assert_eq!(rig.net.queue_max_sizes(), &[256, 256]);
}

#[test]
fn guest_features_map_to_tap_offloads() {
    use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};
    let f = |features: &[u32]| features.iter().fold(VERSION_1, |acc, &x| acc | bit(x));
    let cases: &[(u64, c_uint)] = &[
        (VERSION_1, 0),
        (
            ALL,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO,
        ),
        (f(&[VIRTIO_NET_F_GUEST_CSUM]), TUN_F_CSUM),
        (
            f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4]),
            TUN_F_CSUM | TUN_F_TSO4,
        ),
        (
            f(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
            ]),
            TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN,
        ),
        (
            f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_UFO]),
            TUN_F_CSUM | TUN_F_UFO,
        ),
        // Inconsistent sets the kernel would refuse are made consistent.
        (
            f(&[
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_UFO,
                VIRTIO_NET_F_GUEST_ECN,
            ]),
            0,
        ),
        (
            f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN]),
            TUN_F_CSUM,
        ),
        // Host-side offloads are not the TAP's to know about.
        (
            f(&[
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
                VIRTIO_NET_F_HOST_UFO,
                VIRTIO_NET_F_MRG_RXBUF,
            ]),
            0,
        ),
    ];
    for &(features, want) in cases {
        assert_eq!(offload_flags(features), want, "features {features:#x}");
        let mem = memory();
        let rig = Rig::new(&mem, features);
        assert_eq!(rig.net.tap().offload(), want);
        assert_eq!(rig.net.tap().vnet_hdr_size().unwrap(), 12);
    }
}

// ---- hostile input ----

/// A cheap stand-in for the fuzz target: random descriptor tables, rings and frames
/// must never panic, and what is used must be within bounds.
#[test]
fn random_chains_and_frames_never_panic() {
    const SMALL: u64 = 0x2_0000;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), SMALL as usize)]).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    const HDR: u64 = 0x7000;
    let mut rig = Rig::new(&mem, ALL);
    let mut tx_buf = vec![0u8; MAX_BUFFER_LEN];
    let mut gathered = 0;
    let (mut rx_used, mut tx_used) = (0u32, 0u32);
    for round in 0..10_000 {
        if round % 1000 == 0 {
            let features = next() & ALL | VERSION_1;
            rig.net.reset();
            rig.net.activate(features);
        }
        // Random descriptors, mostly chained like a driver would, some not; some
        // indirect, some writable.
        let count = next() % 5 + 1;
        let descs: Vec<Descriptor> = (0..count)
            .map(|i| {
                let r = next();
                let mut next_flag = if i + 1 < count { VRING_DESC_F_NEXT } else { 0 };
                if (r >> 22) % 8 == 0 {
                    next_flag ^= VRING_DESC_F_NEXT;
                }
                // Most chains start with a clean header, as a driver would send.
                if i == 0 && r % 2 == 0 {
                    return Descriptor::new(HDR, 12, next_flag as u16, 0);
                }
                let addr = match r % 8 {
                    0 => r,
                    1 => SMALL - (r >> 8) % 64,
                    2 => TX_RING + (r >> 8) % 0x100,
                    _ => 0x8000 + (r >> 8) % (SMALL - 0x8000),
                };
                let len = match (r >> 40) % 8 {
                    0 => u32::MAX,
                    1 => (r >> 48) as u32 % 16,
                    2 => 4096,
                    3 => MAX_BUFFER_LEN as u32,
                    _ => ((r >> 48) % 0x3000) as u32,
                };
                let mut flags = next_flag;
                if (r >> 25) % 6 == 0 {
                    flags |= VRING_DESC_F_WRITE;
                }
                if (r >> 28) % 16 == 0 {
                    flags |= VRING_DESC_F_INDIRECT;
                }
                Descriptor::new(addr, len, flags as u16, (r >> 32) as u16 % 300)
            })
            .collect();
        mem.write_slice(&[0; 12], GuestAddress(HDR)).unwrap();
        // Random bytes where frames and indirect tables live.
        let fill = next();
        let at = 0x8000 + fill % (SMALL - 0x8100);
        mem.write_obj(fill, GuestAddress(at)).unwrap();

        // The gatherer alone: what it accepts is exactly the bytes described.
        if let Ok(len) = gather_tx_frame(&descs, &mem, ALL, &mut tx_buf) {
            gathered += 1;
            let mut want = Vec::new();
            for d in descs.iter().filter(|d| d.len() > 0) {
                want.extend(guest_bytes(&mem, d.addr().0, d.len() as usize));
            }
            assert!(tx_buf[..len] == want[..]);
        }

        match next() % 6 {
            0 => {
                rig.tx.post_raw(rig.mem, &descs);
            }
            1 => {
                rig.rx.post_raw(rig.mem, &descs);
            }
            2 => {
                // Heads out of the table, or an index running ahead.
                let ring = if next() % 2 == 0 {
                    &mut rig.rx
                } else {
                    &mut rig.tx
                };
                if next() % 4 == 0 {
                    let idx = ring.avail_idx(rig.mem);
                    ring.set_avail_idx(rig.mem, idx.wrapping_add(300));
                } else {
                    ring.publish(&mem, next() as u16);
                }
            }
            3 => {
                let len = match next() % 4 {
                    0 => (next() % 12) as usize,
                    1 => MAX_BUFFER_LEN,
                    _ => (next() % 10_000) as usize,
                };
                let _ = rig.peer.send(&vec![next() as u8; len]);
            }
            _ => {}
        }
        // Device-side state only: the rings live in guest memory, which receive
        // buffers (through random indirect tables) may overwrite.
        let before = (rig.rx.queue.next_used(), rig.tx.queue.next_used());
        match next() % 4 {
            0 => drop(rig.notify(RX_QUEUE)),
            1 => drop(rig.notify(TX_QUEUE)),
            2 => drop(rig.event(EventSet::IN)),
            _ => drop(rig.event(EventSet::OUT | EventSet::IN)),
        }
        let after = (rig.rx.queue.next_used(), rig.tx.queue.next_used());
        assert!(after.0.wrapping_sub(before.0) <= QUEUE_SIZE);
        assert!(after.1.wrapping_sub(before.1) <= QUEUE_SIZE);
        rx_used += u32::from(after.0.wrapping_sub(before.0));
        tx_used += u32::from(after.1.wrapping_sub(before.1));
        assert!(rig.net.rx_pending.is_none_or(|len| len <= MAX_BUFFER_LEN));
        // A ring the guest broke is reset by the guest; do the same.
        for ring in [&mut rig.rx, &mut rig.tx] {
            let ahead = ring
                .avail_idx(rig.mem)
                .wrapping_sub(ring.queue.next_avail());
            if ahead > QUEUE_SIZE {
                ring.set_avail_idx(rig.mem, ring.queue.next_avail());
            }
        }
        rig.sent();
    }
    assert!(gathered > 1000, "only {gathered} chains gathered");
    assert!(
        rx_used > 300 && tx_used > 300,
        "used rx {rx_used} tx {tx_used}"
    );
}

// ---- through the transport and the I/O loop ----

/// Counts the wake-ups the I/O loop gives the device.
struct Counting {
    transport: Arc<Mutex<MmioTransport<Net>>>,
    calls: Arc<AtomicUsize>,
}

impl BackendHandler for Counting {
    fn handle(&mut self, tag: u32, events: EventSet) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.transport.lock().unwrap().handle(tag, events);
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn mmio_write(t: &mut MmioTransport<Net>, offset: u64, value: u32) {
    t.mmio_write(offset, &value.to_le_bytes());
}

#[test]
fn io_loop_receives_and_rests_while_the_guest_has_no_buffers() {
    let mem = memory();
    let mut rx = DriverRing::new(&mem, RX_RING, QUEUE_SIZE);
    let mut tx = DriverRing::new(&mem, TX_RING, QUEUE_SIZE);
    let (ours, peer) = UnixDatagram::pair().unwrap();
    let tap = Tap::from_socket_for_tests(ours, "sock-tap").unwrap();
    let mut lp = EventLoop::new().unwrap();
    let net = Net::new(tap, MAC, lp.registrar(5)).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        net,
        mem.clone(),
        Irq::new(irq.try_clone().unwrap()),
    )));
    let calls = Arc::new(AtomicUsize::new(0));
    lp.set_handler(
        5,
        Arc::new(Mutex::new(Counting {
            transport: transport.clone(),
            calls: calls.clone(),
        })),
    );
    let (thread, stopper) = lp.spawn().unwrap();

    // The driver's side of virtio-mmio: features, both queues, DRIVER_OK.
    {
        let mut t = transport.lock().unwrap();
        let t = &mut *t;
        mmio_write(t, 0x070, 1);
        mmio_write(t, 0x070, 3);
        mmio_write(t, 0x024, 0);
        mmio_write(t, 0x020, ALL as u32);
        mmio_write(t, 0x024, 1);
        mmio_write(t, 0x020, (ALL >> 32) as u32);
        mmio_write(t, 0x070, 11);
        for (index, ring) in [(0, &rx), (1, &tx)] {
            mmio_write(t, 0x030, index);
            mmio_write(t, 0x038, u32::from(QUEUE_SIZE));
            for (low, addr) in [
                (0x080, GuestAddress(ring.desc)),
                (0x090, GuestAddress(ring.avail)),
                (0x0a0, GuestAddress(ring.used)),
            ] {
                mmio_write(t, low, addr.0 as u32);
                mmio_write(t, low + 4, (addr.0 >> 32) as u32);
            }
            mmio_write(t, 0x044, 1);
        }
        mmio_write(t, 0x070, 15);
        let mut status = [0u8; 4];
        t.mmio_read(0x070, &mut status);
        assert_eq!(u32::from_le_bytes(status), 15);
    }

    // No receive buffers yet: the first frame waits, the second stays in the TAP.
    let a = frame(300, 1);
    let b = frame(5000, 2);
    peer.send(&a).unwrap();
    peer.send(&b).unwrap();
    wait_until("the frame to be read", || {
        transport.lock().unwrap().device().rx_pending.is_some()
    });
    // The TAP is still readable, but no longer watched: the loop must rest.
    let settled = calls.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    let spins = calls.load(Ordering::SeqCst) - settled;
    assert!(
        spins <= 2,
        "the I/O loop woke {spins} times with nothing to do"
    );
    assert_eq!(rx.used_idx(&mem), 0);

    // The guest adds buffers and notifies: both frames arrive, in order.
    rx.post(&mem, &[(buf_addr(0), 4096, W)]);
    rx.post(&mem, &[(buf_addr(1), 4096, W)]);
    rx.post(&mem, &[(buf_addr(2), 4096, W)]);
    mmio_write(&mut transport.lock().unwrap(), 0x050, 0);
    wait_until("both frames to be received", || rx.used_idx(&mem) == 3);
    assert_eq!(rx.used_elem(&mem, 0).1 as usize, a.len());
    assert_eq!(guest_bytes(&mem, buf_addr(0), a.len()), expected(&a, 1));
    assert_eq!(rx.used_elem(&mem, 1).1, 4096);
    assert_eq!(rx.used_elem(&mem, 2).1 as usize, b.len() - 4096);
    let mut got = guest_bytes(&mem, buf_addr(1), 4096);
    got.extend(guest_bytes(&mem, buf_addr(2), b.len() - 4096));
    assert!(got == expected(&b, 2));
    assert!(irq.read().unwrap() > 0);

    // Transmit through the transport as well.
    let f = frame(64, 3);
    mem.write_slice(&f, GuestAddress(buf_addr(9))).unwrap();
    tx.post(&mem, &[(buf_addr(9), f.len() as u32, R)]);
    mmio_write(&mut transport.lock().unwrap(), 0x050, 1);
    let mut buf = [0u8; 256];
    assert_eq!(peer.recv(&mut buf).unwrap(), f.len());
    assert_eq!(buf[..f.len()], f[..]);

    stopper.stop();
    thread.join().unwrap();
}

// ---- a real TAP, in a network namespace of its own ----

const INNER_ENV: &str = "COCOON_NET_TEST_INNER";
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const HOST_IP: [u8; 4] = [10, 213, 0, 1];
const GUEST_IP: [u8; 4] = [10, 213, 0, 2];

/// A test whose subject cannot run here: fails under CI (where everything is installed),
/// otherwise says why it did not run.
fn cannot_run(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "this test cannot run its subject under CI: {why}"
    );
    eprintln!("not run on this machine: {why}");
}

/// Runs `real_tap_inner` in a new network namespace (`unshare --net`): the host's
/// interfaces are never touched, and the namespace, with its TAPs, goes away with the
/// process whatever happens.
#[test]
fn real_tap_in_a_fresh_network_namespace() {
    if !std::path::Path::new(crate::devices::net::tap::TUN_DEVICE).exists() {
        cannot_run("no /dev/net/tun");
        return;
    }
    match Command::new("unshare").args(["--net", "true"]).status() {
        Ok(status) if status.success() => {}
        other => {
            cannot_run(&format!("cannot create a network namespace: {other:?}"));
            return;
        }
    }
    let out = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "devices::net::tests::real_tap_inner",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("1 passed"),
        "did not run:\n{stdout}\n{stderr}"
    );
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Internet checksum's folded one's-complement sum.
fn ones_sum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none).
fn udp_frame(
    src: ([u8; 6], [u8; 4], u16),
    dst: ([u8; 6], [u8; 4], u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst.0);
    f.extend(src.0);
    f.extend([0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend(total.to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend(src.1);
    ip.extend(dst.1);
    let csum = !ones_sum(&ip, 0);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend(ip);
    f.extend(src.2.to_be_bytes());
    f.extend(dst.2.to_be_bytes());
    f.extend((8 + payload.len() as u16).to_be_bytes());
    f.extend([0, 0]);
    f.extend(payload);
    f
}

/// Wakes the device until a UDP frame for `port` lands in a receive buffer (the
/// chains posted at `bufs`); returns it with its virtio-net header.
fn receive_udp(rig: &mut Rig<'_>, bufs: &[(u16, u64)], port: u16) -> Vec<u8> {
    let mut seen = rig.rx.used_idx(rig.mem);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        rig.event(EventSet::IN);
        while seen != rig.rx.used_idx(rig.mem) {
            let (head, len) = rig.rx.used_elem(rig.mem, seen);
            seen = seen.wrapping_add(1);
            let addr = bufs.iter().find(|b| b.0 == head).unwrap().1;
            let data = guest_bytes(rig.mem, addr, len as usize);
            let f = &data[VNET_HDR_LEN..];
            if f.len() >= 42
                && f[12..14] == [8, 0]
                && f[23] == 17
                && f[36..38] == port.to_be_bytes()
            {
                return data;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no UDP frame for port {port} from the TAP"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "needs a network namespace of its own: run by real_tap_in_a_fresh_network_namespace"]
fn real_tap_inner() {
    if std::env::var_os(INNER_ENV).is_none() {
        eprintln!("not run: it runs only inside real_tap_in_a_fresh_network_namespace");
        return;
    }
    // Never anywhere but in a namespace of our own, which has only loopback.
    let links = ip(&["-o", "link", "show"]);
    assert_eq!(
        links.lines().count(),
        1,
        "not a fresh network namespace:\n{links}"
    );
    // No IPv6 chatter on the TAP (best effort: IPv6 may be absent).
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");

    // Adopting fds: only an attached TAP with a vnet header and no packet info.
    let fd = Tap::open_raw_for_tests("cocoon-t1", TAP_FLAGS).unwrap();
    let fd_flags = |fd: i32| {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let line = info.lines().find(|l| l.starts_with("flags:")).unwrap();
        i32::from_str_radix(line["flags:".len()..].trim(), 8).unwrap()
    };
    let before = fd_flags(fd.as_raw_fd());
    assert_eq!(before & (libc::O_NONBLOCK | libc::O_CLOEXEC), 0);
    let tap = Tap::from_fd(fd).unwrap();
    assert_eq!(tap.name(), "cocoon-t1");
    let after = fd_flags(tap.as_raw_fd());
    assert_eq!(after & libc::O_NONBLOCK, libc::O_NONBLOCK, "{after:o}");
    assert_eq!(after & libc::O_CLOEXEC, libc::O_CLOEXEC, "{after:o}");
    let mut buf = [0u8; 64];
    let err = tap.read_frame(&mut buf).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    drop(tap);
    let fd = Tap::open_raw_for_tests("cocoon-t2", libc::IFF_TAP | libc::IFF_NO_PI).unwrap();
    assert!(
        matches!(Tap::from_fd(fd), Err(TapError::NoVnetHdr { name, .. }) if name == "cocoon-t2")
    );
    let flags = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    let fd = Tap::open_raw_for_tests("cocoon-t4", flags).unwrap();
    assert!(matches!(Tap::from_fd(fd), Err(TapError::NotTap { .. })));
    let fd = Tap::unattached_tun_for_tests().unwrap();
    match Tap::from_fd(fd) {
        Err(TapError::NotTun { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EBADFD))
        }
        other => panic!("{other:?}"),
    }

    // The device on a real TAP.
    let tap = Tap::open("cocoon-t0").unwrap();
    assert_eq!(tap.name(), "cocoon-t0");
    let mem = memory();
    let (_unused, peer) = UnixDatagram::pair().unwrap();
    let mut rig = Rig::with_tap(&mem, tap, peer, ALL);
    assert_eq!(rig.net.tap().vnet_hdr_size().unwrap(), 12);
    assert_eq!(rig.net.tap().offload(), 0x1f);
    ip(&[
        "link",
        "set",
        "dev",
        "cocoon-t0",
        "address",
        "02:00:00:00:00:01",
    ]);
    ip(&["addr", "add", "10.213.0.1/24", "dev", "cocoon-t0"]);
    ip(&["link", "set", "dev", "cocoon-t0", "up"]);
    ip(&[
        "neigh",
        "replace",
        "10.213.0.2",
        "lladdr",
        "02:00:00:c0:c0:01",
        "dev",
        "cocoon-t0",
        "nud",
        "permanent",
    ]);
    let sock = UdpSocket::bind("10.213.0.1:5555").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // Transmit: the guest's frame reaches the host's UDP socket.
    let payload = b"hello from the guest";
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend(udp_frame(
        (MAC, GUEST_IP, 4444),
        (HOST_MAC, HOST_IP, 5555),
        payload,
    ));
    rig.post_tx(buf_addr(40), &f);
    assert!(rig.notify(TX_QUEUE));
    let mut buf = [0u8; 256];
    let (n, from) = sock.recv_from(&mut buf).expect("frame from the device");
    assert_eq!(&buf[..n], payload);
    assert_eq!(from.to_string(), "10.213.0.2:4444");

    // Receive, with checksum offload (GUEST_CSUM): the kernel leaves it to the guest.
    let mut bufs: Vec<(u16, u64)> = (0..8)
        .map(|i| (rig.rx.post(rig.mem, &[(buf_addr(i), 4096, W)]), buf_addr(i)))
        .collect();
    sock.send_to(b"hello from the host", "10.213.0.2:4444")
        .unwrap();
    let got = receive_udp(&mut rig, &bufs, 4444);
    assert_eq!(got[0], HDR_F_NEEDS_CSUM, "header {:?}", &got[..12]);
    // csum_start: the UDP header; csum_offset: its checksum field.
    assert_eq!(got[6..10], [34, 0, 6, 0]);
    assert_eq!(got[10..12], [1, 0]);
    assert!(got.ends_with(b"hello from the host"));

    // Without GUEST_CSUM the TAP gets no offloads and checksums itself.
    rig.net.reset();
    rig.net.activate(ALL & !bit(VIRTIO_NET_F_GUEST_CSUM));
    assert_eq!(rig.net.tap().offload(), 0);
    bufs.extend((8..16).map(|i| (rig.rx.post(rig.mem, &[(buf_addr(i), 4096, W)]), buf_addr(i))));
    sock.send_to(b"checksummed", "10.213.0.2:4444").unwrap();
    let got = receive_udp(&mut rig, &bufs, 4444);
    assert_eq!(got[0], 0, "header {:?}", &got[..12]);
    let udp = &got[VNET_HDR_LEN + 34..];
    assert_ne!(udp[6..8], [0, 0], "no UDP checksum");
    let mut pseudo = Vec::new();
    pseudo.extend(HOST_IP);
    pseudo.extend(GUEST_IP);
    pseudo.extend([0, 17]);
    pseudo.extend((udp.len() as u16).to_be_bytes());
    assert_eq!(
        ones_sum(udp, u32::from(ones_sum(&pseudo, 0))),
        0xffff,
        "bad UDP checksum"
    );
}
