//! Machines that join by registering themselves: a lab's own workstations and on-premise
//! servers, next to the VMs a provisioner creates.
//!
//! An admin creates a [`RegistrationToken`] (shown once as a
//! [`RegistrationSecret`](crate::secret::RegistrationSecret), stored as a digest, with an
//! expiry and an optional number of uses, revocable). The machine's agent presents it with a
//! [`MachineRegistration`]: its name and a stable identity. The store checks the token and
//! records the machine in one atomic step ([`VmStore::register`](crate::VmStore::register));
//! the machine gets its own agent token and from then on is a VM like any other, except that
//! nothing creates or replaces it: [`ManualProvisioner`](crate::manual::ManualProvisioner)
//! lists it, and destroying it unregisters it without touching the machine.

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use crate::record::Registration;
use crate::secret::TokenDigest;
use crate::{Error, Hostname, Result, VmRecord};

/// Prefix of the instance id of a registered machine (`registered:<hostname>`): no cloud
/// provider's id has it, so a provisioner can tell registered machines apart.
pub const INSTANCE_ID_PREFIX: &str = "registered:";

/// What a machine sends to join. Its `Debug` hides the machine identity.
#[derive(Clone, PartialEq, Eq)]
pub struct MachineRegistration {
    /// The name it joins under (unique in the deployment).
    pub hostname: Hostname,
    /// A stable identity of the machine, the same every time it registers: a secret only
    /// the machine's owner can read (the agent keeps 256 random bits in a root-only file),
    /// 16–128 characters of `[A-Za-z0-9_-]`. Another machine cannot take over a name
    /// registered with a different identity. Stores keep only its digest
    /// ([`digested`](Self::digested)).
    pub machine_identity: String,
    /// Whether the owner allows the allocator to reboot the machine.
    pub allow_reboot: bool,
    /// Its address, if it gave one (shown to admins).
    pub address: Option<String>,
}

impl std::fmt::Debug for MachineRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineRegistration")
            .field("hostname", &self.hostname)
            .field("machine_identity", &"***")
            .field("allow_reboot", &self.allow_reboot)
            .field("address", &self.address)
            .finish()
    }
}

impl MachineRegistration {
    /// Longest name a machine registers under (its instance id, `registered:<name>`, stays
    /// within the 255 characters an instance id may have).
    pub const MAX_NAME: usize = 255 - INSTANCE_ID_PREFIX.len();
    /// Longest machine identity accepted.
    pub const MAX_IDENTITY: usize = 128;
    /// Shortest machine identity accepted.
    pub const MIN_IDENTITY: usize = 16;

    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the first
    /// malformed field.
    pub fn check(&self) -> Result<()> {
        if self.hostname.as_str().len() > Self::MAX_NAME {
            return Err(Error::invalid_input(format!(
                "a registered machine's name is at most {} characters",
                Self::MAX_NAME
            )));
        }
        let id = &self.machine_identity;
        if !(Self::MIN_IDENTITY..=Self::MAX_IDENTITY).contains(&id.len())
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(Error::invalid_input(format!(
                "machine_identity must be {}–{} characters of letters, digits, '_' and '-'",
                Self::MIN_IDENTITY,
                Self::MAX_IDENTITY
            )));
        }
        if let Some(address) = &self.address {
            if address.is_empty()
                || address.len() > 255
                || !address.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(Error::invalid_input(
                    "address must be 1–255 printable characters without spaces",
                ));
            }
        }
        Ok(())
    }

    /// This request with its machine identity replaced by the identity's SHA-256 (hex),
    /// what stores keep and compare.
    pub fn digested(&self) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.machine_identity.as_bytes());
        Self {
            machine_identity: digest.iter().map(|b| format!("{b:02x}")).collect(),
            ..self.clone()
        }
    }

    /// The record a first registration creates: `Booting` (its agent makes it available),
    /// with its instance id `registered:<hostname>` and the digest of its agent token.
    pub fn record(&self, token: TokenDigest, now: DateTime<Utc>) -> Result<VmRecord> {
        let mut record = VmRecord::new(self.hostname.clone(), Some(token), now);
        record.apply(
            &crate::VmEvent::Provisioned {
                instance_id: format!("{INSTANCE_ID_PREFIX}{}", self.hostname).parse()?,
                address: self.address.clone(),
                instance_type: None,
            },
            now,
        )?;
        record.registration = Some(Registration {
            machine_identity: self.machine_identity.clone(),
            allow_reboot: self.allow_reboot,
        });
        Ok(record)
    }
}

