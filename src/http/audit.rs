//! Recording admin actions in the audit trail ([`lablink_core::audit`]): every admin handler
//! calls [`record`] once with who ([`Caller`], from [`AdminForm`](super::admin_auth::AdminForm)),
//! the action, what it was done to ([`What`]) and its outcome. Sign-ins go through
//! [`sign_in`].
//!
//! What is recorded never holds a secret: the actor is the configured admin user name (a
//! name typed into a refused sign-in only when it is that name), targets are hostnames and
//! token ids, details are counts, labels and the error message the caller was shown (which
//! never carries a secret either). A failure to store an entry is logged and does not change
//! the answer to the action.

use std::net::IpAddr;

use axum::http::StatusCode;
use chrono::Utc;
use lablink_core::{Allocator as _, AuditAction, AuditEntry};
use serde_json::Value;

use super::error::{ApiError, ApiResult};
use super::extract::FormOrJson;
use super::HttpState;

/// How an admin signed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A browser session (the sign-in form).
    Session,
    /// HTTP Basic (scripts).
    Basic,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Basic => "basic",
        }
    }
}

/// Who made an admin request, and from which address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    actor: String,
    address: IpAddr,
}

impl Caller {
    /// Who: the admin's user name and how they signed in (`admin (session)`).
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The configured admin, signed in `via`, calling from `address` (`admin (session)`).
    pub fn admin(state: &HttpState, via: Via, address: IpAddr) -> Self {
        Self {
            actor: format!("{} ({})", state.options().admin_user, via.as_str()),
            address,
        }
    }

    /// Whoever tried to sign in as `user`: the admin when `user` is the configured name,
    /// else `unknown user (...)` (a mistyped password in the name field stays out of the
    /// trail).
    fn signing_in(state: &HttpState, user: &str, via: Via, address: IpAddr) -> Self {
        if user == state.options().admin_user {
            return Self::admin(state, via, address);
        }
        Self {
            actor: format!("unknown user ({})", via.as_str()),
            address,
        }
    }
}

/// What an action was done to: a target (a hostname, a token id) and a short detail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct What {
    target: Option<String>,
    detail: Option<String>,
}

/// `n VMs` (`1 VM`).
fn vms(n: usize) -> String {
    match n {
        1 => "1 VM".to_owned(),
        n => format!("{n} VMs"),
    }
}

impl What {
    /// Nothing in particular (a sign-out).
    pub fn nothing() -> Self {
        Self::default()
    }

    /// A detail only (what an export held).
    pub fn detail(detail: impl Into<String>) -> Self {
        Self {
            target: None,
            detail: Some(detail.into()),
        }
    }

    /// The VM the admin named (as given, when it is not a valid hostname).
    pub fn vm(name: Option<&str>) -> Self {
        Self {
            target: name.map(|n| n.trim().to_owned()),
            detail: None,
        }
    }

    /// `count` new VMs (`None`: the count given was not valid).
    pub fn launch(count: Option<usize>) -> Self {
        Self {
            target: None,
            detail: count.map(vms),
        }
    }

    /// The VM named, or every VM when none is.
    pub fn vm_or_all(name: Option<&str>) -> Self {
        match name {
            Some(_) => Self::vm(name),
            None => Self {
                target: None,
                detail: Some("all VMs".into()),
            },
        }
    }

    /// The VMs a body chooses: `all` (true), `hostnames` (a list) or `hostname`.
    pub fn chosen(form: &FormOrJson) -> Self {
        let mut names: Vec<&str> = match form.get("hostnames") {
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        names.extend(form.text("hostname"));
        let all = match form.get("all") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => matches!(s.trim(), "true" | "1" | "yes" | "on"),
            _ => false,
        };
        match (all, names.is_empty()) {
            (true, true) => Self::vm_or_all(None),
            (_, false) => Self {
                target: Some(names.join(", ")),
                detail: Some(vms(names.len())),
            },
            (false, true) => Self::nothing(),
        }
    }

    /// The workshop settings as saved (`None`: unchanged, the change failed).
    pub fn settings(summary: Option<String>) -> Self {
        Self {
            target: None,
            detail: summary,
        }
    }

    /// The registered participants as they now stand (`None`: unchanged, the change failed).
    pub fn roster(emails: Option<usize>) -> Self {
        let detail = emails.map(|n| match n {
            0 => "list removed: anyone may take a VM".to_owned(),
            1 => "1 email".to_owned(),
            n => format!("{n} emails"),
        });
        Self {
            target: None,
            detail,
        }
    }

    /// A registration token: its id and label (never the token).
    pub fn token(id: Option<String>, label: Option<&str>) -> Self {
        Self {
            target: id,
            detail: label
                .filter(|l| !l.is_empty())
                .map(|l| format!("label {l:?}")),
        }
    }

