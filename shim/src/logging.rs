//! The shim's log: `tracing` (with the `log` records of the containerd-shim crate
//! bridged in) to the `log` FIFO containerd creates in the bundle directory, or to
//! stderr when there is none (the `delete` action, manual runs).

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Sets up logging to `./log` (the bundle's log FIFO); falls back to stderr.
pub fn init_fifo(level: &str, id: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fifo = OpenOptions::new().write(true).open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(true);
    let result = match fifo {
        Ok(file) => builder.with_writer(Mutex::new(file)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
    if result.is_ok() {
        tracing::debug!(id, "logging initialised");
    }
}

/// Logging to stderr (containerd keeps a shim action's stderr in its own log).
pub fn init_stderr(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}
