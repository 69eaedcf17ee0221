//! LabLink on the AWS SDK.
