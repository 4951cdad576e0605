//! Whether a pod VM still answers, and what a silent one looks like.
//!
//! The VM is the sandbox: a guest that stops answering must never leave a pod that can
//! neither run nor be removed. Two things watch for that ([`crate::task`] and
//! [`crate::sandbox::Pod`] act on them):
//! - the stop path: a SIGKILL, a container removal or storage removal that the agent
//!   does not answer within `liveness.stop_timeout_secs` declares the VM dead: the VMM is
//!   killed and every process of the pod is reported exited (137 where a SIGKILL was
//!   asked for, 255 otherwise);
//! - the idle health check: the agent is pinged every `ping_interval_secs` (one ping at
//!   a time, each waiting up to `unresponsive_after_secs` for its answer); silence for
//!   `unresponsive_after_secs` marks the VM unresponsive (logged with its [`signature`],
//!   recorded in `pod.json` for `cocoon ps`), an answer clears the mark, and silence for
//!   `dead_after_secs` (unless 0) declares it dead. Time the VM spends paused on request
//!   does not count as silence.
//!
//! The thresholds are about silence, not speed: a ping that is answered late is an
//! answer. A VM that is merely slow keeps its pods.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Liveness;

/// What one observation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// Silent for `silent` (at least `unresponsive_after`): marked unresponsive.
    Unresponsive {
        silent: Duration,
    },
    /// Answered again after `silent` while marked unresponsive.
    Recovered {
        silent: Duration,
    },
    /// Silent for `silent` (at least `dead_after`): the VM is to be declared dead.
    Dead {
        silent: Duration,
    },
}

/// The health check's state for one VM.
#[derive(Debug, Clone)]
pub struct Tracker {
    last_answer: Instant,
    unresponsive: bool,
}

impl Tracker {
    pub fn new(now: Instant) -> Tracker {
        Tracker {
            last_answer: now,
            unresponsive: false,
        }
    }

    /// The agent answered at `now`.
    pub fn answered(&mut self, now: Instant) -> Change {
        let silent = now.saturating_duration_since(self.last_answer);
        self.last_answer = now;
        if std::mem::take(&mut self.unresponsive) {
            Change::Recovered { silent }
        } else {
            Change::None
        }
    }

    /// A ping went unanswered at `now`.
    pub fn unanswered(&mut self, now: Instant, rule: &Liveness) -> Change {
        let silent = now.saturating_duration_since(self.last_answer);
        if rule.dead_after().is_some_and(|d| silent >= d) {
            return Change::Dead { silent };
        }
        if !self.unresponsive && silent >= rule.unresponsive_after() {
            self.unresponsive = true;
            return Change::Unresponsive { silent };
        }
        Change::None
    }

    /// The VM was paused on request until `now`: that silence is excused.
    pub fn excuse(&mut self, now: Instant) {
        self.last_answer = now;
    }

    pub fn is_unresponsive(&self) -> bool {
        self.unresponsive
    }
}

/// One sample of a process's threads and of its KVM counters.
struct Sample {
    threads: Vec<(String, ThreadSample)>,
    kvm: Vec<(PathBuf, Vec<(String, u64)>)>,
}

/// One thread of a process, as /proc shows it.
struct ThreadSample {
    name: String,
    state: char,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    wchan: String,
}

/// The KVM debugfs counters that tell a halted, spinning or interrupt-starved guest apart.
const KVM_COUNTERS: [&str; 6] = [
    "exits",
    "irq_injections",
    "halt_exits",
    "halt_wakeup",
    "io_exits",
    "mmio_exits",
];

fn sample_threads(pid: u32) -> Vec<(String, ThreadSample)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let tid = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The fields after the command name, which may itself hold spaces and ')'.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let field = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.push((
            tid,
            ThreadSample {
                name: read("comm").trim().to_string(),
                state: rest.first().and_then(|s| s.chars().next()).unwrap_or('?'),
                // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
                cpu_ticks: field(11) + field(12),
                wchan: read("wchan"),
            },
        ));
    }
    out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    out
}

