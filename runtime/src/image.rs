//! Read-only image disks: a container image's layers as one EROFS file, built once per
//! node and shared by every pod that runs the image ("image disk reuse").
//!
//! containerd hands the shim a container's root filesystem as overlay mount options: the
//! image's layers as `lowerdir=a:b:c` (topmost first) plus an empty upper directory.
//! Cocoon never mounts that for the guest. Instead the lower layers become one read-only
//! EROFS image, a plain file the VMM serves as a virtio-blk drive; the guest overlays the
//! container's own writable disk (see [`crate::disk`]) on top of it.
//!
//! # Layout
//!
//! Under the image directory (`/var/lib/cocoon/images`):
//! - `<key>.erofs`: the image disks;
//! - `locks/<key>.lock`: `flock` files, one per key, so concurrent shims build a disk once;
//! - `tmp/<key>.<pid>.<n>.{erofs,mnt}`: a build in progress (or left by a crash).
//!
//! References live in a separate directory, normally `/run/cocoon/image-refs` (tmpfs):
//! `<key>/<holder>` is an empty file per holder (a container id). Files survive a crash
//! of the shim, so a restarted shim or the cleanup after it still knows which disks are in
//! use; and being on tmpfs they vanish on reboot together with the containers that held
//! them, so a reboot cannot leave disks pinned forever. [`ImageCache::gc`] removes disks
//! no one holds.
//!
//! # The key
//!
//! The key is a SHA-256 over the ordered list of lower directories, each with its device,
//! inode and change time. That identifies the *content* soundly on one node because
//! containerd's snapshotters give every committed snapshot its own directory
//! (`.../snapshots/<id>/fs`, `<id>` from a sequence that is never reused), a committed
//! snapshot never changes, and a snapshot's lower chain is fixed: the same ordered list
//! means the same layers in the same order, hence the same merged tree. The device,
//! inode and ctime guard against the one way a path could come back with other content,
//! containerd's state being wiped and its sequence starting again: a recreated directory
//! has a new inode or ctime. Hashing paths instead of content makes the lookup free
//! (no layer is read) — a cache hit costs a few `stat`s. A format tag in the hash
//! invalidates old disks when the way we build them changes.
//!
//! # The build
//!
//! Several layers are merged by mounting them as a read-only overlay (only lower
//! directories: whiteouts and opaque directories are resolved by the kernel, exactly as
//! the container would have seen them) inside a private mount namespace of a helper
//! thread, so the mount is never visible to the rest of the host and disappears with the
//! thread even if the process is killed mid-build. A single layer is read directly.
//! `mkfs.erofs --quiet --preserve-mtime` writes the image to a temporary file, which is
//! flushed, made read-only and renamed into place.
//! - owners, modes, xattrs and mtimes are kept (no `--all-root`, no `-T`): images rely on
//!   them, e.g. Python compares `.pyc` headers with source mtimes;
//! - no compression: the guest reads straight through the host's page cache, which all
//!   pods using the image share, and no guest CPU goes into decompression.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::error::{chain, run, Error, Result};

/// Bumped whenever the way image disks are built changes, so old disks are not reused.
const FORMAT_TAG: &str = "cocoon-erofs-v1";

/// A read-only image disk held for one holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDisk {
    /// The EROFS file to give the VMM (read-only).
    pub path: PathBuf,
    /// The cache key, needed to release it.
    pub key: String,
    /// Whether this call built the disk (false: it was already cached).
    pub built: bool,
}

/// The node's cache of image disks.
#[derive(Debug, Clone)]
pub struct ImageCache {
    image_dir: PathBuf,
    refs_dir: PathBuf,
}

/// A held per-key lock; released on drop.
struct KeyLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl KeyLock {
    /// Removes the lock file while still holding it (others re-check the inode).
    fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl ImageCache {
    /// A cache with disks under `image_dir` and references under `refs_dir`.
    pub fn new(image_dir: impl Into<PathBuf>, refs_dir: impl Into<PathBuf>) -> Self {
        ImageCache {
            image_dir: image_dir.into(),
            refs_dir: refs_dir.into(),
        }
    }

    /// The cache the configuration describes: disks in `image_dir`, references in
    /// `<state_dir>/image-refs`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        ImageCache::new(&config.image_dir, config.state_dir.join("image-refs"))
    }

