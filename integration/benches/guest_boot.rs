//! Guest boot benchmark: the guest image under QEMU microvm, 10 boots, to the agent's
//! ready line (guest uptime) and to power-off (host wall time). KVM where it boots stock
//! kernels, QEMU's software emulation otherwise; the accelerator is printed with the figures.

use cocoon_integration::qemu::{boot_guest, Accel, GuestSpec};
use cocoon_integration::stats::{median, quantile};
use cocoon_runtime::host::detect_kvm;
use std::process::ExitCode;

const RUNS: usize = 10;

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing we need.
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let kvm = detect_kvm();
    let accel = if kvm.boots_stock_kernel() {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let accel_name = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let (mut ready, mut wall) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        match boot_guest(&GuestSpec::selftest(accel)) {
            Ok(b) if b.ready.is_some() && !b.timed_out => {
                ready.push(b.ready.map(|r| r.uptime_ms as f64).unwrap_or_default());
                wall.push(b.wall.as_secs_f64() * 1000.0);
            }
            Ok(b) => {
                eprintln!("boot {i} failed:\n{}", b.console_text());
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("boot {i}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let fig = |name: &str, s: &[f64]| {
        println!(
            "bench.{name} accel={accel_name} runs={RUNS} median={:.0} p90={:.0}",
            median(s).unwrap_or(f64::NAN),
            quantile(s, 0.9).unwrap_or(f64::NAN)
        )
    };
    fig("qemu_microvm_guest_ready_uptime_ms", &ready);
    fig("qemu_microvm_boot_to_poweroff_wall_ms", &wall);
    ExitCode::SUCCESS
}
