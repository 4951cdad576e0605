//! Guest physical memory layout (x86_64).

/// GDT used for the PVH entry (flat 32-bit code and data).
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`, then the module list and the memory map.
pub const START_INFO_ADDR: u64 = 0x6000;
pub const MODLIST_ADDR: u64 = 0x6100;
pub const MEMMAP_ADDR: u64 = 0x6200;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// The MP table lives in the last KiB of base memory, where Linux looks for it.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// End of base memory usable as RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernel segments load from 1 MiB up.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO hole: RAM below it, devices in it, the rest of RAM above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOURGIB: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, 4 KiB each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IOAPIC pin for virtio-mmio devices (4 is COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The TSS KVM needs on Intel hosts (three pages, below the IOAPIC).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// COM1.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Guest RAM ranges (start, size) for `mem_bytes` of memory around the MMIO hole.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_HOLE_START), (FOURGIB, mem_bytes - MMIO_HOLE_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (FOURGIB, (4 << 30) - MMIO_HOLE_START)]
        );
    }
}
