//! Calls and wall time to launch 1, 10 and 100 VMs with the EC2 provisioner against an AWS
//! emulator (moto_server), one deployment per run, everything destroyed afterwards. For
//! comparison, in the same run: the same VMs launched the per-VM way (one `RunInstances` per
//! VM with its own user data and tags, 16 at a time).
//!
//! ```sh
//! scripts/with-moto.sh cargo run -p lablink-aws --example ec2_launch -- [repeats]
//! ```

use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use futures::stream::{self, StreamExt};
use lablink_aws::sdk_crates::{aws_config, aws_sdk_ec2};
use lablink_aws::{CallCounter, Ec2ProvisionerBuilder};
use lablink_core::{AgentToken, LaunchRequest, Provisioner, VmSpec};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::var("LABLINK_AWS_TEST_ENDPOINT").map_err(|_| {
        "LABLINK_AWS_TEST_ENDPOINT is not set: run this under scripts/with-moto.sh \
         (needs moto_server: pip install \"moto[server]\")"
    })?;
    let repeats: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(5);
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&endpoint)
        .http_client(lablink_aws::https_client())
        .load()
        .await;
    let counter = CallCounter::default();
    let client = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(&config)
            .interceptor(counter.clone())
            .build(),
    );
    let ami = client
        .describe_images()
        .owners("amazon")
        .send()
        .await?
        .images()
        .iter()
        .find(|i| i.root_device_name().is_some())
        .and_then(|i| i.image_id().map(str::to_owned))
        .ok_or("the emulator has no AMI")?;

    println!("| VMs | runs | wall time median (min–max) | per VM | RunInstances | CreateTags | other calls | total calls | per-VM RunInstances, median (calls) |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---|");
    for n in [1usize, 10, 100] {
        let mut times = Vec::new();
        let mut calls = Default::default();
        let mut per_vm_times = Vec::new();
        let mut per_vm_calls = 0;
        for run in 0..repeats {
            // A fresh provisioner: the first launch also looks up the AMI once.
            let p =
                Ec2ProvisionerBuilder::new(format!("bench-{n}-{run}-{}", std::process::id()), &ami)
                    .with_ec2_client(client.clone())
                    .with_terminate_timeout(Duration::from_secs(60), Duration::from_millis(200))
                    .build()
                    .await?;
            let request = LaunchRequest {
                vms: (0..n)
                    .map(|i| VmSpec {
                        hostname: format!("bench-vm-{i:03}").parse().expect("valid"),
                        token: AgentToken::generate(),
                    })
                    .collect(),
                ..Default::default()
            };
            counter.reset();
            let start = Instant::now();
            let vms = p.launch(&request).await?;
            times.push(start.elapsed());
            calls = counter.snapshot();
            assert_eq!(vms.len(), n);
            p.destroy(&vms).await?;

            // The per-VM way, for comparison.
            counter.reset();
            let start = Instant::now();
            let ids: Vec<String> = stream::iter(request.vms.iter())
                .map(|spec| {
                    let client = client.clone();
                    let ami = ami.clone();
                    let host = spec.hostname.to_string();
                    let user_data = format!("VM_NAME={host}\nAPI_TOKEN={}\n", spec.token.expose());
                    async move {
                        let tags = TagSpecification::builder()
                            .resource_type(ResourceType::Instance)
                            .tags(Tag::builder().key("hostname").value(&host).build())
                            .tags(
                                Tag::builder()
                                    .key("deployment")
                                    .value("bench-per-vm")
                                    .build(),
                            )
                            .build();
                        let out = client
                            .run_instances()
                            .image_id(ami)
                            .min_count(1)
                            .max_count(1)
                            .user_data(base64::Engine::encode(
                                &base64::engine::general_purpose::STANDARD,
                                user_data,
                            ))
                            .tag_specifications(tags)
                            .send()
                            .await
                            .expect("RunInstances");
                        out.instances()[0]
                            .instance_id()
                            .unwrap_or_default()
                            .to_owned()
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            per_vm_times.push(start.elapsed());
            per_vm_calls = counter.total();
            client
                .terminate_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await?;
        }
        times.sort();
        per_vm_times.sort();
        let median = times[times.len() / 2];
        let get = |a: &str| calls.get(a).copied().unwrap_or(0);
        let total: usize = calls.values().sum();
        println!(
            "| {n} | {repeats} | {:.1} ms ({:.1}–{:.1}) | {:.2} ms | {} | {} | {} | {total} | {:.1} ms ({per_vm_calls}) |",
            ms(median),
            ms(times[0]),
            ms(times[times.len() - 1]),
            ms(median) / n as f64,
            get("RunInstances"),
            get("CreateTags"),
            total - get("RunInstances") - get("CreateTags"),
            ms(per_vm_times[per_vm_times.len() / 2]),
        );
        eprintln!("{n} VMs: calls by action {calls:?}");
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
