//! virtio-vsock packets (virtio 1.1 §5.10.6): the 44-byte header and the payload after it.
//!
//! A packet is a byte stream laid over a descriptor chain: the header is the first 44
//! bytes, the payload the `len` bytes after it, wherever the descriptor boundaries fall
//! (older Linux drivers put the header and the payload in separate descriptors, newer
//! ones use a single buffer). Nothing here does I/O: `parse_tx_packet` only reads guest
//! memory, which is what the `virtio_vsock_packet` fuzz target drives.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::Permissions;

use crate::devices::virtio::segments::{
    descriptor_segments, split_segments, write_segments, OutsideMemory,
};
pub use crate::devices::virtio::segments::{total_len, Segment};
use crate::devices::GuestMemory;

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_LEN: usize = 44;
/// The host's CID: every guest packet must be addressed to it.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload accepted or produced in one packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations (`VIRTIO_VSOCK_OP_*`); 0 (`INVALID`) and anything above 7 are
/// rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    pub fn from_raw(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, fields as on the wire (little-endian there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub socket_type: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            socket_type: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.socket_type.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a chain was refused. Errors found once the header was read come with it in
/// [`TxError`], so the device can answer the connection it names.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum PacketError {
    #[error("descriptor chain is empty or unreadable")]
    EmptyChain,
    #[error("device-writable descriptor in a TX chain")]
    WritableInTx,
    #[error("device-readable descriptor in an RX chain")]
    ReadableInRx,
    #[error("descriptor at {addr:#x} (len {len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("chain holds {0} bytes, less than the {HEADER_LEN}-byte header")]
    HeaderTooShort(u64),
    #[error("cannot access guest memory at {0:#x}")]
    GuestMemory(u64),
    #[error("source CID {src_cid} is not the guest's ({guest_cid})")]
    BadSrcCid { src_cid: u64, guest_cid: u64 },
    #[error("destination CID {0} is not the host ({HOST_CID})")]
    BadDstCid(u64),
    #[error("socket type {0} is not STREAM")]
    BadType(u16),
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    #[error("payload length {0} exceeds {MAX_PAYLOAD}")]
    PayloadTooLong(u32),
    #[error("payload length {len} exceeds the {available} bytes the chain holds")]
    PayloadBeyondChain { len: u32, available: u64 },
    #[error("{op:?} packet carries {len} payload bytes")]
    PayloadOnControl { op: Op, len: u32 },
    #[error("RX buffer of {capacity} bytes cannot hold a {needed}-byte packet")]
    RxBufferTooSmall { capacity: u64, needed: u64 },
}

/// A refused TX chain: the reason and, if it could be read, the header.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
#[error("{error}")]
pub struct TxError {
    pub header: Option<Header>,
    pub error: PacketError,
}

/// A TX packet that passed every check: addressed from the guest to the host, a stream
/// packet of a known operation, with exactly `header.len` payload bytes in `payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    pub header: Header,
    pub op: Op,
    pub payload: Vec<Segment>,
}

/// Non-empty descriptors as spans, each checked against guest memory for `access`.
fn to_segments(
    descs: &[Descriptor],
    mem: &GuestMemory,
    access: Permissions,
) -> Result<Vec<Segment>, PacketError> {
    descriptor_segments(descs, mem, access)
        .map_err(|OutsideMemory { addr, len }| PacketError::OutsideMemory { addr, len })
}

/// Reads exactly `buf.len()` bytes from the spans, in order.
pub fn read_segments(
    mem: &GuestMemory,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), PacketError> {
    crate::devices::virtio::segments::read_segments(mem, segs, buf)
        .map_err(PacketError::GuestMemory)
}

