//! Building and running one VM: KVM VM with in-kernel irqchip and PIT, guest memory,
//! boot state, devices, vCPU threads; pause, resume, drive swaps, stats and shutdown.

use crate::boot::{self, BootError};
use crate::bus::Bus;
use crate::config::VmConfig;
use crate::devices::balloon::Balloon;
use crate::devices::block::{Backing, Block, BlockError};
use crate::devices::net::{Net, Tap};
use crate::devices::serial::SerialConsole;
use crate::devices::virtio::mmio::{
    MmioTransport, MAX_NOTIFY_FDS, NOTIFY_TAG_BASE, QUEUE_NOTIFY_OFFSET,
};
use crate::devices::virtio::VirtioDevice;
use crate::devices::vsock::Vsock;
use crate::devices::{GuestMemory, Irq};
use crate::event_loop::{EventLoop, LoopStopper, Registrar};
use crate::layout::*;
use crate::mptable::{self, MpTableError};
use crate::vcpu::{self, CpuTemplate, VcpuControl, VcpuError, VcpuStop};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_api::control::{SlotStats, Stats};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory of {mib} MiB: {why}")]
    Memory { mib: u64, why: String },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("drive slot {slot}: {source}")]
    Drive { slot: usize, source: BlockError },
    #[error("drive slot {slot} does not exist (this VM has {count} slots)")]
    NoSuchSlot { slot: usize, count: usize },
    #[error("vsock {path}: {why}")]
    Vsock {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("net: {0}")]
    Net(String),
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off, rebooted or reset.
    GuestShutdown,
    /// A control-socket shutdown request.
    ControlShutdown,
    /// A vCPU failed.
    Failed(String),
}

type Drive = Arc<Mutex<MmioTransport<Block>>>;
type BalloonDevice = Arc<Mutex<MmioTransport<Balloon>>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running VM.
pub struct Vm {
    _vm: VmFd,
    mem: GuestMemory,
    config: VmConfig,
    control: Arc<VcpuControl>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    drives: Vec<Drive>,
    balloon: BalloonDevice,
    paused: Mutex<bool>,
    exit_evt: EventFd,
    exit: Mutex<Option<VmExit>>,
    io: Mutex<Option<(JoinHandle<()>, LoopStopper)>>,
}

/// What [`Vm::build`] makes before the vCPUs start.
struct Built {
    bus: Arc<Bus>,
    drives: Vec<Drive>,
    balloon: BalloonDevice,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    io: EventLoop,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The kernel command line: the VMM's essentials, one `virtio_mmio.device=` per drive slot,
/// then the user's part (later parameters win).
pub fn kernel_cmdline(config: &VmConfig) -> String {
    let mut c = String::from("console=ttyS0 reboot=t panic=-1 pci=off acpi=off");
    let devices = config.drives.len()
        + usize::from(config.vsock.is_some())
        + usize::from(config.net.is_some())
        + 1; // the balloon (free page reporting), always last
    for i in 0..devices {
        c += &format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
            VIRTIO_IRQ_BASE + i as u32
        );
    }
    if !config.cmdline.is_empty() {
        c.push(' ');
        c += &config.cmdline;
    }
    c
}

