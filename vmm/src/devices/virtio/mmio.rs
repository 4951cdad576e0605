//! virtio-mmio transport, version 2 ("modern"), virtio 1.1 §4.2.2.
//!
//! `MmioTransport` owns the register state and the virtqueues and hands a `VirtioDevice`
//! only what it needs: its config space, activation with the negotiated features, and a
//! queue to drain when the driver notifies. Everything the guest writes here is hostile
//! input: bad values are logged and ignored, never trusted and never a panic.

use std::sync::atomic::{fence, Ordering};

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

use super::{Queues, VirtioDevice};
use crate::devices::guest_warn::{guest_warn, WarnLimiter};
use crate::devices::{GuestMemory, Irq, MmioDevice};

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
mod tests;
