//! virtio-mmio transport, version 2 ("modern"), virtio 1.1 §4.2.2.
//!
//! `MmioTransport` owns the register state and the virtqueues and hands a `VirtioDevice`
//! only what it needs: its config space, activation with the negotiated features, and a
//! queue to drain when the driver notifies. Everything the guest writes here is hostile
//! input: bad values are logged and ignored, never trusted and never a panic.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{GuestMemory, Irq, MmioDevice};

/// "virt" in little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio layout.
pub const MMIO_VERSION: u32 = 2;
/// "COCO": our vendor ID, reported to the guest as is.
pub const VENDOR_ID: u32 = 0x434f_434f;
/// Device-specific configuration space starts here.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Bit 0 of InterruptStatus: the device used a buffer.
pub const INT_USED_BUFFER: u32 = 1;
/// Bit 1 of InterruptStatus: the configuration space changed.
pub const INT_CONFIG_CHANGE: u32 = 2;

const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// The offset of QueueNotify in the register window: where KVM_IOEVENTFD matches writes.
pub const QUEUE_NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;
/// Queue notifications that arrive through an eventfd (KVM_IOEVENTFD, see
/// [`MmioTransport::set_notify_fds`]) are registered with the I/O loop under the tag
/// `NOTIFY_TAG_BASE + queue index`; devices keep their own tags below this.
pub const NOTIFY_TAG_BASE: u32 = u32::MAX - MAX_NOTIFY_FDS as u32;
/// Queues that can have a notify eventfd.
pub const MAX_NOTIFY_FDS: usize = 64;
/// With event indexes, a processing pass is repeated while the driver added buffers it
/// was not told to notify about; past this many rounds on the I/O thread, the rest is
/// left for a later wake-up (a self-notify), so one busy queue cannot starve the others.
const MAX_ROUNDS: usize = 16;

/// Status bits are a byte; NEEDS_RESET is the device's to set, never the driver's.
const STATUS_DRIVER_BITS: u32 = 0xff & !VIRTIO_CONFIG_S_NEEDS_RESET;

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue, one entry per queue; each a power of two.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits, without VIRTIO_F_VERSION_1 (the transport adds it).
    fn device_features(&self) -> u64;
    /// Reads device config space at `offset`; bytes out of range read as zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with every ready queue valid.
    fn activate(&mut self, acked_features: u64);
    /// Drains queue `index` after the driver notified it; returns whether any buffer was
    /// used (the transport then interrupts the guest). `queues` holds every queue the
    /// driver made ready, so a device can answer on another queue.
    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>, mem: &GuestMemory) -> bool;
    /// A host fd the device registered with the I/O loop is ready (see
    /// `crate::event_loop`); returns whether any buffer was used. Only called once the
    /// device is activated.
    fn backend_event(
        &mut self,
        _tag: u32,
        _events: EventSet,
        _queues: &mut Queues<'_>,
        _mem: &GuestMemory,
    ) -> bool {
        false
    }
    /// The driver reset the device: forget negotiated state.
    fn reset(&mut self);
}

/// Copies `config` from `offset` into `data`; bytes past its end read as zeros.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..))
    else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

/// A device's view of its virtqueues: only those the driver made ready with a valid
/// configuration are reachable.
pub struct Queues<'a> {
    queues: Vec<Option<&'a mut Queue>>,
}

impl<'a> Queues<'a> {
    /// From queues by index (`None`: not ready). Tests build it directly.
    pub fn new(queues: Vec<Option<&'a mut Queue>>) -> Self {
        Queues { queues }
    }

    /// Queue `index`, if the driver made it ready.
    pub fn get(&mut self, index: usize) -> Option<&mut Queue> {
        self.queues.get_mut(index).and_then(|q| q.as_deref_mut())
    }
}

/// Caps guest-triggered warnings so a hostile guest cannot flood the log: at most
/// `PER_WINDOW` per second, then one summary line for what was dropped.
#[derive(Debug, Default)]
pub(crate) struct WarnLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl WarnLimiter {
    const PER_WINDOW: u32 = 20;
    const WINDOW: Duration = Duration::from_secs(1);

    /// Whether the next warning may be logged.
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        let expired = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= Self::WINDOW);
        if expired {
            if self.suppressed > 0 {
                warn!(
                    suppressed = self.suppressed,
                    "guest misbehaviour warnings suppressed"
                );
            }
            self.window_start = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < Self::PER_WINDOW {
            self.in_window += 1;
            true
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            false
        }
    }
}

/// `warn!` through a `WarnLimiter`, for anything the guest can trigger at will.
macro_rules! guest_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if $limiter.allow() {
            ::tracing::warn!($($arg)+);
        }
    };
}
pub(crate) use guest_warn;

/// One virtqueue and what the driver wrote into its configuration registers.
///
/// The raw values are kept here and only applied to `queue` when the driver sets
/// QueueReady, so a bad value makes the queue invalid instead of being half-applied.
#[derive(Debug)]
struct QueueSlot {
    queue: Queue,
    size: u32,
    desc: u64,
    driver: u64,
    device: u64,
    /// QueueReady as the driver last wrote it.
    ready: bool,
    /// The configuration applied at QueueReady was accepted by `queue`.
    valid: bool,
}

impl QueueSlot {
    fn new(queue: Queue) -> Self {
        let size = u32::from(queue.max_size());
        QueueSlot {
            queue,
            size,
            desc: 0,
            driver: 0,
            device: 0,
            ready: false,
            valid: false,
        }
    }

