//! virtio-balloon (device 5) for free page reporting only (virtio 1.2 §5.5,
//! `VIRTIO_BALLOON_F_REPORTING`).
//!
//! A Linux guest with `page_reporting` hands back blocks of memory it has freed (2 MiB or
//! larger, about two seconds after they became free); the VMM drops its copies with
//! `MADV_DONTNEED`, so memory a guest used once — the initramfs it unpacked and copied,
//! boot-time allocations — stops costing the host. Pages the guest allocates again fault
//! back in zero-filled. The balloon itself never inflates: its target (`num_pages`)
//! stays 0, so a guest is never asked to give up memory it may need.
//!
//! Reported ranges are guest input: each one is clipped to whole host pages and must lie
//! inside one guest memory region, else it is ignored (logged, rate-limited). A guest
//! can only ever discard its own memory.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend as _};

use crate::devices::guest_warn::{guest_warn, WarnLimiter};
use crate::devices::virtio::{read_config_bytes, Queues, VirtioDevice};
use crate::devices::GuestMemory;

/// Virtio device ID of the balloon.
pub const DEVICE_ID: u32 = 5;
/// The feature bit for free page reporting.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;
/// Queue 0 inflate, 1 deflate, 2 reporting (its index with STATS_VQ and FREE_PAGE_HINT
/// not offered). Linux sends at most 32 ranges per report.
const QUEUE_SIZES: [u16; 3] = [32, 32, 32];
pub const REPORTING_QUEUE: usize = 2;
/// `struct virtio_balloon_config`: num_pages, actual, free_page_hint_cmd_id, poison_val.
const CONFIG_LEN: usize = 16;
const ACTUAL_OFFSET: u64 = 4;
/// The host page size the discards are clipped to.
const PAGE: u64 = 4096;

/// A guest range the VMM may discard: whole pages inside one memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub addr: GuestAddress,
    pub len: u64,
}

/// The ranges a reporting chain hands back, clipped to whole pages; descriptors outside
/// guest memory, crossing a region boundary, or smaller than a page after clipping are
/// left out (and counted in the second value).
pub fn reported_ranges(descs: &[Descriptor], mem: &GuestMemory) -> (Vec<Range>, usize) {
    let mut ranges = Vec::new();
    let mut rejected = 0;
    for d in descs {
        let start = d.addr().raw_value();
        let Some(end) = start.checked_add(u64::from(d.len())) else {
            rejected += 1;
            continue;
        };
        let Some(first) = start.checked_next_multiple_of(PAGE) else {
            rejected += 1;
            continue;
        };
        let last = end - end % PAGE;
        if last <= first {
            rejected += 1;
            continue;
        }
        let range = Range {
            addr: GuestAddress(first),
            len: last - first,
        };
        let inside = usize::try_from(range.len)
            .ok()
            .is_some_and(|len| mem.get_slice(range.addr, len).is_ok());
        if inside {
            ranges.push(range);
        } else {
            rejected += 1;
        }
    }
    (ranges, rejected)
}

/// Drops the host's copy of `range`; true if the kernel took it.
fn discard(mem: &GuestMemory, range: Range) -> bool {
    let Ok(len) = usize::try_from(range.len) else {
        return false;
    };
    let Ok(slice) = mem.get_slice(range.addr, len) else {
        return false;
    };
    let ptr = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `ptr..ptr + len` is one mapped guest memory region (get_slice checked it),
    // page aligned (the range is clipped to whole pages and regions start page aligned).
    // MADV_DONTNEED on this private mapping only makes those pages read back as zeros
    // (or the file's bytes for copy-on-write kernel segments): no Rust reference into
    // guest memory assumes their contents, and the guest gave them up.
    unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) == 0 }
}

/// The free-page-reporting balloon.
pub struct Balloon {
    acked_features: u64,
    /// `actual` as the driver last wrote it (pages it believes are in the balloon).
    actual: u32,
    reported_bytes: u64,
    reports: u64,
    warn: WarnLimiter,
}

impl Default for Balloon {
    fn default() -> Self {
        Self::new()
    }
}

impl Balloon {
    pub fn new() -> Self {
        Balloon {
            acked_features: 0,
            actual: 0,
            reported_bytes: 0,
            reports: 0,
            warn: WarnLimiter::default(),
        }
    }

    /// Bytes of guest memory handed back so far (the same page may count again after the
    /// guest used and freed it once more).
    pub fn reported_bytes(&self) -> u64 {
        self.reported_bytes
    }

