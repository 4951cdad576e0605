//! virtio-blk (virtio 1.1 §5.2) over a raw image file, for "drive slots".
//!
//! A slot may start empty and have its backing file swapped in and out while the guest
//! runs; the VMM calls `MmioTransport::config_changed` after `Block::swap` so the guest
//! re-reads the capacity. Requests are served synchronously on the notifying vCPU with
//! pread/pwrite through a bounded bounce buffer.
//!
//! Every request is parsed by `parse_request` before any I/O: all descriptors, lengths
//! and offsets come from the guest and are checked, never trusted.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::{info, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _, Permissions};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};
use vmm_sys_util::write_zeroes::WriteZeroesAt;

use super::virtio_mmio::{guest_warn, Queues, VirtioDevice, WarnLimiter};
use super::GuestMemory;

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// The one request queue's size.
pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// Request header: type u32, reserved u32, sector u64.
pub const HEADER_LEN: u64 = 16;
/// One discard / write-zeroes segment: sector u64, num_sectors u32, flags u32.
pub const SEGMENT_LEN: u64 = 16;
/// Segments per discard / write-zeroes request (max_discard_seg, max_write_zeroes_seg).
pub const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Sectors per discard / write-zeroes segment: 1 GiB keeps a request's time on the vCPU
/// thread bounded even when zeroes have to be written out.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Discard granularity hint, in sectors (4 KiB, the usual file system block).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Size of `struct virtio_blk_config` up to and including the write-zeroes fields.
pub const CONFIG_LEN: usize = 60;

const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
const BOUNCE_LEN: usize = 128 * 1024;

/// A backing file to put in a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub path: PathBuf,
    pub read_only: bool,
    /// Replaces the slot's serial (GET_ID) when given.
    pub serial: Option<String>,
}

/// Host-side errors of a block slot; each names the file involved.
#[derive(Debug, Error)]
pub enum BlockError {
    #[error("cannot open block backing {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the size of block backing {}", .path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync block backing {}", .path.display())]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

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
    fn status(&self) -> u32 {
        match self {
            // The spec asks for UNSUPP when the driver exceeds max_discard_seg.
            RequestError::TooManySegments(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

pub use super::segments::Segment;
use super::segments::{read_segments, split_segments};

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

fn total_len(segs: &[Segment]) -> u64 {
    // Spans are at most u32::MAX each and chains are short: saturation is never reached,
    // it only keeps arbitrary input from overflowing.
    segs.iter().fold(0u64, |sum, s| sum.saturating_add(s.len))
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

    let to_segments = |descs: &[Descriptor], access| -> Result<Vec<Segment>, RequestError> {
        let mut segs = Vec::with_capacity(descs.len());
        for d in descs.iter().filter(|d| d.len() > 0) {
            if !mem.check_range(d.addr(), d.len() as usize, access) {
                return Err(RequestError::OutsideMemory {
                    addr: d.addr().raw_value(),
                    len: d.len(),
                });
            }
            segs.push(Segment {
                addr: d.addr(),
                len: u64::from(d.len()),
            });
        }
        Ok(segs)
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

/// The file currently in the slot.
#[derive(Debug)]
struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity_sectors: u64,
}

impl Disk {
    fn sync(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| BlockError::Sync {
            path: self.path.clone(),
            source,
        })
    }
}

/// What one request did: the status to report and the data bytes written to the guest.
struct Completion {
    status: u8,
    written: u64,
}

impl Completion {
    fn status(status: u32) -> Self {
        Completion {
            status: status as u8,
            written: 0,
        }
    }
}

/// A virtio-blk device in a drive slot.
#[derive(Debug)]
pub struct Block {
    slot_read_only: bool,
    serial: String,
    disk: Option<Disk>,
    acked_features: u64,
    queue_max_sizes: [u16; 1],
    bounce: Vec<u8>,
    warn: WarnLimiter,
}

impl Block {
    /// An empty slot. A read-only slot never takes writes, whatever is swapped in; this
    /// is fixed here because the guest learns it through a feature bit.
    pub fn new(slot_read_only: bool, serial: &str) -> Self {
        Block {
            slot_read_only,
            serial: serial.to_owned(),
            disk: None,
            acked_features: 0,
            queue_max_sizes: [QUEUE_SIZE],
            bounce: vec![0; BOUNCE_LEN],
            warn: WarnLimiter::default(),
        }
    }

    /// Puts `backing` in the slot, or empties it with `None`. On error the slot keeps
    /// what it had. The caller then signals a config change to the guest.
    pub fn swap(&mut self, backing: Option<Backing>) -> Result<(), BlockError> {
        let new = backing
            .as_ref()
            .map(|b| self.open(&b.path, b.read_only))
            .transpose()?;
        if let Some(old) = &self.disk {
            // The guest may have written without flushing: do not lose that.
            old.sync()?;
        }
        match &new {
            Some(disk) => info!(
                path = %disk.path.display(),
                read_only = disk.read_only,
                sectors = disk.capacity_sectors,
                "virtio-blk: backing swapped in"
            ),
            None => info!("virtio-blk: slot emptied"),
        }
        self.disk = new;
        if let Some(serial) = backing.and_then(|b| b.serial) {
            self.serial = serial;
        }
        Ok(())
    }

    fn open(&self, path: &Path, backing_read_only: bool) -> Result<Disk, BlockError> {
        let read_only = self.slot_read_only || backing_read_only;
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        // Seeking works for block devices too, whose metadata length is 0.
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        if len % SECTOR_SIZE != 0 {
            warn!(
                path = %path.display(),
                len,
                "virtio-blk: backing size is not a multiple of 512, the tail is not exposed"
            );
        }
        Ok(Disk {
            file,
            path: path.to_owned(),
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
        })
    }

    /// Capacity in 512-byte sectors; 0 for an empty slot.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.capacity_sectors)
    }

    /// Whether writes fail: the slot or the current backing is read-only.
    pub fn is_read_only(&self) -> bool {
        self.slot_read_only || self.disk.as_ref().is_some_and(|d| d.read_only)
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Path of the current backing, if any.
    pub fn backing_path(&self) -> Option<&Path> {
        self.disk.as_ref().map(|d| d.path.as_path())
    }

    /// Makes guest writes durable (fdatasync), for an orderly shutdown.
    pub fn flush(&mut self) -> Result<(), BlockError> {
        self.disk.as_ref().map_or(Ok(()), Disk::sync)
    }

    /// `struct virtio_blk_config`, little-endian, up to the write-zeroes fields.
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &self.capacity_sectors().to_le_bytes());
        // size_max (8) stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered.
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes());
        if !self.slot_read_only {
            put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
            put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
            put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
            // write_zeroes_may_unmap: zeroed ranges may become holes.
            put(56, &[1]);
        }
        c
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features & (1u64 << feature) != 0
    }

    /// Handles one chain; returns the bytes written to the guest (used length).
    fn handle_chain(&mut self, descs: &[Descriptor], mem: &GuestMemory) -> u32 {
        let completion = match parse_request(descs, mem) {
            Ok(request) => {
                let status = request.status;
                (self.execute(&request, mem), status)
            }
            Err(e) => {
                guest_warn!(self.warn, error = %e, "virtio-blk: malformed request");
                let Some(status) = status_address(descs, mem) else {
                    // Nowhere to report: hand the chain back untouched.
                    return 0;
                };
                (Completion::status(e.status()), status)
            }
        };
        let (Completion { status, written }, status_addr) = completion;
        if let Err(e) = mem.write_obj(status, status_addr) {
            guest_warn!(self.warn, error = %e, "virtio-blk: cannot write request status");
            return u32::try_from(written).unwrap_or(u32::MAX);
        }
        u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX)
    }

