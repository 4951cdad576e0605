//! Feeds arbitrary descriptor chains over arbitrary guest memory to the virtio-vsock TX
//! packet parser, and checks that what it accepts is consistent and lies in guest memory;
//! the same chain is also tried as an RX buffer and written to.
//!
//! Input: see `chain_input.rs`.
//! Run with `cargo +nightly fuzz run virtio_vsock_packet` from `vmm/`.

#![no_main]

mod chain_input;

use cocoon_vmm::devices::vsock::{
    parse_rx_buffer, parse_tx_packet, read_segments, write_rx_packet, Header, Op, HEADER_LEN,
    HOST_CID, MAX_PAYLOAD, TYPE_STREAM,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestMemory as _, Permissions};

const GUEST_CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let Some((descs, mem)) = chain_input::decode(data) else {
        return;
    };

    match parse_tx_packet(&descs, &mem, GUEST_CID) {
        Ok(pkt) => {
            let h = pkt.header;
            assert_eq!((h.src_cid, h.dst_cid), (GUEST_CID, HOST_CID));
            assert_eq!(h.socket_type, TYPE_STREAM);
            assert_eq!(Op::from_raw(h.op), Some(pkt.op));
            assert!(h.len <= MAX_PAYLOAD);
            assert!(pkt.op == Op::Rw || h.len == 0);
            let mut total = 0u64;
            for seg in &pkt.payload {
                assert!(mem.check_range(seg.addr, seg.len as usize, Permissions::Read));
                total += seg.len;
            }
            assert_eq!(total, u64::from(h.len));
            let mut buf = vec![0u8; h.len as usize];
            read_segments(&mem, &pkt.payload, &mut buf).expect("accepted payload is readable");
        }
        Err(e) => {
            // Only a header of this guest's is ever handed back for an answer.
            if let Some(h) = e.header {
                assert!(
                    h.src_cid != GUEST_CID
                        || h.dst_cid != HOST_CID
                        || h.socket_type != TYPE_STREAM
                        || Op::from_raw(h.op).is_none()
                        || h.len > 0
                );
            }
        }
    }

    if let Ok(buf) = parse_rx_buffer(&descs, &mem) {
        assert!(buf.capacity() >= HEADER_LEN as u64);
        let room = buf.payload_room().min(u64::from(MAX_PAYLOAD)) as usize;
        let payload = vec![0xa5u8; room];
        let header = Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            socket_type: TYPE_STREAM,
            op: Op::Rw as u16,
            ..Header::default()
        };
        let used = write_rx_packet(&mem, &buf, &header, &payload).expect("fits by construction");
        assert_eq!(used as usize, HEADER_LEN + room);
        // One byte more than the room never fits.
        if room < MAX_PAYLOAD as usize {
            let over = vec![0u8; room + 1];
            assert!(write_rx_packet(&mem, &buf, &header, &over).is_err());
        }
    }
});
