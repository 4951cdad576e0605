//! Cocoon's end-to-end test support: where the build outputs are, booting the guest image
//! under QEMU, the test lab (real KVM on hosts whose own KVM cannot boot Linux), the
//! harness for VM-level tests, and small statistics for benchmarks.

pub mod console;
pub mod containerd;
pub mod cri;
pub mod image;
pub mod lab;
pub mod netns;
pub mod oci;
pub mod paths;
pub mod qemu;
pub mod residue;
pub mod stats;
pub mod testguest;
pub mod vmm;
pub mod vmtest;
pub mod vsock;
