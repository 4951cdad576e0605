//! Feeds arbitrary descriptor chains to the virtio-balloon free page report parser, and
//! checks that every range it would discard is whole pages inside guest memory.
//!
//! Input: see `chain_input.rs`.
//! Run with `cargo +nightly fuzz run virtio_balloon_report` from `vmm/`.

#![no_main]

mod chain_input;

use cocoon_vmm::devices::balloon::reported_ranges;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Address, GuestMemory as _, Permissions};

fuzz_target!(|data: &[u8]| {
    let Some((descs, mem)) = chain_input::decode(data) else {
        return;
    };
    let (ranges, rejected) = reported_ranges(&descs, &mem);
    assert_eq!(ranges.len() + rejected, descs.len());
    for r in ranges {
        assert!(r.len > 0);
        assert_eq!(r.addr.raw_value() % 4096, 0);
        assert_eq!(r.len % 4096, 0);
        let len = usize::try_from(r.len).expect("fits");
        assert!(mem.check_range(r.addr, len, Permissions::Write));
    }
});
