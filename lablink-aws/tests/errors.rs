//! Error classification over real SDK errors: AWS error responses (injected by a proxy in
//! front of moto_server for what the emulator cannot produce: capacity, throttling, auth)
//! and moto_server's own answers (unknown AMI, subnet), parsed by the real SDK.

mod common;

use common::FaultProxy;
use lablink_core::error::ErrorStatus;
use lablink_core::testing::provisioner::request;
use lablink_core::{ErrorKind, Provisioner};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_errors_are_classified_with_their_request_id() {
    let proxy = FaultProxy::start(&common::endpoint()).await;
    let cases = [
        (
            "InsufficientInstanceCapacity",
            500,
            ErrorKind::NoCapacity,
            ErrorStatus::Temporary,
        ),
        (
            "RequestLimitExceeded",
            503,
            ErrorKind::Provider,
            ErrorStatus::Temporary,
        ),
        (
            "AuthFailure",
            401,
            ErrorKind::PermissionDenied,
            ErrorStatus::Permanent,
        ),
        (
            "UnauthorizedOperation",
            403,
            ErrorKind::PermissionDenied,
            ErrorStatus::Permanent,
        ),
        (
            "InvalidAMIID.NotFound",
            400,
            ErrorKind::InvalidConfig,
            ErrorStatus::Permanent,
        ),
        (
            "InternalError",
            500,
            ErrorKind::Unavailable,
            ErrorStatus::Temporary,
        ),
    ];
    for (code, status, kind, retry) in cases {
        let (builder, _) = common::builder_at(&proxy.url, "errors").await;
        let p = builder.build().await.unwrap();
        proxy.clear();
        proxy.fail(&["Action=RunInstances"], status, code);
        let err = p.launch(&request(&["err-a", "err-b"])).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{code}: {err}");
        assert_eq!(err.status(), retry, "{code}: {err}");
        assert_eq!(err.operation(), "launch");
        let text = err.to_string();
        assert!(text.contains(code), "{code}: the AWS code is kept: {text}");
        assert!(text.contains("request_id: proxy-req-1"), "{code}: {text}");
        // list and destroy are classified the same way.
        proxy.clear();
        proxy.fail(&["Action=DescribeInstances"], status, code);
        let err = p.list().await.unwrap_err();
        assert_eq!(
            (err.kind(), err.status()),
            (kind, retry),
            "{code} on list: {err}"
        );
        assert!(p.list().await.is_err());
        proxy.clear();
        assert!(
            p.list().await.unwrap().is_empty(),
            "{code}: nothing was launched"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulators_bad_ami_and_subnet_are_invalid_config() {
    // moto_server checks AMIs because scripts/with-moto.sh sets MOTO_ENABLE_AMI_VALIDATION.
    let counter = common::CallCounter::default();
    let client = common::ec2_client(&common::endpoint(), &counter).await;
    let bad_ami = lablink_aws::Ec2ProvisionerBuilder::new(
        common::deployment("bad-ami"),
        "ami-00000000deadbeef",
    )
    .with_ec2_client(client)
    .build()
    .await
    .unwrap();
    let err = bad_ami.launch(&request(&["bad-a"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("ami-00000000deadbeef"), "{err}");
    assert_eq!(
        counter.get("RunInstances"),
        0,
        "nothing is launched on a bad AMI"
    );

    let (builder, _) = common::builder("bad-subnet").await;
    let p = builder
        .with_subnets(["subnet-0000dead"])
        .build()
        .await
        .unwrap();
    let err = p.launch(&request(&["bad-b"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string().contains("InvalidSubnetID.NotFound"),
        "{err}"
    );
    assert!(p.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_falls_back_to_the_next_type_and_subnet() {
    let proxy = FaultProxy::start(&common::endpoint()).await;
    let (builder, calls) = common::builder_at(&proxy.url, "fallback").await;
    let ec2 = common::ec2_client(&common::endpoint(), &Default::default()).await;
    let subnets = ec2.describe_subnets().send().await.unwrap();
    let subnet_ids: Vec<String> = subnets
        .subnets()
        .iter()
        .filter_map(|s| s.subnet_id().map(str::to_owned))
        .take(2)
        .collect();
    assert_eq!(subnet_ids.len(), 2, "moto_server has default subnets");
    let p = builder
        .with_instance_types(["c5.xlarge", "m5.large"])
        .with_subnets(subnet_ids.clone())
        .with_spot(true)
        .build()
        .await
        .unwrap();
    // c5.xlarge has no capacity anywhere; m5.large only on demand in the second subnet.
    proxy.fail(
        &["Action=RunInstances", "InstanceType=c5.xlarge"],
        500,
        "InsufficientInstanceCapacity",
    );
    proxy.fail(
        &["Action=RunInstances", "InstanceMarketOptions"],
        500,
        "InsufficientInstanceCapacity",
    );
    proxy.fail(
        &[
            "Action=RunInstances",
            &format!("SubnetId={}", subnet_ids[0]),
        ],
        500,
        "InsufficientInstanceCapacity",
    );
    let vms = p.launch(&request(&["fb-a", "fb-b", "fb-c"])).await.unwrap();
    assert_eq!(vms.len(), 3);
    // 2 subnets x (spot, on-demand) for c5.xlarge, then m5.large: spot and on-demand in the
    // first subnet, spot in the second, on-demand in the second succeeds.
    assert_eq!(calls.get("RunInstances"), 8, "{:?}", calls.snapshot());
    let ec2_of_vm = ec2
        .describe_instances()
        .instance_ids(vms[0].instance_id.as_str())
        .send()
        .await
        .unwrap();
    let instance = &ec2_of_vm.reservations()[0].instances()[0];
    assert_eq!(instance.instance_type().unwrap().as_str(), "m5.large");
    assert_eq!(instance.subnet_id().unwrap(), subnet_ids[1]);

    // When nothing has capacity, the launch is NoCapacity (temporary) and creates nothing.
    proxy.fail(
        &["Action=RunInstances"],
        500,
        "InsufficientInstanceCapacity",
    );
    let err = p.launch(&request(&["fb-d"])).await.unwrap_err();
    assert_eq!(
        (err.kind(), err.status()),
        (ErrorKind::NoCapacity, ErrorStatus::Temporary)
    );
    proxy.clear();
    p.destroy(&vms).await.unwrap();
    assert!(p.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_image_launches_only_on_gpu_types() {
    let (builder, calls) = common::builder("gpu").await;
    let p = builder
        .clone()
        .with_instance_types(["t3.large", "g4dn.xlarge"])
        .with_gpu_image(true)
        .build()
        .await
        .unwrap();
    let vms = p.launch(&request(&["gpu-a"])).await.unwrap();
    assert_eq!(calls.get("DescribeInstanceTypes"), 1);
    assert_eq!(
        calls.get("RunInstances"),
        1,
        "t3.large is skipped, not tried"
    );
    let out = p
        .client()
        .describe_instances()
        .instance_ids(vms[0].instance_id.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(
        out.reservations()[0].instances()[0]
            .instance_type()
            .unwrap()
            .as_str(),
        "g4dn.xlarge"
    );
    p.destroy(&vms).await.unwrap();

    let no_gpu = builder
        .with_instance_types(["t3.large", "m5.large"])
        .with_gpu_image(true)
        .build()
        .await
        .unwrap();
    let err = no_gpu.launch(&request(&["gpu-b"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("GPU"), "{err}");
    assert!(no_gpu.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagging_waits_for_a_new_instance_to_become_visible() {
    let proxy = FaultProxy::start(&common::endpoint()).await;
    let (builder, calls) = common::builder_at(&proxy.url, "eventual").await;
    let p = builder.build().await.unwrap();
    // EC2 is eventually consistent: the first CreateTags may not know the instance yet.
    proxy.fail_times(&["Action=CreateTags"], 400, "InvalidInstanceID.NotFound", 2);
    let vms = p.launch(&request(&["ev-a"])).await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(calls.get("CreateTags"), 3, "{:?}", calls.snapshot());
    assert_eq!(p.list().await.unwrap()[0].hostname.as_str(), "ev-a");
    p.destroy(&vms).await.unwrap();
}
