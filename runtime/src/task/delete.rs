//! `Delete`: an exec is forgotten; a container gives back everything it held (agent
//! container and mounts, drive slots, image reference, writable disk); the sandbox
//! stops the VM if it still runs and removes everything the pod had on the host
//! (VMM, TAP and tc, sockets, disks, sandbox directory).

use std::time::SystemTime;

use tracing::info;

use super::{Exit, Service, Status, TaskError};
use crate::events::TaskEvent;

/// What `Delete` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub pid: u32,
    pub exit: Exit,
}

impl Service {
    pub fn delete(&self, id: &str, exec_id: &str) -> Result<Deleted, TaskError> {
        let proc = self.proc(id, exec_id)?;
        let (status, pid, exit) = {
            let g = proc.lock();
            (g.status, g.pid, g.exit)
        };
        let container = self.container(id)?;
        if !container.is_sandbox && matches!(status, Status::Running | Status::Paused) {
            return Err(TaskError::FailedPrecondition(format!(
                "{} is still running: kill it first",
                proc.label()
            )));
        }
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        if !exec_id.is_empty() {
            proc.io().release();
            self.procs().remove(&(id.to_string(), exec_id.to_string()));
            return Ok(Deleted { pid, exit });
        }
        if container.is_sandbox {
            if let Some(pod) = self.pod() {
                if pod.ended().is_none() {
                    pod.stop();
                    pod.wait_ended(crate::sandbox::SHUTDOWN_TIMEOUT);
                }
                crate::state::cleanup_sandbox(&pod.config, &pod.id)
                    .map_err(TaskError::runtime(format!("sandbox {id}: cleanup")))?;
                info!(sandbox = id, "pod sandbox removed");
            }
            *self.shared.pod.lock().unwrap_or_else(|p| p.into_inner()) = None;
        } else if let Some(pod) = self.pod() {
            self.release_container(&pod, &container);
            info!(container = id, "container removed");
        }
        proc.io().release();
        self.procs().retain(|(c, _), _| c != id);
        self.containers().remove(id);
        self.publish(TaskEvent::Delete {
            container_id: id.to_string(),
            pid,
            exit_status: exit.status,
            exited_at: exit.at,
        });
        Ok(Deleted { pid, exit })
    }
}
