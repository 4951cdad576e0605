//! OOM kills become `OomKilled` events: the cgroup's `oom_kill` counter is compared with
//! the last value seen, at every process exit of the container and (cgroup v2) whenever
//! `memory.events` changes (inotify), so that an OOM kill of a process the agent did
//! not start (a child of the container's init) is reported too.

use super::cgroup::Cgroup;
use crate::events::events;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};

/// One container's OOM bookkeeping.
pub struct OomState {
    container_id: String,
    cgroup: Cgroup,
    last: Mutex<u64>,
    report: Box<dyn Fn(&str) + Send + Sync>,
}

impl OomState {
    /// Reports to the agent's event queue.
    pub fn new(container_id: &str, cgroup: Cgroup) -> Self {
        Self::with_report(container_id, cgroup, |id| events().oom_killed(id))
    }

    pub fn with_report(
        container_id: &str,
        cgroup: Cgroup,
        report: impl Fn(&str) + Send + Sync + 'static,
    ) -> Self {
        let last = cgroup.oom_kills().unwrap_or(0);
        OomState {
            container_id: container_id.to_string(),
            cgroup,
            last: Mutex::new(last),
            report: Box::new(report),
        }
    }

    /// Reads the counter; pushes one `OomKilled` event when it grew since the last
    /// check. Returns the current value (None when unreadable).
    pub fn check(&self) -> Option<u64> {
        let now = self.cgroup.oom_kills()?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if now > *last {
            *last = now;
            drop(last);
            tracing::warn!(container_id = %self.container_id, oom_kills = now, "OOM kill");
            (self.report)(&self.container_id);
        }
        Some(now)
    }
}

/// The inotify instance and its reader thread (started with the first watch).
pub struct OomWatcher {
    inner: Mutex<Option<Watcher>>,
}

struct Watcher {
    fd: Arc<OwnedFd>,
    watches: Arc<Mutex<HashMap<i32, Weak<OomState>>>>,
}

impl Default for OomWatcher {
    fn default() -> Self {
        OomWatcher {
            inner: Mutex::new(None),
        }
    }
}

/// A watch to drop when the container goes.
pub struct WatchId(i32);

impl OomWatcher {
    /// Watches `state`'s `memory.events` (v2 only; v1 relies on the exit-time checks).
    pub fn watch(&self, state: &Arc<OomState>) -> Option<WatchId> {
        let path = state.cgroup.oom_events_file()?;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.is_none() {
            match Watcher::start() {
                Ok(w) => *inner = Some(w),
                Err(e) => {
                    tracing::warn!("no OOM watcher, OOM kills are seen at exits only: {e}");
                    return None;
                }
            }
        }
        let w = inner.as_ref()?;
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: inotify_add_watch reads the NUL-terminated path, valid for the call,
        // on an inotify descriptor this watcher owns.
        let wd =
            unsafe { libc::inotify_add_watch(w.fd.as_raw_fd(), c_path.as_ptr(), libc::IN_MODIFY) };
        if wd < 0 {
            tracing::warn!(
                container_id = %state.container_id,
                "cannot watch {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            return None;
        }
        lock_map(&w.watches).insert(wd, Arc::downgrade(state));
        Some(WatchId(wd))
    }

    pub fn unwatch(&self, id: WatchId) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = inner.as_ref() {
            lock_map(&w.watches).remove(&id.0);
            // SAFETY: plain syscall on our inotify descriptor; a stale wd is EINVAL.
            unsafe { libc::inotify_rm_watch(w.fd.as_raw_fd(), id.0) };
        }
    }
}

fn lock_map(
    m: &Mutex<HashMap<i32, Weak<OomState>>>,
) -> std::sync::MutexGuard<'_, HashMap<i32, Weak<OomState>>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watcher {
    fn start() -> std::io::Result<Watcher> {
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor or -1.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let watches: Arc<Mutex<HashMap<i32, Weak<OomState>>>> = Arc::default();
        let reader = File::from(fd.try_clone()?);
        let map = Arc::clone(&watches);
        std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || read_events(reader, &map))?;
        Ok(Watcher { fd, watches })
    }
}

