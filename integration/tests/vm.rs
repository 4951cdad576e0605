//! VM-level tests: they need a KVM that boots stock Linux, so on hosts without one the
//! harness (`cocoon_integration::vmtest`) runs them all inside one test-lab boot.

use cocoon_integration::qemu::{boot_guest, Accel, GuestSpec};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use libtest_mimic::{Failed, Trial};
use std::process::ExitCode;

fn main() -> ExitCode {
    cocoon_integration::vmtest::main(vec![
        Trial::test("kvm_runs_real_mode_code", kvm_runs_real_mode_code),
        Trial::test(
            "guest_image_boots_under_qemu_kvm",
            guest_image_boots_under_qemu_kvm,
        ),
    ])
}

/// A minimal KVM program: one vCPU runs `out 0x3f8, 'K'; hlt` in real mode.
fn kvm_runs_real_mode_code() -> Result<(), Failed> {
    const CODE: [u8; 6] = [0xba, 0xf8, 0x03, 0xb0, b'K', 0xee]; // mov dx,0x3f8; mov al,'K'; out dx,al
    const HLT: u8 = 0xf4;
    const GUEST_ADDR: u64 = 0x1000;
    const SIZE: usize = 0x1000;

    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    // SAFETY: an anonymous private mapping with no address hint; the result is checked.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap guest memory".into());
    }
    let mut program = CODE.to_vec();
    program.push(HLT);
    // SAFETY: `mem` is a fresh SIZE-byte writable mapping and the program is shorter.
    unsafe { std::ptr::copy_nonoverlapping(program.as_ptr(), mem.cast::<u8>(), program.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: GUEST_ADDR,
        memory_size: SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region points at our live mapping of exactly `memory_size` bytes, which
    // stays mapped for the VM's lifetime (it is never unmapped in this test).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("set memory: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("create vCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("get sregs: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("set sregs: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("get regs: {e}"))?;
    regs.rip = GUEST_ADDR;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(|e| format!("set regs: {e}"))?;

    let mut seen = Vec::new();
    for _ in 0..16 {
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::IoOut(port, data) => seen.push((port, data.to_vec())),
            VcpuExit::Hlt => {
                return if seen == [(0x3f8, vec![b'K'])] {
                    Ok(())
                } else {
                    Err(format!("unexpected port writes before hlt: {seen:?}").into())
                };
            }
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    }
    Err("the vCPU never halted".into())
}

/// The guest image boots on this KVM under QEMU microvm to the agent's ready line.
fn guest_image_boots_under_qemu_kvm() -> Result<(), Failed> {
    let boot = boot_guest(&GuestSpec::selftest(Accel::Kvm)).map_err(|e| e.to_string())?;
    let console = boot.console_text();
    let ready = boot
        .ready
        .ok_or_else(|| format!("no ready line:\n{console}\n{}", boot.qemu_stderr))?;
    if boot.status.and_then(|s| s.code()) != Some(0) {
        return Err(format!(
            "QEMU did not power off cleanly ({:?}):\n{console}",
            boot.status
        )
        .into());
    }
    eprintln!(
        "guest ready at uptime {} ms; QEMU wall {:?}",
        ready.uptime_ms, boot.wall
    );
    Ok(())
}
