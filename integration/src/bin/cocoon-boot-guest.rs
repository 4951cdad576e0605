//! `cocoon-boot-guest`: boots the guest image with `cocoon-vmm` and shows its console. On
//! hosts whose KVM cannot boot a stock kernel (PVM, none) it says so and does the same
//! inside the test lab.

use cocoon_agent_protocol::ReadyLine;
use cocoon_integration::vmtest::{placement, rerun_in_lab, Placement};
use cocoon_integration::{paths, vmm};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    match placement() {
        Placement::Here { kvm, in_lab } => {
            let place = if in_lab { " (inside the test lab)" } else { "" };
            println!("host: {kvm}{place}; booting the guest with cocoon-vmm");
            boot()
        }
        Placement::Lab { kvm } => {
            println!("host: {kvm}\nThis host's KVM cannot boot a stock Linux guest; running the demo inside the test lab.");
            rerun_in_lab("demo", Duration::from_secs(600))
        }
        Placement::Broken { kvm } => {
            eprintln!("KVM inside the test lab is unusable: {kvm}");
            ExitCode::FAILURE
        }
    }
}

fn boot() -> ExitCode {
    let args: Vec<String> = [
        "--kernel",
        &paths::guest_vmlinux().display().to_string(),
        "--initramfs",
        &paths::guest_initramfs().display().to_string(),
        "--vcpus",
        "2",
        "--memory-mib",
        "256",
        // Kernel messages shown: this is for people, not for timing.
        "--cmdline",
        "cocoon.selftest=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = match vmm::run(&args, Duration::from_secs(300)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cannot run {}: {e}", vmm::vmm_binary().display());
            return ExitCode::FAILURE;
        }
    };
    for line in &out.console {
        println!("guest| {line}");
    }
    match (ReadyLine::find_in(&out.console.join("\n")), out.code()) {
        (Some(r), Some(0)) => {
            println!(
                "guest agent ready after {} ms of guest uptime; cocoon-vmm ran {:.2} s and exited 0",
                r.uptime_ms,
                out.wall.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("the guest did not come up:\n{}", out.transcript());
            ExitCode::FAILURE
        }
    }
}
