//! Whole devices driven the way a guest and the host drive them: register sequences
//! on the virtio-mmio transport, block requests executed against a file, virtio-net
//! receive with merged buffers, the vsock connection and credit state machine, and
//! the serial port. Each checks what must hold whatever the guest does.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use cocoon_vmm::devices::block::{Backing, Block};
use cocoon_vmm::devices::net::{Net, Tap, DEVICE_FEATURES, RX_QUEUE, TAP_TAG, TX_QUEUE};
use cocoon_vmm::devices::serial::SerialConsole;
use cocoon_vmm::devices::virtio::mmio::MmioTransport;
use cocoon_vmm::devices::virtio::{Queues, VirtioDevice};
use cocoon_vmm::devices::vsock::{
    host_port_path, Header, Vsock, HEADER_LEN, HOST_CID, MAX_CONNECTIONS, TYPE_STREAM,
};
use cocoon_vmm::devices::{GuestMemory, Irq, MmioDevice, PioDevice};
use cocoon_vmm::event_loop::Registrar;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::{memory, Input, Ring};

/// A scratch directory for this process: disk images and sockets.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cocoon-vmm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// A 1 MiB sparse disk image.
fn disk() -> Backing {
    let path = scratch().join("disk.img");
    if !path.exists() {
        let f = std::fs::File::create(&path).expect("disk image");
        f.set_len(1 << 20).expect("disk size");
    }
    Backing {
        path,
        read_only: false,
        serial: None,
    }
}

fn irq() -> (Irq, EventFd) {
    let fd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    (Irq::new(fd.try_clone().expect("eventfd clone")), fd)
}

/// Buffers live from here up: rings below it are never written by a device.
const DATA: u64 = 0x4000;

/// A buffer address: mostly in the data area, sometimes raw (then usually outside).
fn buf_addr(input: &mut Input<'_>, mem_size: u64) -> u64 {
    let raw = input.u64();
    if raw & 15 == 0 && raw >= mem_size {
        raw
    } else {
        DATA + (raw >> 4) % (mem_size - DATA + 0x100)
    }
}

/// A block request chain: header, data, status, each piece possibly malformed.
fn block_chain(input: &mut Input<'_>, mem: &GuestMemory, mem_size: u64) -> Vec<(u64, u32, bool)> {
    let kind = input.pick(&[0u32, 1, 4, 8, 11, 13, 0xff]);
    let sector = u64::from(input.u16() % 2100) | if input.u8() == 0 { 1 << 62 } else { 0 };
    let hdr = buf_addr(input, mem_size);
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    let _ = mem.write_slice(&raw, GuestAddress(hdr));
    let mut pieces = vec![(hdr, input.pick(&[16u32, 16, 8, 32]), input.u8() == 1)];
    for _ in 0..input.below(3) {
        let len = input.pick(&[512u32, 1024, 4096, 16, 500, 0]);
        if len == 16 {
            // A discard / write-zeroes segment.
            let seg_at = buf_addr(input, mem_size);
            let mut seg = [0u8; 16];
            seg[..8].copy_from_slice(&u64::from(input.u16() % 2100).to_le_bytes());
            seg[8..12].copy_from_slice(&u32::from(input.u16()).to_le_bytes());
            seg[12..].copy_from_slice(&u32::from(input.u8() % 3).to_le_bytes());
            let _ = mem.write_slice(&seg, GuestAddress(seg_at));
            pieces.push((seg_at, 16, false));
        } else {
            pieces.push((buf_addr(input, mem_size), len, input.bool()));
        }
    }
    if input.u8() != 7 {
        pieces.push((buf_addr(input, mem_size), 1, true));
    }
    pieces
}

/// virtio-mmio registers, by offset.
const REGS: [u64; 22] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4,
];

