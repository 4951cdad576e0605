//! Loading the guest: the ELF kernel through its PVH entry, the initramfs, the command
//! line, the PVH start-of-day structure with the e820 map, and the boot GDT.

use crate::devices::GuestMemory;
use crate::layout::*;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_W: u32 = 2;
const PAGE: u64 = 4096;
const MAX_PHDRS: u16 = 64;
const MAX_NOTES: u64 = 64 * 1024;
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
    let file = File::open(kernel).map_err(|e| kerr(e.to_string()))?;
    let elf = parse_elf(&file).map_err(kerr)?;
    let entry = elf
        .pvh_entry
        .ok_or_else(|| BootError::NoPvhEntry(kernel.into()))?;
    let kernel_end = load_segments(mem, &file, &elf.segments).map_err(kerr)?;

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

/// A loadable part of the kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    paddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
    /// PF_W: the kernel writes these pages at once, so they are copied, not mapped.
    writable: bool,
}

#[derive(Debug)]
struct ElfKernel {
    segments: Vec<Segment>,
    pvh_entry: Option<GuestAddress>,
}

fn read_at(file: &File, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| format!("reading {len} bytes at offset {offset:#x}: {e}"))?;
    Ok(buf)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Reads the program headers of a 64-bit x86 ELF kernel and its PVH entry note.
fn parse_elf(file: &File) -> Result<ElfKernel, String> {
    let ehdr = read_at(file, 0, 64)?;
    if ehdr[..4] != *b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    if u16::from_le_bytes([ehdr[18], ehdr[19]]) != 62 {
        return Err("not an x86-64 ELF".into());
    }
    let phoff = le64(&ehdr, 0x20);
    let phentsize = u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]);
    let phnum = u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]);
    if phentsize != 56 || phnum == 0 || phnum > MAX_PHDRS {
        return Err(format!(
            "unexpected program headers ({phnum} of {phentsize} bytes)"
        ));
    }
    let phdrs = read_at(file, phoff, 56 * phnum as usize)?;
    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for ph in phdrs.chunks_exact(56) {
        let (kind, flags, offset, paddr) = (le32(ph, 0), le32(ph, 4), le64(ph, 8), le64(ph, 24));
        let (filesz, memsz) = (le64(ph, 32), le64(ph, 40));
        match kind {
            PT_LOAD if filesz > memsz => {
                return Err(format!("segment at {paddr:#x} has filesz > memsz"))
            }
            PT_LOAD => segments.push(Segment {
                paddr,
                offset,
                filesz,
                memsz,
                writable: flags & PF_W != 0,
            }),
            PT_NOTE if filesz <= MAX_NOTES => {
                let notes = read_at(file, offset, filesz as usize)?;
                pvh_entry = pvh_entry.or(find_pvh_entry(&notes));
            }
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err("no loadable segments".into());
    }
    Ok(ElfKernel {
        segments,
        pvh_entry,
    })
}