    /// Report requests (chains) handled so far.
    pub fn reports(&self) -> u64 {
        self.reports
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[4..8].copy_from_slice(&self.actual.to_le_bytes());
        c
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_BALLOON_F_REPORTING
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write.
        if offset == ACTUAL_OFFSET && data.len() == 4 {
            let mut b = [0u8; 4];
            b.copy_from_slice(data);
            self.actual = u32::from_le_bytes(b);
        } else {
            guest_warn!(
                self.warn,
                offset,
                len = data.len(),
                "virtio-balloon: config write ignored"
            );
        }
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
        tracing::debug!(
            reporting = acked_features & VIRTIO_BALLOON_F_REPORTING != 0,
            "virtio-balloon: active"
        );
    }

    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>, mem: &GuestMemory) -> bool {
        let Some(queue) = queues.get(index) else {
            guest_warn!(
                self.warn,
                index,
                "virtio-balloon: notify for a missing queue"
            );
            return false;
        };
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(iter) => iter.collect(),
            Err(e) => {
                guest_warn!(self.warn, error = %e, "virtio-balloon: cannot read the available ring");
                return false;
            }
        };
        let mut used = false;
        for chain in chains {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            if index == REPORTING_QUEUE {
                let (ranges, rejected) = reported_ranges(&descs, mem);
                if rejected > 0 {
                    guest_warn!(
                        self.warn,
                        rejected,
                        "virtio-balloon: reported ranges outside guest memory ignored"
                    );
                }
                for r in ranges {
                    if discard(mem, r) {
                        self.reported_bytes += r.len;
                    } else {
                        guest_warn!(
                            self.warn,
                            addr = r.addr.raw_value(),
                            len = r.len,
                            "virtio-balloon: madvise refused"
                        );
                    }
                }
                self.reports += 1;
            } else {
                // Inflate/deflate: the target is 0, so a driver has nothing to put in;
                // page numbers it sends anyway are returned unread.
                guest_warn!(
                    self.warn,
                    index,
                    "virtio-balloon: inflate/deflate without a target ignored"
                );
            }
            match queue.add_used(mem, head, 0) {
                Ok(()) => used = true,
                Err(e) => {
                    guest_warn!(self.warn, head, error = %e, "virtio-balloon: cannot return a chain")
                }
            }
        }
        used
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.actual = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use vm_memory::Bytes;

    use crate::devices::virtio::test_ring::{self, DriverRing};

    const MEM_SIZE: usize = 0x40_0000;

    fn memory() -> GuestMemory {
        test_ring::memory(MEM_SIZE)
    }

    /// A device-writable descriptor: how the guest hands over reported pages.
    fn desc(addr: u64, len: u32) -> Descriptor {
        test_ring::desc(addr, len, true)
    }

    #[test]
    fn ranges_are_clipped_to_pages_inside_memory() {
        let mem = memory();
        let (r, rejected) = reported_ranges(
            &[
                desc(0x20_0000, 0x20_0000),
                // Unaligned: only the whole page in the middle.
                desc(0x1_0800, 0x1800),
                // Less than a page once clipped.
                desc(0x3_0100, 0xf00),
                // Past the end of memory, and overflowing.
                desc(MEM_SIZE as u64 - 0x1000, 0x2000),
                desc(u64::MAX - 0xfff, 0x1000),
            ],
            &mem,
        );
        assert_eq!(
            r,
            [
                Range {
                    addr: GuestAddress(0x20_0000),
                    len: 0x20_0000
                },
                Range {
                    addr: GuestAddress(0x1_1000),
                    len: 0x1000
                }
            ]
        );
        assert_eq!(rejected, 3);
    }

    #[test]
    fn a_report_discards_the_pages_and_returns_the_chain() {
        let mem = memory();
        let data = 0x10_0000u64;
        mem.write_slice(&[0xaa; 0x3000], GuestAddress(data))
            .unwrap();
        let mut ring = DriverRing::new(&mem, 0, 16);
        ring.post(&mem, &[(data, 0x2000, true)]);
        let queue = &mut ring.queue;
        let mut dev = Balloon::new();
        dev.activate(VIRTIO_BALLOON_F_REPORTING);
        let mut queues = Queues::new(vec![None, None, Some(&mut *queue)]);
        assert!(dev.process_queue(REPORTING_QUEUE, &mut queues, &mem));
        assert_eq!(dev.reported_bytes(), 0x2000);
        assert_eq!(dev.reports(), 1);
        let mut back = [0u8; 0x3000];
        mem.read_slice(&mut back, GuestAddress(data)).unwrap();
        assert!(
            back[..0x2000].iter().all(|&b| b == 0),
            "reported pages kept"
        );
        assert!(
            back[0x2000..].iter().all(|&b| b == 0xaa),
            "a neighbour was dropped"
        );
        assert_eq!(queue.next_used(), 1);
    }

    #[test]
    fn inflate_without_target_is_returned_untouched() {
        let mem = memory();
        let pfn_buf = 0x8000u64;
        // A page number the balloon never asked for: nothing may be discarded.
        mem.write_obj(0x100u32, GuestAddress(pfn_buf)).unwrap();
        mem.write_slice(&[0x55; 0x1000], GuestAddress(0x10_0000))
            .unwrap();
        let mut ring = DriverRing::new(&mem, 0, 16);
        ring.post(&mem, &[(pfn_buf, 4, false)]);
        let mut dev = Balloon::new();
        let mut queues = Queues::new(vec![Some(&mut ring.queue)]);
        assert!(dev.process_queue(0, &mut queues, &mem));
        assert_eq!(dev.reported_bytes(), 0);
        let mut back = [0u8; 0x1000];
        mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert!(back.iter().all(|&b| b == 0x55));
    }

    #[test]
    fn config_has_zero_target_and_keeps_actual() {
        let mut dev = Balloon::new();
        let mut num_pages = [0xffu8; 4];
        dev.read_config(0, &mut num_pages);
        assert_eq!(num_pages, [0; 4]);
        dev.write_config(ACTUAL_OFFSET, &7u32.to_le_bytes());
        dev.write_config(0, &9u32.to_le_bytes()); // num_pages is the device's
        let mut c = [0u8; CONFIG_LEN];
        dev.read_config(0, &mut c);
        assert_eq!(&c[0..4], &[0; 4]);
        assert_eq!(&c[4..8], &7u32.to_le_bytes());
        dev.reset();
        dev.read_config(ACTUAL_OFFSET, &mut num_pages);
        assert_eq!(num_pages, [0; 4]);
    }
}
