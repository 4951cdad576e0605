//! Which container disk sits in which drive slot of a pod VM.

use vmm_api::control::Stats;

use super::MAX_SERIAL_LEN;
use crate::error::{Error, Result};

/// Which container disk sits in which drive slot of a VM, by virtio-blk serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    serials: Vec<Option<String>>,
}

impl Slots {
    /// `count` empty slots.
    pub fn new(count: u32) -> Slots {
        Slots {
            serials: vec![None; count as usize],
        }
    }

    /// Rebuilds the table from the VMM's `stats` (after a shim restart): a slot with a
    /// non-empty serial is in use.
    pub fn from_stats(stats: &Stats, count: u32) -> Result<Slots> {
        let mut slots = Slots::new(count);
        for entry in stats.slots.iter().filter(|e| !e.serial.is_empty()) {
            let cell = slots.serials.get_mut(entry.slot).ok_or_else(|| {
                Error::Slots(format!("slot {} is beyond {count} slots", entry.slot))
            })?;
            *cell = Some(entry.serial.clone());
        }
        Ok(slots)
    }

    /// Takes the lowest free slot for `serial` (1..=20 printable ASCII bytes, unique in
    /// the VM).
    pub fn allocate(&mut self, serial: &str) -> Result<u32> {
        if serial.is_empty()
            || serial.len() > MAX_SERIAL_LEN
            || !serial.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Error::Slots(format!(
                "serial {serial:?} must be 1..={MAX_SERIAL_LEN} printable ASCII characters"
            )));
        }
        if let Some(slot) = self.slot_of(serial) {
            return Err(Error::Slots(format!(
                "serial {serial:?} is already in slot {slot}"
            )));
        }
        let total = self.serials.len();
        let (index, cell) = self
            .serials
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.is_none())
            .ok_or_else(|| {
                Error::Slots(format!(
                    "all {total} drive slots are in use: too many containers for this pod \
                     (each takes 2; raise drive_slots in /etc/cocoon/config.toml)"
                ))
            })?;
        *cell = Some(serial.to_string());
        // The slot count came from a u32.
        Ok(index as u32)
    }

    /// Frees the slot holding `serial`; returns it.
    pub fn release(&mut self, serial: &str) -> Option<u32> {
        let slot = self.slot_of(serial)?;
        self.serials[slot as usize] = None;
        Some(slot)
    }

    /// The slot holding `serial`.
    pub fn slot_of(&self, serial: &str) -> Option<u32> {
        self.serials
            .iter()
            .position(|s| s.as_deref() == Some(serial))
            .map(|i| i as u32)
    }

    /// How many slots are free.
    pub fn free(&self) -> usize {
        self.serials.iter().filter(|s| s.is_none()).count()
    }

    /// The used slots and their serials, in slot order.
    pub fn used(&self) -> impl Iterator<Item = (u32, &str)> {
        self.serials
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_deref().map(|s| (i as u32, s)))
    }
}
