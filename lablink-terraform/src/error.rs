//! What can go wrong when driving `terraform`, and the one function ([`classify`]) that turns
//! it into a [`lablink_core::Error`] with a kind and a retry status.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lablink_core::{Error, ErrorKind};

/// The native failures of this backend. Private: callers see [`lablink_core::Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum TfFailure {
    /// The `terraform` binary is not where it was configured (or not on `PATH`).
    #[error("the terraform binary {binary:?} was not found; install Terraform or configure its path with `with_terraform_binary`")]
    MissingBinary {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The binary exists but could not be started.
    #[error("could not start terraform ({binary:?})")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The command ran past its deadline and was stopped.
    #[error("`terraform {command}` did not finish within {}s and was stopped{}", timeout.as_secs_f64(), tail_suffix(.tail))]
    Timeout {
        command: &'static str,
        timeout: Duration,
        tail: String,
    },
    /// Terraform ran and reported an error (its own message, tokens redacted).
    #[error("`terraform {command}` failed: {message}")]
    Failed {
        command: &'static str,
        message: String,
        /// When set, the state lock counts as stale after this long.
        stale_lock_after: Option<Duration>,
    },
    /// The working directory or one of its files could not be read or written.
    #[error("{what} ({path:?})")]
    Files {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `terraform output -json` did not match the module contract.
    #[error("the module's outputs do not match the contract: {0}")]
    Outputs(String),
    /// The configuration given to the builder is wrong.
    #[error("{0}")]
    Config(String),
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last output: {tail}")
    }
}

/// Messages of provider errors that say "too many requests, slow down" (retrying helps).
const THROTTLING: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "Rate exceeded",
    "TooManyRequests",
    "SlowDown",
];

/// Messages of provider errors that say "no capacity right now" (retrying later may help).
const NO_CAPACITY: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientCapacity",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
];

/// Messages of errors in the variables given to the module.
const INVALID_VARIABLES: &[&str] = &[
    "No value for required variable",
    "Invalid value for input variable",
    "Invalid value for variable",
    "Invalid variable value",
    "Value for undeclared variable",
    "Invalid for_each argument",
    "Invalid JSON",
    "Failed to read variables file",
];

/// Messages of errors in the module or the working directory itself.
const INVALID_MODULE: &[&str] = &[
    "Unsupported argument",
    "Missing required argument",
    "Unsupported block type",
    "Reference to undeclared",
    "Invalid reference",
    "Argument or block definition required",
    "No configuration files",
    "Backend initialization required",
    "Inconsistent dependency lock file",
    "Unsupported Terraform Core version",
];

/// Messages that say a plugin or module could not be fetched (the network or the registry).
const UNREACHABLE: &[&str] = &[
    "Failed to query available provider packages",
    "Failed to install provider",
    "could not connect to registry",
    "Failed to download module",
    "Error configuring the backend",
];

/// The single place where this backend's failures get a kind and a retry status.
pub(crate) fn classify(failure: TfFailure, operation: &'static str) -> Error {
    let message = failure.to_string();
    let error = match &failure {
        TfFailure::MissingBinary { binary, .. } => {
            // Retrying will not install it.
            Error::new(ErrorKind::Unavailable, message)
                .with_context("binary", binary.display())
                .permanent()
        }
        TfFailure::Spawn { .. } => Error::new(ErrorKind::Unavailable, message),
        TfFailure::Timeout { .. } => Error::new(ErrorKind::Timeout, message).temporary(),
        TfFailure::Failed {
            message: tf_message,
            stale_lock_after,
            ..
        } => classify_terraform_message(tf_message, *stale_lock_after, message),
        TfFailure::Files { .. } => Error::internal(message),
        TfFailure::Outputs(_) => Error::new(ErrorKind::Provider, message),
        TfFailure::Config(_) => Error::new(ErrorKind::InvalidConfig, message),
    };
    error.with_operation(operation).with_source(failure)
}