    fn reset(&mut self) {
        self.queue.reset();
        self.size = u32::from(self.queue.max_size());
        self.desc = 0;
        self.driver = 0;
        self.device = 0;
        self.ready = false;
        self.valid = false;
    }

    /// Applies the driver's configuration; returns whether `queue` accepted all of it.
    fn apply(&mut self) -> bool {
        let q = &mut self.queue;
        u16::try_from(self.size).is_ok_and(|size| q.try_set_size(size).is_ok())
            && q.try_set_desc_table_address(GuestAddress(self.desc))
                .is_ok()
            && q.try_set_avail_ring_address(GuestAddress(self.driver))
                .is_ok()
            && q.try_set_used_ring_address(GuestAddress(self.device))
                .is_ok()
    }

    fn usable(&self, mem: &GuestMemory) -> bool {
        self.valid && self.queue.is_valid(mem)
    }
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & !0xffff_ffff) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio device on the MMIO bus.
#[derive(Debug)]
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemory,
    irq: Irq,
    queues: Vec<QueueSlot>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated: notifications are suppressed both ways.
    event_idx: bool,
    /// One eventfd per queue that KVM signals on a QueueNotify write (KVM_IOEVENTFD), so
    /// notifications reach the I/O thread without a VM exit to user space; empty when
    /// KVM could not register them (they then arrive as MMIO writes).
    notify_fds: Vec<EventFd>,
    warn: WarnLimiter,
}

/// What starts a processing pass.
#[derive(Clone, Copy)]
enum Pass {
    Queue(usize),
    Backend(u32, EventSet),
}

/// Where the device writes `avail_event` for queue `q`: right after the used ring
/// (virtio 1.1 §2.6.10), inside the range the queue was validated with.
fn avail_event_addr(q: &Queue) -> Option<GuestAddress> {
    GuestAddress(q.used_ring()).checked_add(4 + 8 * u64::from(q.size()))
}

