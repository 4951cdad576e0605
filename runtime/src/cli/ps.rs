//! `cocoon ps`: the sandboxes on this host, from the state directory.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::config::Config;
use crate::error::chain;
use crate::state::PodRecord;

use super::procfs;
use super::table::{format_duration, format_kib_as_mib, format_table};
use super::{sandbox_ids, short_id, vmm_state, Result, VmmState};

/// Where containerd's v2 shims keep their bundles (`<ns>/<id>/config.json`).
pub const CONTAINERD_BUNDLES: &str = "/run/containerd/io.containerd.runtime.v2.task";

/// The CRI annotations naming the pod of a sandbox container.
const ANNOTATION_POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
const ANNOTATION_POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";

/// One sandbox, as `cocoon ps` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sandbox {
    pub id: String,
    /// `running`, `unresponsive` (running, but its agent has not answered the health
    /// check for `liveness.unresponsive_after_secs`), `dead` (a pid file whose VMM is
    /// gone) or `no-vmm` (no pid file).
    pub state: &'static str,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    /// Containers recorded in `pod.json`.
    pub containers: Option<usize>,
    pub vmm_pid: Option<u32>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub vmm_rss_kib: Option<u64>,
    pub uptime_secs: Option<u64>,
    /// While unresponsive: since when the agent has not answered (Unix seconds).
    pub unresponsive_since: Option<u64>,
    /// How often the VM has been marked unresponsive.
    pub unresponsive_count: u32,
    /// Problems met while reading this sandbox (an unreadable record, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Collects every sandbox of `config.state_dir`; `bundles` is containerd's bundle root
/// (for pod names).
pub fn list(config: &Config, bundles: &Path) -> Result<Vec<Sandbox>> {
    let mut out = Vec::new();
    for id in sandbox_ids(config)? {
        out.push(inspect(config, &id, bundles)?);
    }
    Ok(out)
}

fn inspect(config: &Config, id: &str, bundles: &Path) -> Result<Sandbox> {
    let dir = config.sandbox_dir(id);
    let mut sb = Sandbox {
        id: id.to_string(),
        ..Default::default()
    };
    match PodRecord::load(&dir) {
        Ok(Some(record)) => {
            sb.containers = Some(record.containers.len());
            sb.unresponsive_since = record.unresponsive_since;
            sb.unresponsive_count = record.unresponsive_count;
        }
        Ok(None) => {}
        Err(e) => sb.warnings.push(chain(&e)),
    }
    if let Some(spec) = find_bundle_spec(bundles, id) {
        (sb.pod_name, sb.pod_namespace) = pod_name(&spec);
    }
    match vmm_state(config, id) {
        Ok(VmmState::Running(vmm)) => {
            let pid = vmm.pid();
            sb.state = if sb.unresponsive_since.is_some() {
                "unresponsive"
            } else {
                "running"
            };
            sb.vmm_pid = Some(pid);
            if let Some(args) = procfs::cmdline(pid) {
                sb.vcpus = procfs::flag_value(&args, "--vcpus").and_then(|v| v.parse().ok());
                sb.memory_mib =
                    procfs::flag_value(&args, "--memory-mib").and_then(|v| v.parse().ok());
            }
            sb.vmm_rss_kib = procfs::rss_kib(pid);
            sb.uptime_secs = procfs::process_age(pid).map(|d| d.as_secs());
        }
        Ok(VmmState::Dead) => sb.state = "dead",
        Ok(VmmState::NoPidFile) => sb.state = "no-vmm",
        Err(e) => {
            sb.state = "unknown";
            sb.warnings.push(chain(&e));
        }
    }
    Ok(sb)
}

/// The sandbox container's OCI spec in containerd's bundle directory, any namespace.
fn find_bundle_spec(bundles: &Path, id: &str) -> Option<Value> {
    for ns in std::fs::read_dir(bundles).ok()?.flatten() {
        let path: PathBuf = ns.path().join(id).join("config.json");
        if let Ok(text) = std::fs::read(&path) {
            return serde_json::from_slice(&text).ok();
        }
    }
    None
}