fn classify_terraform_message(
    tf_message: &str,
    stale_lock_after: Option<Duration>,
    message: String,
) -> Error {
    let has = |needles: &[&str]| needles.iter().any(|n| tf_message.contains(n));
    if tf_message.contains("Error acquiring the state lock") {
        let lock = LockInfo::parse(tf_message);
        let age = lock.created.map(|c| Utc::now() - c);
        let stale = match (age, stale_lock_after) {
            (Some(age), Some(limit)) => age.to_std().is_ok_and(|age| age > limit),
            _ => false,
        };
        if stale {
            let id = lock.id.as_deref().unwrap_or("<lock id>");
            return Error::conflict(format!(
                "the Terraform state lock looks stale: it was taken at {} by {}, longer ago \
                 than any run may last. If no terraform process is still running for this \
                 deployment, release it with `terraform force-unlock {id}` in the working \
                 directory. {message}",
                lock.created.map(|c| c.to_rfc3339()).unwrap_or_default(),
                lock.who.as_deref().unwrap_or("an unknown process"),
            ))
            .with_context("lock_id", id)
            .permanent();
        }
        let mut error = Error::conflict(format!(
            "another terraform run holds the state lock; try again when it has finished. {message}"
        ))
        .temporary();
        if let Some(id) = lock.id {
            error = error.with_context("lock_id", id);
        }
        return error;
    }
    if has(INVALID_VARIABLES) {
        return Error::new(ErrorKind::InvalidConfig, message);
    }
    if has(NO_CAPACITY) {
        return Error::new(ErrorKind::NoCapacity, message).temporary();
    }
    if has(THROTTLING) {
        return Error::new(ErrorKind::Provider, message).temporary();
    }
    if has(UNREACHABLE) {
        return Error::new(ErrorKind::Unavailable, message).temporary();
    }
    if has(INVALID_MODULE) {
        return Error::new(ErrorKind::InvalidConfig, message);
    }
    Error::new(ErrorKind::Provider, message).permanent()
}

/// The "Lock Info" block Terraform prints when it cannot take the state lock.
#[derive(Debug, Default, PartialEq)]
struct LockInfo {
    id: Option<String>,
    who: Option<String>,
    created: Option<DateTime<Utc>>,
}

impl LockInfo {
    fn parse(message: &str) -> Self {
        // The message may be Terraform's lines or the one-line excerpt joined with " | ".
        let field = |name: &str| {
            message
                .lines()
                .flat_map(|l| l.split(" | "))
                .find_map(|line| {
                    let line = line.trim_start_matches(['│', ' ']).trim();
                    let value = line.strip_prefix(name)?.strip_prefix(':')?.trim();
                    (!value.is_empty()).then(|| value.to_owned())
                })
        };
        let created = field("Created").and_then(|c| {
            // Terraform prints Go's time format: "2026-11-22 10:27:46.730855773 +0000 UTC".
            let c = c.trim_end_matches(" UTC");
            DateTime::parse_from_str(c, "%Y-%m-%d %H:%M:%S%.f %z")
                .ok()
                .map(|d| d.with_timezone(&Utc))
        });
        Self {
            id: field("ID"),
            who: field("Who"),
            created,
        }
    }
}

