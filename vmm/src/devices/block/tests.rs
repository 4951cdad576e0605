#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use super::*;

use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, Permissions};

use crate::devices::virtio::segments::total_len;
use crate::devices::virtio::{Queues, VirtioDevice};
use crate::devices::GuestMemory;

use std::io::Write;
use std::os::unix::fs::MetadataExt;

use tempfile::NamedTempFile;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;

use crate::devices::virtio::test_ring::{self, desc, DriverRing};

const MEM_SIZE: usize = 0x20_0000;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const DATA2: u64 = 0x10_0000;
const STATUS: u64 = 0x1800;
const DISK_LEN: u64 = 1 << 20;
const R: bool = false;
const W: bool = true;

fn memory() -> GuestMemory {
    test_ring::memory(MEM_SIZE)
}

fn disk_file(len: u64) -> NamedTempFile {
    let file = NamedTempFile::new().unwrap();
    file.as_file().set_len(len).unwrap();
    file
}

fn backing(file: &NamedTempFile, read_only: bool) -> Option<Backing> {
    Some(Backing {
        path: file.path().to_owned(),
        read_only,
        serial: None,
    })
}

/// A writable slot with a 1 MiB sparse file, activated with every offered feature.
fn block_with_disk() -> (Block, NamedTempFile) {
    let file = disk_file(DISK_LEN);
    let mut blk = Block::new(false, "serial-0");
    blk.swap(backing(&file, false)).unwrap();
    blk.activate(blk.device_features());
    (blk, file)
}

fn write_header(mem: &GuestMemory, request_type: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&request_type.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
}

/// Outcome of one chain: used-ring length, or None if nothing was returned.
#[derive(Debug, PartialEq, Eq)]
struct Used {
    len: u32,
    status: u8,
}

/// Puts one chain on a fresh queue, notifies the device and reads back the result.
fn run(blk: &mut Block, mem: &GuestMemory, descs: &[Descriptor]) -> Option<Used> {
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let mut ring = DriverRing::new(mem, 0, 16);
    let pieces: Vec<(u64, u32, bool)> = descs
        .iter()
        .map(|d| (d.addr().0, d.len(), d.is_write_only()))
        .collect();
    let head = ring.post(mem, &pieces);
    let used = blk.process_queue(0, &mut Queues::new(vec![Some(&mut ring.queue)]), mem);
    if ring.used_idx(mem) == 0 {
        assert!(!used);
        return None;
    }
    assert!(used);
    assert_eq!(ring.used_idx(mem), 1);
    let (id, len) = ring.used_elem(mem, 0);
    assert_eq!(id, head);
    Some(Used {
        len,
        status: mem.read_obj(GuestAddress(STATUS)).unwrap(),
    })
}

fn ok(len: u32) -> Option<Used> {
    Some(Used {
        len,
        status: VIRTIO_BLK_S_OK as u8,
    })
}

fn ioerr() -> Option<Used> {
    Some(Used {
        len: 1,
        status: VIRTIO_BLK_S_IOERR as u8,
    })
}

