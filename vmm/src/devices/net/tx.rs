//! Transmit: each chain the guest makes available on queue 1 gathered into one frame,
//! checked, and written to the TAP.

use std::io;

use thiserror::Error;
use tracing::debug;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory as _, Permissions};

use super::{
    has, Net, ETH_HLEN, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, HDR_F_NEEDS_CSUM,
    MAX_BUFFER_LEN, VNET_HDR_LEN,
};
use crate::devices::guest_warn::guest_warn;
use crate::devices::GuestMemory;

/// Why a transmit chain was dropped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TxError {
    #[error("descriptor chain is empty or unreadable")]
    EmptyChain,
    #[error("descriptor chain is cut short (its last descriptor has NEXT)")]
    Truncated,
    #[error("device-writable descriptor in a transmit chain")]
    WritableDescriptor,
    #[error("descriptor at {addr:#x} (len {len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("{0} bytes with the header, over the {MAX_BUFFER_LEN}-byte limit")]
    TooLarge(u64),
    #[error("{0} bytes with the header, shorter than the headers")]
    TooShort(u64),
    #[error("cannot read the frame from guest memory at {0:#x}")]
    GuestMemory(u64),
    #[error("virtio-net header flags {0:#x} not allowed")]
    BadFlags(u8),
    #[error("virtio-net header GSO type {0:#x} unknown or not negotiated")]
    BadGso(u8),
}

/// Checks a transmit virtio-net header against the negotiated features: only
/// NEEDS_CSUM (with CSUM) in `flags`, and a GSO type the driver accepted the HOST_*
/// feature for. The kernel checks offsets and sizes itself.
pub fn validate_tx_header(hdr: &[u8], acked_features: u64) -> Result<(), TxError> {
    let (Some(&flags), Some(&gso)) = (hdr.first(), hdr.get(1)) else {
        return Err(TxError::TooShort(hdr.len() as u64));
    };
    let has = |f| has(acked_features, f);
    if flags & !HDR_F_NEEDS_CSUM != 0 || (flags != 0 && !has(VIRTIO_NET_F_CSUM)) {
        return Err(TxError::BadFlags(flags));
    }
    let ecn = gso & GSO_ECN != 0;
    let negotiated = match gso & !GSO_ECN {
        GSO_NONE => !ecn,
        GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        GSO_UDP => has(VIRTIO_NET_F_HOST_UFO),
        _ => false,
    };
    if !negotiated || (ecn && !has(VIRTIO_NET_F_HOST_ECN)) {
        return Err(TxError::BadGso(gso));
    }
    Ok(())
}

/// Gathers one transmit chain — virtio-net header, then the frame — into `buf` by byte
/// position, whatever the descriptor boundaries, and returns its length. No I/O.
///
/// The chain must be all device-readable, lie in guest memory, be properly terminated
/// (the last descriptor without NEXT: a chain the descriptor walk cut short is refused),
/// hold at least the header and an Ethernet header and at most [`MAX_BUFFER_LEN`] bytes
/// (and no more than `buf` holds), and carry a header valid for `acked_features`.
pub fn gather_tx_frame(
    descs: &[Descriptor],
    mem: &GuestMemory,
    acked_features: u64,
    buf: &mut [u8],
) -> Result<usize, TxError> {
    let last = descs.last().ok_or(TxError::EmptyChain)?;
    if last.has_next() {
        return Err(TxError::Truncated);
    }
    let mut total = 0u64;
    for d in descs {
        if d.is_write_only() {
            return Err(TxError::WritableDescriptor);
        }
        if d.len() == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize, Permissions::Read) {
            return Err(TxError::OutsideMemory {
                addr: d.addr().raw_value(),
                len: d.len(),
            });
        }
        total = total.saturating_add(u64::from(d.len()));
    }
    if total > MAX_BUFFER_LEN as u64 {
        return Err(TxError::TooLarge(total));
    }
    if total < (VNET_HDR_LEN + ETH_HLEN) as u64 {
        return Err(TxError::TooShort(total));
    }
    // total <= MAX_BUFFER_LEN: fits usize.
    let out = buf
        .get_mut(..total as usize)
        .ok_or(TxError::TooLarge(total))?;
    let mut pos = 0usize;
    for d in descs.iter().filter(|d| d.len() > 0) {
        let len = d.len() as usize;
        let dst = out
            .get_mut(pos..pos + len)
            .ok_or(TxError::TooLarge(total))?;
        mem.read_slice(dst, d.addr())
            .map_err(|_| TxError::GuestMemory(d.addr().raw_value()))?;
        pos += len;
    }
    validate_tx_header(out, acked_features)?;
    Ok(pos)
}

impl Net {
    /// Sends every available transmit chain, up to where the TAP would block.
    pub(super) fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let start = queue.next_avail();
        // Snapshot what is available now (at most the queue size); later chains come
        // with their own notification, or the transport runs another pass for them.
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(iter) => iter.collect(),
            Err(e) => {
                guest_warn!(self.warn, error = %e, "virtio-net: cannot read the transmit ring");
                return false;
            }
        };
        let mut used = false;
        for (i, chain) in chains.into_iter().enumerate() {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            match gather_tx_frame(&descs, mem, self.acked_features, &mut self.tx_buf) {
                Ok(len) => match self.tap.write_frame(&self.tx_buf[..len]) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Leave this chain and the rest on the ring; i < queue size.
                        queue.set_next_avail(start.wrapping_add(i as u16));
                        self.tx_blocked = true;
                        debug!(
                            tap = self.tap.name(),
                            "virtio-net: TAP full, transmit waits"
                        );
                        break;
                    }
                    Err(e) => guest_warn!(
                        self.net_warn,
                        tap = self.tap.name(),
                        len,
                        error = %e,
                        "virtio-net: TAP write failed, frame dropped"
                    ),
                },
                Err(e) => guest_warn!(
                    self.warn,
                    head,
                    error = %e,
                    "virtio-net: bad transmit chain dropped"
                ),
            }
            match queue.add_used(mem, head, 0) {
                Ok(()) => used = true,
                Err(e) => {
                    guest_warn!(self.warn, head, error = %e, "virtio-net: cannot return a chain")
                }
            }
        }
        used
    }
}
