//! Admin sessions that every replica accepts: a browser signed in on one replica is signed in
//! on every replica sharing the store (or the configured session key), with the same CSRF
//! token; a replica with another key, an expired cookie, a cookie whose session was signed out
//! on another replica and a tampered cookie are all refused (JSON 401, browsers sent to the
//! sign-in page). The last test runs two replicas on one real PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use lablink::http::{CookieKey, HttpOptions};
use lablink::{LabLink, MemoryVmStore};
use lablink_testkit::{expect_error, form_csrf, TestServer, ADMIN_PASSWORD};
use reqwest::header::{ACCEPT, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;

/// A replica on `store`, with options changed by `tune`.
async fn replica(store: &MemoryVmStore, tune: impl FnOnce(&mut HttpOptions)) -> TestServer {
    TestServer::start_with(LabLink::builder().with_store(Arc::new(store.clone())), tune).await
}

/// Two replicas sharing one in-memory store (as two processes share one PostgreSQL), no
/// session key configured.
async fn two_replicas() -> (TestServer, TestServer) {
    let store = MemoryVmStore::new();
    (replica(&store, |_| {}).await, replica(&store, |_| {}).await)
}

/// Whether `s` takes `session` as a signed-in admin: `Some(true)` when both a script-style
/// read and the admin page are served, `Some(false)` when both are refused as today (JSON
/// 401; a browser page is sent to the sign-in page); panics on anything else.
async fn accepts(s: &TestServer, session: &str) -> bool {
    let json = s
        .client
        .get(s.url("/api/v1/vms"))
        .header(COOKIE, session)
        .header(ACCEPT, "application/json")
        .send()
        .await
        .unwrap();
    let page = s
        .client
        .get(s.url("/admin"))
        .header(COOKIE, session)
        .header(ACCEPT, "text/html")
        .send()
        .await
        .unwrap();
    match (json.status(), page.status()) {
        (StatusCode::OK, StatusCode::OK) => true,
        (StatusCode::UNAUTHORIZED, StatusCode::SEE_OTHER) => {
            assert_eq!(page.headers()[LOCATION], "/admin/login");
            expect_error(json, 401).await;
            false
        }
        other => panic!("neither accepted nor refused as an anonymous caller: {other:?}"),
    }
}

/// Launches one VM through `s`'s admin form with `session` and `csrf`; the status.
async fn launch_form(s: &TestServer, session: &str, csrf: Option<&str>) -> StatusCode {
    let mut form = vec![("num_vms", "1")];
    if let Some(csrf) = csrf {
        form.push(("csrf", csrf));
    }
    s.client
        .post(s.url("/admin/launch"))
        .header(COOKIE, session)
        .form(&form)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn a_session_made_on_one_replica_is_honoured_by_another_on_the_same_store() {
    let (a, b) = two_replicas().await;
    let (session, csrf) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    assert!(accepts(&b, &session).await, "replica B knows A's session");
    assert_eq!(
        b.admin_page_csrf(&session).await,
        csrf,
        "B's forms carry the same CSRF token"
    );
    // A CSRF-protected form on B, with the session made on A: refused without the token
    // or with a wrong one, done with it.
    assert_eq!(launch_form(&b, &session, None).await, StatusCode::FORBIDDEN);
    assert_eq!(
        launch_form(&b, &session, Some("forged")).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(b.allocator.counts().await.unwrap().total, 0);
    assert_eq!(
        launch_form(&b, &session, Some(&csrf)).await,
        StatusCode::SEE_OTHER
    );
    assert_eq!(a.allocator.counts().await.unwrap().total, 1);
    assert!(accepts(&a, &session).await, "and A still does");
}

#[tokio::test]
async fn replicas_configured_with_one_session_key_share_sessions_without_sharing_a_store() {
    let key = CookieKey::from_secret("the [admin] session_secret of both replicas");
    let a = replica(&MemoryVmStore::new(), |o| o.session_key = Some(key.clone())).await;
    let b = replica(&MemoryVmStore::new(), |o| o.session_key = Some(key.clone())).await;
    let (session, csrf) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    assert!(accepts(&b, &session).await);
    assert_eq!(b.admin_page_csrf(&session).await, csrf);
}

#[tokio::test]
async fn a_replica_with_another_key_refuses_the_session() {
    let store = MemoryVmStore::new();
    let a = replica(&store, |_| {}).await;
    // The same store but a configured key of its own; a store (so a stored key) of its own.
    let configured = replica(&store, |o| {
        o.session_key = Some(CookieKey::from_secret("another key"))
    })
    .await;
    let elsewhere = replica(&MemoryVmStore::new(), |_| {}).await;
    let (session, csrf) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    assert!(accepts(&a, &session).await);
    for other in [&configured, &elsewhere] {
        assert!(!accepts(other, &session).await, "{}", other.base);
        assert_eq!(
            launch_form(other, &session, Some(&csrf)).await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(a.allocator.counts().await.unwrap().total, 0);
}

#[tokio::test]
async fn a_session_ends_on_every_replica_when_it_expires() {
    let store = MemoryVmStore::new();
    let ttl = |o: &mut HttpOptions| o.session_ttl = Duration::from_secs(2);
    let (a, b) = (replica(&store, ttl).await, replica(&store, ttl).await);
    let (session, csrf) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    assert!(accepts(&b, &session).await);
    // The cookie's expiry is in whole seconds, at most the TTL from the sign-in.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(!accepts(&a, &session).await, "expired on A");
    assert!(!accepts(&b, &session).await, "expired on B");
    assert_eq!(
        launch_form(&b, &session, Some(&csrf)).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn signing_out_on_one_replica_ends_the_session_on_every_replica() {
    let (a, b) = two_replicas().await;
    let (session, csrf) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    let (other, _) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    assert!(accepts(&b, &session).await);
    // Sign-out is a CSRF-protected form too.
    let r = b
        .client
        .post(b.url("/admin/logout"))
        .header(COOKIE, &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        accepts(&a, &session).await,
        "a refused sign-out ends nothing"
    );
    let r = b.sign_out(&session, &csrf).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/admin/login");
    let cleared = r.headers()[SET_COOKIE].to_str().unwrap();
    assert!(
        cleared.starts_with("lablink_admin=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    // The browser forgets it, but whoever copied the cookie is refused everywhere too.
    assert!(!accepts(&a, &session).await, "signed out on A");
    assert!(!accepts(&b, &session).await, "signed out on B");
    assert_eq!(
        launch_form(&a, &session, Some(&csrf)).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(
        accepts(&b, &other).await,
        "another session of the same admin lives on"
    );
    // Signing in again gives a new session, which both take.
    let (again, _) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    assert!(accepts(&b, &again).await);
}

#[tokio::test]
async fn a_tampered_session_cookie_is_refused_by_every_replica() {
    let (a, b) = two_replicas().await;
    let (session, _) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    let value = session.strip_prefix("lablink_admin=").unwrap();
    let parts: Vec<&str> = value.split('.').collect();
    assert_eq!(parts.len(), 3, "id, expiry, tag: {value}");
    let expires: i64 = parts[1].parse().unwrap();
    let (other_session, _) = b.sign_in(ADMIN_PASSWORD).await.unwrap();
    let other_tag = other_session.rsplit('.').next().unwrap();
    let flip = |s: &str| {
        let mut chars: Vec<char> = s.chars().collect();
        chars[0] = if chars[0] == 'A' { 'B' } else { 'A' };
        chars.into_iter().collect::<String>()
    };
    let tampered = [
        format!("{}.{}.{}", parts[0], expires + 86_400, parts[2]),
        format!("{}.{}.{}", flip(parts[0]), parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], parts[1], flip(parts[2])),
        format!("{}.{}.{}", parts[0], parts[1], other_tag),
        format!("{}.{}", parts[0], parts[1]),
        parts[0].to_owned(),
        // What a cookie of the old in-memory sessions looked like: a bare random token.
        "Zm9yZ2VkIHNlc3Npb24gaWQgb2YgdGhlIG9sZCBraW5kIQ".to_owned(),
        "garbage".to_owned(),
        String::new(),
    ];
    for value in &tampered {
        let cookie = format!("lablink_admin={value}");
        assert!(!accepts(&a, &cookie).await, "A took {value:?}");
        assert!(!accepts(&b, &cookie).await, "B took {value:?}");
    }
    assert!(
        accepts(&b, &session).await,
        "the untouched cookie still works"
    );
}

/// Two replicas, each with its own pool, on one real PostgreSQL and no session key
/// configured: they agree on the key kept in the database (even when both need it at the
/// same moment), a session made on A works on B with a CSRF-protected form, and signing out
/// on B ends it on A. The stored key reaches no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgres_share_sessions_and_sign_outs() {
    use sqlx::Row;

    let logs = lablink_testkit::captured_logs();
    let db = lablink_testkit::TestDatabase::create().await;
    let (pool_a, pool_b) = (db.pool(5).await, db.pool(5).await);
    let replica = |pool: sqlx::PgPool| async move {
        let store = lablink::postgres::PgVmStore::new(pool);
        TestServer::start_with(LabLink::builder().with_store(Arc::new(store)), |_| {}).await
    };
    let (a, b) = (replica(pool_a.clone()).await, replica(pool_b.clone()).await);

    // Both fetch the key at once (a session cookie makes them look for it).
    let probe = "lablink_admin=bm90aGluZw.99999999999.AAAA";
    let (on_a, on_b) = tokio::join!(accepts(&a, probe), accepts(&b, probe));
    assert!(!on_a && !on_b);
    let (session, csrf) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    assert!(accepts(&b, &session).await, "B takes A's session");
    let page = b
        .client
        .get(b.url("/admin"))
        .header(COOKIE, &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(form_csrf(&page), csrf);
    assert_eq!(
        launch_form(&b, &session, Some(&csrf)).await,
        StatusCode::SEE_OTHER
    );
    assert_eq!(a.allocator.counts().await.unwrap().total, 1);

    let r = b.sign_out(&session, &csrf).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(!accepts(&a, &session).await, "signed out on A too");
    assert!(!accepts(&b, &session).await);
    assert_eq!(
        launch_form(&a, &session, Some(&csrf)).await,
        StatusCode::UNAUTHORIZED
    );

    let rows = sqlx::query("SELECT secret FROM lablink_shared_secrets")
        .fetch_all(&pool_a)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "one key for the deployment");
    let secret: Vec<u8> = rows[0].get("secret");
    assert_eq!(secret.len(), 32);
    let ended: i64 = sqlx::query_scalar("SELECT count(*) FROM lablink_ended_sessions")
        .fetch_one(&pool_a)
        .await
        .unwrap();
    assert_eq!(ended, 1, "the signed-out session is kept until it expires");
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("admin signed in"), "the capture works");
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let debug = format!("{secret:?}");
    assert!(
        !logs.contains(&hex) && !logs.contains(&debug[1..debug.len() - 1]),
        "the stored session key reached a log line"
    );

    pool_a.close().await;
    pool_b.close().await;
    db.drop_database().await;
}
