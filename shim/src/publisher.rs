//! Publishes the runtime's task events to containerd's event service, in order, from
//! one background thread.
//!
//! containerd can restart while the pod runs (its shims and VMs stay up): the crate's
//! `RemotePublisher` keeps its one connection and then fails every event with EPIPE. Here
//! a failed event reconnects and is retried with a growing delay (about 30 s in all, as
//! containerd's own shims requeue theirs), so exits and OOM kills that happen while
//! containerd is down still reach it once it is back.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use containerd_shim as shim;
use shim::publisher::RemotePublisher;
use tracing::{debug, warn};

use cocoon_runtime::events::{EventSink, TaskEvent};

use crate::convert;

/// Delays before the retries of one event (after a reconnect each).
const RETRY_DELAYS_MS: [u64; 8] = [100, 250, 500, 1000, 2000, 4000, 8000, 16000];

/// Events not yet delivered (or given up on).
#[derive(Default)]
struct Backlog {
    count: Mutex<usize>,
    empty: Condvar,
}

/// The sending side; the thread owns the connection.
pub struct Publisher {
    tx: Mutex<Sender<TaskEvent>>,
    backlog: Arc<Backlog>,
}

struct Worker {
    address: String,
    namespace: String,
    remote: Option<RemotePublisher>,
    backlog: Arc<Backlog>,
}

impl Publisher {
    /// Starts the publishing thread for containerd's TTRPC `address`, with `remote`
    /// as the first connection if there is one already.
    pub fn start(address: &str, namespace: &str, remote: Option<RemotePublisher>) -> Publisher {
        let (tx, rx) = mpsc::channel();
        let backlog = Arc::new(Backlog::default());
        let worker = Worker {
            address: address.to_string(),
            namespace: namespace.to_string(),
            remote,
            backlog: backlog.clone(),
        };
        if let Err(e) = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || worker.run(rx))
        {
            warn!(error = %e, "cannot start the event publisher thread: events will be lost");
        }
        Publisher {
            tx: Mutex::new(tx),
            backlog,
        }
    }

    /// Waits up to `timeout` for every queued event to be delivered (or given up on).
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut n) = self.backlog.count.lock() else {
            return false;
        };
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.backlog.empty.wait_timeout(n, left) {
                Ok((g, _)) => n = g,
                Err(_) => return false,
            }
        }
        true
    }
}

impl EventSink for Publisher {
    fn publish(&self, event: TaskEvent) {
        if let Ok(mut n) = self.backlog.count.lock() {
            *n += 1;
        }
        let sent = self
            .tx
            .lock()
            .map(|tx| tx.send(event).is_ok())
            .unwrap_or(false);
        if !sent {
            warn!("event publisher thread is gone: event dropped");
            self.backlog.done();
        }
    }
}

impl Backlog {
    fn done(&self) {
        if let Ok(mut n) = self.count.lock() {
            *n = n.saturating_sub(1);
        }
        self.empty.notify_all();
    }
}

impl Worker {
    fn run(mut self, rx: Receiver<TaskEvent>) {
        for event in rx {
            self.deliver(&event);
            self.backlog.done();
        }
    }

    fn try_once(&mut self, event: &TaskEvent) -> Result<(), String> {
        if self.remote.is_none() {
            let r = RemotePublisher::new(&self.address)
                .map_err(|e| format!("connecting to {}: {e}", self.address))?;
            debug!(address = %self.address, "connected to containerd's event service");
            self.remote = Some(r);
        }
        let remote = self.remote.as_ref().ok_or("no connection")?;
        remote
            .publish(
                shim::Context::default(),
                event.topic(),
                &self.namespace,
                convert::event(event),
            )
            .map_err(|e| {
                // A broken connection stays broken: the next attempt reconnects.
                self.remote = None;
                e.to_string()
            })
    }

    fn deliver(&mut self, event: &TaskEvent) {
        let topic = event.topic();
        let mut last = match self.try_once(event) {
            Ok(()) => return,
            Err(e) => e,
        };
        for delay in RETRY_DELAYS_MS {
            debug!(topic, error = %last, retry_in_ms = delay, "publishing event failed");
            std::thread::sleep(Duration::from_millis(delay));
            match self.try_once(event) {
                Ok(()) => {
                    debug!(topic, "event published after a retry");
                    return;
                }
                Err(e) => last = e,
            }
        }
        warn!(topic, error = %last, ?event, "event could not be published to containerd: dropped");
    }
}
