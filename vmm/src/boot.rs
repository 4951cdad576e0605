//! Loading the guest: the ELF kernel through its PVH entry, the initramfs, the command
//! line, the PVH start-of-day structure with the e820 map, and the boot GDT.

use crate::devices::GuestMemory;
use crate::layout::*;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {why}")]
    Kernel { path: PathBuf, why: String },
    #[error(
        "kernel {0}: no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y"
    )]
    NoPvhEntry(PathBuf),
    #[error("initramfs {path}: {why}")]
    Initramfs { path: PathBuf, why: String },
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// PVH entry (32-bit protected mode, paging off).
    pub entry: GuestAddress,
    /// Passed to the kernel in %ebx.
    pub start_info: GuestAddress,
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::Memory { what, source }
}

/// Loads everything the guest needs at boot and returns its entry point.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let kerr = |why: String| BootError::Kernel {
        path: kernel.into(),
        why,
    };
    let mut file = std::fs::File::open(kernel).map_err(|e| kerr(e.to_string()))?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| kerr(e.to_string()))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr,
        _ => return Err(BootError::NoPvhEntry(kernel.into())),
    };
    let kernel_end = loaded.kernel_end;

    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err("kernel command line"))?;

    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        ..Default::default()
    };

    if let Some(path) = initramfs {
        let module = load_initramfs(mem, path, kernel_end)?;
        mem.write_obj(module, GuestAddress(MODLIST_ADDR))
            .map_err(mem_err("initramfs module entry"))?;
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_ADDR;
    }

    let memmap = e820(mem);
    info.memmap_entries = memmap.len() as u32;
    for (i, e) in memmap.iter().enumerate() {
        let addr = MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(*e, GuestAddress(addr))
            .map_err(mem_err("e820 map"))?;
    }
    mem.write_obj(info, GuestAddress(START_INFO_ADDR))
        .map_err(mem_err("PVH start info"))?;
    write_gdt(mem)?;

    Ok(BootEntry {
        entry,
        start_info: GuestAddress(START_INFO_ADDR),
    })
}

/// Places the initramfs page-aligned at the top of low RAM, clear of the kernel.
fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<hvm_modlist_entry, BootError> {
    let err = |why: String| BootError::Initramfs {
        path: path.into(),
        why,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map(|r| r.len())
        .unwrap_or(0);
    let addr = low_end.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(addr) if addr >= kernel_end => {
            mem.write_slice(&data, GuestAddress(addr))
                .map_err(mem_err("initramfs"))?;
            Ok(hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            })
        }
        _ => Err(err(format!(
            "{size} bytes do not fit in guest memory above the kernel (ends at {kernel_end:#x}); \
             give the VM more memory"
        ))),
    }
}

/// The guest's memory map: base memory below the MP table, RAM from 1 MiB (and above 4 GiB).
fn e820(mem: &GuestMemory) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr, size, type_| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for r in mem.iter() {
        let start = r.start_addr().raw_value();
        if start == 0 {
            map.push(entry(HIMEM_START, r.len() - HIMEM_START, E820_RAM));
        } else {
            map.push(entry(start, r.len(), E820_RAM));
        }
    }
    map
}

/// A GDT entry from flags, base and limit (the Intel SDM's packed layout).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// Null, 32-bit flat code (selector 0x08), flat data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err("boot GDT"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_flat_segments() {
        assert_eq!(BOOT_GDT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn e820_reserves_the_mptable_area_and_covers_ram() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let map = e820(&mem);
        assert_eq!(
            (map[0].addr, map[0].size, map[0].type_),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(map[1].type_, E820_RESERVED);
        assert_eq!(map[2].addr + map[2].size, 64 << 20);
    }

    #[test]
    fn initramfs_goes_to_the_top_and_must_fit() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("i.cpio");
        std::fs::write(&p, vec![7u8; 10_000]).expect("write");
        let m = load_initramfs(&mem, &p, 32 << 20).expect("fits");
        assert_eq!(m.paddr % 4096, 0);
        assert!(m.paddr + m.size <= 64 << 20 && m.paddr >= 32 << 20);
        let e = load_initramfs(&mem, &p, (64 << 20) - 100).expect_err("no room");
        assert!(e.to_string().contains("more memory"), "{e}");
    }
}
