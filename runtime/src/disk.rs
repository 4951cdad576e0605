//! Writable container disks, and the size syntax the configuration uses.
//!
//! Cocoon never mounts a container's root filesystem on the host. Each container's
//! writable layer is its own block device: a sparse file on the host holding an empty
//! ext4 filesystem, swapped into a free drive slot of the pod's VM. The guest agent
//! mounts it as the upper layer of the container's overlay; the host only ever holds the
//! file. Nothing on the host reads or writes inside it, so the host does no I/O on the
//! guest's behalf beyond the block device itself.
//!
//! The file is created sparse and formatted with
//! `mkfs.ext4 -q -F -m 0 -E root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1`:
//! - `-F`: the target is a regular file, not a block device; don't ask.
//! - `-m 0`: no blocks reserved for root; a container's scratch space has no system
//!   daemons to protect, and containers often run as root anyway.
//! - `root_owner=0:0`: the root directory belongs to root, not to whoever runs mkfs.
//! - `lazy_itable_init=1,lazy_journal_init=1`: don't write the inode tables and the
//!   journal at mkfs time. On a regular file mke2fs discards (punches) the whole file
//!   first, which zeroes it, so it marks every block group `ITABLE_ZEROED` and the
//!   guest kernel's lazy-init thread has nothing to zero later either: a 10 GiB disk is
//!   formatted in milliseconds and allocates about 4 MiB on the host.
//!
//! The journal stays (ext4's default): with `lazy_journal_init` its blocks are only
//! allocated on the host as the guest writes them, and the guest can mount the disk with
//! stock ext4 options.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;

use tracing::{debug, info};

use crate::error::{run, Error, Result};

/// Smallest writable disk we create: mkfs.ext4 needs a few MiB for its metadata and a
/// journal, and a container needs some room to write anything at all.
pub const MIN_WRITABLE_DISK_BYTES: u64 = 16 << 20;

/// Creates `path` as a sparse file of `size_bytes` (rounded up to 4 KiB) holding an
/// empty ext4 filesystem. `path` must not exist yet: an existing file may be a live
/// container's disk and is never overwritten. On any failure the file is removed.
pub fn create_writable_disk(path: &Path, size_bytes: u64) -> Result<()> {
    if size_bytes < MIN_WRITABLE_DISK_BYTES {
        return Err(Error::Size {
            value: size_bytes.to_string(),
            reason: format!(
                "writable disk {} must be at least {} MiB",
                path.display(),
                MIN_WRITABLE_DISK_BYTES >> 20
            ),
        });
    }
    let size = size_bytes.div_ceil(4096).saturating_mul(4096);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::io("creating writable disk", path))?;
    let result = file
        .set_len(size)
        .map_err(Error::io("sizing writable disk", path))
        .and_then(|()| {
            drop(file);
            format_ext4(path)
        });
    if let Err(err) = result {
        let _ = std::fs::remove_file(path);
        return Err(err);
    }
    info!(disk = %path.display(), size_bytes = size, "writable disk created");
    Ok(())
}

/// Runs mkfs.ext4 on the (already sized) file at `path`.
fn format_ext4(path: &Path) -> Result<()> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-m",
        "0",
        "-E",
        "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
    ])
    .arg(path);
    debug!(disk = %path.display(), "formatting ext4");
    run(&mut cmd)?;
    Ok(())
}

/// Parses a byte size: a plain number of bytes, or a number with a binary suffix
/// `K`, `M`, `G`, `T` (also written `Ki`, `KiB`, `KB`, ... and in lower case): all of them
/// mean powers of 1024, as for `dd`, `truncate` and `qemu-img`. Kubernetes' decimal
/// suffixes are not accepted here because "10G" in our configuration means GiB; the
/// kubelet hands us limits in plain bytes anyway.
pub fn parse_size(text: &str) -> Result<u64> {
    let err = |reason: &str| Error::Size {
        value: text.to_string(),
        reason: reason.to_string(),
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(err(
            "expected a number of bytes, optionally with K, M, G or T",
        ));
    }
    let number: u64 = t[..digits_end]
        .parse()
        .map_err(|_| err("number too large"))?;
    let suffix = t[digits_end..].trim().to_ascii_lowercase();
    let shift = match suffix.as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kb" | "kib" => 10,
        "m" | "mi" | "mb" | "mib" => 20,
        "g" | "gi" | "gb" | "gib" => 30,
        "t" | "ti" | "tb" | "tib" => 40,
        _ => return Err(err("unknown suffix (use K, M, G or T)")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| err("size too large"))
}

/// Formats a byte count the way [`parse_size`] reads it, with the largest exact suffix.
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::Instant;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("10G").ok(), Some(10 << 30));
        assert_eq!(parse_size("10Gi").ok(), Some(10 << 30));
        assert_eq!(parse_size(" 512 MiB ").ok(), Some(512 << 20));
        assert_eq!(parse_size("1k").ok(), Some(1024));
        assert_eq!(parse_size("2T").ok(), Some(2 << 40));
        assert_eq!(parse_size("7b").ok(), Some(7));
    }

    #[test]
    fn bad_sizes_say_why() {
        for (text, why) in [
            ("", "expected a number"),
            ("G", "expected a number"),
            ("-1G", "expected a number"),
            ("1.5G", "unknown suffix"),
            ("10X", "unknown suffix"),
            ("99999999999999999999", "too large"),
            ("99999999999T", "too large"),
        ] {
            let e = parse_size(text).expect_err(text).to_string();
            assert!(e.contains(why), "{text}: {e}");
            assert!(e.contains(&format!("{text:?}")), "{text}: {e}");
        }
    }

    #[test]
    fn sizes_format_back() {
        for bytes in [0, 1, 1023, 1024, 10 << 30, (1 << 30) + 4096, 3 << 40] {
            assert_eq!(parse_size(&format_size(bytes)).ok(), Some(bytes));
        }
        assert_eq!(format_size(10 << 30), "10G");
    }

    #[test]
    fn writable_disk_is_sparse_ext4_and_quick() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rw.img");
        let start = Instant::now();
        create_writable_disk(&path, 10 << 30).expect("create");
        let took = start.elapsed();
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), 10 << 30);
        let allocated = meta.blocks() * 512;
        assert!(allocated < 64 << 20, "allocated {allocated} bytes");
        assert!(took.as_secs() < 10, "took {took:?}");
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&path)
            .output()
            .expect("dumpe2fs");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Filesystem state:         clean"), "{text}");
        assert!(text.contains("Reserved block count:     0"), "{text}");
    }

    #[test]
    fn existing_file_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rw.img");
        std::fs::write(&path, b"precious").expect("write");
        let e = create_writable_disk(&path, 64 << 20).expect_err("exists");
        assert!(e.to_string().contains("rw.img"), "{e}");
        assert_eq!(std::fs::read(&path).expect("read"), b"precious");
    }

    #[test]
    fn too_small_is_refused_and_failure_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rw.img");
        let e = create_writable_disk(&path, 1 << 20).expect_err("small");
        assert!(e.to_string().contains("at least 16 MiB"), "{e}");
        assert!(!path.exists());
        // A missing directory fails at create time and leaves nothing either.
        let bad = dir.path().join("missing/rw.img");
        let e = create_writable_disk(&bad, 64 << 20).expect_err("no dir");
        assert!(e.to_string().contains("missing/rw.img"), "{e}");
    }
}
