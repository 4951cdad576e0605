//! VM-level tests: they need a KVM that boots stock Linux, so on hosts without one the
//! harness (`cocoon_integration::vmtest`) runs them all inside one test-lab boot.

use cocoon_agent_protocol::ReadyLine;
use cocoon_integration::qemu::{boot_guest, Accel, GuestSpec};
use cocoon_integration::testguest::{
    busybox_initramfs, busybox_initramfs_with, ext4_cat, ext4_image,
};
use cocoon_integration::vmtest::test;
use cocoon_integration::{paths, vmm};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use libtest_mimic::Failed;
use std::process::ExitCode;
use std::time::Duration;
use vmm::VmControlError;
use vmm_api::control::{ControlError, Request, Stats};

fn main() -> ExitCode {
    cocoon_integration::vmtest::main(vec![
        test("kvm_runs_real_mode_code", kvm_runs_real_mode_code),
        test(
            "guest_image_boots_under_qemu_kvm",
            guest_image_boots_under_qemu_kvm,
        ),
        test("vmm_boots_guest_to_ready", vmm_boots_guest_to_ready),
        test("vmm_smp_guest_sees_all_vcpus", vmm_smp_guest_sees_all_vcpus),
        test(
            "vmm_ext4_write_survives_shutdown",
            vmm_ext4_write_survives_shutdown,
        ),
        test(
            "vmm_read_only_disk_rejects_writes",
            vmm_read_only_disk_rejects_writes,
        ),
        test(
            "vmm_drive_swapped_into_empty_slot",
            vmm_drive_swapped_into_empty_slot,
        ),
        test(
            "vmm_control_pause_resume_stats_shutdown",
            vmm_control_pause_resume_stats_shutdown,
        ),
        test(
            "vmm_memory_the_guest_frees_goes_back_to_the_host",
            vmm_memory_the_guest_frees_goes_back_to_the_host,
        ),
        test("vmm_vsock_streams_both_ways", vmm_vsock_streams_both_ways),
        test(
            "vmm_vsock_slow_host_gets_all_guest_data",
            vmm_vsock_slow_host_gets_all_guest_data,
        ),
        test("vmm_net_tcp_both_ways", vmm_net_tcp_both_ways),
        test(
            "vmm_guest_reboot_and_panic_end_the_vmm",
            vmm_guest_reboot_and_panic_end_the_vmm,
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

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Base arguments: our kernel, the given initramfs, a quiet console.
fn vmm_args(initramfs: &std::path::Path, extra_cmdline: &str) -> Vec<String> {
    let mut a = strings(&["--kernel"]);
    a.push(paths::guest_vmlinux().display().to_string());
    a.push("--initramfs".into());
    a.push(initramfs.display().to_string());
    a.push("--cmdline".into());
    a.push(format!("quiet {extra_cmdline}"));
    a
}

fn check(cond: bool, what: &str, out: &vmm::VmmOutcome) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(format!("{what}\n{}", out.transcript()).into())
    }
}

/// Our VMM boots our kernel + agent to the ready line; the selftest power-off ends it with 0.
fn vmm_boots_guest_to_ready() -> Result<(), Failed> {
    let args = vmm_args(&paths::guest_initramfs(), "cocoon.selftest=1");
    let out = vmm::run(&args, BOOT_TIMEOUT)?;
    let ready = ReadyLine::find_in(&out.console.join("\n"));
    check(ready.is_some(), "no ready line", &out)?;
    check(out.code() == Some(0), "VMM did not exit 0", &out)?;
    eprintln!("cocoon-vmm: ready at {ready:?}, wall {:?}", out.wall);
    Ok(())
}

fn vmm_smp_guest_sees_all_vcpus() -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    let init = busybox_initramfs(
        dir.path(),
        "smp",
        "echo CPUS=$(grep -c ^processor /proc/cpuinfo); reboot -f",
    )?;
    let mut args = vmm_args(&init, "");
    args.extend(strings(&["--vcpus", "2", "--memory-mib", "128"]));
    let out = vmm::run(&args, BOOT_TIMEOUT)?;
    check(
        out.console.iter().any(|l| l == "CPUS=2"),
        "guest did not see 2 CPUs",
        &out,
    )?;
    check(
        out.code() == Some(0),
        "VMM did not exit 0 on guest reboot",
        &out,
    )
}

fn vmm_ext4_write_survives_shutdown() -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("data.ext4");
    ext4_image(&disk, 32)?;
    let init = busybox_initramfs(
        dir.path(),
        "write",
        "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo written-in-guest >/mnt/hello.txt \
         && umount /mnt && echo WRITE-OK; echo SERIAL=$(cat /sys/block/vda/serial); reboot -f",
    )?;
    let mut args = vmm_args(&init, "");
    args.extend([
        "--drive".into(),
        format!("path={},serial=data0", disk.display()),
    ]);
    let out = vmm::run(&args, BOOT_TIMEOUT)?;
    check(
        out.console.iter().any(|l| l == "WRITE-OK"),
        "guest write failed",
        &out,
    )?;
    check(
        out.console.iter().any(|l| l == "SERIAL=data0"),
        "wrong disk serial",
        &out,
    )?;
    check(out.code() == Some(0), "VMM did not exit 0", &out)?;
    let content = ext4_cat(&disk, "/hello.txt")?;
    check(
        content == "written-in-guest\n",
        &format!("host read {content:?}"),
        &out,
    )
}