    /// The path of the disk for `key` (whether or not it exists).
    pub fn disk_path(&self, key: &str) -> PathBuf {
        self.image_dir.join(format!("{key}.erofs"))
    }

    /// The cache key of an ordered list of lower directories (topmost first).
    pub fn key_for(lowerdirs: &[PathBuf]) -> Result<String> {
        if lowerdirs.is_empty() {
            return Err(Error::Image {
                key: "-".into(),
                message: "no lower directories given".into(),
            });
        }
        let mut hash = Sha256::new();
        hash.update(FORMAT_TAG.as_bytes());
        hash.update([0]);
        for dir in lowerdirs {
            if !dir.is_absolute() {
                return Err(Error::Image {
                    key: "-".into(),
                    message: format!("lower directory {} is not absolute", dir.display()),
                });
            }
            let meta = fs::metadata(dir).map_err(Error::io("inspecting layer", dir))?;
            if !meta.is_dir() {
                return Err(Error::Image {
                    key: "-".into(),
                    message: format!("lower directory {} is not a directory", dir.display()),
                });
            }
            hash.update(dir.as_os_str().as_encoded_bytes());
            hash.update([0]);
            let id = format!(
                "{}:{}:{}.{}",
                meta.dev(),
                meta.ino(),
                meta.ctime(),
                meta.ctime_nsec()
            );
            hash.update(id.as_bytes());
            hash.update([0]);
        }
        Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Gets the image disk for `lowerdirs` (topmost first, as in overlay's `lowerdir=`)
    /// and records `holder` (a container id) as using it. Builds the disk if no one has
    /// yet; concurrent callers for the same layers wait for one build.
    pub fn acquire(&self, lowerdirs: &[PathBuf], holder: &str) -> Result<ImageDisk> {
        check_holder(holder)?;
        let key = Self::key_for(lowerdirs)?;
        let lock = self.lock_key(&key, true)?.ok_or_else(|| Error::Image {
            key: key.clone(),
            message: "lock not taken".into(),
        })?;
        let ref_file = self.refs_dir.join(&key).join(holder);
        create_dir(&self.refs_dir.join(&key))?;
        File::create(&ref_file).map_err(Error::io("recording image reference", &ref_file))?;
        let path = self.disk_path(&key);
        let built = if path.exists() {
            false
        } else {
            info!(image = %key, holder, layers = lowerdirs.len(), "building image disk");
            let start = std::time::Instant::now();
            if let Err(e) = self.build(&key, lowerdirs) {
                let _ = fs::remove_file(&ref_file);
                let _ = fs::remove_dir(self.refs_dir.join(&key));
                return Err(e);
            }
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            info!(image = %key, holder, size, ms = start.elapsed().as_millis() as u64,
                "image disk built");
            true
        };
        drop(lock);
        debug!(image = %key, holder, built, "image disk acquired");
        Ok(ImageDisk { path, key, built })
    }

    /// Drops `holder`'s reference to `key`. Idempotent. The disk stays cached for the
    /// next pod until [`ImageCache::gc`] removes it.
    pub fn release(&self, key: &str, holder: &str) -> Result<()> {
        check_key(key)?;
        check_holder(holder)?;
        let ref_file = self.refs_dir.join(key).join(holder);
        match fs::remove_file(&ref_file) {
            Ok(()) => debug!(image = %key, holder, "image disk released"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing image reference", &ref_file)(e)),
        }
        Ok(())
    }

    /// Drops every reference `holder` has (cleanup of a container whose keys are
    /// unknown, e.g. after a shim restart). Returns the keys it held.
    pub fn release_all(&self, holder: &str) -> Result<Vec<String>> {
        check_holder(holder)?;
        let mut released = Vec::new();
        for key in list_dir(&self.refs_dir)? {
            if check_key(&key).is_err() {
                continue;
            }
            let ref_file = self.refs_dir.join(&key).join(holder);
            if ref_file.exists() {
                self.release(&key, holder)?;
                released.push(key);
            }
        }
        Ok(released)
    }

    /// The holders of `key`.
    pub fn holders(&self, key: &str) -> Result<Vec<String>> {
        check_key(key)?;
        list_dir(&self.refs_dir.join(key))
    }

    /// Removes image disks that have no holder, and temporary files of builds that are
    /// no longer running (a crashed shim's). Disks being built or acquired right now are
    /// left alone. Returns the paths removed.
    pub fn gc(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for name in list_dir(&self.image_dir)? {
            let Some(key) = name.strip_suffix(".erofs") else {
                continue;
            };
            if check_key(key).is_err() {
                continue;
            }
            let Some(lock) = self.lock_key(key, false)? else {
                continue; // in use right now
            };
            let refs = self.refs_dir.join(key);
            if !list_dir(&refs)?.is_empty() {
                continue;
            }
            let disk = self.disk_path(key);
            fs::remove_file(&disk).map_err(Error::io("removing image disk", &disk))?;
            let _ = fs::remove_dir(&refs);
            info!(image = %key, "unused image disk removed");
            removed.push(disk);
            lock.remove();
        }
        let tmp = self.image_dir.join("tmp");
        for name in list_dir(&tmp)? {
            let key = name.split('.').next().unwrap_or_default();
            if check_key(key).is_err() {
                continue;
            }
            let Some(lock) = self.lock_key(key, false)? else {
                continue; // a build is running
            };
            let path = tmp.join(&name);
            let result = if path.is_dir() {
                fs::remove_dir(&path)
            } else {
                fs::remove_file(&path)
            };
            match result {
                Ok(()) => {
                    warn!(path = %path.display(), "stale image build file removed");
                    removed.push(path);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("removing stale build file", &path)(e)),
            }
            if !self.disk_path(key).exists() {
                lock.remove();
            }
        }
        // Reference directories left empty, or pointing at a disk that never got built.
        for key in list_dir(&self.refs_dir)? {
            let dir = self.refs_dir.join(&key);
            if list_dir(&dir)?.is_empty() && !self.disk_path(&key).exists() {
                let _ = fs::remove_dir(&dir);
            }
        }
        Ok(removed)
    }

    /// Takes the lock of `key`: blocking, or `None` if `wait` is false and it is held.
    /// The lock file may be removed by its holder (gc), so after locking we check that
    /// the path still names the file we locked, and retry otherwise.
    fn lock_key(&self, key: &str, wait: bool) -> Result<Option<KeyLock>> {
        let dir = self.image_dir.join("locks");
        create_dir(&dir)?;
        let path = dir.join(format!("{key}.lock"));
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(Error::io("opening lock file", &path))?;
            let arg = if wait {
                FlockArg::LockExclusive
            } else {
                FlockArg::LockExclusiveNonblock
            };
            let lock = match Flock::lock(file, arg) {
                Ok(lock) => lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => return Ok(None),
                Err((_, errno)) => {
                    return Err(Error::io("locking", &path)(io::Error::from(errno)));
                }
            };
            let held = lock
                .metadata()
                .map_err(Error::io("inspecting lock", &path))?;
            match fs::metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(Some(KeyLock { _lock: lock, path }));
                }
                _ => continue, // removed or replaced while we waited
            }
        }
    }

