//! vCPU set-up (CPUID, MSRs, registers for the PVH entry, FPU, LAPIC) and the run loop.

use crate::boot::BootEntry;
use crate::bus::Bus;
use crate::layout::GDT_ADDR;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use std::sync::{Arc, Condvar, Mutex};

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what}: {source}")]
    Kvm {
        id: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// What the host's KVM offers that every vCPU's set-up needs.
pub struct CpuTemplate {
    cpuid: CpuId,
    msrs: Vec<u32>,
    tsc_deadline: bool,
}

impl CpuTemplate {
    pub fn new(kvm: &Kvm) -> Result<Self, VcpuError> {
        let err = |what| {
            move |source| VcpuError::Kvm {
                id: 0,
                what,
                source,
            }
        };
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        let msrs = kvm
            .get_msr_index_list()
            .map_err(err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        Ok(CpuTemplate {
            cpuid,
            msrs,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        })
    }
}

/// KVM's supported CPUID, with this vCPU's APIC ID and the VM's topology filled in. The
/// hypervisor leaves (0x4000_0000..) stay as KVM reports them: PVM guests rely on them.
pub fn cpuid_for(template: &CpuTemplate, id: u32, count: u32) -> CpuId {
    let mut cpuid = template.cpuid.clone();
    let shift = 32 - count.saturating_sub(1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count.min(255) << 16);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical CPU per package
                }
                e.ecx |= 1 << 31; // running under a hypervisor
                if template.tsc_deadline {
                    e.ecx |= 1 << 24;
                }
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // SMT level, one thread per core
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1; // core level
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

fn segment(selector: u16, type_: u8, limit: u32, s: u8, db: u8, g: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l: 0,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Configures vCPU `id` of `count`; the boot CPU (0) also gets the PVH entry state.
pub fn configure(
    vcpu: &VcpuFd,
    template: &CpuTemplate,
    id: u32,
    count: u32,
    boot: &BootEntry,
) -> Result<(), VcpuError> {
    let err = |what| move |source| VcpuError::Kvm { id, what, source };
    vcpu.set_cpuid2(&cpuid_for(template, id, count))
        .map_err(err("KVM_SET_CPUID2"))?;

    // Only MSRs this KVM lists: PVM accepts a subset.
    if template.msrs.contains(&MSR_IA32_MISC_ENABLE) {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        }])
        .map_err(|_| VcpuError::Kvm {
            id,
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;

    if id == 0 {
        let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        sregs.cs = segment(0x08, 0xb, 0xffff_ffff, 1, 1, 1);
        let data = segment(0x10, 0x3, 0xffff_ffff, 1, 1, 1);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = segment(0x18, 0xb, 0x67, 0, 0, 0);
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (crate::boot::BOOT_GDT.len() * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = 0x11; // PE + ET: 32-bit protected mode, no paging (the PVH contract)
        sregs.cr4 = 0;
        sregs.efer = 0;
        vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;

        let mut regs = vcpu.get_regs().map_err(err("KVM_GET_REGS"))?;
        regs.rflags = 2;
        regs.rip = boot.entry.0;
        regs.rbx = boot.start_info.0;
        vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    }
    Ok(())
}

fn set_lvt(regs: &mut [libc::c_char; 1024], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest reset (reboot, power-off fallback, triple fault) or asked KVM to shut down.
    GuestShutdown,
    /// The VMM asked the vCPUs to stop.
    Stopped,
    /// KVM could not run the vCPU.
    Failed(String),
}

#[derive(Debug, Default)]
struct RunState {
    paused: bool,
    stop: bool,
    parked: usize,
}

/// Shared pause/stop control of all vCPU threads.
#[derive(Debug, Default)]
pub struct VcpuControl {
    state: Mutex<RunState>,
    changed: Condvar,
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks the calling vCPU thread while paused; returns true if it must stop.
    fn checkpoint(&self) -> bool {
        let mut s = self.lock();
        if s.paused && !s.stop {
            s.parked += 1;
            self.changed.notify_all();
            while s.paused && !s.stop {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked -= 1;
        }
        s.stop
    }

    pub fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
        self.changed.notify_all();
    }

    pub fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }

    pub fn is_stopping(&self) -> bool {
        self.lock().stop
    }

    /// Waits up to `timeout` for `n` vCPU threads to be parked; true if they are.
    pub fn wait_parked(&self, n: usize, timeout: std::time::Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.parked < n)
            .unwrap_or_else(|e| e.into_inner());
        s.parked >= n
    }
}

/// Runs the vCPU until the guest shuts down, the VMM stops it, or KVM fails.
pub fn run(mut vcpu: VcpuFd, id: u32, bus: Arc<Bus>, control: Arc<VcpuControl>) -> VcpuStop {
    if id == 0 {
        // Benchmarks compare this with the VMM's spawn time (same clock).
        tracing::info!(monotonic_ns = monotonic_ns(), "first KVM_RUN");
    }
    loop {
        if control.checkpoint() {
            return VcpuStop::Stopped;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::SystemEvent(..)) => {
                tracing::info!(vcpu = id, "guest shut down or reset");
                return VcpuStop::GuestShutdown;
            }
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VcpuStop::Failed(format!(
                    "vCPU {id}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                return VcpuStop::Failed(format!("vCPU {id}: KVM internal error"))
            }
            Ok(other) => return VcpuStop::Failed(format!("vCPU {id}: unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return VcpuStop::Failed(format!("vCPU {id}: KVM_RUN: {e}")),
        }
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass, which lives on our stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn template(entries: &[kvm_cpuid_entry2]) -> CpuTemplate {
        CpuTemplate {
            cpuid: CpuId::from_entries(entries).expect("cpuid"),
            msrs: vec![],
            tsc_deadline: true,
        }
    }

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology_are_per_vcpu() {
        let t = template(&[leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0x4000_0000, 0)]);
        let c = cpuid_for(&t, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3, "APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical count");
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_eq!((e[1].edx, e[1].ebx), (3, 1));
        assert_eq!((e[2].eax, e[2].ebx, e[2].edx), (2, 4, 3));
        assert_eq!(e[3], leaf(0x4000_0000, 0), "KVM signature untouched");
        let single = cpuid_for(&t, 0, 1);
        assert_eq!(single.as_slice()[0].edx & (1 << 28), 0);
    }

    #[test]
    fn lvt_mode_bits_are_replaced() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x7f; // mode bits set, plus others
        regs[APIC_LVT0 + 2] = 1; // mask bit region kept
        set_lvt(&mut regs, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x7c);
        assert_eq!(regs[APIC_LVT0 + 2], 1);
    }
}