fn unsupp() -> Option<Used> {
    Some(Used {
        len: 1,
        status: VIRTIO_BLK_S_UNSUPP as u8,
    })
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn write_request(blk: &mut Block, mem: &GuestMemory, sector: u64, data: &[u8]) -> Option<Used> {
    write_header(mem, VIRTIO_BLK_T_OUT, sector);
    mem.write_slice(data, GuestAddress(DATA)).unwrap();
    run(
        blk,
        mem,
        &[
            desc(HDR, 16, R),
            desc(DATA, data.len() as u32, R),
            desc(STATUS, 1, W),
        ],
    )
}

fn read_request(blk: &mut Block, mem: &GuestMemory, sector: u64, len: u32) -> Option<Used> {
    write_header(mem, VIRTIO_BLK_T_IN, sector);
    mem.write_slice(&vec![0x5a; len as usize], GuestAddress(DATA2))
        .unwrap();
    run(
        blk,
        mem,
        &[desc(HDR, 16, R), desc(DATA2, len, W), desc(STATUS, 1, W)],
    )
}

fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn file_bytes(file: &NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    file.as_file().read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn write_then_read_back() {
    let mem = memory();
    let (mut blk, file) = block_with_disk();
    // Larger than the bounce buffer, so the chunking is exercised too.
    let data = pattern(BOUNCE_LEN + 3 * 512, 7);
    assert_eq!(write_request(&mut blk, &mem, 3, &data), ok(1));
    assert!(file_bytes(&file, 3 * 512, data.len()) == data);
    assert_eq!(file_bytes(&file, 2 * 512, 512), vec![0; 512]);

    let len = data.len() as u32;
    assert_eq!(read_request(&mut blk, &mem, 3, len), ok(len + 1));
    assert!(guest_bytes(&mem, DATA2, data.len()) == data);
}

#[test]
fn data_spanning_descriptors_and_merged_header() {
    let mem = memory();
    let (mut blk, file) = block_with_disk();
    // Header split across two descriptors, the second also carrying the data's start.
    let data = pattern(1024, 3);
    write_header(&mem, VIRTIO_BLK_T_OUT, 1);
    let mut merged = guest_bytes(&mem, HDR + 8, 8);
    merged.extend_from_slice(&data[..100]);
    mem.write_slice(&merged, GuestAddress(DATA)).unwrap();
    mem.write_slice(&data[100..], GuestAddress(DATA2)).unwrap();
    let descs = [
        desc(HDR, 8, R),
        desc(DATA, 108, R),
        desc(DATA2, 924, R),
        desc(STATUS, 1, W),
    ];
    assert_eq!(run(&mut blk, &mem, &descs), ok(1));
    assert_eq!(file_bytes(&file, 512, 1024), data);

    // Read data and status sharing the last descriptor.
    write_header(&mem, VIRTIO_BLK_T_IN, 1);
    let descs = [
        desc(HDR, 16, R),
        desc(DATA2, 512, W),
        desc(STATUS - 512, 513, W),
    ];
    assert_eq!(run(&mut blk, &mem, &descs), ok(1025));
    assert_eq!(guest_bytes(&mem, DATA2, 512), data[..512]);
    assert_eq!(guest_bytes(&mem, STATUS - 512, 512), data[512..]);
}

#[test]
fn read_only_slot_rejects_writes() {
    let mem = memory();
    let file = disk_file(DISK_LEN);
    let mut blk = Block::new(true, "ro");
    // Even a writable backing is opened read-only in a read-only slot.
    blk.swap(backing(&file, false)).unwrap();
    blk.activate(blk.device_features());
    assert!(blk.is_read_only());
    assert_ne!(blk.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(blk.device_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);

    assert_eq!(write_request(&mut blk, &mem, 0, &[0xff; 512]), ioerr());
    assert_eq!(file_bytes(&file, 0, 512), vec![0; 512]);
    assert_eq!(read_request(&mut blk, &mem, 0, 512), ok(513));
}

#[test]
fn read_only_backing_rejects_writes_and_discards() {
    let mem = memory();
    let file = disk_file(DISK_LEN);
    file.as_file().write_all_at(&[0x11; 4096], 0).unwrap();
    let mut blk = Block::new(false, "rw-slot");
    blk.swap(backing(&file, true)).unwrap();
    blk.activate(blk.device_features());
    assert!(blk.is_read_only());
    assert_eq!(blk.device_features() & (1 << VIRTIO_BLK_F_RO), 0);

    assert_eq!(write_request(&mut blk, &mem, 0, &[0xff; 512]), ioerr());
    assert_eq!(
        discard_request(&mut blk, &mem, VIRTIO_BLK_T_DISCARD, 0, 8, 0),
        ioerr()
    );
    assert_eq!(file_bytes(&file, 0, 4096), vec![0x11; 4096]);
}

#[test]
fn out_of_range_sectors_fail() {
    let mem = memory();
    let (mut blk, _file) = block_with_disk();
    let last = DISK_LEN / 512 - 1;
    assert_eq!(read_request(&mut blk, &mem, last, 512), ok(513));
    assert_eq!(read_request(&mut blk, &mem, last, 1024), ioerr());
    assert_eq!(write_request(&mut blk, &mem, last + 1, &[1; 512]), ioerr());
    // sector * 512 and offset + len overflow.
    assert_eq!(read_request(&mut blk, &mem, u64::MAX, 512), ioerr());
    assert_eq!(read_request(&mut blk, &mem, u64::MAX / 512, 512), ioerr());
}

#[test]
fn empty_slot_fails_io_but_answers_get_id() {
    let mem = memory();
    let mut blk = Block::new(false, "empty-slot");
    blk.activate(blk.device_features());
    assert_eq!(blk.capacity_sectors(), 0);
    assert_eq!(read_request(&mut blk, &mem, 0, 512), ioerr());
    assert_eq!(write_request(&mut blk, &mem, 0, &[1; 512]), ioerr());
    assert_eq!(flush_request(&mut blk, &mem), ioerr());
    assert_eq!(get_id(&mut blk, &mem), ok(21));
    assert_eq!(
        guest_bytes(&mem, DATA, 20),
        b"empty-slot\0\0\0\0\0\0\0\0\0\0"
    );
}

fn config_capacity(blk: &Block) -> u64 {
    let mut raw = [0u8; 8];
    blk.read_config(0, &mut raw);
    u64::from_le_bytes(raw)
}

#[test]
fn swap_and_eject_change_capacity() {
    let mem = memory();
    let mut blk = Block::new(false, "slot");
    blk.activate(blk.device_features());
    assert_eq!(config_capacity(&blk), 0);

    let file = disk_file(DISK_LEN);
    blk.swap(backing(&file, false)).unwrap();
    assert_eq!(config_capacity(&blk), DISK_LEN / 512);
    assert_eq!(blk.backing_path(), Some(file.path()));

    // Unaligned sizes round down.
    let odd = disk_file(4096 + 100);
    blk.swap(backing(&odd, false)).unwrap();
    assert_eq!(config_capacity(&blk), 8);
    assert_eq!(read_request(&mut blk, &mem, 7, 512), ok(513));
    assert_eq!(read_request(&mut blk, &mem, 8, 512), ioerr());

    blk.swap(None).unwrap();
    assert_eq!(config_capacity(&blk), 0);
    assert_eq!(blk.backing_path(), None);
    assert_eq!(read_request(&mut blk, &mem, 0, 512), ioerr());
}

#[test]
fn failed_swap_keeps_the_old_backing() {
    let (mut blk, file) = block_with_disk();
    let missing = file.path().with_extension("missing");
    let err = blk
        .swap(Some(Backing {
            path: missing.clone(),
            read_only: false,
            serial: Some("new".into()),
        }))
        .unwrap_err();
    assert!(matches!(&err, BlockError::Open { path, .. } if *path == missing));
    assert!(err.to_string().contains(&missing.display().to_string()));
    assert_eq!(blk.backing_path(), Some(file.path()));
    assert_eq!(blk.serial(), "serial-0");
}

#[test]
fn swap_syncs_and_replaces_serial() {
    let mem = memory();
    let (mut blk, first) = block_with_disk();
    assert_eq!(write_request(&mut blk, &mem, 0, &[9; 512]), ok(1));
    let second = disk_file(DISK_LEN);
    blk.swap(Some(Backing {
        path: second.path().to_owned(),
        read_only: false,
        serial: Some("a-very-long-serial-number-beyond-20".into()),
    }))
    .unwrap();
    assert_eq!(file_bytes(&first, 0, 512), vec![9; 512]);
    assert_eq!(get_id(&mut blk, &mem), ok(21));
    assert_eq!(guest_bytes(&mem, DATA, 20), b"a-very-long-serial-n");
}

fn get_id(blk: &mut Block, mem: &GuestMemory) -> Option<Used> {
    write_header(mem, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    run(
        blk,
        mem,
        &[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)],
    )
}

fn flush_request(blk: &mut Block, mem: &GuestMemory) -> Option<Used> {
    write_header(mem, VIRTIO_BLK_T_FLUSH, 0);
    run(blk, mem, &[desc(HDR, 16, R), desc(STATUS, 1, W)])
}

#[test]
fn get_id_returns_padded_serial() {
    let mem = memory();
    let (mut blk, _file) = block_with_disk();
    assert_eq!(get_id(&mut blk, &mem), ok(21));
    assert_eq!(
        guest_bytes(&mem, DATA, 20),
        b"serial-0\0\0\0\0\0\0\0\0\0\0\0\0"
    );
    // A short buffer gets what fits.
    write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let descs = [desc(HDR, 16, R), desc(DATA2, 4, W), desc(STATUS, 1, W)];
    assert_eq!(run(&mut blk, &mem, &descs), ok(5));
    assert_eq!(guest_bytes(&mem, DATA2, 4), b"seri");
}

#[test]
fn flush_succeeds() {
    let mem = memory();
    let (mut blk, _file) = block_with_disk();
    assert_eq!(write_request(&mut blk, &mem, 0, &[1; 512]), ok(1));
    assert_eq!(flush_request(&mut blk, &mem), ok(1));
    blk.flush().unwrap();
    // Flush carries no data.
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let descs = [desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)];
    assert_eq!(run(&mut blk, &mem, &descs), ioerr());
}

fn discard_request(
    blk: &mut Block,
    mem: &GuestMemory,
    request_type: u32,
    sector: u64,
    num_sectors: u32,
    flags: u32,
) -> Option<Used> {
    write_header(mem, request_type, 0);
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    run(
        blk,
        mem,
        &[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
    )
}

fn filled_disk() -> (Block, NamedTempFile) {
    let (blk, mut file) = block_with_disk();
    file.write_all(&vec![0xab; DISK_LEN as usize]).unwrap();
    file.as_file().sync_all().unwrap();
    (blk, file)
}

#[test]
fn discard_punches_a_hole() {
    let mem = memory();
    let (mut blk, file) = filled_disk();
    let before = file.as_file().metadata().unwrap().blocks();
    // 256 KiB from 128 KiB.
    let r = discard_request(&mut blk, &mem, VIRTIO_BLK_T_DISCARD, 256, 512, 0);
    assert_eq!(r, ok(1));
    let after = file.as_file().metadata().unwrap().blocks();
    assert!(
        after + 256 * 1024 / 512 <= before,
        "{before} -> {after} blocks"
    );
    assert_eq!(file.as_file().metadata().unwrap().len(), DISK_LEN);

    assert_eq!(
        read_request(&mut blk, &mem, 256, 512 * 512),
        ok(512 * 512 + 1)
    );
    assert!(guest_bytes(&mem, DATA2, 512 * 512).iter().all(|&b| b == 0));
    assert_eq!(file_bytes(&file, 255 * 512, 512), vec![0xab; 512]);
    assert_eq!(file_bytes(&file, 768 * 512, 512), vec![0xab; 512]);
}

#[test]
fn write_zeroes_zeroes_with_or_without_unmap() {
    let mem = memory();
    let (mut blk, file) = filled_disk();
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let r = discard_request(&mut blk, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, unmap);
    assert_eq!(r, ok(1));
    let r = discard_request(&mut blk, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 32, 3, 0);
    assert_eq!(r, ok(1));
    assert_eq!(file_bytes(&file, 8 * 512, 4096), vec![0; 4096]);
    assert_eq!(file_bytes(&file, 32 * 512, 3 * 512), vec![0; 3 * 512]);
    assert_eq!(file_bytes(&file, 16 * 512, 512), vec![0xab; 512]);
    assert_eq!(file_bytes(&file, 35 * 512, 512), vec![0xab; 512]);
}

#[test]
fn discard_validation() {
    let mem = memory();
    let (mut blk, file) = filled_disk();
    let t = VIRTIO_BLK_T_DISCARD;
    let last = DISK_LEN / 512;
    // Beyond the end, too large, unknown flags, UNMAP on a discard.
    assert_eq!(discard_request(&mut blk, &mem, t, last - 4, 8, 0), ioerr());
    assert_eq!(discard_request(&mut blk, &mem, t, u64::MAX, 8, 0), ioerr());
    assert_eq!(
        discard_request(&mut blk, &mem, t, 0, MAX_DISCARD_SECTORS + 1, 0),
        ioerr()
    );
    assert_eq!(discard_request(&mut blk, &mem, t, 0, 8, 1), unsupp());
    let wz = VIRTIO_BLK_T_WRITE_ZEROES;
    assert_eq!(discard_request(&mut blk, &mem, wz, 0, 8, 2), unsupp());
    assert_eq!(file_bytes(&file, 0, 4096), vec![0xab; 4096]);

    // Two segments are more than max_discard_seg; half a segment is malformed.
    write_header(&mem, t, 0);
    let descs = [desc(HDR, 16, R), desc(DATA, 32, R), desc(STATUS, 1, W)];
    assert_eq!(run(&mut blk, &mem, &descs), unsupp());
    let descs = [desc(HDR, 16, R), desc(DATA, 8, R), desc(STATUS, 1, W)];
    assert_eq!(run(&mut blk, &mem, &descs), ioerr());

    // Not negotiated: unsupported.
    blk.activate(1 << VIRTIO_BLK_F_FLUSH);
    assert_eq!(discard_request(&mut blk, &mem, t, 0, 8, 0), unsupp());
    assert_eq!(file_bytes(&file, 0, 4096), vec![0xab; 4096]);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let mem = memory();
    let (mut blk, _file) = block_with_disk();
    write_header(&mem, 0x7777, 0);
    let descs = [desc(HDR, 16, R), desc(STATUS, 1, W)];
    assert_eq!(run(&mut blk, &mem, &descs), unsupp());
}

#[test]
fn malformed_chains_get_ioerr() {
    let mem = memory();
    let (mut blk, file) = block_with_disk();
    write_header(&mem, VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    let cases: &[&[Descriptor]] = &[
        // Header too short.
        &[desc(HDR, 8, R), desc(STATUS, 1, W)],
        // Header device-writable.
        &[desc(HDR, 16, W), desc(DATA, 512, W), desc(STATUS, 1, W)],
        // No data.
        &[desc(HDR, 16, R), desc(STATUS, 1, W)],
        // Data not whole sectors.
        &[desc(HDR, 16, R), desc(DATA, 500, R), desc(STATUS, 1, W)],
        // Write with device-writable data.
        &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
        // Readable after writable.
        &[
            desc(HDR, 16, R),
            desc(STATUS - 1, 1, W),
            desc(DATA, 512, R),
            desc(STATUS, 1, W),
        ],
        // Data outside guest memory, or wrapping around the address space.
        &[
            desc(HDR, 16, R),
            desc(MEM_SIZE as u64, 512, R),
            desc(STATUS, 1, W),
        ],
        &[
            desc(HDR, 16, R),
            desc(u64::MAX - 10, 512, R),
            desc(STATUS, 1, W),
        ],
    ];
    for descs in cases {
        assert_eq!(run(&mut blk, &mem, descs), ioerr(), "{descs:?}");
    }
    // A read with device-readable data.
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    let descs = [desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)];
    assert_eq!(run(&mut blk, &mem, &descs), ioerr());
    assert_eq!(file_bytes(&file, 0, 512), vec![0; 512]);
}

#[test]
fn chains_without_status_are_returned_untouched() {
    let mem = memory();
    let (mut blk, file) = block_with_disk();
    write_header(&mem, VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    let cases: &[&[Descriptor]] = &[
        // Status descriptor device-readable.
        &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, R)],
        // Status of length zero.
        &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 0, W)],
        // Status outside guest memory.
        &[
            desc(HDR, 16, R),
            desc(DATA, 512, R),
            desc(MEM_SIZE as u64, 1, W),
        ],
        // Only a header.
        &[desc(HDR, 16, R)],
    ];
    for descs in cases {
        let used = run(&mut blk, &mem, descs);
        assert_eq!(
            used,
            Some(Used {
                len: 0,
                status: 0xee
            }),
            "{descs:?}"
        );
    }
    assert_eq!(file_bytes(&file, 0, 512), vec![0; 512]);
}

