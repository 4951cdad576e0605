//! The OCI spec containerd writes into a bundle, and what the guest gets instead.
//!
//! Everything here is a pure function of the spec (and, for bind mounts, of what the
//! source path on the host is), so it is unit-tested with specs shaped like containerd
//! 1.6's CRI output.
//!
//! # Mounts
//!
//! A container's mounts are sorted by [`classify_mount`] into:
//! - kernel filesystems (proc, sysfs, tmpfs, devpts, mqueue, cgroup): kept as they are,
//!   the guest kernel provides them;
//! - small host files and directories the kubelet or containerd prepared for the pod
//!   (configMap, secret, projected and downwardAPI volumes, service-account tokens,
//!   `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`, the termination log) and host
//!   *files* of hostPath volumes: copied into the guest under
//!   `/run/cocoon/files/<hash of the host path>/<name>` and kept in sync by the runtime
//!   ([`crate::files`]); the mount's source becomes that guest path;
//! - emptyDir volumes, the pod's `/dev/shm` and hostPath *directories*: guest-local
//!   directories under `/run/cocoon/volumes/`, shared by every container of the pod that
//!   names the same volume (a hostPath never shows host data in the guest: the pod's
//!   disk I/O stays in the VM);
//! - anything else (other volume plugins, block devices, sockets, missing sources,
//!   filesystems of other types) is refused with an error naming the mount.
//!
//! # Namespaces and the rest
//!
//! The pod's network, IPC and UTS namespaces live in the guest (the agent's
//! `SetupSandbox` returns their paths); a container's PID namespace is the pod's when
//! containerd's spec joins another process's (shareProcessNamespace), else its own.
//! Namespace paths that name host processes are dropped. Host hooks, AppArmor and SELinux
//! labels mean nothing in the guest and are removed. `linux.cgroupsPath` becomes
//! `/cocoon/<container id>`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// containerd's CRI annotation: "sandbox" or "container".
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// containerd's CRI annotation: the id of the pod's sandbox container.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Where emptyDir, hostPath and `/dev/shm` volumes live in the guest.
pub const GUEST_VOLUMES: &str = "/run/cocoon/volumes";
/// Where copied host files live in the guest.
pub const GUEST_FILES: &str = "/run/cocoon/files";

/// Kernel filesystem types a container may mount as the spec says.
const KERNEL_FS: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "devtmpfs",
];
/// Kubelet volume plugins whose content is small and copied into the guest.
const COPIED_PLUGINS: &[&str] = &[
    "kubernetes.io~configmap",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
];
/// Files containerd's CRI plugin keeps per sandbox and bind-mounts into containers.
const CRI_SANDBOX_FILES: &[&str] = &["hosts", "hostname", "resolv.conf"];

/// Why a spec cannot be run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("OCI spec: {0}")]
    Invalid(String),
    #[error("mount {destination} (source {source_path:?}, type {kind:?}): {reason}")]
    UnsupportedMount {
        destination: String,
        source_path: String,
        kind: String,
        reason: String,
    },
}

/// What a host path is, as far as mount classification cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    File,
    Dir,
    Missing,
    /// A device, socket, FIFO...: named for the error message.
    Other(String),
}

impl SourceKind {
    /// Looks at the host path (following symlinks, as a bind mount does).
    pub fn of(path: &Path) -> SourceKind {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => SourceKind::File,
            Ok(m) if m.is_dir() => SourceKind::Dir,
            Ok(m) => {
                let t = m.file_type();
                let what = if t.is_block_device() {
                    "block device"
                } else if t.is_char_device() {
                    "character device"
                } else if t.is_socket() {
                    "socket"
                } else if t.is_fifo() {
                    "FIFO"
                } else {
                    "special file"
                };
                SourceKind::Other(what.into())
            }
            Err(_) => SourceKind::Missing,
        }
    }
}

/// What happens to one mount of the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountPlan {
    /// A kernel filesystem: kept unchanged.
    Keep,
    /// Copied from the host into the guest at `guest` (a file or a directory tree).
    CopyIn { source: PathBuf, guest: String },
    /// A guest-local directory shared by the pod's containers.
    PodDir { guest: String },
}

