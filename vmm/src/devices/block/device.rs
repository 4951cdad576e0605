//! The virtio-blk device: the slot's state, its config space, and each request chain
//! parsed, executed and completed with a status byte.

use std::path::Path;

use tracing::{info, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::disk::{
    discard, disk_range, read_to_guest, write_from_guest, Backing, BlockError, Disk, IoFailure,
};
use super::request::{parse_request, status_address, Request, RequestKind};
use super::{
    BOUNCE_LEN, CONFIG_LEN, DISCARD_SECTOR_ALIGNMENT, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
    QUEUE_SIZE, SERIAL_LEN, VIRTIO_ID_BLOCK,
};
use crate::devices::guest_warn::{guest_warn, WarnLimiter};
use crate::devices::virtio::segments::write_segments;
use crate::devices::virtio::{read_config_bytes, Queues, VirtioDevice};
use crate::devices::GuestMemory;

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
            .map(|b| Disk::open(&b.path, self.slot_read_only || b.read_only))
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
        // At most SERIAL_LEN bytes either way.
        match write_segments(mem, &request.data, &[&id]) {
            Ok(written) => Completion {
                status: VIRTIO_BLK_S_OK as u8,
                written: written as u64,
            },
            Err(stopped) => Completion {
                status: VIRTIO_BLK_S_IOERR as u8,
                written: stopped.written as u64,
            },
        }
    }
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
        read_config_bytes(&self.config_space(), offset, data);
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