/// Parses and validates one TX chain against `guest_cid`; reads guest memory only.
///
/// The header is the first 44 device-readable bytes, the payload the `len` bytes after
/// them, across any descriptor boundaries; bytes past the payload are ignored.
/// Checks: no device-writable descriptor, every descriptor inside guest memory, the
/// source is the guest, the destination the host, a STREAM packet, a known operation,
/// `len` within [`MAX_PAYLOAD`] and within the chain, and no payload except on RW.
pub fn parse_tx_packet(
    descs: &[Descriptor],
    mem: &GuestMemory,
    guest_cid: u64,
) -> Result<TxPacket, TxError> {
    let early = |error| TxError {
        header: None,
        error,
    };
    if descs.is_empty() {
        return Err(early(PacketError::EmptyChain));
    }
    if descs.iter().any(Descriptor::is_write_only) {
        return Err(early(PacketError::WritableInTx));
    }
    let segs = to_segments(descs, mem, Permissions::Read).map_err(early)?;
    let (head, rest) = split_segments(&segs, HEADER_LEN as u64)
        .ok_or_else(|| early(PacketError::HeaderTooShort(total_len(&segs))))?;
    let mut raw = [0u8; HEADER_LEN];
    read_segments(mem, &head, &mut raw).map_err(early)?;
    let header = Header::from_bytes(&raw);

    let reject = |error| TxError {
        header: Some(header),
        error,
    };
    if header.src_cid != guest_cid {
        return Err(reject(PacketError::BadSrcCid {
            src_cid: header.src_cid,
            guest_cid,
        }));
    }
    if header.dst_cid != HOST_CID {
        return Err(reject(PacketError::BadDstCid(header.dst_cid)));
    }
    if header.socket_type != TYPE_STREAM {
        return Err(reject(PacketError::BadType(header.socket_type)));
    }
    let op = Op::from_raw(header.op).ok_or_else(|| reject(PacketError::UnknownOp(header.op)))?;
    if header.len > MAX_PAYLOAD {
        return Err(reject(PacketError::PayloadTooLong(header.len)));
    }
    if op != Op::Rw && header.len != 0 {
        return Err(reject(PacketError::PayloadOnControl {
            op,
            len: header.len,
        }));
    }
    let (payload, _) = split_segments(&rest, u64::from(header.len)).ok_or_else(|| {
        reject(PacketError::PayloadBeyondChain {
            len: header.len,
            available: total_len(&rest),
        })
    })?;
    Ok(TxPacket {
        header,
        op,
        payload,
    })
}

/// A device-writable RX chain, checked to lie in guest memory and to hold a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxBuffer {
    segments: Vec<Segment>,
    capacity: u64,
}

impl RxBuffer {
    /// Bytes the chain holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Payload bytes that fit after the header.
    pub fn payload_room(&self) -> u64 {
        self.capacity.saturating_sub(HEADER_LEN as u64)
    }
}

/// Checks an RX chain: device-writable descriptors only, inside guest memory, room for at
/// least a header.
pub fn parse_rx_buffer(descs: &[Descriptor], mem: &GuestMemory) -> Result<RxBuffer, PacketError> {
    if descs.is_empty() {
        return Err(PacketError::EmptyChain);
    }
    if descs.iter().any(|d| !d.is_write_only()) {
        return Err(PacketError::ReadableInRx);
    }
    let segments = to_segments(descs, mem, Permissions::Write)?;
    let capacity = total_len(&segments);
    if capacity < HEADER_LEN as u64 {
        return Err(PacketError::RxBufferTooSmall {
            capacity,
            needed: HEADER_LEN as u64,
        });
    }
    Ok(RxBuffer { segments, capacity })
}