/// Pod name and namespace from a sandbox container's OCI spec annotations.
pub fn pod_name(spec: &Value) -> (Option<String>, Option<String>) {
    let get = |key: &str| {
        spec.pointer("/annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    (get(ANNOTATION_POD_NAME), get(ANNOTATION_POD_NAMESPACE))
}

/// The `cocoon ps` table.
pub fn render(sandboxes: &[Sandbox]) -> String {
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|s| {
            let pod = match (&s.pod_namespace, &s.pod_name) {
                (Some(ns), Some(name)) => format!("{ns}/{name}"),
                (None, Some(name)) => name.clone(),
                _ => dash(),
            };
            vec![
                short_id(&s.id).to_string(),
                pod,
                s.state.to_string(),
                s.containers.map_or_else(dash, |n| n.to_string()),
                s.vmm_pid.map_or_else(dash, |p| p.to_string()),
                s.vcpus.map_or_else(dash, |v| v.to_string()),
                s.memory_mib.map_or_else(dash, |m| m.to_string()),
                s.vmm_rss_kib.map_or_else(dash, format_kib_as_mib),
                s.uptime_secs
                    .map_or_else(dash, |u| format_duration(std::time::Duration::from_secs(u))),
            ]
        })
        .collect();
    format_table(
        &[
            "SANDBOX", "POD", "STATE", "CTRS", "VMM PID", "VCPUS", "MEM MIB", "RSS MIB", "UPTIME",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_name_comes_from_cri_annotations() {
        let spec = json!({"annotations": {
            "io.kubernetes.cri.sandbox-name": "web-0",
            "io.kubernetes.cri.sandbox-namespace": "shop"
        }});
        assert_eq!(pod_name(&spec), (Some("web-0".into()), Some("shop".into())));
        assert_eq!(pod_name(&json!({})), (None, None));
    }

    #[test]
    fn table_shows_short_ids_and_dashes() {
        let rows = [
            Sandbox {
                id: "0123456789abcdef0123".into(),
                state: "running",
                pod_name: Some("web-0".into()),
                pod_namespace: Some("shop".into()),
                containers: Some(2),
                vmm_pid: Some(4242),
                vcpus: Some(2),
                memory_mib: Some(512),
                vmm_rss_kib: Some(2048),
                uptime_secs: Some(125),
                unresponsive_since: None,
                unresponsive_count: 0,
                warnings: vec![],
            },
            Sandbox {
                id: "dead1".into(),
                state: "dead",
                ..Default::default()
            },
        ];
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SANDBOX       POD"), "{t}");
        assert!(
            lines[1].starts_with(
                "0123456789ab  shop/web-0  running  2     4242     2      512      2.0      2m"
            ),
            "{t}"
        );
        assert!(
            lines[2].starts_with("dead1         -           dead     -"),
            "{t}"
        );
    }

    #[test]
    fn list_reads_records_and_dead_vmms() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = Config {
            state_dir: tmp.path().join("run"),
            ..Config::default()
        };
        let dir = config.sandbox_dir("sb1");
        let mut record = PodRecord::new("sb1");
        record.containers.insert("c1".into(), Default::default());
        record.unresponsive_count = 2;
        record.save(&dir).expect("save");
        std::fs::write(dir.join("vmm.pid"), "999999999 1\n").expect("pid");
        std::fs::create_dir_all(config.sandbox_dir("sb2")).expect("mkdir");
        let bundle = tmp.path().join("bundles/k8s.io/sb1");
        std::fs::create_dir_all(&bundle).expect("bundle");
        std::fs::write(
            bundle.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-name":"p"}}"#,
        )
        .expect("spec");
        let list = list(&config, &tmp.path().join("bundles")).expect("list");
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].state, list[0].containers), ("dead", Some(1)));
        assert_eq!(list[0].pod_name.as_deref(), Some("p"));
        assert_eq!((list[1].state, list[1].containers), ("no-vmm", None));
        let json = serde_json::to_value(&list).expect("json");
        assert_eq!(json[0]["id"], "sb1");
        assert_eq!(json[0]["vmm_pid"], Value::Null);
        assert_eq!(json[0]["unresponsive_count"], 2);
    }

    #[test]
    fn the_unresponsive_mark_never_outlives_the_vmm() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = Config {
            state_dir: tmp.path().join("run"),
            ..Config::default()
        };
        let dir = config.sandbox_dir("sb1");
        let mut record = PodRecord::new("sb1");
        record.unresponsive_since = Some(1_700_000_000);
        record.save(&dir).expect("save");
        std::fs::write(dir.join("vmm.pid"), "999999999 1\n").expect("pid");
        let list = list(&config, &tmp.path().join("bundles")).expect("list");
        // The VMM is gone: the sandbox is dead, whatever the record last said.
        assert_eq!(list[0].state, "dead");
        assert_eq!(list[0].unresponsive_since, Some(1_700_000_000));
    }
}
