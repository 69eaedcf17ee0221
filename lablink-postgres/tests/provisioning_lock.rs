//! The provisioning lock's connection never goes back to the pool still holding the
//! advisory lock: not when the lock is released normally, not when taking it is cancelled
//! half-way, not when the runtime holding it shuts down.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use lablink_core::VmStore;
use lablink_postgres::PgVmStore;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

const POOL_SIZE: u32 = 4;
const PATIENCE: Duration = Duration::from_secs(30);

async fn small_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap()
}

/// Advisory locks held by any backend on this database.
async fn advisory_locks(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND d.datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Takes every connection the pool will give and asserts none holds an advisory lock.
async fn assert_no_pooled_connection_is_locked(pool: &PgPool) {
    let mut conns = Vec::new();
    for _ in 0..POOL_SIZE {
        let mut conn = tokio::time::timeout(PATIENCE, pool.acquire())
            .await
            .expect("a pool connection")
            .unwrap();
        let mine: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(
            mine, 0,
            "a pooled connection still holds the provisioning lock"
        );
        conns.push(conn);
    }
}

async fn wait_until_unlocked(admin: &PgPool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while advisory_locks(admin).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the advisory lock outlived its holder"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn a_released_lock_leaves_no_locked_connection(pool: PgPool) {
    let store = PgVmStore::new(small_pool(&pool).await);
    for _ in 0..3 {
        let lock = store.lock_provisioning().await.unwrap();
        assert_eq!(advisory_locks(&pool).await, 1);
        drop(lock);
        wait_until_unlocked(&pool).await;
        assert_no_pooled_connection_is_locked(store.pool()).await;
    }
}

/// `lock_provisioning` cancelled at many points (dropped after its 0th, 1st, 2nd... wake-up):
/// whatever point the cancellation hit, no pooled connection keeps the lock, and the lock
/// can be taken again. (Counting wake-ups, not time: tokio's timers tick in milliseconds,
/// which on a fast machine is longer than taking the lock.)
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn a_cancelled_lock_attempt_leaves_no_locked_connection(pool: PgPool) {
    let store = PgVmStore::new(small_pool(&pool).await);
    let mut cancelled = 0;
    for step in 0..60u32 {
        let mut attempt = Box::pin(store.lock_provisioning());
        let mut wakeups = 0;
        let outcome = std::future::poll_fn(|cx| match attempt.as_mut().poll(cx) {
            Poll::Ready(lock) => Poll::Ready(Some(lock)),
            Poll::Pending if wakeups >= step => Poll::Ready(None),
            Poll::Pending => {
                wakeups += 1;
                Poll::Pending
            }
        })
        .await;
        match outcome {
            Some(lock) => drop(lock.unwrap()),
            None => cancelled += 1,
        }
        drop(attempt); // cancelled here, if it did not complete
        wait_until_unlocked(&pool).await;
        assert_no_pooled_connection_is_locked(store.pool()).await;
    }
    let lock = store.lock_provisioning().await.expect("the lock is free");
    drop(lock);
    assert!(cancelled > 0, "no attempt was cancelled");
}

/// The lock is held by a task on a runtime that shuts down (the task never runs its
/// release): the pool, used from another runtime, has no connection holding the lock, and
/// the lock can be taken again.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn a_runtime_shutting_down_leaves_no_locked_connection(pool: PgPool) {
    let store = PgVmStore::new(small_pool(&pool).await);
    for shutdown in ["drop", "shutdown_background"] {
        let other = store.clone();
        // On a blocking thread, so this test's runtime keeps driving the pool's sockets.
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let lock = other.lock_provisioning().await.unwrap();
                tokio::spawn(async move {
                    let _held = lock;
                    std::future::pending::<()>().await;
                });
                tokio::task::yield_now().await;
            });
            match shutdown {
                "drop" => drop(runtime),
                _ => runtime.shutdown_background(),
            }
        })
        .await
        .unwrap();
        wait_until_unlocked(&pool).await;
        assert_no_pooled_connection_is_locked(store.pool()).await;
        let lock = store
            .lock_provisioning()
            .await
            .unwrap_or_else(|e| panic!("after {shutdown}: {e}"));
        drop(lock);
        wait_until_unlocked(&pool).await;
    }
}