/// The pod's namespaces in the guest (from `SetupSandbox`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestNamespaces {
    pub net: String,
    pub ipc: String,
    pub uts: String,
    /// Empty when the pod has no shared PID namespace.
    pub pid: String,
}

/// The spec for the guest and what must exist there before the container is created.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestSpec {
    pub spec: Value,
    /// Host sources to copy (and keep in sync) and their guest paths.
    pub copies: Vec<(PathBuf, String)>,
    /// Guest directories to create (pod volumes).
    pub dirs: Vec<String>,
}

/// DNS settings of a resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// The string entries of the JSON object at `pointer` (none when it is missing).
fn string_map(spec: &Value, pointer: &str) -> HashMap<String, String> {
    spec.pointer(pointer)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// The spec's annotations.
pub fn annotations(spec: &Value) -> HashMap<String, String> {
    string_map(spec, "/annotations")
}

/// Whether the spec is a CRI pod sandbox (the "pause" container).
pub fn is_sandbox(spec: &Value) -> bool {
    annotations(spec)
        .get(ANNOTATION_CONTAINER_TYPE)
        .is_some_and(|t| t == "sandbox")
}

/// The sandbox a container belongs to: the CRI annotation, else the container itself.
pub fn sandbox_id_of(spec: &Value, container_id: &str) -> String {
    annotations(spec)
        .get(ANNOTATION_SANDBOX_ID)
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| container_id.to_string())
}