fn read_events(mut reader: File, watches: &Mutex<HashMap<i32, Weak<OomState>>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("OOM watcher stopped: {e}");
                return;
            }
        };
        for (wd, mask) in parse_events(&buf[..n]) {
            let state = lock_map(watches).get(&wd).and_then(Weak::upgrade);
            if mask & libc::IN_IGNORED != 0 {
                // The cgroup was removed.
                lock_map(watches).remove(&wd);
            }
            if let Some(state) = state {
                state.check();
            }
        }
    }
}

/// `struct inotify_event`s: (wd, mask) of each; a truncated tail is ignored.
fn parse_events(mut buf: &[u8]) -> Vec<(i32, u32)> {
    const HEADER: usize = 16; // wd, mask, cookie, len
    let word = |b: &[u8], at: usize| -> [u8; 4] {
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[at..at + 4]);
        w
    };
    let mut out = Vec::new();
    while buf.len() >= HEADER {
        let wd = i32::from_ne_bytes(word(buf, 0));
        let mask = u32::from_ne_bytes(word(buf, 4));
        let len = u32::from_ne_bytes(word(buf, 12)) as usize;
        out.push((wd, mask));
        let Some(rest) = buf.get(HEADER.saturating_add(len)..) else {
            break;
        };
        buf = rest;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn event(wd: i32, mask: u32, name_len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(wd.to_ne_bytes());
        v.extend(mask.to_ne_bytes());
        v.extend(0u32.to_ne_bytes());
        v.extend(name_len.to_ne_bytes());
        v.extend(std::iter::repeat_n(0u8, name_len as usize));
        v
    }

    #[test]
    fn inotify_events_parse() {
        let mut buf = event(3, libc::IN_MODIFY, 0);
        buf.extend(event(4, libc::IN_IGNORED, 16));
        buf.extend(&[1, 2, 3]);
        assert_eq!(
            parse_events(&buf),
            vec![(3, libc::IN_MODIFY), (4, libc::IN_IGNORED)]
        );
        // A header that claims more name than there is.
        assert_eq!(parse_events(&event(5, 1, 0)[..16]), vec![(5, 1)]);
        let mut short = event(6, 1, 8);
        short.truncate(20);
        assert_eq!(parse_events(&short), vec![(6, 1)]);
        assert!(parse_events(&[0; 10]).is_empty());
    }

    /// How many reports arrive within `within` (waiting a little for duplicates).
    fn count_reports(rx: &mpsc::Receiver<String>, within: Duration) -> usize {
        let mut n = 0;
        if rx.recv_timeout(within).is_ok() {
            n += 1;
            while rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                n += 1;
            }
        }
        n
    }

    #[test]
    fn counter_growth_is_reported_once_by_check_and_by_inotify() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("cocoon/oom-test");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("memory.events");
        std::fs::write(&file, "oom 0\noom_kill 0\n").expect("write");
        let cg = Cgroup::fake_v2(root.path(), "/cocoon/oom-test".as_ref());
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let state = Arc::new(OomState::with_report("oom-test", cg, move |id| {
            let _ = tx.lock().map(|t| t.send(id.to_string()));
        }));
        assert_eq!(state.check(), Some(0));

        let watcher = OomWatcher::default();
        let id = watcher.watch(&state).expect("watch");
        std::fs::write(&file, "oom 1\noom_kill 1\n").expect("write");
        assert_eq!(count_reports(&rx, Duration::from_secs(5)), 1);
        // Checking again (as an exit does) reports nothing new.
        assert_eq!(state.check(), Some(1));
        assert_eq!(count_reports(&rx, Duration::from_millis(200)), 0);
        watcher.unwatch(id);
    }
}
