//! Receive: frames read from the TAP copied into the guest's receive chains, spread over
//! several with MRG_RXBUF; a frame waits (one at most) while the guest has no buffers.

use std::io;

use thiserror::Error;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Permissions;

use super::{has, Net, MAX_READ_ERRORS, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::devices::guest_warn::guest_warn;
use crate::devices::virtio::segments::{
    descriptor_segment, write_segments, OutsideMemory, Segment,
};
use crate::devices::GuestMemory;

/// Why a receive chain was returned unused.
#[derive(Debug, Error, PartialEq, Eq)]
pub(super) enum RxChainError {
    #[error("descriptor chain is empty or unreadable")]
    EmptyChain,
    #[error("descriptor chain is cut short (its last descriptor has NEXT)")]
    Truncated,
    #[error("device-readable descriptor in a receive chain")]
    ReadableDescriptor,
    #[error("descriptor at {addr:#x} (len {len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("buffer of {0} bytes cannot hold the virtio-net header")]
    TooSmall(usize),
}

/// The device-writable spans of a receive chain and their total length.
pub(super) fn rx_chain(
    descs: &[Descriptor],
    mem: &GuestMemory,
) -> Result<(Vec<Segment>, usize), RxChainError> {
    let last = descs.last().ok_or(RxChainError::EmptyChain)?;
    if last.has_next() {
        return Err(RxChainError::Truncated);
    }
    let mut segs = Vec::with_capacity(descs.len());
    let mut capacity = 0usize;
    for d in descs {
        if !d.is_write_only() {
            return Err(RxChainError::ReadableDescriptor);
        }
        let seg = descriptor_segment(d, mem, Permissions::Write)
            .map_err(|OutsideMemory { addr, len }| RxChainError::OutsideMemory { addr, len })?;
        if let Some(seg) = seg {
            segs.push(seg);
            // A descriptor's length is a u32: it fits usize.
            capacity = capacity.saturating_add(seg.len as usize);
        }
    }
    Ok((segs, capacity))
}

/// A receive chain taken for the frame at hand.
pub(super) struct RxBuffer {
    head: u16,
    segs: Vec<Segment>,
}

/// What became of a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    Delivered,
    /// Not enough receive buffers: the frame must wait for the guest.
    NoBuffers,
    Dropped,
}

impl Net {
    /// Returns chains with nothing written.
    pub(super) fn return_unused(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        heads: &[u16],
    ) -> bool {
        let mut used = false;
        for &head in heads {
            match queue.add_used(mem, head, 0) {
                Ok(()) => used = true,
                Err(e) => {
                    guest_warn!(self.warn, head, error = %e, "virtio-net: cannot return a chain")
                }
            }
        }
        used
    }

