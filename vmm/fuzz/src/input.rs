//! Turning fuzzer bytes into structured operations, and the driver side of a split ring
//! the targets build their chains on.

use cocoon_vmm::devices::GuestMemory;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Reads values off the front of the input; once it runs out everything reads as zero,
/// so every input decodes to something.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.u8();
        }
        out
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::from(self.u16()) % n
        }
    }

    /// One of `choices`, which must not be empty.
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len())]
    }

    /// Up to `max` bytes, length first.
    pub fn slice(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max + 1).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// An address mostly inside guest memory of `mem_size` bytes (or straddling its end),
    /// sometimes raw to reach overflow.
    pub fn addr(&mut self, mem_size: u64) -> u64 {
        let raw = self.u64();
        match raw & 7 {
            0 => raw,
            1 => mem_size - (raw >> 8) % 64,
            _ => (raw >> 8) % (mem_size + mem_size / 8),
        }
    }

    /// A descriptor length biased to the sizes devices care about.
    pub fn len(&mut self) -> u32 {
        match self.u8() % 8 {
            0 => self.u32(),
            1 => u32::from(self.u8()),
            2 => self.pick(&[1, 12, 16, 44, 512, 1024, 4096, 65536]),
            _ => u32::from(self.u16()) % 0x2000,
        }
    }
}

/// A split ring in guest memory: descriptor table, avail ring (with `used_event`) and
/// used ring, and the device's `Queue` on it. The driver's side is written as raw bytes,
/// as a guest would.
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub queue: Queue,
    next_desc: u16,
}

impl Ring {
    /// A ring of `size` entries at `base` (16-byte aligned).
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Option<Self> {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        mem.write_slice(&vec![0u8; (end - avail) as usize], GuestAddress(avail))
            .ok()?;
        let mut queue = Queue::new(size).ok()?;
        queue.try_set_desc_table_address(GuestAddress(desc)).ok()?;
        queue.try_set_avail_ring_address(GuestAddress(avail)).ok()?;
        queue.try_set_used_ring_address(GuestAddress(used)).ok()?;
        queue.set_ready(true);
        Some(Ring {
            size,
            desc,
            avail,
            used,
            queue,
            next_desc: 0,
        })
    }

    fn set_u16(mem: &GuestMemory, addr: u64, v: u16) {
        let _ = mem.write_obj(v.to_le(), GuestAddress(addr));
    }

    fn u16_at(mem: &GuestMemory, addr: u64) -> u16 {
        mem.read_obj::<u16>(GuestAddress(addr))
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// Stores `d` (flags and next as given) at table entry `index`.
    pub fn write_desc(&self, mem: &GuestMemory, index: u16, d: (u64, u32, u16, u16)) {
        let at = self.desc + 16 * u64::from(index % self.size);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.0.to_le_bytes());
        raw[8..12].copy_from_slice(&d.1.to_le_bytes());
        raw[12..14].copy_from_slice(&d.2.to_le_bytes());
        raw[14..].copy_from_slice(&d.3.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(at));
    }

    pub fn avail_idx(&self, mem: &GuestMemory) -> u16 {
        Self::u16_at(mem, self.avail + 2)
    }

    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        Self::set_u16(mem, self.avail + 2, idx);
    }

    /// Makes the chain at `head` (any value) available.
    pub fn publish(&self, mem: &GuestMemory, head: u16) {
        let idx = self.avail_idx(mem);
        Self::set_u16(mem, self.avail + 4 + 2 * u64::from(idx % self.size), head);
        self.set_avail_idx(mem, idx.wrapping_add(1));
    }

    /// Makes a chain of (addr, len, device-writable) available on the next descriptors;
    /// returns its head.
    pub fn post(&mut self, mem: &GuestMemory, pieces: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in pieces.iter().enumerate() {
            let index = head.wrapping_add(i as u16) % self.size;
            let mut flags = if writable { 2 } else { 0 };
            let next = (index + 1) % self.size;
            if i + 1 < pieces.len() {
                flags |= 1;
            }
            self.write_desc(mem, index, (addr, len, flags, next));
        }
        self.next_desc = ((usize::from(head) + pieces.len()) % usize::from(self.size)) as u16;
        self.publish(mem, head);
        head
    }

    pub fn set_used_event(&self, mem: &GuestMemory, idx: u16) {
        Self::set_u16(mem, self.avail + 4 + 2 * u64::from(self.size), idx);
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        Self::u16_at(mem, self.used + 2)
    }

    /// Used entry `i`: (id, len).
    pub fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id = mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(0);
        let len = mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap_or(0);
        (u32::from_le(id), u32::from_le(len))
    }
}

/// Guest memory of `size` bytes from 0, its start filled from `contents`.
pub fn memory(size: usize, contents: &[u8]) -> GuestMemory {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory");
    let n = contents.len().min(size);
    mem.write_slice(&contents[..n], GuestAddress(0))
        .expect("inside memory");
    mem
}

/// A descriptor table decoded from the input: a count, then (addr, len, flags, next).
pub fn descriptors(input: &mut Input<'_>, mem_size: u64, max: usize) -> Vec<Descriptor> {
    let count = input.below(max + 1);
    (0..count)
        .map(|_| {
            let addr = input.addr(mem_size);
            let len = input.len();
            Descriptor::new(addr, len, u16::from(input.u8() & 7), u16::from(input.u8()))
        })
        .collect()
}
