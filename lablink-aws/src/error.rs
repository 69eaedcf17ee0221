//! What can go wrong when talking to AWS, and the one function ([`classify`]) that turns it
//! into a [`lablink_core::Error`] with a kind, a retry status and AWS's request id.

use std::error::Error as StdError;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::RequestId;
use lablink_core::{Error, ErrorKind};

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The native failures of this backend. Private: callers see [`lablink_core::Error`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum AwsFailure {
    /// AWS answered with an error code (`InsufficientInstanceCapacity`, `AuthFailure`...).
    #[error("{action} failed: {code}: {message}")]
    Service {
        /// The AWS action (`RunInstances`, `PutObject`...).
        action: &'static str,
        code: String,
        message: String,
        request_id: Option<String>,
        #[source]
        source: BoxError,
    },
    /// AWS could not be reached, or the call timed out.
    #[error("{action} failed: AWS could not be reached")]
    Unreachable {
        action: &'static str,
        timed_out: bool,
        #[source]
        source: BoxError,
    },
    /// The SDK could not build the request (no region, no credentials...).
    #[error(
        "{action} failed: the request could not be built (check the AWS region and credentials)"
    )]
    Setup {
        action: &'static str,
        #[source]
        source: BoxError,
    },
    /// AWS answered something the SDK could not read.
    #[error("{action} failed: AWS's response could not be read")]
    Response {
        action: &'static str,
        #[source]
        source: BoxError,
    },
    /// The configuration given to a builder is wrong.
    #[error("{0}")]
    Config(String),
    /// A launch request LabLink cannot send as is.
    #[error("{0}")]
    Input(String),
    /// Terminated instances did not reach `terminated` in time.
    #[error("{0}")]
    NotConfirmed(String),
    /// AWS answered, but not what its API promises (a missing instance id...).
    #[error("{0}")]
    Unexpected(String),
}

