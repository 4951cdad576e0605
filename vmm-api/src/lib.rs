//! What `cocoon-vmm` and its users agree on, written once:
//!
//! - [`control`]: the control socket's requests, replies and stats (one JSON object per
//!   line each way, docs/vmm.md), and [`ControlClient`] to speak it;
//! - [`config`]: the VM description the VMM takes as flags or as one JSON file;
//! - [`vsock`]: the host side of the hybrid-vsock handshake (`CONNECT <port>` /
//!   `OK <host port>`, docs/vsock.md).
//!
//! Validation that needs the host (files, KVM limits) stays in the VMM.

pub mod config;
pub mod control;
pub mod vsock;

pub use config::{DriveConfig, NetConfig, VmConfig, VsockConfig};
pub use control::{ControlClient, ControlError, Reply, Request, SlotStats, Stats};
