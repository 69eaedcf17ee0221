//! The crate's private error type and the one function that classifies PostgreSQL and sqlx
//! errors into [`lablink_core::Error`].

use lablink_core::{Error, ErrorKind};

/// What can go wrong inside this crate, before classification.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    /// sqlx or PostgreSQL reported an error.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// A stored value cannot be turned back into a domain value (a bug or a hand edit).
    #[error("column {column} holds a value LabLink cannot read: {reason}")]
    Corrupt {
        /// The column.
        column: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A domain value does not fit its column.
    #[error("{what} ({value}) does not fit its PostgreSQL column")]
    OutOfRange {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

/// What PostgreSQL reported, without its `DETAIL`, `HINT` and `WHERE`: for a failed CHECK
/// the detail is the whole row ("Failing row contains (...)"), Chrome Remote Desktop command
/// and PIN included, and an error's source ends up in debug output and logs.
#[derive(Debug, thiserror::Error)]
#[error("{message} (SQLSTATE {code})")]
pub(crate) struct DatabaseFailure {
    code: String,
    constraint: Option<String>,
    message: String,
}

impl From<&dyn sqlx::error::DatabaseError> for DatabaseFailure {
    fn from(db: &dyn sqlx::error::DatabaseError) -> Self {
        Self {
            code: db.code().map(|c| c.into_owned()).unwrap_or_default(),
            constraint: db.constraint().map(str::to_owned),
            message: db.message().to_owned(),
        }
    }
}

/// Classifies `error` (raised while doing `operation`) into a LabLink error with a kind and a
/// retry status. This is the only place where sqlx/PostgreSQL errors are interpreted.
///
/// | error | kind | status |
/// |---|---|---|
/// | serialization failure `40001`, deadlock `40P01`, lock not available `55P03` | `Conflict` | temporary |
/// | unique violation `23505` | `Conflict` | permanent |
/// | foreign key violation `23503` | `NotFound` | permanent |
/// | other integrity / data exceptions (`23xxx`, `22xxx`) | `InvalidInput` | permanent |
/// | connection exceptions `08xxx`, shutdown `57P01`–`57P03`, too many connections `53300`, other `53xxx` | `Unavailable` | temporary |
/// | query canceled `57014` | `Timeout` | temporary |
/// | undefined table/column `42P01`/`42703`, bad credentials `28xxx`, unknown database `3D000` | `InvalidConfig` | permanent |
/// | I/O, TLS, pool timeout, crashed worker, protocol error (broken connection) | `Unavailable` | temporary |
/// | pool closed | `Unavailable` | permanent |
/// | no row | `NotFound` | permanent |
/// | bad connection options | `InvalidConfig` | permanent |
/// | decoding problems, corrupt rows, anything else | `Internal` | permanent |
pub(crate) fn classify(operation: &'static str, error: impl Into<PgError>) -> Error {
    let error = error.into();
    use ErrorKind as K;
    let (kind, temporary, message): (ErrorKind, bool, &str) = match &error {
        PgError::Sqlx(e) => match e {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                classify_sqlstate(&code)
            }
            sqlx::Error::RowNotFound => (K::NotFound, false, "not found"),
            sqlx::Error::PoolTimedOut => (
                K::Unavailable,
                true,
                "no database connection became available in time",
            ),
            sqlx::Error::PoolClosed => (K::Unavailable, false, "the database pool is closed"),
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => {
                (K::Unavailable, true, "the database cannot be reached")
            }
            sqlx::Error::Protocol(_) | sqlx::Error::BeginFailed => {
                (K::Unavailable, true, "the database connection broke")
            }
            sqlx::Error::Configuration(_) => (
                K::InvalidConfig,
                false,
                "the database connection options are invalid",
            ),
            sqlx::Error::Migrate(_) => (
                K::InvalidConfig,
                false,
                "the database schema does not match this version of LabLink",
            ),
            _ => (K::Internal, false, "unexpected database error"),
        },
        PgError::Corrupt { .. } => (K::Internal, false, "a stored VM record is unreadable"),
        PgError::OutOfRange { .. } => (K::InvalidInput, false, "a value is out of range"),
    };
    let classified = Error::new(kind, message).with_operation(operation);
    let error = match error {
        PgError::Sqlx(sqlx::Error::Database(db)) => {
            classified.with_source(DatabaseFailure::from(db.as_ref()))
        }
        other => classified.with_source(other),
    };
    if temporary {
        error.temporary()
    } else {
        error.permanent()
    }
}

/// Kind, retry status and message for a PostgreSQL SQLSTATE.
fn classify_sqlstate(code: &str) -> (ErrorKind, bool, &'static str) {
    use ErrorKind as K;
    match code {
        "40001" => (
            K::Conflict,
            true,
            "a concurrent transaction interfered; try again",
        ),
        "40P01" => (K::Conflict, true, "a deadlock was detected; try again"),
        "55P03" => (
            K::Conflict,
            true,
            "the row is locked by someone else; try again",
        ),
        "23505" => (K::Conflict, false, "this conflicts with an existing record"),
        "23503" => (K::NotFound, false, "the record it refers to does not exist"),
        "57014" => (K::Timeout, true, "the statement was canceled (timeout)"),
        "42P01" | "42703" => (
            K::InvalidConfig,
            false,
            "the LabLink tables are missing or outdated; run lablink_postgres::setup()",
        ),
        "3D000" => (K::InvalidConfig, false, "the database does not exist"),
        "57P01" | "57P02" | "57P03" => (
            K::Unavailable,
            true,
            "the database is shutting down or starting",
        ),
        c if c.starts_with("08") => (K::Unavailable, true, "the database connection failed"),
        c if c.starts_with("53") => (K::Unavailable, true, "the database is out of resources"),
        c if c.starts_with("28") => (
            K::InvalidConfig,
            false,
            "the database rejected the credentials",
        ),
        c if c.starts_with("23") || c.starts_with("22") => {
            (K::InvalidInput, false, "the database rejected a value")
        }
        _ => (K::Internal, false, "unexpected database error"),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use lablink_core::ErrorKind;

    use super::*;
    use lablink_core::error::ErrorStatus;

    /// A database error with a chosen SQLSTATE, as PostgreSQL would report it.
    #[derive(Debug)]
    struct FakeDbError(&'static str);

    impl std::fmt::Display for FakeDbError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "sqlstate {}", self.0)
        }
    }

    impl std::error::Error for FakeDbError {}

    impl sqlx::error::DatabaseError for FakeDbError {
        fn message(&self) -> &str {
            "fake"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn db(code: &'static str) -> PgError {
        PgError::Sqlx(sqlx::Error::Database(Box::new(FakeDbError(code))))
    }

    fn io(kind: std::io::ErrorKind) -> PgError {
        PgError::Sqlx(sqlx::Error::Io(std::io::Error::new(kind, "io")))
    }

    #[test]
    fn every_kind_of_failure_gets_its_kind_and_retry_status() {
        use ErrorKind as K;
        use ErrorStatus::{Permanent as P, Temporary as T};
        let cases: Vec<(&str, PgError, ErrorKind, ErrorStatus)> = vec![
            ("serialization failure", db("40001"), K::Conflict, T),
            ("deadlock", db("40P01"), K::Conflict, T),
            ("lock not available", db("55P03"), K::Conflict, T),
            ("unique violation", db("23505"), K::Conflict, P),
            ("foreign key violation", db("23503"), K::NotFound, P),
            ("check violation", db("23514"), K::InvalidInput, P),
            ("not null violation", db("23502"), K::InvalidInput, P),
            ("NUL byte in text", db("22021"), K::InvalidInput, P),
            ("numeric out of range", db("22003"), K::InvalidInput, P),
            ("admin shutdown", db("57P01"), K::Unavailable, T),
            ("crash shutdown", db("57P02"), K::Unavailable, T),
            ("cannot connect now", db("57P03"), K::Unavailable, T),
            ("connection failure", db("08006"), K::Unavailable, T),
            ("too many connections", db("53300"), K::Unavailable, T),
            ("disk full", db("53100"), K::Unavailable, T),
            ("statement timeout", db("57014"), K::Timeout, T),
            ("missing table", db("42P01"), K::InvalidConfig, P),
            ("bad password", db("28P01"), K::InvalidConfig, P),
            ("unknown database", db("3D000"), K::InvalidConfig, P),
            ("syntax error", db("42601"), K::Internal, P),
            (
                "row not found",
                sqlx::Error::RowNotFound.into(),
                K::NotFound,
                P,
            ),
            (
                "pool timeout",
                sqlx::Error::PoolTimedOut.into(),
                K::Unavailable,
                T,
            ),
            (
                "pool closed",
                sqlx::Error::PoolClosed.into(),
                K::Unavailable,
                P,
            ),
            (
                "worker crashed",
                sqlx::Error::WorkerCrashed.into(),
                K::Unavailable,
                T,
            ),
            (
                "connection refused",
                io(std::io::ErrorKind::ConnectionRefused),
                K::Unavailable,
                T,
            ),
            (
                "connection reset",
                io(std::io::ErrorKind::ConnectionReset),
                K::Unavailable,
                T,
            ),
            (
                "protocol error",
                sqlx::Error::Protocol("unexpected eof".into()).into(),
                K::Unavailable,
                T,
            ),
            (
                "bad options",
                sqlx::Error::Configuration("bad url".into()).into(),
                K::InvalidConfig,
                P,
            ),
            (
                "decode",
                sqlx::Error::Decode("bad".into()).into(),
                K::Internal,
                P,
            ),
            (
                "corrupt row",
                PgError::Corrupt {
                    column: "state",
                    reason: "unknown state".into(),
                },
                K::Internal,
                P,
            ),
            (
                "out of range",
                PgError::OutOfRange {
                    what: "generation",
                    value: u64::MAX,
                },
                K::InvalidInput,
                P,
            ),
        ];
        for (name, error, kind, status) in cases {
            let classified = classify("test", error);
            assert_eq!(classified.kind(), kind, "{name}: {classified}");
            assert_eq!(classified.status(), status, "{name}: {classified}");
            assert_eq!(classified.operation(), "test", "{name}");
            assert!(
                std::error::Error::source(&classified).is_some(),
                "{name}: source lost"
            );
        }
    }
}
