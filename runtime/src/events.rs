//! Task events the runtime reports (containerd's `/tasks/*` topics), and how the guest
//! agent's events become them.
//!
//! The runtime does not depend on containerd's protobuf types: it hands [`TaskEvent`]s to
//! an [`EventSink`], which the shim implements by publishing to containerd.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cocoon_agent_protocol::api::agent::event::Kind;

use crate::agent::Event;

/// Exit status reported for processes whose VM ended under them.
pub const VM_GONE_EXIT_STATUS: u32 = 255;

/// How far the guest's clock may be off before its exit times are replaced by the
/// host's (the guest has no RTC: a guest that never set its clock reports 1970).
const MAX_GUEST_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// One event for containerd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    Create {
        container_id: String,
        bundle: String,
        stdin: String,
        stdout: String,
        stderr: String,
        terminal: bool,
        pid: u32,
    },
    Start {
        container_id: String,
        pid: u32,
    },
    /// `id` is the exec id, or the container id for its init process.
    Exit {
        container_id: String,
        id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
    Oom {
        container_id: String,
    },
    ExecAdded {
        container_id: String,
        exec_id: String,
    },
    ExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    Delete {
        container_id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
    Paused {
        container_id: String,
    },
    Resumed {
        container_id: String,
    },
}

impl TaskEvent {
    /// containerd's topic for the event.
    pub fn topic(&self) -> &'static str {
        match self {
            TaskEvent::Create { .. } => "/tasks/create",
            TaskEvent::Start { .. } => "/tasks/start",
            TaskEvent::Exit { .. } => "/tasks/exit",
            TaskEvent::Oom { .. } => "/tasks/oom",
            TaskEvent::ExecAdded { .. } => "/tasks/exec-added",
            TaskEvent::ExecStarted { .. } => "/tasks/exec-started",
            TaskEvent::Delete { .. } => "/tasks/delete",
            TaskEvent::Paused { .. } => "/tasks/paused",
            TaskEvent::Resumed { .. } => "/tasks/resumed",
        }
    }
}

/// Where task events go (the shim: containerd's event service).
pub trait EventSink: Send + Sync {
    fn publish(&self, event: TaskEvent);
}

/// A sink that keeps nothing (tests, the operator CLI).
pub struct NullSink;

impl EventSink for NullSink {
    fn publish(&self, _event: TaskEvent) {}
}

/// An agent event, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    Exited {
        container_id: String,
        exec_id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
        oom_killed: bool,
    },
    Oom {
        container_id: String,
    },
}

/// containerd's exit status from the agent's (exit code, or 128 + signal); anything
/// outside 0..=255 (a confused guest) becomes 255.
pub fn exit_status(guest: i32) -> u32 {
    u32::try_from(guest)
        .ok()
        .filter(|s| *s <= 255)
        .unwrap_or(VM_GONE_EXIT_STATUS)
}

/// The exit time to report: the guest's when its clock is plausible, else `host_now`.
pub fn exit_time(guest_ns: i64, host_now: SystemTime) -> SystemTime {
    let Ok(ns) = u64::try_from(guest_ns) else {
        return host_now;
    };
    let guest = UNIX_EPOCH + Duration::from_nanos(ns);
    let skew = match guest.duration_since(host_now) {
        Ok(ahead) => ahead,
        Err(behind) => behind.duration(),
    };
    if skew > MAX_GUEST_CLOCK_SKEW {
        host_now
    } else {
        guest
    }
}

/// Decodes an agent event; `None` for an event without a kind (a newer agent's).
pub fn from_agent(event: &Event, host_now: SystemTime) -> Option<GuestEvent> {
    match event.kind.as_ref()? {
        Kind::Exited(e) => Some(GuestEvent::Exited {
            container_id: e.container_id.clone(),
            exec_id: e.exec_id.clone(),
            pid: e.pid,
            exit_status: exit_status(e.exit_status),
            exited_at: exit_time(e.exited_at_ns, host_now),
            oom_killed: e.oom_killed,
        }),
        Kind::Oom(o) => Some(GuestEvent::Oom {
            container_id: o.container_id.clone(),
        }),
        // A kind a newer agent added.
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_agent_protocol::api::agent::{OomKilled, ProcessExited};

    fn exited(status: i32, at_ns: i64) -> Event {
        Event {
            kind: Some(Kind::Exited(ProcessExited {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                pid: 42,
                exit_status: status,
                exited_at_ns: at_ns,
                oom_killed: true,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn exits_map_with_status_pid_and_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let guest_ns = 1_700_000_001_000_000_000i64;
        assert_eq!(
            from_agent(&exited(137, guest_ns), now),
            Some(GuestEvent::Exited {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                pid: 42,
                exit_status: 137,
                exited_at: UNIX_EPOCH + Duration::from_secs(1_700_000_001),
                oom_killed: true,
            })
        );
        // A guest clock at 1970 is replaced by the host's.
        match from_agent(&exited(0, 5_000_000_000), now) {
            Some(GuestEvent::Exited { exited_at, .. }) => assert_eq!(exited_at, now),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oom_and_unknown_events() {
        let oom = Event {
            kind: Some(Kind::Oom(OomKilled {
                container_id: "c2".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(
            from_agent(&oom, SystemTime::now()),
            Some(GuestEvent::Oom {
                container_id: "c2".into()
            })
        );
        assert_eq!(from_agent(&Event::default(), SystemTime::now()), None);
    }

    #[test]
    fn odd_statuses_and_times() {
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(255), 255);
        assert_eq!(exit_status(-1), 255);
        assert_eq!(exit_status(70000), 255);
        let now = SystemTime::now();
        assert_eq!(exit_time(-5, now), now);
        assert_eq!(exit_time(i64::MAX, now), now);
    }

    #[test]
    fn topics_are_containerds() {
        let e = TaskEvent::ExecStarted {
            container_id: "c".into(),
            exec_id: "e".into(),
            pid: 1,
        };
        assert_eq!(e.topic(), "/tasks/exec-started");
        assert_eq!(
            TaskEvent::Oom {
                container_id: "c".into()
            }
            .topic(),
            "/tasks/oom"
        );
    }
}
