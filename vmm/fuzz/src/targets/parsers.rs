//! The guest-facing parsers alone: a descriptor chain and guest memory from the input,
//! and what each parser accepts checked against what the chain describes.

use cocoon_vmm::devices::balloon::reported_ranges;
use cocoon_vmm::devices::block::{parse_request, status_address, RequestKind};
use cocoon_vmm::devices::net::{
    gather_tx_frame, validate_tx_header, DEVICE_FEATURES, ETH_HLEN, MAX_BUFFER_LEN, VNET_HDR_LEN,
};
use cocoon_vmm::devices::vsock::{
    parse_rx_buffer, parse_tx_packet, read_segments, write_rx_packet, Header, Op, HEADER_LEN,
    HOST_CID, MAX_PAYLOAD, TYPE_STREAM,
};
use vm_memory::{Address, Bytes, GuestMemory as _, Permissions};

use crate::input::{descriptors, memory, Input, Ring};

const MEM_SIZE: usize = 0x1_0000;
const GUEST_CID: u64 = 3;

pub fn block_request(data: &[u8]) {
    let mut input = Input::new(data);
    let descs = descriptors(&mut input, MEM_SIZE as u64, 16);
    let mem = memory(MEM_SIZE, input.slice(MEM_SIZE));
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
}

pub fn vsock_packet(data: &[u8]) {
    let mut input = Input::new(data);
    let descs = descriptors(&mut input, MEM_SIZE as u64, 16);
    let mem = memory(MEM_SIZE, input.slice(MEM_SIZE));
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
        let header = Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            socket_type: TYPE_STREAM,
            op: Op::Rw as u16,
            ..Header::default()
        };
        let used = write_rx_packet(&mem, &buf, &header, &vec![0xa5u8; room])
            .expect("fits by construction");
        assert_eq!(used as usize, HEADER_LEN + room);
        if room < MAX_PAYLOAD as usize {
            assert!(write_rx_packet(&mem, &buf, &header, &vec![0u8; room + 1]).is_err());
        }
    }
}

pub fn balloon_report(data: &[u8]) {
    let mut input = Input::new(data);
    let descs = descriptors(&mut input, MEM_SIZE as u64, 32);
    let mem = memory(MEM_SIZE, input.slice(MEM_SIZE));
    let (ranges, rejected) = reported_ranges(&descs, &mem);
    assert_eq!(ranges.len() + rejected, descs.len());
    for r in ranges {
        assert!(r.len > 0);
        assert_eq!(r.addr.raw_value() % 4096, 0);
        assert_eq!(r.len % 4096, 0);
        let len = usize::try_from(r.len).expect("fits");
        assert!(mem.check_range(r.addr, len, Permissions::Write));
    }
}

/// A transmit chain walked the way the device walks it (indirect tables included), then
/// gathered: what is accepted must be exactly the bytes the chain describes.
pub fn net_tx(data: &[u8]) {
    const SIZE: u16 = 16;
    let mut input = Input::new(data);
    let head = u16::from(input.u8());
    let select = input.u16();
    let mut acked = 1u64 << 32;
    for (i, bit) in (0..64)
        .filter(|b| DEVICE_FEATURES & (1u64 << b) != 0)
        .enumerate()
    {
        if select & (1 << (i % 16)) != 0 {
            acked |= 1u64 << bit;
        }
    }
    let mem_size = 0x2_0000;
    // The table at 0 comes from the input; the rings sit at the end.
    let mem = memory(mem_size, input.slice(0x1000));
    let Some(mut ring) = Ring::new(&mem, mem_size as u64 - 0x400, SIZE) else {
        return;
    };
    // Point the queue's table at 0, where the input put it.
    if ring
        .queue
        .try_set_desc_table_address(vm_memory::GuestAddress(0))
        .is_err()
    {
        return;
    }
    ring.publish(&mem, head);
    let Some(chain) = virtio_queue::QueueT::pop_descriptor_chain(&mut ring.queue, &mem) else {
        return;
    };
    let descs: Vec<_> = chain.collect();
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
}
