//! virtio-vsock (virtio 1.1 §5.10), stream sockets only, mapped to host Unix sockets with
//! no host vsock module: the "hybrid vsock" scheme Firecracker uses. docs/vsock.md gives
//! the host-side protocol.
//!
//! - Host → guest: a host process connects to the device's Unix listener and writes
//!   `CONNECT <port>\n`; the device picks a free host port, sends the guest a REQUEST and,
//!   on the guest's RESPONSE, writes `OK <host port>\n`. From then on the Unix stream is
//!   the connection.
//! - Guest → host: a REQUEST to CID 2 port P connects to the Unix listener `<path>_<P>`.
//!
//! Guest packets arrive on the TX queue and are handled synchronously on the notifying
//! vCPU; host streams are non-blocking and watched by the VMM's I/O loop, which calls
//! `backend_event` with the tag they were registered with. Everything read from the guest
//! or a host peer is checked: malformed packets are dropped, or answered with RST when
//! they name a connection. Memory is bounded: guest data waiting for a slow host stream
//! never exceeds the credit we advertise, host data is read only as far as the guest's
//! credit and its RX buffers allow, and owed control packets are per-connection flags or
//! a capped RST list.
//!
//! `device` is the `VirtioDevice` (guest packets in, RX buffers filled), `muxer` the host
//! side (listener, handshakes, connection table, timers), `connection` one connection's
//! state and credit, `packet` the wire format.

mod connection;
mod device;
mod muxer;
pub mod packet;
mod sys;
#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub use connection::{BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
pub use device::Vsock;
pub use muxer::{host_port_path, parse_connect_line};
pub use packet::{
    parse_rx_buffer, parse_tx_packet, read_segments, write_rx_packet, Header, Op, PacketError,
    RxBuffer, Segment, TxError, TxPacket, HEADER_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TYPE_STREAM,
};

/// Virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Device → guest packets.
pub const RX_QUEUE: usize = 0;
/// Guest → device packets.
pub const TX_QUEUE: usize = 1;
/// Transport events (never used: this device does not migrate).
pub const EVENT_QUEUE: usize = 2;
/// I/O loop tag of the Unix listener (registered edge-triggered).
pub const TAG_LISTENER: u32 = 0;
/// I/O loop tag of the handshake/linger timer.
pub const TAG_TIMER: u32 = 1;
/// Host streams get tags from here up.
const FIRST_STREAM_TAG: u32 = 2;
/// Live connections at most; guest REQUESTs beyond get RST, host ones are closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host connections still owing their CONNECT line at most; more are closed at once.
pub const MAX_PENDING_HOSTS: usize = 256;
/// Longest `CONNECT <port>\n` line, newline included.
pub const CONNECT_LINE_MAX: usize = 64;
/// For the CONNECT line, and then for the guest's RESPONSE.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// For the host stream to take the guest data left when the guest closed.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(10);
/// RSTs owed to the guest that belong to no live connection (answers to stray packets,
/// closes of connections already forgotten), at most.
const MAX_QUEUED_RSTS: usize = 4096;
/// Host ports for host-initiated connections are picked from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Host-side errors of the vsock device, each naming the socket path involved.
#[derive(Debug, Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (3..=4294967294)")]
    InvalidCid(u64),
    #[error("vsock socket {}: something that is not a socket is in the way", .path.display())]
    NotASocket { path: PathBuf },
    #[error("vsock socket {}: a live listener is already there", .path.display())]
    InUse { path: PathBuf },
    #[error("vsock socket {}: cannot inspect or remove the old socket", .path.display())]
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock socket {}: cannot bind the listener", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock socket {}: cannot register with the I/O loop", .path.display())]
    Register {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock socket {}: cannot create the timer", .path.display())]
    Timer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
