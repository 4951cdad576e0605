//! COM1: an 8250/16550 UART (vm-superio) whose output goes to stdout, a file, or nowhere.

use super::{Irq, PioDevice};
use std::io::Write;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

impl Trigger for Irq {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        Irq::trigger(self)
    }
}

/// The guest console UART.
pub struct SerialConsole {
    uart: Serial<Irq, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(irq: Irq, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(irq, out),
        }
    }
}

impl PioDevice for SerialConsole {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            // A console write error (full disk, closed stdout) must not stop the guest.
            if let Err(e) = self.uart.write(off, *value) {
                tracing::debug!(error = %e, "serial write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let sink = Sink::default();
        let irq = Irq::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let mut s = SerialConsole::new(irq, Box::new(sink.clone()));
        for b in b"hi\n" {
            s.pio_write(0, &[*b]);
        }
        // Wide or out-of-range accesses are ignored, not fatal.
        s.pio_write(0, &[1, 2]);
        s.pio_write(300, &[1]);
        let mut wide = [0u8; 2];
        s.pio_read(5, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        let mut lsr = [0u8];
        s.pio_read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
        assert_eq!(sink.0.lock().expect("lock").as_slice(), b"hi\n");
    }
}
