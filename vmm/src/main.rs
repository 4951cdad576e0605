//! `cocoon-vmm`: the per-pod KVM VMM. Booting guests arrives with the VMM issue; until
//! then the binary only identifies itself, so packaging and install paths can be wired.

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--version") | Some("-V") => {
            println!("cocoon-vmm {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("cocoon-vmm: this build cannot run VMs yet (only --version is supported)");
            ExitCode::from(2)
        }
    }
}
