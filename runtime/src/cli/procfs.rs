//! What the CLI reads from `/proc`: a process's RSS, start time and command line, the
//! system uptime, and the cgroup mounts. Parsers are pure; readers are thin.

use std::fs;
use std::path::Path;
use std::time::Duration;

/// `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix("VmRSS:")?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => Some(value),
            Some(_) => None,
        }
    })
}

/// Field 22 (`starttime`, clock ticks after boot) of a `/proc/<pid>/stat` text. The
/// command name (field 2) may hold spaces and parentheses, so fields are counted from
/// the last `)`.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // after_comm starts at field 3 (state); starttime is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The first number of `/proc/uptime` (seconds since boot).
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The value following `flag` in a command line (`--vcpus 2` or `--vcpus=2`).
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == flag {
            return it.next().map(String::as_str);
        }
        if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

/// A NUL-separated `/proc/<pid>/cmdline` as arguments.
pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Which cgroup hierarchies are mounted, from a `/proc/self/mountinfo` text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    /// Mount point of the unified (v2) hierarchy, if any.
    pub v2: Option<String>,
    /// Mount points of v1 hierarchies.
    pub v1: Vec<String>,
}

impl CgroupMounts {
    /// The mode as `cocoon check` reports it.
    pub fn describe(&self) -> String {
        match (&self.v2, self.v1.is_empty()) {
            (Some(p), true) => format!("cgroup v2 (unified) at {p}"),
            (Some(p), false) => {
                format!("hybrid: cgroup v2 at {p}, {} v1 hierarchies", self.v1.len())
            }
            (None, false) => format!("cgroup v1 ({} hierarchies)", self.v1.len()),
            (None, true) => "no cgroup hierarchy mounted".into(),
        }
    }
}

/// Parses `/proc/self/mountinfo`: fields, then ` - `, then the filesystem type.
pub fn parse_cgroup_mounts(mountinfo: &str) -> CgroupMounts {
    let mut mounts = CgroupMounts::default();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split_whitespace().nth(4) else {
            continue;
        };
        match right.split_whitespace().next() {
            Some("cgroup2") if mounts.v2.is_none() => mounts.v2 = Some(point.to_string()),
            Some("cgroup") => mounts.v1.push(point.to_string()),
            _ => {}
        }
    }
    mounts
}

/// The RSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    parse_vm_rss_kib(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The command line of `pid`.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|raw| parse_cmdline(&raw))
}

/// How long `pid` has been running.
pub fn process_age(pid: u32) -> Option<Duration> {
    let start_ticks =
        parse_stat_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let uptime = parse_uptime(&fs::read_to_string("/proc/uptime").ok()?)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    let started = start_ticks as f64 / hz as f64;
    Some(Duration::from_secs_f64((uptime - started).max(0.0)))
}

/// The pids of all processes (numeric entries of `/proc`).
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// `/proc/self/mountinfo`'s cgroup mounts.
pub fn cgroup_mounts() -> CgroupMounts {
    parse_cgroup_mounts(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// Whether `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `program` found in `$PATH` (and the sbin directories, which root's tools live in
/// even when a user's PATH lacks them).
pub fn find_in_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(Into::into))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_in_kib() {
        let status =
            "Name:\tcocoon-vmm\nVmPeak:\t  300000 kB\nVmRSS:\t   41236 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss_kib(status), Some(41236));
        assert_eq!(parse_vm_rss_kib("Name:\tkthreadd\n"), None);
        assert_eq!(parse_vm_rss_kib("VmRSS:\t 12 MB\n"), None);
        assert_eq!(parse_vm_rss_kib("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn start_time_skips_odd_command_names() {
        let mut fields: Vec<String> = (3..=30).map(|n| n.to_string()).collect();
        fields[22 - 3] = "987654".into();
        let stat = format!("1234 (we ird) (name)) {}", fields.join(" "));
        assert_eq!(parse_stat_start_time(&stat), Some(987654));
        assert_eq!(parse_stat_start_time("1234 (x) S 1"), None);
        assert_eq!(parse_stat_start_time("garbage"), None);
    }

    #[test]
    fn uptime_and_flags() {
        assert_eq!(parse_uptime("12345.67 54321.00\n"), Some(12345.67));
        assert_eq!(parse_uptime(""), None);
        let args = parse_cmdline(b"cocoon-vmm\0--vcpus\x002\0--memory-mib=512\0--vcpus-x\0");
        assert_eq!(flag_value(&args, "--vcpus"), Some("2"));
        assert_eq!(flag_value(&args, "--memory-mib"), Some("512"));
        assert_eq!(flag_value(&args, "--kernel"), None);
    }

    #[test]
    fn cgroup_modes_from_mountinfo() {
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n\
                  22 1 8:1 / / rw - ext4 /dev/sda1 rw\n";
        let m = parse_cgroup_mounts(v2);
        assert_eq!(m.v2.as_deref(), Some("/sys/fs/cgroup"));
        assert!(m.v1.is_empty());
        assert!(m.describe().contains("v2"), "{}", m.describe());
        let v1 = "31 25 0:27 / /sys/fs/cgroup/memory rw shared:9 - cgroup cgroup rw,memory\n\
                  32 25 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        let m = parse_cgroup_mounts(v1);
        assert_eq!(m.v2, None);
        assert_eq!(m.v1.len(), 2);
        assert!(m.describe().starts_with("cgroup v1"));
        assert_eq!(
            parse_cgroup_mounts("").describe(),
            "no cgroup hierarchy mounted"
        );
    }

    #[test]
    fn this_process_is_readable() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|k| k > 0));
        assert!(process_age(pid).is_some());
        assert!(cmdline(pid).is_some_and(|a| !a.is_empty()));
        assert!(all_pids().contains(&pid));
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("no-such-program-cocoon").is_none());
    }
}
