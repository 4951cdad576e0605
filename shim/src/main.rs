//! `containerd-shim-cocoon-v1`: the containerd shim v2 for Cocoon. The Task API arrives
//! with the shim issue; until then the binary answers containerd's version probe only.

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        // containerd runs `<shim> -v` to learn the shim's version.
        Some("-v") | Some("--version") => {
            println!(
                "containerd-shim-cocoon-v1:\n  Version: {}",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("containerd-shim-cocoon-v1: this build cannot serve the Task API yet");
            ExitCode::from(2)
        }
    }
}