    /// Copies the `len`-byte frame in `rx_buf` into receive chains. Returns what became of
    /// it and whether any chain was used.
    pub(super) fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        len: usize,
    ) -> (Delivery, bool) {
        if !(VNET_HDR_LEN..=self.rx_buf.len()).contains(&len) {
            guest_warn!(
                self.net_warn,
                tap = self.tap.name(),
                len,
                "virtio-net: frame from the TAP without a virtio-net header, dropped"
            );
            return (Delivery::Dropped, false);
        }
        let mrg = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let start = queue.next_avail();
        let mut popped = 0u16;
        let mut bad: Vec<u16> = Vec::new();
        // Bad chains before the first good one: returnable whatever happens next.
        let mut bad_prefix = 0usize;
        let mut good: Vec<RxBuffer> = Vec::new();
        let mut capacity = 0usize;
        let mut too_small = None;
        let iter = match queue.iter(mem) {
            Ok(iter) => iter,
            Err(e) => {
                guest_warn!(self.warn, error = %e, "virtio-net: cannot read the receive ring");
                return (Delivery::NoBuffers, false);
            }
        };
        for chain in iter {
            popped = popped.wrapping_add(1);
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let checked = rx_chain(&descs, mem).and_then(|(segs, cap)| {
                // Every buffer must hold the header (virtio 1.1 §5.1.6.3.1); one that
                // cannot would hold up every frame.
                if cap < VNET_HDR_LEN {
                    Err(RxChainError::TooSmall(cap))
                } else {
                    Ok((segs, cap))
                }
            });
            match checked {
                Ok((_, cap)) if !mrg && cap < len => {
                    too_small = Some(cap);
                    break;
                }
                Ok((segs, cap)) => {
                    good.push(RxBuffer { head, segs });
                    capacity = capacity.saturating_add(cap);
                    if capacity >= len {
                        break;
                    }
                }
                Err(e) => {
                    guest_warn!(self.warn, head, error = %e, "virtio-net: bad receive chain returned unused");
                    bad.push(head);
                    if good.is_empty() {
                        bad_prefix += 1;
                    }
                }
            }
        }

        if let Some(cap) = too_small {
            // Leave that chain for a frame it can hold; what came before it was bad.
            queue.set_next_avail(start.wrapping_add(popped.wrapping_sub(1)));
            let used = self.return_unused(queue, mem, &bad);
            guest_warn!(
                self.net_warn,
                tap = self.tap.name(),
                len,
                buffer = cap,
                "virtio-net: frame larger than the receive buffer (no MRG_RXBUF), dropped"
            );
            return (Delivery::Dropped, used);
        }
        if capacity < len {
            // Out of buffers: put back every chain after the bad prefix, so that the
            // buffers of one frame stay contiguous in the used ring.
            queue.set_next_avail(start.wrapping_add(bad_prefix as u16));
            let used = self.return_unused(queue, mem, &bad[..bad_prefix]);
            if popped >= queue.size() {
                // A full ring that cannot hold it never will: do not wait for more.
                guest_warn!(
                    self.net_warn,
                    tap = self.tap.name(),
                    len,
                    capacity,
                    "virtio-net: frame larger than the whole receive ring, dropped"
                );
                return (Delivery::Dropped, used);
            }
            return (Delivery::NoBuffers, used);
        }

        let mut used = self.return_unused(queue, mem, &bad);
        let num_buffers = if mrg { good.len() } else { 1 };
        let frame = &mut self.rx_buf[..len];
        // Without GUEST_CSUM the driver expects flags 0 (virtio 1.1 §5.1.6.4.1).
        if !has(self.acked_features, VIRTIO_NET_F_GUEST_CSUM) {
            frame[0] = 0;
        }
        // The kernel leaves num_buffers alone; good.len() is at most the queue size.
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN]
            .copy_from_slice(&(num_buffers as u16).to_le_bytes());
        let mut pos = 0usize;
        for buffer in &good {
            let written = write_segments(mem, &buffer.segs, &[&self.rx_buf[pos..len]]);
            if written.is_err() {
                guest_warn!(
                    self.warn,
                    head = buffer.head,
                    "virtio-net: cannot write a receive buffer"
                );
            }
            let written = written.unwrap_or_else(|stopped| stopped.written);
            pos += written;
            // written <= MAX_BUFFER_LEN fits u32.
            match queue.add_used(mem, buffer.head, written as u32) {
                Ok(()) => used = true,
                Err(e) => guest_warn!(
                    self.warn,
                    head = buffer.head,
                    error = %e,
                    "virtio-net: cannot return a chain"
                ),
            }
        }
        (Delivery::Delivered, used)
    }

    /// Reads frames from the TAP into receive buffers until the TAP is empty, the guest
    /// runs out of buffers or the budget is spent.
    pub(super) fn receive(&mut self, queue: Option<&mut Queue>, mem: &GuestMemory) -> bool {
        let Some(queue) = queue else {
            // The driver has not enabled the receive queue: wait for it.
            self.rx_stalled = true;
            return false;
        };
        let mut used = false;
        let mut reads = 0usize;
        loop {
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => {
                    if reads >= self.rx_budget {
                        // Still readable: the level-triggered loop comes back to us.
                        break;
                    }
                    reads += 1;
                    match self.tap.read_frame(&mut self.rx_buf) {
                        // An empty frame (a TAP never gives one): dropped as too short,
                        // but an fd that keeps returning nothing is at end of file.
                        Ok(0) => {
                            self.read_errors += 1;
                            if self.read_errors >= MAX_READ_ERRORS {
                                self.fail("end of file");
                                break;
                            }
                            0
                        }
                        Ok(n) => {
                            self.read_errors = 0;
                            n
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // E.g. a frame too large for the buffer, which the kernel drops.
                            self.read_errors += 1;
                            guest_warn!(
                                self.net_warn,
                                tap = self.tap.name(),
                                error = %e,
                                "virtio-net: TAP read failed"
                            );
                            if self.read_errors >= MAX_READ_ERRORS {
                                self.fail("reads keep failing");
                                break;
                            }
                            continue;
                        }
                    }
                }
            };
            let (delivery, u) = self.deliver(queue, mem, len);
            used |= u;
            if delivery == Delivery::NoBuffers {
                self.rx_pending = Some(len);
                self.rx_stalled = true;
                break;
            }
        }
        used
    }

    /// The guest added receive buffers: deliver the waiting frame and watch the TAP again.
    pub(super) fn rx_notified(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        if let Some(len) = self.rx_pending.take() {
            let (delivery, u) = self.deliver(queue, mem, len);
            used = u;
            if delivery == Delivery::NoBuffers {
                self.rx_pending = Some(len);
                return used;
            }
        }
        self.rx_stalled = false;
        used
    }
}
