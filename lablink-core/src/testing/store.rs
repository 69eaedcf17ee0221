//! The [`VmStore`] conformance suite. Each function starts from an empty store.

use chrono::{DateTime, TimeZone, Utc};
use futures::future::join_all;

use crate::registration::{MachineRegistration, RegistrationToken};
use crate::secret::RegistrationSecret;
use crate::store::ClaimRequest;
use crate::{
    AgentToken, Assignment, CrdCommand, Email, ErrorKind, GpuHealth, Hostname, LogAppend,
    LogStream, Operation, OperationKind, StartupTimings, Telemetry, VmEvent, VmFilter, VmRecord,
    VmState, VmStore,
};

/// A fixed instant so suites never depend on a clock.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
}

/// `name` as a hostname.
pub fn host(name: &str) -> Hostname {
    name.parse().expect("valid hostname")
}

/// `name@example.org` as an email.
pub fn email(name: &str) -> Email {
    format!("{name}@example.org").parse().expect("valid email")
}

/// A valid CRD command whose code is `code`.
pub fn command(code: &str) -> CrdCommand {
    format!("/opt/google/chrome-remote-desktop/start-host --code=\"4/{code}\" --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\" --name=$(hostname)")
        .parse()
        .expect("valid command")
}

/// A claim request for `who`.
pub fn claim_request(who: &str) -> ClaimRequest {
    ClaimRequest {
        email: email(who),
        crd_command: Some(command(who)),
        pin: "123456".parse().expect("valid pin"),
    }
}

/// Inserts `vm-0..vm-{n-1}` (with tokens) and brings them to `Available`.
pub async fn seed_available(store: &dyn VmStore, n: usize) -> Vec<Hostname> {
    let hosts: Vec<Hostname> = (0..n).map(|i| host(&format!("vm-{i:04}"))).collect();
    let records: Vec<VmRecord> = hosts
        .iter()
        .map(|h| VmRecord::new(h.clone(), Some(AgentToken::generate().digest()), t0()))
        .collect();
    store.insert(&records).await.expect("insert");
    for (i, h) in hosts.iter().enumerate() {
        let provisioned = VmEvent::Provisioned {
            instance_id: format!("i-{i:08}").parse().unwrap(),
            address: Some(format!("10.0.0.{}", i % 250)),
            instance_type: Some("test.small".into()),
        };
        store
            .apply(h, &provisioned, None, t0())
            .await
            .expect("provisioned");
        store
            .apply(h, &VmEvent::AgentReady, None, t0())
            .await
            .expect("ready");
    }
    hosts
}

fn assignment(who: &str) -> Assignment {
    Assignment {
        email: email(who),
        crd_command: Some(command(who)),
        pin: "654321".parse().unwrap(),
        assigned_at: t0(),
        desktop: crate::DesktopSession::new(t0()),
    }
}

/// Inserting a hostname twice keeps the first record.
pub async fn insert_is_idempotent_by_hostname(store: &dyn VmStore) {
    let first = VmRecord::new(host("vm-a"), None, t0());
    let stored = store.insert(std::slice::from_ref(&first)).await.unwrap();
    assert_eq!(stored, vec![first.clone()]);
    store
        .apply(&first.hostname, &VmEvent::Destroy, None, t0())
        .await
        .unwrap();
    let again = store
        .insert(&[first.clone(), VmRecord::new(host("vm-b"), None, t0())])
        .await
        .unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(
        again[0].state,
        VmState::Terminating,
        "insert overwrote a record"
    );
    assert_eq!(again[1].hostname, host("vm-b"));
    assert_eq!(store.list(&VmFilter::default()).await.unwrap().len(), 2);
}

