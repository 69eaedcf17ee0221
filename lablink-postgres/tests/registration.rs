//! Registered machines on PostgreSQL: the registration survives every write path and other
//! processes, a token's uses never pass `max_uses` across processes, and the schema refuses a
//! half-written registration.

mod common;

use chrono::Duration;
use futures::future::join_all;
use lablink_core::testing::store::{claim_request, machine, registration_token, t0};
use lablink_core::{AgentToken, ErrorKind, Telemetry, VmEvent, VmFilter, VmStore};
use lablink_postgres::PgVmStore;
use sqlx::PgPool;

use common::replica_pool;

/// A registered machine keeps its registration through the claim, `apply` and telemetry
/// writes, and another process reads it back.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn the_registration_survives_every_write_and_other_processes(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let (token, secret) = registration_token(None);
    store.create_registration_token(&token).await.unwrap();
    let mut m = machine("ws-1", "keep");
    m.allow_reboot = true;
    let got = store
        .register(&secret.digest(), &m, AgentToken::generate().digest(), t0())
        .await
        .unwrap();
    let registration = got.record.registration.clone().expect("registered");
    assert!(registration.allow_reboot);

    let now = t0() + Duration::seconds(1);
    store
        .apply(&m.hostname, &VmEvent::AgentReady, None, now)
        .await
        .unwrap();
    store
        .record_telemetry(
            &m.hostname,
            &Telemetry {
                in_use: Some(true),
                ..Default::default()
            },
            now,
        )
        .await
        .unwrap();
    let claimed = store.claim(&claim_request("amy"), now).await.unwrap();
    assert_eq!(claimed.record.hostname, m.hostname);
    assert_eq!(claimed.record.registration.as_ref(), Some(&registration));

    let other = PgVmStore::new(replica_pool(&pool, 2, "other").await);
    let read = other.get(&m.hostname).await.unwrap();
    assert_eq!(read, claimed.record);
    assert_eq!(
        other.list(&VmFilter::default()).await.unwrap(),
        vec![read.clone()]
    );

    // Registering again keeps the assignment and takes the owner's new choice.
    m.allow_reboot = false;
    let again = other
        .register(&secret.digest(), &m, AgentToken::generate().digest(), now)
        .await
        .unwrap();
    assert!(again.again);
    assert_eq!(again.record.assignment, read.assignment);
    assert_eq!(
        store.get(&m.hostname).await.unwrap().registration,
        Some(lablink_core::registration::Registration {
            machine_identity: m.machine_identity.clone(),
            allow_reboot: false,
        })
    );
}

/// Machines racing through separate pools (separate processes) with a token for 3 machines:
/// exactly 3 register and the token counts 3 uses.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn a_token_is_never_overused_across_processes(pool: PgPool) {
    let (token, secret) = registration_token(Some(3));
    PgVmStore::new(pool.clone())
        .create_registration_token(&token)
        .await
        .unwrap();
    let mut stores = Vec::new();
    for i in 0..4 {
        stores.push(PgVmStore::new(
            replica_pool(&pool, 4, &format!("replica-{i}")).await,
        ));
    }
    let digest = secret.digest();
    let machines: Vec<_> = (0..16)
        .map(|i| machine(&format!("race-{i}"), &format!("id{i}")))
        .collect();
    let results = join_all(machines.iter().enumerate().map(|(i, m)| {
        stores[i % stores.len()].register(&digest, m, AgentToken::generate().digest(), t0())
    }))
    .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    }
    let store = &stores[0];
    assert_eq!(store.registration_tokens().await.unwrap()[0].uses, 3);
    assert_eq!(store.list(&VmFilter::default()).await.unwrap().len(), 3);
}

/// One machine racing to register under two names (with two tokens, so nothing serializes
/// them but the unique index): exactly one name wins, the other gets `Conflict`.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn one_machine_never_gets_two_names(pool: PgPool) {
    for round in 0..10 {
        let (a, a_secret) = registration_token(None);
        let (b, b_secret) = registration_token(None);
        let store = PgVmStore::new(pool.clone());
        store.create_registration_token(&a).await.unwrap();
        store.create_registration_token(&b).await.unwrap();
        let other = PgVmStore::new(replica_pool(&pool, 2, "other").await);
        let identity = format!("same{round}");
        let (one, two) = (
            machine(&format!("one-{round}"), &identity),
            machine(&format!("two-{round}"), &identity),
        );
        let (a_digest, b_digest) = (a_secret.digest(), b_secret.digest());
        let (x, y) = tokio::join!(
            store.register(&a_digest, &one, AgentToken::generate().digest(), t0()),
            other.register(&b_digest, &two, AgentToken::generate().digest(), t0()),
        );
        let errors: Vec<_> = [&x, &y]
            .into_iter()
            .filter_map(|r| r.as_ref().err())
            .collect();
        assert_eq!(errors.len(), 1, "round {round}: {x:?} {y:?}");
        assert_eq!(errors[0].kind(), ErrorKind::Conflict, "{}", errors[0]);
        let uses: u32 = store
            .registration_tokens()
            .await
            .unwrap()
            .iter()
            .filter(|t| t.id == a.id || t.id == b.id)
            .map(|t| t.uses)
            .sum();
        assert_eq!(uses, 1, "round {round}: only the winner counts a use");
    }
}

/// The schema refuses a registration with only one of its two columns, one identity under two
/// names, and token rows whose uses pass their limit.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn the_schema_refuses_inconsistent_registrations(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let (token, secret) = registration_token(Some(1));
    store.create_registration_token(&token).await.unwrap();
    let m = machine("ws-1", "schema");
    store
        .register(&secret.digest(), &m, AgentToken::generate().digest(), t0())
        .await
        .unwrap();
    for statement in [
        "UPDATE lablink_vms SET allow_reboot = NULL",
        "UPDATE lablink_registration_tokens SET uses = 2",
        "UPDATE lablink_registration_tokens SET max_uses = 0",
    ] {
        let err = sqlx::query(statement).execute(&pool).await.unwrap_err();
        let db = err.as_database_error().expect("a database error");
        assert!(db.is_check_violation(), "{statement}: {db}");
    }
    // The identity under a second name.
    let copy = sqlx::query(
        "INSERT INTO lablink_vms (hostname, state, gpu_health, in_use, restarts, generation, \
             created_at, updated_at, state_changed_at, machine_identity, allow_reboot) \
         SELECT 'ws-2', state, gpu_health, in_use, restarts, generation, created_at, \
             updated_at, state_changed_at, machine_identity, allow_reboot \
         FROM lablink_vms WHERE hostname = 'ws-1'",
    )
    .execute(&pool)
    .await
    .unwrap_err();
    let db = copy.as_database_error().expect("a database error");
    assert!(db.is_unique_violation(), "{db}");
    assert_eq!(db.constraint(), Some("lablink_vms_machine_identity_key"));
    // A token for zero machines is refused as bad input.
    let (mut zero, _) = registration_token(Some(1));
    zero.max_uses = Some(0);
    let err = store.create_registration_token(&zero).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    // The same id twice is a conflict.
    let err = store.create_registration_token(&token).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
}
