//! The [`Notifier`] conformance suite.

use std::time::Duration;

use futures::future::join_all;

use super::store::host;
use super::PATIENCE;
use crate::notifier::{Subscription, Wake};
use crate::Notifier;

/// Waits for the next wake of `sub`, failing the test after [`PATIENCE`].
pub async fn next_wake(sub: &mut Subscription, what: &str) -> Wake {
    match tokio::time::timeout(PATIENCE, sub.next()).await {
        Ok(Some(wake)) => wake,
        Ok(None) => panic!("{what}: the subscription ended"),
        Err(_) => panic!("{what}: no wake-up within {PATIENCE:?}"),
    }
}

/// A subscriber is woken by a publish on its hostname.
pub async fn a_subscriber_is_woken_by_publish(notifier: &dyn Notifier) {
    let h = host("vm-1");
    let mut sub = notifier.subscribe(&h).await.unwrap();
    notifier.publish(&h).await.unwrap();
    next_wake(&mut sub, "vm-1").await;
}

/// Every subscriber of one hostname is woken by one publish.
pub async fn every_subscriber_of_a_hostname_is_woken(notifier: &dyn Notifier) {
    let h = host("vm-shared");
    let mut subs = Vec::new();
    for _ in 0..10 {
        subs.push(notifier.subscribe(&h).await.unwrap());
    }
    notifier.publish(&h).await.unwrap();
    join_all(subs.iter_mut().map(|s| next_wake(s, "shared"))).await;
}

/// A publish on another hostname does not wake a subscriber with `Changed`.
pub async fn other_hostnames_do_not_wake_a_subscriber(notifier: &dyn Notifier) {
    let (mine, other) = (host("vm-mine"), host("vm-other"));
    let mut sub = notifier.subscribe(&mine).await.unwrap();
    let mut witness = notifier.subscribe(&other).await.unwrap();
    notifier.publish(&other).await.unwrap();
    // Once the other hostname's subscriber has its wake-up, ours would have had it too.
    next_wake(&mut witness, "vm-other").await;
    match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
        Err(_) | Ok(Some(Wake::Resync)) => {}
        Ok(Some(Wake::Changed)) => panic!("woken by another hostname's publish"),
        Ok(None) => panic!("the subscription ended"),
    }
}

/// Publishing with nobody listening succeeds.
pub async fn publish_without_subscribers_succeeds(notifier: &dyn Notifier) {
    for i in 0..100 {
        notifier
            .publish(&host(&format!("nobody-{i}")))
            .await
            .unwrap();
    }
}

/// After a subscription is dropped, a new one on the same hostname still works.
pub async fn resubscribing_after_drop_works(notifier: &dyn Notifier) {
    let h = host("vm-again");
    let sub = notifier.subscribe(&h).await.unwrap();
    drop(sub);
    notifier.publish(&h).await.unwrap();
    let mut sub = notifier.subscribe(&h).await.unwrap();
    notifier.publish(&h).await.unwrap();
    next_wake(&mut sub, "vm-again").await;
}

/// 200 hostnames, each with its own subscriber, each woken by its own publish.
pub async fn many_hostnames_each_get_their_own_wake(notifier: &dyn Notifier) {
    let hosts: Vec<_> = (0..200).map(|i| host(&format!("vm-{i}"))).collect();
    let mut subs = Vec::new();
    for h in &hosts {
        subs.push(notifier.subscribe(h).await.unwrap());
    }
    join_all(hosts.iter().map(|h| notifier.publish(h)))
        .await
        .into_iter()
        .collect::<crate::Result<Vec<()>>>()
        .unwrap();
    join_all(subs.iter_mut().map(|s| next_wake(s, "many"))).await;
}
