//! Feeds arbitrary descriptor chains over arbitrary guest memory to the virtio-blk
//! request parser, and checks what it accepts really lies in guest memory.
//!
//! Input: see `chain_input.rs`.
//! Run with `cargo +nightly fuzz run virtio_blk_request` from `vmm/`.

#![no_main]

mod chain_input;

use cocoon_vmm::devices::block::{parse_request, status_address, RequestKind};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestMemory as _, Permissions};

fuzz_target!(|data: &[u8]| {
    let Some((descs, mem)) = chain_input::decode(data) else {
        return;
    };

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
