//! `Wait`: blocks until the process has exited (returns at once if it has).

use super::{Exit, Service, TaskError};

impl Service {
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, TaskError> {
        let proc = self.proc(id, exec_id)?;
        let mut g = proc.lock();
        loop {
            if let Some(exit) = g.exit {
                return Ok(exit);
            }
            g = proc.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}
