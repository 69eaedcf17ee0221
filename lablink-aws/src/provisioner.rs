//! [`Ec2Provisioner`]: a [`Provisioner`] on the EC2 API.
//!
//! A launch is one `RunInstances` call per batch (`MinCount` = `MaxCount` = the VMs that fit
//! in one user data: all or nothing, so a placement without room for the whole batch answers
//! `InsufficientInstanceCapacity` and the batch moves to the next placement), then one
//! `CreateTags` per VM for what differs per VM (hostname and the token pad, see
//! [`user_data`](crate::user_data)). The inventory is the instances tagged
//! with this deployment; an instance whose launch was interrupted before its hostname tag is
//! listed under its instance id, so that reconcile removes it.

use std::collections::{HashMap, HashSet};
use std::fmt;

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    Instance, InstanceInterruptionBehavior, InstanceMarketOptionsRequest,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceMetadataTagsState,
    InstanceType, MarketType, ResourceType, SpotInstanceType, SpotMarketOptions, Tag,
    TagSpecification, VolumeType,
};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::stream::{FuturesOrdered, StreamExt};
use lablink_core::{
    Capabilities, Error, ErrorKind, Hostname, InstanceId, LaunchRequest, Progress, ProvisionedVm,
    Provisioner, Result, VmSpec,
};
use tokio::sync::OnceCell;

use crate::error::{classify, is_capacity, AwsFailure};
use crate::user_data::{self, AgentSettings, SealedToken, MAX_USER_DATA, PAD_TAG};

/// Tag keys on every instance and volume.
pub const DEPLOYMENT_TAG: &str = "deployment";
/// The VM's hostname (and `Name`, for the console).
pub const HOSTNAME_TAG: &str = "hostname";
/// Who owns the machine.
pub const OWNER_TAG: &str = "owner";
/// `lablink-aws`: marks the instances this crate manages (another tool's instances of the
/// same deployment are never listed or terminated).
pub const MANAGED_BY_TAG: &str = "ManagedBy";
const MANAGED_BY: &str = "lablink-aws";

/// States of an instance that still exists (and may cost money).
const LIVE_STATES: &[&str] = &["pending", "running", "stopping", "stopped"];

/// The settings the builder checked.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub deployment: String,
    pub owner: String,
    pub ami: String,
    pub instance_types: Vec<String>,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    pub key_name: Option<String>,
    pub root_volume_gb: Option<i32>,
    pub gpu_image: bool,
    pub spot: bool,
    pub agent: AgentSettings,
    pub terminate_timeout: std::time::Duration,
    pub poll_interval: std::time::Duration,
    pub tag_concurrency: usize,
}

/// Where one `RunInstances` call asks for capacity.
#[derive(Debug, Clone, PartialEq)]
struct Placement {
    instance_type: String,
    subnet: Option<String>,
    spot: bool,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}{}",
            if self.spot { "spot" } else { "on-demand" },
            self.instance_type,
            self.subnet
                .as_deref()
                .map(|s| format!(" in {s}"))
                .unwrap_or_default()
        )
    }
}

/// What the first launch finds out once: the AMI's root device and the usable placements.
#[derive(Debug)]
struct Prepared {
    root_device: String,
    /// The root volume size to ask for: configured, else the AMI's.
    root_volume_gb: Option<i32>,
    placements: Vec<Placement>,
}

/// Creates, lists, reboots and terminates EC2 instances of one deployment. Build it with
/// [`Ec2ProvisionerBuilder`](crate::Ec2ProvisionerBuilder).
pub struct Ec2Provisioner {
    ec2: aws_sdk_ec2::Client,
    settings: Settings,
    prepared: OnceCell<Prepared>,
}

impl fmt::Debug for Ec2Provisioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2Provisioner")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What one `RunInstances` call and its tagging achieved.
struct BatchOutcome {
    /// The VMs created and tagged, in launch order.
    created: Vec<ProvisionedVm>,
    /// Every VM EC2 launched, tagged or not (those not tagged were terminated: their VM can
    /// never read its token, and they are not retried).
    done: Vec<Hostname>,
    /// Why tagging failed, if it did.
    tag_failure: Option<Error>,
}