fn namespaces(spec: &Value) -> &[Value] {
    spec.pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The path of the spec's network namespace, if it joins one (the pod's, made by CRI).
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    namespaces(spec)
        .iter()
        .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))
        .and_then(|n| n.get("path"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The spec's hostname.
pub fn hostname(spec: &Value) -> String {
    spec.get("hostname")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The spec's `linux.sysctl`.
pub fn sysctls(spec: &Value) -> HashMap<String, String> {
    string_map(spec, "/linux/sysctl")
}

/// The host file a spec bind-mounts at `/etc/resolv.conf`, if any.
pub fn resolv_conf_source(spec: &Value) -> Option<PathBuf> {
    mounts(spec)
        .iter()
        .find(|m| m.get("destination").and_then(Value::as_str) == Some("/etc/resolv.conf"))
        .and_then(|m| m.get("source"))
        .and_then(Value::as_str)
        .map(PathBuf::from)
}

/// Where containerd 1.6/1.7's CRI plugin keeps a sandbox's resolv.conf, for the default
/// containerd root.
pub fn cri_resolv_conf(sandbox_id: &str) -> PathBuf {
    PathBuf::from("/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes")
        .join(sandbox_id)
        .join("resolv.conf")
}

/// Parses `nameserver`, `search`/`domain` and `options` lines.
pub fn parse_resolv_conf(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.servers.extend(words.next().map(str::to_string)),
            Some("search") | Some("domain") => {
                dns.searches = words.map(str::to_string).collect();
            }
            Some("options") => dns.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    dns
}

fn mounts(spec: &Value) -> &[Value] {
    spec.get("mounts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn mount_options(m: &Value) -> Vec<&str> {
    m.get("options")
        .and_then(Value::as_array)
        .map(|o| o.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The guest path of a copied host source: `/run/cocoon/files/<hash>/<name>`. The hash
/// keeps sources apart; the same source (e.g. the pod's hosts file) maps to one guest
/// copy for every container.
pub fn guest_copy_path(source: &Path) -> String {
    let hash = Sha256::digest(source.as_os_str().as_encoded_bytes());
    let short: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "..")
        .unwrap_or_else(|| "root".into());
    format!("{GUEST_FILES}/{short}/{name}")
}

/// Guest path for a host directory of a hostPath volume: the host path under
/// `/run/cocoon/volumes/host`.
fn guest_host_path_dir(source: &Path) -> Option<String> {
    let mut out = format!("{GUEST_VOLUMES}/host");
    for c in source.components() {
        match c {
            std::path::Component::Normal(n) => {
                out.push('/');
                out.push_str(n.to_str()?);
            }
            std::path::Component::RootDir | std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// For a kubelet path `.../pods/<uid>/<rest...>`: the components after the uid.
fn kubelet_pod_rest(source: &Path) -> Option<Vec<String>> {
    let parts: Vec<String> = source
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    // Look for ".../kubelet/pods/<uid>/..." (kubelet's root may be elsewhere, but it ends
    // in "kubelet" on every distribution we know) or any ".../pods/<uid>/volumes/...".
    for i in 0..parts.len().saturating_sub(2) {
        if parts[i] == "pods" && (i > 0 && parts[i - 1] == "kubelet") {
            return Some(parts[i + 2..].to_vec());
        }
        if parts[i] == "pods" && parts.get(i + 2).is_some_and(|p| p == "volumes") {
            return Some(parts[i + 2..].to_vec());
        }
    }
    None
}

/// Whether `source` is one of the CRI plugin's per-sandbox files.
fn is_cri_sandbox_file(source: &Path) -> bool {
    let s = source.to_string_lossy();
    s.contains("/io.containerd.grpc.v1.cri/sandboxes/")
        && source
            .file_name()
            .is_some_and(|n| CRI_SANDBOX_FILES.iter().any(|f| n == *f))
}

/// Decides what happens to one mount (an element of the spec's `mounts`).
pub fn classify_mount(
    mount: &Value,
    kind_of: &dyn Fn(&Path) -> SourceKind,
) -> Result<MountPlan, SpecError> {
    let destination = str_field(mount, "destination");
    let source = str_field(mount, "source");
    let kind = str_field(mount, "type");
    let options = mount_options(mount);
    let refuse = |reason: String| SpecError::UnsupportedMount {
        destination: destination.to_string(),
        source_path: source.to_string(),
        kind: kind.to_string(),
        reason,
    };
    if !destination.starts_with('/') {
        return Err(refuse("the destination must be an absolute path".into()));
    }
    let bind = kind == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind");
    if !bind {
        if KERNEL_FS.contains(&kind) {
            return Ok(MountPlan::Keep);
        }
        return Err(refuse(format!(
            "filesystem type {kind:?} is not supported in a Cocoon VM (only {} and bind \
             mounts)",
            KERNEL_FS.join(", ")
        )));
    }
    let src = Path::new(source);
    if !src.is_absolute() {
        return Err(refuse(
            "a bind mount's source must be an absolute path".into(),
        ));
    }
    // The pod's /dev/shm (CRI bind-mounts one tmpfs for the whole pod).
    if destination == "/dev/shm" {
        return Ok(MountPlan::PodDir {
            guest: format!("{GUEST_VOLUMES}/shm"),
        });
    }
    let copy = || -> Result<MountPlan, SpecError> {
        match kind_of(src) {
            SourceKind::File | SourceKind::Dir => Ok(MountPlan::CopyIn {
                source: src.to_path_buf(),
                guest: guest_copy_path(src),
            }),
            SourceKind::Missing => Err(refuse("the source does not exist on the host".into())),
            SourceKind::Other(what) => Err(refuse(format!(
                "the source is a {what}, which cannot be copied into the VM"
            ))),
        }
    };
    if is_cri_sandbox_file(src) {
        return copy();
    }
    if let Some(rest) = kubelet_pod_rest(src) {
        return match rest.first().map(String::as_str) {
            Some("volumes") => {
                let plugin = rest.get(1).map(String::as_str).unwrap_or_default();
                let name = rest.get(2).map(String::as_str).unwrap_or_default();
                if plugin == "kubernetes.io~empty-dir" && !name.is_empty() {
                    let mut guest = format!("{GUEST_VOLUMES}/empty-dir/{name}");
                    for extra in &rest[3..] {
                        guest.push('/');
                        guest.push_str(extra);
                    }
                    if rest.iter().any(|p| p == "..") {
                        return Err(refuse("'..' in a volume path".into()));
                    }
                    Ok(MountPlan::PodDir { guest })
                } else if COPIED_PLUGINS.contains(&plugin) {
                    copy()
                } else {
                    Err(refuse(format!(
                        "volume plugin {plugin:?} is not supported by Cocoon (emptyDir, \
                         hostPath, configMap, secret, projected and downwardAPI are)"
                    )))
                }
            }
            // /etc/hosts the kubelet writes, and termination-log files.
            Some("etc-hosts") | Some("containers") => copy(),
            Some("volume-subpaths") => Err(refuse(
                "subPath volume mounts are not supported by Cocoon yet".into(),
            )),
            _ => Err(refuse("unknown kubelet pod path".into())),
        };
    }
    // A hostPath volume or another plain bind mount.
    match kind_of(src) {
        SourceKind::Dir => guest_host_path_dir(src)
            .map(|guest| MountPlan::PodDir { guest })
            .ok_or_else(|| refuse("the source path is not plain UTF-8".into())),
        SourceKind::File => copy(),
        SourceKind::Missing => Err(refuse("the source does not exist on the host".into())),
        SourceKind::Other(what) => Err(refuse(format!(
            "the source is a {what}; host devices and sockets cannot be passed into a VM"
        ))),
    }
}

/// Mount options that only make sense for host mounts: propagation into other mount
/// namespaces of the host.
fn guest_mount_options(options: &[&str]) -> Vec<Value> {
    options
        .iter()
        .filter(|o| !matches!(**o, "shared" | "rshared" | "slave" | "rslave"))
        .map(|o| json!(o))
        .collect()
}

/// Rewrites a container's OCI spec for the guest (see the module documentation).
pub fn rewrite_for_guest(
    spec: &Value,
    container_id: &str,
    ns: &GuestNamespaces,
    kind_of: &dyn Fn(&Path) -> SourceKind,
) -> Result<GuestSpec, SpecError> {
    let mut out = spec.clone();
    let obj = out
        .as_object_mut()
        .ok_or_else(|| SpecError::Invalid("the spec is not a JSON object".into()))?;
    if obj.get("process").is_none_or(|p| !p.is_object()) {
        return Err(SpecError::Invalid("the spec has no process".into()));
    }
    obj.remove("hooks");
    if let Some(p) = obj.get_mut("process").and_then(Value::as_object_mut) {
        p.remove("apparmorProfile");
        p.remove("selinuxLabel");
    }

    let mut copies: Vec<(PathBuf, String)> = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    let mut new_mounts = Vec::new();
    for m in mounts(spec) {
        let plan = classify_mount(m, kind_of)?;
        let mut m = m.clone();
        let opts = guest_mount_options(&mount_options(&m));
        match plan {
            MountPlan::Keep => {}
            MountPlan::CopyIn { source, guest } => {
                if let Some(o) = m.as_object_mut() {
                    o.insert("source".into(), json!(guest));
                    o.insert("options".into(), Value::Array(opts));
                }
                if !copies.iter().any(|(s, _)| *s == source) {
                    copies.push((source, guest));
                }
            }
            MountPlan::PodDir { guest } => {
                if let Some(o) = m.as_object_mut() {
                    o.insert("source".into(), json!(guest));
                    o.insert("options".into(), Value::Array(opts));
                }
                if !dirs.contains(&guest) {
                    dirs.push(guest);
                }
            }
        }
        new_mounts.push(m);
    }
    if obj.contains_key("mounts") {
        obj.insert("mounts".into(), Value::Array(new_mounts));
    }

    let linux = obj
        .entry("linux")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| SpecError::Invalid("linux is not an object".into()))?;
    linux.remove("mountLabel");
    linux.remove("intelRdt");
    linux.insert(
        "cgroupsPath".into(),
        json!(format!("/cocoon/{container_id}")),
    );
    let old = linux
        .get("namespaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut new_ns: Vec<Value> = Vec::new();
    let mut seen = Vec::new();
    for n in old {
        let t = str_field(&n, "type").to_string();
        let joins = n
            .get("path")
            .and_then(Value::as_str)
            .is_some_and(|p| !p.is_empty());
        let entry = match t.as_str() {
            "network" => json!({"type": "network", "path": ns.net}),
            "ipc" => json!({"type": "ipc", "path": ns.ipc}),
            "uts" => json!({"type": "uts", "path": ns.uts}),
            "pid" if joins && !ns.pid.is_empty() => json!({"type": "pid", "path": ns.pid}),
            _ => json!({"type": t}),
        };
        seen.push(t);
        new_ns.push(entry);
    }
    // Pods on the host network/IPC/UTS still live in the VM's pod namespaces: the VM
    // is the only host they get.
    for (t, path) in [("network", &ns.net), ("ipc", &ns.ipc), ("uts", &ns.uts)] {
        if !seen.iter().any(|s| s == t) && !path.is_empty() {
            new_ns.push(json!({"type": t, "path": path}));
        }
    }
    linux.insert("namespaces".into(), Value::Array(new_ns));
    Ok(GuestSpec {
        spec: out,
        copies,
        dirs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SANDBOX: &str = "2d1c7a3f0b9e";
    const POD: &str = "/var/lib/kubelet/pods/7c0e3a52-7a6b-4f0e-9d34-6c8a2b6f7e11";

    fn ns() -> GuestNamespaces {
        GuestNamespaces {
            net: "/run/cocoon/sandbox/ns/net".into(),
            ipc: "/run/cocoon/sandbox/ns/ipc".into(),
            uts: "/run/cocoon/sandbox/ns/uts".into(),
            pid: "/run/cocoon/sandbox/ns/pid".into(),
        }
    }

    /// A container spec as containerd 1.6's CRI plugin writes it (trimmed).
    fn cri_container_spec() -> Value {
        let cri = format!("/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}");
        json!({
            "ociVersion": "1.0.2-dev",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": ["nginx", "-g", "daemon off;"],
                "env": ["PATH=/usr/bin"],
                "cwd": "/",
                "apparmorProfile": "cri-containerd.apparmor.d",
                "oomScoreAdj": 1000
            },
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc",
                 "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                 "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                 "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": format!("{POD}/etc-hosts"),
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/dev/termination-log", "type": "bind",
                 "source": format!("{POD}/containers/nginx/1f3b2c4d"),
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/etc/hostname", "type": "bind", "source": format!("{cri}/hostname"),
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/etc/resolv.conf", "type": "bind", "source": format!("{cri}/resolv.conf"),
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/dev/shm", "type": "bind",
                 "source": format!("/run/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/shm"),
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/cache", "type": "bind",
                 "source": format!("{POD}/volumes/kubernetes.io~empty-dir/cache"),
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind",
                 "source": format!("{POD}/volumes/kubernetes.io~projected/kube-api-access-x7k2p"),
                 "options": ["rbind", "rprivate", "ro"]},
                {"destination": "/etc/nginx/conf.d", "type": "bind",
                 "source": format!("{POD}/volumes/kubernetes.io~configmap/conf"),
                 "options": ["rbind", "rprivate", "ro"]},
                {"destination": "/data", "type": "bind", "source": "/srv/data",
                 "options": ["rbind", "rshared", "rw"]}
            ],
            "hooks": {"createContainer": [{"path": "/usr/bin/nvidia-hook"}]},
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": "nginx",
                "io.kubernetes.cri.sandbox-id": SANDBOX
            },
            "linux": {
                "resources": {"memory": {"limit": 134217728}, "cpu": {"shares": 2, "quota": 50000, "period": 100000}},
                "cgroupsPath": format!("kubepods-besteffort-pod7c0e.slice:cri-containerd:abc"),
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                    {"type": "uts", "path": "/proc/4242/ns/uts"},
                    {"type": "mount"},
                    {"type": "network", "path": "/var/run/netns/cni-1234"}
                ],
                "maskedPaths": ["/proc/kcore"],
                "mountLabel": "system_u:object_r:container_file_t:s0"
            }
        })
    }

    fn fake_kinds(path: &Path) -> SourceKind {
        let p = path.to_string_lossy();
        if p.contains("configmap") || p.contains("projected") || p == "/srv/data" {
            SourceKind::Dir
        } else if p.starts_with("/dev/") {
            SourceKind::Other("block device".into())
        } else if p.contains("missing") {
            SourceKind::Missing
        } else {
            SourceKind::File
        }
    }

    fn mount_at<'a>(spec: &'a Value, dest: &str) -> &'a Value {
        spec["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == dest)
            .unwrap_or_else(|| panic!("no mount at {dest}"))
    }

    #[test]
    fn cri_container_spec_is_rewritten_for_the_guest() {
        let spec = cri_container_spec();
        let out = rewrite_for_guest(&spec, "abc", &ns(), &fake_kinds).expect("rewrite");
        let s = &out.spec;
        // Kernel mounts stay.
        assert_eq!(mount_at(s, "/proc"), mount_at(&spec, "/proc"));
        assert_eq!(
            mount_at(s, "/sys/fs/cgroup"),
            mount_at(&spec, "/sys/fs/cgroup")
        );
        // Copied files.
        let hosts = mount_at(s, "/etc/hosts")["source"].as_str().expect("src");
        assert!(hosts.starts_with("/run/cocoon/files/") && hosts.ends_with("/etc-hosts"));
        assert_eq!(out.copies.len(), 6, "{:?}", out.copies);
        assert!(out
            .copies
            .iter()
            .any(|(src, g)| src.ends_with("resolv.conf") && g.ends_with("/resolv.conf")));
        // Pod-local directories.
        assert_eq!(mount_at(s, "/dev/shm")["source"], "/run/cocoon/volumes/shm");
        assert_eq!(
            mount_at(s, "/cache")["source"],
            "/run/cocoon/volumes/empty-dir/cache"
        );
        assert_eq!(
            mount_at(s, "/data")["source"],
            "/run/cocoon/volumes/host/srv/data"
        );
        assert_eq!(
            mount_at(s, "/data")["options"],
            json!(["rbind", "rw"]),
            "host propagation dropped"
        );
        assert_eq!(out.dirs.len(), 3);
        // Namespaces.
        let nss = s["linux"]["namespaces"].as_array().expect("ns");
        assert!(nss.contains(&json!({"type": "network", "path": "/run/cocoon/sandbox/ns/net"})));
        assert!(nss.contains(&json!({"type": "ipc", "path": "/run/cocoon/sandbox/ns/ipc"})));
        assert!(nss.contains(&json!({"type": "uts", "path": "/run/cocoon/sandbox/ns/uts"})));
        assert!(nss.contains(&json!({"type": "pid"})), "own pid namespace");
        assert!(nss.contains(&json!({"type": "mount"})));
        assert_eq!(nss.len(), 5);
        // The rest.
        assert_eq!(s["linux"]["cgroupsPath"], "/cocoon/abc");
        assert!(s.get("hooks").is_none());
        assert!(s["process"].get("apparmorProfile").is_none());
        assert!(s["linux"].get("mountLabel").is_none());
        assert_eq!(s["linux"]["resources"], spec["linux"]["resources"]);
        assert_eq!(s["annotations"], spec["annotations"]);
    }

    #[test]
    fn shared_pid_namespace_joins_the_pods() {
        let mut spec = cri_container_spec();
        spec["linux"]["namespaces"][0] = json!({"type": "pid", "path": "/proc/4242/ns/pid"});
        let out = rewrite_for_guest(&spec, "abc", &ns(), &fake_kinds).expect("rewrite");
        let nss = out.spec["linux"]["namespaces"].as_array().expect("ns");
        assert!(nss.contains(&json!({"type": "pid", "path": "/run/cocoon/sandbox/ns/pid"})));
        // Without a pod PID namespace in the guest the container gets its own.
        let no_pid = GuestNamespaces {
            pid: String::new(),
            ..ns()
        };
        let out = rewrite_for_guest(&spec, "abc", &no_pid, &fake_kinds).expect("rewrite");
        let nss = out.spec["linux"]["namespaces"].as_array().expect("ns");
        assert!(nss.contains(&json!({"type": "pid"})));
    }

    #[test]
    fn host_network_pods_still_get_the_pod_namespaces() {
        let mut spec = cri_container_spec();
        spec["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}]);
        let out = rewrite_for_guest(&spec, "abc", &ns(), &fake_kinds).expect("rewrite");
        let nss = out.spec["linux"]["namespaces"].as_array().expect("ns");
        assert_eq!(nss.len(), 5);
        assert!(nss.contains(&json!({"type": "network", "path": "/run/cocoon/sandbox/ns/net"})));
    }

    fn bind(dest: &str, source: &str) -> Value {
        json!({"destination": dest, "type": "bind", "source": source, "options": ["rbind", "ro"]})
    }

    #[test]
    fn unsupported_mounts_are_refused_by_name() {
        let cases = [
            (
                bind(
                    "/pvc",
                    &format!("{POD}/volumes/kubernetes.io~csi/pvc-1/mount"),
                ),
                "kubernetes.io~csi",
            ),
            (bind("/dev/sda", "/dev/sda"), "block device"),
            (bind("/x", "/srv/missing"), "does not exist"),
            (
                bind("/sub", &format!("{POD}/volume-subpaths/cache/nginx/0")),
                "subPath",
            ),
            (
                json!({"destination": "/nfs", "type": "nfs", "source": "server:/export"}),
                "\"nfs\"",
            ),
            (bind("/rel", "relative/path"), "absolute"),
        ];
        for (mount, want) in cases {
            let err = classify_mount(&mount, &fake_kinds).expect_err("refused");
            let text = err.to_string();
            let dest = mount["destination"].as_str().expect("dest");
            assert!(text.contains(want) && text.contains(dest), "{text}");
            let mut spec = cri_container_spec();
            spec["mounts"].as_array_mut().expect("mounts").push(mount);
            assert!(rewrite_for_guest(&spec, "abc", &ns(), &fake_kinds).is_err());
        }
    }

    #[test]
    fn mount_classification() {
        assert_eq!(
            classify_mount(
                &json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs"}),
                &fake_kinds
            ),
            Ok(MountPlan::Keep)
        );
        // A hostPath file is copied, a secret is copied, the same source maps to the
        // same guest path every time.
        let a = classify_mount(
            &bind("/etc/localtime", "/usr/share/zoneinfo/UTC"),
            &fake_kinds,
        )
        .expect("file");
        let b = classify_mount(&bind("/tz", "/usr/share/zoneinfo/UTC"), &fake_kinds).expect("file");
        assert_eq!(a, b);
        assert!(matches!(a, MountPlan::CopyIn { .. }));
        let secret = format!("{POD}/volumes/kubernetes.io~secret/token");
        assert!(matches!(
            classify_mount(&bind("/s", &secret), &fake_kinds),
            Ok(MountPlan::CopyIn { .. })
        ));
        // A kubelet at another root is recognised by its volumes layout.
        assert_eq!(
            classify_mount(
                &bind("/e", "/data/k8s/pods/uid/volumes/kubernetes.io~empty-dir/e"),
                &fake_kinds
            ),
            Ok(MountPlan::PodDir {
                guest: "/run/cocoon/volumes/empty-dir/e".into()
            })
        );
    }

    #[test]
    fn sandbox_facts() {
        let spec = json!({
            "hostname": "web-0",
            "annotations": {
                "io.kubernetes.cri.container-type": "sandbox",
                "io.kubernetes.cri.sandbox-id": SANDBOX
            },
            "mounts": [{"destination": "/etc/resolv.conf", "source": "/x/resolv.conf", "type": "bind"}],
            "linux": {
                "sysctl": {"net.ipv4.ip_forward": "1"},
                "namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "ipc"}]
            }
        });
        assert!(is_sandbox(&spec));
        assert_eq!(sandbox_id_of(&spec, "other"), SANDBOX);
        assert_eq!(sandbox_id_of(&json!({}), "own"), "own");
        assert_eq!(
            netns_path(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        assert_eq!(netns_path(&json!({})), None);
        assert_eq!(hostname(&spec), "web-0");
        assert_eq!(
            sysctls(&spec)
                .get("net.ipv4.ip_forward")
                .map(String::as_str),
            Some("1")
        );
        assert_eq!(
            resolv_conf_source(&spec),
            Some(PathBuf::from("/x/resolv.conf"))
        );
        assert!(!is_sandbox(&cri_container_spec()));
    }

    #[test]
    fn resolv_conf_parsing() {
        let dns = parse_resolv_conf(
            "# generated\nnameserver 10.96.0.10\nnameserver fd00::a ; v6\n\
             search default.svc.cluster.local svc.cluster.local\noptions ndots:5 edns0\n",
        );
        assert_eq!(dns.servers, ["10.96.0.10", "fd00::a"]);
        assert_eq!(
            dns.searches,
            ["default.svc.cluster.local", "svc.cluster.local"]
        );
        assert_eq!(dns.options, ["ndots:5", "edns0"]);
        assert_eq!(parse_resolv_conf(""), Dns::default());
    }

    #[test]
    fn specs_without_process_are_invalid() {
        assert!(matches!(
            rewrite_for_guest(&json!({"mounts": []}), "a", &ns(), &fake_kinds),
            Err(SpecError::Invalid(_))
        ));
        assert!(rewrite_for_guest(&json!([]), "a", &ns(), &fake_kinds).is_err());
    }
}