impl Vm {
    /// Creates the VM from a validated configuration and starts its vCPUs.
    pub fn start(kvm: &Kvm, config: &VmConfig) -> Result<Arc<Vm>, VmError> {
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem = create_memory(config.memory_mib)?;
        // Registering memory with KVM takes milliseconds (an SRCU grace period); it only
        // has to be done before the first KVM_RUN, so it overlaps the rest of the set-up.
        let Built {
            bus,
            drives,
            balloon,
            vcpus,
            io,
        } = std::thread::scope(|scope| {
            let registration = scope.spawn(|| register_memory(&vm, &mem, config.memory_mib));
            let rest = Self::build(kvm, &vm, &mem, config);
            let registered = registration.join().unwrap_or_else(|_| {
                Err(VmError::Memory {
                    mib: config.memory_mib,
                    why: "memory registration thread panicked".into(),
                })
            });
            registered.and(rest)
        })?;

        let this = Arc::new(Vm {
            _vm: vm,
            mem,
            config: config.clone(),
            control: Arc::new(VcpuControl::default()),
            threads: Mutex::new(Vec::new()),
            drives,
            balloon,
            paused: Mutex::new(false),
            exit_evt: EventFd::new(0).map_err(io_err("exit eventfd"))?,
            exit: Mutex::new(None),
            io: Mutex::new(None),
        });
        let io = io.spawn().map_err(io_err("spawning the I/O thread"))?;
        *lock(&this.io) = Some(io);
        for (id, fd) in vcpus.into_iter().enumerate() {
            let (bus, control, vm) = (bus.clone(), this.control.clone(), Arc::downgrade(&this));
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let stop = vcpu::run(fd, id as u32, bus, control);
                    if let Some(vm) = vm.upgrade() {
                        match stop {
                            VcpuStop::Stopped => {}
                            VcpuStop::GuestShutdown => vm.finish(VmExit::GuestShutdown),
                            VcpuStop::Failed(why) => {
                                tracing::error!(%why, "vCPU failed");
                                vm.finish(VmExit::Failed(why))
                            }
                        }
                    }
                })
                .map_err(io_err(format!("spawning vCPU thread {id}")))?;
            lock(&this.threads).push(handle);
        }
        tracing::info!(
            vcpus = config.vcpus,
            memory_mib = config.memory_mib,
            slots = config.drives.len(),
            cmdline = %kernel_cmdline(config),
            "VM started"
        );
        Ok(this)
    }

    /// Boot state, devices and configured vCPUs.
    fn build(kvm: &Kvm, vm: &VmFd, mem: &GuestMemory, config: &VmConfig) -> Result<Built, VmError> {
        let mut io = EventLoop::new().map_err(io_err("creating the I/O loop"))?;
        mptable::write(mem, config.vcpus)?;
        let cmdline = kernel_cmdline(config);
        let entry = boot::load(mem, &config.kernel, config.initramfs.as_deref(), &cmdline)?;

        let mut bus = Bus::default();
        let serial_out: Box<dyn Write + Send> = match config.serial.as_str() {
            "stdout" => Box::new(std::io::stdout()),
            "none" => Box::new(std::io::sink()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io_err(format!("serial output {path}")))?,
            ),
        };
        let serial = SerialConsole::new(irq(vm, COM1_IRQ)?, serial_out);
        bus.add_pio(COM1_PORT, 8, Arc::new(Mutex::new(serial)));

        let mut drives = Vec::new();
        for (slot, d) in config.drives.iter().enumerate() {
            let serial = d.serial.clone().unwrap_or_else(|| format!("slot{slot}"));
            let mut block = Block::new(d.read_only, &serial);
            if let Some(path) = &d.path {
                block
                    .swap(Some(Backing {
                        path: path.clone(),
                        read_only: d.read_only,
                        serial: None,
                    }))
                    .map_err(|source| VmError::Drive { slot, source })?;
            }
            let gsi = VIRTIO_IRQ_BASE + slot as u32;
            let transport = MmioTransport::new(block, mem.clone(), irq(vm, gsi)?);
            let drive = Arc::new(Mutex::new(transport));
            let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE;
            bus.add_mmio(base, VIRTIO_MMIO_SIZE, drive.clone());
            drives.push(drive);
        }
        let mut index = drives.len();
        if let Some(v) = &config.vsock {
            let gsi = VIRTIO_IRQ_BASE + index as u32;
            let vsock =
                Vsock::new(v.cid, v.path.clone(), io.registrar(index as u32)).map_err(|e| {
                    VmError::Vsock {
                        path: v.path.clone(),
                        why: e.to_string(),
                    }
                })?;
            let mut t = MmioTransport::new(vsock, mem.clone(), irq(vm, gsi)?);
            let queues = t.device().queue_max_sizes().len();
            t.set_notify_fds(notify_fds(vm, &io.registrar(index as u32), index, queues));
            let t = Arc::new(Mutex::new(t));
            add_virtio(&mut bus, &mut io, &mut index, t.clone(), t);
        }
        if let Some(n) = &config.net {
            let gsi = VIRTIO_IRQ_BASE + index as u32;
            let tap = match (&n.tap, n.fd) {
                (Some(name), _) => Tap::open(name),
                (None, Some(fd)) => {
                    // SAFETY: the parent passed this fd for us to own (validated open in
                    // config); nothing else in this process uses it.
                    let owned = unsafe {
                        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
                    };
                    Tap::from_fd(owned)
                }
                (None, None) => return Err(VmError::Net("no TAP given".into())),
            }
            .map_err(|e| VmError::Net(error_chain(&e)))?;
            let mac = n
                .mac
                .as_deref()
                .and_then(crate::config::parse_mac)
                .unwrap_or_else(default_mac);
            let net = Net::new(tap, mac, io.registrar(index as u32))
                .map_err(|e| VmError::Net(error_chain(&e)))?;
            let mut t = MmioTransport::new(net, mem.clone(), irq(vm, gsi)?);
            let queues = t.device().queue_max_sizes().len();
            t.set_notify_fds(notify_fds(vm, &io.registrar(index as u32), index, queues));
            let t = Arc::new(Mutex::new(t));
            add_virtio(&mut bus, &mut io, &mut index, t.clone(), t);
        }
        // Free page reporting: notifications exit to this device on the vCPU thread (a
        // report is a few madvise calls, seconds apart).
        let gsi = VIRTIO_IRQ_BASE + index as u32;
        let balloon = Arc::new(Mutex::new(MmioTransport::new(
            Balloon::new(),
            mem.clone(),
            irq(vm, gsi)?,
        )));
        let base = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE;
        bus.add_mmio(base, VIRTIO_MMIO_SIZE, balloon.clone());
        let bus = Arc::new(bus);

        // vCPU threads are kicked out of KVM_RUN with this signal to pause or stop.
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| VmError::Io {
            what: "registering the vCPU kick signal".into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let template = CpuTemplate::new(kvm)?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm
                .create_vcpu(id as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu::configure(&fd, &template, id, config.vcpus, &entry)?;
            vcpus.push(fd);
        }

        Ok(Built {
            bus,
            drives,
            balloon,
            vcpus,
            io,
        })
    }

    /// Records why the VM ends (the first reason wins) and wakes [`Vm::wait`].
    pub fn finish(&self, why: VmExit) {
        let mut exit = lock(&self.exit);
        if exit.is_none() {
            *exit = Some(why);
            let _ = self.exit_evt.write(1);
        }
    }

    /// Blocks until the VM ends, then stops every vCPU and flushes writable disks.
    pub fn wait(&self) -> VmExit {
        while lock(&self.exit).is_none() {
            let _ = self.exit_evt.read();
        }
        self.stop_vcpus();
        if let Some((thread, stopper)) = lock(&self.io).take() {
            stopper.stop();
            let _ = thread.join();
        }
        for (slot, d) in self.drives.iter().enumerate() {
            if let Err(e) = lock(d).device_mut().flush() {
                tracing::error!(slot, error = %e, "flushing drive at shutdown");
            }
        }
        lock(&self.exit).clone().unwrap_or(VmExit::GuestShutdown)
    }

    fn kick_all(&self) {
        for t in lock(&self.threads).iter() {
            let _ = t.kill(SIGRTMIN());
        }
    }

    fn stop_vcpus(&self) {
        self.control.stop();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in &threads {
            while !t.is_finished() {
                let _ = t.kill(SIGRTMIN());
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for t in threads {
            let _ = t.join();
        }
    }

    /// Stops all vCPUs at their next exit (they are kicked out of the guest).
    pub fn pause(&self) -> Result<(), VmError> {
        let mut paused = lock(&self.paused);
        if *paused {
            return Ok(());
        }
        self.control.set_paused(true);
        let n = lock(&self.threads).len();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            self.kick_all();
            if self.control.wait_parked(n, Duration::from_millis(2)) {
                break;
            }
            if std::time::Instant::now() > deadline || self.control.is_stopping() {
                self.control.set_paused(false);
                return Err(VmError::PauseTimeout(Duration::from_secs(5)));
            }
        }
        *paused = true;
        Ok(())
    }

    pub fn resume(&self) {
        let mut paused = lock(&self.paused);
        self.control.set_paused(false);
        *paused = false;
    }

    /// Puts `backing` into drive `slot` (or empties it) and tells the guest.
    pub fn swap_drive(&self, slot: usize, backing: Option<Backing>) -> Result<(), VmError> {
        let drive = self.drives.get(slot).ok_or(VmError::NoSuchSlot {
            slot,
            count: self.drives.len(),
        })?;
        let mut t = lock(drive);
        t.device_mut()
            .swap(backing)
            .map_err(|source| VmError::Drive { slot, source })?;
        t.config_changed();
        Ok(())
    }

    /// The VM's resource use and state, in the control protocol's terms.
    pub fn stats(&self) -> Stats {
        let touched = self.guest_touched_bytes();
        let rss = process_rss_bytes().unwrap_or(0);
        let (reported, reports) = {
            let b = lock(&self.balloon);
            (b.device().reported_bytes(), b.device().reports())
        };
        Stats {
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            paused: *lock(&self.paused),
            vmm_rss_kib: rss.saturating_sub(touched) / 1024,
            guest_touched_kib: touched / 1024,
            free_page_reported_kib: reported / 1024,
            free_page_reports: reports,
            slots: self
                .drives
                .iter()
                .enumerate()
                .map(|(slot, d)| {
                    let t = lock(d);
                    let b = t.device();
                    SlotStats {
                        slot,
                        serial: b.serial().to_string(),
                        read_only: b.is_read_only(),
                        capacity_sectors: b.capacity_sectors(),
                    }
                })
                .collect(),
        }
    }

    /// Guest memory this process has resident: the Rss of every mapping inside the guest
    /// regions (anonymous pages the guest touched, and kernel/initramfs file pages it
    /// mapped), from /proc/self/smaps.
    fn guest_touched_bytes(&self) -> u64 {
        let ranges: Vec<(u64, u64)> = self
            .mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()? as u64;
                Some((host, host + r.len()))
            })
            .collect();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        rss_within(&smaps, &ranges)
    }
}