/// The part of Terraform's stderr that explains a failure: from the first `Error:` line on,
/// or the last lines when there is none.
pub(crate) fn error_excerpt(stderr: &[String]) -> String {
    const MAX: usize = 4000;
    let start = stderr
        .iter()
        .position(|l| l.trim_start_matches(['│', ' ']).starts_with("Error:"))
        .unwrap_or(stderr.len().saturating_sub(20));
    let text = stderr[start..]
        .iter()
        .map(|l| l.trim_start_matches(['│', '╷', '╵']).trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if text.len() > MAX {
        let mut end = MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lablink_core::error::ErrorStatus;

    fn failed(message: &str) -> TfFailure {
        TfFailure::Failed {
            command: "apply",
            message: message.into(),
            stale_lock_after: Some(Duration::from_secs(3600)),
        }
    }

    fn lock_message(created: &str) -> String {
        format!(
            "Error: Error acquiring the state lock | Error message: resource temporarily \
             unavailable\nLock Info:\n  ID:        83849040-f4c2\n  Path:      terraform.tfstate\n  \
             Who:       root@vm\n  Created:   {created}\n"
        )
    }

    #[test]
    fn failures_are_classified_by_kind_and_retry_status() {
        let recent = (Utc::now() - chrono::Duration::seconds(5))
            .format("%Y-%m-%d %H:%M:%S%.f +0000 UTC")
            .to_string();
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let cases: Vec<(&str, TfFailure, ErrorKind, ErrorStatus)> = vec![
            (
                "missing binary",
                TfFailure::MissingBinary { binary: "/nope/terraform".into(), source: io() },
                ErrorKind::Unavailable,
                ErrorStatus::Permanent,
            ),
            (
                "spawn failure",
                TfFailure::Spawn { binary: "terraform".into(), source: io() },
                ErrorKind::Unavailable,
                ErrorStatus::Temporary,
            ),
            (
                "timeout",
                TfFailure::Timeout { command: "apply", timeout: Duration::from_secs(5), tail: String::new() },
                ErrorKind::Timeout,
                ErrorStatus::Temporary,
            ),
            ("lock held", failed(&lock_message(&recent)), ErrorKind::Conflict, ErrorStatus::Temporary),
            (
                "stale lock",
                failed(&lock_message("2020-01-02 03:04:05.123456789 +0000 UTC")),
                ErrorKind::Conflict,
                ErrorStatus::Permanent,
            ),
            (
                "lock without a readable date",
                failed("Error: Error acquiring the state lock | ConditionalCheckFailedException"),
                ErrorKind::Conflict,
                ErrorStatus::Temporary,
            ),
            (
                "missing variable",
                failed("Error: No value for required variable | on variables.tf line 3"),
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            (
                "variable of the wrong type",
                failed("Error: Invalid value for input variable | a number is required"),
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            (
                "throttled",
                failed("Error: creating EC2 Instance: RequestLimitExceeded: Request limit exceeded."),
                ErrorKind::Provider,
                ErrorStatus::Temporary,
            ),
            (
                "no capacity",
                failed("Error: creating EC2 Instance: InsufficientInstanceCapacity: We currently do not have sufficient g4dn.xlarge capacity"),
                ErrorKind::NoCapacity,
                ErrorStatus::Temporary,
            ),
            (
                "provider download impossible",
                failed("Error: Failed to query available provider packages | could not connect to registry.terraform.io"),
                ErrorKind::Unavailable,
                ErrorStatus::Temporary,
            ),
            (
                "broken module",
                failed("Error: Unsupported argument | An argument named \"amii\" is not expected here."),
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            (
                "other apply error",
                failed("Error: creating EC2 Instance: InvalidAMIID.NotFound: The image id '[ami-123]' does not exist"),
                ErrorKind::Provider,
                ErrorStatus::Permanent,
            ),
            (
                "unparseable outputs",
                TfFailure::Outputs("vm_instance_ids is not a map".into()),
                ErrorKind::Provider,
                ErrorStatus::Permanent,
            ),
            (
                "bad builder config",
                TfFailure::Config("`vms` is reserved".into()),
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            (
                "unwritable working directory",
                TfFailure::Files { what: "could not write the variables file", path: "/x".into(), source: io() },
                ErrorKind::Internal,
                ErrorStatus::Permanent,
            ),
        ];
        for (name, failure, kind, status) in cases {
            let tf_message = match &failure {
                TfFailure::Failed { message, .. } => Some(message.clone()),
                _ => None,
            };
            let err = classify(failure, "terraform apply");
            assert_eq!(err.kind(), kind, "{name}: {err}");
            assert_eq!(err.status(), status, "{name}: {err}");
            assert_eq!(err.operation(), "terraform apply", "{name}");
            if let Some(tf_message) = tf_message {
                let first_line = tf_message.lines().next().unwrap();
                assert!(
                    err.to_string().contains(first_line),
                    "{name}: Terraform's message is kept: {err}"
                );
            }
        }
    }

    #[test]
    fn a_stale_lock_error_says_how_to_release_it() {
        let err = classify(
            failed(&lock_message("2020-01-02 03:04:05.5 +0000 UTC")),
            "launch",
        );
        let text = err.to_string();
        assert!(text.contains("stale"), "{text}");
        assert!(
            text.contains("terraform force-unlock 83849040-f4c2"),
            "{text}"
        );
        assert!(text.contains("root@vm"), "{text}");
    }

    #[test]
    fn lock_info_is_read_from_terraforms_message() {
        let info = LockInfo::parse(&lock_message("2026-11-22 10:27:46.730855773 +0000 UTC"));
        assert_eq!(info.id.as_deref(), Some("83849040-f4c2"));
        assert_eq!(info.who.as_deref(), Some("root@vm"));
        assert_eq!(
            info.created.unwrap().to_rfc3339(),
            "2026-11-22T10:27:46.730855773+00:00"
        );
    }

    #[test]
    fn the_error_excerpt_starts_at_the_first_error() {
        let lines: Vec<String> = [
            "╷",
            "│ Warning: Unable to open CLI configuration file",
            "╵",
            "",
            "Error: local-exec provisioner error",
            "",
            "  with terraform_data.fail[0],",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            error_excerpt(&lines),
            "Error: local-exec provisioner error | with terraform_data.fail[0],"
        );
        let no_error: Vec<String> = vec!["killed".into()];
        assert_eq!(error_excerpt(&no_error), "killed");
    }
}
