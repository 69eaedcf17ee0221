//! The [`ArtifactStore`] conformance suite: one function per behaviour of its contract.

use crate::{ArtifactStore, ErrorKind};

/// A key unique to this run, so suites can share a bucket or directory.
fn prefix() -> String {
    format!("suite-{}/", uuid::Uuid::new_v4().simple())
}

/// `put` then `get` gives the bytes back; a second `put` replaces them.
pub async fn put_then_get_round_trips_and_replaces(store: &dyn ArtifactStore) {
    let key = format!("{}a/b/blob.bin", prefix());
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    store.put(&key, bytes.clone()).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), bytes, "round trip");
    store.put(&key, b"second".to_vec()).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), b"second", "replaced");
    store.put(&key, Vec::new()).await.unwrap();
    assert!(store.get(&key).await.unwrap().is_empty(), "empty blob");
}

/// `get` of a missing key is `NotFound`; deleting twice succeeds and the key is gone.
pub async fn missing_keys_are_not_found_and_delete_is_idempotent(store: &dyn ArtifactStore) {
    let key = format!("{}gone.json", prefix());
    let e = store.get(&key).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    store.put(&key, b"{}".to_vec()).await.unwrap();
    store.delete(&key).await.unwrap();
    store.delete(&key).await.unwrap();
    let e = store.get(&key).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

/// `list` gives exactly the keys under the prefix, in key order, with their sizes.
pub async fn list_gives_the_keys_under_a_prefix_in_order_with_sizes(store: &dyn ArtifactStore) {
    let p = prefix();
    for (key, len) in [("b/2", 2), ("a", 1), ("b/1", 10), ("c/d/e", 0)] {
        store.put(&format!("{p}{key}"), vec![7; len]).await.unwrap();
    }
    store.put(&format!("{p}x"), vec![1]).await.unwrap();
    store.delete(&format!("{p}x")).await.unwrap();
    let listed: Vec<(String, u64)> = store
        .list(&p)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.key.strip_prefix(&p).unwrap().to_owned(), a.size))
        .collect();
    assert_eq!(
        listed,
        [
            ("a".to_owned(), 1),
            ("b/1".to_owned(), 10),
            ("b/2".to_owned(), 2),
            ("c/d/e".to_owned(), 0)
        ]
    );
    let under_b = store.list(&format!("{p}b/")).await.unwrap();
    assert_eq!(under_b.len(), 2);
    assert!(store.list(&format!("{p}zzz")).await.unwrap().is_empty());
    // Prefixes that no valid key can start with match nothing, and never reach outside.
    for odd in [format!("{p}b//"), format!("{p}../"), "../".to_owned()] {
        assert!(store.list(&odd).await.unwrap().is_empty(), "{odd}");
    }
}

/// Empty, `..`, absolute and control-character keys are `InvalidInput`, never stored.
pub async fn invalid_keys_are_rejected(store: &dyn ArtifactStore) {
    for key in [
        "",
        "../escape",
        "a/../../b",
        "/abs",
        "a//b",
        "a/./b",
        "tab\there",
        "a\\b",
    ] {
        let e = store.put(key, b"x".to_vec()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "put {key:?}: {e}");
        let e = store.get(key).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "get {key:?}: {e}");
    }
}

/// `put_file` stores a file's content and `get_file` writes it back; a missing key is
/// `NotFound`.
pub async fn files_round_trip(store: &dyn ArtifactStore) {
    let dir = tempfile_dir();
    let source = dir.join("source.bin");
    let bytes: Vec<u8> = (0..=250u8).cycle().take(1_000_003).collect();
    std::fs::write(&source, &bytes).unwrap();
    let key = format!("{}files/blob.bin", prefix());
    store.put_file(&key, &source).await.unwrap();
    assert_eq!(
        store.get(&key).await.unwrap(),
        bytes,
        "put_file stored the file"
    );
    let target = dir.join("target.bin");
    std::fs::write(&target, b"old content, longer than nothing").unwrap();
    store.get_file(&key, &target).await.unwrap();
    assert_eq!(
        std::fs::read(&target).unwrap(),
        bytes,
        "get_file wrote it back"
    );
    let e = store
        .get_file(&format!("{}files/missing", prefix()), &dir.join("x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory under the system temp dir.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lablink-suite-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
