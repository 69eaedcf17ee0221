//! Bad input and conflicting writers get typed errors and leave the rows consistent.

mod common;

use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use lablink_core::testing::store::{claim_request, host};
use lablink_core::{
    Assignment, ErrorKind, LogAppend, LogStream, Telemetry, VmEvent, VmRecord, VmState, VmStore,
};
use lablink_postgres::PgVmStore;
use sqlx::PgPool;

use common::seed_available;

/// The byte accounting of every stream equals the bytes its lines really hold.
async fn assert_log_accounting_consistent(pool: &PgPool) {
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM lablink_vm_log_streams s \
         WHERE s.bytes <> (SELECT COALESCE(sum(octet_length(l.line) + 1), 0) \
                           FROM lablink_vm_log_lines l \
                           WHERE l.hostname = s.hostname AND l.stream = s.stream)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(mismatched, 0, "log byte accounting drifted");
}

fn logs(stream: LogStream, lines: Vec<String>, cap: usize) -> Telemetry {
    Telemetry {
        logs: vec![LogAppend { stream, lines }],
        log_cap_bytes: cap,
        ..Default::default()
    }
}

/// A 5 MiB batch into a 1 MiB log keeps the newest lines and never exceeds the cap.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn oversized_logs_keep_the_newest_lines_within_the_cap(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let h = seed_available(&store, 1).await.remove(0);
    let cap = 1024 * 1024;
    let lines: Vec<String> = (0..50_000)
        .map(|i| format!("{i:08} {}", "x".repeat(95)))
        .collect();
    store
        .record_telemetry(&h, &logs(LogStream::Container, lines, cap), Utc::now())
        .await
        .unwrap();
    let more: Vec<String> = (50_000..50_100).map(|i| format!("{i:08} tail")).collect();
    store
        .record_telemetry(&h, &logs(LogStream::Container, more, cap), Utc::now())
        .await
        .unwrap();
    let text = store.logs(&h).await.unwrap().container;
    assert!(text.len() <= cap, "cap exceeded: {}", text.len());
    assert!(
        text.len() > cap - 200,
        "dropped more than needed: {}",
        text.len()
    );
    assert!(text.ends_with("00050099 tail"), "newest line lost");
    assert!(!text.contains("00000000 "), "oldest line kept");
    let one_line = vec!["y".repeat(3 * cap)];
    store
        .record_telemetry(&h, &logs(LogStream::Agent, one_line, cap), Utc::now())
        .await
        .unwrap();
    assert_eq!(store.logs(&h).await.unwrap().agent.len(), cap - 1);
    assert_log_accounting_consistent(&pool).await;
}

/// Text PostgreSQL cannot store (a NUL byte) is `InvalidInput`; nothing of the batch lands.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn unstorable_text_is_invalid_input_and_changes_nothing(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let h = seed_available(&store, 1).await.remove(0);
    let before = store.get(&h).await.unwrap();
    let mut t = logs(
        LogStream::CloudInit,
        vec!["ok".into(), "bad\0line".into()],
        4096,
    );
    t.in_use = Some(true);
    let err = store
        .record_telemetry(&h, &t, Utc::now())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(!err.is_retryable());
    let t = Telemetry {
        heartbeat: Some("boot\0id".into()),
        ..Default::default()
    };
    let err = store
        .record_telemetry(&h, &t, Utc::now())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert_eq!(
        store.get(&h).await.unwrap(),
        before,
        "a failed batch changed the VM"
    );
    assert_eq!(store.logs(&h).await.unwrap().cloud_init, "");
    assert_log_accounting_consistent(&pool).await;
}

/// Unknown hostnames are `NotFound` for every write, and nothing is created for them.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn unknown_hostnames_are_not_found_and_create_nothing(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let ghost = host("ghost");
    let t = logs(LogStream::Agent, vec!["hello".into()], 4096);
    let err = store
        .record_telemetry(&ghost, &t, Utc::now())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = store
        .apply(&ghost, &VmEvent::Destroy, Some(1), Utc::now())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM lablink_vms) + (SELECT count(*) FROM lablink_vm_log_lines) \
         + (SELECT count(*) FROM lablink_vm_log_streams)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, 0);
}

/// Illegal transitions are `InvalidTransition` and leave the row exactly as it was.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn illegal_transitions_leave_the_row_unchanged(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let h = seed_available(&store, 1).await.remove(0);
    store
        .apply(&h, &VmEvent::Destroy, None, Utc::now())
        .await
        .unwrap();
    store
        .apply(&h, &VmEvent::Terminated, None, Utc::now())
        .await
        .unwrap();
    let before = store.get(&h).await.unwrap();
    for event in [
        VmEvent::AgentReady,
        VmEvent::Destroy,
        VmEvent::Release,
        VmEvent::Reboot,
    ] {
        let err = store.apply(&h, &event, None, Utc::now()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidTransition, "{}", event.name());
    }
    assert_eq!(store.get(&h).await.unwrap(), before);
    assert_eq!(before.state, VmState::Terminated);
}