fn vmm_read_only_disk_rejects_writes() -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("ro.ext4");
    ext4_image(&disk, 16)?;
    let before = std::fs::read(&disk)?;
    let init = busybox_initramfs(
        dir.path(),
        "ro",
        "echo RO=$(cat /sys/block/vda/ro); \
         if dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; then echo RAW-WRITE-ALLOWED; fi; \
         mkdir -p /mnt; mount -t ext4 -o ro /dev/vda /mnt && cat /mnt/lost+found/. 2>/dev/null; \
         if touch /mnt/x 2>/dev/null; then echo FS-WRITE-ALLOWED; fi; echo RO-DONE; reboot -f",
    )?;
    let mut args = vmm_args(&init, "");
    args.extend(["--drive".into(), format!("path={},ro", disk.display())]);
    let out = vmm::run(&args, BOOT_TIMEOUT)?;
    check(
        out.console.iter().any(|l| l == "RO-DONE"),
        "guest script did not finish",
        &out,
    )?;
    check(
        out.console.iter().any(|l| l == "RO=1"),
        "guest does not see a read-only disk",
        &out,
    )?;
    check(
        !out.console.iter().any(|l| l.contains("WRITE-ALLOWED")),
        "a write was allowed",
        &out,
    )?;
    check(std::fs::read(&disk)? == before, "the image changed", &out)
}

fn vmm_drive_swapped_into_empty_slot() -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("late.img");
    let mut data = b"swapped-in-at-runtime".to_vec();
    data.resize(1 << 20, 0);
    std::fs::write(&disk, &data)?;
    let sock = dir.path().join("vmm.sock");
    let init = busybox_initramfs(
        dir.path(),
        "swap",
        "echo SIZE0=$(cat /sys/block/vda/size); echo WAITING; \
         i=0; while [ \"$(cat /sys/block/vda/size)\" = 0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         echo SIZE1=$(cat /sys/block/vda/size); echo SERIAL=$(cat /sys/block/vda/serial); \
         echo DATA=$(dd if=/dev/vda bs=21 count=1 2>/dev/null); reboot -f",
    )?;
    let mut args = vmm_args(&init, "");
    args.extend(strings(&["--drive", "empty,ro", "--control-socket"]));
    args.push(sock.display().to_string());
    let mut vm = vmm::start(&args)?;
    if vm.wait_for(|l| l == "WAITING", BOOT_TIMEOUT).is_none() {
        let out = vm.finish(Duration::from_secs(1))?;
        return check(false, "guest never waited for the disk", &out);
    }
    let mode = std::fs::metadata(&sock)?.permissions();
    let bad_slot = vm.control(&Request::Swap {
        slot: 1,
        path: disk.clone(),
        read_only: false,
        serial: None,
    });
    let reply = vm.control(&Request::Swap {
        slot: 0,
        path: disk.clone(),
        read_only: true,
        serial: Some("late".into()),
    });
    let out = vm.finish(BOOT_TIMEOUT)?;
    check(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 == 0o600,
        "control socket is not 0600",
        &out,
    )?;
    check(
        matches!(&bad_slot, Err(VmControlError::Control(ControlError::Refused(m))) if m.contains("slot 1")),
        &format!("out-of-range slot not refused: {bad_slot:?}"),
        &out,
    )?;
    check(reply.is_ok(), &format!("swap failed: {reply:?}"), &out)?;
    check(
        out.console.iter().any(|l| l == "SIZE0=0"),
        "slot was not empty",
        &out,
    )?;
    check(
        out.console.iter().any(|l| l == "SIZE1=2048"),
        "new capacity not seen",
        &out,
    )?;
    check(
        out.console.iter().any(|l| l == "SERIAL=late"),
        "new serial not seen",
        &out,
    )?;
    check(
        out.console
            .iter()
            .any(|l| l == "DATA=swapped-in-at-runtime"),
        "guest did not read the swapped-in disk",
        &out,
    )?;
    check(out.code() == Some(0), "VMM did not exit 0", &out)
}

