//! Overhead of `TerraformProvisioner::launch` around `terraform apply`, with the fixture
//! module (`terraform_data` only, offline), for 1 and 50 instances.
//!
//! For each size, the same fresh-state apply runs directly (`terraform apply` on a prepared
//! working directory) and through the provisioner (`launch` on a fresh working directory that
//! was already initialised). The difference is the provisioner's overhead: reading the
//! inventory before and after (`terraform output -json`), writing the variables file, and
//! streaming output. Run with `cargo bench -p lablink-terraform --bench overhead`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lablink_core::{AgentToken, LaunchRequest, Provisioner, VmSpec};
use lablink_terraform::TerraformProvisionerBuilder;

const RUNS: usize = 7;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/module")
}

fn terraform(dir: &Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = Command::new("terraform")
        .args(args)
        .current_dir(dir)
        .env("TF_IN_AUTOMATION", "1")
        .output()
        .expect("the terraform binary is needed for this benchmark (on PATH)");
    assert!(
        out.status.success(),
        "terraform {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

fn request(n: usize) -> LaunchRequest {
    LaunchRequest {
        vms: (1..=n)
            .map(|i| VmSpec {
                hostname: format!("vm-{i}").parse().unwrap(),
                token: AgentToken::generate(),
            })
            .collect(),
        ..Default::default()
    }
}

/// A fresh-state `terraform apply` of `n` VMs, run directly.
fn direct(n: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let vms: serde_json::Map<String, serde_json::Value> = request(n)
        .vms
        .iter()
        .map(|s| {
            (
                s.hostname.to_string(),
                serde_json::json!({ "token": s.token.expose() }),
            )
        })
        .collect();
    let vars = serde_json::json!({ "vms": vms, "deployment": "bench" });
    std::fs::write(
        dir.path().join("terraform.tfvars.json"),
        serde_json::to_vec(&vars).unwrap(),
    )
    .unwrap();
    terraform(dir.path(), &["init", "-input=false", "-no-color"]);
    terraform(
        dir.path(),
        &[
            "apply",
            "-auto-approve",
            "-input=false",
            "-no-color",
            "-lock-timeout=0s",
        ],
    )
}

/// A fresh-state `launch` of `n` VMs through the provisioner (init done beforehand).
async fn through_provisioner(n: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let p = TerraformProvisionerBuilder::new(dir.path())
        .with_module_dir(fixture())
        .with_deployment("bench")
        .build()
        .unwrap();
    p.list().await.unwrap(); // terraform init, once
    let request = request(n);
    let start = Instant::now();
    let vms = p.launch(&request).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(vms.len(), n);
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo test --benches` runs benches with `--bench`-less args; keep that quick.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("| instances | terraform apply (direct), median of {RUNS} | provisioner launch, median of {RUNS} | overhead |");
    println!("|---|---|---|---|");
    for n in [1, 50] {
        let mut d = Vec::new();
        let mut p = Vec::new();
        for _ in 0..RUNS {
            d.push(direct(n));
            p.push(rt.block_on(through_provisioner(n)));
        }
        let (d, p) = (median(d), median(p));
        println!(
            "| {n} | {} | {} | {} ({:+.0}%) |",
            ms(d),
            ms(p),
            ms(p.saturating_sub(d)),
            (p.as_secs_f64() / d.as_secs_f64() - 1.0) * 100.0
        );
    }
}
