//! `Pause` / `Resume`: a container is frozen by the agent (cgroup freezer); the sandbox
//! by stopping the VM's vCPUs.

use super::{Service, Status, TaskError};
use crate::events::TaskEvent;

impl Service {
    pub fn pause(&self, id: &str) -> Result<(), TaskError> {
        self.set_paused(id, true)
    }

    pub fn resume(&self, id: &str) -> Result<(), TaskError> {
        self.set_paused(id, false)
    }

    fn set_paused(&self, id: &str, pause: bool) -> Result<(), TaskError> {
        let container = self.container(id)?;
        let proc = self.proc(id, "")?;
        let pod = self.running_pod()?;
        let (from, to) = if pause {
            (Status::Running, Status::Paused)
        } else {
            (Status::Paused, Status::Running)
        };
        let status = proc.lock().status;
        if status != from {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} is {status:?}, not {from:?}"
            )));
        }
        match (container.is_sandbox, pause) {
            (true, true) => pod.pause_vm()?,
            (true, false) => pod.resume_vm()?,
            (false, true) => pod
                .agent
                .pause_container(id)
                .map_err(TaskError::agent(format!("container {id}: PauseContainer")))?,
            (false, false) => pod
                .agent
                .resume_container(id)
                .map_err(TaskError::agent(format!("container {id}: ResumeContainer")))?,
        }
        {
            let mut g = proc.lock();
            if g.status == from {
                g.status = to;
            }
        }
        self.publish(if pause {
            TaskEvent::Paused {
                container_id: id.to_string(),
            }
        } else {
            TaskEvent::Resumed {
                container_id: id.to_string(),
            }
        });
        Ok(())
    }
}
