//! `Shutdown`: containerd asks the shim to exit; it may once the pod has no task left.

use super::Service;

impl Service {
    /// True when the shim may exit now.
    pub fn shutdown(&self) -> bool {
        self.is_empty()
    }
}
