//! Where the agent keeps things in the guest. All under /run (a tmpfs): nothing the agent
//! writes survives the VM, by design.

/// The agent's own directory.
pub const RUN_DIR: &str = "/run/cocoon";
/// libcontainer's state root (one directory per container).
pub const OCI_ROOT: &str = "/run/cocoon/oci";
/// Per-container bundles: `<id>/config.json`, `<id>/rootfs` (the overlay mount point).
pub const CONTAINERS_DIR: &str = "/run/cocoon/containers";
/// The pod: `ns/{net,ipc,uts,pid}` (bind-mounted namespaces), `hostname`, `resolv.conf`,
/// `hosts`.
pub const SANDBOX_DIR: &str = "/run/cocoon/sandbox";
