//! The fuzz targets: each takes any bytes and panics only on a bug.

mod devices;
mod parsers;

/// A target: its name (also its corpus folder) and its entry point.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// Longest input worth mutating to.
    pub max_len: usize,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "virtio_blk_request",
        run: parsers::block_request,
        max_len: 1024,
    },
    Target {
        name: "virtio_vsock_packet",
        run: parsers::vsock_packet,
        max_len: 1024,
    },
    Target {
        name: "virtio_net_tx",
        run: parsers::net_tx,
        max_len: 2048,
    },
    Target {
        name: "virtio_balloon_report",
        run: parsers::balloon_report,
        max_len: 1024,
    },
    Target {
        name: "mmio_registers",
        run: devices::mmio,
        max_len: 2048,
    },
    Target {
        name: "block_exec",
        run: devices::block_exec,
        max_len: 2048,
    },
    Target {
        name: "net_rx",
        run: devices::net_rx,
        max_len: 2048,
    },
    Target {
        name: "vsock_conn",
        run: devices::vsock_conn,
        max_len: 4096,
    },
    Target {
        name: "serial",
        run: devices::serial,
        max_len: 1024,
    },
];
