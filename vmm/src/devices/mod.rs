//! Emulated devices: the COM1 console (`serial`) and the virtio devices (`block`, `net`,
//! `vsock`, `balloon`), each in a folder split by concern, on the virtio-mmio transport
//! and the helpers they share (`virtio`).
//!
//! Devices are driven synchronously from the vCPU thread whose exit reached them (port or
//! MMIO access); each sits behind a `Mutex`. Interrupts go to the guest through KVM irqfds.

pub mod balloon;
pub mod block;
pub(crate) mod guest_warn;
pub mod net;
pub mod serial;
pub mod virtio;
pub mod vsock;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// An edge-triggered interrupt line into the guest: an `EventFd` that the VMM registers
/// with KVM as an irqfd for one GSI. Tests read the `EventFd` to see triggers.
#[derive(Debug)]
pub struct Irq {
    fd: EventFd,
}

impl Irq {
    pub fn new(fd: EventFd) -> Self {
        Irq { fd }
    }

    /// Raises the interrupt.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.fd.write(1)
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }
}

/// A device on the MMIO bus, addressed by offset within its window.
pub trait MmioDevice: Send {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

/// A device on the port I/O bus, addressed by offset from its base port.
pub trait PioDevice: Send {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]);
    fn pio_write(&mut self, offset: u16, data: &[u8]);
}
