//! Host files copied into the guest and kept in sync: configMap, secret, projected and
//! downwardAPI volumes, service-account tokens, the pod's hosts/hostname/resolv.conf,
//! termination-log files, hostPath files (see [`crate::spec`] for which mounts).
//!
//! A source is a file or a directory tree. Trees are copied with their directories,
//! files (mode, owner) and symlinks (as symlinks: the kubelet's atomic-writer layout,
//! `key -> ..data/key`, `..data -> ..<timestamp>`, works unchanged), symlinks last, so
//! that an update the kubelet makes by swapping `..data` becomes visible in the guest
//! only once the new files are there. [`signature`] is a cheap fingerprint (names,
//! sizes, mtimes, inodes, link targets) polled by the pod's sync thread; a change makes
//! it copy the source again.
//!
//! Limits: a source of more than [`MAX_COPY_BYTES`] or [`MAX_COPY_ENTRIES`] is refused
//! (these are meant for small files); files removed on the host stay in the guest (the
//! agent has no remove call); nothing flows back from the guest (a termination message
//! written in the guest does not reach the kubelet).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::agent::{AgentClient, AgentError, CopyFileRequest};

/// The most bytes one source may hold.
pub const MAX_COPY_BYTES: u64 = 16 << 20;
/// The most entries (files, directories, links) one source may hold.
pub const MAX_COPY_ENTRIES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("copying {source_path} into the guest: {reason}")]
    Source {
        source_path: PathBuf,
        reason: String,
    },
    #[error("copying {source_path} into the guest at {guest}")]
    Agent {
        source_path: PathBuf,
        guest: String,
        #[source]
        error: AgentError,
    },
}

/// One entry of a source, relative to it ("" is the source itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        rel: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    File {
        rel: String,
        path: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        rel: String,
        target: String,
    },
}

