//! The Task API's errors, each with the status code containerd understands.

use crate::agent::{AgentError, Code};
use crate::files::CopyError;
use crate::spec::SpecError;
use crate::stdio::StdioError;

/// The gRPC/ttrpc status class of an error (containerd's `errdefs` read these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unimplemented,
    DeadlineExceeded,
    Unavailable,
    Internal,
}

/// Why a Task API call failed. Every message names the sandbox, container or mount.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("sandbox {sandbox}: the VM has ended ({reason})")]
    VmEnded { sandbox: String, reason: String },
    #[error("{context}")]
    Runtime {
        context: String,
        #[source]
        source: crate::error::Error,
    },
    #[error("{context}")]
    Agent {
        context: String,
        #[source]
        source: AgentError,
    },
    #[error("container {container}")]
    Spec {
        container: String,
        #[source]
        source: Box<SpecError>,
    },
    #[error("container {container}")]
    Copy {
        container: String,
        #[source]
        source: Box<CopyError>,
    },
    #[error("{context}")]
    Stdio {
        context: String,
        #[source]
        source: StdioError,
    },
}

impl TaskError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TaskError::NotFound(_) => ErrorCode::NotFound,
            TaskError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            TaskError::FailedPrecondition(_) | TaskError::VmEnded { .. } => {
                ErrorCode::FailedPrecondition
            }
            TaskError::InvalidArgument(_) | TaskError::Spec { .. } => ErrorCode::InvalidArgument,
            TaskError::Unimplemented(_) => ErrorCode::Unimplemented,
            TaskError::Runtime { source, .. } => match source {
                crate::error::Error::Config { .. }
                | crate::error::Error::Annotation { .. }
                | crate::error::Error::VmSize(_)
                | crate::error::Error::Size { .. }
                | crate::error::Error::Slots(_) => ErrorCode::FailedPrecondition,
                _ => ErrorCode::Internal,
            },
            TaskError::Agent { source, .. } => agent_code(source),
            TaskError::Copy { .. } => ErrorCode::Internal,
            TaskError::Stdio { source, .. } => match source {
                StdioError::Path { .. } => ErrorCode::InvalidArgument,
                StdioError::Agent(e) => agent_code(e),
            },
        }
    }

    pub fn runtime(context: impl Into<String>) -> impl FnOnce(crate::error::Error) -> TaskError {
        let context = context.into();
        move |source| TaskError::Runtime { context, source }
    }

    pub fn agent(context: impl Into<String>) -> impl FnOnce(AgentError) -> TaskError {
        let context = context.into();
        move |source| TaskError::Agent { context, source }
    }
}

fn agent_code(e: &AgentError) -> ErrorCode {
    match e.code() {
        Some(Code::NOT_FOUND) => ErrorCode::NotFound,
        Some(Code::ALREADY_EXISTS) => ErrorCode::AlreadyExists,
        Some(Code::FAILED_PRECONDITION) => ErrorCode::FailedPrecondition,
        Some(Code::INVALID_ARGUMENT) => ErrorCode::InvalidArgument,
        Some(Code::UNIMPLEMENTED) => ErrorCode::Unimplemented,
        Some(Code::DEADLINE_EXCEEDED) => ErrorCode::DeadlineExceeded,
        Some(_) => ErrorCode::Internal,
        None => match e {
            AgentError::Timeout { .. } => ErrorCode::DeadlineExceeded,
            _ => ErrorCode::Unavailable,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(TaskError::NotFound("x".into()).code(), ErrorCode::NotFound);
        assert_eq!(
            TaskError::VmEnded {
                sandbox: "s".into(),
                reason: "r".into()
            }
            .code(),
            ErrorCode::FailedPrecondition
        );
        let e = TaskError::Agent {
            context: "kill".into(),
            source: AgentError::Status {
                call: "SignalProcess",
                code: Code::NOT_FOUND,
                message: "no such process".into(),
            },
        };
        assert_eq!(e.code(), ErrorCode::NotFound);
        assert!(crate::error::chain(&e).contains("no such process"));
        let e = TaskError::Runtime {
            context: "c".into(),
            source: crate::error::Error::Slots("full".into()),
        };
        assert_eq!(e.code(), ErrorCode::FailedPrecondition);
    }
}