fn vmm_control_pause_resume_stats_shutdown() -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("vmm.sock");
    let init = busybox_initramfs(
        dir.path(),
        "ticker",
        "i=0; while true; do echo TICK=$i; i=$((i+1)); sleep 0.2; done",
    )?;
    let mut args = vmm_args(&init, "");
    args.extend(["--control-socket".into(), sock.display().to_string()]);
    let mut vm = vmm::start(&args)?;
    if vm
        .wait_for(|l| l.starts_with("TICK="), BOOT_TIMEOUT)
        .is_none()
    {
        let out = vm.finish(Duration::from_secs(1))?;
        return check(false, "guest never ticked", &out);
    }
    let paused = vm.control(&Request::Pause {});
    // Drain what was in flight, then a paused guest prints nothing.
    let _ = vm.wait_for(|_| false, Duration::from_millis(500));
    let silent = vm.wait_for(|l| l.starts_with("TICK="), Duration::from_secs(3));
    let stats = vm.control(&Request::Stats {})?;
    let resumed = vm.control(&Request::Resume {});
    let ticked = vm.wait_for(|l| l.starts_with("TICK="), Duration::from_secs(30));
    let bye = vm.control(&Request::Shutdown {});
    let out = vm.finish(Duration::from_secs(30))?;
    check(paused.is_ok(), &format!("pause: {paused:?}"), &out)?;
    check(
        silent.is_none(),
        &format!("paused guest still ran: {silent:?}"),
        &out,
    )?;
    check(
        stats
            .stats
            .as_ref()
            .is_some_and(|s| s.paused && s.guest_touched_kib > 1024 && s.vmm_rss_kib > 0),
        &format!("stats: {stats:?}"),
        &out,
    )?;
    check(
        resumed.is_ok() && ticked.is_some(),
        "guest did not resume",
        &out,
    )?;
    check(bye.is_ok(), &format!("shutdown: {bye:?}"), &out)?;
    check(
        out.code() == Some(0),
        "VMM did not exit 0 after shutdown",
        &out,
    )?;
    check(!sock.exists(), "control socket left behind", &out)
}

/// Free page reporting end to end: a guest fills 64 MiB of its tmpfs root, deletes the
/// file, and within seconds the host holds that much less of its memory.
fn vmm_memory_the_guest_frees_goes_back_to_the_host() -> Result<(), Failed> {
    const FILL_MIB: u64 = 64;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("vmm.sock");
    let init = busybox_initramfs(
        dir.path(),
        "filler",
        &format!(
            "dd if=/dev/zero of=/big bs=1M count={FILL_MIB} 2>/dev/null; echo FILLED; \
             sleep 2; rm /big; echo FREED; \
             while true; do sleep 1; done"
        ),
    )?;
    let mut args = vmm_args(&init, "");
    args.extend([
        "--memory-mib".into(),
        "256".into(),
        "--control-socket".into(),
        sock.display().to_string(),
    ]);
    let mut vm = vmm::start(&args)?;
    let stats = |vm: &vmm::RunningVmm| -> Result<Stats, String> {
        let reply = vm.control(&Request::Stats {}).map_err(|e| e.to_string())?;
        reply
            .stats
            .ok_or_else(|| "a stats reply without stats".into())
    };
    if vm.wait_for(|l| l == "FILLED", BOOT_TIMEOUT).is_none() {
        let out = vm.finish(Duration::from_secs(1))?;
        return check(false, "guest never filled its memory", &out);
    }
    let filled = stats(&vm)?;
    let freed = vm.wait_for(|l| l == "FREED", Duration::from_secs(60));
    // Linux reports freed blocks about 2 s later; the lab is slow.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut after = stats(&vm)?;
    while filled.guest_touched_kib < after.guest_touched_kib + FILL_MIB * 1024 * 3 / 4
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(500));
        after = stats(&vm)?;
    }
    let _ = vm.control(&Request::Shutdown {});
    let out = vm.finish(Duration::from_secs(30))?;
    check(freed.is_some(), "guest did not delete its file", &out)?;
    let what = format!("filled: {filled:?}\nafter: {after:?}");
    check(
        filled.guest_touched_kib >= FILL_MIB * 1024,
        &format!("the guest's {FILL_MIB} MiB never reached the host: {what}"),
        &out,
    )?;
    check(
        after.free_page_reported_kib >= FILL_MIB * 1024 * 3 / 4 && after.free_page_reports > 0,
        &format!("the guest reported too little free memory: {what}"),
        &out,
    )?;
    check(
        filled.guest_touched_kib >= after.guest_touched_kib + FILL_MIB * 1024 * 3 / 4,
        &format!("host memory did not drop by ~{FILL_MIB} MiB: {what}"),
        &out,
    )
}