/// Register sequences on the transport (over a block device with a disk): feature
/// negotiation, queue set-up, notifications with and without event indexes, resets.
pub fn mmio(data: &[u8]) {
    const MEM: usize = 0x1_0000;
    let mut input = Input::new(data);
    let mem = memory(MEM, &[]);
    let mut blk = Block::new(input.u8() == 1, "fuzz");
    if input.u8() != 1 {
        blk.swap(Some(disk())).expect("disk");
    }
    let (irq, _irq_fd) = irq();
    let mut t = MmioTransport::new(blk, mem.clone(), irq);
    let Some(mut ring) = Ring::new(&mem, 0, 16) else {
        return;
    };
    let write =
        |t: &mut MmioTransport<Block>, off: u64, v: u32| t.mmio_write(off, &v.to_le_bytes());
    let read = |t: &mut MmioTransport<Block>, off: u64| {
        let mut b = [0u8; 4];
        t.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    };
    for _ in 0..128 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 11 {
            0 => {
                let off = input.pick(&REGS);
                let v = match input.u8() % 4 {
                    0 => input.u32(),
                    1 => input.pick(&[0u32, 1, 2, 3, 7, 8, 11, 15, 16, 0x80, 0xff, u32::MAX]),
                    2 => input.pick(&[ring.desc as u32, ring.avail as u32, ring.used as u32]),
                    _ => 1 << input.below(32),
                };
                write(&mut t, off, v);
            }
            1 => {
                let off = if input.bool() {
                    input.pick(&REGS)
                } else {
                    u64::from(input.u16() % 0x140)
                };
                let mut buf = [0u8; 8];
                let width = input.pick(&[1usize, 2, 4, 4, 8]);
                t.mmio_read(off, &mut buf[..width]);
            }
            2 => {
                // A driver's whole start-up, so that the rest starts from a live device.
                write(&mut t, 0x070, 0);
                write(&mut t, 0x070, 1);
                write(&mut t, 0x070, 3);
                let features = input.u64() | (1 << 32);
                for sel in 0..2u32 {
                    write(&mut t, 0x024, sel);
                    write(&mut t, 0x020, (features >> (32 * sel)) as u32);
                }
                write(&mut t, 0x070, 11);
                write(&mut t, 0x030, 0);
                write(&mut t, 0x038, input.pick(&[16u32, 16, 8, 3, 0]));
                for (reg, addr) in [(0x080, ring.desc), (0x090, ring.avail), (0x0a0, ring.used)] {
                    write(&mut t, reg, addr as u32);
                    write(&mut t, reg + 4, 0);
                }
                write(&mut t, 0x044, 1);
                write(&mut t, 0x070, 15);
            }
            3 => {
                let pieces = block_chain(&mut input, &mem, MEM as u64);
                ring.post(&mem, &pieces);
            }
            4 => ring.set_used_event(&mem, input.u16()),
            5 => {
                let v = input.pick(&[0u32, 0, 0, 1, u32::MAX]);
                write(&mut t, 0x050, v);
            }
            6 => {
                let v = input.u32();
                write(&mut t, 0x064, v);
            }
            7 => write(&mut t, 0x070, 0),
            8 => {
                let off = 0x100 + u64::from(input.u8());
                let mut buf = [0u8; 8];
                let width = input.pick(&[1usize, 2, 4, 8]);
                if input.bool() {
                    t.mmio_write(off, &buf[..width]);
                } else {
                    t.mmio_read(off, &mut buf[..width]);
                }
            }
            9 => {
                // The driver breaks its ring: an index running ahead, a head off the table.
                if input.bool() {
                    ring.set_avail_idx(&mem, input.u16());
                } else {
                    ring.publish(&mem, input.u16());
                }
            }
            _ => {
                let swap = if input.bool() { Some(disk()) } else { None };
                if t.device_mut().swap(swap).is_ok() {
                    t.config_changed();
                }
            }
        }
        assert_eq!(read(&mut t, 0x000), 0x7472_6976);
        assert_eq!(read(&mut t, 0x060) & !3, 0, "only the two interrupt bits");
    }
    write(&mut t, 0x070, 0);
    assert_eq!(read(&mut t, 0x070), 0);
    assert_eq!(read(&mut t, 0x044), 0);
}

