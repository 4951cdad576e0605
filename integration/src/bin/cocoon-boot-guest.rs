//! `cocoon-boot-guest`: boots the guest image once and shows its console, as a quick look
//! at the image. Uses KVM where it boots stock kernels, QEMU's software emulation otherwise.

use anyhow::{bail, Result};
use cocoon_integration::qemu::{boot_guest, Accel, GuestSpec};
use cocoon_runtime::host::detect_kvm;

fn main() -> Result<()> {
    let kvm = detect_kvm();
    let accel = if kvm.boots_stock_kernel() {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    println!("host: {kvm}; booting the guest image under QEMU microvm ({accel:?})");
    let mut spec = GuestSpec::selftest(accel);
    // Show the kernel's messages too: this is for people, not for timing.
    spec.cmdline_extra.push_str(" loglevel=7");
    let boot = boot_guest(&spec)?;
    for line in &boot.console {
        println!("guest| {line}");
    }
    match boot.ready {
        Some(r) => println!(
            "guest agent ready after {} ms of guest uptime; {:.2} s wall from QEMU start to power-off",
            r.uptime_ms,
            boot.wall.as_secs_f64()
        ),
        None => bail!("the guest never reported ready: {}", boot.qemu_stderr.trim()),
    }
    Ok(())
}