/// One new VM of a launch: its spec and its split token.
struct NewVm<'a> {
    spec: &'a VmSpec,
    sealed: SealedToken,
    row_len: usize,
}

impl Ec2Provisioner {
    pub(crate) fn new(ec2: aws_sdk_ec2::Client, settings: Settings) -> Self {
        Self {
            ec2,
            settings,
            prepared: OnceCell::new(),
        }
    }

    /// The EC2 client (to inspect instances in tests and tools).
    pub fn client(&self) -> &aws_sdk_ec2::Client {
        &self.ec2
    }

    /// The deployment whose instances this provisioner sees.
    pub fn deployment(&self) -> &str {
        &self.settings.deployment
    }

    fn deployment_filters(&self) -> Vec<Filter> {
        vec![
            Filter::builder()
                .name(format!("tag:{DEPLOYMENT_TAG}"))
                .values(&self.settings.deployment)
                .build(),
            Filter::builder()
                .name(format!("tag:{MANAGED_BY_TAG}"))
                .values(MANAGED_BY)
                .build(),
        ]
    }

    /// The live instances of this deployment, optionally only those with the given ids.
    async fn describe(&self, ids: Option<&[String]>) -> Result<Vec<Instance>, AwsFailure> {
        let mut filters = self.deployment_filters();
        filters.push(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(LIVE_STATES.iter().map(|s| s.to_string()).collect()))
                .build(),
        );
        let mut out = Vec::new();
        // A filter takes at most 200 values.
        let chunks: Vec<Option<&[String]>> = match ids {
            Some(ids) => ids.chunks(200).map(Some).collect(),
            None => vec![None],
        };
        for chunk in chunks {
            let mut filters = filters.clone();
            if let Some(chunk) = chunk {
                filters.push(
                    Filter::builder()
                        .name("instance-id")
                        .set_values(Some(chunk.to_vec()))
                        .build(),
                );
            }
            let mut next: Option<String> = None;
            loop {
                let page = self
                    .ec2
                    .describe_instances()
                    .set_filters(Some(filters.clone()))
                    .set_next_token(next.take())
                    .max_results(1000)
                    .send()
                    .await
                    .map_err(|e| AwsFailure::sdk("DescribeInstances", e))?;
                for reservation in page.reservations() {
                    out.extend(reservation.instances().iter().cloned());
                }
                match page.next_token() {
                    Some(token) if !token.is_empty() => next = Some(token.to_owned()),
                    _ => break,
                }
            }
        }
        Ok(out)
    }

    /// Looks up the AMI's root device and, for a GPU image, which instance types have a GPU.
    async fn prepare(&self) -> Result<&Prepared, AwsFailure> {
        self.prepared
            .get_or_try_init(|| async {
                let s = &self.settings;
                let images = self
                    .ec2
                    .describe_images()
                    .image_ids(&s.ami)
                    .send()
                    .await
                    .map_err(|e| AwsFailure::sdk("DescribeImages", e))?;
                let image = images.images().first();
                let root_device = image
                    .and_then(|i| i.root_device_name())
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        AwsFailure::Config(format!(
                            "the AMI {} does not exist or is not visible to this account",
                            s.ami
                        ))
                    })?;
                let image_root_gb = image.and_then(|i| {
                    i.block_device_mappings()
                        .iter()
                        .find(|m| m.device_name() == Some(root_device.as_str()))
                        .and_then(|m| m.ebs())
                        .and_then(|e| e.volume_size())
                });
                let root_volume_gb = s.root_volume_gb.or(image_root_gb);
                let mut types = s.instance_types.clone();
                if s.gpu_image {
                    types = self.gpu_types(&types).await?;
                }
                let subnets: Vec<Option<String>> = if s.subnets.is_empty() {
                    vec![None]
                } else {
                    s.subnets.iter().cloned().map(Some).collect()
                };
                let mut placements = Vec::new();
                for instance_type in &types {
                    for subnet in &subnets {
                        for spot in if s.spot {
                            &[true, false][..]
                        } else {
                            &[false][..]
                        } {
                            placements.push(Placement {
                                instance_type: instance_type.clone(),
                                subnet: subnet.clone(),
                                spot: *spot,
                            });
                        }
                    }
                }
                Ok(Prepared {
                    root_device,
                    root_volume_gb,
                    placements,
                })
            })
            .await
    }

    /// The configured types that have a GPU, in the configured order.
    async fn gpu_types(&self, types: &[String]) -> Result<Vec<String>, AwsFailure> {
        let info = self
            .ec2
            .describe_instance_types()
            .set_instance_types(Some(
                types
                    .iter()
                    .map(|t| InstanceType::from(t.as_str()))
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| AwsFailure::sdk("DescribeInstanceTypes", e))?;
        let with_gpu: HashSet<&str> = info
            .instance_types()
            .iter()
            .filter(|t| t.gpu_info().is_some_and(|g| !g.gpus().is_empty()))
            .filter_map(|t| t.instance_type().map(|t| t.as_str()))
            .collect();
        let kept: Vec<String> = types
            .iter()
            .filter(|t| with_gpu.contains(t.as_str()))
            .cloned()
            .collect();
        for dropped in types.iter().filter(|t| !with_gpu.contains(t.as_str())) {
            tracing::warn!(instance_type = %dropped, "instance type has no GPU; not used for the GPU image");
        }
        if kept.is_empty() {
            return Err(AwsFailure::Config(format!(
                "the image needs a GPU, but none of the instance types {types:?} has one"
            )));
        }
        Ok(kept)
    }

    fn common_tags(&self) -> Vec<Tag> {
        let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
        vec![
            tag(DEPLOYMENT_TAG, &self.settings.deployment),
            tag(OWNER_TAG, &self.settings.owner),
            tag(MANAGED_BY_TAG, MANAGED_BY),
        ]
    }

    /// One `RunInstances` call for `batch` (at most as many instances as rows), then one
    /// `CreateTags` per instance. Returns the VMs created and tagged, with their batch index.
    async fn run_batch(
        &self,
        prepared: &Prepared,
        placement: &Placement,
        batch: &[&NewVm<'_>],
        progress: &Progress,
    ) -> Result<BatchOutcome, AwsFailure> {
        let s = &self.settings;
        let rows: String = batch
            .iter()
            .enumerate()
            .map(|(i, vm)| user_data::row(i, &vm.spec.hostname, &vm.sealed))
            .collect();
        let script = s.agent.render(&rows);
        progress.report(&format!("RunInstances: {} VMs, {placement}", batch.len()));
        let count = i32::try_from(batch.len()).unwrap_or(i32::MAX);
        // The root volume: encrypted gp3, deleted with the instance. Without a known size
        // (neither configured nor in the AMI) the AMI's own mapping is used unchanged.
        let root = prepared.root_volume_gb.map(|gb| {
            BlockDeviceMapping::builder()
                .device_name(&prepared.root_device)
                .ebs(
                    EbsBlockDevice::builder()
                        .encrypted(true)
                        .delete_on_termination(true)
                        .volume_type(VolumeType::Gp3)
                        .volume_size(gb)
                        .build(),
                )
                .build()
        });
        let mut call = self
            .ec2
            .run_instances()
            .image_id(&s.ami)
            .instance_type(InstanceType::from(placement.instance_type.as_str()))
            .min_count(count)
            .max_count(count)
            .user_data(B64.encode(&script))
            .set_subnet_id(placement.subnet.clone())
            .set_security_group_ids(
                (!s.security_groups.is_empty()).then(|| s.security_groups.clone()),
            )
            .set_key_name(s.key_name.clone())
            .set_block_device_mappings(root.map(|m| vec![m]))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_tokens(HttpTokensState::Required)
                    .instance_metadata_tags(InstanceMetadataTagsState::Enabled)
                    .build(),
            );
        for resource in [ResourceType::Instance, ResourceType::Volume] {
            call = call.tag_specifications(
                TagSpecification::builder()
                    .resource_type(resource)
                    .set_tags(Some(self.common_tags()))
                    .build(),
            );
        }
        if let Some(profile) = &s.instance_profile {
            let spec = IamInstanceProfileSpecification::builder();
            call = call.iam_instance_profile(if profile.starts_with("arn:") {
                spec.arn(profile).build()
            } else {
                spec.name(profile).build()
            });
        }
        if placement.spot {
            call = call.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }
        let out = call
            .send()
            .await
            .map_err(|e| AwsFailure::sdk("RunInstances", e))?;

        // Match instances to rows by launch index, then tag each with its own values.
        let mut launched = Vec::new();
        for instance in out.instances() {
            let (Some(id), Some(index)) = (instance.instance_id(), instance.ami_launch_index())
            else {
                return Err(AwsFailure::Unexpected(
                    "RunInstances returned an instance without id or launch index".into(),
                ));
            };
            let Some(vm) = usize::try_from(index).ok().and_then(|i| batch.get(i)) else {
                return Err(AwsFailure::Unexpected(format!(
                    "RunInstances returned launch index {index} for {} VMs",
                    batch.len()
                )));
            };
            let volumes: Vec<String> = instance
                .block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs().and_then(|e| e.volume_id()))
                .map(str::to_owned)
                .collect();
            launched.push((
                index as usize,
                id.to_owned(),
                volumes,
                address(instance),
                *vm,
            ));
        }
        // At most `tag_concurrency` CreateTags calls at once; outcomes in launch order.
        let outcomes = {
            let mut outcomes = Vec::with_capacity(launched.len());
            let mut running = FuturesOrdered::new();
            let mut queue = launched.iter();
            loop {
                while running.len() < s.tag_concurrency {
                    let Some((_, id, volumes, _, vm)) = queue.next() else {
                        break;
                    };
                    running.push_back(self.tag_vm(id, volumes, vm));
                }
                match running.next().await {
                    Some(outcome) => outcomes.push(outcome),
                    None => break,
                }
            }
            outcomes
        };
        let mut created = Vec::new();
        let mut untagged = Vec::new();
        let mut done = Vec::new();
        let mut tag_failure = None;
        for ((index, id, _, address, vm), outcome) in launched.into_iter().zip(outcomes) {
            done.push(vm.spec.hostname.clone());
            match outcome {
                Ok(()) => created.push((
                    index,
                    ProvisionedVm {
                        hostname: vm.spec.hostname.clone(),
                        instance_id: parse_id(&id)?,
                        address,
                        instance_type: Some(placement.instance_type.clone()),
                    },
                )),
                Err(failure) => {
                    let error = classify(failure, "tag instance");
                    tracing::warn!(hostname = %vm.spec.hostname, instance_id = %id, error = %error,
                        "could not tag a new instance; terminating it");
                    progress.report(&format!(
                        "{}: tagging {id} failed, terminating it: {error}",
                        vm.spec.hostname
                    ));
                    untagged.push(id);
                    tag_failure.get_or_insert(error);
                }
            }
        }
        if !untagged.is_empty() {
            if let Err(failure) = self.terminate(&untagged).await {
                tracing::warn!(error = %classify(failure, "terminate"), instances = ?untagged,
                    "could not terminate untagged instances; reconcile will find them");
            }
        }
        created.sort_by_key(|(i, _)| *i);
        Ok(BatchOutcome {
            created: created.into_iter().map(|(_, vm)| vm).collect(),
            done,
            tag_failure,
        })
    }

    /// Tags one new instance (and the volumes EC2 reported) with its hostname and token pad.
    ///
    /// EC2 is eventually consistent: right after `RunInstances`, `CreateTags` may not know the
    /// new instance yet (`InvalidInstanceID.NotFound`). That one answer is asked again, a few
    /// times with a growing pause, as AWS advises; every other failure is returned at once.
    async fn tag_vm(&self, id: &str, volumes: &[String], vm: &NewVm<'_>) -> Result<(), AwsFailure> {
        let hostname = vm.spec.hostname.as_str();
        let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
        let mut pause = std::time::Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let outcome = self
                .ec2
                .create_tags()
                .set_resources(Some(
                    std::iter::once(id.to_owned())
                        .chain(volumes.iter().cloned())
                        .collect(),
                ))
                .tags(tag(HOSTNAME_TAG, hostname))
                .tags(tag("Name", hostname))
                .tags(tag(PAD_TAG, &vm.sealed.pad))
                .send()
                .await
                .map_err(|e| AwsFailure::sdk("CreateTags", e));
            match outcome {
                Err(failure) if attempt < 5 && is_not_yet_visible(&failure) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                other => return other.map(drop),
            }
        }
    }

    /// Terminates `ids` and waits until EC2 reports none of them as live any more.
    async fn terminate(&self, ids: &[String]) -> Result<(), AwsFailure> {
        for chunk in ids.chunks(1000) {
            self.ec2
                .terminate_instances()
                .set_instance_ids(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| AwsFailure::sdk("TerminateInstances", e))?;
        }
        let deadline = tokio::time::Instant::now() + self.settings.terminate_timeout;
        loop {
            let live = self.describe(Some(ids)).await?;
            if live.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let ids: Vec<&str> = live.iter().filter_map(|i| i.instance_id()).collect();
                return Err(AwsFailure::NotConfirmed(format!(
                    "EC2 still reports {} instances as live {}s after terminating them: {}",
                    ids.len(),
                    self.settings.terminate_timeout.as_secs(),
                    ids.join(", ")
                )));
            }
            tokio::time::sleep(self.settings.poll_interval).await;
        }
    }

    /// How many of `vms` (from the front) fit in one user data (at least one).
    fn batch_len(&self, vms: &[&NewVm<'_>]) -> usize {
        let mut size = self.settings.agent.render("").len();
        let fitting = vms
            .iter()
            .take_while(|vm| {
                size += vm.row_len;
                size <= MAX_USER_DATA
            })
            .count();
        fitting.max(1)
    }
}