/// Block requests executed against the disk: each chain comes back with a used length
/// within what it holds, and a status byte where one was written.
pub fn block_exec(data: &[u8]) {
    const MEM: usize = 0x2_0000;
    let mut input = Input::new(data);
    let mem = memory(MEM, &[]);
    let mut blk = Block::new(input.u8() == 1, "fuzz-serial-0123456789");
    if input.u8() != 1 {
        blk.swap(Some(disk())).expect("disk");
    }
    blk.activate(blk.device_features() & u64::from(input.u32() | 0xffff_0000));
    let Some(mut ring) = Ring::new(&mem, 0, 64) else {
        return;
    };
    let mut posted: HashMap<u32, u64> = HashMap::new();
    let mut seen = 0u16;
    for _ in 0..32 {
        if input.is_empty() {
            break;
        }
        for _ in 0..=input.below(3) {
            let pieces = block_chain(&mut input, &mem, MEM as u64);
            let writable: u64 = pieces.iter().filter(|p| p.2).map(|p| u64::from(p.1)).sum();
            let head = ring.post(&mem, &pieces);
            posted.insert(u32::from(head), writable);
        }
        blk.process_queue(0, &mut Queues::new(vec![Some(&mut ring.queue)]), &mem);
        while seen != ring.used_idx(&mem) {
            let (id, len) = ring.used_elem(&mem, seen);
            seen = seen.wrapping_add(1);
            let writable = posted
                .remove(&id)
                .expect("the device used a chain it was given");
            assert!(
                u64::from(len) <= writable,
                "used {len} of {writable} writable bytes"
            );
        }
    }
}

