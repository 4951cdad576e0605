//! CopyFile: small files the host keeps in sync inside the guest (configmaps, secrets,
//! service-account tokens, /etc/hosts, resolv.conf), written atomically with mode and
//! owner, plus symlinks and directories.
//!
//! Every change replaces the path in one `rename`: a reader (a container that has the
//! file bind-mounted, or the directory holding it) sees the old or the new content,
//! never a half-written file. That is also how Kubernetes' atomic writer swaps
//! configmap directories (`..data` symlink replaced by rename).

use crate::error::{AgentError, Result};
use cocoon_agent_protocol::api;
use nix::fcntl::AtFlags;
use nix::sys::stat::{fchmod, Mode};
use nix::unistd::{fchown, fchownat, Gid, Uid};
use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest `data` a CopyFile may carry (Kubernetes caps a configmap or secret at 1 MiB;
/// this leaves room for other uses without letting one call take the guest's memory).
pub const MAX_DATA: usize = 16 << 20;

/// Checks that `path` is absolute, has no `..` component and no NUL, and is not `/`;
/// returns it without `.` components or repeated slashes. `what` names the field in
/// errors.
pub(crate) fn validate_abs_path(path: &str, what: &str) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(AgentError::InvalidArgument(format!("{what} is empty")));
    }
    if path.contains('\0') {
        return Err(AgentError::InvalidArgument(format!(
            "{what} {path:?} contains a NUL byte"
        )));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(AgentError::InvalidArgument(format!(
            "{what} {path:?} is not an absolute path"
        )));
    }
    let mut clean = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(AgentError::InvalidArgument(format!(
                    "{what} {path:?} has a \"..\" component"
                )))
            }
            Component::Normal(n) => clean.push(n),
            Component::Prefix(_) => {
                return Err(AgentError::InvalidArgument(format!(
                    "{what} {path:?} is not a Unix path"
                )))
            }
        }
    }
    if clean == Path::new("/") {
        return Err(AgentError::InvalidArgument(format!(
            "{what} {path:?} is the root directory"
        )));
    }
    Ok(clean)
}

/// A name next to `path` for the new version before it is renamed over `path`.
fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".cocoon-tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// Creates the missing parents of `path` (mode 0755, owned by the agent: root).
fn create_parents(path: &Path) -> Result<()> {
    match path.parent() {
        Some(parent) => DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(AgentError::io(format!(
                "creating parent directories of {}",
                path.display()
            ))),
        None => Ok(()),
    }
}

/// Flushes the directory entry of a rename (best effort on file systems that cannot).
fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(AgentError::io(format!("opening {}", dir.display())))?;
    match d.sync_all() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r.map_err(AgentError::io(format!("syncing {}", dir.display()))),
    }
}

/// Runs `write` to create `tmp`, then renames it over `path`; removes `tmp` on failure.
fn replace_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(AgentError::io(format!(
            "renaming {} to {}",
            tmp.display(),
            path.display()
        )))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// Writes `data` to `path` atomically with `mode` (permission, setuid/setgid/sticky bits)
/// and owner. Also used for the sandbox's own files.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32, uid: u32, gid: u32) -> Result<()> {
    let shown = path.display().to_string();
    replace_with(path, |tmp| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tmp)
            .map_err(AgentError::io(format!(
                "creating a temporary file for {shown}"
            )))?;
        f.write_all(data)
            .map_err(AgentError::io(format!("writing {shown}")))?;
        // Owner first: chown clears the setuid and setgid bits.
        fchown(
            f.as_raw_fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )
        .map_err(|e| AgentError::io(format!("chown {uid}:{gid} {shown}"))(e.into()))?;
        fchmod(f.as_raw_fd(), Mode::from_bits_retain(mode & 0o7777))
            .map_err(|e| AgentError::io(format!("chmod {:o} {shown}", mode & 0o7777))(e.into()))?;
        f.sync_all()
            .map_err(AgentError::io(format!("syncing {shown}")))
    })
}

fn replace_with_symlink(path: &Path, target: &str, uid: u32, gid: u32) -> Result<()> {
    let shown = path.display().to_string();
    replace_with(path, |tmp| {
        std::os::unix::fs::symlink(target, tmp).map_err(AgentError::io(format!(
            "creating symlink {shown} -> {target}"
        )))?;
        fchownat(
            None,
            tmp,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| AgentError::io(format!("chown {uid}:{gid} symlink {shown}"))(e.into()))
    })
}