    /// Builds `<key>.erofs` from `lowerdirs`; the caller holds the key's lock.
    fn build(&self, key: &str, lowerdirs: &[PathBuf]) -> Result<()> {
        static BUILDS: AtomicU64 = AtomicU64::new(0);
        let tmp_dir = self.image_dir.join("tmp");
        create_dir(&tmp_dir)?;
        let stem = format!(
            "{key}.{}.{}",
            std::process::id(),
            BUILDS.fetch_add(1, Ordering::Relaxed)
        );
        let out = tmp_dir.join(format!("{stem}.erofs"));
        let mnt = tmp_dir.join(format!("{stem}.mnt"));
        let result = (|| {
            if let [single] = lowerdirs {
                mkfs_erofs(key, single, &out)?;
            } else {
                for dir in lowerdirs {
                    let text = dir.to_string_lossy();
                    if text.contains([':', ',', '\\']) || dir.to_str().is_none() {
                        return Err(Error::Image {
                            key: key.into(),
                            message: format!(
                                "layer path {} cannot be given to overlay (':', ',' or '\\')",
                                dir.display()
                            ),
                        });
                    }
                }
                fs::create_dir(&mnt).map_err(Error::io("creating mount point", &mnt))?;
                let lower = lowerdirs
                    .iter()
                    .map(|d| d.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(":");
                let merged = merged_mkfs(key, &lower, &mnt, &out);
                let _ = fs::remove_dir(&mnt);
                merged?;
            }
            let file = File::open(&out).map_err(Error::io("opening built image", &out))?;
            file.sync_all()
                .map_err(Error::io("flushing built image", &out))?;
            fs::set_permissions(&out, fs::Permissions::from_mode(0o444))
                .map_err(Error::io("making image read-only", &out))?;
            let dest = self.disk_path(key);
            fs::rename(&out, &dest).map_err(Error::io("moving image into place", &dest))?;
            if let Ok(dir) = File::open(&self.image_dir) {
                let _ = dir.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&out);
            let _ = fs::remove_dir(&mnt);
        }
        result
    }
}

/// Mounts `lower` as a read-only overlay on `mnt` in a private mount namespace of a
/// fresh thread, runs mkfs.erofs on it, and lets the namespace (and so the mount) die
/// with the thread.
fn merged_mkfs(key: &str, lower: &str, mnt: &Path, out: &Path) -> Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let image_err = |message: String| Error::Image {
        key: key.into(),
        message,
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                // SAFETY: unshare only changes the calling thread's own namespaces and fs
                // attributes (CLONE_NEWNS implies CLONE_FS); it takes no pointers. This is
                // a fresh scoped thread that ends right after the build, so nothing else
                // ever runs in the private namespace.
                if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_FS) } != 0 {
                    return Err(image_err(format!(
                        "private mount namespace: {}",
                        io::Error::last_os_error()
                    )));
                }
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
                .map_err(|e| image_err(format!("making mounts private: {e}")))?;
                let options = format!("lowerdir={lower}");
                mount(
                    Some("overlay"),
                    mnt,
                    Some("overlay"),
                    MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                    Some(options.as_str()),
                )
                .map_err(|e| {
                    image_err(format!(
                        "mounting the layers as an overlay on {} ({options}): {e}",
                        mnt.display()
                    ))
                })?;
                let result = mkfs_erofs(key, mnt, out);
                let _ = umount2(mnt, MntFlags::MNT_DETACH);
                result
            })
            .join()
            .unwrap_or_else(|_| Err(image_err("image build thread panicked".into())))
    })
}

