//! The audit trail: every admin action (sign-ins, launches, destroys, settings changes...)
//! with who did it, when, from which address, to what, and whether it worked.
//!
//! The HTTP layer builds an [`AuditEntry`] for each admin action and stores it through
//! [`Allocator::record_audit`](crate::Allocator::record_audit), which keeps it in the
//! [`VmStore`](crate::VmStore) ([`VmStore::append_audit`](crate::VmStore::append_audit)), so
//! every replica and every restart sees the same log;
//! [`Allocator::audit_log`](crate::Allocator::audit_log) reads it newest first, a page at a
//! time ([`AuditQuery`]). An entry never holds a secret: no password, token, code or PIN.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Error;

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AuditAction {
    /// An admin signed in.
    SignIn,
    /// A sign-in was refused (wrong user name or password).
    SignInFailed,
    /// An admin signed out.
    SignOut,
    /// VMs were launched.
    Launch,
    /// VMs were destroyed.
    Destroy,
    /// A VM was rebooted.
    Reboot,
    /// A VM's assignment was ended.
    Release,
    /// Participants' work was collected.
    Collect,
    /// The registered participants were replaced.
    RosterChanged,
    /// A registration token was created.
    RegistrationTokenCreated,
    /// A registration token was revoked.
    RegistrationTokenRevoked,
    /// The workshop settings (warm pool, destruction schedule) were changed.
    SettingsChanged,
    /// The workshop export (who had which VM) was downloaded.
    Export,
}

impl AuditAction {
    /// Every action.
    pub const ALL: [Self; 13] = [
        Self::SignIn,
        Self::SignInFailed,
        Self::SignOut,
        Self::Launch,
        Self::Destroy,
        Self::Reboot,
        Self::Release,
        Self::Collect,
        Self::RosterChanged,
        Self::RegistrationTokenCreated,
        Self::RegistrationTokenRevoked,
        Self::SettingsChanged,
        Self::Export,
    ];

    /// Lower-case name, as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SignIn => "sign_in",
            Self::SignInFailed => "sign_in_failed",
            Self::SignOut => "sign_out",
            Self::Launch => "launch",
            Self::Destroy => "destroy",
            Self::Reboot => "reboot",
            Self::Release => "release",
            Self::Collect => "collect",
            Self::RosterChanged => "roster_changed",
            Self::RegistrationTokenCreated => "registration_token_created",
            Self::RegistrationTokenRevoked => "registration_token_revoked",
            Self::SettingsChanged => "settings_changed",
            Self::Export => "export",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditAction {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| Error::invalid_input(format!("unknown audit action {s:?}")))
    }
}

/// One admin action. Holds no secret: the HTTP layer never puts a password, token, code or
/// PIN into any field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// Its id (to page from it: [`AuditQuery::before`]).
    pub id: Uuid,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Who: the admin's user name and how they signed in (`admin (session)`,
    /// `admin (basic)`); for a refused sign-in, the name only when it is the admin's.
    pub actor: String,
    /// The client's address, when the action came over the network.
    pub address: Option<String>,
    /// What was done.
    pub action: AuditAction,
    /// To what: a VM's hostname, a registration token's id...; `None` when the action has no
    /// single target (a launch, a destroy of all VMs).
    pub target: Option<String>,
    /// A short description (`3 VMs`, `all VMs`, `120 emails`) and, when it failed, why.
    pub detail: Option<String>,
    /// Whether it worked.
    pub ok: bool,
}

impl AuditEntry {
    /// Longest `actor`, `address`, `target` and `detail` kept (longer text is cut, in
    /// characters, ending with `…`).
    pub const MAX_TEXT: usize = 500;

    /// A successful `action` by `actor` at `at`, with a new id and nothing else set.
    pub fn new(actor: impl Into<String>, action: AuditAction, at: DateTime<Utc>) -> Self {
        Self {
            id: Uuid::new_v4(),
            at,
            actor: cut(actor.into()),
            address: None,
            action,
            target: None,
            detail: None,
            ok: true,
        }
    }

    /// With the client's address.
    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(cut(address.into()));
        self
    }

    /// With a target.
    pub fn with_target(mut self, target: Option<String>) -> Self {
        self.target = target.map(cut);
        self
    }

    /// With a detail.
    pub fn with_detail(mut self, detail: Option<String>) -> Self {
        self.detail = detail.map(cut);
        self
    }

    /// As failed, with why appended to the detail.
    pub fn failed(mut self, why: &str) -> Self {
        self.ok = false;
        self.detail = Some(cut(match self.detail.take() {
            Some(detail) => format!("{detail}: {why}"),
            None => why.to_owned(),
        }));
        self
    }
}

