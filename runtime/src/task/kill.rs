//! `Kill`: a signal to a container's process (or all of its processes); for the
//! sandbox, the VM is stopped (in the background: the exit event follows).

use tracing::{info, warn};

use super::{Service, Status, TaskError};

impl Service {
    pub fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), TaskError> {
        let proc = self.proc(id, exec_id)?;
        if proc.lock().status == Status::Stopped {
            return Err(TaskError::NotFound(format!(
                "{}: process already finished",
                proc.label()
            )));
        }
        let container = self.container(id)?;
        if container.is_sandbox {
            let Some(pod) = self.pod() else {
                return Err(TaskError::NotFound(format!("sandbox {id} not found")));
            };
            info!(sandbox = id, signal, "stopping the pod VM");
            let p = pod.clone();
            if let Err(e) = std::thread::Builder::new()
                .name("vm-stop".into())
                .spawn(move || p.stop())
            {
                warn!(sandbox = id, error = %e, "no thread for the stop: stopping inline");
                pod.stop();
            }
            return Ok(());
        }
        let pod = self.running_pod()?;
        if proc.lock().status == Status::Created && !exec_id.is_empty() {
            return Err(TaskError::FailedPrecondition(format!(
                "{} has not been started",
                proc.label()
            )));
        }
        pod.agent
            .signal_process(id, exec_id, signal, all)
            .map_err(TaskError::agent(format!(
                "{}: signal {signal}",
                proc.label()
            )))
    }
}
