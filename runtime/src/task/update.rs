//! `Update`: a container's resources (OCI `LinuxResources` as JSON), applied by the
//! agent. The sandbox's VM size is fixed at boot: an update of it is accepted and
//! ignored (containerd sends the pod's new limits there too).

use tracing::info;

use super::{Service, TaskError};

impl Service {
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), TaskError> {
        let container = self.container(id)?;
        let pod = self.running_pod()?;
        if container.is_sandbox {
            info!(
                sandbox = id,
                "resource update of the sandbox ignored: the VM size is fixed"
            );
            return Ok(());
        }
        serde_json::from_slice::<serde_json::Value>(resources_json).map_err(|e| {
            TaskError::InvalidArgument(format!("container {id}: resources are not JSON: {e}"))
        })?;
        pod.agent
            .update_container(id, resources_json)
            .map_err(TaskError::agent(format!("container {id}: UpdateContainer")))
    }
}
