//! The one place that calls `waitpid`. As PID 1 the agent inherits every orphan of the
//! guest, and a second waiter would steal exit statuses, so the rest of the agent asks
//! here: [`Reaper::spawn`] for children it starts, [`Reaper::on_exit`] for processes that
//! only became its children (a container's init after its creator exited).

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub pid: i32,
    /// The exit code, or 128 + the number of the signal that killed it (shell style, as
    /// containerd reports it).
    pub status: i32,
    pub at: SystemTime,
}

type Callback = Box<dyn FnOnce(ExitInfo) + Send>;

/// Exits nobody has asked for yet are kept this long, so that a process whose pid is
/// learnt after it already ended (a container that exits at once) is not missed. Pids
/// are not reused within it unless 32k processes start in that time.
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    watchers: HashMap<i32, Callback>,
    unclaimed: HashMap<i32, (ExitInfo, Instant)>,
}

pub struct Reaper {
    state: Mutex<State>,
}

/// The agent's reaper.
pub fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| Reaper {
        state: Mutex::new(State::default()),
    })
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panicking callback must not take reaping down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reaper {
    /// Runs `f` once `pid` has exited: at once (on this thread) if it already has.
    pub fn on_exit(&self, pid: i32, f: impl FnOnce(ExitInfo) + Send + 'static) {
        let mut st = lock(&self.state);
        if let Some((info, _)) = st.unclaimed.remove(&pid) {
            drop(st);
            f(info);
        } else {
            st.watchers.insert(pid, Box::new(f));
        }
    }

    /// Starts `cmd`; its exit goes to `f`. The reaper is held while spawning so the exit
    /// cannot be reaped before the watcher is in place. Do not call `wait` on the child.
    pub fn spawn(
        &self,
        cmd: &mut Command,
        f: impl FnOnce(ExitInfo) + Send + 'static,
    ) -> std::io::Result<Child> {
        let mut st = lock(&self.state);
        let child = cmd.spawn()?;
        st.watchers.insert(child.id() as i32, Box::new(f));
        Ok(child)
    }

    /// Runs `cmd` to completion and returns how it ended.
    pub fn run(&self, cmd: &mut Command) -> std::io::Result<ExitInfo> {
        let done = Arc::new((Mutex::new(None), Condvar::new()));
        let signal = Arc::clone(&done);
        let _child = self.spawn(cmd, move |info| {
            let (slot, cv) = &*signal;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
            cv.notify_all();
        })?;
        let (slot, cv) = &*done;
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(info) = guard.take() {
                return Ok(info);
            }
            guard = cv.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn reaped(&self, info: ExitInfo) {
        let mut st = lock(&self.state);
        match st.watchers.remove(&info.pid) {
            Some(f) => {
                drop(st);
                f(info);
            }
            None => {
                let now = Instant::now();
                st.unclaimed
                    .retain(|_, (_, t)| now.duration_since(*t) < UNCLAIMED_TTL);
                st.unclaimed.insert(info.pid, (info, now));
            }
        }
    }

    /// Reaps every child that exits, forever. SIGCHLD must be blocked in every thread
    /// (block it before starting any), so no signal handler runs in PID 1.
    pub fn run_forever(&self) -> ! {
        let mut chld = SigSet::empty();
        chld.add(Signal::SIGCHLD);
        loop {
            self.reap_pending();
            if chld.wait().is_err() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Reaps every child that has exited by now, without blocking. `run_forever` calls
    /// it on each SIGCHLD; host tests, whose threads cannot all block SIGCHLD, call it
    /// in a polling loop instead.
    pub fn reap_pending(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.reaped(ExitInfo {
                    pid: pid.as_raw(),
                    status: code,
                    at: SystemTime::now(),
                }),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.reaped(ExitInfo {
                    pid: pid.as_raw(),
                    status: 128 + sig as i32,
                    at: SystemTime::now(),
                }),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

/// Blocks SIGCHLD in the calling thread and, through inheritance, in every thread it
/// starts afterwards. Call first thing in `main`.
pub fn block_sigchld() {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    // Cannot fail for a valid set; if it did, the reaper still polls on each wake-up.
    let _ = chld.thread_block();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn unclaimed_exits_reach_late_watchers_and_watchers_get_theirs() {
        let r = Reaper {
            state: Mutex::new(State::default()),
        };
        let at = SystemTime::now();
        r.reaped(ExitInfo {
            pid: 7,
            status: 3,
            at,
        });
        let (tx, rx) = mpsc::channel();
        r.on_exit(7, move |i| tx.send(i.status).unwrap_or(()));
        assert_eq!(rx.try_recv(), Ok(3));

        let (tx, rx) = mpsc::channel();
        r.on_exit(8, move |i| tx.send(i.status).unwrap_or(()));
        assert!(rx.try_recv().is_err());
        r.reaped(ExitInfo {
            pid: 8,
            status: 137,
            at,
        });
        assert_eq!(rx.try_recv(), Ok(137));
        // Claimed exits are not kept.
        assert!(lock(&r.state).unclaimed.is_empty());
    }
}
