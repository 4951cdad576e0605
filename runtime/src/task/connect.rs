//! `Connect`: the shim's and the task's pids.

use super::{Service, TaskError};

impl Service {
    /// (shim pid, task pid).
    pub fn connect(&self, id: &str) -> Result<(u32, u32), TaskError> {
        let proc = self.proc(id, "")?;
        let pid = proc.lock().pid;
        Ok((std::process::id(), pid))
    }
}
