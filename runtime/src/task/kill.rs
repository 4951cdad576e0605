//! `Kill`: a signal to a container's process (or all of its processes); for the
//! sandbox, the VM is stopped (in the background: the exit event follows).
//!
//! The liveness rule ([`crate::liveness`]): a SIGKILL the agent does not answer within
//! `liveness.stop_timeout_secs` declares the pod VM dead, which ends every process of the
//! pod (this one with 137), so a stop never hangs on a silent guest. Another signal that
//! goes unanswered is left in flight: containerd's SIGKILL after its grace period then
//! takes the same path.

use std::sync::atomic::Ordering;

use tracing::{info, warn};

use super::{Service, Status, TaskError};
use crate::error::chain;

const SIGKILL: u32 = 9;

impl Service {
    pub fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), TaskError> {
        let proc = self.proc(id, exec_id)?;
        let finished =
            || TaskError::NotFound(format!("{}: process already finished", proc.label()));
        if proc.lock().status == Status::Stopped {
            return Err(finished());
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
        let pod = match self.running_pod() {
            Ok(pod) => pod,
            // Its exit is published (or about to be) with the VM's end.
            Err(TaskError::VmEnded { .. }) => return Err(finished()),
            Err(e) => return Err(e),
        };
        if proc.lock().status == Status::Created && !exec_id.is_empty() {
            return Err(TaskError::FailedPrecondition(format!(
                "{} has not been started",
                proc.label()
            )));
        }
        if signal == SIGKILL {
            proc.sigkill_requested.store(true, Ordering::SeqCst);
            if all {
                for p in self.procs().values().filter(|p| p.container_id == id) {
                    p.sigkill_requested.store(true, Ordering::SeqCst);
                }
            }
        }
        let agent = pod
            .agent
            .with_timeout(self.config().liveness.stop_timeout());
        match agent.signal_process(id, exec_id, signal, all) {
            Ok(()) => Ok(()),
            Err(e) if e.is_no_answer() && signal == SIGKILL => {
                pod.declare_dead(&format!("{}: SIGKILL: {}", proc.label(), chain(&e)));
                Ok(())
            }
            Err(e) if e.is_no_answer() => {
                warn!(sandbox = %pod.id, process = %proc.label(), signal, error = %chain(&e),
                    "signal not acknowledged by the agent: left in flight (a SIGKILL that \
                     goes unanswered stops the pod VM)");
                Ok(())
            }
            Err(e) => Err(TaskError::agent(format!(
                "{}: signal {signal}",
                proc.label()
            ))(e)),
        }
    }
}
