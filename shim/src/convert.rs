//! Conversions between containerd's protobuf messages and the runtime's types.

use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim::protos::ttrpc;
use containerd_shim::protos::types::task::Status as PbStatus;

use cocoon_runtime::error::chain;
use cocoon_runtime::events::TaskEvent;
use cocoon_runtime::task::{ErrorCode, Stats, Status, TaskError};

/// containerd's type URL for cgroup v2 metrics.
pub const METRICS_V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

pub fn status(s: Status) -> PbStatus {
    match s {
        Status::Created => PbStatus::CREATED,
        Status::Running => PbStatus::RUNNING,
        Status::Paused => PbStatus::PAUSED,
        Status::Stopped => PbStatus::STOPPED,
    }
}

/// A runtime error as the ttrpc status containerd's `errdefs` understands.
pub fn error(e: TaskError) -> ttrpc::Error {
    let code = match e.code() {
        ErrorCode::NotFound => ttrpc::Code::NOT_FOUND,
        ErrorCode::AlreadyExists => ttrpc::Code::ALREADY_EXISTS,
        ErrorCode::FailedPrecondition => ttrpc::Code::FAILED_PRECONDITION,
        ErrorCode::InvalidArgument => ttrpc::Code::INVALID_ARGUMENT,
        ErrorCode::Unimplemented => ttrpc::Code::UNIMPLEMENTED,
        ErrorCode::DeadlineExceeded => ttrpc::Code::DEADLINE_EXCEEDED,
        ErrorCode::Unavailable => ttrpc::Code::UNAVAILABLE,
        ErrorCode::Internal => ttrpc::Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, chain(&e)))
}

/// A runtime event as the protobuf message containerd expects under its topic.
pub fn event(e: &TaskEvent) -> Box<dyn MessageDyn> {
    match e.clone() {
        TaskEvent::Create {
            container_id,
            bundle,
            stdin,
            stdout,
            stderr,
            terminal,
            pid,
        } => Box::new(ev::TaskCreate {
            container_id,
            bundle,
            io: MessageField::some(ev::TaskIO {
                stdin,
                stdout,
                stderr,
                terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        }),
        TaskEvent::Start { container_id, pid } => Box::new(ev::TaskStart {
            container_id,
            pid,
            ..Default::default()
        }),
        TaskEvent::Exit {
            container_id,
            id,
            pid,
            exit_status,
            exited_at,
        } => Box::new(ev::TaskExit {
            container_id,
            id,
            pid,
            exit_status,
            exited_at: MessageField::some(timestamp(exited_at)),
            ..Default::default()
        }),
        TaskEvent::Oom { container_id } => Box::new(ev::TaskOOM {
            container_id,
            ..Default::default()
        }),
        TaskEvent::ExecAdded {
            container_id,
            exec_id,
        } => Box::new(ev::TaskExecAdded {
            container_id,
            exec_id,
            ..Default::default()
        }),
        TaskEvent::ExecStarted {
            container_id,
            exec_id,
            pid,
        } => Box::new(ev::TaskExecStarted {
            container_id,
            exec_id,
            pid,
            ..Default::default()
        }),
        TaskEvent::Delete {
            container_id,
            pid,
            exit_status,
            exited_at,
        } => Box::new(ev::TaskDelete {
            container_id: container_id.clone(),
            id: container_id,
            pid,
            exit_status,
            exited_at: MessageField::some(timestamp(exited_at)),
            ..Default::default()
        }),
        TaskEvent::Paused { container_id } => Box::new(ev::TaskPaused {
            container_id,
            ..Default::default()
        }),
        TaskEvent::Resumed { container_id } => Box::new(ev::TaskResumed {
            container_id,
            ..Default::default()
        }),
    }
}

/// Stats as cgroup v2 metrics (what containerd's CRI reads for containers).
pub fn metrics(s: &Stats) -> v2::Metrics {
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            // CRI computes the working set as usage - inactive_file.
            inactive_file: s
                .memory_usage_bytes
                .saturating_sub(s.memory_working_set_bytes),
            ..Default::default()
        }),
        memory_events: MessageField::some(v2::MemoryEvents {
            oom_kill: s.oom_kills,
            ..Default::default()
        }),
        io: MessageField::some(v2::IOStat {
            usage: vec![v2::IOEntry {
                rbytes: s.io_read_bytes,
                wbytes: s.io_write_bytes,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Packs metrics into the Any containerd's Stats response carries.
pub fn metrics_any(s: &Stats) -> Result<Any, String> {
    let value = metrics(s)
        .write_to_bytes()
        .map_err(|e| format!("encoding metrics: {e}"))?;
    Ok(Any {
        type_url: METRICS_V2_TYPE_URL.into(),
        value,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exit_event_carries_status_pid_and_time() {
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let e = event(&TaskEvent::Exit {
            container_id: "c".into(),
            id: "e".into(),
            pid: 7,
            exit_status: 137,
            exited_at: at,
        });
        let bytes = e.write_to_bytes_dyn().expect("encode");
        let back = ev::TaskExit::parse_from_bytes(&bytes).expect("decode");
        assert_eq!(back.container_id, "c");
        assert_eq!(back.id, "e");
        assert_eq!(back.pid, 7);
        assert_eq!(back.exit_status, 137);
        assert_eq!(back.exited_at.seconds, 1_700_000_000);
        assert_eq!(back.exited_at.nanos, 5);
        assert_eq!(e.descriptor_dyn().full_name(), "containerd.events.TaskExit");
    }

    #[test]
    fn every_event_has_its_message() {
        let now = SystemTime::now();
        for (e, name) in [
            (
                TaskEvent::Oom {
                    container_id: "c".into(),
                },
                "containerd.events.TaskOOM",
            ),
            (
                TaskEvent::ExecAdded {
                    container_id: "c".into(),
                    exec_id: "e".into(),
                },
                "containerd.events.TaskExecAdded",
            ),
            (
                TaskEvent::Delete {
                    container_id: "c".into(),
                    pid: 1,
                    exit_status: 0,
                    exited_at: now,
                },
                "containerd.events.TaskDelete",
            ),
        ] {
            assert_eq!(event(&e).descriptor_dyn().full_name(), name);
        }
    }

    #[test]
    fn errors_keep_their_codes_and_messages() {
        match error(TaskError::NotFound("container x not found".into())) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
                assert_eq!(s.message(), "container x not found");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn metrics_round_trip() {
        let s = Stats {
            memory_usage_bytes: 100,
            memory_working_set_bytes: 60,
            cpu_usage_usec: 5,
            ..Stats::default()
        };
        let any = metrics_any(&s).expect("any");
        assert_eq!(any.type_url, METRICS_V2_TYPE_URL);
        let m = v2::Metrics::parse_from_bytes(&any.value).expect("decode");
        assert_eq!(m.memory.usage, 100);
        assert_eq!(m.memory.inactive_file, 40);
        assert_eq!(m.cpu.usage_usec, 5);
        assert_eq!(status(Status::Paused), PbStatus::PAUSED);
    }
}