#[test]
fn unreadable_chains_do_not_panic() {
    let mem = memory();
    let (mut blk, _file) = block_with_disk();
    let mut ring = DriverRing::new(&mem, 0, 16);
    // An avail entry naming a descriptor beyond the table, and a chain looping on
    // itself.
    let looping = Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 0);
    ring.write_desc(&mem, 0, looping);
    ring.publish(&mem, 100);
    ring.publish(&mem, 0);
    blk.process_queue(0, &mut Queues::new(vec![Some(&mut ring.queue)]), &mem);
    // The looping chain ends at the queue size and has no status: returned with 0.
    assert_eq!(ring.used_idx(&mem), 1);
    assert_eq!(ring.used_elem(&mem, 0).1, 0);

    // An available index running ahead of the queue size is refused.
    ring.set_avail_idx(&mem, 500);
    let queue = &mut ring.queue;
    assert!(!blk.process_queue(0, &mut Queues::new(vec![Some(&mut *queue)]), &mem));
    // Only queue 0 exists.
    assert!(!blk.process_queue(1, &mut Queues::new(vec![Some(queue)]), &mem));
}

#[test]
fn config_space_layout() {
    let (blk, _file) = block_with_disk();
    let mut c = [0u8; CONFIG_LEN];
    blk.read_config(0, &mut c);
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(c[..8].try_into().unwrap()),
        DISK_LEN / 512
    );
    assert_eq!(u32_at(12), 254);
    assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
    assert_eq!(u32_at(40), 1);
    assert_eq!(u32_at(44), 8);
    assert_eq!(u32_at(48), MAX_DISCARD_SECTORS);
    assert_eq!(u32_at(52), 1);
    assert_eq!(c[56], 1);
    // Narrow and out-of-range reads.
    let mut b = [0xffu8; 4];
    blk.read_config(12, &mut b[..1]);
    assert_eq!(b, [254, 0xff, 0xff, 0xff]);
    blk.read_config(58, &mut b);
    assert_eq!(b, [0; 4]);
    blk.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn features() {
    let rw = Block::new(false, "");
    let f = rw.device_features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(rw.device_type(), 2);
    assert_eq!(rw.queue_max_sizes(), &[256]);
}