fn make_directory(path: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    let shown = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(AgentError::FailedPrecondition(format!(
                "{shown} exists and is not a directory"
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match DirBuilder::new().mode(0o700).create(path) {
                Ok(()) => {}
                // Raced with another creator: fine if it is a directory (checked below).
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(AgentError::io(format!("creating directory {shown}"))(e)),
            }
        }
        Err(e) => return Err(AgentError::io(format!("inspecting {shown}"))(e)),
    }
    // Open without following a symlink that could have replaced the directory meanwhile.
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(AgentError::io(format!("opening directory {shown}")))?;
    fchown(
        dir.as_raw_fd(),
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
    )
    .map_err(|e| AgentError::io(format!("chown {uid}:{gid} {shown}"))(e.into()))?;
    dir.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(AgentError::io(format!("chmod {:o} {shown}", mode & 0o7777)))
}

/// CopyFile.
pub fn copy_file(req: &api::CopyFileRequest) -> Result<()> {
    let path = validate_abs_path(&req.path, "path")?;
    if req.directory && !req.symlink_target.is_empty() {
        return Err(AgentError::InvalidArgument(format!(
            "{}: directory and symlink_target are exclusive",
            req.path
        )));
    }
    if req.data.len() > MAX_DATA {
        return Err(AgentError::InvalidArgument(format!(
            "{}: data of {} bytes is over the {MAX_DATA} byte limit",
            req.path,
            req.data.len()
        )));
    }
    if req.symlink_target.contains('\0') {
        return Err(AgentError::InvalidArgument(format!(
            "{}: symlink_target contains a NUL byte",
            req.path
        )));
    }
    create_parents(&path)?;
    if req.directory {
        tracing::debug!(path = %path.display(), mode = req.mode, "copy_file: directory");
        make_directory(&path, req.mode, req.uid, req.gid)
    } else if !req.symlink_target.is_empty() {
        tracing::debug!(path = %path.display(), target = %req.symlink_target, "copy_file: symlink");
        replace_with_symlink(&path, &req.symlink_target, req.uid, req.gid)
    } else {
        tracing::debug!(path = %path.display(), len = req.data.len(), mode = req.mode, "copy_file: file");
        write_atomic(&path, &req.data, req.mode, req.uid, req.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn req(path: &Path) -> api::CopyFileRequest {
        api::CopyFileRequest {
            path: path.to_string_lossy().into_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn path_validation() {
        assert_eq!(
            validate_abs_path("/a//b/./c/", "path").ok(),
            Some(PathBuf::from("/a/b/c"))
        );
        for bad in ["", "a/b", "/a/../b", "/..", "/", "/./", "/a\0b"] {
            let err = validate_abs_path(bad, "path").expect_err(bad);
            assert!(
                matches!(err, AgentError::InvalidArgument(_)),
                "{bad}: {err}"
            );
        }
        assert!(validate_abs_path("/a/..b/c..", "path").is_ok());
        let err = validate_abs_path("x", "mount_point").expect_err("relative");
        assert!(err.to_string().contains("mount_point \"x\""), "{err}");
    }

    #[test]
    fn temp_names_are_hidden_siblings() {
        let t = temp_sibling(Path::new("/etc/config/key"));
        assert_eq!(t.parent(), Some(Path::new("/etc/config")));
        let name = t.file_name().map(|n| n.to_string_lossy().into_owned());
        assert!(name.is_some_and(|n| n.starts_with(".key.cocoon-tmp-")));
        assert_ne!(t, temp_sibling(Path::new("/etc/config/key")));
    }

    #[test]
    fn writes_file_with_mode_owner_and_parents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/secret");
        let mut r = req(&path);
        r.data = b"hello".to_vec();
        r.mode = 0o4640; // setuid survives the chown because chmod comes after it
        r.uid = 1234;
        r.gid = 5678;
        copy_file(&r).expect("copy_file");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.mode() & 0o7777, 0o4640);
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
        assert_eq!(std::fs::read(&path).expect("read"), b"hello");
        let parent = std::fs::metadata(dir.path().join("a/b")).expect("stat parent");
        assert_eq!(parent.mode() & 0o777, 0o755);
        assert_eq!(parent.uid(), 0);

        // Replace: a reader holding the old file keeps the old content (new inode).
        let old = std::fs::File::open(&path).expect("open old");
        let old_ino = meta.ino();
        r.data = b"new content".to_vec();
        r.mode = 0o600;
        copy_file(&r).expect("replace");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_ne!(meta.ino(), old_ino);
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(std::fs::read(&path).expect("read"), b"new content");
        let mut s = String::new();
        std::io::Read::read_to_string(&mut &old, &mut s).expect("read old");
        assert_eq!(s, "hello");
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a/b"))
            .expect("readdir")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, vec![OsString::from("secret")]);
    }

    #[test]
    fn symlinks_replace_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("..data");
        let mut r = req(&link);
        r.symlink_target = "..2024_01_01".into();
        r.uid = 42;
        r.gid = 43;
        copy_file(&r).expect("symlink");
        assert_eq!(
            std::fs::read_link(&link).expect("readlink"),
            PathBuf::from("..2024_01_01")
        );
        let meta = std::fs::symlink_metadata(&link).expect("lstat");
        assert_eq!((meta.uid(), meta.gid()), (42, 43));
        r.symlink_target = "..2024_01_02".into();
        copy_file(&r).expect("replace symlink");
        assert_eq!(
            std::fs::read_link(&link).expect("readlink"),
            PathBuf::from("..2024_01_02")
        );
        // A file over the symlink replaces the link, not its target.
        let target = dir.path().join("target");
        std::fs::write(&target, b"t").expect("write target");
        r.symlink_target = target.to_string_lossy().into_owned();
        copy_file(&r).expect("link to target");
        let mut f = req(&link);
        f.data = b"file".to_vec();
        f.mode = 0o644;
        copy_file(&f).expect("file over symlink");
        assert!(std::fs::symlink_metadata(&link).expect("lstat").is_file());
        assert_eq!(std::fs::read(&target).expect("read target"), b"t");
    }

    #[test]
    fn directories_are_created_or_updated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("x/y");
        let mut r = req(&d);
        r.directory = true;
        r.mode = 0o1777;
        r.uid = 7;
        r.gid = 8;
        copy_file(&r).expect("mkdir");
        let meta = std::fs::metadata(&d).expect("stat");
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o1777);
        assert_eq!((meta.uid(), meta.gid()), (7, 8));
        r.mode = 0o750;
        r.uid = 9;
        copy_file(&r).expect("update dir");
        let meta = std::fs::metadata(&d).expect("stat");
        assert_eq!(meta.mode() & 0o7777, 0o750);
        assert_eq!(meta.uid(), 9);

        let file = dir.path().join("f");
        std::fs::write(&file, b"").expect("write");
        let err = copy_file(&api::CopyFileRequest {
            directory: true,
            ..req(&file)
        })
        .expect_err("file in the way");
        assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err}");
    }

    #[test]
    fn bad_requests_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = req(&dir.path().join("big"));
        r.data = vec![0; MAX_DATA + 1];
        let err = copy_file(&r).expect_err("too big");
        assert!(matches!(err, AgentError::InvalidArgument(_)), "{err}");
        assert!(!dir.path().join("big").exists());

        let mut r = req(&dir.path().join("both"));
        r.directory = true;
        r.symlink_target = "x".into();
        assert!(matches!(copy_file(&r), Err(AgentError::InvalidArgument(_))));
        let r = api::CopyFileRequest {
            path: format!("{}/../etc/passwd", dir.path().display()),
            ..Default::default()
        };
        assert!(matches!(copy_file(&r), Err(AgentError::InvalidArgument(_))));
        // A directory where the file should go: the rename fails, nothing is left.
        let d = dir.path().join("isdir");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("inside"), b"").expect("write");
        let mut r = req(&d);
        r.data = b"x".to_vec();
        let err = copy_file(&r).expect_err("dir in the way");
        assert!(err.to_string().contains("renaming"), "{err}");
        let count = std::fs::read_dir(dir.path()).expect("readdir").count();
        assert_eq!(count, 1);
    }
}