/// EC2 does not know a just-launched instance or volume yet.
fn is_not_yet_visible(failure: &AwsFailure) -> bool {
    matches!(
        failure.code(),
        Some("InvalidInstanceID.NotFound" | "InvalidVolume.NotFound")
    )
}

fn address(instance: &Instance) -> Option<String> {
    instance
        .public_ip_address()
        .or(instance.private_ip_address())
        .map(str::to_owned)
}

fn parse_id(id: &str) -> Result<InstanceId, AwsFailure> {
    id.parse().map_err(|_| {
        AwsFailure::Unexpected(format!("EC2 returned the malformed instance id {id:?}"))
    })
}

fn tag_value<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// An instance as LabLink sees it: under its hostname tag, or under its instance id when the
/// tag is missing (a launch interrupted between `RunInstances` and `CreateTags`).
fn provisioned(instance: &Instance) -> Result<Option<ProvisionedVm>, AwsFailure> {
    let Some(id) = instance.instance_id() else {
        return Ok(None);
    };
    let Some(hostname) = tag_value(instance, HOSTNAME_TAG)
        .and_then(|h| h.parse::<Hostname>().ok())
        .or_else(|| id.parse().ok())
    else {
        return Ok(None);
    };
    Ok(Some(ProvisionedVm {
        hostname,
        instance_id: parse_id(id)?,
        address: address(instance),
        instance_type: instance.instance_type().map(|t| t.as_str().to_owned()),
    }))
}