/// Every per-VM operation on an unknown hostname is `NotFound`.
pub async fn unknown_hostnames_are_not_found(store: &dyn VmStore) {
    let h = host("ghost");
    assert_eq!(store.get(&h).await.unwrap_err().kind(), ErrorKind::NotFound);
    let err = store.apply(&h, &VmEvent::AgentReady, None, t0()).await;
    assert_eq!(err.unwrap_err().kind(), ErrorKind::NotFound);
    let err = store
        .record_telemetry(&h, &Telemetry::default(), t0())
        .await;
    assert_eq!(err.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(
        store.logs(&h).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let digest = AgentToken::generate().digest();
    assert_eq!(
        store.get_by_token(&digest).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(store.remove(&[h]).await.unwrap(), 0);
}

/// Events move a record through the states and their payloads land in the fields.
pub async fn apply_follows_the_state_machine(store: &dyn VmStore) {
    let h = seed_available(store, 1).await.remove(0);
    let r = store.get(&h).await.unwrap();
    assert_eq!(r.state, VmState::Available);
    assert_eq!(r.instance_id.as_ref().unwrap().as_str(), "i-00000000");
    assert_eq!(r.address.as_deref(), Some("10.0.0.0"));
    let r = store.apply(&h, &VmEvent::Reboot, None, t0()).await.unwrap();
    assert_eq!(
        r.state,
        VmState::Rebooting {
            resume: crate::Phase::Available
        }
    );
    let r = store.get(&h).await.unwrap();
    assert_eq!(
        r.state.resume(),
        Some(crate::Phase::Available),
        "resume phase lost"
    );
    let unhealthy = VmEvent::MarkUnhealthy {
        reason: "lease expired".into(),
    };
    let r = store.apply(&h, &unhealthy, None, t0()).await.unwrap();
    assert_eq!(r.last_error.as_deref(), Some("lease expired"));
    let r = store
        .apply(&h, &VmEvent::Recovered, None, t0())
        .await
        .unwrap();
    assert_eq!(r.state, VmState::Available);
    assert_eq!(
        store.get(&h).await.unwrap(),
        r,
        "get differs from apply's result"
    );
}

/// An illegal event is `InvalidTransition` and leaves the record as it was.
pub async fn illegal_events_change_nothing(store: &dyn VmStore) {
    let h = host("vm-x");
    store
        .insert(&[VmRecord::new(h.clone(), None, t0())])
        .await
        .unwrap();
    let before = store.get(&h).await.unwrap();
    for event in [
        VmEvent::AgentReady,
        VmEvent::Release,
        VmEvent::Claim(assignment("eve")),
        VmEvent::Terminated,
    ] {
        let err = store.apply(&h, &event, None, t0()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidTransition, "{}", event.name());
        assert_eq!(
            store.get(&h).await.unwrap(),
            before,
            "{} changed the record",
            event.name()
        );
    }
}

/// A stale `expected_generation` is a `Conflict` and changes nothing.
pub async fn stale_generation_is_a_conflict_and_changes_nothing(store: &dyn VmStore) {
    let h = seed_available(store, 1).await.remove(0);
    let r = store.get(&h).await.unwrap();
    let err = store
        .apply(&h, &VmEvent::Reboot, Some(r.generation - 1), t0())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(store.get(&h).await.unwrap(), r);
    let r2 = store
        .apply(&h, &VmEvent::Reboot, Some(r.generation), t0())
        .await
        .unwrap();
    assert!(r2.generation > r.generation);
}

/// Every change bumps `generation`; idempotent repeats and empty telemetry do not.
pub async fn generation_increases_on_every_change_and_only_then(store: &dyn VmStore) {
    let h = seed_available(store, 1).await.remove(0);
    let g0 = store.get(&h).await.unwrap().generation;
    let same = store
        .apply(&h, &VmEvent::AgentReady, None, t0())
        .await
        .unwrap();
    assert_eq!(
        same.generation, g0,
        "an idempotent repeat bumped the generation"
    );
    let same = store
        .record_telemetry(&h, &Telemetry::default(), t0())
        .await
        .unwrap();
    assert_eq!(same.generation, g0, "empty telemetry bumped the generation");
    let mut last = g0;
    for event in [
        VmEvent::Reboot,
        VmEvent::AgentReady,
        VmEvent::Destroy,
        VmEvent::Terminated,
    ] {
        let g = store
            .apply(&h, &event, None, t0())
            .await
            .unwrap()
            .generation;
        assert!(g > last, "{} did not bump the generation", event.name());
        last = g;
    }
    let telemetry = Telemetry {
        in_use: Some(true),
        ..Default::default()
    };
    let g = store
        .record_telemetry(&h, &telemetry, t0())
        .await
        .unwrap()
        .generation;
    assert!(g > last, "telemetry change did not bump the generation");
}

/// Claims skip booting, unhealthy and GPU-unhealthy VMs.
pub async fn claim_takes_only_assignable_vms(store: &dyn VmStore) {
    let hosts = seed_available(store, 3).await;
    store
        .insert(&[VmRecord::new(host("vm-booting"), None, t0())])
        .await
        .unwrap();
    let unhealthy = VmEvent::MarkUnhealthy { reason: "x".into() };
    store
        .apply(&hosts[0], &unhealthy, None, t0())
        .await
        .unwrap();
    let gpu = Telemetry {
        gpu_health: Some(GpuHealth::Unhealthy),
        ..Default::default()
    };
    store.record_telemetry(&hosts[1], &gpu, t0()).await.unwrap();
    let claimed = store.claim(&claim_request("ada"), t0()).await.unwrap();
    assert!(claimed.newly_assigned);
    assert_eq!(claimed.record.hostname, hosts[2]);
    assert_eq!(claimed.record.state, VmState::Assigned);
    let a = claimed.record.assignment.as_ref().expect("assignment");
    assert_eq!(a.email, email("ada"));
    assert_eq!(
        a.crd_command,
        Some(command("ada")),
        "command not stored exactly"
    );
    assert_eq!(a.pin.expose(), "123456", "pin not stored exactly");
    assert_eq!(store.get(&hosts[2]).await.unwrap(), claimed.record);
    let err = store.claim(&claim_request("bob"), t0()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoCapacity);
}

/// The same email gets its VM (and PIN) back, even with a new command and PIN.
pub async fn claim_returns_the_same_vm_for_the_same_email(store: &dyn VmStore) {
    seed_available(store, 3).await;
    let first = store.claim(&claim_request("ada"), t0()).await.unwrap();
    let mut again = claim_request("ada");
    again.pin = "999999".parse().unwrap();
    again.email = " ADA@example.org".parse().unwrap();
    let second = store.claim(&again, t0()).await.unwrap();
    assert!(!second.newly_assigned);
    assert_eq!(second.record.hostname, first.record.hostname);
    assert_eq!(second.record.assignment, first.record.assignment);
    assert_eq!(store.counts().await.unwrap().assigned, 1);
}

/// With nothing assignable, a claim is a retryable `NoCapacity` and changes nothing.
pub async fn claim_without_capacity_is_no_capacity(store: &dyn VmStore) {
    let err = store.claim(&claim_request("ada"), t0()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoCapacity);
    assert!(err.is_retryable(), "no capacity should be temporary");
    store
        .insert(&[VmRecord::new(host("vm-r"), None, t0())])
        .await
        .unwrap();
    let err = store.claim(&claim_request("ada"), t0()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoCapacity);
    assert_eq!(
        store.get(&host("vm-r")).await.unwrap().state,
        VmState::Requested
    );
}

/// 60 concurrent claims (plus 20 repeats) over 40 VMs: exactly 40 distinct assignments.
pub async fn concurrent_claims_are_exactly_once(store: &dyn VmStore) {
    seed_available(store, 40).await;
    let whos: Vec<String> = (0..60)
        .map(|i| format!("p{i}"))
        .chain((0..20).map(|i| format!("p{i}")))
        .collect();
    let results = join_all(whos.iter().map(|w| store.claim_owned(claim_request(w)))).await;
    let mut by_email = std::collections::HashMap::new();
    let mut no_capacity = 0;
    for (who, result) in whos.iter().zip(results) {
        match result {
            Ok(c) => {
                if let Some(prev) = by_email.insert(who.clone(), c.record.hostname.clone()) {
                    assert_eq!(prev, c.record.hostname, "{who} got two VMs");
                }
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NoCapacity, "{e}");
                no_capacity += 1;
            }
        }
    }
    let distinct: std::collections::HashSet<_> = by_email.values().collect();
    assert_eq!(by_email.len(), 40, "every VM assigned once");
    assert_eq!(distinct.len(), 40, "a VM went to two emails");
    assert!(no_capacity >= 20);
    let assigned = store
        .list(&VmFilter {
            states: vec![VmState::Assigned],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(assigned.len(), 40);
    for r in assigned {
        let owner = r
            .owner()
            .unwrap()
            .as_str()
            .trim_end_matches("@example.org")
            .to_owned();
        assert_eq!(by_email[&owner], r.hostname);
    }
}

/// Several claims for one email racing for the last free VM (a double click, or two
/// replicas): every one of them answers with that VM, none with `NoCapacity`, and only one
/// says it newly assigned it.
pub async fn one_email_racing_for_the_last_vm_gets_it_every_time(store: &dyn VmStore) {
    let hosts = seed_available(store, 12).await;
    for (round, vm) in hosts.iter().enumerate() {
        let who = format!("racer{round}");
        let results = join_all((0..6).map(|_| store.claim_owned(claim_request(&who)))).await;
        let mut newly = 0;
        for result in results {
            let claimed = result.unwrap_or_else(|e| panic!("{who}: {e} although it holds a VM"));
            assert_eq!(&claimed.record.hostname, vm, "{who} got another VM");
            newly += usize::from(claimed.newly_assigned);
        }
        assert_eq!(newly, 1, "{who}: one claim assigns, the others rejoin");
    }
    let late = store.claim_owned(claim_request("late")).await.unwrap_err();
    assert_eq!(late.kind(), ErrorKind::NoCapacity);
}

/// `Release` frees the VM for someone else and the email for another VM.
pub async fn release_frees_the_vm_and_the_email(store: &dyn VmStore) {
    let hosts = seed_available(store, 2).await;
    let c = store.claim(&claim_request("ada"), t0()).await.unwrap();
    let r = store
        .apply(&c.record.hostname, &VmEvent::Release, None, t0())
        .await
        .unwrap();
    assert_eq!(r.state, VmState::Available);
    assert!(r.assignment.is_none());
    let filter = VmFilter {
        email: Some(email("ada")),
        ..Default::default()
    };
    assert!(store.list(&filter).await.unwrap().is_empty());
    for who in ["bob", "ada"] {
        store.claim(&claim_request(who), t0()).await.unwrap();
    }
    assert_eq!(store.counts().await.unwrap().assigned, hosts.len());
}

/// A `Claim` event for an email that already owns a VM is rejected.
pub async fn an_email_never_owns_two_vms(store: &dyn VmStore) {
    let hosts = seed_available(store, 2).await;
    let c = store.claim(&claim_request("ada"), t0()).await.unwrap();
    let other = hosts.iter().find(|h| **h != c.record.hostname).unwrap();
    let err = store
        .apply(other, &VmEvent::Claim(assignment("ada")), None, t0())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert_eq!(store.get(other).await.unwrap().state, VmState::Available);
    let r = store
        .apply(other, &VmEvent::Claim(assignment("bob")), None, t0())
        .await
        .unwrap();
    assert_eq!(r.owner(), Some(&email("bob")));
}

/// Telemetry fields land in the record; a new boot id counts a restart.
pub async fn telemetry_updates_fields_and_counts_restarts(store: &dyn VmStore) {
    let h = seed_available(store, 1).await.remove(0);
    let later = t0() + chrono::Duration::seconds(30);
    let t = Telemetry {
        gpu_health: Some(GpuHealth::NotAvailable),
        in_use: Some(true),
        status: Some(crate::AgentStatus::Running),
        heartbeat: Some("boot-1".into()),
        timings: Some(StartupTimings {
            cloud_init_start: Some(t0()),
            cloud_init_duration_seconds: Some(42.5),
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = store.record_telemetry(&h, &t, later).await.unwrap();
    assert_eq!(r.gpu_health, GpuHealth::NotAvailable);
    assert!(r.in_use);
    assert_eq!(r.agent_status, Some(crate::AgentStatus::Running));
    assert_eq!(r.last_heartbeat, Some(later));
    assert_eq!(r.boot_id.as_deref(), Some("boot-1"));
    assert_eq!(r.restarts, 0);
    assert_eq!(r.timings.cloud_init_start, Some(t0()));
    assert_eq!(r.timings.cloud_init_duration_seconds, Some(42.5));
    let more = Telemetry {
        heartbeat: Some("boot-2".into()),
        timings: Some(StartupTimings {
            container_end: Some(later),
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = store.record_telemetry(&h, &more, later).await.unwrap();
    assert_eq!(r.restarts, 1);
    assert_eq!(r.timings.cloud_init_start, Some(t0()), "merge lost a field");
    assert_eq!(r.timings.container_end, Some(later));
    assert!(r.in_use, "a report without in_use changed it");
    assert_eq!(store.get(&h).await.unwrap(), r);
}

/// Each stream keeps at most the cap, dropping the oldest lines first.
pub async fn logs_are_capped_and_drop_the_oldest_lines(store: &dyn VmStore) {
    let h = seed_available(store, 1).await.remove(0);
    let cap = 2048;
    for batch in 0..10 {
        let lines: Vec<String> = (0..50)
            .map(|i| format!("batch {batch:02} line {i:03}"))
            .collect();
        let t = Telemetry {
            logs: vec![
                LogAppend {
                    stream: LogStream::CloudInit,
                    lines,
                },
                LogAppend {
                    stream: LogStream::Container,
                    lines: vec![format!("container {batch}")],
                },
            ],
            log_cap_bytes: cap,
            ..Default::default()
        };
        store.record_telemetry(&h, &t, t0()).await.unwrap();
    }
    let logs = store.logs(&h).await.unwrap();
    assert!(
        logs.cloud_init.len() <= cap,
        "cap exceeded: {}",
        logs.cloud_init.len()
    );
    assert!(logs.cloud_init.len() > cap / 2, "dropped too much");
    assert!(
        logs.cloud_init.ends_with("batch 09 line 049"),
        "newest line lost"
    );
    assert!(!logs.cloud_init.contains("batch 00"), "oldest lines kept");
    let lines: Vec<&str> = logs.cloud_init.lines().collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "order not preserved");
    assert_eq!(
        logs.container,
        (0..10)
            .map(|b| format!("container {b}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(logs.agent, "");
}

/// `list` filters by state kind and owner, in hostname order, with a limit.
pub async fn list_filters_by_state_and_email(store: &dyn VmStore) {
    let hosts = seed_available(store, 4).await;
    store
        .apply(&hosts[3], &VmEvent::Reboot, None, t0())
        .await
        .unwrap();
    let c = store.claim(&claim_request("ada"), t0()).await.unwrap();
    let all = store.list(&VmFilter::default()).await.unwrap();
    let names: Vec<_> = all.iter().map(|r| r.hostname.clone()).collect();
    assert_eq!(names, hosts, "not in hostname order");
    let available = store
        .list(&VmFilter {
            states: vec![
                VmState::Available,
                VmState::Rebooting {
                    resume: crate::Phase::Booting,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        available.len(),
        3,
        "resume phase must be ignored when matching"
    );
    let mine = store
        .list(&VmFilter {
            email: Some(email("ada")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].hostname, c.record.hostname);
    let limited = store
        .list(&VmFilter {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(limited.len(), 2);
}

/// Counts group records by state; `assignable` excludes GPU-unhealthy VMs.
pub async fn counts_group_by_state(store: &dyn VmStore) {
    let hosts = seed_available(store, 5).await;
    store
        .insert(&[VmRecord::new(host("vm-new"), None, t0())])
        .await
        .unwrap();
    store.claim(&claim_request("ada"), t0()).await.unwrap();
    let gpu = Telemetry {
        gpu_health: Some(GpuHealth::Unhealthy),
        ..Default::default()
    };
    store.record_telemetry(&hosts[4], &gpu, t0()).await.unwrap();
    store
        .apply(
            &hosts[3],
            &VmEvent::MarkUnhealthy { reason: "x".into() },
            None,
            t0(),
        )
        .await
        .unwrap();
    let c = store.counts().await.unwrap();
    assert_eq!(c.total, 6);
    assert_eq!(c.requested, 1);
    assert_eq!(c.assigned, 1);
    assert_eq!(c.unhealthy, 1);
    assert_eq!(c.available, 3);
    assert_eq!(c.assignable, 2);
}

/// `get_by_token` finds the VM whose token digest matches, and only that one.
pub async fn token_digest_finds_its_vm(store: &dyn VmStore) {
    let token = AgentToken::generate();
    let r = VmRecord::new(host("vm-t"), Some(token.digest()), t0());
    store
        .insert(&[
            r,
            VmRecord::new(host("vm-u"), Some(AgentToken::generate().digest()), t0()),
        ])
        .await
        .unwrap();
    let found = store.get_by_token(&token.digest()).await.unwrap();
    assert_eq!(found.hostname, host("vm-t"));
    assert_eq!(found.token_digest, Some(token.digest()));
}

/// `remove` deletes records and logs and frees their owners' emails.
pub async fn remove_deletes_records_and_frees_emails(store: &dyn VmStore) {
    let hosts = seed_available(store, 2).await;
    let c = store.claim(&claim_request("ada"), t0()).await.unwrap();
    let n = store
        .remove(&[c.record.hostname.clone(), host("ghost")])
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(store
        .get(&c.record.hostname)
        .await
        .unwrap_err()
        .is_not_found());
    let again = store.claim(&claim_request("ada"), t0()).await.unwrap();
    assert!(again.newly_assigned);
    assert!(hosts.contains(&again.record.hostname));
}

/// Operations are stored, replaced by id and listed newest first.
pub async fn operations_round_trip_newest_first(store: &dyn VmStore) {
    let mut older = Operation::start(OperationKind::Launch, vec![host("vm-1")], t0());
    let newer = Operation::start(
        OperationKind::Destroy,
        vec![host("vm-1"), host("vm-2")],
        t0() + chrono::Duration::seconds(5),
    );
    store.put_operation(&older).await.unwrap();
    store.put_operation(&newer).await.unwrap();
    older.push_progress("apply: 1 added");
    older.finish(Some("boom".into()), t0() + chrono::Duration::seconds(9));
    store.put_operation(&older).await.unwrap();
    assert_eq!(store.get_operation(older.id).await.unwrap(), older);
    let list = store.list_operations(10).await.unwrap();
    assert_eq!(list, vec![newer.clone(), older.clone()]);
    assert_eq!(store.list_operations(1).await.unwrap(), vec![newer]);
    let missing = store.get_operation(uuid::Uuid::new_v4()).await.unwrap_err();
    assert!(missing.is_not_found());
}

/// Only one provisioning lock holder at a time; dropping it frees the lock.
pub async fn provisioning_lock_is_exclusive(store: &dyn VmStore) {
    let lock = store.lock_provisioning().await.unwrap();
    let err = store.lock_provisioning().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    drop(lock);
    let mut again = None;
    for _ in 0..100 {
        match store.lock_provisioning().await {
            Ok(l) => {
                again = Some(l);
                break;
            }
            // A durable store may release asynchronously.
            Err(e) if e.is_conflict() => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(again.is_some(), "the lock was not released after drop");
}

/// One leader at a time: a second candidate waits until the lease ends or is resigned; the
/// holder renews it.
pub async fn leadership_is_exclusive_until_the_lease_ends(store: &dyn VmStore) {
    let t = |secs: i64| t0() + chrono::Duration::seconds(secs);
    let a = store.try_lead("replica-a", t(0), t(10)).await.unwrap();
    assert_eq!((a.holder.as_str(), a.expires_at), ("replica-a", t(10)));
    // B cannot take a live lease; it learns who holds it.
    let seen = store.try_lead("replica-b", t(5), t(15)).await.unwrap();
    assert_eq!(
        (seen.holder.as_str(), seen.expires_at),
        ("replica-a", t(10))
    );
    // A renews.
    let renewed = store.try_lead("replica-a", t(8), t(18)).await.unwrap();
    assert_eq!(renewed.expires_at, t(18));
    assert_eq!(
        store
            .try_lead("replica-b", t(17), t(27))
            .await
            .unwrap()
            .holder,
        "replica-a"
    );
    // A stops renewing: B takes over once the lease ended.
    let b = store.try_lead("replica-b", t(18), t(28)).await.unwrap();
    assert_eq!((b.holder.as_str(), b.expires_at), ("replica-b", t(28)));
    assert_eq!(
        store
            .try_lead("replica-a", t(19), t(29))
            .await
            .unwrap()
            .holder,
        "replica-b"
    );
    // Resigning by a non-holder changes nothing; by the holder frees the lease at once.
    store.resign("replica-a").await.unwrap();
    assert_eq!(
        store
            .try_lead("replica-a", t(20), t(30))
            .await
            .unwrap()
            .holder,
        "replica-b"
    );
    store.resign("replica-b").await.unwrap();
    assert_eq!(
        store
            .try_lead("replica-a", t(21), t(31))
            .await
            .unwrap()
            .holder,
        "replica-a"
    );
}

/// Owned-argument claim, so many claims can run concurrently over one borrowed store.
trait ClaimOwned {
    fn claim_owned(
        &self,
        request: ClaimRequest,
    ) -> futures::future::BoxFuture<'_, crate::Result<crate::store::Claimed>>;
}

impl ClaimOwned for dyn VmStore + '_ {
    fn claim_owned(
        &self,
        request: ClaimRequest,
    ) -> futures::future::BoxFuture<'_, crate::Result<crate::store::Claimed>> {
        Box::pin(async move { self.claim(&request, t0()).await })
    }
}

/// The roster is stored as a whole, sorted, duplicates once; an empty one removes it.
pub async fn roster_is_replaced_as_a_whole(store: &dyn VmStore) {
    assert!(store.roster().await.unwrap().is_empty(), "no list at first");
    store
        .replace_roster(&[email("zoe"), email("ada"), email("zoe")])
        .await
        .unwrap();
    assert_eq!(
        store.roster().await.unwrap(),
        vec![email("ada"), email("zoe")]
    );
    store.replace_roster(&[email("bob")]).await.unwrap();
    assert_eq!(store.roster().await.unwrap(), vec![email("bob")]);
    store.replace_roster(&[]).await.unwrap();
    assert!(store.roster().await.unwrap().is_empty());
}

/// The first candidate stored under a name is the secret for good: later and concurrent
/// callers with other candidates all get it back; names are independent.
pub async fn a_shared_secret_is_stored_once_and_agreed_on(store: &dyn VmStore) {
    let first = store.shared_secret("cookies", b"first").await.unwrap();
    assert_eq!(
        first, b"first",
        "the candidate is stored when there is none"
    );
    let again = store.shared_secret("cookies", b"second").await.unwrap();
    assert_eq!(again, b"first", "a stored secret is never replaced");
    let other = store.shared_secret("sessions", b"other").await.unwrap();
    assert_eq!(other, b"other", "another name has its own secret");
    // Replicas starting together, each with its own candidate, agree on one of them.
    let candidates: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 32]).collect();
    let got = join_all(
        candidates
            .iter()
            .map(|c| store.shared_secret("together", c)),
    )
    .await;
    let got: Vec<Vec<u8>> = got.into_iter().map(Result::unwrap).collect();
    assert!(candidates.contains(&got[0]), "one of the candidates won");
    assert!(
        got.iter().all(|g| *g == got[0]),
        "every concurrent caller got the same secret"
    );
    assert_eq!(
        store.shared_secret("together", b"late").await.unwrap(),
        got[0]
    );
}

/// An ended session stays ended until its `until` (a repeat keeps the later one); other ids
/// are not ended; ending another session later forgets the ones whose time has passed.
pub async fn an_ended_session_stays_ended_until_it_expires(store: &dyn VmStore) {
    let t = |s: i64| t0() + chrono::Duration::seconds(s);
    assert!(!store.session_ended("s1", t(0)).await.unwrap());
    store.end_session("s1", t(60), t(0)).await.unwrap();
    assert!(store.session_ended("s1", t(1)).await.unwrap());
    assert!(store.session_ended("s1", t(59)).await.unwrap());
    assert!(
        !store.session_ended("s1", t(60)).await.unwrap(),
        "ended only until its until"
    );
    assert!(!store.session_ended("s2", t(1)).await.unwrap());
    // Ending it again with an earlier time keeps the later one; a later one extends it.
    store.end_session("s1", t(30), t(2)).await.unwrap();
    assert!(store.session_ended("s1", t(45)).await.unwrap());
    store.end_session("s1", t(90), t(3)).await.unwrap();
    assert!(store.session_ended("s1", t(75)).await.unwrap());
    store.end_session("s2", t(200), t(4)).await.unwrap();
    assert!(store.session_ended("s2", t(5)).await.unwrap());
    // At t(100) s1's time has passed: ending s3 then forgets it (asking about an earlier
    // moment shows it is gone), s2 stays.
    store.end_session("s3", t(160), t(100)).await.unwrap();
    assert!(
        !store.session_ended("s1", t(5)).await.unwrap(),
        "sessions whose time passed are forgotten"
    );
    assert!(store.session_ended("s2", t(100)).await.unwrap());
    assert!(store.session_ended("s3", t(100)).await.unwrap());
}

/// A registration token created at `t0()`, valid for an hour, for `max_uses` machines.
pub fn registration_token(max_uses: Option<u32>) -> (RegistrationToken, RegistrationSecret) {
    let secret = RegistrationSecret::generate();
    let token = RegistrationToken {
        id: uuid::Uuid::new_v4(),
        digest: secret.digest(),
        label: "lab workstations".into(),
        created_at: t0(),
        expires_at: t0() + chrono::Duration::hours(1),
        max_uses,
        uses: 0,
        revoked_at: None,
    };
    (token, secret)
}

/// A machine `name` with identity `identity` (padded to a valid length).
pub fn machine(name: &str, identity: &str) -> MachineRegistration {
    MachineRegistration {
        hostname: host(name),
        machine_identity: format!("{identity:0>32}"),
        allow_reboot: false,
        address: Some("192.168.1.20".into()),
    }
}

/// A machine registers with a token: its record is `Booting`, registered, with its agent
/// token; registering again (same name, same identity) keeps the record, changes the token
/// and counts no use; another identity cannot take the name, nor one identity two names;
/// a used-up, expired or revoked token registers nothing; tokens list newest first.
pub async fn registration_follows_its_token(store: &dyn VmStore) {
    let (token, secret) = registration_token(Some(2));
    store.create_registration_token(&token).await.unwrap();
    let (open, open_secret) = registration_token(None);
    let open = RegistrationToken {
        created_at: t0() + chrono::Duration::seconds(1),
        ..open
    };
    store.create_registration_token(&open).await.unwrap();
    // Registers machine `name` with `identity` at `at`, with a fresh agent token.
    let register = |secret: &RegistrationSecret, name: &str, identity: &str, at| {
        let request = machine(name, identity);
        let digest = secret.digest();
        async move {
            let agent = AgentToken::generate();
            let result = store.register(&digest, &request, agent.digest(), at).await;
            result.map(|registered| (registered, agent))
        }
    };
    let refused = |result: crate::Result<_>| result.map(drop).unwrap_err().kind();

    let (got, first) = register(&secret, "ws-1", "a", t0()).await.unwrap();
    assert!(!got.again);
    assert_eq!(got.record.state, VmState::Booting);
    assert!(got.record.is_registered());
    let by_token = store.get_by_token(&first.digest()).await.unwrap();
    assert_eq!(by_token.hostname, host("ws-1"));

    // Again: same record, new token, no use counted.
    let (again, _) = register(&secret, "ws-1", "a", t0()).await.unwrap();
    assert!(again.again);
    assert_eq!(again.record.created_at, got.record.created_at);
    assert!(again.record.generation > got.record.generation);
    let gone = store.get_by_token(&first.digest()).await.unwrap_err();
    assert_eq!(
        gone.kind(),
        ErrorKind::NotFound,
        "the old agent token stops working"
    );

    // Another machine cannot take the name; one machine cannot take two names; a VM a
    // provisioner created keeps its name.
    assert_eq!(
        refused(register(&secret, "ws-1", "b", t0()).await),
        ErrorKind::Conflict
    );
    assert_eq!(
        refused(register(&secret, "ws-9", "a", t0()).await),
        ErrorKind::Conflict
    );
    seed_available(store, 1).await;
    assert_eq!(
        refused(register(&secret, "vm-0000", "c", t0()).await),
        ErrorKind::Conflict
    );

    // The second use, then the token is used up for new machines only.
    register(&secret, "ws-2", "d", t0()).await.unwrap();
    let used_up = refused(register(&secret, "ws-3", "e", t0()).await);
    assert_eq!(used_up, ErrorKind::Unauthenticated);
    assert!(register(&secret, "ws-2", "d", t0()).await.unwrap().0.again);

    // Unknown and expired tokens.
    let unknown = RegistrationSecret::generate();
    let refusal = refused(register(&unknown, "ws-4", "f", t0()).await);
    assert_eq!(refusal, ErrorKind::Unauthenticated);
    let expired = refused(register(&open_secret, "ws-4", "f", open.expires_at).await);
    assert_eq!(expired, ErrorKind::Unauthenticated);

    // Revoked: nothing more registers with it; revoking again keeps the first time.
    let revoked = store
        .revoke_registration_token(open.id, t0())
        .await
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(t0()));
    let later = t0() + chrono::Duration::seconds(5);
    let again = store
        .revoke_registration_token(open.id, later)
        .await
        .unwrap();
    assert_eq!(again.revoked_at, Some(t0()));
    let refusal = refused(register(&open_secret, "ws-4", "f", t0()).await);
    assert_eq!(refusal, ErrorKind::Unauthenticated);
    let unknown = store
        .revoke_registration_token(uuid::Uuid::new_v4(), t0())
        .await;
    assert_eq!(unknown.unwrap_err().kind(), ErrorKind::NotFound);
    assert!(
        store.get(&host("ws-4")).await.unwrap_err().is_not_found(),
        "nothing recorded"
    );

    let tokens = store.registration_tokens().await.unwrap();
    let ids: Vec<_> = tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, [open.id, token.id], "newest first");
    assert_eq!(tokens[1].uses, 2);
}

/// Machines racing with a token for `n` machines: exactly `n` register.
pub async fn a_token_never_registers_more_machines_than_allowed(store: &dyn VmStore) {
    let (token, secret) = registration_token(Some(3));
    store.create_registration_token(&token).await.unwrap();
    let digest = secret.digest();
    let machines: Vec<MachineRegistration> = (0..12)
        .map(|i| machine(&format!("race-{i}"), &format!("id{i}")))
        .collect();
    let results = join_all(
        machines
            .iter()
            .map(|m| store.register(&digest, m, AgentToken::generate().digest(), t0())),
    )
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3, "exactly max_uses machines registered");
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| e.kind() == ErrorKind::Unauthenticated));
    assert_eq!(store.registration_tokens().await.unwrap()[0].uses, 3);
    assert_eq!(store.list(&VmFilter::default()).await.unwrap().len(), 3);
}
