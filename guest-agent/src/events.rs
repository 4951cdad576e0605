//! The agent's event queue: process exits and OOM kills, handed to the host in order by
//! `GetEvents` (a long poll), each once.

use cocoon_agent_protocol::api;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Events kept for a host that does not poll; the oldest go first beyond this.
const CAPACITY: usize = 4096;
/// Longest a `GetEvents` call waits.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

pub struct Events {
    queue: Mutex<VecDeque<api::Event>>,
    ready: Condvar,
}

/// The agent's event queue.
pub fn events() -> &'static Events {
    static EVENTS: OnceLock<Events> = OnceLock::new();
    EVENTS.get_or_init(Events::new)
}

impl Events {
    fn new() -> Self {
        Events {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
        }
    }

    pub fn push(&self, event: api::Event) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == CAPACITY {
            tracing::warn!("event queue full: dropping the oldest event");
            q.pop_front();
        }
        q.push_back(event);
        self.ready.notify_all();
    }

    pub fn process_exited(&self, exited: api::ProcessExited) {
        let mut e = api::Event::new();
        e.set_exited(exited);
        self.push(e);
    }

    pub fn oom_killed(&self, container_id: &str) {
        let mut oom = api::OomKilled::new();
        oom.container_id = container_id.to_string();
        let mut e = api::Event::new();
        e.set_oom(oom);
        self.push(e);
    }

    /// Takes every queued event, waiting up to `timeout` (capped at [`MAX_WAIT`]) for the
    /// first one.
    pub fn take(&self, timeout: Duration) -> Vec<api::Event> {
        let deadline = Instant::now() + timeout.min(MAX_WAIT);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Vec::new();
            }
            q = self
                .ready
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        q.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn take_returns_events_in_order_once_and_times_out_empty() {
        let ev = Events::new();
        assert!(ev.take(Duration::from_millis(10)).is_empty());
        ev.oom_killed("a");
        ev.oom_killed("b");
        let got: Vec<String> = ev
            .take(Duration::ZERO)
            .iter()
            .map(|e| e.oom().container_id.clone())
            .collect();
        assert_eq!(got, ["a", "b"]);
        assert!(ev.take(Duration::ZERO).is_empty());
    }

    #[test]
    fn take_wakes_up_on_push_and_queue_is_bounded() {
        let ev = Arc::new(Events::new());
        let pusher = Arc::clone(&ev);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            pusher.oom_killed("late");
        });
        assert_eq!(ev.take(Duration::from_secs(10)).len(), 1);
        t.join().unwrap_or(());

        for i in 0..CAPACITY + 3 {
            ev.oom_killed(&i.to_string());
        }
        let all = ev.take(Duration::ZERO);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].oom().container_id, "3");
    }
}
