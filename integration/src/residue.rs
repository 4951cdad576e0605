//! What a pod leaves behind on the host: processes, network namespaces and their links and
//! tc state, mounts, cgroups and files under the directories a runtime writes to. A
//! [`Snapshot`] before a pod and one after it is stopped and removed must match.
//!
//! Only state that can belong to the runtime under test is recorded, so that other work
//! on the same host does not show up: processes that descend from a process whose command
//! line names the private containerd's directory (its shims, their children), namespaces
//! and mounts, and files under the watched directories.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One process from `/proc`.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    /// `comm` (the first 15 bytes of the executable's name).
    pub comm: String,
    /// The command line, arguments joined by spaces.
    pub cmdline: String,
}

/// Every process on the host (those that vanish while being read are left out).
pub fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.push(Proc {
            pid,
            ppid,
            comm,
            cmdline,
        });
    }
    out
}

/// The processes whose command line contains `needle`, and all their descendants,
/// leaving out `except` (the private containerd itself) but not its descendants.
pub fn processes_of(needle: &str, except: Option<u32>) -> Vec<Proc> {
    let all = processes();
    let mut children: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (i, p) in all.iter().enumerate() {
        children.entry(p.ppid).or_default().push(i);
    }
    let mut picked = BTreeSet::new();
    let mut stack: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, p)| p.cmdline.contains(needle))
        .map(|(i, _)| i)
        .collect();
    while let Some(i) = stack.pop() {
        if picked.insert(i) {
            stack.extend(children.get(&all[i].pid).into_iter().flatten().copied());
        }
    }
    let except = except.and_then(|p| i32::try_from(p).ok());
    picked
        .into_iter()
        .map(|i| all[i].clone())
        .filter(|p| Some(p.pid) != except && p.pid != std::process::id() as i32)
        .collect()
}

/// What to look at.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Processes: those whose command line contains this (and their descendants).
    pub process_needle: String,
    /// The private containerd's pid: long-lived, not residue.
    pub daemon_pid: Option<u32>,
    /// Directories whose files are listed (recursively; missing ones are empty).
    pub dirs: Vec<PathBuf>,
    /// cgroup directories whose sub-directories are listed.
    pub cgroups: Vec<PathBuf>,
}

/// The recorded state; each entry is one line, so a diff names what is left.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub processes: BTreeSet<String>,
    /// `netns` names, `<netns>: link <name>` and `<netns>: tc <line>`.
    pub network: BTreeSet<String>,
    pub mounts: BTreeSet<String>,
    pub cgroups: BTreeSet<String>,
    pub files: BTreeSet<String>,
}

fn run_lines(cmd: &str, args: &[&str]) -> Vec<String> {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Network namespaces named under /run/netns.
pub fn netns_names() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `args` with `-n NS` in front when `ns` names a namespace (`ip` and `tc` both take it).
fn in_ns<'a>(ns: &'a Option<String>, args: &[&'a str]) -> Vec<&'a str> {
    let mut a = Vec::new();
    if let Some(n) = ns {
        a.extend(["-n", n.as_str()]);
    }
    a.extend_from_slice(args);
    a
}

fn network_state() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut spaces: Vec<Option<String>> = vec![None];
    for ns in netns_names() {
        out.insert(format!("netns {ns}"));
        spaces.push(Some(ns));
    }
    for ns in &spaces {
        let label = ns.as_deref().unwrap_or("host");
        for l in run_lines("ip", &in_ns(ns, &["-o", "link", "show"])) {
            // `N: name@peer: <FLAGS> ...`: the name identifies the link; counters,
            // flags and peer indexes change with traffic and carrier.
            if let Some(name) = l.split(": ").nth(1) {
                let name = name.split('@').next().unwrap_or(name);
                out.insert(format!("{label}: link {name}"));
            }
        }
        for l in run_lines("tc", &in_ns(ns, &["qdisc", "show"])) {
            out.insert(format!("{label}: tc qdisc {}", l.trim()));
        }
        // Filters are per device and parent: those on ingress qdiscs, where a
        // TAP<->veth redirect hangs.
        for dev in ingress_devices(ns) {
            for l in run_lines(
                "tc",
                &in_ns(ns, &["filter", "show", "dev", &dev, "ingress"]),
            ) {
                out.insert(format!("{label}: tc filter {dev} {}", l.trim()));
            }
        }
    }
    out
}

fn ingress_devices(ns: &Option<String>) -> Vec<String> {
    run_lines("tc", &in_ns(ns, &["qdisc", "show", "ingress"]))
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            while let Some(x) = w.next() {
                if x == "dev" {
                    return w.next().map(str::to_string);
                }
            }
            None
        })
        .collect()
}

fn mounts() -> BTreeSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            // Field 5 is the mount point; after " - " come the type and source.
            let point = l.split(' ').nth(4)?;
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?;
            Some(format!("{point} ({fstype})"))
        })
        .collect()
}

fn walk(dir: &Path, out: &mut BTreeSet<String>, depth: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        out.insert(p.display().to_string());
        // Only real directories: never follow symlinks or walk into mounted
        // container root filesystems' contents past a sane depth.
        if depth < 12 && e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&p, out, depth + 1);
        }
    }
}

fn cgroup_dirs(roots: &[PathBuf]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for r in roots {
        let Ok(rd) = std::fs::read_dir(r) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.insert(e.path().display().to_string());
            }
        }
    }
    out
}

impl Snapshot {
    pub fn take(scope: &Scope) -> Snapshot {
        let processes = processes_of(&scope.process_needle, scope.daemon_pid)
            .into_iter()
            .map(|p| format!("{} {} [{}]", p.pid, p.comm, p.cmdline))
            .collect();
        let mut files = BTreeSet::new();
        for d in &scope.dirs {
            walk(d, &mut files, 0);
        }
        Snapshot {
            processes,
            network: network_state(),
            mounts: mounts(),
            cgroups: cgroup_dirs(&scope.cgroups),
            files,
        }
    }

    /// What `self` (after) has that `before` had not, per kind; empty when nothing is left.
    pub fn left_over(&self, before: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        let kinds = [
            ("process", &self.processes, &before.processes),
            ("network", &self.network, &before.network),
            ("mount", &self.mounts, &before.mounts),
            ("cgroup", &self.cgroups, &before.cgroups),
            ("file", &self.files, &before.files),
        ];
        for (kind, after, before) in kinds {
            for x in after.difference(before) {
                out.push(format!("{kind}: {x}"));
            }
        }
        out
    }

    /// Takes snapshots until nothing is left over compared with `before` or `timeout`
    /// passes (some cleanup, such as containerd's snapshot garbage collection, is
    /// asynchronous); returns what is still left.
    pub fn settle(before: &Snapshot, scope: &Scope, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = Snapshot::take(scope).left_over(before);
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_over_lists_only_additions() {
        let mut before = Snapshot::default();
        before.files.insert("/a".into());
        before.mounts.insert("/m (tmpfs)".into());
        let mut after = before.clone();
        after.files.remove("/a");
        after.files.insert("/b".into());
        assert_eq!(after.left_over(&before), vec!["file: /b".to_string()]);
    }

    #[test]
    fn this_process_is_seen_but_never_its_own_residue() {
        let me = std::process::id() as i32;
        assert!(processes().iter().any(|p| p.pid == me));
        let exe = std::env::current_exe().expect("current_exe");
        let needle = exe.display().to_string();
        assert!(processes_of(&needle, None).iter().all(|p| p.pid != me));
    }
}