/// Sums `Rss:` of the smaps entries that lie inside one of `ranges` (host addresses).
fn rss_within(smaps: &str, ranges: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = ranges.iter().any(|(lo, hi)| start >= *lo && end <= *hi);
                continue;
            }
        }
        if inside {
            if let Some(kib) = line.strip_prefix("Rss:") {
                let kib: u64 = kib
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                total += kib * 1024;
            }
        }
    }
    total
}

fn process_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// An error with its causes: "what: why: deeper why".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    text
}

/// Puts virtio device number `index` on the bus and its back-end on the I/O loop.
fn add_virtio(
    bus: &mut Bus,
    io: &mut EventLoop,
    index: &mut usize,
    dev: Arc<Mutex<dyn crate::devices::MmioDevice>>,
    handler: Arc<Mutex<dyn crate::event_loop::BackendHandler>>,
) {
    let base = VIRTIO_MMIO_BASE + *index as u64 * VIRTIO_MMIO_SIZE;
    bus.add_mmio(base, VIRTIO_MMIO_SIZE, dev);
    io.set_handler(*index as u32, handler);
    *index += 1;
}

/// Eventfds KVM signals when the guest writes queue `i`'s index to the QueueNotify
/// register of virtio device `index` (KVM_IOEVENTFD), watched by the I/O loop: a
/// notification then costs no exit to user space and is handled off the vCPU thread.
/// Empty (notifications stay MMIO exits) when KVM refuses, which is logged.
fn notify_fds(vm: &VmFd, registrar: &Registrar, index: usize, queues: usize) -> Vec<EventFd> {
    let addr = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE + QUEUE_NOTIFY_OFFSET;
    let mut fds = Vec::new();
    for queue in 0..queues.min(MAX_NOTIFY_FDS) as u32 {
        // Watched first, then registered with KVM: a failure leaves nothing behind that
        // could swallow a notification.
        let registered = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| e.to_string())
            .and_then(|fd| {
                registrar
                    .add(fd.as_raw_fd(), NOTIFY_TAG_BASE + queue, EventSet::IN)
                    .map(|()| fd)
                    .map_err(|e| format!("I/O loop: {e}"))
            })
            .and_then(
                |fd| match vm.register_ioevent(&fd, &IoEventAddress::Mmio(addr), queue) {
                    Ok(()) => Ok(fd),
                    Err(e) => {
                        let _ = registrar.remove(fd.as_raw_fd());
                        Err(format!("KVM_IOEVENTFD: {e}"))
                    }
                },
            );
        match registered {
            Ok(fd) => fds.push(fd),
            Err(why) => {
                tracing::warn!(
                    device = index,
                    queue,
                    why,
                    "virtio-mmio: no ioeventfd, queue notifications exit to the VMM"
                );
                for (q, fd) in fds.iter().enumerate() {
                    let _ = registrar.remove(fd.as_raw_fd());
                    let _ = vm.unregister_ioevent(fd, &IoEventAddress::Mmio(addr), q as u32);
                }
                return Vec::new();
            }
        }
    }
    fds
}

