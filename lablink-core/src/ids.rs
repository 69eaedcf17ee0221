//! Validated identifiers: [`Hostname`], [`Email`], [`InstanceId`].
//!
//! Each is a newtype over `String` that can only hold a valid value: build it with `FromStr`
//! (`"vm-1".parse::<Hostname>()`) or through serde, both of which reject bad input with an
//! [`Error`] of kind [`InvalidInput`](crate::ErrorKind::InvalidInput) whose message says why.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident, $validate:path) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                $validate(s).map(|v| Self(v.into()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0.to_string()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

string_newtype!(
    /// Cheap to clone (shared, immutable).
    ///
    /// A VM's hostname: 1–253 characters of `[A-Za-z0-9._-]`, starting with a letter or digit.
    ///
    /// ```
    /// # use lablink_core::Hostname;
    /// assert!("lablink-vm-1".parse::<Hostname>().is_ok());
    /// assert!(".vm".parse::<Hostname>().is_err());
    /// ```
    Hostname,
    validate_hostname
);

string_newtype!(
    /// A participant's email address, trimmed and lower-cased so that the same person typing
    /// `Ada@Lab.org ` and `ada@lab.org` is one participant.
    ///
    /// ```
    /// # use lablink_core::Email;
    /// let email: Email = " Ada@Lab.org".parse().unwrap();
    /// assert_eq!(email.as_str(), "ada@lab.org");
    /// assert!("not-an-email".parse::<Email>().is_err());
    /// ```
    Email,
    validate_email
);

string_newtype!(
    /// The provider's identifier of a machine (an EC2 instance id, a Terraform resource
    /// address, a local process id...): 1–255 printable ASCII characters without spaces.
    InstanceId,
    validate_instance_id
);

const MAX_HOSTNAME: usize = 253;
const MAX_EMAIL: usize = 254;
const MAX_INSTANCE_ID: usize = 255;

fn validate_hostname(s: &str) -> Result<String> {
    if s.is_empty() {
        return Err(Error::invalid_input("hostname is empty"));
    }
    if s.len() > MAX_HOSTNAME {
        return Err(Error::invalid_input(format!(
            "hostname is {} characters long; at most {MAX_HOSTNAME} are allowed",
            s.len()
        )));
    }
    if !s.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(Error::invalid_input(
            "hostname must start with a letter or a digit",
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid_input(format!(
            "hostname may only contain letters, digits, '.', '_' and '-'; found {c:?}"
        )));
    }
    Ok(s.to_owned())
}

fn validate_email(s: &str) -> Result<String> {
    let s = s.trim();
    if s.is_empty() {
        return Err(Error::invalid_input("email is empty"));
    }
    if s.len() > MAX_EMAIL {
        return Err(Error::invalid_input(format!(
            "email is longer than {MAX_EMAIL} characters"
        )));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid_input(
            "email must not contain spaces or control characters",
        ));
    }
    let Some((local, domain)) = s.split_once('@') else {
        return Err(Error::invalid_input("email must contain '@'"));
    };
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return Err(Error::invalid_input(
            "email must look like name@domain with exactly one '@'",
        ));
    }
    if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
        return Err(Error::invalid_input("email domain is malformed"));
    }
    Ok(s.to_lowercase())
}

fn validate_instance_id(s: &str) -> Result<String> {
    if s.is_empty() {
        return Err(Error::invalid_input("instance id is empty"));
    }
    if s.len() > MAX_INSTANCE_ID {
        return Err(Error::invalid_input(format!(
            "instance id is longer than {MAX_INSTANCE_ID} characters"
        )));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid_input(
            "instance id must be printable ASCII without spaces",
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn hostnames_are_validated_with_reasons() {
        for ok in ["a", "vm-1", "lablink.vm_2", "0abc", &"a".repeat(253)] {
            assert!(ok.parse::<Hostname>().is_ok(), "{ok} should be valid");
        }
        for (bad, why) in [
            ("", "empty"),
            (".vm", "start with"),
            ("-vm", "start with"),
            ("vm 1", "' '"),
            ("vm/1", "'/'"),
            ("vm;rm", "';'"),
            ("vm\n", "'\\n'"),
            ("é", "start with"),
        ] {
            let err = bad.parse::<Hostname>().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        assert!("a".repeat(254).parse::<Hostname>().is_err());
    }

    #[test]
    fn emails_are_normalized_and_validated() {
        assert_eq!(
            " Ada@Example.ORG ".parse::<Email>().unwrap().as_str(),
            "ada@example.org"
        );
        for bad in [
            "",
            "ada",
            "@x.org",
            "ada@",
            "a@b@c",
            "a b@c.org",
            "a@.org",
            "a@x..org",
            "ada@x.org\u{0}",
        ] {
            assert!(bad.parse::<Email>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn serde_rejects_invalid_values() {
        let ok: Hostname = serde_json::from_str("\"vm-1\"").unwrap();
        assert_eq!(ok.as_str(), "vm-1");
        assert!(serde_json::from_str::<Hostname>("\".bad\"").is_err());
        assert!(serde_json::from_str::<InstanceId>("\"has space\"").is_err());
    }
}
