//! What a pod holds on the host, written down before it is taken, so that the pod can
//! be cleaned up from the disk alone: after the VMM died, the shim was killed, or
//! containerd restarted and runs `containerd-shim-cocoon-v1 delete`.
//!
//! `<state_dir>/<sandbox id>/pod.json` records the network namespace (for the TAP and tc
//! teardown) and, per container, its image-disk key and writable disk. The VMM's pid
//! file sits beside it ([`crate::vmm`]). Writes are atomic (temporary file + rename).
//! [`cleanup_sandbox`] and [`cleanup_container`] are idempotent and never fail on
//! something that is already gone.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{chain, Error, Result};
use crate::image::ImageCache;
use crate::vmm::{VmmProcess, VmmSpec};

/// The record's file name in the sandbox directory.
pub const RECORD_FILE: &str = "pod.json";

/// One container's host resources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Image-disk cache key held for this container.
    #[serde(default)]
    pub image_key: Option<String>,
    /// The container's writable disk file.
    #[serde(default)]
    pub writable_disk: Option<PathBuf>,
    #[serde(default)]
    pub image_serial: Option<String>,
    #[serde(default)]
    pub writable_serial: Option<String>,
}

/// A pod's host resources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub sandbox_id: String,
    /// The pod's network namespace (where the TAP and tc filters are).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Counter for drive serials, so a serial is never reused within a VM.
    #[serde(default)]
    pub next_disk: u32,
    #[serde(default)]
    pub containers: BTreeMap<String, ContainerRecord>,
    /// While the VM is marked unresponsive (crate::liveness): since when the agent has
    /// not answered, in seconds since the Unix epoch.
    #[serde(default)]
    pub unresponsive_since: Option<u64>,
    /// How often the VM has been marked unresponsive.
    #[serde(default)]
    pub unresponsive_count: u32,
}

impl PodRecord {
    pub fn new(sandbox_id: &str) -> PodRecord {
        PodRecord {
            sandbox_id: sandbox_id.into(),
            ..Default::default()
        }
    }

    /// Reads `<dir>/pod.json`; `None` if there is none.
    pub fn load(dir: &Path) -> Result<Option<PodRecord>> {
        let path = dir.join(RECORD_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading pod record", &path)(e)),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| Error::Config {
                path,
                message: format!("pod record is not valid: {e}"),
            })
    }

    /// Writes `<dir>/pod.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(Error::io("creating sandbox directory", dir))?;
        let path = dir.join(RECORD_FILE);
        let tmp = dir.join(format!("{RECORD_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        fs::write(&tmp, text).map_err(Error::io("writing pod record", &tmp))?;
        fs::rename(&tmp, &path).map_err(Error::io("writing pod record", &path))
    }

    /// Two fresh drive serials for a container (`c<n>i`, `c<n>w`: image, writable).
    pub fn take_serials(&mut self) -> (String, String) {
        let n = self.next_disk;
        self.next_disk = self.next_disk.wrapping_add(1);
        (format!("c{n}i"), format!("c{n}w"))
    }
}

/// Releases what one container holds (image reference, writable disk) and drops it
/// from the record. The VM is left alone.
pub fn cleanup_container(config: &Config, sandbox_id: &str, container_id: &str) -> Result<()> {
    let dir = config.sandbox_dir(sandbox_id);
    let mut record = PodRecord::load(&dir)?;
    let entry = record
        .as_mut()
        .and_then(|r| r.containers.remove(container_id));
    release_container(config, container_id, entry.as_ref());
    if let Some(record) = record {
        if dir.exists() {
            record.save(&dir)?;
        }
    }
    Ok(())
}

