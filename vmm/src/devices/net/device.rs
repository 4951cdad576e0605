//! The virtio-net device: its state, the TAP's place in the I/O loop, config space and
//! the `VirtioDevice` entry points that hand work to `tx` and `rx`.

use std::fmt;
use std::os::raw::c_int;
use std::os::unix::io::AsRawFd;

use tracing::{debug, error, info, warn};
use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;
use vmm_sys_util::epoll::EventSet;

use super::tap::Tap;
use super::{
    format_mac, has, offload_flags, NetError, CONFIG_LEN, DEVICE_FEATURES, MAX_BUFFER_LEN,
    QUEUE_SIZE, RX_BUDGET, RX_QUEUE, TAP_TAG, TX_QUEUE, VIRTIO_ID_NET, VNET_HDR_LEN,
};
use crate::devices::guest_warn::{guest_warn, WarnLimiter};
use crate::devices::virtio::{read_config_bytes, Queues, VirtioDevice};
use crate::devices::GuestMemory;
use crate::event_loop::Registrar;

/// A virtio-net device backed by a TAP.
pub struct Net {
    pub(super) tap: Tap,
    pub(super) mac: [u8; 6],
    pub(super) registrar: Registrar,
    pub(super) queue_max_sizes: [u16; 2],
    pub(super) acked_features: u64,
    pub(super) activated: bool,
    /// Events the TAP fd is registered for; `None` while not registered.
    pub(super) watching: Option<EventSet>,
    /// The TAP hung up or kept failing: it stays unwatched until the next activation.
    pub(super) failed: bool,
    pub(super) read_errors: u32,
    pub(super) rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` waiting for receive buffers.
    pub(super) rx_pending: Option<usize>,
    /// Waiting for the guest to add receive buffers: the TAP is not read meanwhile.
    pub(super) rx_stalled: bool,
    pub(super) rx_budget: usize,
    pub(super) tx_buf: Vec<u8>,
    /// The TAP would not take a frame: transmission waits for EPOLLOUT.
    pub(super) tx_blocked: bool,
    /// Warnings the guest can trigger.
    pub(super) warn: WarnLimiter,
    /// Warnings about frames and TAP errors (the network or the guest can trigger them).
    pub(super) net_warn: WarnLimiter,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap)
            .field("mac", &format_mac(&self.mac))
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .field("watching", &self.watching)
            .field("failed", &self.failed)
            .field("rx_pending", &self.rx_pending)
            .field("rx_stalled", &self.rx_stalled)
            .field("tx_blocked", &self.tx_blocked)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A network device on `tap` with guest MAC `mac`. `registrar` is this device's handle
    /// on the I/O loop; the TAP fd is registered on activation with tag [`TAP_TAG`]. The
    /// TAP's header size is set here already, so a TAP that cannot take it fails now.
    pub fn new(mut tap: Tap, mac: [u8; 6], registrar: Registrar) -> Result<Net, NetError> {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::InvalidMac {
                mac: format_mac(&mac),
            });
        }
        let setup = tap
            .set_vnet_hdr_size(VNET_HDR_LEN as c_int)
            .and_then(|()| tap.set_offload(0));
        if let Err(source) = setup {
            return Err(NetError::Tap {
                name: tap.name().to_owned(),
                source,
            });
        }
        Ok(Net {
            tap,
            mac,
            registrar,
            queue_max_sizes: [QUEUE_SIZE; 2],
            acked_features: 0,
            activated: false,
            watching: None,
            failed: false,
            read_errors: 0,
            rx_buf: vec![0; MAX_BUFFER_LEN],
            rx_pending: None,
            rx_stalled: false,
            rx_budget: RX_BUDGET,
            tx_buf: vec![0; MAX_BUFFER_LEN],
            tx_blocked: false,
            warn: WarnLimiter::default(),
            net_warn: WarnLimiter::default(),
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub(super) fn acked(&self, feature: u32) -> bool {
        has(self.acked_features, feature)
    }

    pub(super) fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        // VIRTIO_NET_S_LINK_UP fits the u16 status.
        c[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }

    pub(super) fn deregister(&mut self) {
        if self.watching.take().is_some() {
            if let Err(e) = self.registrar.remove(self.tap.as_raw_fd()) {
                warn!(tap = self.tap.name(), error = %e, "virtio-net: cannot deregister the TAP");
            }
        }
    }

    /// Gives up on the TAP until the driver resets the device: a TAP that hangs up or
    /// keeps failing would otherwise wake the I/O loop forever.
    pub(super) fn fail(&mut self, reason: &str) {
        error!(
            tap = self.tap.name(),
            reason, "virtio-net: TAP failed, receive stopped until the device is reset"
        );
        self.failed = true;
        // Nothing will report the TAP writable any more: let transmit go on (and drop
        // what the TAP refuses) rather than hold the guest's frames forever.
        self.tx_blocked = false;
        self.deregister();
    }

    /// Watches the TAP for what the device is waiting for: input unless the guest has to
    /// add receive buffers first, output while a frame waits to be sent.
    pub(super) fn update_interest(&mut self) {
        let Some(current) = self.watching else {
            return;
        };
        let mut want = EventSet::empty();
        if !self.rx_stalled {
            want |= EventSet::IN;
        }
        if self.tx_blocked {
            want |= EventSet::OUT;
        }
        if want == current {
            return;
        }
        match self.registrar.modify(self.tap.as_raw_fd(), TAP_TAG, want) {
            Ok(()) => {
                debug!(tap = self.tap.name(), events = ?want, "virtio-net: TAP watch changed");
                self.watching = Some(want);
            }
            Err(e) => {
                error!(tap = self.tap.name(), error = %e, "virtio-net: cannot change the TAP watch");
                self.fail("epoll_ctl failed");
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        DEVICE_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only without the legacy interface; status always is.
        guest_warn!(
            self.warn,
            offset,
            len = data.len(),
            "virtio-net: config space write ignored"
        );
    }

    fn activate(&mut self, acked_features: u64) {
        self.deregister();
        self.acked_features = acked_features;
        self.activated = true;
        self.failed = false;
        self.read_errors = 0;
        self.rx_pending = None;
        self.rx_stalled = false;
        self.tx_blocked = false;
        let offload = offload_flags(acked_features);
        let setup = self
            .tap
            .set_vnet_hdr_size(VNET_HDR_LEN as c_int)
            .and_then(|()| self.tap.set_offload(offload));
        if let Err(e) = setup {
            error!(tap = self.tap.name(), error = %e, "virtio-net: cannot configure the TAP");
            self.fail("configuration failed");
            return;
        }
        if let Err(e) = self
            .registrar
            .add(self.tap.as_raw_fd(), TAP_TAG, EventSet::IN)
        {
            error!(tap = self.tap.name(), error = %e, "virtio-net: cannot watch the TAP");
            self.fail("epoll_ctl failed");
            return;
        }
        self.watching = Some(EventSet::IN);
        info!(
            tap = self.tap.name(),
            mac = %format_mac(&self.mac),
            features = acked_features,
            offload,
            "virtio-net: activated"
        );
    }

    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>, mem: &GuestMemory) -> bool {
        if !self.activated {
            return false;
        }
        let used = match (index, queues.get(index)) {
            (RX_QUEUE, Some(queue)) if self.rx_stalled => self.rx_notified(queue, mem),
            // The TAP is being watched for input: nothing waits for buffers.
            (RX_QUEUE, Some(_)) => false,
            // Resumed on EPOLLOUT; until then the chains stay where they are.
            (TX_QUEUE, Some(_)) if self.tx_blocked => false,
            (TX_QUEUE, Some(queue)) => self.transmit(queue, mem),
            _ => {
                guest_warn!(self.warn, index, "virtio-net: notify for a missing queue");
                false
            }
        };
        self.update_interest();
        used
    }

    fn backend_event(
        &mut self,
        tag: u32,
        events: EventSet,
        queues: &mut Queues<'_>,
        mem: &GuestMemory,
    ) -> bool {
        if tag != TAP_TAG {
            warn!(tag, "virtio-net: event for an unknown tag");
            return false;
        }
        if !self.activated || self.watching.is_none() {
            return false;
        }
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            self.fail("error or hang-up on the TAP fd");
            return false;
        }
        let mut used = false;
        if events.contains(EventSet::OUT) && self.tx_blocked {
            self.tx_blocked = false;
            if let Some(queue) = queues.get(TX_QUEUE) {
                used |= self.transmit(queue, mem);
            }
        }
        if events.contains(EventSet::IN) && !self.rx_stalled {
            used |= self.receive(queues.get(RX_QUEUE), mem);
        }
        self.update_interest();
        used
    }

    fn reset(&mut self) {
        self.deregister();
        self.acked_features = 0;
        self.activated = false;
        self.failed = false;
        self.read_errors = 0;
        self.rx_pending = None;
        self.rx_stalled = false;
        self.tx_blocked = false;
    }
}
