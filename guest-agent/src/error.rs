//! The agent's error type: every failure names what it was doing and on which object, and
//! maps to the ttrpc status code the host acts on.

use ttrpc::Code;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request itself is wrong (bad id, path, JSON, value).
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} {id:?} already exists")]
    AlreadyExists { what: &'static str, id: String },
    /// The object is in the wrong state for the call (start twice, exec in a stopped
    /// container, stdio stream attached twice).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("timed out {0}")]
    Timeout(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A failure reported by a library or helper as text (libcontainer, netlink).
    #[error("{context}: {message}")]
    Failed { context: String, message: String },
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    /// For `map_err`: wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }

    /// For `map_err`: wraps any displayable error with what was being done.
    pub fn failed<E: std::fmt::Display>(
        context: impl Into<String>,
    ) -> impl FnOnce(E) -> AgentError {
        let context = context.into();
        move |e| AgentError::Failed {
            context,
            message: e.to_string(),
        }
    }

    pub fn not_found(what: &'static str, id: impl Into<String>) -> AgentError {
        AgentError::NotFound {
            what,
            id: id.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            AgentError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            AgentError::NotFound { .. } => Code::NOT_FOUND,
            AgentError::AlreadyExists { .. } => Code::ALREADY_EXISTS,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::Timeout(_) => Code::DEADLINE_EXCEEDED,
            AgentError::Io { .. } | AgentError::Failed { .. } => Code::INTERNAL,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_status_codes_with_context() {
        let e = AgentError::not_found("container", "c1");
        assert_eq!(e.code(), Code::NOT_FOUND);
        let status = match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(status.message, "container \"c1\" not found");
        let io = AgentError::io("mount /dev/vdb on /x")(std::io::Error::from_raw_os_error(2));
        assert_eq!(io.code(), Code::INTERNAL);
        assert!(io.to_string().starts_with("mount /dev/vdb on /x: "));
    }
}
