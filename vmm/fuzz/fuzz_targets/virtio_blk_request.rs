//! Feeds arbitrary descriptor chains over arbitrary guest memory to the virtio-blk
//! request parser, and checks what it accepts really lies in guest memory.
//!
//! Input: one byte of descriptor count, then 16 bytes per descriptor (addr u64, len u32,
//! flags u16, next u16, little-endian), then the initial guest memory contents.
//! Run with `cargo +nightly fuzz run virtio_blk_request` from `vmm/`.

#![no_main]

use cocoon_vmm::devices::virtio_blk::{parse_request, status_address, RequestKind};
use cocoon_vmm::devices::GuestMemory;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, Permissions};

const MEM_SIZE: usize = 0x1_0000;
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

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count) % (MAX_DESCRIPTORS + 1);
    let Some(table) = rest.get(..count * 16) else {
        return;
    };
    let contents = &rest[count * 16..];

    let descs: Vec<Descriptor> = table
        .chunks_exact(16)
        .map(|d| {
            let addr = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
            Descriptor::new(address(addr), len, u16_at(d, 12), u16_at(d, 14))
        })
        .collect();

    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = contents.len().min(MEM_SIZE);
    if mem.write_slice(&contents[..n], GuestAddress(0)).is_err() {
        return;
    }

    let status = status_address(&descs, &mem);
    if let Some(addr) = status {
        assert!(mem.check_range(addr, 1, Permissions::Write));
    }
    let Ok(request) = parse_request(&descs, &mem) else {
        return;
    };
    assert_eq!(Some(request.status), status);
    let mut total = 0u64;
    for seg in &request.data {
        assert!(mem.check_range(seg.addr, seg.len as usize, Permissions::Read));
        total += seg.len;
    }
    assert_eq!(total, request.data_len);
    match request.kind {
        RequestKind::In | RequestKind::Out => {
            assert!(request.data_len > 0 && request.data_len % 512 == 0)
        }
        RequestKind::Discard(segments) | RequestKind::WriteZeroes(segments) => {
            assert!(!segments.is_empty())
        }
        _ => {}
    }
});
