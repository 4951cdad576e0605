//! The `Shim` (start/delete actions) and `Task` (ttrpc API) implementations: each Task
//! call converts its request and calls the runtime's function for the verb.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim as shim;
use shim::api;
use shim::protos::protobuf::MessageField;
use shim::protos::ttrpc;
use shim::publisher::RemotePublisher;
use shim::{DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult};
use tracing::{info, warn};

use cocoon_runtime::config::Config;
use cocoon_runtime::error::chain;
use cocoon_runtime::spec;
use cocoon_runtime::stdio::StdioPaths;
use cocoon_runtime::task::{CreateRequest, RootfsMount, Service, TaskError};

use crate::convert;
use crate::publisher::Publisher;

/// The Task service of one pod.
pub struct TaskService {
    svc: Service,
    pub exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(config: Config, publisher: Arc<Publisher>) -> TaskService {
        TaskService {
            svc: Service::new(config, publisher),
            exit: Arc::new(ExitSignal::default()),
        }
    }
}

fn err(e: TaskError) -> ttrpc::Error {
    warn!(error = %chain(&e), "task call failed");
    convert::error(e)
}

impl shim::Task for TaskService {
    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let s = self.svc.state(&req.id, &req.exec_id).map_err(err)?;
        let (exit_status, exited_at) = match s.exit {
            Some(e) => (e.status, MessageField::some(convert::timestamp(e.at))),
            None => (0, MessageField::none()),
        };
        Ok(api::StateResponse {
            id: s.id,
            exec_id: s.exec_id,
            bundle: s.bundle.to_string_lossy().into_owned(),
            pid: s.pid,
            status: convert::status(s.status).into(),
            stdin: s.stdio.stdin,
            stdout: s.stdio.stdout,
            stderr: s.stdio.stderr,
            terminal: s.stdio.terminal,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        info!(id = %req.id, bundle = %req.bundle, "create");
        let request = CreateRequest {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| RootfsMount {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        };
        let pid = self.svc.create(request).map_err(err)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.svc.start(&req.id, &req.exec_id).map_err(err)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let d = self.svc.delete(&req.id, &req.exec_id).map_err(err)?;
        Ok(api::DeleteResponse {
            pid: d.pid,
            exit_status: d.exit.status,
            exited_at: MessageField::some(convert::timestamp(d.exit.at)),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = self.svc.pids(&req.id).map_err(err)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| shim::protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.svc.pause(&req.id).map_err(err)?;
        Ok(api::Empty::default())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.svc.resume(&req.id).map_err(err)?;
        Ok(api::Empty::default())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.svc
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .map_err(err)?;
        Ok(api::Empty::default())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let process_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.svc
            .exec(&req.id, &req.exec_id, &process_json, stdio)
            .map_err(err)?;
        Ok(api::Empty::default())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.svc
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .map_err(err)?;
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        self.svc
            .close_io(&req.id, &req.exec_id, req.stdin)
            .map_err(err)?;
        Ok(api::Empty::default())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        if resources.is_empty() {
            return Ok(api::Empty::default());
        }
        self.svc.update(&req.id, &resources).map_err(err)?;
        Ok(api::Empty::default())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = self.svc.wait(&req.id, &req.exec_id).map_err(err)?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(convert::timestamp(exit.at)),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let stats = self.svc.stats(&req.id).map_err(err)?;
        let any = convert::metrics_any(&stats)
            .map_err(|m| ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, m)))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let (shim_pid, task_pid) = self.svc.connect(&req.id).map_err(err)?;
        Ok(api::ConnectResponse {
            shim_pid,
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.svc.shutdown() {
            info!("no task left: exiting");
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

/// The start/delete side of the shim.
pub struct CocoonShim {
    id: String,
    bundle: String,
    namespace: String,
    /// containerd's address (the shim socket's name derives from it).
    address: String,
    exit: Arc<ExitSignal>,
}

/// Removes the Unix socket at `path` if nothing listens on it any more.
fn remove_dead_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => {} // a live shim serves it
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Ok(()) => info!(socket = %path.display(), "removed the socket of a dead shim"),
                Err(e) => {
                    warn!(socket = %path.display(), error = %e, "removing a dead shim's socket")
                }
            }
        }
        Err(e) => warn!(socket = %path.display(), error = %e, "probing a shim socket"),
    }
}

/// The bundle's OCI spec, if readable.
pub fn bundle_spec(bundle: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read(bundle.join("config.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

impl CocoonShim {
    fn bundle_dir(&self) -> PathBuf {
        if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
        } else {
            PathBuf::from(&self.bundle)
        }
    }
}

impl shim::Shim for CocoonShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut shim::Config) -> Self {
        CocoonShim {
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: shim::StartOpts) -> Result<String, shim::Error> {
        // containerd runs `start` in the bundle directory.
        let grouping = bundle_spec(&self.bundle_dir())
            .map(|s| spec::sandbox_id_of(&s, &opts.id))
            .unwrap_or_else(|| opts.id.clone());
        let (_pid, address) = shim::spawn(opts, &grouping, Vec::new())?;
        shim::synchronous::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, shim::Error> {
        let config = Config::load_default().unwrap_or_default();
        crate::logging::init_stderr(&config.log_level);
        let bundle = self.bundle_dir();
        let spec = bundle_spec(&bundle);
        let sandbox_id = spec
            .as_ref()
            .map(|s| spec::sandbox_id_of(s, &self.id))
            .unwrap_or_else(|| self.id.clone());
        let is_sandbox = spec.as_ref().is_none_or(spec::is_sandbox) || sandbox_id == self.id;
        info!(id = %self.id, namespace = %self.namespace, sandbox = %sandbox_id, is_sandbox,
            "delete: cleaning up from the state on disk");
        let result = if is_sandbox {
            cocoon_runtime::state::cleanup_sandbox(&config, &sandbox_id)
        } else {
            cocoon_runtime::state::cleanup_container(&config, &sandbox_id, &self.id)
        };
        if let Err(e) = result {
            warn!(id = %self.id, error = %e, "cleanup");
        }
        if is_sandbox {
            // A shim that was killed leaves its socket; containerd does not remove it.
            let address = shim::socket_address(&self.address, &self.namespace, &sandbox_id);
            if let Some(path) = address.strip_prefix("unix://") {
                remove_dead_socket(Path::new(path));
            }
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + 9,
            exited_at: MessageField::some(convert::timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        // Not used: `main` serves the Task API itself (see there).
        let config = Config::load_default().unwrap_or_default();
        let address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        let publisher = Publisher::start(&address, &self.namespace, Some(publisher));
        TaskService::new(config, Arc::new(publisher))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn only_a_dead_shims_socket_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = dir.path().join("live");
        let _listener = UnixListener::bind(&live).expect("bind");
        let dead = dir.path().join("dead");
        drop(UnixListener::bind(&dead).expect("bind"));
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").expect("write");
        for p in [&live, &dead, &plain] {
            remove_dead_socket(p);
        }
        assert!(live.exists(), "a served socket stays");
        assert!(!dead.exists(), "a socket nobody serves goes");
        assert!(plain.exists(), "not a socket: left alone");
        remove_dead_socket(&dir.path().join("none"));
    }
}