    fn execute(&mut self, request: &Request, mem: &GuestMemory) -> Completion {
        let is_write = matches!(
            request.kind,
            RequestKind::Out | RequestKind::Discard(_) | RequestKind::WriteZeroes(_)
        );
        match &request.kind {
            RequestKind::GetId => return self.get_id(request, mem),
            RequestKind::Unsupported(t) => {
                guest_warn!(
                    self.warn,
                    request_type = t,
                    "virtio-blk: unsupported request"
                );
                return Completion::status(VIRTIO_BLK_S_UNSUPP);
            }
            RequestKind::Discard(_) if !self.acked(VIRTIO_BLK_F_DISCARD) => {
                return Completion::status(VIRTIO_BLK_S_UNSUPP)
            }
            RequestKind::WriteZeroes(_) if !self.acked(VIRTIO_BLK_F_WRITE_ZEROES) => {
                return Completion::status(VIRTIO_BLK_S_UNSUPP)
            }
            _ => {}
        }
        let read_only = self.is_read_only();
        let Some(disk) = self.disk.as_mut() else {
            guest_warn!(self.warn, "virtio-blk: I/O on an empty slot");
            return Completion::status(VIRTIO_BLK_S_IOERR);
        };
        if is_write && read_only {
            guest_warn!(self.warn, path = %disk.path.display(), "virtio-blk: write to a read-only disk");
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        let result = match &request.kind {
            RequestKind::In => {
                disk_range(disk, request.sector, request.data_len).and_then(|offset| {
                    read_to_guest(disk, mem, &mut self.bounce, offset, &request.data)
                })
            }
            RequestKind::Out => disk_range(disk, request.sector, request.data_len)
                .and_then(|offset| {
                    write_from_guest(disk, mem, &mut self.bounce, offset, &request.data)
                })
                .map(|()| 0),
            RequestKind::Flush if disk.read_only => Ok(0),
            RequestKind::Flush => disk.file.sync_data().map(|()| 0).map_err(IoFailure::Host),
            RequestKind::Discard(segments) => discard(disk, segments, false).map(|()| 0),
            RequestKind::WriteZeroes(segments) => discard(disk, segments, true).map(|()| 0),
            RequestKind::GetId | RequestKind::Unsupported(_) => Ok(0),
        };
        match result {
            Ok(written) => Completion {
                status: VIRTIO_BLK_S_OK as u8,
                written,
            },
            Err(IoFailure::Guest { reason, written }) => {
                guest_warn!(
                    self.warn,
                    reason,
                    sector = request.sector,
                    len = request.data_len,
                    "virtio-blk: request rejected"
                );
                Completion {
                    status: VIRTIO_BLK_S_IOERR as u8,
                    written,
                }
            }
            Err(IoFailure::Unsupported(reason)) => {
                guest_warn!(self.warn, reason, "virtio-blk: request rejected");
                Completion::status(VIRTIO_BLK_S_UNSUPP)
            }
            Err(IoFailure::Host(e)) => {
                // Host I/O errors are not the guest's doing: always log them.
                warn!(
                    path = %disk.path.display(),
                    sector = request.sector,
                    error = %e,
                    "virtio-blk: I/O error"
                );
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    fn get_id(&mut self, request: &Request, mem: &GuestMemory) -> Completion {
        let mut id = [0u8; SERIAL_LEN];
        let serial = self.serial.as_bytes();
        let n = serial.len().min(SERIAL_LEN);
        id[..n].copy_from_slice(&serial[..n]);
        let mut written = 0u64;
        for seg in &request.data {
            let start = written as usize;
            if start >= SERIAL_LEN {
                break;
            }
            let n = usize::try_from(seg.len)
                .unwrap_or(usize::MAX)
                .min(SERIAL_LEN - start);
            if mem.write_slice(&id[start..start + n], seg.addr).is_err() {
                return Completion {
                    status: VIRTIO_BLK_S_IOERR as u8,
                    written,
                };
            }
            written += n as u64;
        }
        Completion {
            status: VIRTIO_BLK_S_OK as u8,
            written,
        }
    }
}

enum IoFailure {
    /// The guest asked for something invalid (IOERR).
    Guest { reason: &'static str, written: u64 },
    /// The guest asked for something we do not do (UNSUPP).
    Unsupported(&'static str),
    /// The host file failed (IOERR).
    Host(io::Error),
}

fn guest_error(reason: &'static str) -> IoFailure {
    IoFailure::Guest { reason, written: 0 }
}

/// Byte offset of `len` bytes from `sector`, if they lie inside the disk.
fn disk_range(disk: &Disk, sector: u64, len: u64) -> Result<u64, IoFailure> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(guest_error("sector overflows"))?;
    let end = offset
        .checked_add(len)
        .ok_or(guest_error("range overflows"))?;
    // capacity_sectors came from a file length / 512: no overflow.
    if end > disk.capacity_sectors * SECTOR_SIZE {
        return Err(guest_error("range beyond capacity"));
    }
    Ok(offset)
}

fn read_to_guest(
    disk: &Disk,
    mem: &GuestMemory,
    bounce: &mut [u8],
    mut offset: u64,
    data: &[Segment],
) -> Result<u64, IoFailure> {
    let mut written = 0u64;
    for seg in data {
        let mut done = 0u64;
        while done < seg.len {
            let n = (seg.len - done).min(bounce.len() as u64) as usize;
            let buf = &mut bounce[..n];
            disk.file
                .read_exact_at(buf, offset)
                .map_err(IoFailure::Host)?;
            let addr = seg
                .addr
                .checked_add(done)
                .ok_or(guest_error("buffer address overflows"))?;
            mem.write_slice(buf, addr).map_err(|_| IoFailure::Guest {
                reason: "cannot write guest buffer",
                written,
            })?;
            done += n as u64;
            offset += n as u64;
            written += n as u64;
        }
    }
    Ok(written)
}

fn write_from_guest(
    disk: &Disk,
    mem: &GuestMemory,
    bounce: &mut [u8],
    mut offset: u64,
    data: &[Segment],
) -> Result<(), IoFailure> {
    for seg in data {
        let mut done = 0u64;
        while done < seg.len {
            let n = (seg.len - done).min(bounce.len() as u64) as usize;
            let buf = &mut bounce[..n];
            let addr = seg
                .addr
                .checked_add(done)
                .ok_or(guest_error("buffer address overflows"))?;
            mem.read_slice(buf, addr)
                .map_err(|_| guest_error("cannot read guest buffer"))?;
            disk.file
                .write_all_at(buf, offset)
                .map_err(IoFailure::Host)?;
            done += n as u64;
            offset += n as u64;
        }
    }
    Ok(())
}

/// DISCARD punches holes; WRITE_ZEROES punches with the UNMAP flag, else zeroes the range
/// keeping it allocated (FALLOC_FL_ZERO_RANGE, or written zeroes where unsupported).
fn discard(
    disk: &mut Disk,
    segments: &[DiscardSegment],
    write_zeroes: bool,
) -> Result<(), IoFailure> {
    for seg in segments {
        let allowed = if write_zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if seg.flags & !allowed != 0 {
            return Err(IoFailure::Unsupported("unknown discard/write-zeroes flags"));
        }
        if seg.num_sectors > MAX_DISCARD_SECTORS {
            return Err(guest_error("discard/write-zeroes segment too large"));
        }
        let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
        let offset = disk_range(disk, seg.sector, len)?;
        if len == 0 {
            continue;
        }
        if !write_zeroes || seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            fallocate(&disk.file, FallocateMode::PunchHole, true, offset, len)
                .map_err(|e| IoFailure::Host(io::Error::from_raw_os_error(e.errno())))?;
        } else {
            // len <= MAX_DISCARD_SECTORS * 512 fits in usize on every 64-bit host.
            let len = usize::try_from(len).map_err(|_| guest_error("segment too large"))?;
            disk.file
                .write_all_zeroes_at(offset, len)
                .map_err(IoFailure::Host)?;
        }
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_BLK_F_FLUSH) | (1u64 << VIRTIO_BLK_F_SEG_MAX);
        if self.slot_read_only {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            // Pointless on a disk the guest knows it cannot write.
            features |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::virtio_mmio::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing in our config space is writable (no CONFIG_WCE).
        guest_warn!(
            self.warn,
            offset,
            len = data.len(),
            "virtio-blk: config space write ignored"
        );
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>, mem: &GuestMemory) -> bool {
        let Some(queue) = queues.get(index).filter(|_| index == 0) else {
            guest_warn!(self.warn, index, "virtio-blk: notify for a missing queue");
            return false;
        };
        // Snapshot what is available now (at most the queue size); later chains come
        // with their own notification, or the transport runs another pass for them.
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(iter) => iter.collect(),
            Err(e) => {
                guest_warn!(self.warn, error = %e, "virtio-blk: cannot read the available ring");
                return false;
            }
        };
        let mut used = false;
        for chain in chains {
            let head = chain.head_index();
            // A chain is at most one descriptor table long (the iterator stops there).
            let descs: Vec<Descriptor> = chain.collect();
            let len = self.handle_chain(&descs, mem);
            match queue.add_used(mem, head, len) {
                Ok(()) => used = true,
                Err(e) => {
                    guest_warn!(self.warn, head, error = %e, "virtio-blk: cannot return a chain")
                }
            }
        }
        used
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use tempfile::NamedTempFile;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const MEM_SIZE: usize = 0x20_0000;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const DATA2: u64 = 0x10_0000;
    const STATUS: u64 = 0x1800;
    const DISK_LEN: u64 = 1 << 20;
    const R: bool = false;
    const W: bool = true;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn disk_file(len: u64) -> NamedTempFile {
        let file = NamedTempFile::new().unwrap();
        file.as_file().set_len(len).unwrap();
        file
    }

    fn backing(file: &NamedTempFile, read_only: bool) -> Option<Backing> {
        Some(Backing {
            path: file.path().to_owned(),
            read_only,
            serial: None,
        })
    }

    /// A writable slot with a 1 MiB sparse file, activated with every offered feature.
    fn block_with_disk() -> (Block, NamedTempFile) {
        let file = disk_file(DISK_LEN);
        let mut blk = Block::new(false, "serial-0");
        blk.swap(backing(&file, false)).unwrap();
        blk.activate(blk.device_features());
        (blk, file)
    }

    fn write_header(mem: &GuestMemory, request_type: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
    }

    fn desc(addr: u64, len: u32, writable: bool) -> Descriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        Descriptor::new(addr, len, flags, 0)
    }

    /// Outcome of one chain: used-ring length, or None if nothing was returned.
    #[derive(Debug, PartialEq, Eq)]
    struct Used {
        len: u32,
        status: u8,
    }

    /// Puts one chain on a fresh queue, notifies the device and reads back the result.
    fn run(blk: &mut Block, mem: &GuestMemory, descs: &[Descriptor]) -> Option<Used> {
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let flags = d.flags() | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                RawDescriptor::from(Descriptor::new(
                    d.addr().0,
                    d.len(),
                    flags,
                    if last { 0 } else { i as u16 + 1 },
                ))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
        let used = blk.process_queue(0, &mut Queues::new(vec![Some(&mut queue)]), mem);
        if vq.used().idx().load() == 0 {
            assert!(!used);
            return None;
        }
        assert!(used);
        assert_eq!(vq.used().idx().load(), 1);
        let elem = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(elem.id(), 0);
        Some(Used {
            len: elem.len(),
            status: mem.read_obj(GuestAddress(STATUS)).unwrap(),
        })
    }

    fn ok(len: u32) -> Option<Used> {
        Some(Used {
            len,
            status: VIRTIO_BLK_S_OK as u8,
        })
    }

    fn ioerr() -> Option<Used> {
        Some(Used {
            len: 1,
            status: VIRTIO_BLK_S_IOERR as u8,
        })
    }

    fn unsupp() -> Option<Used> {
        Some(Used {
            len: 1,
            status: VIRTIO_BLK_S_UNSUPP as u8,
        })
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn write_request(blk: &mut Block, mem: &GuestMemory, sector: u64, data: &[u8]) -> Option<Used> {
        write_header(mem, VIRTIO_BLK_T_OUT, sector);
        mem.write_slice(data, GuestAddress(DATA)).unwrap();
        run(
            blk,
            mem,
            &[
                desc(HDR, 16, R),
                desc(DATA, data.len() as u32, R),
                desc(STATUS, 1, W),
            ],
        )
    }

    fn read_request(blk: &mut Block, mem: &GuestMemory, sector: u64, len: u32) -> Option<Used> {
        write_header(mem, VIRTIO_BLK_T_IN, sector);
        mem.write_slice(&vec![0x5a; len as usize], GuestAddress(DATA2))
            .unwrap();
        run(
            blk,
            mem,
            &[desc(HDR, 16, R), desc(DATA2, len, W), desc(STATUS, 1, W)],
        )
    }

    fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn file_bytes(file: &NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        file.as_file().read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn write_then_read_back() {
        let mem = memory();
        let (mut blk, file) = block_with_disk();
        // Larger than the bounce buffer, so the chunking is exercised too.
        let data = pattern(BOUNCE_LEN + 3 * 512, 7);
        assert_eq!(write_request(&mut blk, &mem, 3, &data), ok(1));
        assert!(file_bytes(&file, 3 * 512, data.len()) == data);
        assert_eq!(file_bytes(&file, 2 * 512, 512), vec![0; 512]);

        let len = data.len() as u32;
        assert_eq!(read_request(&mut blk, &mem, 3, len), ok(len + 1));
        assert!(guest_bytes(&mem, DATA2, data.len()) == data);
    }

    #[test]
    fn data_spanning_descriptors_and_merged_header() {
        let mem = memory();
        let (mut blk, file) = block_with_disk();
        // Header split across two descriptors, the second also carrying the data's start.
        let data = pattern(1024, 3);
        write_header(&mem, VIRTIO_BLK_T_OUT, 1);
        let mut merged = guest_bytes(&mem, HDR + 8, 8);
        merged.extend_from_slice(&data[..100]);
        mem.write_slice(&merged, GuestAddress(DATA)).unwrap();
        mem.write_slice(&data[100..], GuestAddress(DATA2)).unwrap();
        let descs = [
            desc(HDR, 8, R),
            desc(DATA, 108, R),
            desc(DATA2, 924, R),
            desc(STATUS, 1, W),
        ];
        assert_eq!(run(&mut blk, &mem, &descs), ok(1));
        assert_eq!(file_bytes(&file, 512, 1024), data);

        // Read data and status sharing the last descriptor.
        write_header(&mem, VIRTIO_BLK_T_IN, 1);
        let descs = [
            desc(HDR, 16, R),
            desc(DATA2, 512, W),
            desc(STATUS - 512, 513, W),
        ];
        assert_eq!(run(&mut blk, &mem, &descs), ok(1025));
        assert_eq!(guest_bytes(&mem, DATA2, 512), data[..512]);
        assert_eq!(guest_bytes(&mem, STATUS - 512, 512), data[512..]);
    }

    #[test]
    fn read_only_slot_rejects_writes() {
        let mem = memory();
        let file = disk_file(DISK_LEN);
        let mut blk = Block::new(true, "ro");
        // Even a writable backing is opened read-only in a read-only slot.
        blk.swap(backing(&file, false)).unwrap();
        blk.activate(blk.device_features());
        assert!(blk.is_read_only());
        assert_ne!(blk.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(blk.device_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);

        assert_eq!(write_request(&mut blk, &mem, 0, &[0xff; 512]), ioerr());
        assert_eq!(file_bytes(&file, 0, 512), vec![0; 512]);
        assert_eq!(read_request(&mut blk, &mem, 0, 512), ok(513));
    }

    #[test]
    fn read_only_backing_rejects_writes_and_discards() {
        let mem = memory();
        let file = disk_file(DISK_LEN);
        file.as_file().write_all_at(&[0x11; 4096], 0).unwrap();
        let mut blk = Block::new(false, "rw-slot");
        blk.swap(backing(&file, true)).unwrap();
        blk.activate(blk.device_features());
        assert!(blk.is_read_only());
        assert_eq!(blk.device_features() & (1 << VIRTIO_BLK_F_RO), 0);

        assert_eq!(write_request(&mut blk, &mem, 0, &[0xff; 512]), ioerr());
        assert_eq!(
            discard_request(&mut blk, &mem, VIRTIO_BLK_T_DISCARD, 0, 8, 0),
            ioerr()
        );
        assert_eq!(file_bytes(&file, 0, 4096), vec![0x11; 4096]);
    }

    #[test]
    fn out_of_range_sectors_fail() {
        let mem = memory();
        let (mut blk, _file) = block_with_disk();
        let last = DISK_LEN / 512 - 1;
        assert_eq!(read_request(&mut blk, &mem, last, 512), ok(513));
        assert_eq!(read_request(&mut blk, &mem, last, 1024), ioerr());
        assert_eq!(write_request(&mut blk, &mem, last + 1, &[1; 512]), ioerr());
        // sector * 512 and offset + len overflow.
        assert_eq!(read_request(&mut blk, &mem, u64::MAX, 512), ioerr());
        assert_eq!(read_request(&mut blk, &mem, u64::MAX / 512, 512), ioerr());
    }

    #[test]
    fn empty_slot_fails_io_but_answers_get_id() {
        let mem = memory();
        let mut blk = Block::new(false, "empty-slot");
        blk.activate(blk.device_features());
        assert_eq!(blk.capacity_sectors(), 0);
        assert_eq!(read_request(&mut blk, &mem, 0, 512), ioerr());
        assert_eq!(write_request(&mut blk, &mem, 0, &[1; 512]), ioerr());
        assert_eq!(flush_request(&mut blk, &mem), ioerr());
        assert_eq!(get_id(&mut blk, &mem), ok(21));
        assert_eq!(
            guest_bytes(&mem, DATA, 20),
            b"empty-slot\0\0\0\0\0\0\0\0\0\0"
        );
    }

    fn config_capacity(blk: &Block) -> u64 {
        let mut raw = [0u8; 8];
        blk.read_config(0, &mut raw);
        u64::from_le_bytes(raw)
    }

    #[test]
    fn swap_and_eject_change_capacity() {
        let mem = memory();
        let mut blk = Block::new(false, "slot");
        blk.activate(blk.device_features());
        assert_eq!(config_capacity(&blk), 0);

        let file = disk_file(DISK_LEN);
        blk.swap(backing(&file, false)).unwrap();
        assert_eq!(config_capacity(&blk), DISK_LEN / 512);
        assert_eq!(blk.backing_path(), Some(file.path()));

        // Unaligned sizes round down.
        let odd = disk_file(4096 + 100);
        blk.swap(backing(&odd, false)).unwrap();
        assert_eq!(config_capacity(&blk), 8);
        assert_eq!(read_request(&mut blk, &mem, 7, 512), ok(513));
        assert_eq!(read_request(&mut blk, &mem, 8, 512), ioerr());

        blk.swap(None).unwrap();
        assert_eq!(config_capacity(&blk), 0);
        assert_eq!(blk.backing_path(), None);
        assert_eq!(read_request(&mut blk, &mem, 0, 512), ioerr());
    }

    #[test]
    fn failed_swap_keeps_the_old_backing() {
        let (mut blk, file) = block_with_disk();
        let missing = file.path().with_extension("missing");
        let err = blk
            .swap(Some(Backing {
                path: missing.clone(),
                read_only: false,
                serial: Some("new".into()),
            }))
            .unwrap_err();
        assert!(matches!(&err, BlockError::Open { path, .. } if *path == missing));
        assert!(err.to_string().contains(&missing.display().to_string()));
        assert_eq!(blk.backing_path(), Some(file.path()));
        assert_eq!(blk.serial(), "serial-0");
    }

    #[test]
    fn swap_syncs_and_replaces_serial() {
        let mem = memory();
        let (mut blk, first) = block_with_disk();
        assert_eq!(write_request(&mut blk, &mem, 0, &[9; 512]), ok(1));
        let second = disk_file(DISK_LEN);
        blk.swap(Some(Backing {
            path: second.path().to_owned(),
            read_only: false,
            serial: Some("a-very-long-serial-number-beyond-20".into()),
        }))
        .unwrap();
        assert_eq!(file_bytes(&first, 0, 512), vec![9; 512]);
        assert_eq!(get_id(&mut blk, &mem), ok(21));
        assert_eq!(guest_bytes(&mem, DATA, 20), b"a-very-long-serial-n");
    }

    fn get_id(blk: &mut Block, mem: &GuestMemory) -> Option<Used> {
        write_header(mem, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
        run(
            blk,
            mem,
            &[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)],
        )
    }

    fn flush_request(blk: &mut Block, mem: &GuestMemory) -> Option<Used> {
        write_header(mem, VIRTIO_BLK_T_FLUSH, 0);
        run(blk, mem, &[desc(HDR, 16, R), desc(STATUS, 1, W)])
    }

    #[test]
    fn get_id_returns_padded_serial() {
        let mem = memory();
        let (mut blk, _file) = block_with_disk();
        assert_eq!(get_id(&mut blk, &mem), ok(21));
        assert_eq!(
            guest_bytes(&mem, DATA, 20),
            b"serial-0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        // A short buffer gets what fits.
        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let descs = [desc(HDR, 16, R), desc(DATA2, 4, W), desc(STATUS, 1, W)];
        assert_eq!(run(&mut blk, &mem, &descs), ok(5));
        assert_eq!(guest_bytes(&mem, DATA2, 4), b"seri");
    }

    #[test]
    fn flush_succeeds() {
        let mem = memory();
        let (mut blk, _file) = block_with_disk();
        assert_eq!(write_request(&mut blk, &mem, 0, &[1; 512]), ok(1));
        assert_eq!(flush_request(&mut blk, &mem), ok(1));
        blk.flush().unwrap();
        // Flush carries no data.
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let descs = [desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)];
        assert_eq!(run(&mut blk, &mem, &descs), ioerr());
    }

    fn discard_request(
        blk: &mut Block,
        mem: &GuestMemory,
        request_type: u32,
        sector: u64,
        num_sectors: u32,
        flags: u32,
    ) -> Option<Used> {
        write_header(mem, request_type, 0);
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        run(
            blk,
            mem,
            &[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
        )
    }

    fn filled_disk() -> (Block, NamedTempFile) {
        let (blk, mut file) = block_with_disk();
        file.write_all(&vec![0xab; DISK_LEN as usize]).unwrap();
        file.as_file().sync_all().unwrap();
        (blk, file)
    }

    #[test]
    fn discard_punches_a_hole() {
        let mem = memory();
        let (mut blk, file) = filled_disk();
        let before = file.as_file().metadata().unwrap().blocks();
        // 256 KiB from 128 KiB.
        let r = discard_request(&mut blk, &mem, VIRTIO_BLK_T_DISCARD, 256, 512, 0);
        assert_eq!(r, ok(1));
        let after = file.as_file().metadata().unwrap().blocks();
        assert!(
            after + 256 * 1024 / 512 <= before,
            "{before} -> {after} blocks"
        );
        assert_eq!(file.as_file().metadata().unwrap().len(), DISK_LEN);

        assert_eq!(
            read_request(&mut blk, &mem, 256, 512 * 512),
            ok(512 * 512 + 1)
        );
        assert!(guest_bytes(&mem, DATA2, 512 * 512).iter().all(|&b| b == 0));
        assert_eq!(file_bytes(&file, 255 * 512, 512), vec![0xab; 512]);
        assert_eq!(file_bytes(&file, 768 * 512, 512), vec![0xab; 512]);
    }

    #[test]
    fn write_zeroes_zeroes_with_or_without_unmap() {
        let mem = memory();
        let (mut blk, file) = filled_disk();
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let r = discard_request(&mut blk, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, unmap);
        assert_eq!(r, ok(1));
        let r = discard_request(&mut blk, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 32, 3, 0);
        assert_eq!(r, ok(1));
        assert_eq!(file_bytes(&file, 8 * 512, 4096), vec![0; 4096]);
        assert_eq!(file_bytes(&file, 32 * 512, 3 * 512), vec![0; 3 * 512]);
        assert_eq!(file_bytes(&file, 16 * 512, 512), vec![0xab; 512]);
        assert_eq!(file_bytes(&file, 35 * 512, 512), vec![0xab; 512]);
    }

    #[test]
    fn discard_validation() {
        let mem = memory();
        let (mut blk, file) = filled_disk();
        let t = VIRTIO_BLK_T_DISCARD;
        let last = DISK_LEN / 512;
        // Beyond the end, too large, unknown flags, UNMAP on a discard.
        assert_eq!(discard_request(&mut blk, &mem, t, last - 4, 8, 0), ioerr());
        assert_eq!(discard_request(&mut blk, &mem, t, u64::MAX, 8, 0), ioerr());
        assert_eq!(
            discard_request(&mut blk, &mem, t, 0, MAX_DISCARD_SECTORS + 1, 0),
            ioerr()
        );
        assert_eq!(discard_request(&mut blk, &mem, t, 0, 8, 1), unsupp());
        let wz = VIRTIO_BLK_T_WRITE_ZEROES;
        assert_eq!(discard_request(&mut blk, &mem, wz, 0, 8, 2), unsupp());
        assert_eq!(file_bytes(&file, 0, 4096), vec![0xab; 4096]);

        // Two segments are more than max_discard_seg; half a segment is malformed.
        write_header(&mem, t, 0);
        let descs = [desc(HDR, 16, R), desc(DATA, 32, R), desc(STATUS, 1, W)];
        assert_eq!(run(&mut blk, &mem, &descs), unsupp());
        let descs = [desc(HDR, 16, R), desc(DATA, 8, R), desc(STATUS, 1, W)];
        assert_eq!(run(&mut blk, &mem, &descs), ioerr());

        // Not negotiated: unsupported.
        blk.activate(1 << VIRTIO_BLK_F_FLUSH);
        assert_eq!(discard_request(&mut blk, &mem, t, 0, 8, 0), unsupp());
        assert_eq!(file_bytes(&file, 0, 4096), vec![0xab; 4096]);
    }

    #[test]
    fn unknown_request_type_is_unsupported() {
        let mem = memory();
        let (mut blk, _file) = block_with_disk();
        write_header(&mem, 0x7777, 0);
        let descs = [desc(HDR, 16, R), desc(STATUS, 1, W)];
        assert_eq!(run(&mut blk, &mem, &descs), unsupp());
    }

    #[test]
    fn malformed_chains_get_ioerr() {
        let mem = memory();
        let (mut blk, file) = block_with_disk();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
        let cases: &[&[Descriptor]] = &[
            // Header too short.
            &[desc(HDR, 8, R), desc(STATUS, 1, W)],
            // Header device-writable.
            &[desc(HDR, 16, W), desc(DATA, 512, W), desc(STATUS, 1, W)],
            // No data.
            &[desc(HDR, 16, R), desc(STATUS, 1, W)],
            // Data not whole sectors.
            &[desc(HDR, 16, R), desc(DATA, 500, R), desc(STATUS, 1, W)],
            // Write with device-writable data.
            &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
            // Readable after writable.
            &[
                desc(HDR, 16, R),
                desc(STATUS - 1, 1, W),
                desc(DATA, 512, R),
                desc(STATUS, 1, W),
            ],
            // Data outside guest memory, or wrapping around the address space.
            &[
                desc(HDR, 16, R),
                desc(MEM_SIZE as u64, 512, R),
                desc(STATUS, 1, W),
            ],
            &[
                desc(HDR, 16, R),
                desc(u64::MAX - 10, 512, R),
                desc(STATUS, 1, W),
            ],
        ];
        for descs in cases {
            assert_eq!(run(&mut blk, &mem, descs), ioerr(), "{descs:?}");
        }
        // A read with device-readable data.
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let descs = [desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)];
        assert_eq!(run(&mut blk, &mem, &descs), ioerr());
        assert_eq!(file_bytes(&file, 0, 512), vec![0; 512]);
    }

    #[test]
    fn chains_without_status_are_returned_untouched() {
        let mem = memory();
        let (mut blk, file) = block_with_disk();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
        let cases: &[&[Descriptor]] = &[
            // Status descriptor device-readable.
            &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, R)],
            // Status of length zero.
            &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 0, W)],
            // Status outside guest memory.
            &[
                desc(HDR, 16, R),
                desc(DATA, 512, R),
                desc(MEM_SIZE as u64, 1, W),
            ],
            // Only a header.
            &[desc(HDR, 16, R)],
        ];
        for descs in cases {
            let used = run(&mut blk, &mem, descs);
            assert_eq!(
                used,
                Some(Used {
                    len: 0,
                    status: 0xee
                }),
                "{descs:?}"
            );
        }
        assert_eq!(file_bytes(&file, 0, 512), vec![0; 512]);
    }

    #[test]
    fn unreadable_chains_do_not_panic() {
        let mem = memory();
        let (mut blk, _file) = block_with_disk();
        let vq = MockSplitQueue::new(&mem, 16);
        // An avail entry naming a descriptor beyond the table, and a chain looping on
        // itself.
        let looping = RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 0));
        vq.desc_table().store(0, looping).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(100);
        vq.avail().ring().ref_at(1).unwrap().store(0);
        vq.avail().idx().store(2);
        let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
        blk.process_queue(0, &mut Queues::new(vec![Some(&mut queue)]), &mem);
        // The looping chain ends at the queue size and has no status: returned with 0.
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);

