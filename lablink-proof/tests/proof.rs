//! The proof suite's short profile (this crate's `proof`, `scripts/proof.sh ci`), run by the
//! test suite so CI runs it on every change: W1 and W2 with PostgreSQL (W1 on one and on
//! two replicas), W3, then a soak with real and simulated agents on two replicas while
//! faults are injected (kill -9 of a replica, the LISTEN connection terminated, PostgreSQL
//! restarted, an agent paused past its lease, 20% of launches failing), and the invariants
//! checked.
//!
//! Built in the test's own profile (the debug build CI already made, so it adds a link, not
//! a second release build). Needs `DATABASE_URL` with `LABLINK_PG_DATA` and `LABLINK_PG_BIN`
//! (`scripts/with-postgres.sh`, which the test command uses), because one fault restarts
//! PostgreSQL; it fails naming what is missing otherwise.
//!
//! Correctness fails the test; the workloads' speed targets do not (the proof prints "target
//! met" or "target MISSED" for each): CI machines are shared, so a slow run is noise.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The whole profile takes about 3 minutes; a hang fails the test instead of blocking CI.
const PATIENCE: Duration = Duration::from_secs(900);

/// Builds `args` with cargo and returns the executables by target name.
fn build(args: &[&str]) -> Vec<(String, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .arg("build")
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(out.status.success(), "cargo build {args:?} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| {
            Some((
                m["target"]["name"].as_str()?.to_owned(),
                PathBuf::from(m["executable"].as_str()?),
            ))
        })
        .collect()
}

#[test]
fn the_proof_suite_short_profile_holds() {
    for var in ["DATABASE_URL", "LABLINK_PG_DATA", "LABLINK_PG_BIN"] {
        assert!(
            std::env::var_os(var).is_some(),
            "{var} is not set: run the tests under scripts/with-postgres.sh (a throwaway cluster the proof may restart)"
        );
    }
    // The features `scripts/test.sh` builds with, so the build is the one already made (an
    // example unifies the dev-dependencies' features as `cargo test` does).
    let built = build(&[
        "--workspace",
        "--all-features",
        "--bin",
        "lablink",
        "--bin",
        "proof",
        "--bin",
        "lablink-agent",
        "--example",
        "server",
    ]);
    let find = |list: &[(String, PathBuf)], name: &str| {
        list.iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("cargo reported no {name} executable"))
    };
    let proof = find(&built, "proof");
    let mut child = Command::new(&proof)
        .arg("ci")
        .env("PROOF_AGENT_BIN", find(&built, "lablink-agent"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group, with the agents and servers it starts: a hang kills them all.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", proof.display()));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            lines.push(line);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > PATIENCE {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            panic!("the proof suite did not finish within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_millis(200));
    lines.extend(rx.try_iter());
    let failed: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("[FAILED]") || l.contains("PROOF"))
        .collect();
    assert!(
        status.success() && failed.is_empty(),
        "the proof suite failed ({status}): {failed:#?}"
    );
    // It did run the soak and check the invariants.
    let checks = lines.iter().filter(|l| l.ends_with("[ok]")).count();
    assert!(checks >= 14, "only {checks} checks passed: {lines:#?}");
}