/// Lists a source: directories first (parents before children), then files, then
/// symlinks. The top-level source itself is followed if it is a symlink.
pub fn walk(source: &Path) -> Result<Vec<Entry>, CopyError> {
    let err = |reason: String| CopyError::Source {
        source_path: source.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(source).map_err(|e| err(e.to_string()))?;
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut links = Vec::new();
    let mut bytes: u64 = 0;
    if meta.is_file() {
        files.push(Entry::File {
            rel: String::new(),
            path: source.to_path_buf(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        });
        bytes = meta.len();
    } else if meta.is_dir() {
        let mut stack = vec![(source.to_path_buf(), String::new(), meta)];
        while let Some((path, rel, meta)) = stack.pop() {
            dirs.push(Entry::Dir {
                rel: rel.clone(),
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
            });
            let mut names: Vec<_> = fs::read_dir(&path)
                .map_err(|e| err(format!("{}: {e}", path.display())))?
                .filter_map(|e| e.ok())
                .collect();
            names.sort_by_key(|e| e.file_name());
            for e in names {
                let name = e.file_name().to_string_lossy().into_owned();
                let child_rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let child = e.path();
                let m = fs::symlink_metadata(&child)
                    .map_err(|e| err(format!("{}: {e}", child.display())))?;
                if m.file_type().is_symlink() {
                    let target = fs::read_link(&child)
                        .map_err(|e| err(format!("{}: {e}", child.display())))?;
                    links.push(Entry::Symlink {
                        rel: child_rel,
                        target: target.to_string_lossy().into_owned(),
                    });
                } else if m.is_dir() {
                    stack.push((child, child_rel, m));
                } else if m.is_file() {
                    bytes = bytes.saturating_add(m.len());
                    files.push(Entry::File {
                        rel: child_rel,
                        path: child,
                        mode: m.mode() & 0o7777,
                        uid: m.uid(),
                        gid: m.gid(),
                    });
                }
                // Sockets, FIFOs and devices inside a volume are skipped.
                if dirs.len() + files.len() + links.len() + stack.len() > MAX_COPY_ENTRIES {
                    return Err(err(format!(
                        "more than {MAX_COPY_ENTRIES} entries: too big to copy into the VM"
                    )));
                }
            }
        }
    } else {
        return Err(err("neither a file nor a directory".into()));
    }
    if bytes > MAX_COPY_BYTES {
        return Err(err(format!(
            "{bytes} bytes, more than the {MAX_COPY_BYTES} copied into a VM"
        )));
    }
    dirs.sort_by(|a, b| rel_of(a).cmp(rel_of(b)));
    dirs.extend(files);
    dirs.extend(links);
    Ok(dirs)
}

fn rel_of(e: &Entry) -> &str {
    match e {
        Entry::Dir { rel, .. } | Entry::File { rel, .. } | Entry::Symlink { rel, .. } => rel,
    }
}

/// A fingerprint of the source's current state; `None` if it cannot be read.
pub fn signature(source: &Path) -> Option<String> {
    let entries = walk(source).ok()?;
    let mut hash = Sha256::new();
    for e in &entries {
        match e {
            Entry::Dir {
                rel,
                mode,
                uid,
                gid,
            } => hash.update(format!("d {rel} {mode} {uid} {gid}\n")),
            Entry::File {
                rel,
                path,
                mode,
                uid,
                gid,
            } => {
                let m = fs::metadata(path).ok()?;
                hash.update(format!(
                    "f {rel} {mode} {uid} {gid} {} {} {}.{} {}\n",
                    m.len(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime()
                ));
            }
            Entry::Symlink { rel, target } => hash.update(format!("l {rel} {target}\n")),
        }
    }
    Some(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The guest path of an entry.
fn guest_path(guest: &str, rel: &str) -> String {
    if rel.is_empty() {
        guest.to_string()
    } else {
        format!("{guest}/{rel}")
    }
}

/// Copies `source` into the guest at `guest`; returns the source's signature.
pub fn copy_in(agent: &AgentClient, source: &Path, guest: &str) -> Result<String, CopyError> {
    let sig = signature(source).unwrap_or_default();
    for entry in walk(source)? {
        let req = match &entry {
            Entry::Dir {
                rel,
                mode,
                uid,
                gid,
            } => CopyFileRequest {
                path: guest_path(guest, rel),
                directory: true,
                mode: *mode,
                uid: *uid,
                gid: *gid,
                ..Default::default()
            },
            Entry::File {
                rel,
                path,
                mode,
                uid,
                gid,
            } => CopyFileRequest {
                path: guest_path(guest, rel),
                data: fs::read(path).map_err(|e| CopyError::Source {
                    source_path: path.clone(),
                    reason: e.to_string(),
                })?,
                mode: *mode,
                uid: *uid,
                gid: *gid,
                ..Default::default()
            },
            Entry::Symlink { rel, target } => CopyFileRequest {
                path: guest_path(guest, rel),
                symlink_target: target.clone(),
                ..Default::default()
            },
        };
        agent.copy_file(&req).map_err(|error| CopyError::Agent {
            source_path: source.to_path_buf(),
            guest: req.path.clone(),
            error,
        })?;
    }
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn walk_lists_dirs_then_files_then_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cm");
        let data = root.join("..2024_01_01");
        fs::create_dir_all(&data).expect("mkdir");
        fs::write(data.join("app.conf"), "a=1").expect("write");
        symlink("..2024_01_01", root.join("..data")).expect("link");
        symlink("..data/app.conf", root.join("app.conf")).expect("link");
        let entries = walk(&root).expect("walk");
        let kinds: Vec<(char, &str)> = entries
            .iter()
            .map(|e| match e {
                Entry::Dir { rel, .. } => ('d', rel.as_str()),
                Entry::File { rel, .. } => ('f', rel.as_str()),
                Entry::Symlink { rel, .. } => ('l', rel.as_str()),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ('d', ""),
                ('d', "..2024_01_01"),
                ('f', "..2024_01_01/app.conf"),
                ('l', "..data"),
                ('l', "app.conf")
            ]
        );
        let before = signature(&root).expect("sig");
        assert_eq!(signature(&root), Some(before.clone()));
        // The kubelet's update: a new timestamped dir and the ..data link swapped.
        let new = root.join("..2024_01_02");
        fs::create_dir_all(&new).expect("mkdir");
        fs::write(new.join("app.conf"), "a=2").expect("write");
        fs::remove_file(root.join("..data")).expect("rm");
        symlink("..2024_01_02", root.join("..data")).expect("link");
        assert_ne!(signature(&root), Some(before));
    }

    #[test]
    fn single_files_and_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("hosts");
        fs::write(&f, "127.0.0.1 localhost\n").expect("write");
        let entries = walk(&f).expect("walk");
        assert!(matches!(&entries[..], [Entry::File { rel, .. }] if rel.is_empty()));
        assert!(walk(&dir.path().join("missing")).is_err());
        let big = dir.path().join("big");
        let file = fs::File::create(&big).expect("create");
        file.set_len(MAX_COPY_BYTES + 1).expect("size");
        let err = walk(&big).expect_err("too big").to_string();
        assert!(err.contains("big"), "{err}");
        assert_eq!(guest_path("/g", ""), "/g");
        assert_eq!(guest_path("/g", "a/b"), "/g/a/b");
    }
}