/// What the store returns for a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The machine's record as it now stands.
    pub record: VmRecord,
    /// Whether the machine was registered already (under this name, with this identity):
    /// its record is kept, only its agent token changes, and no use of the token is counted.
    pub again: bool,
}

/// A registration token as stored (never the token itself; it serializes without its
/// digest, as admins see it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegistrationToken {
    /// Its id (to list and revoke it).
    pub id: Uuid,
    /// The digest of the secret.
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub digest: TokenDigest,
    /// What the admin called it.
    pub label: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// How many machines it may register (`None`: any number until it expires).
    pub max_uses: Option<u32>,
    /// How many machines it registered.
    pub uses: u32,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl RegistrationToken {
    /// Longest label accepted.
    pub const MAX_LABEL: usize = 200;
    /// Most machines one token may register.
    pub const MAX_USES: u32 = 1_000_000;

    /// Why the token cannot register a machine at `now` (a new one when `new_machine`), or
    /// `None` when it can. Re-registering a machine counts no use, so a used-up token still
    /// lets an already registered machine register again until it expires.
    pub fn refusal(&self, now: DateTime<Utc>, new_machine: bool) -> Option<&'static str> {
        if self.revoked_at.is_some() {
            Some("the registration token was revoked")
        } else if now >= self.expires_at {
            Some("the registration token has expired")
        } else if new_machine && self.max_uses.is_some_and(|max| self.uses >= max) {
            Some("the registration token is used up")
        } else {
            None
        }
    }

    /// Whether it can still register a new machine at `now`.
    pub fn is_usable(&self, now: DateTime<Utc>) -> bool {
        self.refusal(now, true).is_none()
    }
}

/// The refusal of a registration for a token that is not valid, with `why` (one of
/// [`RegistrationToken::refusal`]'s reasons, or that the token is unknown).
pub fn refused(why: &str) -> Error {
    Error::new(crate::ErrorKind::Unauthenticated, why.to_owned())
}

/// A name already held: by another machine, or by a VM a provisioner created.
pub fn name_taken(record: &VmRecord) -> Error {
    let why = match record.registration {
        Some(_) => "is registered by another machine",
        None => "is used by a VM of this deployment",
    };
    Error::conflict(format!(
        "the name {} {why}; choose another",
        record.hostname
    ))
    .with_context("hostname", &record.hostname)
}

/// A machine registered under another name.
pub fn registered_as(record: &VmRecord) -> Error {
    Error::conflict(format!(
        "this machine is already registered as {}; unregister it first, or register it under that name",
        record.hostname
    ))
}

/// The checks a store makes when `request` arrives for a token whose stored row is
/// `token` (if any), with the record already under that name and the record holding that
/// identity. `Ok(true)` when it is a registration again.
pub fn decide(
    token: Option<&RegistrationToken>,
    by_name: Option<&VmRecord>,
    by_identity: Option<&VmRecord>,
    request: &MachineRegistration,
    now: DateTime<Utc>,
) -> Result<bool> {
    let token = token.ok_or_else(|| refused("the registration token is not valid"))?;
    // A revoked or expired token learns nothing about the names in use.
    if let Some(why) = token.refusal(now, false) {
        return Err(refused(why));
    }
    if let Some(other) = by_identity.filter(|r| r.hostname != request.hostname) {
        return Err(registered_as(other));
    }
    let again = match by_name {
        None => false,
        Some(r) => match &r.registration {
            Some(reg) if reg.machine_identity == request.machine_identity => {
                match r.state {
                    crate::VmState::Terminating | crate::VmState::Terminated => {
                        return Err(Error::conflict(
                            "this machine is being unregistered; register it again in a moment",
                        ))
                    }
                    // Nothing brings a failed record back: the admin sees why, then it goes.
                    crate::VmState::Failed => {
                        return Err(Error::conflict(
                            "this machine's record failed (see the admin page); unregister it (lablink-agent unregister, or destroy it from the admin page), then register again",
                        ))
                    }
                    _ => true,
                }
            }
            _ => return Err(name_taken(r)),
        },
    };
    match token.refusal(now, !again) {
        Some(why) => Err(refused(why)),
        None => Ok(again),
    }
}

/// The record of a registration again: the same record, with the new token digest, and the
/// owner's current choices.
pub fn renewed(
    mut record: VmRecord,
    request: &MachineRegistration,
    token: TokenDigest,
    now: DateTime<Utc>,
) -> VmRecord {
    record.token_digest = Some(token);
    if request.address.is_some() {
        record.address.clone_from(&request.address);
    }
    record.registration = Some(Registration {
        machine_identity: request.machine_identity.clone(),
        allow_reboot: request.allow_reboot,
    });
    record.generation += 1;
    record.updated_at = now;
    record
}
