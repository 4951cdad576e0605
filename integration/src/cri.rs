//! A small CRI client for tests: the `k8s-cri` (tonic) RuntimeService client over
//! containerd's Unix socket, wrapped in blocking calls (each test drives one pod step by
//! step), plus pod and container configs shaped like kubelet's, CRI log parsing, and
//! streaming exec with a TTY through containerd's streaming server: the Kubernetes
//! remotecommand protocol (v4) over WebSocket, as `kubectl exec -it` speaks it.

use crate::image;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
use tonic::transport::{Channel, Endpoint, Uri};

/// The pods' Kubernetes namespace (in metadata only).
pub const POD_NAMESPACE: &str = "cocoon-test";

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connect to the CRI socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {call}: {status}")]
    Rpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("{0}")]
    Other(String),
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("exec stream: {0}")]
    Stream(String),
}

type Result<T> = std::result::Result<T, CriError>;

fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
    move |status| CriError::Rpc {
        call,
        status: Box::new(status),
    }
}

/// A blocking CRI RuntimeService client.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

impl Cri {
    /// Connects to `socket` and waits until the runtime reports RuntimeReady and
    /// NetworkReady (the CRI plugin loads the CNI config asynchronously).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async {
                // The URI is required but unused: every connection goes to the socket.
                Endpoint::from_static("http://[::]")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .map_err(|source| CriError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        let mut cri = Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        };
        let deadline = Instant::now() + timeout;
        loop {
            let not_ready = match cri.status() {
                Ok(s) => s
                    .status
                    .map(|s| {
                        s.conditions
                            .into_iter()
                            .filter(|c| !c.status)
                            .map(|c| format!("{}: {} {}", c.r#type, c.reason, c.message))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_else(|| vec!["no status".into()]),
                Err(e) => vec![e.to_string()],
            };
            if not_ready.is_empty() {
                return Ok(cri);
            }
            if Instant::now() >= deadline {
                return Err(CriError::Other(format!(
                    "CRI not ready after {timeout:?}: {}",
                    not_ready.join("; ")
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn status(&mut self) -> Result<StatusResponse> {
        let req = StatusRequest { verbose: false };
        self.rt
            .block_on(self.client.status(req))
            .map(tonic::Response::into_inner)
            .map_err(rpc("Status"))
    }

    pub fn version(&mut self) -> Result<VersionResponse> {
        let req = VersionRequest::default();
        self.rt
            .block_on(self.client.version(req))
            .map(tonic::Response::into_inner)
            .map_err(rpc("Version"))
    }

    /// RunPodSandbox with `handler` (`runc`, `cocoon`); returns the sandbox id.
    pub fn run_pod(&mut self, config: &PodSandboxConfig, handler: &str) -> Result<String> {
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        self.rt
            .block_on(self.client.run_pod_sandbox(req))
            .map(|r| r.into_inner().pod_sandbox_id)
            .map_err(rpc("RunPodSandbox"))
    }

    /// PodSandboxStatus, verbose (containerd adds an `info` JSON with the sandbox pid).
    pub fn pod_status(&mut self, id: &str) -> Result<PodSandboxStatusResponse> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        self.rt
            .block_on(self.client.pod_sandbox_status(req))
            .map(tonic::Response::into_inner)
            .map_err(rpc("PodSandboxStatus"))
    }

    pub fn pod_ready(&mut self, id: &str) -> Result<bool> {
        let s = self.pod_status(id)?;
        Ok(s.status.map(|s| s.state) == Some(PodSandboxState::SandboxReady as i32))
    }

    /// The pod's IP on the CNI network.
    pub fn pod_ip(&mut self, id: &str) -> Result<String> {
        let s = self.pod_status(id)?;
        s.status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| CriError::Other(format!("pod {id} has no IP")))
    }

    /// The sandbox's host process as containerd reports it (`info.pid`): runc's pause
    /// process; for cocoon whatever the shim gives as the sandbox task's pid.
    pub fn pod_pid(&mut self, id: &str) -> Result<Option<u32>> {
        let s = self.pod_status(id)?;
        info_pid(&s.info, &format!("sandbox {id}"))
    }

    /// A container's init process on the host as containerd reports it (`info.pid`):
    /// runc's container process; for cocoon the guest pid the shim reports.
    pub fn container_pid(&mut self, id: &str) -> Result<Option<u32>> {
        let req = ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: true,
        };
        let r = self
            .rt
            .block_on(self.client.container_status(req))
            .map_err(rpc("ContainerStatus"))?
            .into_inner();
        info_pid(&r.info, &format!("container {id}"))
    }

    pub fn stop_pod(&mut self, id: &str) -> Result<()> {
        let req = StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.rt
            .block_on(self.client.stop_pod_sandbox(req))
            .map(drop)
            .map_err(rpc("StopPodSandbox"))
    }

    pub fn remove_pod(&mut self, id: &str) -> Result<()> {
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.rt
            .block_on(self.client.remove_pod_sandbox(req))
            .map(drop)
            .map_err(rpc("RemovePodSandbox"))
    }

    /// Every pod sandbox containerd knows.
    pub fn list_pods(&mut self) -> Result<Vec<PodSandbox>> {
        let req = ListPodSandboxRequest { filter: None };
        self.rt
            .block_on(self.client.list_pod_sandbox(req))
            .map(|r| r.into_inner().items)
            .map_err(rpc("ListPodSandbox"))
    }

    pub fn create_container(
        &mut self,
        pod_id: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String> {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        };
        self.rt
            .block_on(self.client.create_container(req))
            .map(|r| r.into_inner().container_id)
            .map_err(rpc("CreateContainer"))
    }

    pub fn start_container(&mut self, id: &str) -> Result<()> {
        let req = StartContainerRequest {
            container_id: id.to_string(),
        };
        self.rt
            .block_on(self.client.start_container(req))
            .map(drop)
            .map_err(rpc("StartContainer"))
    }

    /// Creates and starts a container; returns its id.
    pub fn run_container(
        &mut self,
        pod_id: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String> {
        let id = self.create_container(pod_id, config, pod_config)?;
        self.start_container(&id)?;
        Ok(id)
    }

    pub fn stop_container(&mut self, id: &str, timeout_s: i64) -> Result<()> {
        let req = StopContainerRequest {
            container_id: id.to_string(),
            timeout: timeout_s,
        };
        self.rt
            .block_on(self.client.stop_container(req))
            .map(drop)
            .map_err(rpc("StopContainer"))
    }

    pub fn remove_container(&mut self, id: &str) -> Result<()> {
        let req = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.rt
            .block_on(self.client.remove_container(req))
            .map(drop)
            .map_err(rpc("RemoveContainer"))
    }

    pub fn container_status(&mut self, id: &str) -> Result<ContainerStatus> {
        let req = ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        self.rt
            .block_on(self.client.container_status(req))
            .map_err(rpc("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or_else(|| CriError::Other(format!("no status for container {id}")))
    }

    /// Polls until the container has exited; returns its final status.
    pub fn wait_exited(&mut self, id: &str, timeout: Duration) -> Result<ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.container_status(id)?;
            if s.state == ContainerState::ContainerExited as i32 {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(CriError::Other(format!(
                    "container {id} still {} after {timeout:?}",
                    state_name(s.state)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// ExecSync with a timeout in seconds.
    pub fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<ExecSyncResponse> {
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_s,
        };
        self.rt
            .block_on(self.client.exec_sync(req))
            .map(tonic::Response::into_inner)
            .map_err(rpc("ExecSync"))
    }

    /// Exec: asks for a streaming URL (stdin and stdout; stderr only without a TTY).
    pub fn exec_url(&mut self, id: &str, cmd: &[&str], tty: bool) -> Result<String> {
        let req = ExecRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin: true,
            stdout: true,
            stderr: !tty,
        };
        self.rt
            .block_on(self.client.exec(req))
            .map(|r| r.into_inner().url)
            .map_err(rpc("Exec"))
    }

    /// Runs a streaming exec session at `url` (see [`stream_exec`]).
    pub fn stream_exec(&mut self, url: &str, session: &StreamSession) -> Result<StreamOutcome> {
        self.rt.block_on(stream_exec(url, session))
    }
}

/// The name of a `ContainerState` value.
/// The `pid` of a verbose status's `info` JSON (containerd's CRI plugin puts it there).
fn info_pid(info: &HashMap<String, String>, what: &str) -> Result<Option<u32>> {
    let Some(info) = info.get("info") else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(info)
        .map_err(|e| CriError::Other(format!("{what}: status info is not JSON: {e}")))?;
    Ok(v.get("pid")
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0))
}

pub fn state_name(state: i32) -> &'static str {
    ContainerState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN_STATE")
}

static UIDS: AtomicU32 = AtomicU32::new(0);

/// A pod config as kubelet writes it: metadata with a fresh uid, hostname, its own log
/// directory under `log_root`, a cgroup parent, pod network and IPC, per-container PID.
pub fn pod_config(name: &str, log_root: &Path, cgroup_parent: &str) -> PodSandboxConfig {
    let uid = format!(
        "{}-{}-{}",
        name,
        std::process::id(),
        UIDS.fetch_add(1, Ordering::Relaxed)
    );
    let log_dir = log_root.join(format!("{POD_NAMESPACE}_{name}_{uid}"));
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid,
            namespace: POD_NAMESPACE.to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_dir.display().to_string(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.to_string(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container running `cmd`, logging to `<name>.log` in the pod's log directory.
pub fn container_config(name: &str, cmd: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image::BUSYBOX_REF.to_string(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources::default()),
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// The host path of a container's log.
pub fn log_file(pod: &PodSandboxConfig, container: &ContainerConfig) -> PathBuf {
    Path::new(&pod.log_directory).join(&container.log_path)
}

/// One logical line of a CRI log (`<time> <stream> <P|F> <text>`; partial lines joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: String,
    pub text: String,
}

/// Parses a CRI-format container log.
pub fn parse_log(content: &str) -> Vec<LogLine> {
    let mut out = Vec::new();
    let mut partial: HashMap<String, String> = HashMap::new();
    for l in content.lines() {
        let mut parts = l.splitn(4, ' ');
        let (Some(_time), Some(stream), Some(tag), text) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let buf = partial.entry(stream.to_string()).or_default();
        buf.push_str(text.unwrap_or(""));
        if tag == "F" {
            out.push(LogLine {
                stream: stream.to_string(),
                text: std::mem::take(buf),
            });
        }
    }
    out
}

/// Reads and parses a container's log (empty while it does not exist yet).
pub fn read_log(path: &Path) -> Vec<LogLine> {
    parse_log(&std::fs::read_to_string(path).unwrap_or_default())
}

/// What to do in a streaming exec session.
#[derive(Debug, Clone)]
pub struct StreamSession {
    /// Sent as the first resize event (columns, rows), before any input.
    pub size: Option<(u16, u16)>,
    /// Typed into stdin.
    pub input: Vec<u8>,
    pub timeout: Duration,
}

/// How a streaming exec session ended.
#[derive(Debug, Clone, Default)]
pub struct StreamOutcome {
    /// The subprotocol the server chose.
    pub protocol: String,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The status message on the error channel (a JSON `metav1.Status` in v4).
    pub status: String,
    /// The exit code from that status: 0 on `Success`, the `ExitCode` cause otherwise.
    pub exit_code: Option<i32>,
}

/// The remotecommand subprotocols offered, newest first.
pub const REMOTECOMMAND_PROTOCOLS: &str = "v4.channel.k8s.io, channel.k8s.io";

// Channel numbers of the channel.k8s.io framing: one leading byte per message.
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// Runs one exec session over WebSocket: connects to `url` (from [`Cri::exec_url`])
/// offering the v4 remotecommand subprotocol, sends the terminal size and the input, and
/// collects stdout/stderr until the server reports the exit status and closes.
pub async fn stream_exec(url: &str, session: &StreamSession) -> Result<StreamOutcome> {
    let ws_url = url
        .strip_prefix("http://")
        .map(|rest| format!("ws://{rest}"))
        .ok_or_else(|| CriError::Stream(format!("unexpected streaming URL {url}")))?;
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| CriError::Stream(format!("bad URL {ws_url}: {e}")))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tungstenite::http::HeaderValue::from_static(REMOTECOMMAND_PROTOCOLS),
    );
    let work = async {
        let (mut ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| CriError::Stream(format!("WebSocket handshake with {ws_url}: {e}")))?;
        let mut out = StreamOutcome {
            protocol: resp
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            ..Default::default()
        };
        let send = |ch: u8, data: &[u8]| {
            let mut m = Vec::with_capacity(data.len() + 1);
            m.push(ch);
            m.extend_from_slice(data);
            Message::Binary(m.into())
        };
        if let Some((w, h)) = session.size {
            let size = serde_json::json!({ "Width": w, "Height": h }).to_string();
            ws.send(send(RESIZE, size.as_bytes()))
                .await
                .map_err(|e| CriError::Stream(format!("send resize: {e}")))?;
        }
        if !session.input.is_empty() {
            ws.send(send(STDIN, &session.input))
                .await
                .map_err(|e| CriError::Stream(format!("send stdin: {e}")))?;
        }
        while let Some(msg) = ws.next().await {
            let data = match msg {
                Ok(Message::Binary(b)) => b.to_vec(),
                Ok(Message::Text(t)) => t.as_bytes().to_vec(),
                Ok(Message::Close(_)) => break,
                Ok(_) => continue,
                // The server may drop the connection right after the status.
                Err(_) if !out.status.is_empty() => break,
                Err(e) => return Err(CriError::Stream(format!("read: {e}"))),
            };
            let Some((&ch, payload)) = data.split_first() else {
                continue;
            };
            match ch {
                STDOUT => out.stdout.extend_from_slice(payload),
                STDERR => out.stderr.extend_from_slice(payload),
                ERROR => out.status.push_str(&String::from_utf8_lossy(payload)),
                _ => {}
            }
        }
        out.exit_code = status_exit_code(&out.status);
        Ok(out)
    };
    tokio::time::timeout(session.timeout, work)
        .await
        .map_err(|_| CriError::Stream(format!("no end of session within {:?}", session.timeout)))?
}

/// The exit code in a remotecommand v4 status: `Success` is 0, `NonZeroExitCode` carries
/// it as the `ExitCode` cause.
pub fn status_exit_code(status: &str) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_str(status).ok()?;
    match v.get("status")?.as_str()? {
        "Success" => Some(0),
        _ => v
            .get("details")?
            .get("causes")?
            .as_array()?
            .iter()
            .find(|c| c.get("reason").and_then(|r| r.as_str()) == Some("ExitCode"))?
            .get("message")?
            .as_str()?
            .parse()
            .ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_log_joins_partials_per_stream() {
        let log = "2024-01-01T00:00:00.1Z stdout P hel\n\
                   2024-01-01T00:00:00.2Z stderr F oops\n\
                   2024-01-01T00:00:00.3Z stdout F lo\n\
                   2024-01-01T00:00:00.4Z stdout F \n";
        let lines = parse_log(log);
        let got: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l.stream.as_str(), l.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![("stderr", "oops"), ("stdout", "hello"), ("stdout", "")]
        );
    }

    #[test]
    fn exit_codes_from_v4_status() {
        assert_eq!(
            status_exit_code(r#"{"metadata":{},"status":"Success"}"#),
            Some(0)
        );
        let failed = r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: exit status 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(status_exit_code(failed), Some(3));
        assert_eq!(status_exit_code("not json"), None);
    }
}
