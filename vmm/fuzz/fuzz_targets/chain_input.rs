//! Shared by the fuzz targets that take a descriptor chain: turns fuzzer bytes into a
//! descriptor table and guest memory.
//!
//! Input: one byte of descriptor count, then 16 bytes per descriptor (addr u64, len u32,
//! flags u16, next u16, little-endian), then the initial guest memory contents.

use cocoon_vmm::devices::GuestMemory;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

pub const MEM_SIZE: usize = 0x1_0000;
const MAX_DESCRIPTORS: usize = 32;

/// Addresses mostly land near guest memory (in range, straddling its end, or just
/// past it); with the top bit of the address set they are used raw, to reach overflow.
fn address(raw: u64) -> u64 {
    if raw & (1 << 63) != 0 {
        raw
    } else {
        raw % (2 * MEM_SIZE as u64)
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// The descriptors and the guest memory the input describes; `None` if too short.
pub fn decode(data: &[u8]) -> Option<(Vec<Descriptor>, GuestMemory)> {
    let (&count, rest) = data.split_first()?;
    let count = usize::from(count) % (MAX_DESCRIPTORS + 1);
    let table = rest.get(..count * 16)?;
    let contents = &rest[count * 16..];
    let descs = table
        .chunks_exact(16)
        .map(|d| {
            let addr = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
            Descriptor::new(address(addr), len, u16_at(d, 12), u16_at(d, 14))
        })
        .collect();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = contents.len().min(MEM_SIZE);
    mem.write_slice(&contents[..n], GuestAddress(0)).ok()?;
    Some((descs, mem))
}
