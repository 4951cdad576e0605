//! `ResizePty`: the process's terminal size.

use super::{Service, TaskError};

impl Service {
    pub fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), TaskError> {
        let proc = self.proc(id, exec_id)?;
        if !proc.stdio.terminal {
            return Err(TaskError::FailedPrecondition(format!(
                "{} has no terminal",
                proc.label()
            )));
        }
        let pod = self.running_pod()?;
        pod.agent
            .resize_tty(id, exec_id, height, width)
            .map_err(TaskError::agent(format!("{}: ResizeTty", proc.label())))
    }
}
