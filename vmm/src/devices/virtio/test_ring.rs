//! The driver's side of a split virtqueue, for device tests: rings laid out by hand in
//! guest memory (with room for the event-index fields), chains made available the way a
//! driver does, and what the device put in the used ring read back. Every device's tests
//! use this one instead of their own descriptor-chain set-up.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashMap;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::GuestMemory;

/// (addr, len) of each descriptor of a chain.
pub(crate) type Spans = Vec<(u64, u32)>;

/// Guest memory of `size` bytes from address 0.
pub(crate) fn memory(size: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// One descriptor, device-writable or not, without NEXT.
pub(crate) fn desc(addr: u64, len: u32, writable: bool) -> Descriptor {
    let flags = if writable {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    Descriptor::new(addr, len, flags, 0)
}

/// A descriptor of a chain: with NEXT pointing at `next`, if given.
fn chained(addr: u64, len: u32, writable: bool, next: Option<u16>) -> Descriptor {
    let d = desc(addr, len, writable);
    match next {
        Some(next) => Descriptor::new(addr, len, d.flags() | VRING_DESC_F_NEXT as u16, next),
        None => d,
    }
}

/// A chain the driver made available.
#[derive(Debug)]
struct Posted {
    ids: Vec<u16>,
    spans: Spans,
    slot: usize,
}

/// One split virtqueue as the driver sees it, and the device's `Queue` on it.
#[derive(Debug)]
pub(crate) struct DriverRing {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The device's side, configured and ready.
    pub queue: Queue,
    used_seen: u16,
    /// Where `post` puts its next chain.
    next_desc: u16,
    /// Descriptor indexes not in any available chain.
    pub free: Vec<u16>,
    /// Chains made available through `add`, by head descriptor.
    chains: HashMap<u16, Posted>,
}

impl DriverRing {
    /// A ring of `size` entries at `base` (16-byte aligned): the descriptor table, then
    /// the avail ring with `used_event`, then the used ring with `avail_event`.
    pub(crate) fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let ring_end = used + 6 + 8 * u64::from(size);
        let zeroes = vec![0u8; (ring_end - avail) as usize];
        mem.write_slice(&zeroes, GuestAddress(avail)).unwrap();
        let mut queue = Queue::new(size).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .unwrap();
        queue.try_set_used_ring_address(GuestAddress(used)).unwrap();
        queue.set_ready(true);
        DriverRing {
            size,
            desc,
            avail,
            used,
            queue,
            used_seen: 0,
            next_desc: 0,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
        }
    }

    fn u16_at(mem: &GuestMemory, addr: u64) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(addr)).unwrap())
    }

    fn set_u16(mem: &GuestMemory, addr: u64, value: u16) {
        mem.write_obj(value.to_le(), GuestAddress(addr)).unwrap();
    }

    /// Stores `d` as it is (flags and next untouched) at table entry `index`.
    pub(crate) fn write_desc(&self, mem: &GuestMemory, index: u16, d: Descriptor) {
        let at = self.desc + 16 * u64::from(index % self.size);
        mem.write_obj(RawDescriptor::from(d), GuestAddress(at))
            .unwrap();
    }

    /// The driver's available index.
    pub(crate) fn avail_idx(&self, mem: &GuestMemory) -> u16 {
        Self::u16_at(mem, self.avail + 2)
    }

    pub(crate) fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        Self::set_u16(mem, self.avail + 2, idx);
    }

    /// Makes the chain starting at descriptor `head` available (any value, even one past
    /// the table).
    pub(crate) fn publish(&self, mem: &GuestMemory, head: u16) {
        let idx = self.avail_idx(mem);
        Self::set_u16(mem, self.avail + 4 + 2 * u64::from(idx % self.size), head);
        self.set_avail_idx(mem, idx.wrapping_add(1));
    }

    /// Makes a chain of `pieces` (addr, len, device-writable) available on free
    /// descriptors, remembered under `slot` for `take_used`; false if there are not
    /// enough free.
    pub(crate) fn add(
        &mut self,
        mem: &GuestMemory,
        pieces: &[(u64, u32, bool)],
        slot: usize,
    ) -> bool {
        if pieces.is_empty() || pieces.len() > self.free.len() {
            return false;
        }
        let ids: Vec<u16> = (0..pieces.len())
            .map(|_| self.free.pop().unwrap())
            .collect();
        for (i, &(addr, len, writable)) in pieces.iter().enumerate() {
            let next = ids.get(i + 1).copied();
            self.write_desc(mem, ids[i], chained(addr, len, writable, next));
        }
        let head = ids[0];
        self.publish(mem, head);
        let spans = pieces.iter().map(|&(a, l, _)| (a, l)).collect();
        self.chains.insert(head, Posted { ids, spans, slot });
        true
    }

    /// Makes a chain of `pieces` (addr, len, device-writable) available on the next
    /// descriptors in table order, wrapping around and reusing them without tracking
    /// (for tests that read the used ring themselves; not to be mixed with `add`);
    /// returns its head.
    pub(crate) fn post(&mut self, mem: &GuestMemory, pieces: &[(u64, u32, bool)]) -> u16 {
        let base = self.next_desc;
        let chain: Vec<Descriptor> = pieces
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let next =
                    (i + 1 < pieces.len()).then(|| base.wrapping_add(i as u16 + 1) % self.size);
                chained(addr, len, writable, next)
            })
            .collect();
        self.post_raw(mem, &chain)
    }

    /// As `post`, with `descs` stored as they are (flags and next untouched).
    pub(crate) fn post_raw(&mut self, mem: &GuestMemory, descs: &[Descriptor]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(mem, head.wrapping_add(i as u16) % self.size, *d);
        }
        self.next_desc = ((usize::from(head) + descs.len()) % usize::from(self.size)) as u16;
        self.publish(mem, head);
        head
    }

    /// Entries in the used ring so far.
    pub(crate) fn used_idx(&self, mem: &GuestMemory) -> u16 {
        Self::u16_at(mem, self.used + 2)
    }

    /// Used ring entry `i`: (head, length).
    pub(crate) fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u16, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap());
        let len = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap());
        (id as u16, len)
    }

    /// Chains made available with `add` that the device returned since the last call:
    /// (pieces, used length, slot). A returned head the driver never made available
    /// fails the test.
    pub(crate) fn take_used(&mut self, mem: &GuestMemory) -> Vec<(Spans, u32, usize)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let (id, len) = self.used_elem(mem, self.used_seen);
            self.used_seen = self.used_seen.wrapping_add(1);
            let posted = self.chains.remove(&id).unwrap_or_else(|| {
                panic!(
                    "the device returned chain {id} (len {len}), not available; available: {:?}",
                    self.chains.keys().collect::<Vec<_>>()
                )
            });
            self.free.extend(posted.ids);
            out.push((posted.spans, len, posted.slot));
        }
        out
    }

    /// Whether chains made available with `add` are still with the device.
    pub(crate) fn outstanding(&self) -> usize {
        self.chains.len()
    }

    /// The driver's "interrupt me once the used index passes this".
    pub(crate) fn set_used_event(&self, mem: &GuestMemory, idx: u16) {
        Self::set_u16(mem, self.avail + 4 + 2 * u64::from(self.size), idx);
    }

    /// The device's "notify me when the available index passes this".
    pub(crate) fn avail_event(&self, mem: &GuestMemory) -> u16 {
        Self::u16_at(mem, self.used + 4 + 8 * u64::from(self.size))
    }
}
