//! virtio-blk (virtio 1.1 §5.2) over a raw image file, for "drive slots".
//!
//! `request` parses and checks a chain, `disk` does the file I/O, `device` is the
//! `VirtioDevice` that drives both.
//!
//! A slot may start empty and have its backing file swapped in and out while the guest
//! runs; the VMM calls `MmioTransport::config_changed` after `Block::swap` so the guest
//! re-reads the capacity. Requests are served synchronously on the notifying vCPU with
//! pread/pwrite through a bounded bounce buffer.
//!
//! Every request is parsed by `parse_request` before any I/O: all descriptors, lengths
//! and offsets come from the guest and are checked, never trusted.

mod device;
mod disk;
mod request;
#[cfg(test)]
mod tests;

pub use crate::devices::virtio::segments::Segment;
pub use device::Block;
pub use disk::{Backing, BlockError};
pub use request::{
    parse_request, status_address, DiscardSegment, Request, RequestError, RequestKind,
};

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

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

pub(super) const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
pub(super) const BOUNCE_LEN: usize = 128 * 1024;