/// A locally administered unicast MAC, different per VMM process.
fn default_mac() -> [u8; 6] {
    let pid = std::process::id().to_be_bytes();
    [0x02, 0xc0, pid[0], pid[1], pid[2], pid[3]]
}

/// An interrupt line: an eventfd registered as irqfd for `gsi`.
fn irq(vm: &VmFd, gsi: u32) -> Result<Irq, VmError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("irq eventfd"))?;
    vm.register_irqfd(&fd, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(Irq::new(fd))
}

/// Anonymous guest memory, mapped with MAP_NORESERVE: untouched pages cost the host nothing.
fn create_memory(mib: u64) -> Result<GuestMemory, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mib << 20)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|e| VmError::Memory {
        mib,
        why: e.to_string(),
    })
}

/// Hands guest memory to KVM, one memslot per region.
fn register_memory(vm: &VmFd, mem: &GuestMemory, mib: u64) -> Result<(), VmError> {
    for (slot, r) in mem.iter().enumerate() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory {
                mib,
                why: e.to_string(),
            })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region describes a live mapping owned by `mem`, which the VM struct
        // keeps for as long as the VM (and so KVM's use of the mapping) exists.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DriveConfig;

    #[test]
    fn smaps_rss_is_summed_inside_guest_ranges_only() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 100 kB