fn vmm_guest_reboot_and_panic_end_the_vmm() -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    for (name, script) in [
        ("reboot", "echo REBOOTING; reboot -f"),
        // PID 1 exiting panics the kernel; panic=-1 resets at once.
        ("panic", "echo PANICKING; exit 1"),
    ] {
        let init = busybox_initramfs(dir.path(), name, script)?;
        let out = vmm::run(&vmm_args(&init, ""), BOOT_TIMEOUT)?;
        check(
            out.status.is_some(),
            &format!("{name}: VMM did not end"),
            &out,
        )?;
        check(
            out.code() == Some(0),
            &format!("{name}: VMM did not exit 0"),
            &out,
        )?;
    }
    Ok(())
}

fn probe() -> Result<std::path::PathBuf, Failed> {
    let p = paths::probe();
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} missing: run `make build/cocoon-vsock-probe`",
            p.display()
        )
        .into())
    }
}

/// vsock both ways: 128 concurrent host→guest echo streams and 8 guest→host ones with
/// checksummed (patterned) data, and a guest connect to a port with no listener resets.
fn vmm_vsock_streams_both_ways() -> Result<(), Failed> {
    use cocoon_integration::vsock::{connect, echo_check, echo_listener};
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("v.sock");
    let init = busybox_initramfs_with(
        dir.path(),
        "vsock",
        "cocoon-vsock-probe serve-echo vsock:5000 & \
         cocoon-vsock-probe connect-echo vsock:6000 8 262144; \
         cocoon-vsock-probe expect-reset 6001; echo GUEST-DONE; sleep 3600",
        &[(&probe()?, "bin/cocoon-vsock-probe")],
    )?;
    echo_listener(&uds, 6000)?;
    let mut args = vmm_args(&init, "");
    args.extend(["--vsock".into(), uds.display().to_string()]);
    args.extend([
        "--memory-mib".into(),
        "256".into(),
        "--vcpus".into(),
        "2".into(),
    ]);
    args.extend([
        "--control-socket".into(),
        dir.path().join("c.sock").display().to_string(),
    ]);
    let mut vm = vmm::start(&args)?;
    let done = vm.wait_for(|l| l == "GUEST-DONE", BOOT_TIMEOUT);
    let guest_side = vm.console.clone();
    // Host → guest: 128 streams at once, 64 KiB each, echoed and checked.
    let host_side: Vec<_> = (0..128u64)
        .map(|s| {
            let uds = uds.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let conn = connect(&uds, 5000).map_err(|e| format!("stream {s}: {e}"))?;
                echo_check(conn, s, 64 * 1024)
            })
        })
        .collect();
    let mut errors = Vec::new();
    for h in host_side {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("host stream panicked".into()),
        }
    }
    // One large stream host → guest → host.
    let big = connect(&uds, 5000).and_then(|c| echo_check(c, 999, 4 << 20));
    let _ = vm.control(&Request::Shutdown {});
    let out = vm.finish(Duration::from_secs(30))?;
    check(done.is_some(), "guest side did not finish", &out)?;
    check(
        guest_side
            .iter()
            .any(|l| l.starts_with("ECHO-OK streams=8")),
        "guest→host echo streams failed",
        &out,
    )?;
    check(
        guest_side.iter().any(|l| l == "RESET-OK"),
        "no reset for a port without listener",
        &out,
    )?;
    check(
        errors.is_empty(),
        &format!("host→guest streams failed: {errors:?}"),
        &out,
    )?;
    check(big.is_ok(), &format!("16 MiB stream: {big:?}"), &out)
}