/// Counts what the UART sends.
struct Sink(Arc<AtomicUsize>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(buf.len(), Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Port accesses to COM1, any offset and width.
pub fn serial(data: &[u8]) {
    let mut input = Input::new(data);
    let out = Arc::new(AtomicUsize::new(0));
    let (irq, _fd) = irq();
    let mut uart = SerialConsole::new(irq, Box::new(Sink(out.clone())));
    let mut writes = 0;
    while !input.is_empty() {
        let offset = if input.u8() < 240 {
            u16::from(input.u8() % 8)
        } else {
            input.u16()
        };
        let width = input.pick(&[1usize, 1, 1, 2, 4]);
        let mut buf = [input.u8(); 4];
        if input.bool() {
            writes += 1;
            uart.pio_write(offset, &buf[..width]);
        } else {
            uart.pio_read(offset, &mut buf[..width]);
            if width != 1 {
                assert!(buf[..width].iter().all(|&b| b == 0xff));
            }
        }
        assert!(out.load(Ordering::Relaxed) <= writes);
    }
}

/// virtio-net receive (and some transmit) over a socket standing in for the TAP: the
/// guest's buffers come and go, frames of every size arrive, with or without merged
/// receive buffers. Every used buffer holds at most its capacity, and the first buffer
/// of a frame says how many it spans.
pub fn net_rx(data: &[u8]) {
    // A slot per receive buffer, larger than the largest buffer (65562 bytes) and never
    // handed out again while its chain is outstanding: frames never overwrite each other.
    const SLOTS: u64 = 128;
    const SLOT: u64 = 0x1_1000;
    const MEM: usize = (DATA + SLOTS * SLOT) as usize;
    const MRG_RXBUF: u64 = 1 << 15;
    let mut input = Input::new(data);
    let mem = memory(MEM, &[]);
    let Ok((ours, peer)) = UnixDatagram::pair() else {
        return;
    };
    let _ = peer.set_nonblocking(true);
    let Ok(tap) = Tap::from_socket_for_tests(ours, "fuzz") else {
        return;
    };
    let Ok(registrar) = Registrar::detached() else {
        return;
    };
    let Ok(mut net) = Net::new(tap, [2, 0, 0, 0, 0, 1], registrar) else {
        return;
    };
    let mut features = (1 << 32) | DEVICE_FEATURES;
    if input.u8() == 0 {
        features &= u64::from(input.u32()) | (1 << 32);
    }
    let mrg = features & MRG_RXBUF != 0;
    net.activate(features);
    let (Some(mut rx), Some(mut tx)) = (Ring::new(&mem, 0, 128), Ring::new(&mem, 0x2000, 16))
    else {
        return;
    };
    // By head: the chain's capacity, its pieces (the header may span several) and the
    // slots it holds.
    type Posted = (u64, Vec<(u64, u32)>, Vec<u64>);
    let mut capacity: HashMap<u32, Posted> = HashMap::new();
    let mut seen = 0u16;
    let mut free_slots: Vec<u64> = (0..SLOTS).rev().collect();
    let mut frame = vec![0u8; 70_000];
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let used = match input.u8() % 8 {
            0 => {
                let len = match input.u8() % 6 {
                    0 => input.pick(&[0usize, 5, 12, 13, 60, 1514, 9000, 65562, 65563]),
                    1 => input.below(70_000),
                    _ => 12 + input.below(4096),
                };
                frame[..12].copy_from_slice(&input.bytes::<12>());
                let _ = peer.send(&frame[..len]);
                false
            }
            1 | 2 => {
                let outstanding = rx.avail_idx(&mem).wrapping_sub(rx.used_idx(&mem));
                for _ in 0..=input.below(4) {
                    if outstanding > 32 {
                        break;
                    }
                    if free_slots.len() < 2 {
                        break;
                    }
                    let mut pieces = Vec::new();
                    let mut slots = Vec::new();
                    for _ in 0..=input.below(2) {
                        let len = input.pick(&[12u32, 100, 1526, 4096, 4096, 65562]);
                        let len = if input.u8() == 0 {
                            input.u32() % 0x1_0000
                        } else {
                            len
                        };
                        let (at, len) = if input.u8() == 0 {
                            // Across the end of memory: always longer than what is left,
                            // so the chain is refused and never holds a frame (two such
                            // buffers would overlap).
                            (MEM as u64 - 0x100 + u64::from(input.u8()), len.max(0x101))
                        } else {
                            let Some(slot) = free_slots.pop() else {
                                break;
                            };
                            slots.push(slot);
                            (DATA + slot * SLOT, len)
                        };
                        pieces.push((at, len, input.u8() != 0));
                    }
                    let cap = pieces.iter().filter(|p| p.2).map(|p| u64::from(p.1)).sum();
                    let spans = pieces.iter().map(|p| (p.0, p.1)).collect();
                    let head = rx.post(&mem, &pieces);
                    capacity.insert(u32::from(head), (cap, spans, slots));
                }
                false
            }
            3 => {
                let mut queues = Queues::new(vec![Some(&mut rx.queue), Some(&mut tx.queue)]);
                net.process_queue(RX_QUEUE, &mut queues, &mem)
            }
            4 => {
                let events = input.pick(&[
                    EventSet::IN,
                    EventSet::IN,
                    EventSet::OUT,
                    EventSet::IN | EventSet::OUT,
                    EventSet::HANG_UP,
                ]);
                let mut queues = Queues::new(vec![Some(&mut rx.queue), Some(&mut tx.queue)]);
                net.backend_event(TAP_TAG, events, &mut queues, &mem)
            }
            5 => {
                let at = buf_addr(&mut input, MEM as u64);
                let len = 12 + input.below(2000) as u32;
                tx.post(&mem, &[(at, len, false)]);
                let mut queues = Queues::new(vec![Some(&mut rx.queue), Some(&mut tx.queue)]);
                let used = net.process_queue(TX_QUEUE, &mut queues, &mem);
                let mut sink = [0u8; 70_000];
                while peer.recv(&mut sink).is_ok() {}
                used
            }
            6 => {
                net.reset();
                net.activate(features);
                false
            }
            _ => {
                rx.set_used_event(&mem, input.u16());
                false
            }
        };
        let now = rx.used_idx(&mem);
        let _ = used;
        while seen != now {
            let (id, len) = rx.used_elem(&mem, seen);
            let (cap, spans, slots) = capacity
                .remove(&id)
                .expect("the device used a receive chain it was given");
            free_slots.extend(slots);
            assert!(u64::from(len) <= cap, "used {len} of {cap}");
            if len >= 12 {
                // A frame's first buffer: its header says how many buffers it took.
                let n = num_buffers(&mem, &spans);
                if !mrg {
                    assert_eq!(n, 1, "num_buffers without MRG_RXBUF");
                }
                assert!(n >= 1 && n <= rx.size, "num_buffers {n}");
                // The rest of the frame's buffers follow.
                for _ in 1..n {
                    seen = seen.wrapping_add(1);
                    if seen == now {
                        panic!("a frame's buffers were not all returned at once");
                    }
                    let (id, len) = rx.used_elem(&mem, seen);
                    let (cap, _, slots) = capacity.remove(&id).expect("chain given");
                    free_slots.extend(slots);
                    assert!(u64::from(len) <= cap);
                }
            }
            seen = seen.wrapping_add(1);
        }
    }
}

/// The `num_buffers` field of the net header at the start of a receive chain, which
/// may be spread over several of its pieces.
fn num_buffers(mem: &GuestMemory, spans: &[(u64, u32)]) -> u16 {
    let mut header = Vec::with_capacity(12);
    for &(addr, len) in spans {
        let take = (12 - header.len()).min(len as usize);
        let mut part = vec![0u8; take];
        if mem.read_slice(&mut part, GuestAddress(addr)).is_err() {
            return 1;
        }
        header.extend_from_slice(&part);
        if header.len() == 12 {
            return u16::from_le_bytes([header[10], header[11]]);
        }
    }
    1
}

/// The guest's side of a vsock packet: header and payload into a TX buffer.
fn guest_packet(input: &mut Input<'_>, mem: &GuestMemory, tx: &mut Ring, slot: u64) {
    let op = input.pick(&[1u16, 2, 3, 4, 5, 5, 5, 6, 7, 0, 9]);
    let payload = input.slice(256);
    let h = Header {
        src_cid: if input.u8() == 0 { 2 } else { 3 },
        dst_cid: if input.u8() == 0 { 7 } else { HOST_CID },
        src_port: input.pick(&[1024u32, 1025, 2000, u32::MAX]),
        dst_port: input.pick(&[1000u32, 1 << 30, (1 << 30) + 1, 1001]),
        len: if input.u8() == 0 {
            input.u32()
        } else if op == 5 {
            payload.len() as u32
        } else {
            0
        },
        socket_type: if input.u8() == 0 { 2 } else { TYPE_STREAM },
        op,
        flags: u32::from(input.u8() % 5),
        buf_alloc: input.pick(&[0u32, 1, 4096, 256 * 1024, u32::MAX]),
        fwd_cnt: input.pick(&[0u32, 100, 65536, u32::MAX]) ^ u32::from(input.u8()),
    };
    let at = 0x1_0000 + slot * 0x400;
    let mut bytes = h.to_bytes().to_vec();
    bytes.extend_from_slice(payload);
    let _ = mem.write_slice(&bytes, GuestAddress(at));
    let split = input.below(bytes.len());
    let pieces: Vec<(u64, u32, bool)> = if split == 0 {
        vec![(at, bytes.len() as u32, false)]
    } else {
        vec![
            (at, split as u32, false),
            (at + split as u64, (bytes.len() - split) as u32, false),
        ]
    };
    tx.post(mem, &pieces);
}

/// The vsock device's connection and credit state machine: guest packets of every kind
/// for a few ports, RX buffers, host peers connecting, writing, reading and closing,
/// and I/O-loop events for any tag.
pub fn vsock_conn(data: &[u8]) {
    const MEM: usize = 0x10_0000;
    static GUEST_PORT_LISTENER: OnceLock<UnixListener> = OnceLock::new();
    let mut input = Input::new(data);
    let uds = scratch().join("v.sock");
    // A host service for guest connections to port 1000.
    let listener = GUEST_PORT_LISTENER.get_or_init(|| {
        let path = host_port_path(&uds, 1000);
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).expect("guest port listener");
        l.set_nonblocking(true).expect("non-blocking");
        l
    });
    let Ok(registrar) = Registrar::detached() else {
        return;
    };
    let mut dev = Vsock::new(3, uds.clone(), registrar).expect("vsock device");
    let mem = memory(MEM, &[]);
    let (Some(mut rx), Some(mut tx)) = (Ring::new(&mem, 0, 128), Ring::new(&mem, 0x2000, 64))
    else {
        return;
    };
    dev.activate(0);
    let mut hosts: Vec<UnixStream> = Vec::new();
    let mut capacity: HashMap<u32, u64> = HashMap::new();
    let mut seen = 0u16;
    let mut slot = 0u64;
    for _ in 0..96 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 9 {
            0 | 1 => {
                for _ in 0..=input.below(3) {
                    guest_packet(&mut input, &mem, &mut tx, slot % 64);
                    slot += 1;
                }
                let mut queues = Queues::new(vec![Some(&mut rx.queue), Some(&mut tx.queue), None]);
                dev.process_queue(1, &mut queues, &mem);
            }
            2 => {
                let outstanding = rx.avail_idx(&mem).wrapping_sub(rx.used_idx(&mem));
                for _ in 0..=input.below(8) {
                    if outstanding > 64 {
                        break;
                    }
                    let len = input.pick(&[44u32, 60, 4140, 4140, 20, 1000]);
                    let at = 0x2_0000 + u64::from(rx.avail_idx(&mem) % 128) * 0x1100;
                    let head = rx.post(&mem, &[(at, len, input.u8() != 0)]);
                    capacity.insert(u32::from(head), u64::from(len));
                }
                let mut queues = Queues::new(vec![Some(&mut rx.queue), Some(&mut tx.queue), None]);
                dev.process_queue(0, &mut queues, &mem);
            }
            3 => {
                if hosts.len() < 8 {
                    if let Ok(mut s) = UnixStream::connect(&uds) {
                        let _ = s.set_nonblocking(true);
                        let line = match input.u8() % 4 {
                            0 => b"CONNECT 1024\n".to_vec(),
                            1 => b"CONNECT 1025\nearly".to_vec(),
                            2 => input.slice(70).to_vec(),
                            _ => Vec::new(),
                        };
                        let _ = s.write(&line);
                        hosts.push(s);
                    }
                }
            }
            4 => {
                if let Ok((s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(true);
                    hosts.push(s);
                }
            }
            5 => {
                if !hosts.is_empty() {
                    let i = input.below(hosts.len());
                    let bytes = input.slice(4096);
                    let _ = hosts[i].write(bytes);
                }
            }
            6 => {
                if !hosts.is_empty() {
                    let i = input.below(hosts.len());
                    match input.u8() % 3 {
                        0 => drop(hosts.swap_remove(i)),
                        1 => {
                            let _ = hosts[i].shutdown(std::net::Shutdown::Write);
                        }
                        _ => {
                            let mut buf = [0u8; 8192];
                            let _ = hosts[i].read(&mut buf);
                        }
                    }
                }
            }
            7 => {
                let tag = u32::from(input.u8() % 16);
                let events = input.pick(&[
                    EventSet::IN,
                    EventSet::IN,
                    EventSet::OUT,
                    EventSet::IN | EventSet::OUT,
                    EventSet::HANG_UP | EventSet::IN,
                    EventSet::ERROR,
                ]);
                let mut queues = Queues::new(vec![Some(&mut rx.queue), Some(&mut tx.queue), None]);
                dev.backend_event(tag, events, &mut queues, &mem);
            }
            _ => {
                dev.reset();
                dev.activate(0);
            }
        }
        assert!(dev.connection_count() <= MAX_CONNECTIONS);
        let now = rx.used_idx(&mem);
        while seen != now {
            let (id, len) = rx.used_elem(&mem, seen);
            seen = seen.wrapping_add(1);
            let cap = capacity
                .remove(&id)
                .expect("the device used an RX chain it was given");
            assert!(u64::from(len) <= cap, "used {len} of {cap}");
            if len > 0 {
                assert!(len as usize >= HEADER_LEN);
                let at = rx.desc + 16 * u64::from(id % u32::from(rx.size));
                let buf = mem.read_obj::<u64>(GuestAddress(at)).unwrap_or(0);
                let mut raw = [0u8; HEADER_LEN];
                let _ = mem.read_slice(&mut raw, GuestAddress(buf));
                let h = Header::from_bytes(&raw);
                assert_eq!(len as usize, HEADER_LEN + h.len as usize, "{h:?}");
                assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, 3));
            }
        }
    }
    dev.reset();
    assert_eq!(dev.connection_count(), 0);
}
