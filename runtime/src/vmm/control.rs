//! Control requests to a running VMM (`vmm-api`'s client): drive swaps, pause, stats.

use std::path::Path;

use tracing::debug;
use vmm_api::control::{ControlClient, ControlError, Reply, Request, Stats};

use super::{VmmProcess, CONTROL_TIMEOUT};
use crate::error::{Error, Result};

impl VmmProcess {
    fn control_err(&self, request: &Request, e: ControlError) -> Error {
        self.err(format!("control request {request:?}: {e}"))
    }

    /// Sends one control request on a new connection and returns the VMM's reply; a
    /// refusal becomes an error carrying the VMM's message.
    pub fn control(&self, request: &Request) -> Result<Reply> {
        ControlClient::connect(&self.control_socket, CONTROL_TIMEOUT)
            .and_then(|mut c| c.request(request))
            .map_err(|e| self.control_err(request, e))
    }

    /// Puts `path` into drive slot `slot` with the virtio-blk serial `serial`.
    pub fn swap(&self, slot: u32, path: &Path, read_only: bool, serial: &str) -> Result<()> {
        if path.to_str().is_none() {
            return Err(self.err(format!("disk path {} is not UTF-8", path.display())));
        }
        self.control(&Request::Swap {
            slot: slot as usize,
            path: path.into(),
            read_only,
            serial: Some(serial.into()),
        })?;
        debug!(sandbox = %self.sandbox_id, slot, disk = %path.display(), serial, "drive swapped in");
        Ok(())
    }

    /// Empties drive slot `slot`.
    pub fn eject(&self, slot: u32) -> Result<()> {
        self.control(&Request::Eject {
            slot: slot as usize,
        })?;
        debug!(sandbox = %self.sandbox_id, slot, "drive ejected");
        Ok(())
    }

    pub fn pause(&self) -> Result<()> {
        self.control(&Request::Pause {}).map(drop)
    }

    pub fn resume(&self) -> Result<()> {
        self.control(&Request::Resume {}).map(drop)
    }

    /// The VMM's stats (vcpus, memory, RSS, slots; see docs/vmm.md).
    pub fn stats(&self) -> Result<Stats> {
        let request = Request::Stats {};
        self.control(&request)?
            .stats
            .ok_or_else(|| self.control_err(&request, ControlError::NoStats))
    }
}
