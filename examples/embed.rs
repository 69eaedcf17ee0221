//! Embedding LabLink in a host program: compose the in-memory store and notifier with the
//! fake provisioner, launch three VMs, play their agents, give one to a participant and
//! watch the agent learn of it.
//!
//! Run: `cargo run --example embed` (no setup, no cloud).

use std::sync::Arc;
use std::time::Duration;

use lablink::{
    AgentStatus, Allocator, AllocatorExt, FakeProvisioner, GpuHealth, LabLink, MemoryNotifier,
    MemoryVmStore, Telemetry, VmFilter, VmRequest,
};

#[tokio::main]
async fn main() -> lablink::Result<()> {
    // 1. Compose: every part is swappable (PgVmStore, PgNotifier, TerraformProvisioner...).
    let lablink = LabLink::builder()
        .with_store(Arc::new(MemoryVmStore::new()))
        .with_notifier(Arc::new(MemoryNotifier::new()))
        .with_provisioner(Arc::new(
            FakeProvisioner::new().with_latency(Duration::from_millis(200)),
        ))
        .build()?;
    let allocator: Arc<dyn Allocator> = Arc::new(lablink.clone());

    // 2. Launch three VMs; the records exist before the provider is even called.
    let launch = allocator
        .launch_and_wait(3, Duration::from_secs(10))
        .await?;
    println!(
        "launch {}: {} ({:?})",
        launch.status,
        launch.hostnames.len(),
        launch.message.as_deref().unwrap_or("")
    );

    // 3. Play the agents: each reports its GPU and that it is running, then waits.
    let mut waiters = Vec::new();
    for hostname in &launch.hostnames {
        let report = Telemetry {
            status: Some(AgentStatus::Running),
            gpu_health: Some(GpuHealth::Healthy),
            heartbeat: Some("boot-1".into()),
            ..Default::default()
        };
        allocator.report(hostname, report).await?;
        let (allocator, hostname) = (allocator.clone(), hostname.clone());
        waiters.push(tokio::spawn(async move {
            let got = allocator
                .wait_for_assignment(&hostname, Duration::from_secs(2))
                .await;
            (hostname, got)
        }));
    }
    println!("free VMs: {}", allocator.counts().await?.assignable);

    // 4. A participant asks for a VM (asking twice gives the same VM).
    let request = VmRequest {
        email: "ada@example.org".parse()?,
        crd_command: Some(
            "start-host --code=\"4/0AbCdEf\" --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\""
                .parse()?,
        ),
    };
    let granted = allocator.request_vm(&request).await?;
    let again = allocator.request_vm(&request).await?;
    assert_eq!(granted.hostname, again.hostname);
    println!(
        "ada@example.org got {} (PIN has {} digits; asking again gave the same VM)",
        granted.hostname,
        granted.pin.expose().len()
    );

    // 5. Exactly that VM's agent is told; the others time out and would ask again.
    for waiter in waiters {
        let (hostname, got) = waiter.await.expect("agent task");
        match got? {
            Some(assignment) => println!(
                "agent {hostname}: assigned to {}; runs start-host with code of {} chars",
                assignment.email,
                assignment.crd_command.map_or(0, |c| c.code().len())
            ),
            None => println!("agent {hostname}: still free"),
        }
    }

    // 6. What an admin would see.
    for vm in allocator.vms(&VmFilter::default()).await? {
        println!(
            "{:<14} {:<10} gpu={:<8} owner={}",
            vm.hostname.as_str(),
            vm.state.as_str(),
            vm.gpu_health.as_str(),
            vm.owner().map_or("-", |e| e.as_str())
        );
    }
    Ok(())
}