/// The VM directories KVM's debugfs keeps for process `pid` (`<pid>-<vm fd>`); none where
/// debugfs is not mounted.
fn kvm_dirs(root: &Path, pid: u32) -> Vec<PathBuf> {
    let prefix = format!("{pid}-");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

fn sample(pid: u32, kvm_root: &Path) -> Sample {
    let kvm = kvm_dirs(kvm_root, pid)
        .into_iter()
        .map(|dir| {
            let counters = KVM_COUNTERS
                .iter()
                .filter_map(|c| {
                    let v = std::fs::read_to_string(dir.join(c)).ok()?;
                    Some((c.to_string(), v.trim().parse().ok()?))
                })
                .collect();
            (dir, counters)
        })
        .collect();
    Sample {
        threads: sample_threads(pid),
        kvm,
    }
}

/// What each thread of process `pid` does over `window`: state, CPU ticks used and where
/// it sleeps; and, where KVM's debugfs is mounted, the VM's exit and interrupt counters
/// over the same window. For a VM that stopped answering this tells a spinning guest, a
/// halted one that still takes timer interrupts, one that takes none, and a stuck device
/// thread apart.
pub fn signature(pid: u32, window: Duration) -> String {
    signature_with(pid, window, Path::new("/sys/kernel/debug/kvm"))
}

fn signature_with(pid: u32, window: Duration, kvm_root: &Path) -> String {
    let before = sample(pid, kvm_root);
    std::thread::sleep(window);
    let after = sample(pid, kvm_root);
    if after.threads.is_empty() {
        return format!("(no threads of pid {pid} in /proc)");
    }
    let per = window.as_secs_f64().max(0.001);
    let mut lines: Vec<String> = after
        .threads
        .iter()
        .map(|(tid, t)| {
            let used = before
                .threads
                .iter()
                .find(|(b, _)| b == tid)
                .map(|(_, b)| t.cpu_ticks.saturating_sub(b.cpu_ticks))
                .unwrap_or(0);
            format!(
                "{tid} {:<12} {} cpu {:>5.1} ticks/s wchan {}",
                t.name,
                t.state,
                used as f64 / per,
                t.wchan
            )
        })
        .collect();
    for (dir, counters) in &after.kvm {
        let old = before.kvm.iter().find(|(d, _)| d == dir).map(|(_, c)| c);
        let rates: Vec<String> = counters
            .iter()
            .map(|(name, v)| {
                let was = old
                    .and_then(|c| c.iter().find(|(n, _)| n == name))
                    .map_or(*v, |(_, w)| *w);
                format!("{name} {:.0}/s", v.saturating_sub(was) as f64 / per)
            })
            .collect();
        lines.push(format!("kvm {}: {}", dir.display(), rates.join(", ")));
    }
    if after.kvm.is_empty() {
        lines.push("kvm: no debugfs counters (debugfs not mounted)".into());
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(unresponsive: u64, dead: u64) -> Liveness {
        Liveness {
            ping_interval_secs: 1,
            unresponsive_after_secs: unresponsive,
            dead_after_secs: dead,
            ..Liveness::default()
        }
    }

    #[test]
    fn silence_marks_then_kills_and_an_answer_clears_the_mark() {
        let r = rule(20, 120);
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(t.unanswered(at(5), &r), Change::None);
        assert_eq!(t.unanswered(at(19), &r), Change::None);
        assert_eq!(
            t.unanswered(at(20), &r),
            Change::Unresponsive {
                silent: Duration::from_secs(20)
            }
        );
        assert!(t.is_unresponsive());
        // Marked once, not at every ping.
        assert_eq!(t.unanswered(at(60), &r), Change::None);
        assert_eq!(
            t.answered(at(70)),
            Change::Recovered {
                silent: Duration::from_secs(70)
            }
        );
        assert!(!t.is_unresponsive());
        assert_eq!(t.answered(at(75)), Change::None);
        assert_eq!(
            t.unanswered(at(100), &r),
            Change::Unresponsive {
                silent: Duration::from_secs(25)
            }
        );
        // 115 s of silence after the last answer: not yet dead.
        assert_eq!(t.unanswered(at(190), &r), Change::None);
        assert_eq!(
            t.unanswered(at(195), &r),
            Change::Dead {
                silent: Duration::from_secs(120)
            }
        );
    }

    #[test]
    fn a_slow_vm_that_answers_is_never_marked() {
        // Every answer comes late (19 s after the one before), but it comes.
        let r = rule(20, 120);
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        for i in 1..50u64 {
            let now = t0 + Duration::from_secs(19 * i);
            assert_eq!(t.unanswered(now - Duration::from_secs(1), &r), Change::None);
            assert_eq!(t.answered(now), Change::None);
        }
        assert!(!t.is_unresponsive());
    }

    #[test]
    fn dead_after_zero_never_kills_and_a_pause_is_excused() {
        let r = rule(20, 0);
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        let c = t.unanswered(t0 + Duration::from_secs(10_000), &r);
        assert!(matches!(c, Change::Unresponsive { .. }), "{c:?}");
        assert_eq!(
            t.unanswered(t0 + Duration::from_secs(100_000), &r),
            Change::None
        );

        let r = rule(20, 120);
        let mut t = Tracker::new(t0);
        // Paused on request for 10 minutes: no silence counted from before the resume.
        t.excuse(t0 + Duration::from_secs(600));
        assert_eq!(
            t.unanswered(t0 + Duration::from_secs(610), &r),
            Change::None
        );
    }

    #[test]
    fn signature_shows_threads_and_kvm_rates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid = std::process::id();
        let vm = dir.path().join(format!("{pid}-11"));
        std::fs::create_dir(&vm).expect("mkdir");
        std::fs::write(vm.join("exits"), "100\n").expect("write");
        std::fs::write(vm.join("irq_injections"), "7\n").expect("write");
        // Another process's VM is not ours.
        std::fs::create_dir(dir.path().join(format!("{}-3", pid + 1))).expect("mkdir");
        let s = signature_with(pid, Duration::from_millis(50), dir.path());
        assert!(s.contains("ticks/s wchan"), "{s}");
        assert!(
            s.contains(&format!("{pid}-11: exits 0/s, irq_injections 0/s")),
            "{s}"
        );
        assert!(!s.contains(&format!("{}-3", pid + 1)), "{s}");

        let empty = tempfile::tempdir().expect("tempdir");
        let s = signature_with(pid, Duration::from_millis(10), empty.path());
        assert!(s.contains("debugfs not mounted"), "{s}");
        let s = signature_with(u32::MAX, Duration::from_millis(10), empty.path());
        assert!(s.contains("no threads"), "{s}");
    }
}
