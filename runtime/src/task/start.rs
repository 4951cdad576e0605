//! `Start`: the sandbox is already running (its VM booted at create); a container's
//! init process is started by the agent; an exec is created and started by the agent
//! and its stdio attached.

use tracing::info;

use super::{Service, Status, TaskError};
use crate::events::TaskEvent;
use crate::stdio::ProcessIo;

impl Service {
    /// Starts a task or exec; returns its pid.
    pub fn start(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let proc = self.proc(id, exec_id)?;
        {
            let g = proc.lock();
            if g.status != Status::Created {
                return Err(TaskError::FailedPrecondition(format!(
                    "{} is {:?}, not created",
                    proc.label(),
                    g.status
                )));
            }
        }
        let container = self.container(id)?;
        let pid = if container.is_sandbox {
            let pod = self.running_pod()?;
            pod.vmm_pid
        } else {
            let pod = self.running_pod()?;
            if exec_id.is_empty() {
                pod.agent
                    .start_container(id)
                    .map_err(TaskError::agent(format!("container {id}: StartContainer")))?
            } else {
                let pid = pod
                    .agent
                    .exec_process(id, exec_id, &proc.process_json, proc.stdio.agent_stdio())
                    .map_err(TaskError::agent(format!(
                        "exec {exec_id} in {id}: ExecProcess"
                    )))?;
                let io =
                    ProcessIo::attach(&pod.agent, id, exec_id, &proc.stdio).map_err(|source| {
                        TaskError::Stdio {
                            context: format!("exec {exec_id} in {id}"),
                            source,
                        }
                    })?;
                proc.set_io(io);
                pid
            }
        };
        {
            let mut g = proc.lock();
            g.pid = pid;
            // An exit that raced ahead of us stays recorded.
            if g.exit.is_none() {
                g.status = Status::Running;
            }
        }
        info!(container = id, exec = exec_id, pid, "started");
        if exec_id.is_empty() {
            self.publish(TaskEvent::Start {
                container_id: id.to_string(),
                pid,
            });
        } else {
            self.publish(TaskEvent::ExecStarted {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid,
            });
        }
        Ok(pid)
    }
}
