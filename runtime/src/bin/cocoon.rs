//! `cocoon`: the operator CLI. For now: `cocoon check`, the host readiness report.

use anyhow::{bail, Result};
use cocoon_runtime::host::{detect_kvm, Kvm};

const HELP: &str = "\
cocoon: operate Cocoon, the microVM runtime for containerd

Usage: cocoon <command>

Commands:
  check     Report whether this host can run Cocoon sandboxes, with a fix hint per problem
  help      Show this text
";

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("check") => check(),
        Some("help") | Some("--help") | Some("-h") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown command '{other}'; see `cocoon help`"),
    }
}

fn check() -> Result<()> {
    let kvm = detect_kvm();
    let hint = match &kvm {
        Kvm::Hardware { .. } => None,
        Kvm::Pvm | Kvm::Unknown => Some(
            "stock guest kernels need hardware virtualization: enable nested virtualization \
             on this VM or use bare metal; tests on this host run inside the test lab (make test-vm)",
        ),
        Kvm::Absent => Some("load kvm_intel or kvm_amd (modprobe) and check /dev/kvm permissions"),
    };
    let mark = if hint.is_none() { "ok  " } else { "FAIL" };
    println!("{mark} kvm: {kvm}");
    match hint {
        None => Ok(()),
        Some(h) => {
            println!("     fix: {h}");
            bail!("host is not ready for Cocoon sandboxes")
        }
    }
}
