//! Model-based property test: random interleavings of launch / request / agent reports /
//! release / destroy against the default allocator agree with a small reference model.

use std::collections::HashMap;
use std::time::Duration;

use lablink_core::testing::store::{command, email};
use lablink_core::testing::strategies::{step, Step};
use lablink_core::{
    AgentStatus, Allocator, AllocatorExt, DestroyTarget, ErrorKind, GpuHealth, Hostname, LabLink,
    Telemetry, VmFilter, VmRequest,
};
use proptest::prelude::*;

/// What the model knows of one VM.
#[derive(Debug, Clone, Default)]
struct ModelVm {
    ready: bool,
    gpu_bad: bool,
    owner: Option<u32>,
    destroyed: bool,
}

impl ModelVm {
    fn assignable(&self) -> bool {
        self.ready && !self.gpu_bad && self.owner.is_none() && !self.destroyed
    }
}

#[derive(Debug, Default)]
struct Model {
    hosts: Vec<Hostname>,
    vms: Vec<ModelVm>,
}

impl Model {
    fn owned_by(&self, who: u32) -> Option<usize> {
        self.vms
            .iter()
            .position(|v| v.owner == Some(who) && !v.destroyed)
    }
}

const MAX_VMS: usize = 12;

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let lablink = LabLink::builder().build().unwrap();
    let mut model = Model::default();
    for step in steps {
        match step {
            Step::Launch(n) => {
                if model.hosts.len() + n > MAX_VMS {
                    continue;
                }
                let op = lablink
                    .launch_and_wait(n, Duration::from_secs(10))
                    .await
                    .unwrap();
                model.hosts.extend(op.hostnames);
                model.vms.extend((0..n).map(|_| ModelVm::default()));
            }
            Step::Request(who) => {
                let request = VmRequest {
                    email: email(&format!("p{who}")),
                    crd_command: Some(command(&format!("c{who}"))),
                };
                let result = lablink.request_vm(&request).await;
                match (model.owned_by(who), result) {
                    (Some(i), Ok(g)) => {
                        prop_assert_eq!(&g.hostname, &model.hosts[i], "rejoin got another VM");
                        prop_assert!(!g.newly_assigned);
                    }
                    (None, Ok(g)) => {
                        let i = model.hosts.iter().position(|h| *h == g.hostname).unwrap();
                        prop_assert!(
                            model.vms[i].assignable(),
                            "assigned a VM that is not assignable: {:?}",
                            model.vms[i]
                        );
                        model.vms[i].owner = Some(who);
                    }
                    (None, Err(e)) => {
                        prop_assert_eq!(e.kind(), ErrorKind::NoCapacity);
                        prop_assert!(
                            !model.vms.iter().any(ModelVm::assignable),
                            "refused with a VM free"
                        );
                    }
                    (Some(_), Err(e)) => prop_assert!(false, "owner refused: {}", e),
                }
            }
            Step::Ready(i) | Step::Gpu(i, _)
                if i >= model.hosts.len() || model.vms[i].destroyed => {}
            Step::Ready(i) => {
                let t = Telemetry {
                    status: Some(AgentStatus::Running),
                    ..Default::default()
                };
                lablink.report(&model.hosts[i], t).await.unwrap();
                model.vms[i].ready = true;
            }
            Step::Gpu(i, health) => {
                let t = Telemetry {
                    gpu_health: Some(health),
                    ..Default::default()
                };
                lablink.report(&model.hosts[i], t).await.unwrap();
                model.vms[i].gpu_bad = health == GpuHealth::Unhealthy;
            }
            Step::Release(i) | Step::Destroy(i)
                if i >= model.hosts.len() || model.vms[i].destroyed => {}
            Step::Release(i) => {
                let result = lablink.release(&model.hosts[i]).await;
                if model.vms[i].owner.is_some() {
                    prop_assert!(
                        result.is_ok(),
                        "release of an owned VM failed: {:?}",
                        result
                    );
                    model.vms[i].owner = None;
                } else {
                    prop_assert_eq!(result.unwrap_err().kind(), ErrorKind::InvalidTransition);
                }
            }
            Step::Destroy(i) => {
                let op = lablink
                    .destroy(&DestroyTarget::Hostnames(vec![model.hosts[i].clone()]))
                    .await
                    .unwrap();
                lablink
                    .wait_for_operation(op.id, Duration::from_secs(10))
                    .await
                    .unwrap();
                model.vms[i] = ModelVm {
                    destroyed: true,
                    ..Default::default()
                };
            }
        }
        // After every step the allocator and the model agree.
        let counts = lablink.counts().await.unwrap();
        let live = model.vms.iter().filter(|v| !v.destroyed).count();
        prop_assert_eq!(counts.total, live);
        prop_assert_eq!(
            counts.assignable,
            model.vms.iter().filter(|v| v.assignable()).count()
        );
        prop_assert_eq!(
            counts.assigned,
            model.vms.iter().filter(|v| v.owner.is_some()).count()
        );
        let records = lablink.vms(&VmFilter::default()).await.unwrap();
        let owners: HashMap<&Hostname, Option<String>> = records
            .iter()
            .map(|r| (&r.hostname, r.owner().map(|e| e.to_string())))
            .collect();
        for (h, v) in model.hosts.iter().zip(&model.vms) {
            if v.destroyed {
                prop_assert!(!owners.contains_key(h));
            } else {
                prop_assert_eq!(&owners[h], &v.owner.map(|w| format!("p{w}@example.org")));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn the_allocator_agrees_with_the_model(steps in prop::collection::vec(step(MAX_VMS), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(steps))?;
    }
}