/// Runs mkfs.erofs from `source` into `out`.
fn mkfs_erofs(key: &str, source: &Path, out: &Path) -> Result<()> {
    let mut cmd = Command::new("mkfs.erofs");
    cmd.args(["--quiet", "--preserve-mtime"])
        .arg(out)
        .arg(source);
    debug!(image = %key, source = %source.display(), "running mkfs.erofs");
    run(&mut cmd).map_err(|e| Error::Image {
        key: key.into(),
        message: chain(&e),
    })?;
    Ok(())
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(Error::io("creating directory", dir))
}

/// File names in `dir`, sorted; a missing directory is empty.
fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listing", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io("listing", dir))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// A holder becomes a file name: no separators, no dot names, no control characters.
fn check_holder(holder: &str) -> Result<()> {
    let ok = !holder.is_empty()
        && holder.len() <= 200
        && holder != "."
        && holder != ".."
        && !holder.contains('/')
        && !holder.chars().any(|c| c.is_control());
    if ok {
        Ok(())
    } else {
        Err(Error::Image {
            key: "-".into(),
            message: format!("holder {holder:?} cannot be used as a reference name"),
        })
    }
}

/// Keys are 64 lower-case hex digits.
fn check_key(key: &str) -> Result<()> {
    if key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Error::Image {
            key: key.into(),
            message: "not an image key".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    use std::sync::Arc;

    /// Two layers: the lower has a, b, d/x (owned 1000:1001), a symlink; the upper
    /// replaces a, deletes b with a whiteout (char device 0/0) and adds d/y.
    fn layers(root: &Path) -> Vec<PathBuf> {
        let l1 = root.join("l1");
        let l2 = root.join("l2");
        fs::create_dir_all(l1.join("d")).expect("mkdir");
        fs::create_dir_all(l2.join("d")).expect("mkdir");
        fs::write(l1.join("a"), "lower a\n").expect("write");
        fs::write(l1.join("b"), "deleted\n").expect("write");
        fs::write(l1.join("d/x"), "x\n").expect("write");
        std::os::unix::fs::chown(l1.join("d/x"), Some(1000), Some(1001)).expect("chown");
        std::os::unix::fs::symlink("a", l1.join("link")).expect("symlink");
        fs::write(l2.join("a"), "upper a\n").expect("write");
        fs::write(l2.join("d/y"), "y\n").expect("write");
        mknod(
            &l2.join("b"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(0, 0),
        )
        .expect("whiteout");
        vec![l2, l1] // topmost first
    }

    fn cache(root: &Path) -> ImageCache {
        ImageCache::new(root.join("images"), root.join("refs"))
    }

    /// Extracts an image with fsck.erofs (which also checks it) into `dest`.
    fn extract(image: &Path, dest: &Path) {
        let out = Command::new("fsck.erofs")
            .arg(format!("--extract={}", dest.display()))
            .arg(image)
            .output()
            .expect("fsck.erofs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn owner_of(image: &Path, path: &str) -> String {
        let out = Command::new("dump.erofs")
            .arg(format!("--path={path}"))
            .arg(image)
            .output()
            .expect("dump.erofs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.starts_with("Uid:"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or(text)
    }

    #[test]
    fn two_layers_merge_with_whiteouts_and_owners() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lowers = layers(dir.path());
        let c = cache(dir.path());
        let disk = c.acquire(&lowers, "ctr1").expect("acquire");
        assert!(disk.built);
        assert_eq!(disk.path, c.disk_path(&disk.key));
        let mode = fs::metadata(&disk.path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o444);

        let ex = dir.path().join("extracted");
        extract(&disk.path, &ex);
        assert_eq!(fs::read_to_string(ex.join("a")).expect("a"), "upper a\n");
        assert!(!ex.join("b").exists(), "whiteout must hide b");
        assert_eq!(fs::read_to_string(ex.join("d/x")).expect("x"), "x\n");
        assert_eq!(fs::read_to_string(ex.join("d/y")).expect("y"), "y\n");
        assert_eq!(
            fs::read_link(ex.join("link")).expect("link"),
            Path::new("a")
        );
        assert!(owner_of(&disk.path, "/d/x").contains("Uid: 1000 Gid: 1001"));

        // Nothing is left mounted or in tmp.
        let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(!mounts.contains(&dir.path().display().to_string()));
        assert!(list_dir(&dir.path().join("images/tmp"))
            .expect("tmp")
            .is_empty());
    }

    #[test]
    fn single_layer_is_used_directly_and_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lowers = layers(dir.path());
        let c = cache(dir.path());
        let one = vec![lowers[1].clone()];
        let a = c.acquire(&one, "ctr1").expect("acquire");
        let b = c.acquire(&one, "ctr2").expect("acquire");
        assert!(a.built && !b.built);
        assert_eq!(a.path, b.path);
        assert_eq!(c.holders(&a.key).expect("holders"), ["ctr1", "ctr2"]);
        let ex = dir.path().join("ex");
        extract(&a.path, &ex);
        assert_eq!(fs::read_to_string(ex.join("b")).expect("b"), "deleted\n");
        // A different chain is a different key.
        let both = c.acquire(&lowers, "ctr1").expect("acquire");
        assert_ne!(both.key, a.key);
        let order = ImageCache::key_for(&[lowers[1].clone(), lowers[0].clone()]).expect("key");
        assert_ne!(order, both.key);
    }

    #[test]
    fn concurrent_acquires_build_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lowers = Arc::new(layers(dir.path()));
        let c = Arc::new(cache(dir.path()));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (c, lowers) = (c.clone(), lowers.clone());
                std::thread::spawn(move || c.acquire(&lowers, &format!("ctr{i}")))
            })
            .collect();
        let disks: Vec<ImageDisk> = threads
            .into_iter()
            .map(|t| t.join().expect("join").expect("acquire"))
            .collect();
        assert_eq!(disks.iter().filter(|d| d.built).count(), 1);
        assert!(disks.iter().all(|d| d.path == disks[0].path));
        assert_eq!(c.holders(&disks[0].key).expect("holders").len(), 4);
    }

    #[test]
    fn release_and_gc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lowers = layers(dir.path());
        let c = cache(dir.path());
        let a = c.acquire(&lowers, "ctr1").expect("acquire");
        let b = c.acquire(&lowers[1..], "ctr2").expect("acquire");
        c.acquire(&lowers[1..], "ctr3").expect("acquire");

        // A crashed build's leftovers.
        let tmp = dir.path().join("images/tmp");
        let stale = tmp.join(format!("{}.99999.0.erofs", a.key));
        fs::write(&stale, b"half").expect("stale");
        fs::create_dir(tmp.join(format!("{}.99999.0.mnt", a.key))).expect("stale mnt");

        assert!(c.gc().expect("gc").len() == 2, "only the stale files go");
        assert!(a.path.exists() && b.path.exists());

        c.release(&a.key, "ctr1").expect("release");
        c.release(&a.key, "ctr1").expect("idempotent");
        assert_eq!(c.gc().expect("gc"), vec![a.path.clone()]);
        assert!(!a.path.exists() && b.path.exists());

        assert_eq!(
            c.release_all("ctr2").expect("release_all"),
            vec![b.key.clone()]
        );
        assert_eq!(c.holders(&b.key).expect("holders"), ["ctr3"]);
        assert!(c.gc().expect("gc").is_empty());
        c.release(&b.key, "ctr3").expect("release");
        assert_eq!(c.gc().expect("gc"), vec![b.path.clone()]);
        assert!(list_dir(&dir.path().join("refs")).expect("refs").is_empty());
        assert!(list_dir(&dir.path().join("images/locks"))
            .expect("locks")
            .is_empty());
        // A disk comes back after gc.
        assert!(c.acquire(&lowers, "ctr9").expect("acquire").built);
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = cache(dir.path());
        let e = c.acquire(&[], "ctr").expect_err("empty").to_string();
        assert!(e.contains("no lower directories"), "{e}");
        let missing = dir.path().join("nope");
        let e = c
            .acquire(&[missing], "ctr")
            .expect_err("missing")
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let e = c
            .acquire(&[PathBuf::from("rel")], "ctr")
            .expect_err("relative")
            .to_string();
        assert!(e.contains("not absolute"), "{e}");
        let lowers = layers(dir.path());
        for holder in ["", "..", "a/b"] {
            let e = c.acquire(&lowers, holder).expect_err(holder).to_string();
            assert!(e.contains("holder"), "{e}");
        }
        assert!(c.release("../../etc", "x").is_err());
        // A layer path overlay cannot take fails cleanly and leaves no reference.
        let odd = dir.path().join("odd:dir");
        fs::create_dir(&odd).expect("mkdir");
        let e = c
            .acquire(&[odd, lowers[1].clone()], "ctr")
            .expect_err("colon")
            .to_string();
        assert!(e.contains("odd:dir"), "{e}");
        assert!(list_dir(&dir.path().join("refs")).expect("refs").is_empty());
    }
}
