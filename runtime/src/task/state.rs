//! `State`: what containerd knows about a task or exec.

use super::{ProcessState, Service, TaskError};

impl Service {
    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcessState, TaskError> {
        let proc = self.proc(id, exec_id)?;
        let bundle = self.container(id)?.bundle;
        let g = proc.lock();
        Ok(ProcessState {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            bundle,
            pid: g.pid,
            status: g.status,
            stdio: proc.stdio.clone(),
            exit: g.exit,
        })
    }
}