/// Asks the driver to notify when it makes available anything past what it has made
/// available so far, then reports whether queue `q` must be processed again: the driver
/// added buffers meanwhile (it may have seen the old `avail_event` and not notified), or
/// the pass consumed from it (started at `start`) and left some that arrived during it.
fn rearm(q: &mut Queue, mem: &GuestMemory, start: u16) -> Result<bool, String> {
    let seen = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| e.to_string())?;
    let addr = avail_event_addr(q).ok_or("avail_event address overflows")?;
    mem.store(u16::to_le(seen.0), addr, Ordering::Release)
        .map_err(|e| e.to_string())?;
    // The driver reads avail_event after publishing its index: order our write before
    // the re-read, as virtio-queue's enable_notification does.
    fence(Ordering::SeqCst);
    let now = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| e.to_string())?;
    let progressed = q.next_avail() != start;
    Ok(now != seen || (progressed && now.0 != q.next_avail()))
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport in reset state. A queue whose maximum size the device gives wrongly
    /// (0, not a power of two, over 32768) is a VMM bug: it is logged and the queue
    /// offered with QueueNumMax 0, which tells the driver it does not exist.
    pub fn new(device: D, mem: GuestMemory, irq: Irq) -> Self {
        let device_type = device.device_type();
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &max_size)| {
                let queue = Queue::new(max_size).unwrap_or_else(|e| {
                    error!(
                        device_type,
                        index,
                        max_size,
                        error = %e,
                        "virtio-mmio: invalid queue maximum size, queue disabled"
                    );
                    // Maximum size 0: no size the driver picks can be valid.
                    Queue::default()
                });
                QueueSlot::new(queue)
            })
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            event_idx: false,
            notify_fds: Vec::new(),
            warn: WarnLimiter::default(),
        }
    }

    /// Takes the eventfds KVM signals on QueueNotify writes, one per queue in order
    /// (registered with the I/O loop under `NOTIFY_TAG_BASE + index`).
    pub fn set_notify_fds(&mut self, fds: Vec<EventFd>) {
        self.notify_fds = fds;
    }

    /// Runs one processing pass and, with event indexes, as many more as it takes to not
    /// miss a buffer the driver did not notify about; then interrupts the guest at most
    /// once, and only if it asked to be (used_event) or, without event indexes, if any
    /// buffer was used.
    fn run(&mut self, first: Pass) {
        let mut todo = std::collections::VecDeque::from([first]);
        let mut used = false;
        let mut rounds = 0;
        while let Some(pass) = todo.pop_front() {
            let starts: Vec<Option<u16>> = self
                .queues
                .iter()
                .map(|s| (s.ready && s.valid).then(|| s.queue.next_avail()))
                .collect();
            let mut queues = Self::ready_queues(&mut self.queues);
            used |= match pass {
                Pass::Queue(index) => self.device.process_queue(index, &mut queues, &self.mem),
                Pass::Backend(tag, events) => {
                    self.device
                        .backend_event(tag, events, &mut queues, &self.mem)
                }
            };
            if !self.event_idx || !self.activated {
                break;
            }
            for (index, (slot, start)) in self.queues.iter_mut().zip(starts).enumerate() {
                let Some(start) = start else { continue };
                match rearm(&mut slot.queue, &self.mem, start) {
                    // Kept until processed: a later pass on another queue must not make
                    // this one look idle.
                    Ok(true)
                        if !todo
                            .iter()
                            .any(|p| matches!(p, Pass::Queue(i) if *i == index)) =>
                    {
                        todo.push_back(Pass::Queue(index));
                    }
                    Ok(_) => {}
                    Err(e) => guest_warn!(
                        self.warn,
                        index,
                        error = %e,
                        "virtio-mmio: cannot update avail_event"
                    ),
                }
            }
            rounds += 1;
            // Only the I/O thread defers: a vCPU has nobody to hand the rest to.
            if rounds >= MAX_ROUNDS && !self.notify_fds.is_empty() {
                for pass in todo.drain(..) {
                    if let Pass::Queue(index) = pass {
                        if let Some(fd) = self.notify_fds.get(index) {
                            let _ = fd.write(1);
                        }
                    }
                }
            }
        }
        let interrupt = if self.event_idx {
            let mem = &self.mem;
            // Every queue is asked: each answer also resets its count of used buffers.
            self.queues
                .iter_mut()
                .filter(|s| s.ready && s.valid)
                .fold(false, |any, s| {
                    s.queue.needs_notification(mem).unwrap_or(true) | any
                })
        } else {
            used
        };
        if interrupt {
            self.raise(INT_USED_BUFFER);
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Tells the driver the config space changed (e.g. a disk was swapped): bumps
    /// ConfigGeneration so a multi-access config read retries, and interrupts.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG_CHANGE);
    }

    /// Features offered to the driver: the device's plus VERSION_1, which this
    /// modern-only transport requires.
    fn offered_features(&self) -> u64 {
        self.device.device_features()
            | (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.irq.trigger() {
            warn!(error = %e, "virtio-mmio: cannot trigger interrupt");
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueSlot> {
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index)
    }

    fn reset(&mut self) {
        debug!(
            device_type = self.device.device_type(),
            "virtio-mmio: device reset"
        );
        for slot in &mut self.queues {
            slot.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.status = 0;
        self.activated = false;
        self.event_idx = false;
        self.device.reset();
    }

    /// The device cannot go on until the driver resets it (virtio 1.1 §2.1.2).
    fn needs_reset(&mut self) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            if self.activated {
                // Stop the device's back-end now: its host fds would otherwise keep
                // waking the I/O loop while every event is dropped.
                self.activated = false;
                self.device.reset();
            }
            self.raise(INT_CONFIG_CHANGE);
        }
    }

    fn features_acceptable(&mut self) -> bool {
        let unoffered = self.driver_features & !self.offered_features();
        if self.driver_features & (1u64 << VIRTIO_F_VERSION_1) == 0 {
            guest_warn!(
                self.warn,
                features = self.driver_features,
                "virtio-mmio: driver did not accept VERSION_1, refusing FEATURES_OK"
            );
            false
        } else if unoffered != 0 {
            guest_warn!(
                self.warn,
                unoffered,
                "virtio-mmio: driver accepted features never offered, refusing FEATURES_OK"
            );
            false
        } else {
            true
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let driver_bits = value & STATUS_DRIVER_BITS;
        // Status only grows between resets (virtio 1.1 §3.1.1).
        if driver_bits & old & STATUS_DRIVER_BITS != old & STATUS_DRIVER_BITS {
            guest_warn!(
                self.warn,
                old,
                value,
                "virtio-mmio: driver cleared status bits without a reset, ignored"
            );
            return;
        }
        let added = driver_bits & !old;
        let mut new = driver_bits | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        self.status = new;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.driver_ok();
        }
    }

    fn driver_ok(&mut self) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            guest_warn!(self.warn, "virtio-mmio: DRIVER_OK without FEATURES_OK");
            self.needs_reset();
            return;
        }
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        let mem = &self.mem;
        if let Some(index) = self
            .queues
            .iter()
            .position(|slot| slot.ready && !slot.usable(mem))
        {
            guest_warn!(
                self.warn,
                index,
                "virtio-mmio: DRIVER_OK with an invalid queue"
            );
            self.needs_reset();
            return;
        }
        self.activated = true;
        self.event_idx = self.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for slot in &mut self.queues {
            slot.queue.set_event_idx(self.event_idx);
        }
        // The ring-level feature is the transport's business, not the device's.
        self.device
            .activate(self.driver_features & !(1u64 << VIRTIO_RING_F_EVENT_IDX));
    }

    fn write_queue_ready(&mut self, value: u32) {
        let Ok(index) = usize::try_from(self.queue_sel) else {
            return;
        };
        let Some(slot) = self.queues.get_mut(index) else {
            guest_warn!(
                self.warn,
                index,
                "virtio-mmio: QueueReady for a missing queue"
            );
            return;
        };
        match value {
            0 => {
                slot.ready = false;
                slot.queue.set_ready(false);
            }
            1 => {
                if slot.ready {
                    return;
                }
                slot.valid = slot.apply();
                slot.ready = true;
                slot.queue.set_ready(slot.valid);
                slot.queue.set_event_idx(self.event_idx);
                let usable = slot.usable(&self.mem);
                if !slot.valid {
                    guest_warn!(
                        self.warn,
                        index,
                        size = slot.size,
                        desc = slot.desc,
                        driver = slot.driver,
                        device = slot.device,
                        "virtio-mmio: queue enabled with an invalid size or alignment"
                    );
                }
                // Before DRIVER_OK the check happens there; a queue enabled later must
                // pass it now.
                if self.activated && !usable {
                    self.needs_reset();
                }
            }
            _ => guest_warn!(self.warn, value, "virtio-mmio: bad QueueReady value"),
        }
    }

    /// Writes one of the queue configuration registers of the selected queue.
    fn write_queue_config(&mut self, offset: u64, value: u32) {
        let queue_sel = self.queue_sel;
        let Some(slot) = self.selected_queue() else {
            guest_warn!(
                self.warn,
                queue_sel,
                offset,
                "virtio-mmio: queue register written for a missing queue"
            );
            return;
        };
        if slot.ready {
            guest_warn!(
                self.warn,
                queue_sel,
                offset,
                "virtio-mmio: queue register written while the queue is ready, ignored"
            );
            return;
        }
        match offset {
            REG_QUEUE_NUM => slot.size = value,
            REG_QUEUE_DESC_LOW => set_low(&mut slot.desc, value),
            REG_QUEUE_DESC_HIGH => set_high(&mut slot.desc, value),
            REG_QUEUE_DRIVER_LOW => set_low(&mut slot.driver, value),
            REG_QUEUE_DRIVER_HIGH => set_high(&mut slot.driver, value),
            REG_QUEUE_DEVICE_LOW => set_low(&mut slot.device, value),
            REG_QUEUE_DEVICE_HIGH => set_high(&mut slot.device, value),
            _ => {}
        }
    }

    fn notify(&mut self, value: u32) {
        let index = value as usize;
        if !self.activated || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            guest_warn!(self.warn, index, "virtio-mmio: notify before activation");
            return;
        }
        let Some(slot) = self.queues.get_mut(index) else {
            guest_warn!(self.warn, index, "virtio-mmio: notify for a missing queue");
            return;
        };
        if !slot.ready || !slot.valid {
            guest_warn!(
                self.warn,
                index,
                "virtio-mmio: notify for a queue not ready"
            );
            return;
        }
        self.run(Pass::Queue(index));
    }

    fn ready_queues(slots: &mut [QueueSlot]) -> Queues<'_> {
        Queues::new(
            slots
                .iter_mut()
                .map(|s| (s.ready && s.valid).then_some(&mut s.queue))
                .collect(),
        )
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.offered_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |slot| u32::from(slot.queue.max_size())),
            REG_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |slot| u32::from(slot.ready)),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!(
                    self.warn,
                    offset,
                    "virtio-mmio: read of an unknown or write-only register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    guest_warn!(
                        self.warn,
                        "virtio-mmio: DriverFeatures written after FEATURES_OK, ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, value),
                    1 => set_high(&mut self.driver_features, value),
                    sel => guest_warn!(
                        self.warn,
                        sel,
                        value,
                        "virtio-mmio: DriverFeatures written with a bad selector"
                    ),
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_config(offset, value),
            REG_QUEUE_READY => self.write_queue_ready(value),
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.write_status(value),
            _ => guest_warn!(
                self.warn,
                offset,
                value,
                "virtio-mmio: write to an unknown or read-only register"
            ),
        }
    }
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let len = data.len();
        let Ok(bytes) = <&mut [u8; 4]>::try_from(data) else {
            guest_warn!(
                self.warn,
                offset,
                len,
                "virtio-mmio: register read that is not 4 bytes wide"
            );
            return;
        };
        *bytes = self.read_register(offset).to_le_bytes();
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                self.warn,
                offset,
                len = data.len(),
                "virtio-mmio: register write that is not 4 bytes wide"
            );
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl<D: VirtioDevice> crate::event_loop::BackendHandler for MmioTransport<D> {
    fn handle(&mut self, tag: u32, events: EventSet) {
        if let Some(index) = tag.checked_sub(NOTIFY_TAG_BASE) {
            // Non-blocking; consumed even when the notify is then ignored, so that the
            // level-triggered loop does not report it again.
            if let Some(fd) = self.notify_fds.get(index as usize) {
                let _ = fd.read();
            }
            self.notify(index);
            return;
        }
        if !self.activated || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        self.run(Pass::Backend(tag, events));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const QUEUE_SIZE: u16 = 16;
    const DEVICE_FEATURES: u64 = (1 << 5) | (1 << 34);

    /// Records every call; on notify, returns each available chain to the used ring.
    #[derive(Debug, Default)]
    struct Fake {
        max_sizes: Vec<u16>,
        config: [u8; 8],
        activated: Option<u64>,
        processed: Vec<usize>,
        resets: u32,
        /// Chains used per call at most (like a device that stops when its back-end is
        /// full); `None`: all.
        budget: Option<usize>,
        /// Processing queue 1 also uses one chain of queue 0 (as vsock answers TX
        /// packets in RX buffers).
        answers_on_0: bool,
        /// On the next call, once done, the driver adds this many chains to the queue
        /// at these rings (buffers that arrive while the device works).
        inject: Option<(Rings, u16)>,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn device_features(&self) -> u64 {
            DEVICE_FEATURES
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                let at = offset as usize + i;
                *b = self.config.get(at).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = self.config.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
        fn activate(&mut self, acked_features: u64) {
            self.activated = Some(acked_features);
        }
        fn process_queue(
            &mut self,
            index: usize,
            queues: &mut Queues<'_>,
            mem: &GuestMemory,
        ) -> bool {
            self.processed.push(index);
            let queue = queues.get(index).unwrap();
            let mut used = false;
            for _ in 0..self.budget.unwrap_or(usize::MAX) {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                queue.add_used(mem, chain.head_index(), 7).unwrap();
                used = true;
            }
            if index == 1 && self.answers_on_0 {
                let q0 = queues.get(0).unwrap();
                if let Some(chain) = q0.pop_descriptor_chain(mem) {
                    q0.add_used(mem, chain.head_index(), 7).unwrap();
                }
            }
            if let Some((rings, n)) = self.inject.take() {
                rings.add_chains(mem, n);
            }
            used
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
    }

    struct Harness {
        t: MmioTransport<Fake>,
        irq: EventFd,
    }

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn harness_with(max_sizes: Vec<u16>, mem: GuestMemory) -> Harness {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let fake = Fake {
            max_sizes,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Fake::default()
        };
        let t = MmioTransport::new(fake, mem, Irq::new(irq.try_clone().unwrap()));
        Harness { t, irq }
    }

    fn harness() -> Harness {
        harness_with(vec![QUEUE_SIZE], memory())
    }

    impl Harness {
        fn read(&mut self, offset: u64) -> u32 {
            let mut data = [0xaau8; 4];
            self.t.mmio_read(offset, &mut data);
            u32::from_le_bytes(data)
        }

        fn write(&mut self, offset: u64, value: u32) {
            self.t.mmio_write(offset, &value.to_le_bytes());
        }

        fn irq_count(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }

        fn negotiate(&mut self, features: u64) {
            self.write(REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.write(
                REG_STATUS,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            );
            self.write(REG_DRIVER_FEATURES_SEL, 0);
            self.write(REG_DRIVER_FEATURES, features as u32);
            self.write(REG_DRIVER_FEATURES_SEL, 1);
            self.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
            self.write(
                REG_STATUS,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
            );
        }

        fn setup_queue(&mut self, index: u32, size: u32, desc: u64, driver: u64, device: u64) {
            self.write(REG_QUEUE_SEL, index);
            self.write(REG_QUEUE_NUM, size);
            self.write(REG_QUEUE_DESC_LOW, desc as u32);
            self.write(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.write(REG_QUEUE_DRIVER_LOW, driver as u32);
            self.write(REG_QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
            self.write(REG_QUEUE_DEVICE_LOW, device as u32);
            self.write(REG_QUEUE_DEVICE_HIGH, (device >> 32) as u32);
            self.write(REG_QUEUE_READY, 1);
        }

        fn driver_ok(&mut self) {
            let status = self.read(REG_STATUS);
            self.write(REG_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
        }
    }

    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

    #[test]
    fn identification_registers() {
        let mut h = harness();
        assert_eq!(h.read(REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(h.read(REG_VERSION), 2);
        assert_eq!(h.read(REG_DEVICE_ID), 2);
        assert_eq!(h.read(REG_VENDOR_ID), 0x434f_434f);
        assert_eq!(h.read(REG_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        assert_eq!(h.read(REG_CONFIG_GENERATION), 0);
    }

    #[test]
    fn device_features_windows_include_version_1_and_event_idx() {
        let mut h = harness();
        h.write(REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(h.read(REG_DEVICE_FEATURES), (1 << 5) | (1 << 29));
        h.write(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(h.read(REG_DEVICE_FEATURES), (1 << 2) | 1);
        h.write(REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(h.read(REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_ok_requires_version_1() {
        let mut h = harness();
        h.negotiate(1 << 5);
        assert_eq!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);

        h.write(REG_STATUS, 0);
        h.negotiate(VERSION_1 | (1 << 5));
        assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn features_ok_refused_for_unoffered_features() {
        let mut h = harness();
        h.negotiate(VERSION_1 | (1 << 7));
        assert_eq!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn driver_features_frozen_after_features_ok() {
        let mut h = harness();
        h.negotiate(VERSION_1 | (1 << 34));
        h.write(REG_DRIVER_FEATURES_SEL, 0);
        h.write(REG_DRIVER_FEATURES, 1 << 5);
        h.driver_ok();
        assert_eq!(h.t.device().activated, Some(VERSION_1 | (1 << 34)));
    }

    #[test]
    fn driver_ok_activates_with_acked_features() {
        let mut h = harness();
        h.negotiate(VERSION_1 | (1 << 5));
        assert_eq!(h.t.device().activated, None);
        h.driver_ok();
        assert_eq!(h.t.device().activated, Some(VERSION_1 | (1 << 5)));
        assert_eq!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn driver_ok_without_features_ok_needs_reset() {
        let mut h = harness();
        h.write(
            REG_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        h.driver_ok();
        assert_eq!(h.t.device().activated, None);
        assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn status_bits_cannot_be_cleared_without_reset() {
        let mut h = harness();
        h.negotiate(VERSION_1);
        h.write(REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // The driver cannot claim NEEDS_RESET for the device either.
        let status = h.read(REG_STATUS);
        h.write(REG_STATUS, status | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_restores_defaults() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
        h.negotiate(VERSION_1);
        h.setup_queue(
            0,
            u32::from(QUEUE_SIZE),
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
        );
        h.driver_ok();
        h.t.config_changed();
        assert_ne!(h.read(REG_INTERRUPT_STATUS), 0);

        h.write(REG_STATUS, 0);
        assert_eq!(h.read(REG_STATUS), 0);
        assert_eq!(h.read(REG_INTERRUPT_STATUS), 0);
        assert_eq!(h.read(REG_QUEUE_READY), 0);
        assert_eq!(h.t.device().resets, 1);
        assert_eq!(h.t.device().activated, None);
        let slot = &h.t.queues[0];
        assert!(!slot.queue.ready());
        assert_eq!(slot.queue.desc_table(), 0);
        assert_eq!(slot.size, u32::from(QUEUE_SIZE));
        // Notifications after a reset reach nothing.
        h.write(REG_QUEUE_NOTIFY, 0);
        assert!(h.t.device().processed.is_empty());
    }

    #[test]
    fn notify_processes_queue_and_interrupts() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let desc = RawDescriptor::from(Descriptor::new(0x8000, 0x100, 0, 0));
        vq.add_desc_chains(&[desc], 0).unwrap();

        let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
        h.negotiate(VERSION_1);
        h.setup_queue(
            0,
            u32::from(QUEUE_SIZE),
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
        );
        assert_eq!(h.read(REG_QUEUE_READY), 1);
        h.driver_ok();
        assert_eq!(h.irq_count(), 0);

        h.write(REG_QUEUE_NOTIFY, 0);
        assert_eq!(h.t.device().processed, vec![0]);
        assert_eq!(h.read(REG_INTERRUPT_STATUS), INT_USED_BUFFER);
        assert_eq!(h.irq_count(), 1);
        // The device reached the ring the registers described.
        assert_eq!(vq.used().idx().load(), 1);
        let elem = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((elem.id(), elem.len()), (0, 7));

        h.write(REG_INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(h.read(REG_INTERRUPT_STATUS), 0);

        // Nothing new in the ring: no interrupt.
        h.write(REG_QUEUE_NOTIFY, 0);
        assert_eq!(h.t.device().processed, vec![0, 0]);
        assert_eq!(h.read(REG_INTERRUPT_STATUS), 0);
        assert_eq!(h.irq_count(), 0);
        assert_eq!(vq.used().idx().load(), 1);
    }

    const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

    /// Split rings laid out by hand with room for the event fields (the mock queue's
    /// layout puts the driver's `used_event` inside the used ring).
    #[derive(Debug, Clone, Copy)]
    struct Rings {
        base: u64,
    }

    impl Rings {
        const FIRST: Rings = Rings { base: 0 };
        const SECOND: Rings = Rings { base: 0x1_0000 };

        fn desc(&self) -> u64 {
            self.base
        }
        fn avail(&self) -> u64 {
            self.base + 0x1000
        }
        fn used(&self) -> u64 {
            self.base + 0x2000
        }

        fn setup(&self, h: &mut Harness, index: u32) {
            h.setup_queue(
                index,
                u32::from(QUEUE_SIZE),
                self.desc(),
                self.avail(),
                self.used(),
            );
        }

        fn at(&self, mem: &GuestMemory, addr: u64) -> u16 {
            mem.read_obj::<u16>(GuestAddress(addr)).unwrap()
        }

        /// Makes `n` more one-descriptor chains available.
        fn add_chains(&self, mem: &GuestMemory, n: u16) {
            let idx = self.at(mem, self.avail() + 2);
            for i in idx..idx + n {
                let head = i % QUEUE_SIZE;
                let desc = RawDescriptor::from(Descriptor::new(0x8000, 0x100, 0, 0));
                mem.write_obj(desc, GuestAddress(self.desc() + 16 * u64::from(head)))
                    .unwrap();
                mem.write_obj(head, GuestAddress(self.avail() + 4 + 2 * u64::from(head)))
                    .unwrap();
            }
            mem.write_obj(idx + n, GuestAddress(self.avail() + 2))
                .unwrap();
        }

        fn used_idx(&self, mem: &GuestMemory) -> u16 {
            self.at(mem, self.used() + 2)
        }

        /// The driver's "interrupt me once the used index passes this".
        fn set_used_event(&self, mem: &GuestMemory, idx: u16) {
            let addr = self.avail() + 4 + 2 * u64::from(QUEUE_SIZE);
            mem.write_obj(idx, GuestAddress(addr)).unwrap();
        }

        /// The device's "notify me when the available index passes this".
        fn avail_event(&self, mem: &GuestMemory) -> u16 {
            self.at(mem, self.used() + 4 + 8 * u64::from(QUEUE_SIZE))
        }
    }

    /// A harness with a queue per ring set, `features` negotiated, DRIVER_OK set.
    fn running(mem: &GuestMemory, rings: &[Rings], features: u64) -> Harness {
        let mut h = harness_with(vec![QUEUE_SIZE; rings.len()], mem.clone());
        h.negotiate(features);
        for (index, r) in rings.iter().enumerate() {
            r.setup(&mut h, index as u32);
        }
        h.driver_ok();
        h
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asks_and_rearms_notifies() {
        let mem = memory();
        let r = Rings::FIRST;
        let mut h = running(&mem, &[r], VERSION_1 | EVENT_IDX);
        assert_eq!(
            h.t.device().activated,
            Some(VERSION_1),
            "ring feature kept back"
        );
        r.set_used_event(&mem, 5);
        r.add_chains(&mem, 1);
        h.write(REG_QUEUE_NOTIFY, 0);
        assert_eq!(r.used_idx(&mem), 1);
        assert_eq!(h.irq_count(), 0);
        assert_eq!(r.avail_event(&mem), 1);
        r.add_chains(&mem, 5);
        h.write(REG_QUEUE_NOTIFY, 0);
        assert_eq!(r.used_idx(&mem), 6);
        assert_eq!(h.irq_count(), 1);
        assert_eq!(r.avail_event(&mem), 6);
    }

    #[test]
    fn without_event_idx_every_used_pass_interrupts() {
        let mem = memory();
        let r = Rings::FIRST;
        let mut h = running(&mem, &[r], VERSION_1);
        r.set_used_event(&mem, 5);
        r.add_chains(&mem, 1);
        h.write(REG_QUEUE_NOTIFY, 0);
        assert_eq!(h.irq_count(), 1);
        assert_eq!(r.avail_event(&mem), 0, "untouched");
    }

    /// With event indexes the driver does not notify for buffers it adds after the first
    /// one past `avail_event`: a pass that leaves some must be followed by another.
    #[test]
    fn event_idx_processes_again_what_a_pass_left() {
        let mem = memory();
        let r = Rings::FIRST;
        let mut h = running(&mem, &[r], VERSION_1 | EVENT_IDX);
        h.t.device_mut().budget = Some(1);
        r.add_chains(&mem, 3);
        h.write(REG_QUEUE_NOTIFY, 0);
        assert_eq!(r.used_idx(&mem), 3);
        assert_eq!(h.t.device().processed.len(), 3, "a pass per chain");
        assert_eq!(h.irq_count(), 1, "one interrupt for all of it");
    }

    /// A pass on queue 1 also uses queue 0 (leaving some there), while the driver adds to
    /// queue 1 without notifying (it already did for this round). Both need another pass;
    /// running the one for queue 0 first must not make queue 1 look idle.
    #[test]
    fn event_idx_reruns_every_queue_that_needs_it() {
        let mem = memory();
        let (rx, tx) = (Rings::FIRST, Rings::SECOND);
        let mut h = running(&mem, &[rx, tx], VERSION_1 | EVENT_IDX);
        rx.add_chains(&mem, 3);
        tx.add_chains(&mem, 2);
        h.t.device_mut().answers_on_0 = true;
        h.t.device_mut().inject = Some((tx, 2));
        h.write(REG_QUEUE_NOTIFY, 1);
        assert_eq!(tx.used_idx(&mem), 4, "the chains added during the pass");
        assert_eq!(rx.used_idx(&mem), 3);
        assert_eq!(tx.avail_event(&mem), 4);
    }

    #[test]
    fn ioeventfd_notifications_arrive_through_the_io_loop() {
        use crate::event_loop::BackendHandler;
        let mem = memory();
        let r = Rings::FIRST;
        let mut h = running(&mem, &[r], VERSION_1 | EVENT_IDX);
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        h.t.set_notify_fds(vec![fd.try_clone().unwrap()]);
        r.add_chains(&mem, 2);
        // KVM signals the eventfd on the guest's QueueNotify write.
        fd.write(1).unwrap();
        h.t.handle(NOTIFY_TAG_BASE, EventSet::IN);
        assert_eq!(r.used_idx(&mem), 2);
        assert_eq!(h.irq_count(), 1);
        // Consumed, so the level-triggered loop does not report it again.
        assert!(fd.read().is_err());
        // A queue index that does not exist is ignored.
        h.t.handle(NOTIFY_TAG_BASE + 5, EventSet::IN);
        assert_eq!(h.t.device().processed, vec![0]);
    }

    #[test]
    fn notify_before_driver_ok_or_bad_index_is_ignored() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
        h.negotiate(VERSION_1);
        h.setup_queue(
            0,
            u32::from(QUEUE_SIZE),
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
        );
        h.write(REG_QUEUE_NOTIFY, 0);
        assert!(h.t.device().processed.is_empty());
        h.driver_ok();
        h.write(REG_QUEUE_NOTIFY, 1);
        h.write(REG_QUEUE_NOTIFY, u32::MAX);
        assert!(h.t.device().processed.is_empty());
        assert_eq!(h.irq_count(), 0);
    }

    #[test]
    fn interrupt_ack_clears_only_acked_bits() {
        let mut h = harness();
        h.t.config_changed();
        h.t.interrupt_status |= INT_USED_BUFFER;
        h.write(REG_INTERRUPT_ACK, INT_CONFIG_CHANGE);
        assert_eq!(h.read(REG_INTERRUPT_STATUS), INT_USED_BUFFER);
        h.write(REG_INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(h.read(REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn config_changed_bumps_generation_and_interrupts() {
        let mut h = harness();
        h.t.config_changed();
        assert_eq!(h.read(REG_CONFIG_GENERATION), 1);
        assert_eq!(h.read(REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert_eq!(h.irq_count(), 1);
        h.t.config_changed();
        assert_eq!(h.read(REG_CONFIG_GENERATION), 2);
    }

    #[test]
    fn config_space_any_width_goes_to_device() {
        let mut h = harness();
        let mut b = [0u8; 1];
        h.t.mmio_read(CONFIG_SPACE_OFFSET + 2, &mut b);
        assert_eq!(b, [3]);
        let mut w = [0u8; 8];
        h.t.mmio_read(CONFIG_SPACE_OFFSET, &mut w);
        assert_eq!(w, [1, 2, 3, 4, 5, 6, 7, 8]);
        h.t.mmio_write(CONFIG_SPACE_OFFSET + 1, &[9, 9]);
        assert_eq!(h.t.device().config[..4], [1, 9, 9, 4]);
        // Past the device's config: zeros.
        let mut far = [0xffu8; 4];
        h.t.mmio_read(CONFIG_SPACE_OFFSET + 100, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn wrong_width_register_access_is_ignored() {
        let mut h = harness();
        let mut two = [0xffu8; 2];
        h.t.mmio_read(REG_MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut eight = [0xffu8; 8];
        h.t.mmio_read(REG_MAGIC_VALUE, &mut eight);
        assert_eq!(eight, [0; 8]);
        h.t.mmio_write(REG_STATUS, &[VIRTIO_CONFIG_S_ACKNOWLEDGE as u8]);
        assert_eq!(h.read(REG_STATUS), 0);
        h.t.mmio_write(REG_STATUS, &[]);
        // Unaligned and unknown offsets read as zero.
        assert_eq!(h.read(0x002), 0);
        assert_eq!(h.read(0x0ac), 0);
        h.write(0x0ac, 5);
    }

    #[test]
    fn missing_queue_registers_are_harmless() {
        let mut h = harness();
        h.write(REG_QUEUE_SEL, 5);
        assert_eq!(h.read(REG_QUEUE_NUM_MAX), 0);
        assert_eq!(h.read(REG_QUEUE_READY), 0);
        h.write(REG_QUEUE_NUM, 8);
        h.write(REG_QUEUE_DESC_LOW, 0x1000);
        h.write(REG_QUEUE_READY, 1);
        assert_eq!(h.read(REG_QUEUE_READY), 0);
        h.write(REG_QUEUE_SEL, u32::MAX);
        h.write(REG_QUEUE_READY, 1);
        assert_eq!(h.read(REG_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn queue_config_is_frozen_while_ready() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
        h.negotiate(VERSION_1);
        h.setup_queue(
            0,
            8,
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
        );
        h.write(REG_QUEUE_NUM, 4);
        h.write(REG_QUEUE_DESC_LOW, 0x5000);
        h.write(REG_QUEUE_DESC_HIGH, 1);
        let slot = &h.t.queues[0];
        assert_eq!(slot.queue.size(), 8);
        assert_eq!(slot.queue.desc_table(), vq.desc_table_addr().0);

        // Once disabled, the queue takes new values again.
        h.write(REG_QUEUE_READY, 0);
        assert_eq!(h.read(REG_QUEUE_READY), 0);
        h.write(REG_QUEUE_NUM, 4);
        h.write(REG_QUEUE_READY, 1);
        assert_eq!(h.t.queues[0].queue.size(), 4);
    }

    #[test]
    fn bad_queue_sizes_make_queue_invalid() {
        for size in [0, 3, u32::from(QUEUE_SIZE) * 2, 0x1_0000 + 8] {
            let mem = memory();
            let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
            let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
            h.negotiate(VERSION_1);
            h.setup_queue(
                0,
                size,
                vq.desc_table_addr().0,
                vq.avail_addr().0,
                vq.used_addr().0,
            );
            h.driver_ok();
            assert_eq!(h.t.device().activated, None, "size {size}");
            assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
            assert_ne!(h.read(REG_INTERRUPT_STATUS) & INT_CONFIG_CHANGE, 0);
            assert_eq!(h.irq_count(), 1);
            h.write(REG_QUEUE_NOTIFY, 0);
            assert!(h.t.device().processed.is_empty());
        }
    }

    #[test]
    fn misaligned_or_unmapped_rings_need_reset() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let cases = [
            // Descriptor table not 16-byte aligned.
            (
                vq.desc_table_addr().0 + 8,
                vq.avail_addr().0,
                vq.used_addr().0,
            ),
            // Used ring outside guest memory.
            (vq.desc_table_addr().0, vq.avail_addr().0, 0x1_0000_0000),
        ];
        for (desc, driver, device) in cases {
            let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
            h.negotiate(VERSION_1);
            h.setup_queue(0, u32::from(QUEUE_SIZE), desc, driver, device);
            h.driver_ok();
            assert_eq!(h.t.device().activated, None);
            assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        }
    }

    #[test]
    fn queue_enabled_after_driver_ok_is_checked() {
        let mem = memory();
        let mut h = harness_with(vec![QUEUE_SIZE, QUEUE_SIZE], mem);
        h.negotiate(VERSION_1);
        h.driver_ok();
        assert!(h.t.device().activated.is_some());
        h.setup_queue(1, u32::from(QUEUE_SIZE), 0x1_0000_0000, 0, 0);
        assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn invalid_device_queue_size_disables_the_queue() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut h = harness_with(vec![16, 3], mem.clone());
        h.write(REG_QUEUE_SEL, 0);
        assert_eq!(h.read(REG_QUEUE_NUM_MAX), 16);
        h.write(REG_QUEUE_SEL, 1);
        assert_eq!(h.read(REG_QUEUE_NUM_MAX), 0);
        // A driver enabling it anyway cannot get the device going.
        h.negotiate(VERSION_1);
        h.setup_queue(
            1,
            16,
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
        );
        h.driver_ok();
        assert_eq!(h.t.device().activated, None);
        assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn warn_limiter_caps_a_burst() {
        let mut limiter = WarnLimiter::default();
        let allowed = (0..1000).filter(|_| limiter.allow()).count();
        assert_eq!(allowed, WarnLimiter::PER_WINDOW as usize);
    }
}
