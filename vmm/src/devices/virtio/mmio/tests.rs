#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use super::*;

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};

use crate::devices::virtio::test_ring::{self, DriverRing};
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
    inject: Option<(DriverRing, u16)>,
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
    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>, mem: &GuestMemory) -> bool {
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
        if let Some((ring, n)) = &mut self.inject {
            add_chains(ring, mem, std::mem::take(n));
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
    test_ring::memory(0x10_0000)
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
    let vq = DriverRing::new(&mem, 0, QUEUE_SIZE);
    let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
    h.negotiate(VERSION_1);
    h.setup_queue(0, u32::from(QUEUE_SIZE), vq.desc, vq.avail, vq.used);
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
    let mut vq = DriverRing::new(&mem, 0, QUEUE_SIZE);
    vq.post(&mem, &[(0x8000, 0x100, false)]);

    let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
    h.negotiate(VERSION_1);
    h.setup_queue(0, u32::from(QUEUE_SIZE), vq.desc, vq.avail, vq.used);
    assert_eq!(h.read(REG_QUEUE_READY), 1);
    h.driver_ok();
    assert_eq!(h.irq_count(), 0);

    h.write(REG_QUEUE_NOTIFY, 0);
    assert_eq!(h.t.device().processed, vec![0]);
    assert_eq!(h.read(REG_INTERRUPT_STATUS), INT_USED_BUFFER);
    assert_eq!(h.irq_count(), 1);
    // The device reached the ring the registers described.
    assert_eq!(vq.used_idx(&mem), 1);
    assert_eq!(vq.used_elem(&mem, 0), (0, 7));

    h.write(REG_INTERRUPT_ACK, INT_USED_BUFFER);
    assert_eq!(h.read(REG_INTERRUPT_STATUS), 0);

    // Nothing new in the ring: no interrupt.
    h.write(REG_QUEUE_NOTIFY, 0);
    assert_eq!(h.t.device().processed, vec![0, 0]);
    assert_eq!(h.read(REG_INTERRUPT_STATUS), 0);
    assert_eq!(h.irq_count(), 0);
    assert_eq!(vq.used_idx(&mem), 1);
}

const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// Makes `n` more one-descriptor chains available.
fn add_chains(ring: &mut DriverRing, mem: &GuestMemory, n: u16) {
    for _ in 0..n {
        ring.post(mem, &[(0x8000, 0x100, false)]);
    }
}

/// Programs queue `index` with `ring`'s addresses and enables it.
fn setup(h: &mut Harness, index: u32, ring: &DriverRing) {
    h.setup_queue(
        index,
        u32::from(ring.size),
        ring.desc,
        ring.avail,
        ring.used,
    );
}

/// A harness with a queue per ring set, `features` negotiated, DRIVER_OK set.
fn running(mem: &GuestMemory, rings: &[&DriverRing], features: u64) -> Harness {
    let mut h = harness_with(vec![QUEUE_SIZE; rings.len()], mem.clone());
    h.negotiate(features);
    for (index, r) in rings.iter().enumerate() {
        setup(&mut h, index as u32, r);
    }
    h.driver_ok();
    h
}

#[test]
fn event_idx_interrupts_only_when_the_driver_asks_and_rearms_notifies() {
    let mem = memory();
    let mut r = DriverRing::new(&mem, 0, QUEUE_SIZE);
    let mut h = running(&mem, &[&r], VERSION_1 | EVENT_IDX);
    assert_eq!(
        h.t.device().activated,
        Some(VERSION_1),
        "ring feature kept back"
    );
    r.set_used_event(&mem, 5);
    add_chains(&mut r, &mem, 1);
    h.write(REG_QUEUE_NOTIFY, 0);
    assert_eq!(r.used_idx(&mem), 1);
    assert_eq!(h.irq_count(), 0);
    assert_eq!(r.avail_event(&mem), 1);
    add_chains(&mut r, &mem, 5);
    h.write(REG_QUEUE_NOTIFY, 0);
    assert_eq!(r.used_idx(&mem), 6);
    assert_eq!(h.irq_count(), 1);
    assert_eq!(r.avail_event(&mem), 6);
}

#[test]
fn without_event_idx_every_used_pass_interrupts() {
    let mem = memory();
    let mut r = DriverRing::new(&mem, 0, QUEUE_SIZE);
    let mut h = running(&mem, &[&r], VERSION_1);
    r.set_used_event(&mem, 5);
    add_chains(&mut r, &mem, 1);
    h.write(REG_QUEUE_NOTIFY, 0);
    assert_eq!(h.irq_count(), 1);
    assert_eq!(r.avail_event(&mem), 0, "untouched");
}

/// With event indexes the driver does not notify for buffers it adds after the first
/// one past `avail_event`: a pass that leaves some must be followed by another.
#[test]
fn event_idx_processes_again_what_a_pass_left() {
    let mem = memory();
    let mut r = DriverRing::new(&mem, 0, QUEUE_SIZE);
    let mut h = running(&mem, &[&r], VERSION_1 | EVENT_IDX);
    h.t.device_mut().budget = Some(1);
    add_chains(&mut r, &mem, 3);
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
    let mut rx = DriverRing::new(&mem, 0, QUEUE_SIZE);
    let mut tx = DriverRing::new(&mem, 0x1_0000, QUEUE_SIZE);
    let mut h = running(&mem, &[&rx, &tx], VERSION_1 | EVENT_IDX);
    add_chains(&mut rx, &mem, 3);
    add_chains(&mut tx, &mem, 2);
    h.t.device_mut().answers_on_0 = true;
    h.t.device_mut().inject = Some((tx, 2));
    h.write(REG_QUEUE_NOTIFY, 1);
    let tx = &h.t.device().inject.as_ref().unwrap().0;
    assert_eq!(tx.used_idx(&mem), 4, "the chains added during the pass");
    assert_eq!(rx.used_idx(&mem), 3);
    assert_eq!(tx.avail_event(&mem), 4);
}

#[test]
fn ioeventfd_notifications_arrive_through_the_io_loop() {
    use crate::event_loop::BackendHandler;
    let mem = memory();
    let mut r = DriverRing::new(&mem, 0, QUEUE_SIZE);
    let mut h = running(&mem, &[&r], VERSION_1 | EVENT_IDX);
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    h.t.set_notify_fds(vec![fd.try_clone().unwrap()]);
    add_chains(&mut r, &mem, 2);
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
    let vq = DriverRing::new(&mem, 0, QUEUE_SIZE);
    let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
    h.negotiate(VERSION_1);
    h.setup_queue(0, u32::from(QUEUE_SIZE), vq.desc, vq.avail, vq.used);
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
    let vq = DriverRing::new(&mem, 0, QUEUE_SIZE);
    let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
    h.negotiate(VERSION_1);
    h.setup_queue(0, 8, vq.desc, vq.avail, vq.used);
    h.write(REG_QUEUE_NUM, 4);
    h.write(REG_QUEUE_DESC_LOW, 0x5000);
    h.write(REG_QUEUE_DESC_HIGH, 1);
    let slot = &h.t.queues[0];
    assert_eq!(slot.queue.size(), 8);
    assert_eq!(slot.queue.desc_table(), vq.desc);

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
        let vq = DriverRing::new(&mem, 0, QUEUE_SIZE);
        let mut h = harness_with(vec![QUEUE_SIZE], mem.clone());
        h.negotiate(VERSION_1);
        h.setup_queue(0, size, vq.desc, vq.avail, vq.used);
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
    let vq = DriverRing::new(&mem, 0, QUEUE_SIZE);
    let cases = [
        // Descriptor table not 16-byte aligned.
        (vq.desc + 8, vq.avail, vq.used),
        // Used ring outside guest memory.
        (vq.desc, vq.avail, 0x1_0000_0000),
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
    let vq = DriverRing::new(&mem, 0, 16);
    let mut h = harness_with(vec![16, 3], mem.clone());
    h.write(REG_QUEUE_SEL, 0);
    assert_eq!(h.read(REG_QUEUE_NUM_MAX), 16);
    h.write(REG_QUEUE_SEL, 1);
    assert_eq!(h.read(REG_QUEUE_NUM_MAX), 0);
    // A driver enabling it anyway cannot get the device going.
    h.negotiate(VERSION_1);
    h.setup_queue(1, 16, vq.desc, vq.avail, vq.used);
    h.driver_ok();
    assert_eq!(h.t.device().activated, None);
    assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}
