//! What every virtio device shares: the `VirtioDevice` trait a device model implements,
//! the view of its queues it gets, guest-memory spans, and the virtio-mmio transport that
//! puts a device on the bus.

pub mod mmio;
pub mod segments;
#[cfg(test)]
pub(crate) mod test_ring;

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;

use super::GuestMemory;

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