    /// A request (`POST /api/launch`): what a refused HTTP Basic caller asked for.
    pub fn request(method: &str, path: &str) -> Self {
        Self {
            target: Some(format!("{method} {path}")),
            detail: None,
        }
    }
}

/// Whether an action failed, and why (the message the caller was shown).
pub trait Outcome {
    /// Why it failed, or `None` when it worked.
    fn failure(&self) -> Option<String>;
}

impl<T> Outcome for ApiResult<T> {
    fn failure(&self) -> Option<String> {
        self.as_ref().err().map(|e| e.message().to_owned())
    }
}

/// An admin write's answer (`compat_admin::answer`): a failure also when its status is not
/// a success (a destroy that kept VMs whose collection failed answers 409).
#[derive(Debug)]
pub struct Answered<'a>(pub &'a ApiResult<(StatusCode, Value)>);

impl Outcome for Answered<'_> {
    fn failure(&self) -> Option<String> {
        match self.0 {
            Ok((status, _)) if status.is_success() => None,
            Ok((status, body)) => Some(
                body["error"]
                    .as_str()
                    .map_or_else(|| status.to_string(), str::to_owned),
            ),
            Err(e) => Some(e.message().to_owned()),
        }
    }
}

/// Records that `caller` did `action` to `what`, with its `outcome`. A failure to store the
/// entry is logged, never returned: the action happened either way.
pub async fn record(
    state: &HttpState,
    caller: &Caller,
    action: AuditAction,
    what: What,
    outcome: &impl Outcome,
) {
    let mut entry = AuditEntry::new(caller.actor.clone(), action, Utc::now())
        .with_address(caller.address.to_string())
        .with_target(what.target)
        .with_detail(what.detail);
    if let Some(why) = outcome.failure() {
        entry = entry.failed(&why);
    }
    tracing::info!(
        actor = %entry.actor,
        client = %caller.address,
        action = %action,
        target = entry.target.as_deref().unwrap_or(""),
        ok = entry.ok,
        "admin action"
    );
    if let Err(e) = state.allocator().record_audit(&entry).await {
        tracing::warn!(error = %e, action = %action, "the admin action was not recorded in the audit trail");
    }
}

/// Records a sign-in as `user` `via` a form or HTTP Basic from `address` on `what`, by
/// whether the credentials were right (`verified`): a session's sign-in as
/// [`SignIn`](AuditAction::SignIn) (a Basic caller's calls are recorded as what they do,
/// not as sign-ins), wrong credentials as [`SignInFailed`](AuditAction::SignInFailed).
/// Attempts refused before the credentials were checked (too many failures from the
/// address, 429) are not recorded, so a flood of them cannot fill the trail; `/metrics`
/// counts them.
pub async fn sign_in(
    state: &HttpState,
    user: &str,
    via: Via,
    address: IpAddr,
    what: What,
    verified: &Result<(), ApiError>,
) {
    let caller = Caller::signing_in(state, user, via, address);
    match verified {
        Ok(()) if via == Via::Session => {
            record(state, &caller, AuditAction::SignIn, what, verified).await;
        }
        Err(e) if e.status() == StatusCode::UNAUTHORIZED => {
            record(state, &caller, AuditAction::SignInFailed, what, verified).await;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(json: Value) -> FormOrJson {
        FormOrJson {
            fields: json.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn chosen_vms_are_named_or_all() {
        let what = What::chosen(&form(serde_json::json!({"hostnames": ["a", "b"]})));
        assert_eq!(what.target.as_deref(), Some("a, b"));
        assert_eq!(what.detail.as_deref(), Some("2 VMs"));
        let what = What::chosen(&form(serde_json::json!({"all": "on"})));
        assert_eq!(
            (what.target, what.detail.as_deref()),
            (None, Some("all VMs"))
        );
        assert_eq!(What::chosen(&form(serde_json::json!({}))), What::nothing());
        let one = What::chosen(&form(serde_json::json!({"hostname": " vm-1 "})));
        assert_eq!(one.detail.as_deref(), Some("1 VM"));
    }

    #[test]
    fn a_destroy_that_kept_vms_is_a_failure() {
        let kept: ApiResult<(StatusCode, Value)> = Ok((
            StatusCode::CONFLICT,
            serde_json::json!({"error": "the collection failed on vm-1"}),
        ));
        assert_eq!(
            Answered(&kept).failure().as_deref(),
            Some("the collection failed on vm-1")
        );
        let started: ApiResult<(StatusCode, Value)> =
            Ok((StatusCode::ACCEPTED, serde_json::json!({})));
        assert_eq!(Answered(&started).failure(), None);
    }
}
