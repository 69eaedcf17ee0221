//! The audit-trail part of the [`VmStore`] conformance suite (stamped out with the rest by
//! [`vm_store_conformance!`](crate::vm_store_conformance)). Each function starts from an
//! empty store.

use uuid::Uuid;

use super::store::t0;
use crate::audit::{AuditAction, AuditEntry, AuditQuery};
use crate::VmStore;

/// An entry `n` seconds after `t0()`.
pub fn audit_entry(n: i64, action: AuditAction) -> AuditEntry {
    AuditEntry::new(
        "admin (session)",
        action,
        t0() + chrono::Duration::seconds(n),
    )
}

fn ids(entries: &[AuditEntry]) -> Vec<Uuid> {
    entries.iter().map(|e| e.id).collect()
}

/// Entries come back as appended, every field intact, newest first (by time; entries of one
/// instant latest-appended first); appending an entry again changes nothing.
pub async fn audit_entries_read_back_newest_first(store: &dyn VmStore) {
    assert!(
        store
            .audit_entries(&AuditQuery::default())
            .await
            .unwrap()
            .is_empty(),
        "a new store has no audit trail"
    );
    let sign_in = audit_entry(0, AuditAction::SignIn).with_address("192.0.2.7");
    let launch = audit_entry(5, AuditAction::Launch)
        .with_address("2001:db8::1")
        .with_detail(Some("3 VMs".into()));
    let refused = AuditEntry {
        actor: "unknown user (basic)".into(),
        ..audit_entry(3, AuditAction::SignInFailed).failed("wrong user name or password")
    };
    // Same instant as `launch`, appended after it.
    let reboot = audit_entry(5, AuditAction::Reboot).with_target(Some("lablink-vm-2".into()));
    // Appended out of time order: the log is ordered by time.
    for entry in [&sign_in, &launch, &refused, &reboot] {
        store.append_audit(entry).await.unwrap();
    }
    store.append_audit(&launch).await.unwrap();
    let all = store.audit_entries(&AuditQuery::default()).await.unwrap();
    assert_eq!(
        ids(&all),
        [reboot.id, launch.id, refused.id, sign_in.id],
        "newest first, one instant latest-appended first, a repeated append kept once"
    );
    assert_eq!(all[1], launch, "every field round-trips");
    assert_eq!(all[2], refused);
    assert_eq!(all[2].address, None);
    assert!(!all[2].ok);
    assert_eq!(all[3], sign_in);
}

/// `limit` caps a page; paging with the last id of each page (`before`) gives every entry
/// once, in order; an id the store does not hold gives nothing.
pub async fn audit_entries_page_with_limit_and_before(store: &dyn VmStore) {
    let entries: Vec<AuditEntry> = (0..25)
        .map(|i| {
            // Pairs of entries share an instant, so pages break inside a tie too.
            audit_entry(i / 2, AuditAction::ALL[i as usize % AuditAction::ALL.len()])
                .with_target(Some(format!("vm-{i}")))
        })
        .collect();
    for entry in &entries {
        store.append_audit(entry).await.unwrap();
    }
    let newest: Vec<Uuid> = entries.iter().rev().map(|e| e.id).collect();
    let first = store
        .audit_entries(&AuditQuery {
            limit: 4,
            before: None,
        })
        .await
        .unwrap();
    assert_eq!(ids(&first), newest[..4], "the newest 4");

    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .audit_entries(&AuditQuery { limit: 7, before })
            .await
            .unwrap();
        assert!(page.len() <= 7, "a page holds at most limit entries");
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        paged.extend(ids(&page));
    }
    assert_eq!(paged, newest, "pages give every entry once, newest first");

    let none = store
        .audit_entries(&AuditQuery {
            limit: 0,
            before: None,
        })
        .await
        .unwrap();
    assert!(none.is_empty(), "limit 0 gives nothing");
    let unknown = store
        .audit_entries(&AuditQuery {
            limit: 10,
            before: Some(Uuid::new_v4()),
        })
        .await
        .unwrap();
    assert!(unknown.is_empty(), "an unknown cursor gives nothing");
}
