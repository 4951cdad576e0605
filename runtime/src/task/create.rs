//! `Create`: the sandbox container boots the pod's VM; any other container gets its
//! image disk and writable disk swapped into free drive slots, its small host files
//! copied in, its pod volumes made, and is created by the agent from the rewritten spec.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tracing::{info, warn};

use super::{Container, CreateRequest, Proc, RootfsMount, Service, TaskError};
use crate::agent::{AddStorageRequest, AgentError, CopyFileRequest, Rootfs};
use crate::error::chain;
use crate::events::TaskEvent;
use crate::sandbox::Pod;
use crate::spec::{self, SourceKind};
use crate::state::ContainerRecord;
use crate::stdio::ProcessIo;

/// Where a container's disks are mounted in the guest. Not under the agent's bundle
/// directory (`/run/cocoon/containers/<id>`): the agent removes that at RemoveContainer,
/// which fails (EBUSY) while the disks are still mounted inside it.
fn guest_mounts(container_id: &str) -> (String, String) {
    let base = format!("/run/cocoon/storage/{container_id}");
    (format!("{base}/image"), format!("{base}/writable"))
}

/// The image layers (topmost first) of containerd's rootfs mounts: an overlay's
/// `lowerdir=` list, or a single bind-mounted directory (the native snapshotter).
pub fn lower_dirs(rootfs: &[RootfsMount]) -> Result<Vec<PathBuf>, String> {
    let [mount] = rootfs else {
        return Err(format!(
            "expected one rootfs mount from containerd, got {}",
            rootfs.len()
        ));
    };
    match mount.kind.as_str() {
        "overlay" => {
            let lower = mount
                .options
                .iter()
                .find_map(|o| o.strip_prefix("lowerdir="))
                .ok_or("overlay rootfs without lowerdir")?;
            let dirs: Vec<PathBuf> = lower
                .split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect();
            if dirs.is_empty() || dirs.iter().any(|d| !d.is_absolute()) {
                return Err(format!(
                    "overlay lowerdir {lower:?} is not a list of absolute paths"
                ));
            }
            Ok(dirs)
        }
        "bind" | "rbind" | "none" if mount.source.starts_with('/') => {
            Ok(vec![PathBuf::from(&mount.source)])
        }
        other => Err(format!(
            "rootfs mount of type {other:?} (source {:?}) is not supported: Cocoon needs \
             an overlay or bind snapshot",
            mount.source
        )),
    }
}

/// Reads `<bundle>/config.json`.
pub fn read_bundle_spec(bundle: &Path) -> Result<Value, TaskError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| {
        TaskError::InvalidArgument(format!("reading OCI spec {}: {e}", path.display()))
    })?;
    serde_json::from_slice(&text).map_err(|e| {
        TaskError::InvalidArgument(format!("OCI spec {} is not JSON: {e}", path.display()))
    })
}

