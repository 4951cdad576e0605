//! What the agent changes in the OCI spec it is given before libcontainer sees it.

use crate::error::{AgentError, Result};
use libcontainer::oci_spec::runtime::{Process, Root, Spec};
use std::path::{Path, PathBuf};

/// The cgroup every container gets unless the spec names a cgroupfs path.
pub fn default_cgroups_path(id: &str) -> PathBuf {
    PathBuf::from(format!("/cocoon/{id}"))
}

/// `linux.cgroupsPath` as the agent uses it: absolute cgroupfs paths stay; empty and
/// systemd-style (`slice:prefix:name`, there is no systemd in the guest) become
/// `/cocoon/<id>`; a relative path is taken from the hierarchy root.
pub fn normalize_cgroups_path(path: Option<&Path>, id: &str) -> Result<PathBuf> {
    let Some(path) = path else {
        return Ok(default_cgroups_path(id));
    };
    let text = path.to_str().ok_or_else(|| {
        AgentError::InvalidArgument(format!("linux.cgroupsPath {path:?} is not UTF-8"))
    })?;
    if text.is_empty() || text.contains(':') {
        return Ok(default_cgroups_path(id));
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(AgentError::InvalidArgument(format!(
            "linux.cgroupsPath {text:?} must not contain '..'"
        )));
    }
    Ok(Path::new("/").join(text.trim_start_matches('/')))
}

/// The overlay mount options for a container rootfs. The kernel splits options at ','
/// and lower dirs at ':', so paths holding either (or '\\', its escape) are refused.
pub fn overlay_options(lower: &Path, upper: &Path, work: &Path) -> Result<String> {
    let mut parts = Vec::new();
    for (key, path) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
        let text = path
            .to_str()
            .filter(|t| t.starts_with('/') && !t.contains([',', ':', '\\']))
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!(
                    "overlay {key} {path:?} must be an absolute path without ',', ':' or '\\'"
                ))
            })?;
        parts.push(format!("{key}={text}"));
    }
    Ok(parts.join(","))
}

/// Parses the spec from the request and adapts it:
/// - `root.path` is `rootfs` when the agent built an overlay, else it must be absolute
///   (libcontainer would resolve a relative one against the bundle, which is the agent's
///   own directory, not an image);
/// - `process.terminal` follows the request's stdio (the agent owns the pty decision);
/// - `linux.cgroupsPath` is normalised (see [`normalize_cgroups_path`]).
pub fn prepare_spec(
    spec_json: &[u8],
    id: &str,
    rootfs: Option<&Path>,
    terminal: bool,
) -> Result<Spec> {
    let mut spec: Spec = serde_json::from_slice(spec_json).map_err(|e| {
        AgentError::InvalidArgument(format!("container {id}: bad OCI spec JSON: {e}"))
    })?;
    match rootfs {
        Some(path) => {
            // oci-spec's default root is read-only; a spec without a root gets a
            // writable one (the writable disk is the point of the overlay).
            let root = spec.root_mut().get_or_insert_with(|| {
                let mut r = Root::default();
                r.set_readonly(None);
                r
            });
            root.set_path(path.to_path_buf());
        }
        None => {
            let root = spec.root().as_ref().ok_or_else(|| {
                AgentError::InvalidArgument(format!(
                    "container {id}: the spec has no root and the request no rootfs"
                ))
            })?;
            if !root.path().is_absolute() {
                return Err(AgentError::InvalidArgument(format!(
                    "container {id}: root.path {:?} must be absolute when no rootfs is given",
                    root.path()
                )));
            }
        }
    }
    let process = spec.process_mut().as_mut().ok_or_else(|| {
        AgentError::InvalidArgument(format!("container {id}: the spec has no process"))
    })?;
    check_process(process, id)?;
    process.set_terminal(Some(terminal));
    let linux = spec.linux_mut().as_mut().ok_or_else(|| {
        AgentError::InvalidArgument(format!("container {id}: the spec has no linux section"))
    })?;
    let cgroups = normalize_cgroups_path(linux.cgroups_path().as_deref(), id)?;
    linux.set_cgroups_path(Some(cgroups));
    Ok(spec)
}

/// Parses an exec's OCI `process` object; `terminal` follows the request's stdio.
pub fn prepare_process(process_json: &[u8], id: &str, terminal: bool) -> Result<Process> {
    let mut process: Process = serde_json::from_slice(process_json).map_err(|e| {
        AgentError::InvalidArgument(format!("container {id}: bad OCI process JSON: {e}"))
    })?;
    check_process(&process, id)?;
    process.set_terminal(Some(terminal));
    Ok(process)
}

