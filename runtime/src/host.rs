//! What this host's KVM can do.
//!
//! Hardware KVM (the CPU has vmx or svm) boots any Linux guest. PVM (`kvm_pvm`, a
//! paravirtual KVM used where nested virtualization is off) exposes the same /dev/kvm API
//! but boots only PVM-patched guest kernels, so a stock guest kernel cannot run there.

use std::fmt;
use std::path::Path;

/// The flavour of KVM this host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kvm {
    /// Hardware virtualization (`vmx` or `svm`) behind /dev/kvm: stock guests boot.
    Hardware { cpu_flag: &'static str },
    /// /dev/kvm is served by `kvm_pvm`: VMs can be created but stock kernels do not boot.
    Pvm,
    /// /dev/kvm exists but the CPU shows no vmx/svm and no PVM module: unknown backend.
    Unknown,
    /// No /dev/kvm at all.
    Absent,
}

impl Kvm {
    /// Whether a stock Linux guest (our guest kernel) can boot on this KVM.
    pub fn boots_stock_kernel(&self) -> bool {
        matches!(self, Kvm::Hardware { .. })
    }
}

impl fmt::Display for Kvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kvm::Hardware { cpu_flag } => write!(f, "hardware KVM (cpu flag {cpu_flag})"),
            Kvm::Pvm => write!(f, "PVM (kvm_pvm): boots PVM-patched guest kernels only"),
            Kvm::Unknown => write!(f, "/dev/kvm present, but the CPU shows no vmx/svm"),
            Kvm::Absent => write!(f, "no /dev/kvm"),
        }
    }
}

/// Detects the KVM flavour of the running host.
pub fn detect_kvm() -> Kvm {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify(
        Path::new("/dev/kvm").exists(),
        Path::new("/sys/module/kvm_pvm").exists(),
        &cpuinfo,
    )
}

/// The decision behind [`detect_kvm`], from its inputs.
pub fn classify(dev_kvm: bool, pvm_module: bool, cpuinfo: &str) -> Kvm {
    if !dev_kvm {
        return Kvm::Absent;
    }
    if pvm_module {
        return Kvm::Pvm;
    }
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f)
        .unwrap_or("");
    for cpu_flag in ["vmx", "svm"] {
        if flags.split_whitespace().any(|f| f == cpu_flag) {
            return Kvm::Hardware { cpu_flag };
        }
    }
    Kvm::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMD: &str = "processor\t: 0\nflags\t\t: fpu vme svm npt\n";
    const NO_VIRT: &str = "processor\t: 0\nflags\t\t: fpu vme sse2 hypervisor\n";

    #[test]
    fn hardware_kvm_needs_dev_kvm_and_a_cpu_flag() {
        assert_eq!(
            classify(true, false, AMD),
            Kvm::Hardware { cpu_flag: "svm" }
        );
        assert!(classify(true, false, "flags : vmx\n").boots_stock_kernel());
        assert_eq!(classify(false, false, AMD), Kvm::Absent);
        assert_eq!(classify(true, false, NO_VIRT), Kvm::Unknown);
    }

    #[test]
    fn pvm_is_never_taken_for_hardware_kvm() {
        assert_eq!(classify(true, true, NO_VIRT), Kvm::Pvm);
        assert!(!classify(true, true, AMD).boots_stock_kernel());
    }

    #[test]
    fn flag_match_is_whole_word() {
        assert_eq!(classify(true, false, "flags : svmx vmxe\n"), Kvm::Unknown);
    }
}
