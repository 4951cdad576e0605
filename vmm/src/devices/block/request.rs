//! virtio-blk request chains: framing and checks, before any I/O.

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemory as _, Permissions};

use super::{HEADER_LEN, MAX_DISCARD_SEGMENTS, SECTOR_SIZE, SEGMENT_LEN};
use crate::devices::virtio::segments::{
    descriptor_segments, read_segments, split_segments, total_len, OutsideMemory, Segment,
};
use crate::devices::GuestMemory;

/// Why a request chain was rejected before any I/O.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor chain is empty or unreadable")]
    EmptyChain,
    #[error("last descriptor is not a device-writable status byte in guest memory")]
    NoStatus,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x} (len {len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("request header is {0} bytes, need {HEADER_LEN}")]
    HeaderTooShort(u64),
    #[error("cannot read the request from guest memory at {0:#x}")]
    GuestMemory(u64),
    #[error("request type {request_type} has {readable} unexpected device-readable data bytes")]
    UnexpectedReadable { request_type: u32, readable: u64 },
    #[error("request type {request_type} has {writable} unexpected device-writable data bytes")]
    UnexpectedWritable { request_type: u32, writable: u64 },
    #[error("read or write request without data")]
    NoData,
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    #[error("discard/write-zeroes payload of {0} bytes is not whole segments")]
    BadSegmentPayload(u64),
    #[error("{0} discard/write-zeroes segments, at most {MAX_DISCARD_SEGMENTS} supported")]
    TooManySegments(u64),
}

impl RequestError {
    /// The status the guest sees for this error.
    pub(super) fn status(&self) -> u32 {
        match self {
            // The spec asks for UNSUPP when the driver exceeds max_discard_seg.
            RequestError::TooManySegments(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// One discard / write-zeroes range as the guest sent it (not yet range-checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `data_len` bytes from `sector` into `data`.
    In,
    /// Write `data` at `sector`.
    Out,
    Flush,
    /// Write the serial into `data`.
    GetId,
    Discard(Vec<DiscardSegment>),
    WriteZeroes(Vec<DiscardSegment>),
    /// Any other type: answered with UNSUPP.
    Unsupported(u32),
}

/// A request that passed `parse_request`: every span in it lies in guest memory and is
/// of the right direction. Disk bounds are checked at execution, since a swap can change
/// the capacity between requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// Guest buffers for In/Out/GetId, in order.
    pub data: Vec<Segment>,
    pub data_len: u64,
    /// The status byte.
    pub status: GuestAddress,
}

/// The device-writable status byte: the last byte of the last descriptor, if that
/// descriptor is device-writable and inside guest memory.
pub fn status_address(descs: &[Descriptor], mem: &GuestMemory) -> Option<GuestAddress> {
    let last = descs.last()?;
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    mem.check_range(addr, 1, Permissions::Write).then_some(addr)
}

/// Parses and validates one request chain; no disk I/O, no writes to guest memory.
///
/// Framing follows the byte-stream view of virtio 1.1 §2.6.4: the header is the first 16
/// device-readable bytes, the status the last device-writable byte, data is what lies
/// between, whatever the descriptor boundaries.
pub fn parse_request(descs: &[Descriptor], mem: &GuestMemory) -> Result<Request, RequestError> {
    if descs.is_empty() {
        return Err(RequestError::EmptyChain);
    }
    let status = status_address(descs, mem).ok_or(RequestError::NoStatus)?;

    let first_writable = descs
        .iter()
        .position(Descriptor::is_write_only)
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_writable);
    if writable.iter().any(|d| !d.is_write_only()) {
        return Err(RequestError::ReadableAfterWritable);
    }

    let to_segments = |descs: &[Descriptor], access| {
        descriptor_segments(descs, mem, access)
            .map_err(|OutsideMemory { addr, len }| RequestError::OutsideMemory { addr, len })
    };
    let readable = to_segments(readable, Permissions::Read)?;
    let writable = to_segments(writable, Permissions::Write)?;

    let (header, readable_data) = split_segments(&readable, HEADER_LEN)
        .ok_or(RequestError::HeaderTooShort(total_len(&readable)))?;
    let mut raw = [0u8; HEADER_LEN as usize];
    read_segments(mem, &header, &mut raw).map_err(RequestError::GuestMemory)?;
    let request_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);

    // The status byte is the tail of `writable`, which holds at least that byte.
    let writable_len = total_len(&writable);
    let (writable_data, _status) =
        split_segments(&writable, writable_len.saturating_sub(1)).ok_or(RequestError::NoStatus)?;
    let readable_len = total_len(&readable_data);
    let writable_len = total_len(&writable_data);

    let no_readable = || {
        if readable_len == 0 {
            Ok(())
        } else {
            Err(RequestError::UnexpectedReadable {
                request_type,
                readable: readable_len,
            })
        }
    };
    let no_writable = || {
        if writable_len == 0 {
            Ok(())
        } else {
            Err(RequestError::UnexpectedWritable {
                request_type,
                writable: writable_len,
            })
        }
    };
    let sectors = |len: u64| {
        if len == 0 {
            Err(RequestError::NoData)
        } else if len.is_multiple_of(SECTOR_SIZE) {
            Ok(())
        } else {
            Err(RequestError::UnalignedLength(len))
        }
    };

    let request = |kind, data: Vec<Segment>| {
        let data_len = total_len(&data);
        Request {
            kind,
            sector,
            data,
            data_len,
            status,
        }
    };
    match request_type {
        VIRTIO_BLK_T_IN => {
            no_readable()?;
            sectors(writable_len)?;
            Ok(request(RequestKind::In, writable_data))
        }
        VIRTIO_BLK_T_OUT => {
            no_writable()?;
            sectors(readable_len)?;
            Ok(request(RequestKind::Out, readable_data))
        }
        VIRTIO_BLK_T_FLUSH => {
            no_readable()?;
            no_writable()?;
            Ok(request(RequestKind::Flush, Vec::new()))
        }
        VIRTIO_BLK_T_GET_ID => {
            no_readable()?;
            if writable_len == 0 {
                return Err(RequestError::NoData);
            }
            Ok(request(RequestKind::GetId, writable_data))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            no_writable()?;
            let segments = parse_discard_segments(mem, &readable_data, readable_len)?;
            let kind = if request_type == VIRTIO_BLK_T_DISCARD {
                RequestKind::Discard(segments)
            } else {
                RequestKind::WriteZeroes(segments)
            };
            Ok(request(kind, Vec::new()))
        }
        other => Ok(request(RequestKind::Unsupported(other), Vec::new())),
    }
}

fn parse_discard_segments(
    mem: &GuestMemory,
    data: &[Segment],
    len: u64,
) -> Result<Vec<DiscardSegment>, RequestError> {
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN) {
        return Err(RequestError::BadSegmentPayload(len));
    }
    let count = len / SEGMENT_LEN;
    if count > u64::from(MAX_DISCARD_SEGMENTS) {
        return Err(RequestError::TooManySegments(count));
    }
    // At most MAX_DISCARD_SEGMENTS * 16 bytes: bounded by the check above.
    let mut raw = vec![0u8; len as usize];
    read_segments(mem, data, &mut raw).map_err(RequestError::GuestMemory)?;
    Ok(raw
        .chunks_exact(SEGMENT_LEN as usize)
        .map(|c| DiscardSegment {
            sector: u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
            num_sectors: u32::from_le_bytes([c[8], c[9], c[10], c[11]]),
            flags: u32::from_le_bytes([c[12], c[13], c[14], c[15]]),
        })
        .collect())
}
