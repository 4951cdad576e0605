//! Port I/O and MMIO dispatch from vCPU exits to devices.

use crate::devices::{MmioDevice, PioDevice};
use std::sync::{Arc, Mutex, MutexGuard};

type Shared<T> = Arc<Mutex<T>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A device that panicked mid-access is still the best state we have.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The VM's devices by address. Accesses nobody claims read as all-ones and are dropped,
/// as on real hardware: the guest probes ports and addresses that have no device.
#[derive(Default)]
pub struct Bus {
    pio: Vec<(u16, u16, Shared<dyn PioDevice>)>,
    mmio: Vec<(u64, u64, Shared<dyn MmioDevice>)>,
}

impl Bus {
    pub fn add_pio(&mut self, base: u16, len: u16, dev: Shared<dyn PioDevice>) {
        self.pio.push((base, len, dev));
    }

    pub fn add_mmio(&mut self, base: u64, len: u64, dev: Shared<dyn MmioDevice>) {
        self.mmio.push((base, len, dev));
    }

    fn find_pio(&self, port: u16) -> Option<(u16, &Shared<dyn PioDevice>)> {
        self.pio
            .iter()
            .find(|(base, len, _)| port >= *base && port - base < *len)
            .map(|(base, _, dev)| (port - base, dev))
    }

    fn find_mmio(&self, addr: u64) -> Option<(u64, &Shared<dyn MmioDevice>)> {
        self.mmio
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)
            .map(|(base, _, dev)| (addr - base, dev))
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match self.find_pio(port) {
            Some((off, dev)) => lock(dev).pio_read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if let Some((off, dev)) = self.find_pio(port) {
            lock(dev).pio_write(off, data);
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.find_mmio(addr) {
            Some((off, dev)) => lock(dev).mmio_read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((off, dev)) = self.find_mmio(addr) {
            lock(dev).mmio_write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Vec<(u64, Vec<u8>)>);
    impl MmioDevice for Rec {
        fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn mmio_write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_ignores_unclaimed() {
        let dev = Arc::new(Mutex::new(Rec::default()));
        let mut bus = Bus::default();
        bus.add_mmio(0x1000, 0x100, dev.clone());
        bus.mmio_write(0x1010, &[1, 2]);
        bus.mmio_write(0x1100, &[3]); // one past the end
        let mut d = [0u8; 2];
        bus.mmio_read(0x1005, &mut d);
        assert_eq!(d, [5, 5]);
        bus.mmio_read(0x0fff, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(lock(&dev).0, vec![(0x10, vec![1, 2])]);
        let mut p = [0u8; 1];
        bus.pio_read(0x80, &mut p);
        assert_eq!(p, [0xff]);
    }
}
