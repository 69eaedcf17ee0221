//! A whole fleet against moto_server: launch 50 in one RunInstances call, check tags and user
//! data, reboot one, destroy 10 by name, destroy the rest.

mod common;

use std::collections::{BTreeSet, HashMap};

use base64::Engine;
use lablink_aws::sdk_crates::aws_sdk_ec2;
use lablink_aws::user_data::{open_token, PAD_TAG};
use lablink_aws::{Ec2Provisioner, DEPLOYMENT_TAG, HOSTNAME_TAG, OWNER_TAG};
use lablink_core::testing::provisioner::request;
use lablink_core::{ErrorKind, Progress, Provisioner};

fn tags(tags: &[aws_sdk_ec2::types::Tag]) -> HashMap<String, String> {
    tags.iter()
        .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
        .collect()
}

async fn names(p: &Ec2Provisioner) -> BTreeSet<String> {
    p.list()
        .await
        .unwrap()
        .into_iter()
        .map(|vm| vm.hostname.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_vms_launch_in_one_call_each_with_its_own_name_and_token() {
    let (builder, calls) = common::builder("lifecycle").await;
    let p = builder.with_owner("lab-42").build().await.unwrap();
    let hostnames: Vec<String> = (0..50).map(|i| format!("lc-vm-{i:02}")).collect();
    let refs: Vec<&str> = hostnames.iter().map(String::as_str).collect();
    let mut req = request(&refs);
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    req.progress = Progress::new(move |l| sink.lock().unwrap().push(l.to_owned()));
    let tokens: HashMap<String, String> = req
        .vms
        .iter()
        .map(|s| (s.hostname.to_string(), s.token.expose().to_owned()))
        .collect();

    let vms = p.launch(&req).await.unwrap();
    assert_eq!(vms.len(), 50);
    assert_eq!(
        calls.get("RunInstances"),
        1,
        "one RunInstances for the batch: {:?}",
        calls.snapshot()
    );
    assert_eq!(calls.get("CreateTags"), 50, "{:?}", calls.snapshot());
    for line in lines.lock().unwrap().iter() {
        assert!(
            !tokens.values().any(|t| line.contains(t.as_str())),
            "a progress line shows a token: {line}"
        );
    }

    // Every instance and volume is tagged; every VM's user data opens to its own name and
    // token with its own pad, and to nothing with another's.
    let ec2 = p.client();
    let ids: Vec<String> = vms.iter().map(|vm| vm.instance_id.to_string()).collect();
    let described = ec2
        .describe_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .unwrap();
    let instances: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(instances.len(), 50);
    let mut pads = HashMap::new();
    for instance in &instances {
        let t = tags(instance.tags());
        let hostname = t[HOSTNAME_TAG].clone();
        assert_eq!(t[DEPLOYMENT_TAG], p.deployment());
        assert_eq!(t[OWNER_TAG], "lab-42");
        assert_eq!(t["Name"], hostname);
        let vm = vms
            .iter()
            .find(|vm| vm.hostname.as_str() == hostname)
            .unwrap();
        assert_eq!(vm.instance_id.as_str(), instance.instance_id().unwrap());
        assert_eq!(
            instance
                .metadata_options()
                .unwrap()
                .instance_metadata_tags()
                .unwrap()
                .as_str(),
            "enabled",
            "the VM must be able to read its pad tag"
        );
        for mapping in instance.block_device_mappings() {
            let volume_id = mapping.ebs().unwrap().volume_id().unwrap();
            let volume = ec2
                .describe_volumes()
                .volume_ids(volume_id)
                .send()
                .await
                .unwrap();
            let vt = tags(volume.volumes()[0].tags());
            assert_eq!(vt[DEPLOYMENT_TAG], p.deployment());
            assert_eq!(vt[OWNER_TAG], "lab-42");
            assert_eq!(vt[HOSTNAME_TAG], hostname);
        }
        let user_data = ec2
            .describe_instance_attribute()
            .instance_id(instance.instance_id().unwrap())
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let script = base64::engine::general_purpose::STANDARD
            .decode(user_data.user_data().unwrap().value().unwrap())
            .unwrap();
        let script = String::from_utf8(script).unwrap();
        assert!(
            !tokens.values().any(|t| script.contains(t.as_str())),
            "user data must not hold a token in the clear"
        );
        let index = instance.ami_launch_index().unwrap().to_string();
        let row: Vec<&str> = script
            .lines()
            .find(|l| l.split(' ').next() == Some(index.as_str()) && l.split(' ').count() == 3)
            .unwrap()
            .split(' ')
            .collect();
        assert_eq!(row[1], hostname, "the row of launch index {index}");
        let pad = t[PAD_TAG].clone();
        assert_eq!(
            open_token(row[2], &pad).unwrap().expose(),
            tokens[&hostname]
        );
        pads.insert(hostname, (row[2].to_owned(), pad));
    }
    let (sealed_a, _) = &pads["lc-vm-00"];
    let (_, pad_b) = &pads["lc-vm-01"];
    assert_ne!(
        open_token(sealed_a, pad_b).map(|t| t.expose().to_owned()),
        Some(tokens["lc-vm-00"].clone()),
        "another VM's pad must not open a token"
    );

    // List, reboot one, destroy ten by name.
    assert_eq!(names(&p).await, hostnames.iter().cloned().collect());
    p.reboot(&vms[7]).await.unwrap();
    let doomed: Vec<_> = vms
        .iter()
        .filter(|vm| vm.hostname.as_str() < "lc-vm-10")
        .cloned()
        .collect();
    assert_eq!(doomed.len(), 10);
    p.destroy(&doomed).await.unwrap();
    let left = names(&p).await;
    assert_eq!(left.len(), 40);
    assert!(left.iter().all(|h| h.as_str() >= "lc-vm-10"));
    let gone = p.reboot(&doomed[0]).await.unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");

    // Relaunching all fifty creates only the ten missing ones.
    calls.reset();
    let again = p.launch(&req).await.unwrap();
    assert_eq!(again.len(), 50);
    assert_eq!(calls.get("RunInstances"), 1);
    assert_eq!(calls.get("CreateTags"), 10);
    assert_eq!(names(&p).await.len(), 50);

    p.destroy(&p.list().await.unwrap()).await.unwrap();
    assert!(p.list().await.unwrap().is_empty(), "everything is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_deployment_is_neither_listed_nor_destroyed() {
    let a = common::provisioner("isolation-a").await;
    let b = common::provisioner("isolation-b").await;
    let a_vms = a.launch(&request(&["iso-a"])).await.unwrap();
    let b_vms = b.launch(&request(&["iso-b"])).await.unwrap();
    assert_eq!(names(&a).await, BTreeSet::from(["iso-a".to_string()]));
    b.destroy(&a_vms).await.unwrap();
    assert_eq!(names(&a).await.len(), 1, "b must not terminate a's machine");
    let err = b.reboot(&a_vms[0]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    a.destroy(&a_vms).await.unwrap();
    b.destroy(&b_vms).await.unwrap();
}
