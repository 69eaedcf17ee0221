//! The artifact store suite against the in-memory and local-directory stores, plus the
//! local store's atomic writes.

use lablink_core::{ArtifactStore, LocalDirArtifactStore, MemoryArtifactStore};

mod memory {
    lablink_core::artifact_store_conformance!(
        #[tokio::test]
        async fn store() -> lablink_core::MemoryArtifactStore {
            lablink_core::MemoryArtifactStore::default()
        }
    );
}

mod local_dir {
    fn dir() -> &'static std::path::Path {
        static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
    }

    lablink_core::artifact_store_conformance!(
        #[tokio::test]
        async fn store() -> lablink_core::LocalDirArtifactStore {
            lablink_core::LocalDirArtifactStore::new(dir())
        }
    );
}

#[tokio::test]
async fn a_local_put_leaves_no_temporary_files_and_keys_stay_inside_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirArtifactStore::new(dir.path().join("store"));
    store.put("x/y.bin", vec![1, 2, 3]).await.unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path().join("store/x"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["y.bin"]);
    assert!(store.put("x/.tmp-abc", vec![1]).await.is_err());
    assert!(store.put("../outside", vec![1]).await.is_err());
    assert!(!dir.path().join("outside").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_list_succeeds_while_blobs_under_its_prefix_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirArtifactStore::new(dir.path());
    store.put("churn/kept", vec![1]).await.unwrap();
    let churn = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                store.put(&format!("churn/{i}"), vec![2; 8]).await.unwrap();
                store.delete(&format!("churn/{i}")).await.unwrap();
            }
        })
    };
    while !churn.is_finished() {
        let listed = store.list("churn/").await.unwrap();
        assert!(listed.iter().any(|a| a.key == "churn/kept"));
    }
    churn.await.unwrap();
}

#[tokio::test]
async fn clones_of_the_memory_store_share_blobs() {
    let a = MemoryArtifactStore::default();
    let b = a.clone();
    a.put("k", b"v".to_vec()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap(), b"v");
}

#[test]
fn collected_paths_follow_one_rule_with_a_reason_for_each_problem() {
    let long = "a/".repeat(lablink_core::artifact::MAX_COLLECTED_PATH / 2) + "b";
    for (path, problem) in [
        ("a/b/labels.slp", None),
        ("a\\b.slp", Some("backslash")),
        ("a\nb.slp", Some("control character")),
        ("a/\u{7f}.slp", Some("control character")),
        (long.as_str(), Some("longer than 4096 bytes")),
        ("", Some("empty")),
        ("a//b", Some("empty")),
        ("a/../b", Some("'..'")),
    ] {
        let got = lablink_core::artifact::collected_path_problem(path);
        match problem {
            None => assert_eq!(got, None, "{path:?}"),
            Some(words) => assert!(got.is_some_and(|g| g.contains(words)), "{path:?}: {got:?}"),
        }
    }
}
