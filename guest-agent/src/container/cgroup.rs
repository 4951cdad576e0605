//! A container's cgroup: where it is, and what its files say (stats, OOM kills, pids).
//!
//! The guest runs cgroup v2 only. Host tests run wherever they are (hybrid v1 hosts
//! included), so the few things the agent needs beyond libcontainer (the OOM counter, the
//! process list, killing everything) also understand v1; stats are v2 only.

use crate::error::{AgentError, Result};
use cocoon_agent_protocol::api;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Whether `root` is a cgroup v2 mount (not a v1 tmpfs of hierarchies, not hybrid).
pub fn is_cgroup2(root: &Path) -> bool {
    nix::sys::statfs::statfs(root)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// One container's cgroup, named by its path relative to the hierarchy root
/// (`/cocoon/<id>`, as in `linux.cgroupsPath`).
#[derive(Debug, Clone)]
pub struct Cgroup {
    root: PathBuf,
    path: PathBuf,
    v2: bool,
}

impl Cgroup {
    /// `path` is the normalised, absolute `linux.cgroupsPath`.
    pub fn new(root: &Path, path: &Path) -> Self {
        Cgroup {
            root: root.to_path_buf(),
            path: path.to_path_buf(),
            v2: is_cgroup2(root),
        }
    }

    /// A v2 cgroup under a directory that is not a real hierarchy (tests).
    #[cfg(test)]
    pub fn fake_v2(root: &Path, path: &Path) -> Self {
        Cgroup {
            root: root.to_path_buf(),
            path: path.to_path_buf(),
            v2: true,
        }
    }

    /// The cgroup's relative path (what libcgroups wants).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory of the cgroup in the hierarchy holding `v1_controller` (v1), or
    /// the unified one (v2).
    pub fn dir(&self, v1_controller: &str) -> PathBuf {
        let rel = self.path.strip_prefix("/").unwrap_or(&self.path);
        if self.v2 {
            self.root.join(rel)
        } else {
            self.root.join(v1_controller).join(rel)
        }
    }

    /// How many times the kernel's OOM killer has killed a process of this cgroup
    /// (v2 `memory.events`, v1 `memory.oom_control`). None when unreadable (no memory
    /// controller, cgroup gone).
    pub fn oom_kills(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = std::fs::read_to_string(self.dir("memory").join(file)).ok()?;
        // Without the key the kernel never counted one (old kernels): zero.
        Some(keyed_value(&text, "oom_kill").unwrap_or(0))
    }

    /// The file an inotify watch sees change when an OOM kill is counted (v2 only).
    pub fn oom_events_file(&self) -> Option<PathBuf> {
        self.v2.then(|| self.dir("memory").join("memory.events"))
    }

    /// Every process in the cgroup and its descendants.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let dir = self.dir("pids");
        let mut pids = Vec::new();
        collect_pids(&dir, &mut pids)?;
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Sends `signal` to every process in the cgroup; gone processes are fine. On v2
    /// SIGKILL uses `cgroup.kill` (atomic: catches forks in flight, works when frozen).
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        if self.v2 && signal == nix::sys::signal::Signal::SIGKILL {
            let kill = self.dir("").join("cgroup.kill");
            if kill.exists() {
                return std::fs::write(&kill, "1")
                    .map_err(AgentError::io(format!("write {}", kill.display())));
            }
        }
        for pid in self.pids()? {
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(AgentError::io(format!("signal {signal} to pid {pid}"))(
                        e.into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Stats from the cgroup v2 files.
    pub fn stats(&self) -> Result<api::StatsContainerResponse> {
        if !self.v2 {
            return Err(AgentError::FailedPrecondition(format!(
                "container stats need cgroup v2 at {}",
                self.root.display()
            )));
        }
        let dir = self.dir("");
        if !dir.is_dir() {
            return Err(AgentError::FailedPrecondition(format!(
                "cgroup {} is gone",
                dir.display()
            )));
        }
        // Controllers that are not enabled have no files: their stats stay 0.
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let mut s = api::StatsContainerResponse::new();
        if let Some(t) = read("cpu.stat") {
            let cpu = parse_cpu_stat(&t);
            s.cpu_usage_usec = cpu.usage_usec;
            s.cpu_user_usec = cpu.user_usec;
            s.cpu_system_usec = cpu.system_usec;
        }
        if let Some(t) = read("memory.current") {
            s.memory_usage_bytes = parse_u64_or_max(&t).unwrap_or(0);
        }
        if let Some(t) = read("memory.max") {
            s.memory_limit_bytes = parse_u64_or_max(&t).unwrap_or(0);
        }
        let inactive_file = read("memory.stat")
            .and_then(|t| keyed_value(&t, "inactive_file"))
            .unwrap_or(0);
        s.memory_working_set_bytes = working_set(s.memory_usage_bytes, inactive_file);
        if let Some(t) = read("pids.current") {
            s.pids_current = parse_u64_or_max(&t).unwrap_or(0);
        }
        if let Some(t) = read("pids.max") {
            s.pids_limit = parse_u64_or_max(&t).unwrap_or(0);
        }
        if let Some(t) = read("io.stat") {
            let (r, w) = parse_io_stat(&t);
            s.io_read_bytes = r;
            s.io_write_bytes = w;
        }
        if let Some(t) = read("memory.events") {
            s.oom_kills = keyed_value(&t, "oom_kill").unwrap_or(0);
        }
        s.timestamp_ns = unix_nanos(SystemTime::now());
        Ok(s)
    }
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let text = match std::fs::read_to_string(&procs) {
        Ok(t) => t,
        // The cgroup (or a child) went away while we walked: nothing in it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(AgentError::io(format!("read {}", procs.display()))(e)),
    };
    out.extend(parse_pid_list(&text));
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(AgentError::io(format!("list {}", dir.display()))(e)),
    };
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_pids(&entry.path(), out)?;
        }
    }
    Ok(())
}

/// Unix time in nanoseconds (0 before the epoch, saturating far after it).
pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `cgroup.procs`: one pid a line.
pub fn parse_pid_list(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The value of `key` in a flat keyed file (`key value` lines: cpu.stat, memory.stat,
/// memory.events, v1 memory.oom_control).
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == key).then_some(())?;
        words.next()?.parse().ok()
    })
}