        // An available index running ahead of the queue size is refused.
        vq.avail().idx().store(500);
        assert!(!blk.process_queue(0, &mut Queues::new(vec![Some(&mut queue)]), &mem));
        // Only queue 0 exists.
        assert!(!blk.process_queue(1, &mut Queues::new(vec![Some(&mut queue)]), &mem));
    }

    #[test]
    fn config_space_layout() {
        let (blk, _file) = block_with_disk();
        let mut c = [0u8; CONFIG_LEN];
        blk.read_config(0, &mut c);
        let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        assert_eq!(
            u64::from_le_bytes(c[..8].try_into().unwrap()),
            DISK_LEN / 512
        );
        assert_eq!(u32_at(12), 254);
        assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
        assert_eq!(u32_at(40), 1);
        assert_eq!(u32_at(44), 8);
        assert_eq!(u32_at(48), MAX_DISCARD_SECTORS);
        assert_eq!(u32_at(52), 1);
        assert_eq!(c[56], 1);
        // Narrow and out-of-range reads.
        let mut b = [0xffu8; 4];
        blk.read_config(12, &mut b[..1]);
        assert_eq!(b, [254, 0xff, 0xff, 0xff]);
        blk.read_config(58, &mut b);
        assert_eq!(b, [0; 4]);
        blk.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn features() {
        let rw = Block::new(false, "");
        let f = rw.device_features();
        for bit in [
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(rw.device_type(), 2);
        assert_eq!(rw.queue_max_sizes(), &[256]);
    }

    #[test]
    fn parse_request_framing() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 42);
        let descs = [
            desc(HDR, 10, R),
            desc(HDR + 10, 6, R),
            desc(DATA, 1024, W),
            desc(STATUS, 1, W),
        ];
        let req = parse_request(&descs, &mem).unwrap();
        assert_eq!(req.kind, RequestKind::In);
        assert_eq!(req.sector, 42);
        assert_eq!(req.data_len, 1024);
        assert_eq!(req.status, GuestAddress(STATUS));
        assert_eq!(parse_request(&[], &mem), Err(RequestError::EmptyChain));
        // Without a separate status descriptor, the data's last byte becomes the status.
        assert_eq!(
            parse_request(&descs[..3], &mem),
            Err(RequestError::UnalignedLength(1023))
        );
    }

    /// A cheap stand-in for the fuzz target: random chains near and across the end of
    /// guest memory must never panic, and what is accepted must lie in guest memory.
    #[test]
    fn parse_request_survives_random_chains() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut accepted = 0;
        for _ in 0..20_000 {
            let fill = next();
            for i in 0..8u64 {
                mem.write_obj(fill.rotate_left(i as u32 * 8), GuestAddress(i * 8))
                    .unwrap();
            }
            // Request types 0..16 at the header most chains start with.
            mem.write_obj((next() % 16) as u32, GuestAddress(0))
                .unwrap();
            let count = (next() % 6) as usize;
            let descs: Vec<Descriptor> = (0..count)
                .map(|i| {
                    let r = next();
                    if i == 0 && r % 2 == 0 {
                        return Descriptor::new(0, 16, 0, 0);
                    }
                    let addr = match r % 8 {
                        0 => r,
                        1 => 0x4000 - (r >> 8) % 32,
                        2 => 0,
                        _ => (r >> 8) % 0x4800,
                    };
                    let len = match (r >> 40) % 6 {
                        0 => u32::MAX,
                        1 => 1,
                        2 => 16,
                        3 => 512,
                        _ => ((r >> 48) % 0x1000) as u32,
                    };
                    let flags = if (r >> 36) % 2 == 0 {
                        0
                    } else {
                        VRING_DESC_F_WRITE
                    };
                    Descriptor::new(addr, len, flags as u16, 0)
                })
                .collect();
            let status = status_address(&descs, &mem);
            if let Ok(req) = parse_request(&descs, &mem) {
                accepted += 1;
                assert_eq!(Some(req.status), status);
                for seg in &req.data {
                    assert!(mem.check_range(seg.addr, seg.len as usize, Permissions::Read));
                }
                assert_eq!(req.data_len, total_len(&req.data));
            }
        }
        assert!(accepted > 500, "only {accepted} chains accepted");
    }
}
