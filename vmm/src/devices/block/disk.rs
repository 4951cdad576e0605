//! The file in a drive slot and the I/O on it: reads and writes through the bounce
//! buffer, discards and write-zeroes, each bounded by the disk's capacity.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::warn;
use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use vm_memory::{Address, Bytes};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};
use vmm_sys_util::write_zeroes::WriteZeroesAt;

use super::request::DiscardSegment;
use super::{MAX_DISCARD_SECTORS, SECTOR_SIZE};
use crate::devices::virtio::segments::Segment;
use crate::devices::GuestMemory;

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

/// The file currently in the slot.
#[derive(Debug)]
pub(super) struct Disk {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) read_only: bool,
    pub(super) capacity_sectors: u64,
}

impl Disk {
    /// Opens `path` for the slot, for reading only if `read_only`.
    pub(super) fn open(path: &Path, read_only: bool) -> Result<Disk, BlockError> {
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

    pub(super) fn sync(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| BlockError::Sync {
            path: self.path.clone(),
            source,
        })
    }
}

pub(super) enum IoFailure {
    /// The guest asked for something invalid (IOERR).
    Guest { reason: &'static str, written: u64 },
    /// The guest asked for something we do not do (UNSUPP).
    Unsupported(&'static str),
    /// The host file failed (IOERR).
    Host(io::Error),
}

pub(super) fn guest_error(reason: &'static str) -> IoFailure {
    IoFailure::Guest { reason, written: 0 }
}

/// Byte offset of `len` bytes from `sector`, if they lie inside the disk.
pub(super) fn disk_range(disk: &Disk, sector: u64, len: u64) -> Result<u64, IoFailure> {
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

pub(super) fn read_to_guest(
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

pub(super) fn write_from_guest(
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
pub(super) fn discard(
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