7f0000100000-7f0000200000 rw-p 00200000 08:01 42 /vmlinux
Rss:                  20 kB
7f0000300000-7f0000400000 rw-p 00000000 00:00 0
Rss:                 999 kB
VmFlags: rd wr
";
        let ranges = [(0x7f00_0000_0000, 0x7f00_0020_0000)];
        assert_eq!(rss_within(smaps, &ranges), 120 * 1024);
        assert_eq!(rss_within("garbage\nRss: 5 kB\n", &ranges), 0);
    }

    #[test]
    fn cmdline_declares_each_slot_and_keeps_the_users_part_last() {
        let mut c = VmConfig::from_args(&["--kernel".into(), "/k".into()]).expect("cfg");
        c.cmdline = "quiet".into();
        c.drives = vec![
            DriveConfig {
                path: None,
                read_only: true,
                serial: None
            };
            2
        ];
        let s = kernel_cmdline(&c);
        assert!(s.starts_with("console=ttyS0 reboot=t panic=-1"), "{s}");
        assert!(s.contains("virtio_mmio.device=4K@0xd0000000:5"), "{s}");
        assert!(s.contains("virtio_mmio.device=4K@0xd0001000:6"), "{s}");
        assert!(s.ends_with(" quiet"), "{s}");
    }
}
