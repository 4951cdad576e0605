//! `Pids`: the sandbox's is the VMM; a container's are its guest processes.

use super::{Service, TaskError};

impl Service {
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, TaskError> {
        let container = self.container(id)?;
        let pod = self.running_pod()?;
        if container.is_sandbox {
            return Ok(vec![pod.vmm_pid]);
        }
        pod.agent
            .list_processes(id)
            .map_err(TaskError::agent(format!("container {id}: ListProcesses")))
    }
}