impl AwsFailure {
    /// Wraps an SDK error of `action`.
    pub(crate) fn sdk<E, R>(action: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
        SdkError<E, R>: RequestId,
    {
        let request_id = err
            .request_id()
            .or_else(|| err.meta().extra("aws_request_id"))
            .map(str::to_owned);
        match &err {
            SdkError::ServiceError(_) => Self::Service {
                action,
                code: err.code().unwrap_or("Unknown").to_owned(),
                message: err.message().unwrap_or("").to_owned(),
                request_id,
                source: Box::new(err),
            },
            SdkError::TimeoutError(_) => Self::Unreachable {
                action,
                timed_out: true,
                source: Box::new(err),
            },
            SdkError::DispatchFailure(d) => {
                let timed_out = d.is_timeout();
                if d.is_user() {
                    // Identity resolution (credentials) fails here, before anything is sent.
                    Self::Setup {
                        action,
                        source: Box::new(err),
                    }
                } else {
                    Self::Unreachable {
                        action,
                        timed_out,
                        source: Box::new(err),
                    }
                }
            }
            SdkError::ConstructionFailure(_) => Self::Setup {
                action,
                source: Box::new(err),
            },
            _ => Self::Response {
                action,
                source: Box::new(err),
            },
        }
    }

    /// The AWS error code, for service errors.
    pub(crate) fn code(&self) -> Option<&str> {
        match self {
            Self::Service { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Codes that say "no capacity right now" (another instance type, subnet or a later try may
/// work). The launch falls back on these.
const NO_CAPACITY: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientFreeAddressesInSubnet",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
];

/// Codes that say "too many requests, slow down".
const THROTTLING: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
];

/// Codes of a failure on AWS's side.
const SERVER: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
];

/// Codes that say the credentials are missing, wrong or not allowed to do this.
const AUTH: &[&str] = &[
    "AuthFailure",
    "UnauthorizedOperation",
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "RequestExpired",
    "OptInRequired",
    "Blocked",
];

/// Codes that say a given instance does not exist (a reboot of an unknown machine).
const NOT_FOUND: &[&str] = &["InvalidInstanceID.NotFound", "NoSuchKey"];

/// Codes that say a configured value is wrong: a bad parameter, or a configured AMI, subnet,
/// security group, key pair, instance profile or bucket that does not exist.
const BAD_PARAMETER: &[&str] = &[
    "InvalidParameter",
    "InvalidParameterValue",
    "InvalidParameterCombination",
    "MissingParameter",
    "UnknownParameter",
    "ValidationError",
    "Unsupported",
    "UnsupportedOperation",
    "InvalidInstanceType",
    "InvalidBlockDeviceMapping",
    "InvalidUserData.Malformed",
    "NoSuchBucket",
    "InvalidBucketName",
];

/// `true` when the failure means "no capacity here" (the launch tries the next candidate).
pub(crate) fn is_capacity(failure: &AwsFailure) -> bool {
    failure.code().is_some_and(|c| NO_CAPACITY.contains(&c))
}

/// The single place where this backend's failures get a kind and a retry status.
pub(crate) fn classify(failure: AwsFailure, operation: &'static str) -> Error {
    let message = failure.to_string();
    let mut error = match &failure {
        AwsFailure::Service { code, .. } => classify_code(code, message),
        AwsFailure::Unreachable {
            timed_out: true, ..
        } => Error::new(ErrorKind::Timeout, message).temporary(),
        AwsFailure::Unreachable { .. } => Error::new(ErrorKind::Unavailable, message).temporary(),
        AwsFailure::Setup { .. } | AwsFailure::Config(_) => {
            Error::new(ErrorKind::InvalidConfig, message)
        }
        AwsFailure::Response { .. } => Error::new(ErrorKind::Provider, message).temporary(),
        AwsFailure::Input(_) => Error::invalid_input(message),
        AwsFailure::NotConfirmed(_) => Error::new(ErrorKind::Timeout, message).temporary(),
        AwsFailure::Unexpected(_) => Error::new(ErrorKind::Provider, message),
    };
    if let AwsFailure::Service {
        code, request_id, ..
    } = &failure
    {
        error = error.with_context("aws_code", code);
        if let Some(id) = request_id {
            error = error.with_context("request_id", id);
        }
    }
    error.with_operation(operation).with_source(failure)
}

fn classify_code(code: &str, message: String) -> Error {
    if NO_CAPACITY.contains(&code) {
        return Error::new(ErrorKind::NoCapacity, message).temporary();
    }
    if THROTTLING.contains(&code) {
        return Error::new(ErrorKind::Provider, message).temporary();
    }
    if SERVER.contains(&code) {
        return Error::new(ErrorKind::Unavailable, message).temporary();
    }
    if AUTH.contains(&code) {
        return Error::new(ErrorKind::PermissionDenied, message);
    }
    if NOT_FOUND.contains(&code) {
        return Error::not_found(message);
    }
    // `InvalidAMIID.NotFound`, `InvalidSubnetID.NotFound`, `InvalidGroup.NotFound`,
    // `InvalidKeyPair.NotFound`, `InvalidAMIID.Malformed`...: a configured value is wrong.
    if BAD_PARAMETER.contains(&code)
        || (code.starts_with("Invalid")
            && (code.ends_with(".NotFound") || code.ends_with(".Malformed")))
    {
        return Error::new(ErrorKind::InvalidConfig, message);
    }
    Error::new(ErrorKind::Provider, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lablink_core::error::ErrorStatus;

    fn service(code: &str) -> AwsFailure {
        AwsFailure::Service {
            action: "RunInstances",
            code: code.into(),
            message: "details".into(),
            request_id: Some("req-1".into()),
            source: "boxed".into(),
        }
    }

    #[test]
    fn codes_are_classified_by_kind_and_retry_status() {
        let cases = [
            (
                "InsufficientInstanceCapacity",
                ErrorKind::NoCapacity,
                ErrorStatus::Temporary,
            ),
            (
                "VcpuLimitExceeded",
                ErrorKind::NoCapacity,
                ErrorStatus::Temporary,
            ),
            (
                "RequestLimitExceeded",
                ErrorKind::Provider,
                ErrorStatus::Temporary,
            ),
            (
                "InternalError",
                ErrorKind::Unavailable,
                ErrorStatus::Temporary,
            ),
            (
                "AuthFailure",
                ErrorKind::PermissionDenied,
                ErrorStatus::Permanent,
            ),
            (
                "UnauthorizedOperation",
                ErrorKind::PermissionDenied,
                ErrorStatus::Permanent,
            ),
            (
                "InvalidInstanceID.NotFound",
                ErrorKind::NotFound,
                ErrorStatus::Permanent,
            ),
            (
                "InvalidAMIID.NotFound",
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            (
                "InvalidSubnetID.NotFound",
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            (
                "InvalidAMIID.Malformed",
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            (
                "InvalidParameterValue",
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            (
                "NoSuchBucket",
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            ("SomethingNew", ErrorKind::Provider, ErrorStatus::Permanent),
        ];
        for (code, kind, status) in cases {
            let err = classify(service(code), "launch");
            assert_eq!(err.kind(), kind, "{code}: {err}");
            assert_eq!(err.status(), status, "{code}: {err}");
            assert_eq!(err.operation(), "launch");
            assert!(err.to_string().contains(code), "{err}");
            assert!(err.to_string().contains("request_id: req-1"), "{err}");
        }
    }

    #[test]
    fn local_failures_are_classified_too() {
        let cases = [
            (
                AwsFailure::Config("no AMI".into()),
                ErrorKind::InvalidConfig,
                ErrorStatus::Permanent,
            ),
            (
                AwsFailure::Input("token too long".into()),
                ErrorKind::InvalidInput,
                ErrorStatus::Permanent,
            ),
            (
                AwsFailure::NotConfirmed("still running".into()),
                ErrorKind::Timeout,
                ErrorStatus::Temporary,
            ),
            (
                AwsFailure::Unreachable {
                    action: "RunInstances",
                    timed_out: false,
                    source: "refused".into(),
                },
                ErrorKind::Unavailable,
                ErrorStatus::Temporary,
            ),
            (
                AwsFailure::Unreachable {
                    action: "RunInstances",
                    timed_out: true,
                    source: "slow".into(),
                },
                ErrorKind::Timeout,
                ErrorStatus::Temporary,
            ),
        ];
        for (failure, kind, status) in cases {
            let err = classify(failure, "launch");
            assert_eq!((err.kind(), err.status()), (kind, status), "{err}");
        }
    }
}