#[async_trait]
impl Provisioner for Ec2Provisioner {
    fn capabilities(&self) -> Capabilities {
        // Everything: reboot, a real inventory, batches of any size.
        Capabilities::default()
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        if request.vms.is_empty() {
            return Ok(Vec::new());
        }
        let progress = &request.progress;
        let existing: HashMap<Hostname, ProvisionedVm> = self
            .list()
            .await?
            .into_iter()
            .map(|vm| (vm.hostname.clone(), vm))
            .collect();
        let mut result = Vec::new();
        let mut seen = HashSet::new();
        let mut new = Vec::new();
        for spec in &request.vms {
            if !seen.insert(&spec.hostname) {
                continue;
            }
            if let Some(vm) = existing.get(&spec.hostname) {
                progress.report(&format!(
                    "{} already exists ({})",
                    vm.hostname, vm.instance_id
                ));
                result.push(vm.clone());
                continue;
            }
            let sealed = user_data::seal(&spec.token).map_err(|f| classify(f, "launch"))?;
            let row_len = user_data::row(request.vms.len(), &spec.hostname, &sealed).len();
            new.push(NewVm {
                spec,
                sealed,
                row_len,
            });
        }
        if new.is_empty() {
            return Ok(result);
        }
        let prepared = self.prepare().await.map_err(|f| classify(f, "launch"))?;
        let mut remaining: Vec<&NewVm<'_>> = new.iter().collect();
        let mut created = 0usize;
        let mut last_failure = None;
        'placements: for placement in &prepared.placements {
            while !remaining.is_empty() {
                let batch = remaining[..self.batch_len(&remaining)].to_vec();
                match self.run_batch(prepared, placement, &batch, progress).await {
                    Ok(outcome) => {
                        created += outcome.created.len();
                        result.extend(outcome.created);
                        let done: HashSet<&Hostname> = outcome.done.iter().collect();
                        remaining.retain(|vm| !done.contains(&vm.spec.hostname));
                        if let Some(error) = outcome.tag_failure {
                            last_failure = Some(error);
                        }
                        if done.len() < batch.len() {
                            progress.report(&format!(
                                "{placement}: EC2 launched {} of {} VMs",
                                done.len(),
                                batch.len()
                            ));
                            continue 'placements;
                        }
                    }
                    Err(failure) if is_capacity(&failure) => {
                        let error = classify(failure, "launch");
                        progress.report(&format!(
                            "{placement}: no capacity ({error}); trying the next placement"
                        ));
                        tracing::info!(%placement, error = %error, "no capacity; falling back");
                        last_failure = Some(error);
                        continue 'placements;
                    }
                    Err(failure) => {
                        let error = classify(failure, "launch");
                        if created == 0 {
                            return Err(error);
                        }
                        progress.report(&format!(
                            "launch stopped after creating {created} VMs: {error}"
                        ));
                        tracing::warn!(created, error = %error, "partial launch");
                        return Ok(result);
                    }
                }
            }
            break;
        }
        let missing = new.len() - created;
        if missing > 0 {
            let error = last_failure.unwrap_or_else(|| {
                Error::new(ErrorKind::NoCapacity, "no placement had capacity")
                    .with_operation("launch")
                    .temporary()
            });
            if result.is_empty() {
                return Err(error);
            }
            progress.report(&format!("{missing} VMs could not be created: {error}"));
        }
        Ok(result)
    }

    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        let ids: Vec<String> = vms
            .iter()
            .map(|vm| vm.instance_id.to_string())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        // Only this deployment's live instances: others are "already gone" for us.
        let live: Vec<String> = self
            .describe(Some(&ids))
            .await
            .map_err(|f| classify(f, "destroy"))?
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        self.terminate(&live)
            .await
            .map_err(|f| classify(f, "destroy"))
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        let instances = self.describe(None).await.map_err(|f| classify(f, "list"))?;
        let mut vms = Vec::with_capacity(instances.len());
        for instance in &instances {
            if let Some(vm) = provisioned(instance).map_err(|f| classify(f, "list"))? {
                vms.push(vm);
            }
        }
        Ok(vms)
    }

    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        let id = vm.instance_id.to_string();
        let known = self
            .describe(Some(std::slice::from_ref(&id)))
            .await
            .map_err(|f| classify(f, "reboot"))?;
        if known.is_empty() {
            return Err(Error::not_found(format!(
                "no live instance {id} in deployment {}",
                self.settings.deployment
            ))
            .with_operation("reboot")
            .with_context("hostname", &vm.hostname)
            .with_context("instance_id", &id));
        }
        self.ec2
            .reboot_instances()
            .instance_ids(&id)
            .send()
            .await
            .map_err(|e| classify(AwsFailure::sdk("RebootInstances", e), "reboot"))?;
        Ok(())
    }
}