/// A guest writes a stream and closes while the host is not reading: what does not fit
/// the Unix socket waits in the VMM. Linux resets the connection 8 s after its close when
/// the host side has not closed; a host that comes back after that must still read every
/// byte, then EOF (the VMM gives up only on a host that stays away 10 s).
fn vmm_vsock_slow_host_gets_all_guest_data() -> Result<(), Failed> {
    use std::io::{Read, Write};
    // More than the Unix socket holds, less than that plus the VMM's 256 KiB credit, so
    // the guest finishes writing and closes at once.
    const BYTES: u64 = 320 * 1024;
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("v.sock");
    let init = busybox_initramfs_with(
        dir.path(),
        "vsock-slow",
        "cocoon-vsock-probe serve-source vsock:5001 & sleep 1; echo GUEST-READY; sleep 3600",
        &[(&probe()?, "bin/cocoon-vsock-probe")],
    )?;
    let mut args = vmm_args(&init, "");
    args.extend(["--vsock".into(), uds.display().to_string()]);
    args.extend([
        "--control-socket".into(),
        dir.path().join("c.sock").display().to_string(),
    ]);
    let mut vm = vmm::start(&args)?;
    let ready = vm.wait_for(|l| l == "GUEST-READY", BOOT_TIMEOUT);
    let result = (|| -> Result<u64, String> {
        let mut c = cocoon_integration::vsock::connect(&uds, 5001)?;
        c.write_all(&BYTES.to_le_bytes())
            .map_err(|e| e.to_string())?;
        // Past the guest's close timeout, within the VMM's linger time.
        std::thread::sleep(Duration::from_millis(8800));
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        loop {
            let n = c
                .read(&mut buf)
                .map_err(|e| format!("read after {got}: {e}"))?;
            if n == 0 {
                return Ok(got);
            }
            if buf[..n].iter().any(|&b| b != 0x5a) {
                return Err(format!("unexpected bytes after {got}"));
            }
            got += n as u64;
        }
    })();
    let _ = vm.control(&Request::Shutdown {});
    let out = vm.finish(Duration::from_secs(30))?;
    check(ready.is_some(), "guest did not come up", &out)?;
    match result {
        Ok(got) => check(
            got == BYTES,
            &format!("host read {got} of {BYTES} bytes, then EOF"),
            &out,
        ),
        Err(e) => check(false, &e, &out),
    }
}

/// virtio-net over a TAP in a namespace of the test's own: TCP both ways between the guest
/// and a peer namespace, data verified.
fn vmm_net_tcp_both_ways() -> Result<(), Failed> {
    use cocoon_integration::netns::{self, NetLab};
    let dir = tempfile::tempdir()?;
    let probe = probe()?;
    let lab = NetLab::new(&format!("t{}", std::process::id()))?;
    let script = format!(
        "ip link set eth0 up; ip addr add {guest}/24 dev eth0; ip route add default via {tap}; \
         cocoon-vsock-probe serve-echo tcp:0:7000 & sleep 0.5; \
         cocoon-vsock-probe connect-echo tcp:{peer}:7001 4 1048576; echo GUEST-DONE; sleep 3600",
        guest = netns::GUEST_IP,
        tap = netns::TAP_IP,
        peer = netns::PEER_IP
    );
    let init = busybox_initramfs_with(
        dir.path(),
        "net",
        &script,
        &[(&probe, "bin/cocoon-vsock-probe")],
    )?;
    let mut peer = lab
        .command(
            &lab.b,
            &[&probe.display().to_string(), "serve-echo", "tcp:0:7001"],
        )
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let mut args = vmm_args(&init, "");
    args.extend([
        "--net".into(),
        format!("tap={},mac=02:00:00:00:00:02", netns::TAP),
    ]);
    args.extend([
        "--control-socket".into(),
        dir.path().join("c.sock").display().to_string(),
    ]);
    let mut vm = vmm::start_in(&["ip", "netns", "exec", &lab.a], &args)?;
    let done = vm.wait_for(|l| l == "GUEST-DONE", BOOT_TIMEOUT);
    eprintln!("net: guest side done after {:?}", vm.started.elapsed());
    let into_guest = lab
        .command(
            &lab.b,
            &[
                &probe.display().to_string(),
                "connect-echo",
                &format!("tcp:{}:7000", netns::GUEST_IP),
                "4",
                "1048576",
            ],
        )
        .output()?;
    eprintln!("net: peer side done after {:?}", vm.started.elapsed());
    let _ = vm.control(&Request::Shutdown {});
    let out = vm.finish(Duration::from_secs(30))?;
    let _ = peer.kill();
    let _ = peer.wait();
    let peer_says = String::from_utf8_lossy(&into_guest.stdout).into_owned();
    check(done.is_some(), "guest side did not finish", &out)?;
    check(
        out.console
            .iter()
            .any(|l| l.starts_with("ECHO-OK streams=4")),
        "guest → peer TCP failed",
        &out,
    )?;
    check(
        peer_says.starts_with("ECHO-OK streams=4"),
        &format!("peer → guest TCP failed: {peer_says}"),
        &out,
    )
}