/// `text` cut to [`AuditEntry::MAX_TEXT`] characters, control characters replaced by spaces.
fn cut(text: String) -> String {
    let long = text.chars().count() > AuditEntry::MAX_TEXT;
    if !long && !text.chars().any(char::is_control) {
        return text;
    }
    let clean = |c: char| if c.is_control() { ' ' } else { c };
    let mut out: String = text.chars().map(clean).take(AuditEntry::MAX_TEXT).collect();
    if long {
        out.pop();
        out.push('…');
    }
    out
}

/// Which entries [`VmStore::audit_entries`](crate::VmStore::audit_entries) returns: the newest
/// `limit` older than `before`. `Default`: the newest 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditQuery {
    /// At most this many.
    pub limit: usize,
    /// Only entries older than the entry with this id (the last one of the previous page);
    /// an id the store does not hold gives none.
    pub before: Option<Uuid>,
}

impl Default for AuditQuery {
    fn default() -> Self {
        Self {
            limit: 200,
            before: None,
        }
    }
}

/// How many entries [`MemoryVmStore`](crate::MemoryVmStore) keeps: the newest, older ones are
/// dropped.
pub const MEMORY_AUDIT_CAP: usize = 100_000;

/// The in-memory audit log: entries by `(at, order of appending)`, at most `cap`, dropping
/// the oldest.
#[derive(Debug)]
pub(crate) struct BoundedAuditLog {
    cap: usize,
    appended: u64,
    entries: BTreeMap<(DateTime<Utc>, u64), AuditEntry>,
    keys: HashMap<Uuid, (DateTime<Utc>, u64)>,
}

impl Default for BoundedAuditLog {
    fn default() -> Self {
        Self::with_cap(MEMORY_AUDIT_CAP)
    }
}

impl BoundedAuditLog {
    pub(crate) fn with_cap(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            appended: 0,
            entries: BTreeMap::new(),
            keys: HashMap::new(),
        }
    }

    /// Appends `entry` unless its id is held already; drops the oldest beyond the cap.
    pub(crate) fn append(&mut self, entry: &AuditEntry) {
        if self.keys.contains_key(&entry.id) {
            return;
        }
        self.appended += 1;
        let key = (entry.at, self.appended);
        self.keys.insert(entry.id, key);
        self.entries.insert(key, entry.clone());
        while self.entries.len() > self.cap {
            if let Some((_, oldest)) = self.entries.pop_first() {
                self.keys.remove(&oldest.id);
            }
        }
    }

    /// The entries `query` selects, newest first.
    pub(crate) fn query(&self, query: &AuditQuery) -> Vec<AuditEntry> {
        let older = match query.before {
            None => self.entries.range(..),
            Some(id) => match self.keys.get(&id) {
                Some(key) => self.entries.range(..*key),
                None => return Vec::new(),
            },
        };
        older
            .rev()
            .take(query.limit)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn actions_round_trip_through_their_names() {
        for action in AuditAction::ALL {
            assert_eq!(action.as_str().parse::<AuditAction>().unwrap(), action);
            let json = serde_json::to_string(&action).unwrap();
            assert_eq!(json, format!("\"{}\"", action.as_str()));
        }
        assert!("reboot_all".parse::<AuditAction>().is_err());
    }

    #[test]
    fn long_or_multi_line_text_is_cut_and_flattened() {
        let entry = AuditEntry::new("admin (session)", AuditAction::Launch, at(0))
            .with_detail(Some("x".repeat(2 * AuditEntry::MAX_TEXT)))
            .with_target(Some("a\nb".into()));
        let detail = entry.detail.unwrap();
        assert_eq!(detail.chars().count(), AuditEntry::MAX_TEXT);
        assert!(detail.ends_with('…'));
        assert_eq!(entry.target.as_deref(), Some("a b"));
        let failed = AuditEntry::new("admin (basic)", AuditAction::Reboot, at(0))
            .with_detail(Some("1 VM".into()))
            .failed("VM not found");
        assert!(!failed.ok);
        assert_eq!(failed.detail.as_deref(), Some("1 VM: VM not found"));
    }

    #[test]
    fn the_memory_log_keeps_the_newest_entries_up_to_its_cap() {
        let mut log = BoundedAuditLog::with_cap(3);
        let entries: Vec<AuditEntry> = (0..5)
            .map(|i| AuditEntry::new("admin (session)", AuditAction::Launch, at(i)))
            .collect();
        for e in &entries {
            log.append(e);
        }
        let kept: Vec<Uuid> = log
            .query(&AuditQuery::default())
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(kept, [entries[4].id, entries[3].id, entries[2].id]);
        // A dropped entry as the cursor: nothing older is held.
        let page = log.query(&AuditQuery {
            limit: 10,
            before: Some(entries[0].id),
        });
        assert!(page.is_empty());
    }
}
