//! virtio-net (virtio 1.1 §5.1) over a Linux TAP: `device` (the `VirtioDevice`, its
//! TAP watch and config space), `tx` and `rx` (the two directions), `tap` (the host side).
//!
//! Two queues: receive (0) and transmit (1). Frames cross in both directions with a
//! 12-byte `virtio_net_hdr_v1` in front; the TAP is set to the same header size, so the
//! header passes through unchanged (apart from `num_buffers` and, without GUEST_CSUM,
//! `flags` on receive).
//!
//! - Transmit (guest notifies queue 1, on the vCPU thread): each chain's device-readable
//!   bytes are gathered by byte position into one buffer by [`gather_tx_frame`], which
//!   checks everything, and written to the TAP in one call. A bad chain is returned used
//!   with length 0 and dropped. If the TAP would block, the chain stays on the available
//!   ring, the TAP is watched for EPOLLOUT and transmission resumes from the I/O thread.
//! - Receive (TAP readable, on the I/O thread): frames are read one at a time, at most
//!   [`RX_BUDGET`] per wake-up, and copied into device-writable chains, spread over
//!   several with MRG_RXBUF. With no buffers left the frame is kept (one at most), the TAP
//!   is no longer watched for input, and reception resumes when the guest notifies
//!   queue 0.
//!
//! Everything in a chain comes from the guest and is checked, never trusted; a frame from
//! the TAP is only copied, never parsed beyond its length.

mod device;
mod rx;
pub mod tap;
#[cfg(test)]
mod tests;
mod tx;

use std::os::raw::c_uint;

use thiserror::Error;
use virtio_bindings::virtio_net::{
    virtio_net_hdr_v1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};

pub use device::Net;
pub use tap::{Tap, TapError};
pub use tx::{gather_tx_frame, validate_tx_header, TxError};

/// Virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`, with `num_buffers`: what VERSION_1 always uses.
pub const VNET_HDR_LEN: usize = 12;
const _: () = assert!(std::mem::size_of::<virtio_net_hdr_v1>() == VNET_HDR_LEN);
/// An Ethernet header: the shortest frame a TAP takes.
pub const ETH_HLEN: usize = 14;
/// Longest frame without its virtio-net header: 64 KiB plus an Ethernet header.
pub const MAX_FRAME_LEN: usize = 65550;
/// Longest frame with its virtio-net header, in either direction.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// The tag the TAP fd is registered with.
pub const TAP_TAG: u32 = 0;
/// Frames read from the TAP per I/O-loop wake-up, so one busy device cannot starve others.
pub const RX_BUDGET: usize = 64;
/// Config space: `mac[6]`, then `status` (u16).
pub const CONFIG_LEN: usize = 8;

/// Consecutive failed TAP reads after which the TAP is given up on (the loop would spin).
pub(super) const MAX_READ_ERRORS: u32 = 16;
pub(super) const NUM_BUFFERS_OFFSET: usize = 10;
pub(super) const HDR_F_NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
pub(super) const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;
pub(super) const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;
pub(super) const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
pub(super) const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
pub(super) const GSO_UDP: u8 = VIRTIO_NET_HDR_GSO_UDP as u8;

pub(super) const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Feature bits offered to the driver (the transport adds VERSION_1).
pub const DEVICE_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_HOST_UFO)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS);

pub(super) fn has(features: u64, feature: u32) -> bool {
    features & bit(feature) != 0
}

/// TAP offloads (TUN_F_*) for what the driver accepted: only those the guest can
/// receive (the GUEST_* features), made consistent the way the kernel requires —
/// segmentation offloads only with checksum offload, ECN only with TSO — since a
/// driver may accept any subset of what was offered.
pub fn offload_flags(acked_features: u64) -> c_uint {
    let has = |f| has(acked_features, f);
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// Setting up a network device.
#[derive(Debug, Error)]
pub enum NetError {
    #[error("MAC address {mac} is not a unicast address")]
    InvalidMac { mac: String },
    #[error("cannot set up TAP {name:?} for virtio-net")]
    Tap {
        name: String,
        #[source]
        source: TapError,
    },
}

pub(super) fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
