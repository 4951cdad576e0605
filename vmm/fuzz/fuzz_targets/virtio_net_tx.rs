//! Feeds an arbitrary descriptor table, indirect tables and guest memory to the
//! virtio-net transmit path: the chain is walked the way the device walks it, then
//! `gather_tx_frame` gathers it, and what it accepts must be exactly the bytes the
//! chain describes, within the limits.
//!
//! Input: one byte of head index, two bytes selecting the negotiated features, then the
//! initial guest memory contents; the descriptor table (16 entries) is the first 256
//! bytes of guest memory. Run with `cargo +nightly fuzz run virtio_net_tx` from `vmm/`.

#![no_main]

use cocoon_vmm::devices::net::{
    gather_tx_frame, validate_tx_header, DEVICE_FEATURES, ETH_HLEN, MAX_BUFFER_LEN, VNET_HDR_LEN,
};
use cocoon_vmm::devices::GuestMemory;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, Permissions};

const MEM_SIZE: usize = 0x2_0000;
const QUEUE_SIZE: u16 = 16;
/// The rings live at the end of guest memory, out of the way of the table at 0.
const AVAIL: u64 = MEM_SIZE as u64 - 0x100;
const USED: u64 = MEM_SIZE as u64 - 0x80;
const VERSION_1: u64 = 1 << 32;

fuzz_target!(|data: &[u8]| {
    let Some((&[head, f0, f1], contents)) = data.split_first_chunk::<3>() else {
        return;
    };
    // Each offered feature accepted or not, as the input says (16 bits cover them all).
    let mut acked = VERSION_1;
    let select = u16::from_le_bytes([f0, f1]);
    for (i, bit) in (0..64)
        .filter(|b| DEVICE_FEATURES & (1u64 << b) != 0)
        .enumerate()
    {
        if select & (1 << (i % 16)) != 0 {
            acked |= 1u64 << bit;
        }
    }

    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = contents.len().min(AVAIL as usize);
    if mem.write_slice(&contents[..n], GuestAddress(0)).is_err() {
        return;
    }
    // One available chain: `head`, which may lie outside the table.
    let ring = [0u16, 1, u16::from(head)];
    for (i, v) in ring.iter().enumerate() {
        if mem
            .write_obj(v.to_le(), GuestAddress(AVAIL + 2 * i as u64))
            .is_err()
        {
            return;
        }
    }
    let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    let Some(chain) = queue.pop_descriptor_chain(&mem) else {
        return;
    };
    let descs: Vec<Descriptor> = chain.collect();

    let mut buf = vec![0u8; MAX_BUFFER_LEN];
    let Ok(len) = gather_tx_frame(&descs, &mem, acked, &mut buf) else {
        return;
    };
    assert!((VNET_HDR_LEN + ETH_HLEN..=MAX_BUFFER_LEN).contains(&len));
    let mut want = Vec::with_capacity(len);
    for d in &descs {
        assert!(!d.is_write_only());
        let dlen = d.len() as usize;
        assert!(dlen == 0 || mem.check_range(d.addr(), dlen, Permissions::Read));
        let mut part = vec![0u8; dlen];
        mem.read_slice(&mut part, d.addr()).expect("checked range");
        want.extend(part);
    }
    assert!(!descs.last().expect("non-empty").has_next());
    assert!(buf[..len] == want[..]);
    assert!(validate_tx_header(&buf[..VNET_HDR_LEN], acked).is_ok());
});
