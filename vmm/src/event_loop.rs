//! The VMM's I/O thread: one epoll loop that wakes device back-ends (host sockets, TAP)
//! so that host-side I/O never runs on, or blocks, a vCPU thread.
//!
//! A device gets a [`Registrar`] when it is created and registers its host fds with a
//! 32-bit tag of its own choosing; when one becomes ready, the loop calls
//! [`BackendHandler::handle`] on the device's handler (its MMIO transport) with that tag.

use std::collections::HashMap;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Something that handles readiness of the fds it registered.
pub trait BackendHandler: Send {
    /// `tag` is what the device registered the fd with; `events` what is ready.
    fn handle(&mut self, tag: u32, events: EventSet);
}

/// A device's handle on the loop: adds, changes and removes its fds.
#[derive(Clone)]
pub struct Registrar {
    epoll: Arc<Epoll>,
    device: u32,
}

impl Registrar {
    fn event(&self, tag: u32, events: EventSet) -> EpollEvent {
        EpollEvent::new(events, (u64::from(self.device) << 32) | u64::from(tag))
    }

    /// Starts watching `fd` for `events`, reported with `tag`.
    pub fn add(&self, fd: RawFd, tag: u32, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, self.event(tag, events))
    }

    /// Changes the events watched on `fd` (e.g. stop reading while the guest has no room).
    pub fn modify(&self, fd: RawFd, tag: u32, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, self.event(tag, events))
    }

    /// Stops watching `fd`. Call before closing it.
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// A registrar for tests: a real epoll nobody waits on.
    pub fn detached() -> std::io::Result<Self> {
        Ok(Registrar {
            epoll: Arc::new(Epoll::new()?),
            device: 0,
        })
    }
}

const STOP: u64 = u64::MAX;

/// The loop and the handlers registered with it.
pub struct EventLoop {
    epoll: Arc<Epoll>,
    handlers: HashMap<u32, Arc<Mutex<dyn BackendHandler>>>,
    stop: EventFd,
}

/// Stops a running loop.
pub struct LoopStopper {
    stop: EventFd,
}

impl LoopStopper {
    pub fn stop(&self) {
        let _ = self.stop.write(1);
    }
}

impl EventLoop {
    pub fn new() -> std::io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::unix::io::AsRawFd::as_raw_fd(&stop),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        Ok(EventLoop {
            epoll,
            handlers: HashMap::new(),
            stop,
        })
    }

    /// A registrar for the next device; pass its handler to [`EventLoop::set_handler`].
    pub fn registrar(&self, device: u32) -> Registrar {
        Registrar {
            epoll: self.epoll.clone(),
            device,
        }
    }

    pub fn set_handler(&mut self, device: u32, handler: Arc<Mutex<dyn BackendHandler>>) {
        self.handlers.insert(device, handler);
    }

    /// Runs the loop on a new thread until the stopper is used.
    pub fn spawn(self) -> std::io::Result<(std::thread::JoinHandle<()>, LoopStopper)> {
        let stopper = LoopStopper {
            stop: self.stop.try_clone()?,
        };
        let handle = std::thread::Builder::new()
            .name("io".into())
            .spawn(move || self.run())?;
        Ok((handle, stopper))
    }

    fn run(self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed; I/O thread stops");
                    return;
                }
            };
            for ev in &events[..n] {
                let data = ev.data();
                if data == STOP {
                    return;
                }
                let (device, tag) = ((data >> 32) as u32, data as u32);
                if let Some(h) = self.handlers.get(&device) {
                    h.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .handle(tag, ev.event_set());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    struct Seen(Arc<Mutex<Vec<(u32, bool)>>>, EventFd);
    impl BackendHandler for Seen {
        fn handle(&mut self, tag: u32, events: EventSet) {
            let _ = self.1.read();
            self.0
                .lock()
                .expect("lock")
                .push((tag, events.contains(EventSet::IN)));
        }
    }

    #[test]
    fn ready_fds_reach_their_device_with_their_tag() {
        let mut lp = EventLoop::new().expect("loop");
        let reg = lp.registrar(7);
        let fd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let seen = Arc::new(Mutex::new(Vec::new()));
        reg.add(fd.as_raw_fd(), 42, EventSet::IN).expect("add");
        let h = Seen(seen.clone(), fd.try_clone().expect("clone"));
        lp.set_handler(7, Arc::new(Mutex::new(h)));
        let (thread, stopper) = lp.spawn().expect("spawn");
        fd.write(1).expect("write");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while seen.lock().expect("lock").is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        stopper.stop();
        thread.join().expect("join");
        assert_eq!(seen.lock().expect("lock").first(), Some(&(42, true)));
    }
}
