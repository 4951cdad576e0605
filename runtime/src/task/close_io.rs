//! `CloseIO`: closes the process's stdin.

use super::{Service, TaskError};

impl Service {
    pub fn close_io(&self, id: &str, exec_id: &str, stdin: bool) -> Result<(), TaskError> {
        let proc = self.proc(id, exec_id)?;
        if !stdin {
            return Ok(());
        }
        proc.io().close_stdin();
        let pod = self.running_pod()?;
        match pod.agent.close_stdin(id, exec_id) {
            Ok(()) => Ok(()),
            // Gone already: its stdin is closed too.
            Err(e) if e.code() == Some(crate::agent::Code::NOT_FOUND) => Ok(()),
            Err(e) => Err(TaskError::agent(format!("{}: CloseStdin", proc.label()))(e)),
        }
    }
}
