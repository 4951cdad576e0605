//! `cocoon-vmm`: Cocoon's KVM virtual machine monitor, one process per pod sandbox.
//!
//! It boots an ELF `vmlinux` through the PVH entry with an initramfs, describes CPUs with
//! an MP table (no firmware, no ACPI), and offers a COM1 console and virtio-mmio block
//! devices in drive slots whose backing files can be swapped while the guest runs.
//! A control socket swaps drives, pauses and resumes, reports stats and shuts down.

pub mod boot;
pub mod bus;
pub mod config;
pub mod control;
pub mod devices;
pub mod event_loop;
pub mod layout;
pub mod mptable;
pub mod vcpu;
pub mod vm;