fn check_process(process: &Process, id: &str) -> Result<()> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::InvalidArgument(format!(
            "container {id}: process.args is empty"
        )));
    }
    if !process.cwd().is_absolute() {
        return Err(AgentError::InvalidArgument(format!(
            "container {id}: process.cwd {:?} must be absolute",
            process.cwd()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json(root: Option<&str>, cgroups: Option<&str>) -> Vec<u8> {
        let mut v = serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
        });
        if let Some(r) = root {
            v["root"] = serde_json::json!({"path": r, "readonly": true});
        }
        if let Some(c) = cgroups {
            v["linux"]["cgroupsPath"] = serde_json::json!(c);
        }
        serde_json::to_vec(&v).expect("json")
    }

    #[test]
    fn cgroups_paths_normalise() {
        let n = |p: Option<&str>| normalize_cgroups_path(p.map(Path::new), "c1").ok();
        assert_eq!(n(None), Some("/cocoon/c1".into()));
        assert_eq!(n(Some("")), Some("/cocoon/c1".into()));
        assert_eq!(
            n(Some("kubepods-burstable-pod1.slice:cri-containerd:abc")),
            Some("/cocoon/c1".into())
        );
        assert_eq!(
            n(Some("/kubepods/burstable/pod1/abc")),
            Some("/kubepods/burstable/pod1/abc".into())
        );
        assert_eq!(n(Some("kubepods/abc")), Some("/kubepods/abc".into()));
        assert_eq!(n(Some("/a/../../etc")), None);
    }

    #[test]
    fn overlay_options_are_built_and_checked() {
        assert_eq!(
            overlay_options(Path::new("/i"), Path::new("/w/upper"), Path::new("/w/work"))
                .expect("valid"),
            "lowerdir=/i,upperdir=/w/upper,workdir=/w/work"
        );
        for bad in ["/a,b", "/a:b", "rel", "/a\\b"] {
            assert!(
                overlay_options(Path::new(bad), Path::new("/u"), Path::new("/w")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn spec_gets_overlay_root_terminal_and_cgroup() {
        let spec = prepare_spec(
            &spec_json(Some("rootfs"), Some("system.slice:x:y")),
            "c1",
            Some(Path::new("/run/cocoon/containers/c1/rootfs")),
            true,
        )
        .expect("spec");
        let root = spec.root().as_ref().expect("root");
        assert_eq!(root.path(), Path::new("/run/cocoon/containers/c1/rootfs"));
        assert_eq!(root.readonly(), Some(true), "other root fields are kept");
        assert_eq!(
            spec.process().as_ref().and_then(|p| p.terminal()),
            Some(true)
        );
        assert_eq!(
            spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()),
            Some("/cocoon/c1".into())
        );
        // No root in the spec at all: the overlay provides a writable one.
        let spec =
            prepare_spec(&spec_json(None, None), "c1", Some(Path::new("/r")), false).expect("spec");
        let root = spec.root().as_ref().expect("root");
        assert_eq!(
            (root.path().as_path(), root.readonly()),
            (Path::new("/r"), None)
        );
    }

    #[test]
    fn spec_without_rootfs_needs_an_absolute_root() {
        assert!(prepare_spec(&spec_json(Some("/images/busybox"), None), "c1", None, false).is_ok());
        for bad in [spec_json(Some("rootfs"), None), spec_json(None, None)] {
            let err = prepare_spec(&bad, "c1", None, false).expect_err("relative root");
            assert!(matches!(err, AgentError::InvalidArgument(_)), "{err}");
        }
    }

    #[test]
    fn bad_specs_are_invalid_arguments() {
        let no_linux = br#"{"ociVersion":"1.1.0","root":{"path":"/r"},
            "process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#;
        let no_args = br#"{"ociVersion":"1.1.0","root":{"path":"/r"},"linux":{},
            "process":{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}}"#;
        for bad in [&b"{not json"[..], &no_linux[..], &no_args[..], b"{}"] {
            assert!(matches!(
                prepare_spec(bad, "c1", None, false),
                Err(AgentError::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn exec_process_is_checked() {
        let p = prepare_process(
            br#"{"user":{"uid":1000,"gid":1000,"additionalGids":[5]},"args":["ls"],"cwd":"/tmp","terminal":true}"#,
            "c1",
            false,
        )
        .expect("process");
        assert_eq!(p.terminal(), Some(false));
        assert_eq!(p.user().uid(), 1000);
        assert!(prepare_process(
            br#"{"user":{"uid":0,"gid":0},"args":["ls"],"cwd":"tmp"}"#,
            "c1",
            false
        )
        .is_err());
        assert!(prepare_process(br#"{"args":["ls"]}"#, "c1", false).is_err());
    }
}
