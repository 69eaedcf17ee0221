//! The one error type of LabLink: a [`ErrorKind`] that says what went wrong and an
//! [`ErrorStatus`] that says whether trying again can help.
//!
//! Backends keep their own private error enums and classify native errors into this type in
//! one function each (for example a PostgreSQL serialization failure becomes
//! [`ErrorKind::Conflict`] + [`ErrorStatus::Temporary`]). Retrying is the job of a wrapper such
//! as [`RetryProvisioner`](crate::RetryProvisioner), never of a backend.

use std::fmt;

/// What went wrong, independent of the backend that noticed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A value supplied by a caller is malformed (hostname, email, command, count...).
    InvalidInput,
    /// The configuration of a component is wrong or incomplete.
    InvalidConfig,
    /// The VM, operation or instance does not exist.
    NotFound,
    /// Something else changed the same thing first (stale generation, operation already running).
    Conflict,
    /// The event is not allowed in the VM's current state.
    InvalidTransition,
    /// No VM is free to assign, or the cloud has no capacity for a launch.
    NoCapacity,
    /// The caller did not prove who it is.
    Unauthenticated,
    /// The caller is known but may not do this.
    PermissionDenied,
    /// The operation did not finish within its deadline.
    Timeout,
    /// A backend (database, cloud API, binary) could not be reached or is not installed.
    Unavailable,
    /// The provider (Terraform, EC2, a local process) reported a failure.
    Provider,
    /// A bug or an unexpected condition inside LabLink.
    Internal,
}

impl ErrorKind {
    /// A short, stable, lower-case name, used in messages and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid input",
            Self::InvalidConfig => "invalid config",
            Self::NotFound => "not found",
            Self::Conflict => "conflict",
            Self::InvalidTransition => "invalid transition",
            Self::NoCapacity => "no capacity",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission denied",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Provider => "provider error",
            Self::Internal => "internal error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an operation that failed may succeed if tried again (the OpenDAL model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorStatus {
    /// Trying again will fail the same way.
    Permanent,
    /// Trying again (after a backoff) may succeed.
    Temporary,
    /// It was retried and kept failing; do not retry again.
    Persistent,
}

/// The error returned by every LabLink trait and operation.
///
/// Messages never contain secrets: CRD commands, PINs and tokens are newtypes whose `Display`
/// is redacted, and no constructor here formats a secret.
pub struct Error {
    kind: ErrorKind,
    status: ErrorStatus,
    operation: &'static str,
    message: String,
    context: Vec<(&'static str, String)>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a human message. The status is `Temporary` for
    /// [`ErrorKind::Unavailable`] and [`ErrorKind::Timeout`], `Permanent` otherwise; change it
    /// with [`Error::temporary`] / [`Error::permanent`].
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let status = match kind {
            ErrorKind::Unavailable | ErrorKind::Timeout => ErrorStatus::Temporary,
            _ => ErrorStatus::Permanent,
        };
        Self {
            kind,
            status,
            operation: "",
            message: message.into(),
            context: Vec::new(),
            source: None,
        }
    }

    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Shorthand for [`ErrorKind::Conflict`].
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    /// Shorthand for [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Names the operation that failed (`"claim"`, `"launch"`, `"terraform apply"`...).
    pub fn with_operation(mut self, operation: &'static str) -> Self {
        self.operation = operation;
        self
    }

    /// Adds a key/value pair of context (`hostname`, `instance_id`, `request_id`...).
    /// Never pass a secret here.
    pub fn with_context(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Marks the error as worth retrying.
    pub fn temporary(mut self) -> Self {
        self.status = ErrorStatus::Temporary;
        self
    }

    /// Marks the error as not worth retrying.
    pub fn permanent(mut self) -> Self {
        self.status = ErrorStatus::Permanent;
        self
    }

    /// Marks a temporary error as one that kept failing after retries.
    pub fn persistent(mut self) -> Self {
        if self.status == ErrorStatus::Temporary {
            self.status = ErrorStatus::Persistent;
        }
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying may help.
    pub fn status(&self) -> ErrorStatus {
        self.status
    }

    /// The operation that failed, or `""`.
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// The human message, without operation or context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The key/value context.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }

    /// `true` when the status is [`ErrorStatus::Temporary`].
    pub fn is_retryable(&self) -> bool {
        self.status == ErrorStatus::Temporary
    }

    /// `true` for [`ErrorKind::NotFound`].
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// `true` for [`ErrorKind::Conflict`].
    pub fn is_conflict(&self) -> bool {
        self.kind == ErrorKind::Conflict
    }

    /// `true` for [`ErrorKind::NoCapacity`].
    pub fn is_no_capacity(&self) -> bool {
        self.kind == ErrorKind::NoCapacity
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.operation.is_empty() {
            write!(f, "{}: ", self.operation)?;
        }
        write!(f, "{}", self.message)?;
        if !self.context.is_empty() {
            f.write_str(" (")?;
            for (i, (k, v)) in self.context.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{k}: {v}")?;
            }
            f.write_str(")")?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("operation", &self.operation)
            .field("message", &self.message)
            .field("context", &self.context)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_operation_message_context_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = Error::new(ErrorKind::Unavailable, "terraform is not installed")
            .with_operation("launch")
            .with_context("binary", "terraform")
            .with_source(io);
        assert_eq!(
            err.to_string(),
            "launch: terraform is not installed (binary: terraform): no such file"
        );
        assert!(err.is_retryable());
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn status_follows_kind_and_can_be_overridden() {
        assert!(!Error::not_found("x").is_retryable());
        assert!(Error::new(ErrorKind::Timeout, "x").is_retryable());
        assert!(Error::conflict("x").temporary().is_retryable());
        let persistent = Error::new(ErrorKind::Unavailable, "x").persistent();
        assert_eq!(persistent.status(), ErrorStatus::Persistent);
        assert!(!persistent.is_retryable());
        assert_eq!(
            Error::not_found("x").persistent().status(),
            ErrorStatus::Permanent
        );
    }
}