#[test]
fn parse_request_framing() {
    let mem = memory();
    write_header(&mem, VIRTIO_BLK_T_IN, 42);
    let descs = [
        desc(HDR, 10, R),
        desc(HDR + 10, 6, R),
        desc(DATA, 1024, W),
        desc(STATUS, 1, W),
    ];
    let req = parse_request(&descs, &mem).unwrap();
    assert_eq!(req.kind, RequestKind::In);
    assert_eq!(req.sector, 42);
    assert_eq!(req.data_len, 1024);
    assert_eq!(req.status, GuestAddress(STATUS));
    assert_eq!(parse_request(&[], &mem), Err(RequestError::EmptyChain));
    // Without a separate status descriptor, the data's last byte becomes the status.
    assert_eq!(
        parse_request(&descs[..3], &mem),
        Err(RequestError::UnalignedLength(1023))
    );
}

/// A cheap stand-in for the fuzz target: random chains near and across the end of
/// guest memory must never panic, and what is accepted must lie in guest memory.
#[test]
fn parse_request_survives_random_chains() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut accepted = 0;
    for _ in 0..20_000 {
        let fill = next();
        for i in 0..8u64 {
            mem.write_obj(fill.rotate_left(i as u32 * 8), GuestAddress(i * 8))
                .unwrap();
        }
        // Request types 0..16 at the header most chains start with.
        mem.write_obj((next() % 16) as u32, GuestAddress(0))
            .unwrap();
        let count = (next() % 6) as usize;
        let descs: Vec<Descriptor> = (0..count)
            .map(|i| {
                let r = next();
                if i == 0 && r % 2 == 0 {
                    return Descriptor::new(0, 16, 0, 0);
                }
                let addr = match r % 8 {
                    0 => r,
                    1 => 0x4000 - (r >> 8) % 32,
                    2 => 0,
                    _ => (r >> 8) % 0x4800,
                };
                let len = match (r >> 40) % 6 {
                    0 => u32::MAX,
                    1 => 1,
                    2 => 16,
                    3 => 512,
                    _ => ((r >> 48) % 0x1000) as u32,
                };
                desc(addr, len, (r >> 36) % 2 != 0)
            })
            .collect();
        let status = status_address(&descs, &mem);
        if let Ok(req) = parse_request(&descs, &mem) {
            accepted += 1;
            assert_eq!(Some(req.status), status);
            for seg in &req.data {
                assert!(mem.check_range(seg.addr, seg.len as usize, Permissions::Read));
            }
            assert_eq!(req.data_len, total_len(&req.data));
        }
    }
    assert!(accepted > 500, "only {accepted} chains accepted");
}