impl Service {
    /// Creates the task `req.id`; returns its pid (the VMM's for the sandbox, the guest
    /// pid of the container's init process otherwise).
    pub fn create(&self, req: CreateRequest) -> Result<u32, TaskError> {
        if !cocoon_agent_protocol::stdio::valid_id(&req.id) {
            return Err(TaskError::InvalidArgument(format!(
                "container id {:?}: use letters, digits, '_', '-', '.' (at most 128)",
                req.id
            )));
        }
        if self.containers().contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!(
                "container {} already exists",
                req.id
            )));
        }
        req.stdio.check().map_err(|source| TaskError::Stdio {
            context: format!("container {}", req.id),
            source,
        })?;
        let spec = read_bundle_spec(&req.bundle)?;
        let pid = if spec::is_sandbox(&spec) {
            self.create_sandbox(&req, &spec)?
        } else {
            self.create_container(&req, &spec)?
        };
        self.publish(TaskEvent::Create {
            container_id: req.id.clone(),
            bundle: req.bundle.to_string_lossy().into_owned(),
            stdin: req.stdio.stdin.clone(),
            stdout: req.stdio.stdout.clone(),
            stderr: req.stdio.stderr.clone(),
            terminal: req.stdio.terminal,
            pid,
        });
        Ok(pid)
    }

    fn create_sandbox(&self, req: &CreateRequest, spec: &Value) -> Result<u32, TaskError> {
        if let Some(pod) = self.pod() {
            return Err(TaskError::FailedPrecondition(format!(
                "this shim already runs sandbox {}; sandbox {} needs its own shim",
                pod.id, req.id
            )));
        }
        info!(sandbox = %req.id, "creating pod sandbox VM");
        let pod = Pod::boot(self.config(), &req.id, spec)?;
        let pid = pod.vmm_pid;
        *self.shared.pod.lock().unwrap_or_else(|p| p.into_inner()) = Some(pod.clone());
        self.containers().insert(
            req.id.clone(),
            Container {
                id: req.id.clone(),
                bundle: req.bundle.clone(),
                is_sandbox: true,
                image_key: None,
                image_serial: String::new(),
                writable_serial: String::new(),
                writable_disk: None,
            },
        );
        let proc = Arc::new(Proc::new(&req.id, "", req.stdio.clone(), pid));
        self.procs().insert((req.id.clone(), String::new()), proc);
        self.watch(&pod);
        info!(sandbox = %req.id, vmm_pid = pid, "pod sandbox VM running");
        Ok(pid)
    }

    fn create_container(&self, req: &CreateRequest, spec: &Value) -> Result<u32, TaskError> {
        let id = &req.id;
        let pod = self.running_pod()?;
        let sandbox_id = spec::sandbox_id_of(spec, id);
        if sandbox_id != pod.id {
            return Err(TaskError::InvalidArgument(format!(
                "container {id} belongs to sandbox {sandbox_id}, this shim runs sandbox {}",
                pod.id
            )));
        }
        let lower = lower_dirs(&req.rootfs)
            .map_err(|e| TaskError::InvalidArgument(format!("container {id}: {e}")))?;
        let guest =
            spec::rewrite_for_guest(spec, id, &pod.ns, &SourceKind::of).map_err(|source| {
                TaskError::Spec {
                    container: id.clone(),
                    source: Box::new(source),
                }
            })?;
        let spec_json = serde_json::to_vec(&guest.spec)
            .map_err(|e| TaskError::InvalidArgument(format!("container {id}: spec: {e}")))?;

        // Write down what the container will hold before taking it.
        let disk_dir = pod.dir.join("containers").join(id);
        let writable = disk_dir.join("writable.img");
        let mut serials = (String::new(), String::new());
        pod.update_record(|r| {
            serials = r.take_serials();
            r.containers.insert(
                id.clone(),
                ContainerRecord {
                    image_key: None,
                    writable_disk: Some(writable.clone()),
                    image_serial: Some(serials.0.clone()),
                    writable_serial: Some(serials.1.clone()),
                },
            );
        })?;
        let mut container = Container {
            id: id.clone(),
            bundle: req.bundle.clone(),
            is_sandbox: false,
            image_key: None,
            image_serial: serials.0.clone(),
            writable_serial: serials.1.clone(),
            writable_disk: Some(writable.clone()),
        };
        match self.build_container(&pod, req, &lower, &guest, &spec_json, &mut container) {
            Ok(pid) => {
                self.containers().insert(id.clone(), container);
                info!(sandbox = %pod.id, container = %id, pid, "container created");
                Ok(pid)
            }
            Err(e) => {
                warn!(sandbox = %pod.id, container = %id, error = %chain(&e),
                    "container create failed: undoing");
                self.release_container(&pod, &container);
                Err(e)
            }
        }
    }

    fn build_container(
        &self,
        pod: &Arc<Pod>,
        req: &CreateRequest,
        lower: &[PathBuf],
        guest: &spec::GuestSpec,
        spec_json: &[u8],
        container: &mut Container,
    ) -> Result<u32, TaskError> {
        let id = &req.id;
        let ctx = |what: &str| format!("container {id}: {what}");
        let image = pod
            .images
            .acquire(lower, id)
            .map_err(TaskError::runtime(ctx("image disk")))?;
        container.image_key = Some(image.key.clone());
        pod.update_record(|r| {
            if let Some(c) = r.containers.get_mut(id) {
                c.image_key = Some(image.key.clone());
            }
        })?;
        let writable = container
            .writable_disk
            .clone()
            .ok_or_else(|| TaskError::FailedPrecondition(ctx("no writable disk path")))?;
        if let Some(dir) = writable.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TaskError::Runtime {
                context: ctx("disk directory"),
                source: crate::error::Error::io("creating", dir)(e),
            })?;
        }
        crate::disk::create_writable_disk(&writable, self.config().writable_disk_size)
            .map_err(TaskError::runtime(ctx("writable disk")))?;

        let (image_mount, writable_mount) = guest_mounts(id);
        pod.swap_in(&container.image_serial, &image.path, true)?;
        pod.swap_in(&container.writable_serial, &writable, false)?;
        for (serial, fstype, mount, ro) in [
            (&container.image_serial, "erofs", &image_mount, true),
            (&container.writable_serial, "ext4", &writable_mount, false),
        ] {
            pod.agent
                .add_storage(&AddStorageRequest {
                    serial: serial.clone(),
                    fstype: fstype.into(),
                    mount_point: mount.clone(),
                    read_only: ro,
                    ..Default::default()
                })
                .map_err(TaskError::agent(ctx(&format!(
                    "mounting {fstype} disk {serial}"
                ))))?;
        }
        for (source, guest_path) in &guest.copies {
            pod.copy_in(source, guest_path)
                .map_err(|source| TaskError::Copy {
                    container: id.clone(),
                    source: Box::new(source),
                })?;
        }
        for dir in &guest.dirs {
            pod.agent
                .copy_file(&CopyFileRequest {
                    path: dir.clone(),
                    directory: true,
                    mode: 0o777,
                    ..Default::default()
                })
                .map_err(TaskError::agent(ctx(&format!("pod volume {dir}"))))?;
        }
        let pid = pod
            .agent
            .create_container(
                id,
                spec_json,
                Some(Rootfs {
                    image_mount,
                    writable_mount,
                    ..Default::default()
                }),
                req.stdio.agent_stdio(),
            )
            .map_err(TaskError::agent(ctx("CreateContainer")))?;
        let proc = Arc::new(Proc::new(id, "", req.stdio.clone(), pid));
        let io = ProcessIo::attach(&pod.agent, id, "", &req.stdio).map_err(|source| {
            TaskError::Stdio {
                context: ctx("stdio"),
                source,
            }
        })?;
        proc.set_io(io);
        self.procs().insert((id.clone(), String::new()), proc);
        Ok(pid)
    }

    /// Gives back everything a container holds: the agent's container and mounts, the
    /// drive slots, the image reference, the writable disk. Best effort, logged.
    pub(crate) fn release_container(&self, pod: &Pod, c: &Container) {
        let (image_mount, writable_mount) = guest_mounts(&c.id);
        // A removal the agent does not answer declares the VM dead (crate::liveness):
        // the rest is then host-side only.
        let agent = pod.agent.with_timeout(pod.config.liveness.stop_timeout());
        let answered = |what: &str, result: Result<(), AgentError>| match result {
            Ok(()) => true,
            Err(e) if e.is_no_answer() => {
                pod.declare_dead(&format!("container {}: {what}: {}", c.id, chain(&e)));
                false
            }
            Err(e) => {
                if e.code() != Some(crate::agent::Code::NOT_FOUND) {
                    warn!(container = %c.id, error = %chain(&e), "{what}");
                }
                true
            }
        };
        if pod.ended().is_none() && answered("RemoveContainer", agent.remove_container(&c.id)) {
            for m in [&image_mount, &writable_mount] {
                if !answered("RemoveStorage", agent.remove_storage(m)) {
                    break;
                }
            }
        }
        pod.eject(&c.image_serial);
        pod.eject(&c.writable_serial);
        if let Err(e) = crate::state::cleanup_container(&pod.config, &pod.id, &c.id) {
            warn!(container = %c.id, error = %chain(&e), "releasing host resources");
        }
        if let Ok(mut r) = pod.record.lock() {
            r.containers.remove(&c.id);
        }
        if let Some(dir) = c.writable_disk.as_ref().and_then(|d| d.parent()) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> RootfsMount {
        RootfsMount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn lower_dirs_from_containerd_rootfs() {
        let s = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots";
        let m = overlay(&[
            "index=off",
            &format!("workdir={s}/12/work"),
            &format!("upperdir={s}/12/fs"),
            &format!("lowerdir={s}/11/fs:{s}/3/fs"),
        ]);
        assert_eq!(
            lower_dirs(&[m]).expect("overlay"),
            vec![
                PathBuf::from(format!("{s}/11/fs")),
                PathBuf::from(format!("{s}/3/fs"))
            ]
        );
        let bind = RootfsMount {
            kind: "bind".into(),
            source: "/snap/1/fs".into(),
            options: vec!["rbind".into(), "rw".into()],
        };
        assert_eq!(
            lower_dirs(&[bind]).expect("bind"),
            vec![PathBuf::from("/snap/1/fs")]
        );
        assert!(lower_dirs(&[]).is_err());
        assert!(lower_dirs(&[overlay(&["upperdir=/x"])]).is_err());
        assert!(lower_dirs(&[overlay(&["lowerdir=rel:/abs"])]).is_err());
        let dev = RootfsMount {
            kind: "ext4".into(),
            source: "/dev/vdb".into(),
            options: vec![],
        };
        assert!(lower_dirs(&[dev]).expect_err("ext4").contains("ext4"));
    }

    #[test]
    fn bundle_spec_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = read_bundle_spec(dir.path()).expect_err("missing");
        assert!(err.to_string().contains("config.json"));
        std::fs::write(dir.path().join("config.json"), "{").expect("write");
        assert!(read_bundle_spec(dir.path()).is_err());
    }
}