/// Walks ELF notes for Xen's PHYS32_ENTRY (the PVH entry point). Malformed notes end the walk.
fn find_pvh_entry(notes: &[u8]) -> Option<GuestAddress> {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut at = 0usize;
    while at.checked_add(12)? <= notes.len() {
        let namesz = le32(notes, at) as usize;
        let descsz = le32(notes, at + 4) as usize;
        let kind = le32(notes, at + 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(align4(namesz)?)?;
        let next = desc_at.checked_add(align4(descsz)?)?;
        if next > notes.len() {
            return None;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && notes.get(name_at..name_at + namesz)? == b"Xen\0" {
            return match descsz {
                4 => Some(GuestAddress(le32(notes, desc_at) as u64)),
                8 => Some(GuestAddress(le64(notes, desc_at))),
                _ => None,
            };
        }
        at = next;
    }
    None
}

/// Host address of guest range [addr, addr+len), which must lie in one RAM region.
fn host_range(mem: &GuestMemory, addr: u64, len: u64) -> Option<*mut u8> {
    let region = mem.find_region(GuestAddress(addr))?;
    let start = region.start_addr().raw_value();
    let end = addr.checked_add(len)?;
    if end > start.checked_add(region.len())? {
        return None;
    }
    region
        .get_host_address(vm_memory::MemoryRegionAddress(addr - start))
        .ok()
}

/// Puts `len` bytes of `file` from `offset` at guest address `paddr`. Whole pages are
/// mapped copy-on-write from the file rather than read: nothing is copied at start-up, and
/// VMs booting the same image share its untouched pages in the page cache. Partial pages
/// (and ranges not page aligned) are copied.
fn place(
    mem: &GuestMemory,
    file: &File,
    paddr: u64,
    offset: u64,
    len: u64,
    map: bool,
) -> Result<(), String> {
    let mut copied_from = 0;
    let whole = len & !(PAGE - 1);
    if map && paddr.is_multiple_of(PAGE) && offset.is_multiple_of(PAGE) && whole > 0 {
        let host = host_range(mem, paddr, whole)
            .ok_or_else(|| format!("range {paddr:#x}+{whole:#x} outside guest memory"))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| format!("file offset {offset:#x} too large"))?;
        // SAFETY: `host..host+whole` lies inside one live guest memory mapping owned by
        // `mem` (checked by host_range) and is page aligned; MAP_FIXED replaces those
        // pages with a private copy-on-write view of the file, which is what the guest
        // would otherwise get by copying. No Rust reference to that memory exists.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                whole as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED || p != host.cast() {
            return Err(format!(
                "mapping {paddr:#x}+{whole:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        copied_from = whole;
    }
    let rest = len - copied_from;
    if rest > 0 {
        let n = usize::try_from(rest).map_err(|_| "range too large".to_string())?;
        let data = read_at(file, offset + copied_from, n)?;
        mem.write_slice(&data, GuestAddress(paddr + copied_from))
            .map_err(|e| format!("copying to {paddr:#x}: {e}"))?;
    }
    Ok(())
}

/// Puts the kernel's segments into guest memory (see [`place`]).
fn load_segments(mem: &GuestMemory, file: &File, segments: &[Segment]) -> Result<u64, String> {
    let mut end = 0;
    for seg in segments {
        let seg_end = seg
            .paddr
            .checked_add(seg.memsz)
            .filter(|e| host_range(mem, seg.paddr, seg.memsz).is_some() && *e > 0)
            .ok_or_else(|| {
                format!(
                    "segment {:#x}+{:#x} does not fit in guest memory",
                    seg.paddr, seg.memsz
                )
            })?;
        end = end.max(seg_end);
        // Pages the guest writes right away would fault twice (read, then copy-on-write)
        // if mapped: copy those, map the rest.
        place(mem, file, seg.paddr, seg.offset, seg.filesz, !seg.writable)?;
    }
    Ok(end)
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
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
    let low_end = mem
        .iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map(|r| r.len())
        .unwrap_or(0);
    let addr = low_end.checked_sub(size).map(|a| a & !(PAGE - 1));
    match addr {
        Some(addr) if addr >= kernel_end && size > 0 => {
            place(mem, &file, addr, 0, size, true).map_err(err)?;
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

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    #[test]
    fn pvh_note_is_found_among_others_and_garbage_is_safe() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", 18, &0x0100_0abcu32.to_le_bytes()));
        assert_eq!(find_pvh_entry(&notes), Some(GuestAddress(0x0100_0abc)));
        assert_eq!(find_pvh_entry(&note(b"Xen\0", 17, &[0; 4])), None);
        assert_eq!(find_pvh_entry(&[0xff; 11]), None);
        let mut huge = note(b"Xen\0", 18, &[0; 4]);
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(find_pvh_entry(&huge), None);
        for len in 0..notes.len() {
            let _ = find_pvh_entry(&notes[..len]);
        }
    }

    /// A tiny ELF with one page-aligned segment of 1.5 pages and a PVH note.
    fn tiny_elf(dir: &std::path::Path) -> std::path::PathBuf {
        let mut f = vec![0u8; 0x3000];
        f[..4].copy_from_slice(b"\x7fELF");
        (f[4], f[5], f[18]) = (2, 1, 62);
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        let ph = |k: u32, off: u64, paddr: u64, filesz: u64, memsz: u64| {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&k.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[32..40].copy_from_slice(&filesz.to_le_bytes());
            p[40..48].copy_from_slice(&memsz.to_le_bytes());
            p
        };
        f[64..120].copy_from_slice(&ph(PT_LOAD, 0x1000, 0x20_0000, 0x1800, 0x3000));
        let n = note(b"Xen\0", 18, &0x20_0010u32.to_le_bytes());
        f[120..176].copy_from_slice(&ph(PT_NOTE, 0x800, 0, n.len() as u64, n.len() as u64));
        f[0x800..0x800 + n.len()].copy_from_slice(&n);
        for (i, b) in f[0x1000..0x2800].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        let p = dir.join("vmlinux");
        std::fs::write(&p, &f).expect("write");
        p
    }

    #[test]
    fn kernel_segments_are_mapped_and_copied_exactly() {
        for writable in [false, true] {
            segment_loads_exactly(writable);
        }
    }

    /// `writable`: the segment is PF_W, so it is copied rather than mapped.
    fn segment_loads_exactly(writable: bool) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = tiny_elf(dir.path());
        if writable {
            let mut f = std::fs::read(&path).expect("read");
            f[64 + 4] = PF_W as u8;
            std::fs::write(&path, f).expect("write");
        }
        let file = File::open(&path).expect("open");
        let elf = parse_elf(&file).expect("parse");
        assert_eq!(elf.segments[0].writable, writable);
        assert_eq!(elf.pvh_entry, Some(GuestAddress(0x20_0010)));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem");
        let end = load_segments(&mem, &file, &elf.segments).expect("load");
        assert_eq!(end, 0x20_3000);
        let mut got = vec![0u8; 0x3000];
        mem.read_slice(&mut got, GuestAddress(0x20_0000))
            .expect("read");
        let want: Vec<u8> = (0..0x3000)
            .map(|i| if i < 0x1800 { (i % 251) as u8 + 1 } else { 0 })
            .collect();
        assert!(got == want, "segment contents differ");
        // Guest writes stay private: the file is unchanged.
        mem.write_slice(&[0xee; 16], GuestAddress(0x20_0000))
            .expect("write");
        assert_eq!(std::fs::read(&path).expect("read")[0x1000], 1);
    }

    #[test]
    fn kernels_that_do_not_fit_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::open(tiny_elf(dir.path())).expect("open");
        let elf = parse_elf(&file).expect("parse");
        let small = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        let e = load_segments(&small, &file, &elf.segments).expect_err("too small");
        assert!(e.contains("does not fit"), "{e}");
    }

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
