//! `Stats`: a container's cgroup figures from the agent; the sandbox's from the VMM
//! (the host memory the whole VM uses).

use vmm_api::control::Stats as VmmStats;

use super::{Service, TaskError};

/// Resource usage, in the units containerd's cgroup metrics use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_usage_bytes: u64,
    /// 0: no limit.
    pub memory_limit_bytes: u64,
    pub memory_working_set_bytes: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub oom_kills: u64,
}

/// The sandbox's figures from the VMM's stats.
pub fn from_vmm_stats(stats: &VmmStats) -> Stats {
    let used = stats
        .vmm_rss_kib
        .saturating_add(stats.guest_touched_kib)
        .saturating_mul(1024);
    Stats {
        memory_usage_bytes: used,
        memory_working_set_bytes: used,
        memory_limit_bytes: stats.memory_mib.saturating_mul(1 << 20),
        ..Stats::default()
    }
}

impl Service {
    pub fn stats(&self, id: &str) -> Result<Stats, TaskError> {
        let container = self.container(id)?;
        let pod = self.running_pod()?;
        if container.is_sandbox {
            return Ok(from_vmm_stats(&pod.vmm_stats()?));
        }
        let s = pod
            .agent
            .stats_container(id)
            .map_err(TaskError::agent(format!("container {id}: StatsContainer")))?;
        Ok(Stats {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            memory_usage_bytes: s.memory_usage_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            memory_working_set_bytes: s.memory_working_set_bytes,
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            io_read_bytes: s.io_read_bytes,
            io_write_bytes: s.io_write_bytes,
            oom_kills: s.oom_kills,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_stats_become_memory_figures() {
        let s = from_vmm_stats(&VmmStats {
            vcpus: 1,
            memory_mib: 256,
            paused: false,
            vmm_rss_kib: 1000,
            guest_touched_kib: 24000,
            free_page_reported_kib: 0,
            free_page_reports: 0,
            slots: Vec::new(),
        });
        assert_eq!(s.memory_usage_bytes, 25000 * 1024);
        assert_eq!(s.memory_working_set_bytes, 25000 * 1024);
        assert_eq!(s.memory_limit_bytes, 256 << 20);
    }
}