/// A single-value file: a number, or `max` (no limit), which reads as 0.
pub fn parse_u64_or_max(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(0),
        t => t.parse().ok(),
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct CpuStat {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
}

pub fn parse_cpu_stat(text: &str) -> CpuStat {
    CpuStat {
        usage_usec: keyed_value(text, "usage_usec").unwrap_or(0),
        user_usec: keyed_value(text, "user_usec").unwrap_or(0),
        system_usec: keyed_value(text, "system_usec").unwrap_or(0),
    }
}

/// `io.stat`: `MAJ:MIN rbytes=N wbytes=N rios=N ...` a device; bytes summed over devices.
pub fn parse_io_stat(text: &str) -> (u64, u64) {
    let mut read = 0u64;
    let mut write = 0u64;
    for field in text.lines().flat_map(|l| l.split_whitespace().skip(1)) {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        let Ok(v) = v.parse::<u64>() else { continue };
        match k {
            "rbytes" => read = read.saturating_add(v),
            "wbytes" => write = write.saturating_add(v),
            _ => {}
        }
    }
    (read, write)
}

/// What the kubelet calls the working set: usage minus inactive page cache, never < 0.
pub fn working_set(usage: u64, inactive_file: u64) -> u64 {
    usage.saturating_sub(inactive_file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_STAT: &str = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n\
                            nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n";
    const MEMORY_STAT: &str = "anon 1048576\nfile 4096000\nkernel 65536\n\
                               active_file 1000000\ninactive_file 3000000\n";
    const MEMORY_EVENTS: &str = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
    const OOM_CONTROL_V1: &str = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
    const IO_STAT: &str = "8:16 rbytes=1024 wbytes=2048 rios=1 wios=2 dbytes=0 dios=0\n\
                           254:0 rbytes=100 wbytes=0 rios=3 wios=0 dbytes=0 dios=0\n";

    #[test]
    fn flat_keyed_files_parse() {
        assert_eq!(
            parse_cpu_stat(CPU_STAT),
            CpuStat {
                usage_usec: 123456,
                user_usec: 100000,
                system_usec: 23456
            }
        );
        assert_eq!(parse_cpu_stat(""), CpuStat::default());
        assert_eq!(keyed_value(MEMORY_STAT, "inactive_file"), Some(3000000));
        // A key is matched whole: "oom" is not "oom_kill".
        assert_eq!(keyed_value(MEMORY_EVENTS, "oom"), Some(3));
        assert_eq!(keyed_value(MEMORY_EVENTS, "oom_kill"), Some(2));
        assert_eq!(keyed_value(OOM_CONTROL_V1, "oom_kill"), Some(5));
        assert_eq!(keyed_value("oom_kill\noom_kill x\n", "oom_kill"), None);
        assert_eq!(keyed_value(MEMORY_EVENTS, "missing"), None);
    }

    #[test]
    fn single_values_and_max() {
        assert_eq!(parse_u64_or_max("max\n"), Some(0));
        assert_eq!(parse_u64_or_max("536870912\n"), Some(536870912));
        assert_eq!(parse_u64_or_max("garbage"), None);
        assert_eq!(parse_u64_or_max(""), None);
    }

    #[test]
    fn io_stat_sums_devices_and_ignores_junk() {
        assert_eq!(parse_io_stat(IO_STAT), (1124, 2048));
        assert_eq!(parse_io_stat(""), (0, 0));
        assert_eq!(parse_io_stat("8:0 rbytes=x wbytes=5 junk\n"), (0, 5));
    }

    #[test]
    fn working_set_floors_at_zero() {
        assert_eq!(working_set(5000, 3000), 2000);
        assert_eq!(working_set(1000, 3000), 0);
    }

    #[test]
    fn pid_lists_skip_blank_and_bad_lines() {
        assert_eq!(parse_pid_list("1\n23\n\nx\n 4 \n"), vec![1, 23, 4]);
    }

    #[test]
    fn stats_read_a_v2_directory() {
        // A fake hierarchy can't be told from a real one except by statfs; build the
        // struct by hand to read files from a temp dir.
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("cocoon/c1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (name, text) in [
            ("cpu.stat", CPU_STAT),
            ("memory.current", "5000000\n"),
            ("memory.max", "max\n"),
            ("memory.stat", MEMORY_STAT),
            ("memory.events", MEMORY_EVENTS),
            ("pids.current", "3\n"),
            ("pids.max", "100\n"),
            ("io.stat", IO_STAT),
            ("cgroup.procs", "10\n11\n"),
        ] {
            std::fs::write(dir.join(name), text).expect("write");
        }
        std::fs::create_dir(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/cgroup.procs"), "12\n10\n").expect("write");
        let cg = Cgroup {
            root: root.path().to_path_buf(),
            path: "/cocoon/c1".into(),
            v2: true,
        };
        let s = cg.stats().expect("stats");
        assert_eq!(s.cpu_usage_usec, 123456);
        assert_eq!(s.cpu_system_usec, 23456);
        assert_eq!(s.memory_usage_bytes, 5000000);
        assert_eq!(s.memory_limit_bytes, 0);
        assert_eq!(s.memory_working_set_bytes, 2000000);
        assert_eq!((s.pids_current, s.pids_limit), (3, 100));
        assert_eq!((s.io_read_bytes, s.io_write_bytes), (1124, 2048));
        assert_eq!(s.oom_kills, 2);
        assert!(s.timestamp_ns > 0);
        assert_eq!(cg.oom_kills(), Some(2));
        assert_eq!(cg.pids().expect("pids"), vec![10, 11, 12]);

        let gone = Cgroup {
            path: "/cocoon/gone".into(),
            ..cg.clone()
        };
        assert!(gone.stats().is_err());
        assert_eq!(gone.oom_kills(), None);
        assert_eq!(gone.pids().expect("pids"), Vec::<u32>::new());

        let v1 = Cgroup { v2: false, ..cg };
        assert_eq!(
            v1.dir("memory"),
            root.path().join("memory/cocoon/c1"),
            "v1 cgroups live under their controller's hierarchy"
        );
        assert!(matches!(v1.stats(), Err(AgentError::FailedPrecondition(_))));
    }
}