/// Releases one container's host resources, logging what fails.
fn release_container(config: &Config, container_id: &str, entry: Option<&ContainerRecord>) {
    let images = ImageCache::from_config(config);
    match images.release_all(container_id) {
        Ok(keys) if !keys.is_empty() => {
            info!(container = container_id, images = ?keys, "image disks released")
        }
        Ok(_) => {}
        Err(e) => warn!(container = container_id, error = %chain(&e), "releasing image disks"),
    }
    if let Some(disk) = entry.and_then(|e| e.writable_disk.as_ref()) {
        match fs::remove_file(disk) {
            Ok(()) => {
                info!(container = container_id, disk = %disk.display(), "writable disk removed")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(container = container_id, disk = %disk.display(), error = %e,
                "removing writable disk"),
        }
    }
}

/// Removes everything a pod had on the host: its VMM (killed if it still runs), the TAP
/// and tc filters in its network namespace, its containers' image references and
/// writable disks, and the sandbox directory. Works from the disk alone.
pub fn cleanup_sandbox(config: &Config, sandbox_id: &str) -> Result<()> {
    let dir = config.sandbox_dir(sandbox_id);
    let record = match PodRecord::load(&dir) {
        Ok(r) => r,
        Err(e) => {
            warn!(sandbox = sandbox_id, error = %chain(&e), "unreadable pod record: cleaning up what is known");
            None
        }
    };
    // The VMM first: it holds the TAP and the disks.
    let size = crate::config::VmSize {
        vcpus: 1,
        memory_mib: crate::config::MIN_MEMORY_MIB,
    };
    let mut first_error: Option<Error> = None;
    if let Ok(spec) = VmmSpec::for_sandbox(config, sandbox_id, size) {
        match VmmProcess::from_pid_file(sandbox_id, &spec.pid_file, &spec.control_socket) {
            Ok(Some(mut vmm)) => {
                if let Err(e) = vmm.kill() {
                    warn!(sandbox = sandbox_id, error = %chain(&e), "killing the VMM");
                    first_error.get_or_insert(e);
                }
            }
            Ok(None) => {}
            Err(e) => warn!(sandbox = sandbox_id, error = %chain(&e), "reading the VMM pid file"),
        }
    }
    if let Some(record) = &record {
        if let Some(netns) = &record.netns {
            if let Err(e) = crate::podnet::teardown(netns) {
                warn!(sandbox = sandbox_id, error = %chain(&e), "pod network teardown");
                first_error.get_or_insert(e);
            }
        }
        for (id, entry) in &record.containers {
            release_container(config, id, Some(entry));
        }
    }
    // The sandbox's own id may hold references too (a non-CRI single container).
    release_container(config, sandbox_id, None);
    match fs::remove_dir_all(&dir) {
        Ok(()) => info!(sandbox = sandbox_id, dir = %dir.display(), "sandbox directory removed"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            first_error.get_or_insert(Error::io("removing sandbox directory", &dir)(e));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        Config {
            state_dir: dir.join("run"),
            image_dir: dir.join("images"),
            ..Config::default()
        }
    }

    #[test]
    fn record_round_trips_and_serials_are_unique() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(PodRecord::load(dir.path()).expect("load"), None);
        let mut r = PodRecord::new("sb");
        r.netns = Some("/var/run/netns/cni-1".into());
        let (i, w) = r.take_serials();
        assert_eq!((i.as_str(), w.as_str()), ("c0i", "c0w"));
        assert_eq!(r.take_serials().0, "c1i");
        r.containers.insert(
            "c1".into(),
            ContainerRecord {
                image_key: Some("ab".repeat(32)),
                writable_disk: Some(dir.path().join("c1.img")),
                image_serial: Some(i),
                writable_serial: Some(w),
            },
        );
        r.save(dir.path()).expect("save");
        assert_eq!(PodRecord::load(dir.path()).expect("load"), Some(r));
        std::fs::write(dir.path().join(RECORD_FILE), "{garbage").expect("write");
        assert!(PodRecord::load(dir.path()).is_err());
    }

    #[test]
    fn cleanup_from_disk_removes_disks_refs_and_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let dir = config.sandbox_dir("sb1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let disk = dir.join("c1-writable.img");
        std::fs::write(&disk, "x").expect("disk");
        // An image reference as ImageCache records it.
        let key = "cd".repeat(32);
        let refs = config.state_dir.join("image-refs").join(&key);
        std::fs::create_dir_all(&refs).expect("refs");
        std::fs::write(refs.join("c1"), "").expect("ref");
        std::fs::write(refs.join("other"), "").expect("ref");
        let mut r = PodRecord::new("sb1");
        r.containers.insert(
            "c1".into(),
            ContainerRecord {
                image_key: Some(key.clone()),
                writable_disk: Some(disk.clone()),
                ..Default::default()
            },
        );
        // A stale pid file naming a process that is not our VMM must not matter.
        std::fs::write(dir.join("vmm.pid"), format!("{} 1\n", std::process::id())).expect("pid");
        r.save(&dir).expect("save");

        cleanup_container(&config, "sb1", "c1").expect("container cleanup");
        assert!(!disk.exists());
        assert!(!refs.join("c1").exists());
        assert!(refs.join("other").exists(), "other holders stay");
        assert!(PodRecord::load(&dir)
            .expect("load")
            .expect("record")
            .containers
            .is_empty());

        cleanup_sandbox(&config, "sb1").expect("sandbox cleanup");
        assert!(!dir.exists());
        // Idempotent.
        cleanup_sandbox(&config, "sb1").expect("again");
        cleanup_container(&config, "sb1", "c1").expect("again");
    }
}