/// Writes `header` (with `len` set to the payload's length) and `payload` into `buf`, as
/// one byte stream across its descriptors; returns the bytes written (the used length).
pub fn write_rx_packet(
    mem: &GuestMemory,
    buf: &RxBuffer,
    header: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let needed = (HEADER_LEN + payload.len()) as u64;
    let too_small = PacketError::RxBufferTooSmall {
        capacity: buf.capacity,
        needed,
    };
    let len = u32::try_from(payload.len()).map_err(|_| too_small.clone())?;
    if needed > buf.capacity || len > MAX_PAYLOAD {
        return Err(too_small);
    }
    let header = Header { len, ..*header };
    // needed <= capacity: the spans hold it all.
    let written = write_segments(mem, &buf.segments, &[&header.to_bytes(), payload])
        .map_err(|stopped| PacketError::GuestMemory(stopped.addr))?;
    if written as u64 != needed {
        return Err(PacketError::GuestMemory(0));
    }
    // needed <= HEADER_LEN + MAX_PAYLOAD.
    Ok(needed as u32)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

    use crate::devices::virtio::test_ring::{self, desc};

    const MEM_SIZE: usize = 0x4_0000;
    const CID: u64 = 3;
    const BUF: u64 = 0x1000;
    const BUF2: u64 = 0x2_0000;
    const R: bool = false;
    const W: bool = true;

    fn memory() -> GuestMemory {
        test_ring::memory(MEM_SIZE)
    }

    fn header(op: Op, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 5000,
            len,
            socket_type: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 77,
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed)
            .collect()
    }

    /// Lays `bytes` out in guest memory as pieces of the given lengths, each in its own
    /// place (pieces are 0x1000 apart, in reverse order so that they are not contiguous).
    fn lay_out(
        mem: &GuestMemory,
        bytes: &[u8],
        pieces: &[usize],
        writable: bool,
    ) -> Vec<Descriptor> {
        let mut descs = Vec::new();
        let mut off = 0;
        for (i, &n) in pieces.iter().enumerate() {
            let addr = BUF2 - (i as u64 + 1) * 0x1_0000 / 8;
            let end = (off + n).min(bytes.len());
            mem.write_slice(&bytes[off.min(end)..end], GuestAddress(addr))
                .unwrap();
            descs.push(desc(addr, n as u32, writable));
            off += n;
        }
        descs
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xdead_beef,
            dst_port: 7,
            len: 300,
            socket_type: 1,
            op: 5,
            flags: 3,
            buf_alloc: 262_144,
            fwd_cnt: u32::MAX,
        };
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        // Little-endian at the spec's offsets.
        assert_eq!(b[0], 0x08);
        assert_eq!(&b[16..20], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &[0xff; 4]);
    }

    #[test]
    fn header_and_payload_in_one_descriptor() {
        let mem = memory();
        let payload = pattern(1000, 1);
        let mut bytes = header(Op::Rw, 1000).to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        let pkt = parse_tx_packet(&[desc(BUF, 1044, R)], &mem, CID).unwrap();
        assert_eq!(pkt.header, header(Op::Rw, 1000));
        assert_eq!(pkt.op, Op::Rw);
        assert_eq!(
            pkt.payload,
            vec![Segment {
                addr: GuestAddress(BUF + 44),
                len: 1000
            }]
        );
        let mut got = vec![0; 1000];
        read_segments(&mem, &pkt.payload, &mut got).unwrap();
        assert_eq!(got, payload);
        // A larger buffer than the packet: the tail is ignored.
        let pkt = parse_tx_packet(&[desc(BUF, 4096, R)], &mem, CID).unwrap();
        assert_eq!(total_len(&pkt.payload), 1000);
    }

    #[test]
    fn header_and_payload_split_at_odd_offsets() {
        let mem = memory();
        let payload = pattern(777, 9);
        let mut bytes = header(Op::Rw, 777).to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let layouts: &[&[usize]] = &[
            &[44, 777],
            &[1, 43, 777],
            &[7, 100, 714],
            &[43, 2, 776],
            &[45, 776],
            &[20, 24, 1, 1, 775],
            &[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 776],
            // The payload's end inside a descriptor with more room.
            &[30, 30, 2000],
        ];
        for pieces in layouts {
            let descs = lay_out(&mem, &bytes, pieces, R);
            let pkt = parse_tx_packet(&descs, &mem, CID).unwrap();
            assert_eq!(pkt.header, header(Op::Rw, 777), "{pieces:?}");
            assert_eq!(total_len(&pkt.payload), 777, "{pieces:?}");
            let mut got = vec![0; 777];
            read_segments(&mem, &pkt.payload, &mut got).unwrap();
            assert_eq!(got, payload, "{pieces:?}");
        }
    }

    #[test]
    fn rejects_bad_fields_with_the_header() {
        let mem = memory();
        let check = |h: Header, chain_payload: u32, want: PacketError| {
            let mut bytes = h.to_bytes().to_vec();
            bytes.resize(HEADER_LEN + chain_payload as usize, 0xab);
            mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
            let d = desc(BUF, bytes.len() as u32, R);
            let err = parse_tx_packet(&[d], &mem, CID).unwrap_err();
            assert_eq!(err.error, want, "{h:?}");
            assert_eq!(err.header, Some(h));
        };
        let ok = header(Op::Request, 0);
        check(
            Header { src_cid: 4, ..ok },
            0,
            PacketError::BadSrcCid {
                src_cid: 4,
                guest_cid: CID,
            },
        );
        check(
            Header {
                src_cid: CID | 1 << 32,
                ..ok
            },
            0,
            PacketError::BadSrcCid {
                src_cid: CID | 1 << 32,
                guest_cid: CID,
            },
        );
        check(Header { dst_cid: 1, ..ok }, 0, PacketError::BadDstCid(1));
        check(
            Header { dst_cid: CID, ..ok },
            0,
            PacketError::BadDstCid(CID),
        );
        check(
            Header {
                socket_type: 2,
                ..ok
            },
            0,
            PacketError::BadType(2),
        );
        check(Header { op: 0, ..ok }, 0, PacketError::UnknownOp(0));
        check(Header { op: 8, ..ok }, 0, PacketError::UnknownOp(8));
        check(
            header(Op::Rw, MAX_PAYLOAD + 1),
            MAX_PAYLOAD + 1,
            PacketError::PayloadTooLong(MAX_PAYLOAD + 1),
        );
        check(
            header(Op::Rw, 100),
            99,
            PacketError::PayloadBeyondChain {
                len: 100,
                available: 99,
            },
        );
        check(
            header(Op::Rw, u32::MAX),
            0,
            PacketError::PayloadTooLong(u32::MAX),
        );
        check(
            header(Op::Shutdown, 4),
            4,
            PacketError::PayloadOnControl {
                op: Op::Shutdown,
                len: 4,
            },
        );
        // The largest payload is fine.
        let mut bytes = header(Op::Rw, MAX_PAYLOAD).to_bytes().to_vec();
        bytes.resize(HEADER_LEN + MAX_PAYLOAD as usize, 1);
        mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        let d = desc(BUF, bytes.len() as u32, R);
        assert!(parse_tx_packet(&[d], &mem, CID).is_ok());
    }

    #[test]
    fn rejects_malformed_chains_without_a_header() {
        let mem = memory();
        mem.write_slice(&header(Op::Request, 0).to_bytes(), GuestAddress(BUF))
            .unwrap();
        let cases: &[(&[Descriptor], PacketError)] = &[
            (&[], PacketError::EmptyChain),
            (&[desc(BUF, 43, R)], PacketError::HeaderTooShort(43)),
            (
                &[
                    desc(BUF, 20, R),
                    desc(BUF + 20, 0, R),
                    desc(BUF + 20, 20, R),
                ],
                PacketError::HeaderTooShort(40),
            ),
            (&[desc(BUF, 44, W)], PacketError::WritableInTx),
            (
                &[desc(BUF, 44, R), desc(BUF2, 10, W)],
                PacketError::WritableInTx,
            ),
            (
                &[desc(MEM_SIZE as u64 - 20, 44, R)],
                PacketError::OutsideMemory {
                    addr: MEM_SIZE as u64 - 20,
                    len: 44,
                },
            ),
            (
                &[desc(u64::MAX - 10, 44, R)],
                PacketError::OutsideMemory {
                    addr: u64::MAX - 10,
                    len: 44,
                },
            ),
        ];
        for (descs, want) in cases {
            let err = parse_tx_packet(descs, &mem, CID).unwrap_err();
            assert_eq!(&err.error, want, "{descs:?}");
            assert_eq!(err.header, None);
        }
    }

    #[test]
    fn rx_packet_written_across_descriptors() {
        let mem = memory();
        let payload = pattern(500, 4);
        let h = Header {
            src_cid: HOST_CID,
            dst_cid: CID,
            ..header(Op::Rw, 0)
        };
        for pieces in [&[544][..], &[44, 500], &[1, 2, 600], &[50, 10, 10, 474]] {
            let descs = lay_out(&mem, &[], pieces, W);
            let buf = parse_rx_buffer(&descs, &mem).unwrap();
            assert_eq!(buf.capacity(), pieces.iter().sum::<usize>() as u64);
            assert_eq!(write_rx_packet(&mem, &buf, &h, &payload).unwrap(), 544);
            // Read it back as the driver would: one stream over the descriptors.
            let mut stream = Vec::new();
            for d in &descs {
                let mut piece = vec![0; d.len() as usize];
                mem.read_slice(&mut piece, d.addr()).unwrap();
                stream.extend_from_slice(&piece);
            }
            let mut raw = [0u8; HEADER_LEN];
            raw.copy_from_slice(&stream[..HEADER_LEN]);
            assert_eq!(Header::from_bytes(&raw), Header { len: 500, ..h });
            assert_eq!(&stream[HEADER_LEN..544], &payload[..], "{pieces:?}");
        }
        // Too small for the packet: refused, nothing written past the buffer.
        let descs = lay_out(&mem, &[], &[44, 100], W);
        let buf = parse_rx_buffer(&descs, &mem).unwrap();
        assert_eq!(
            write_rx_packet(&mem, &buf, &h, &payload),
            Err(PacketError::RxBufferTooSmall {
                capacity: 144,
                needed: 544
            })
        );
    }

    #[test]
    fn rx_buffer_checks() {
        let mem = memory();
        assert_eq!(parse_rx_buffer(&[], &mem), Err(PacketError::EmptyChain));
        assert_eq!(
            parse_rx_buffer(&[desc(BUF, 4096, R)], &mem),
            Err(PacketError::ReadableInRx)
        );
        assert_eq!(
            parse_rx_buffer(&[desc(BUF, 20, W), desc(BUF2, 23, W)], &mem),
            Err(PacketError::RxBufferTooSmall {
                capacity: 43,
                needed: 44
            })
        );
        assert_eq!(
            parse_rx_buffer(&[desc(MEM_SIZE as u64 - 4, 64, W)], &mem),
            Err(PacketError::OutsideMemory {
                addr: MEM_SIZE as u64 - 4,
                len: 64
            })
        );
        let buf = parse_rx_buffer(&[desc(BUF, 44, W)], &mem).unwrap();
        assert_eq!(buf.payload_room(), 0);
    }

    #[test]
    fn op_values() {
        for raw in 0..=u16::MAX {
            match Op::from_raw(raw) {
                Some(op) => assert_eq!(op as u16, raw),
                None => assert!(raw == 0 || raw > 7),
            }
        }
    }

    /// A cheap stand-in for the fuzz target: random chains over random memory never
    /// panic, and whatever is accepted is consistent and lies in guest memory.
    #[test]
    fn parse_survives_random_chains() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut accepted = 0;
        for _ in 0..20_000 {
            // Mostly plausible headers at 0 and 0x100, with one field disturbed.
            let r = next();
            let op = match r % 16 {
                0 => (r >> 4) as u16 % 16,
                1..=8 => Op::Rw as u16,
                _ => (r >> 4) as u16 % 7 + 1,
            };
            let len = if op == Op::Rw as u16 || r % 32 == 9 {
                [0, 1, 43, 44, 100, 4096, MAX_PAYLOAD, u32::MAX][((r >> 8) % 8) as usize]
            } else {
                0
            };
            let mut h = Header {
                len,
                op,
                ..header(Op::Rw, 0)
            };
            match (r >> 16) % 16 {
                0 => h.src_cid = next(),
                1 => h.dst_cid = next() % 4,
                2 => h.socket_type = (next() % 3) as u16,
                _ => {}
            }
            mem.write_slice(&h.to_bytes(), GuestAddress(0)).unwrap();
            mem.write_slice(&h.to_bytes(), GuestAddress(0x100)).unwrap();
            let count = (next() % 6) as usize;
            let descs: Vec<Descriptor> = (0..count)
                .map(|i| {
                    let r = next();
                    let addr = match r % 8 {
                        0 => r,
                        1 => 0x4000 - (r >> 8) % 64,
                        _ if i == 0 && r % 8 < 5 => [0, 0x100][(r >> 3) as usize % 2],
                        _ => (r >> 8) % 0x4800,
                    };
                    let len = match (r >> 40) % 8 {
                        0 => u32::MAX,
                        1 => (r >> 48) as u32 % 44,
                        2 => 44,
                        3 => 144,
                        _ => ((r >> 48) % 0x2000) as u32,
                    };
                    desc(addr, len, (r >> 36) % 8 == 0)
                })
                .collect();
            if let Ok(pkt) = parse_tx_packet(&descs, &mem, CID) {
                accepted += 1;
                assert_eq!(total_len(&pkt.payload), u64::from(pkt.header.len));
                assert!(pkt.header.len <= MAX_PAYLOAD);
                assert_eq!(pkt.header.src_cid, CID);
                assert_eq!(pkt.header.dst_cid, HOST_CID);
                assert_eq!(pkt.op as u16, pkt.header.op);
                for seg in &pkt.payload {
                    assert!(mem.check_range(seg.addr, seg.len as usize, Permissions::Read));
                }
                let mut buf = vec![0; pkt.header.len as usize];
                read_segments(&mem, &pkt.payload, &mut buf).unwrap();
            }
            if let Ok(buf) = parse_rx_buffer(&descs, &mem) {
                let room = buf.payload_room().min(u64::from(MAX_PAYLOAD)) as usize;
                let payload = vec![0x5a; room];
                assert_eq!(
                    write_rx_packet(&mem, &buf, &h, &payload),
                    Ok((HEADER_LEN + room) as u32)
                );
            }
        }
        assert!(accepted > 300, "only {accepted} chains accepted");
    }
}
