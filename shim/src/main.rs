//! `containerd-shim-cocoon-v1`: the containerd shim v2 for Cocoon.
//!
//! Thin glue: containerd's Task API (ttrpc) is converted to calls of
//! [`cocoon_runtime::task::Service`], one per verb, and the runtime's task events are
//! published to containerd. One shim process serves one pod: `start` groups containers
//! by the CRI annotation `io.kubernetes.cri.sandbox-id` and hands out the running
//! shim's socket for every container of the pod.
//!
//! The `start` action is ours ([`start`]: containerd 1.6 needs a bare address where the
//! crate answers JSON); `delete` and `-info` run through the `containerd-shim` crate. The serving process is set up here instead of by the crate, because the crate
//! registers the Task service only as `containerd.task.v3.Task` (containerd 2.x), and
//! containerd 1.6/1.7 call `containerd.task.v2.Task`: the same messages under the old
//! name. This shim serves both names.

mod convert;
mod logging;
mod publisher;
mod service;
mod start;

use std::collections::HashMap;
use std::os::fd::IntoRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim as shim;
use shim::protos::ttrpc::Server;
use tracing::{error, info, warn};

use cocoon_runtime::config::Config;
use cocoon_runtime::error::chain;

/// containerd's name for the runtime (`runtime_type`).
pub const RUNTIME_ID: &str = "io.containerd.cocoon.v1";

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if matches!(
        args.get(1).and_then(|a| a.to_str()),
        Some("-v") | Some("--version") | Some("-version")
    ) {
        println!(
            "containerd-shim-cocoon-v1:\n  Version: {}\n  Runtime: {RUNTIME_ID}",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let flags = match shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-cocoon-v1: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.action == "start" {
        // Our own: the crate's legacy reply is JSON, which containerd 1.6 cannot read.
        return match start::start(&flags) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("containerd-shim-cocoon-v1 start: {e}");
                ExitCode::from(1)
            }
        };
    }
    if flags.info || !flags.action.is_empty() {
        // delete, -info: the crate's bootstrap (start protocols of containerd 1.6
        // to 2.3), calling back into `service::CocoonShim`.
        shim::run::<service::CocoonShim>(
            RUNTIME_ID,
            Some(shim::Config {
                no_setup_logger: true,
                default_log_level: "info".into(),
                no_reaper: true,
                no_sub_reaper: true,
            }),
        );
        return ExitCode::SUCCESS;
    }
    match serve(&flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("shim failed: {e}");
            eprintln!("containerd-shim-cocoon-v1: {e}");
            ExitCode::from(1)
        }
    }
}

fn socket_path(address: &str) -> PathBuf {
    PathBuf::from(
        address
            .strip_prefix("unix://")
            .unwrap_or(address)
            .to_string(),
    )
}

/// Lets the `start` process (the crate's `spawn`, which reads our stdout to EOF) go on:
/// our stdout becomes our stderr.
fn signal_started() {
    // SAFETY: dup2 on the process's own standard descriptors; no memory is involved.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

/// Binds the shim socket; `None` when a live shim already serves it.
fn bind(path: &Path) -> Result<Option<UnixListener>, String> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            std::fs::remove_file(path).map_err(|e| format!("removing stale {path:?}: {e}"))?;
        } else {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    UnixListener::bind(path)
        .map(Some)
        .map_err(|e| format!("binding {}: {e}", path.display()))
}

/// The Task service's methods under `containerd.task.v3.Task` (containerd 2.x) and
/// `containerd.task.v2.Task` (containerd 1.6/1.7): same messages, two names.
fn task_methods(
    task: Arc<dyn shim::protos::shim_sync::Task + Send + Sync>,
) -> HashMap<String, Box<dyn shim::protos::ttrpc::MethodHandler + Send + Sync>> {
    let mut methods = shim::protos::shim_sync::create_task(task.clone());
    for (path, handler) in shim::protos::shim_sync::create_task(task) {
        let v2 = path.replace("/containerd.task.v3.Task/", "/containerd.task.v2.Task/");
        if v2 != path {
            methods.insert(v2, handler);
        }
    }
    methods
}

/// The serving shim: logging, the Task service under both API names, until Shutdown.
fn serve(flags: &shim::Flags) -> Result<(), String> {
    if flags.namespace.is_empty() || flags.socket.is_empty() {
        return Err("-namespace and -socket are required to serve".into());
    }
    let config = Config::load_default();
    let level = match &config {
        Ok(c) if !flags.debug => c.log_level.clone(),
        _ => "debug".into(),
    };
    logging::init_fifo(&level, &flags.id);
    let config = config.map_err(|e| chain(&e))?;

    let path = socket_path(&flags.socket);
    let Some(listener) = bind(&path)? else {
        info!(socket = %path.display(), "a shim already serves this pod");
        shim::synchronous::util::write_address(&flags.socket).map_err(|e| e.to_string())?;
        signal_started();
        return Ok(());
    };
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").map_err(|_| "TTRPC_ADDRESS is not set".to_string())?;
    let remote = shim::publisher::RemotePublisher::new(&ttrpc_address)
        .map_err(|e| format!("connecting to containerd's event service {ttrpc_address}: {e}"))?;
    let publisher = Arc::new(publisher::Publisher::start(
        &ttrpc_address,
        &flags.namespace,
        Some(remote),
    ));
    let task = service::TaskService::new(config, publisher.clone());
    let exit = task.exit.clone();
    let task: Arc<dyn shim::protos::shim_sync::Task + Send + Sync> = Arc::new(task);

    let services = task_methods(task);
    let methods = services.len();
    let mut server = Server::new()
        .add_listener(listener.into_raw_fd())
        .map_err(|e| format!("ttrpc listener: {e}"))?
        .register_service(services);
    server.start().map_err(|e| format!("ttrpc server: {e}"))?;
    info!(socket = %path.display(), namespace = %flags.namespace, id = %flags.id,
        methods, pid = std::process::id(), "shim serving (task API v2 and v3)");
    signal_started();

    exit.wait();
    info!("shutting down");
    // The last events (the sandbox's exit and delete) must reach containerd.
    if !publisher.flush(Duration::from_secs(5)) {
        warn!("events still queued at exit: dropped");
    }
    server.shutdown();
    if let Err(e) = std::fs::remove_file(&path) {
        warn!(socket = %path.display(), error = %e, "removing the shim socket");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;
    impl shim::Task for Nop {}

    #[test]
    fn task_api_is_served_as_v2_and_v3() {
        let methods = task_methods(Arc::new(Nop));
        for verb in ["Create", "Start", "Kill", "Wait", "Delete", "Shutdown"] {
            for v in ["v2", "v3"] {
                let path = format!("/containerd.task.{v}.Task/{verb}");
                assert!(methods.contains_key(&path), "{path} missing");
            }
        }
    }

    #[test]
    fn socket_addresses() {
        assert_eq!(
            socket_path("unix:///run/containerd/s/abc"),
            PathBuf::from("/run/containerd/s/abc")
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s").join("x");
        let listener = bind(&sock).expect("bind").expect("free");
        assert!(
            bind(&sock).expect("second").is_none(),
            "a live shim is detected"
        );
        drop(listener);
        assert!(
            bind(&sock).expect("stale").is_some(),
            "a stale socket is replaced"
        );
    }
}
