//! `Exec`: registers an exec process (the OCI `process` object as JSON); the agent
//! creates and starts it at `Start`.

use std::sync::Arc;

use super::{Proc, Service, Status, TaskError};
use crate::events::TaskEvent;
use crate::stdio::StdioPaths;

impl Service {
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: StdioPaths,
    ) -> Result<(), TaskError> {
        if !cocoon_agent_protocol::stdio::valid_id(exec_id) {
            return Err(TaskError::InvalidArgument(format!(
                "exec id {exec_id:?}: use letters, digits, '_', '-', '.' (at most 128)"
            )));
        }
        let container = self.container(id)?;
        if container.is_sandbox {
            return Err(TaskError::FailedPrecondition(format!(
                "sandbox {id} has no processes to exec into (it is the VM)"
            )));
        }
        let init = self.proc(id, "")?;
        if init.lock().status != Status::Running {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        serde_json::from_slice::<serde_json::Value>(process_json).map_err(|e| {
            TaskError::InvalidArgument(format!("exec {exec_id} in {id}: process spec: {e}"))
        })?;
        stdio.check().map_err(|source| TaskError::Stdio {
            context: format!("exec {exec_id} in {id}"),
            source,
        })?;
        let key = (id.to_string(), exec_id.to_string());
        let mut procs = self.procs();
        if procs.contains_key(&key) {
            return Err(TaskError::AlreadyExists(format!(
                "exec {exec_id} already exists in container {id}"
            )));
        }
        let mut proc = Proc::new(id, exec_id, stdio, 0);
        proc.process_json = process_json.to_vec();
        procs.insert(key, Arc::new(proc));
        drop(procs);
        self.publish(TaskEvent::ExecAdded {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        });
        Ok(())
    }
}