/// Twenty writers holding the same generation: exactly one wins, the rest get `Conflict`.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn concurrent_conflicting_updates_let_exactly_one_win(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let h = seed_available(&store, 1).await.remove(0);
    let g = store.get(&h).await.unwrap().generation;
    let events: Vec<VmEvent> = (0..20)
        .map(|i| match i % 2 {
            0 => VmEvent::Reboot,
            _ => VmEvent::MarkUnhealthy {
                reason: format!("writer {i}"),
            },
        })
        .collect();
    let results = join_all(
        events
            .iter()
            .map(|e| store.apply(&h, e, Some(g), Utc::now())),
    )
    .await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one writer wins");
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
    }
    let now = store.get(&h).await.unwrap();
    assert_eq!(&now, winners[0]);
    assert_eq!(now.generation, g + 1);
}

/// Concurrent log appends to one stream keep the cap and the accounting exact.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn concurrent_log_appends_keep_the_cap(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let h = seed_available(&store, 1).await.remove(0);
    let cap = 4096;
    let batches: Vec<Telemetry> = (0..20)
        .map(|w| {
            let lines = (0..40)
                .map(|i| format!("writer {w:02} line {i:02}"))
                .collect();
            logs(LogStream::CloudInit, lines, cap)
        })
        .collect();
    for r in join_all(
        batches
            .iter()
            .map(|t| store.record_telemetry(&h, t, Utc::now())),
    )
    .await
    {
        r.unwrap();
    }
    let text = store.logs(&h).await.unwrap().cloud_init;
    assert!(text.len() <= cap, "cap exceeded: {}", text.len());
    assert!(text.len() > cap - 40, "dropped more than needed");
    assert_log_accounting_consistent(&pool).await;
}

/// A batch that would give one email two VMs is a `Conflict` and inserts nothing.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn inserting_a_second_vm_for_an_email_is_a_conflict_and_inserts_nothing(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    seed_available(&store, 1).await;
    let c = store
        .claim(&claim_request("ada"), Utc::now())
        .await
        .unwrap();
    let owned = c.record.assignment.clone().unwrap();
    let mut second = VmRecord::new(host("vm-second"), None, Utc::now());
    second.state = VmState::Assigned;
    second.assignment = Some(Assignment { ..owned });
    let err = store
        .insert(&[VmRecord::new(host("vm-first"), None, Utc::now()), second])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(store
        .get(&host("vm-first"))
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(store.counts().await.unwrap().total, 1);
}

/// A hand-edited row that LabLink cannot read is an `Internal` error, not a panic.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn an_unreadable_row_is_an_internal_error(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let h = seed_available(&store, 1).await.remove(0);
    sqlx::query("UPDATE lablink_vms SET gpu_health = 'purple' WHERE hostname = $1")
        .bind(h.as_str())
        .execute(&pool)
        .await
        .unwrap();
    let err = store.get(&h).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.to_string().contains("gpu_health"), "{err}");
    // Claims skip nothing silently: the unreadable VM is reported, not handed out.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        store.claim(&claim_request("bob"), Utc::now()),
    )
    .await
    .expect("claim returns")
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
}

/// A row PostgreSQL refuses for a CHECK reports it without the row: PostgreSQL's `DETAIL`
/// ("Failing row contains (...)") would carry the Chrome Remote Desktop command and the PIN
/// into debug output and logs.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn a_refused_row_keeps_its_command_and_pin_out_of_the_error(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let command = "DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"4/0AsecretCODE\" --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\" --name=$(hostname)";
    let mut refused = VmRecord::new(host("vm-refused"), None, Utc::now());
    // Available with an assignment: the assignment-only-when-owned CHECK refuses it.
    refused.assignment = Some(Assignment {
        email: "ada@example.org".parse().unwrap(),
        crd_command: Some(command.parse().unwrap()),
        pin: "987654".parse().unwrap(),
        assigned_at: Utc::now(),
        desktop: lablink_core::DesktopSession::new(Utc::now()),
    });
    let err = store.insert(&[refused]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let debug = format!("{err:?}");
    assert!(debug.contains("23514"), "the SQLSTATE is kept: {debug}");
    for shown in [err.to_string(), debug] {
        for secret in ["4/0AsecretCODE", "987654"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
    assert!(store
        .get(&host("vm-refused"))
        .await
        .unwrap_err()
        .is_not_found());
}

/// Constructors never migrate: a store on an empty database answers `InvalidConfig` naming
/// `setup()` and creates no table; `setup()` from three replicas at once (and again later)
/// then makes it usable.
#[sqlx::test(migrations = false)]
async fn an_unmigrated_database_is_reported_not_silently_migrated(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let err = store.get(&host("vm-a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("setup()"), "{err}");
    let tables: Option<String> = sqlx::query_scalar("SELECT to_regclass('lablink_vms')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tables, None, "a constructor created the tables");

    let setups = join_all((0..3).map(|_| lablink_postgres::setup(&pool))).await;
    assert!(setups.iter().all(Result::is_ok), "{setups:?}");
    lablink_postgres::setup(&pool).await.unwrap();
    seed_available(&store, 1).await;
    assert_eq!(store.counts().await.unwrap().total, 1);
}
