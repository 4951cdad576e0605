//! The ttrpc service: each call validated, logged and handed to the module that owns it.

use crate::container::Containers;
use crate::error::AgentError;
use crate::{events, files, init, network, sandbox, storage};
use cocoon_agent_protocol::{api, PROTOCOL_VERSION};
use std::sync::Arc;
use std::time::Duration;
use ttrpc::TtrpcContext;

/// What `Shutdown` does: power the VM off, or (host tests) end the agent process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnShutdown {
    PowerOff,
    Exit,
}

pub struct AgentService {
    pub containers: Arc<Containers>,
    pub on_shutdown: OnShutdown,
}

type R<T> = ttrpc::Result<T>;

fn u16_arg(v: u32, what: &str) -> Result<u16, AgentError> {
    u16::try_from(v).map_err(|_| AgentError::InvalidArgument(format!("{what} {v} out of range")))
}

fn signal_arg(v: u32) -> Result<i32, AgentError> {
    match i32::try_from(v) {
        Ok(s) if (1..=64).contains(&s) => Ok(s),
        _ => Err(AgentError::InvalidArgument(format!(
            "bad signal number {v}"
        ))),
    }
}

impl api::Agent for AgentService {
    fn hello(&self, _: &TtrpcContext, _: api::HelloRequest) -> R<api::HelloResponse> {
        let mut r = api::HelloResponse::new();
        r.protocol_version = PROTOCOL_VERSION;
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        r.uptime_ms = init::uptime_ms();
        r.kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(r)
    }

    fn setup_sandbox(
        &self,
        _: &TtrpcContext,
        req: api::SetupSandboxRequest,
    ) -> R<api::SetupSandboxResponse> {
        tracing::info!(hostname = %req.hostname, share_pid = req.share_pid, "setup sandbox");
        Ok(sandbox::setup(&req)?)
    }

    fn setup_network(&self, _: &TtrpcContext, req: api::SetupNetworkRequest) -> R<api::Empty> {
        tracing::info!(
            interfaces = req.interfaces.len(),
            routes = req.routes.len(),
            "setup network"
        );
        network::setup(&req)?;
        Ok(api::Empty::new())
    }

    fn set_sysctls(&self, _: &TtrpcContext, req: api::SetSysctlsRequest) -> R<api::Empty> {
        sandbox::set_sysctls(&req.sysctls)?;
        Ok(api::Empty::new())
    }

    fn add_storage(
        &self,
        _: &TtrpcContext,
        req: api::AddStorageRequest,
    ) -> R<api::AddStorageResponse> {
        tracing::info!(serial = %req.serial, fstype = %req.fstype, mount_point = %req.mount_point, "add storage");
        let mut r = api::AddStorageResponse::new();
        r.device = storage::add(&req)?;
        Ok(r)
    }

    fn remove_storage(&self, _: &TtrpcContext, req: api::RemoveStorageRequest) -> R<api::Empty> {
        tracing::info!(mount_point = %req.mount_point, "remove storage");
        storage::remove(&req.mount_point)?;
        Ok(api::Empty::new())
    }

    fn copy_file(&self, _: &TtrpcContext, req: api::CopyFileRequest) -> R<api::Empty> {
        tracing::debug!(path = %req.path, bytes = req.data.len(), "copy file");
        files::copy_file(&req)?;
        Ok(api::Empty::new())
    }

    fn create_container(
        &self,
        _: &TtrpcContext,
        req: api::CreateContainerRequest,
    ) -> R<api::ProcessResponse> {
        tracing::info!(container_id = %req.container_id, "create container");
        let mut r = api::ProcessResponse::new();
        r.pid = self.containers.create(&req)?;
        Ok(r)
    }

    fn start_container(
        &self,
        _: &TtrpcContext,
        req: api::ContainerRequest,
    ) -> R<api::ProcessResponse> {
        tracing::info!(container_id = %req.container_id, "start container");
        let mut r = api::ProcessResponse::new();
        r.pid = self.containers.start(&req.container_id)?;
        Ok(r)
    }

    fn exec_process(
        &self,
        _: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> R<api::ProcessResponse> {
        tracing::info!(container_id = %req.container_id, exec_id = %req.exec_id, "exec");
        let mut r = api::ProcessResponse::new();
        r.pid = self.containers.exec(&req)?;
        Ok(r)
    }

    fn signal_process(&self, _: &TtrpcContext, req: api::SignalProcessRequest) -> R<api::Empty> {
        tracing::info!(container_id = %req.container_id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "signal");
        let signal = signal_arg(req.signal)?;
        self.containers
            .signal(&req.container_id, &req.exec_id, signal, req.all)?;
        Ok(api::Empty::new())
    }

    fn wait_process(
        &self,
        _: &TtrpcContext,
        req: api::ProcessRequest,
    ) -> R<api::WaitProcessResponse> {
        Ok(self.containers.wait(&req.container_id, &req.exec_id)?)
    }

    fn close_stdin(&self, _: &TtrpcContext, req: api::ProcessRequest) -> R<api::Empty> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)?;
        Ok(api::Empty::new())
    }

    fn resize_tty(&self, _: &TtrpcContext, req: api::ResizeTtyRequest) -> R<api::Empty> {
        let rows = u16_arg(req.rows, "rows")?;
        let cols = u16_arg(req.cols, "cols")?;
        self.containers
            .resize_tty(&req.container_id, &req.exec_id, rows, cols)?;
        Ok(api::Empty::new())
    }

    fn list_processes(
        &self,
        _: &TtrpcContext,
        req: api::ContainerRequest,
    ) -> R<api::ListProcessesResponse> {
        let mut r = api::ListProcessesResponse::new();
        r.pids = self.containers.list_processes(&req.container_id)?;
        Ok(r)
    }

    fn stats_container(
        &self,
        _: &TtrpcContext,
        req: api::ContainerRequest,
    ) -> R<api::StatsContainerResponse> {
        Ok(self.containers.stats(&req.container_id)?)
    }

    fn pause_container(&self, _: &TtrpcContext, req: api::ContainerRequest) -> R<api::Empty> {
        tracing::info!(container_id = %req.container_id, "pause");
        self.containers.pause(&req.container_id)?;
        Ok(api::Empty::new())
    }

    fn resume_container(&self, _: &TtrpcContext, req: api::ContainerRequest) -> R<api::Empty> {
        tracing::info!(container_id = %req.container_id, "resume");
        self.containers.resume(&req.container_id)?;
        Ok(api::Empty::new())
    }

    fn update_container(
        &self,
        _: &TtrpcContext,
        req: api::UpdateContainerRequest,
    ) -> R<api::Empty> {
        tracing::info!(container_id = %req.container_id, "update resources");
        self.containers
            .update(&req.container_id, &req.resources_json)?;
        Ok(api::Empty::new())
    }

    fn remove_container(&self, _: &TtrpcContext, req: api::ContainerRequest) -> R<api::Empty> {
        tracing::info!(container_id = %req.container_id, "remove container");
        self.containers.remove(&req.container_id)?;
        Ok(api::Empty::new())
    }

    fn get_events(
        &self,
        _: &TtrpcContext,
        req: api::GetEventsRequest,
    ) -> R<api::GetEventsResponse> {
        let mut r = api::GetEventsResponse::new();
        r.events = events::events().take(Duration::from_millis(req.timeout_ms.into()));
        Ok(r)
    }

    fn shutdown(&self, _: &TtrpcContext, _: api::Empty) -> R<api::Empty> {
        tracing::info!(on_shutdown = ?self.on_shutdown, "shutdown");
        nix::unistd::sync();
        let how = self.on_shutdown;
        // Answer first: the reply must leave before the VM (or process) is gone.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            match how {
                OnShutdown::PowerOff => {
                    let err = init::power_off();
                    tracing::error!("power off failed: {err}");
                }
                OnShutdown::Exit => std::process::exit(0),
            }
        });
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_arguments_are_range_checked() {
        assert_eq!(signal_arg(9).ok(), Some(9));
        assert!(signal_arg(0).is_err());
        assert!(signal_arg(65).is_err());
        assert!(signal_arg(u32::MAX).is_err());
        assert_eq!(u16_arg(40, "rows").ok(), Some(40));
        assert!(u16_arg(70_000, "cols").is_err());
    }
}
