//! Cluster mode: the maps and the tunnel follow the ModelDeployments (the controller's decision
//! in their status) and the EndpointSlices of their Services, and this node acknowledges what it
//! applied on its Lease.
//!
//! - Watches feed caches; any change re-computes the whole desired state ([`desired`], pure)
//!   and applies the difference. Nothing is applied before both caches have listed once, so a
//!   restarted agent adopts its pinned maps and changes only what changed meanwhile.
//! - The API server unreachable: the watches retry with backoff and the caches keep their last
//!   state, so the maps do too. When the watches re-list, the caches are replaced and the next
//!   apply brings the maps up to date.
//! - A ModelDeployment deleted leaves the cache, so its entries leave the maps.
pub mod ack;
pub mod api_client;
pub mod desired;
pub mod exempt;
pub mod failover;
pub mod slices;
pub mod uninstall;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use beamlit_api::{ModelDeployment, NamespacedSecretKeyRef};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Secret as KubeSecret};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher::{self, Event},
    },
};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::{apply::Applier, dataplane::Dataplane, tunnel::backend::Secret};
use desired::{Origin, SecretValues, TunnelAddresses};

/// Bounds each call the loop makes to the API server, so an unreachable one never stalls the
/// loop (signals, renewals, the next change).
const API_CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ClusterConfig {
    /// This node's name: the agent's Lease is `beamlit-agent-<node>`.
    pub node_name: String,
    /// Namespace of the agents' Leases.
    pub namespace: String,
    /// Only ModelDeployments of these namespaces are applied; empty means all.
    pub model_namespaces: Vec<String>,
    pub tunnels: TunnelAddresses,
    /// CA bundle trusted by the tunnel in addition to the system roots.
    pub extra_ca_file: Option<PathBuf>,
    /// Where the agent writes what `inspect` shows beside the maps.
    pub state_dir: PathBuf,
    /// The agents' DaemonSet in `namespace`: its deletion (uninstall) makes a stopping agent
    /// remove what it attached and pinned ([`uninstall`]).
    pub daemonset: Option<String>,
    /// Label selector of the pods in `namespace` (the controller's) whose connections are never
    /// redirected, on this node ([`exempt`]).
    pub exempt_pods: Option<String>,
    /// This agent's own pod, never redirected either.
    pub own_pod: Option<exempt::ExemptPod>,
    /// The cgroup the programs are attached to (where pod cgroups are looked for).
    pub pods_cgroup: PathBuf,
    /// How long node-local failover outlasts an outage ([`failover`]).
    pub failover_hold: Duration,
}

/// What `inspect` reads: why each service address is redirected as it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub node: String,
    pub services: Vec<Origin>,
    /// ModelDeployments not applied on this node, and why.
    pub problems: Vec<String>,
    /// Pods never redirected (their cgroups are in `exempt_cgroups`), as `name (cgroup id)`.
    #[serde(default)]
    pub exempt_pods: Vec<String>,
    /// The EndpointSlices this agent caches (see [`slices`]).
    #[serde(default)]
    pub endpoint_slices: WatchedSlices,
}

/// The Service names whose EndpointSlices the agent watches, and what it caches: the slices of
/// every Service of those names, whatever the namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchedSlices {
    pub services: Vec<String>,
    /// Slices cached.
    pub cached: usize,
    /// The Services (`namespace/name`) the cached slices belong to.
    pub cached_services: Vec<String>,
}

pub const STATE_FILE: &str = "services.json";

/// Reads what a cluster-mode agent last wrote into `state_dir` (`None` when there is nothing,
/// e.g. in standalone mode).
pub fn read_state(state_dir: &std::path::Path) -> Option<NodeState> {
    let text = std::fs::read_to_string(state_dir.join(STATE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

struct Secrets {
    values: SecretValues,
    read_at: HashMap<NamespacedSecretKeyRef, Instant>,
}

impl Secrets {
    /// Reads the referenced Secrets not read yet (`all`: also those read over
    /// [`desired::SECRET_REFRESH`] ago). A Secret that cannot be read keeps its last value.
    async fn refresh(&mut self, client: &Client, refs: &[NamespacedSecretKeyRef], all: bool) {
        for reference in refs {
            let fresh = self
                .read_at
                .get(reference)
                .is_some_and(|t| !all || t.elapsed() < desired::SECRET_REFRESH);
            if fresh {
                continue;
            }
            let api: Api<KubeSecret> = Api::namespaced(client.clone(), &reference.namespace);
            let read = tokio::time::timeout(API_CALL_TIMEOUT, api.get_opt(&reference.name)).await;
            let value = match read {
                Ok(Ok(Some(secret))) => secret
                    .data
                    .and_then(|d| d.get(&reference.key).cloned())
                    .and_then(|bytes| String::from_utf8(bytes.0).ok()),
                Ok(Ok(None)) => None,
                Ok(Err(e)) => {
                    warn!(secret = %format!("{}/{}", reference.namespace, reference.name), "reading a client secret: {e}");
                    continue;
                }
                Err(_) => {
                    warn!(secret = %format!("{}/{}", reference.namespace, reference.name), "reading a client secret timed out");
                    continue;
                }
            };
            self.read_at.insert(reference.clone(), Instant::now());
            match value {
                Some(v) => {
                    self.values
                        .insert(reference.clone(), Secret::new(v.trim_end().to_string()));
                }
                None => {
                    self.values.remove(reference);
                }
            }
        }
        self.values.retain(|k, _| refs.contains(k));
        self.read_at.retain(|k, _| refs.contains(k));
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Which watch events matter to the maps. With a fingerprint of what the agent applies, an
/// object whose fingerprint did not change (a write elsewhere in it) is not a change; without
/// one, every event after the first list is.
struct Changes<K: kube::Resource> {
    fingerprint: Option<fn(&K) -> u64>,
    seen: HashMap<reflector::ObjectRef<K>, u64>,
    /// Fingerprints of a list in progress (a relist replaces `seen` when it completes).
    listing: HashMap<reflector::ObjectRef<K>, u64>,
}

impl<K> Changes<K>
where
    K: kube::Resource,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    fn new(fingerprint: Option<fn(&K) -> u64>) -> Self {
        Self {
            fingerprint,
            seen: HashMap::new(),
            listing: HashMap::new(),
        }
    }

    /// Whether `event` may change what the agent applies.
    fn matters(&mut self, event: &Event<K>) -> bool {
        let Some(fingerprint) = self.fingerprint else {
            return !matches!(event, Event::Init | Event::InitApply(_));
        };
        match event {
            Event::Init => {
                self.listing.clear();
                false
            }
            Event::InitApply(obj) => {
                self.listing
                    .insert(reflector::ObjectRef::from_obj(obj), fingerprint(obj));
                false
            }
            // The cache was just replaced by a fresh list.
            Event::InitDone => {
                self.seen = std::mem::take(&mut self.listing);
                true
            }
            Event::Apply(obj) => {
                let new = fingerprint(obj);
                self.seen.insert(reflector::ObjectRef::from_obj(obj), new) != Some(new)
            }
            Event::Delete(obj) => {
                self.seen.remove(&reflector::ObjectRef::from_obj(obj));
                true
            }
        }
    }
}

/// A watch that keeps `writer`'s cache and pokes `changed` on every change after the first list
/// that matters ([`Changes`]).
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    changed: Arc<tokio::sync::Notify>,
    what: &'static str,
    fingerprint: Option<fn(&K) -> u64>,
    listed: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .reflect(writer);
    async move {
        let mut failing = false;
        let mut changes = Changes::new(fingerprint);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing && !matches!(event, Event::Init | Event::InitApply(_)) {
                        info!("{what}: watching again");
                        failing = false;
                    }
                    if let (Event::InitDone, Some(listed)) = (&event, &listed) {
                        listed.store(true, std::sync::atomic::Ordering::Release);
                    }
                    if changes.matters(&event) {
                        changed.notify_one();
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(
                            "{what}: {e}; the maps keep their last state while the watch retries"
                        );
                    }
                    failing = true;
                }
            }
        }
    }
}

/// How soon an unreachable tunnel process is tried again.
const TUNNEL_RETRY: Duration = Duration::from_secs(1);

pub struct Cluster {
    config: ClusterConfig,
    client: Client,
    applier: Applier,
    secrets: Secrets,
    lease: ack::LeaseWriter,
    /// Problems last reported, so each is logged once, not on every change.
    reported: BTreeSet<String>,
    /// Node-local failover's holds after endpoints return.
    holds: failover::Holds,
    /// The earliest end of a hold, when the maps must be recomputed.
    hold_ends: Option<Instant>,
    exemptions: exempt::Exemptions,
    /// What [`NodeState::endpoint_slices`] says.
    watched: WatchedSlices,
}

impl Cluster {
    pub fn new(config: ClusterConfig, client: Client, applier: Applier) -> Self {
        let lease = ack::LeaseWriter::new(client.clone(), &config.namespace, &config.node_name);
        let exemptions =
            exempt::Exemptions::new(config.pods_cgroup.clone(), config.own_pod.clone());
        let holds = failover::Holds::new(config.failover_hold);
        Self {
            exemptions,
            config,
            client,
            applier,
            secrets: Secrets {
                values: SecretValues::new(),
                read_at: HashMap::new(),
            },
            lease,
            reported: BTreeSet::new(),
            holds,
            hold_ends: None,
            watched: WatchedSlices::default(),
        }
    }

    /// Runs until SIGINT/SIGTERM. Stopping leaves the maps as they are (the tunnel's services
    /// fail open first).
    pub async fn run(
        &mut self,
        dataplane: &mut Dataplane,
        bpffs: &std::path::Path,
    ) -> anyhow::Result<()> {
        let uninstall =
            self.config.daemonset.as_ref().map(|name| {
                uninstall::Watch::start(self.client.clone(), &self.config.namespace, name)
            });
        let result = self.serve(dataplane).await;
        let uninstalling = match uninstall {
            Some(watch) => watch.uninstalling().await,
            None => false,
        };
        if uninstalling {
            uninstall::detach(bpffs);
        } else {
            info!(
                "exiting; the programs stay attached and the maps pinned, so redirection \
                 continues and the next agent adopts them (`beamlit-agent cleanup` removes them)"
            );
        }
        result
    }

    async fn serve(&mut self, dataplane: &mut Dataplane) -> anyhow::Result<()> {
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let started = Instant::now();
        let changed = Arc::new(tokio::sync::Notify::new());
        let (models, models_writer) = reflector::store::<ModelDeployment>();
        let mut slices = slices::NamedSlices::new(self.client.clone(), changed.clone());
        let (exempt_pods, exempt_writer) = reflector::store::<Pod>();
        // The agent's own pod first, before anything can be redirected.
        self.exemptions.update(&mut dataplane.maps, &[]);
        let mut watches = vec![tokio::spawn(watch(
            match self.config.model_namespaces.as_slice() {
                [one] => Api::<ModelDeployment>::namespaced(self.client.clone(), one),
                _ => Api::<ModelDeployment>::all(self.client.clone()),
            },
            watcher::Config::default(),
            models_writer,
            changed.clone(),
            "ModelDeployments",
            Some(desired::fingerprint),
            None,
        ))];
        if let Some(selector) = &self.config.exempt_pods {
            watches.push(tokio::spawn(watch(
                Api::<Pod>::namespaced(self.client.clone(), &self.config.namespace),
                watcher::Config::default()
                    .labels(selector)
                    .fields(&format!("spec.nodeName={}", self.config.node_name)),
                exempt_writer,
                changed.clone(),
                "exempt pods",
                None,
                None,
            )));
        }
        info!(node = %self.config.node_name, "cluster mode: waiting for the first list of ModelDeployments and EndpointSlices");
        // The ModelDeployments first, then the EndpointSlices of the Services they name.
        let listed = async {
            let _ = models.wait_until_ready().await;
            slices.follow(slices::named_services(&self.in_scope(&models)));
            while !slices.settled() {
                changed.notified().await;
            }
        };
        tokio::select! {
            () = listed => {}
            _ = tokio::signal::ctrl_c() => return self.stop(dataplane, &watches, &mut slices).await,
            _ = sigterm.recv() => return self.stop(dataplane, &watches, &mut slices).await,
        }
        info!("listed; applying");
        let services = self
            .sync(dataplane, &models, &mut slices, &exempt_pods, true)
            .await;
        info!(
            services,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "in sync with the cluster"
        );
        let mut tick = tokio::time::interval(ack::RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hold_ends = self.hold_ends;
            // A tunnel process that did not answer (restarting, say) is tried again each second.
            let retry = self
                .applier
                .tunnel_unreachable()
                .then(|| Instant::now() + TUNNEL_RETRY);
            let renew = tokio::select! {
                () = changed.notified() => false,
                () = sleep_until(hold_ends) => false,
                () = sleep_until(retry) => false,
                _ = tick.tick() => true,
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
            };
            dataplane.flush_logs();
            self.sync(dataplane, &models, &mut slices, &exempt_pods, renew)
                .await;
        }
        self.stop(dataplane, &watches, &mut slices).await
    }

    async fn stop(
        &mut self,
        dataplane: &mut Dataplane,
        watches: &[tokio::task::JoinHandle<()>],
        slices: &mut slices::NamedSlices,
    ) -> anyhow::Result<()> {
        for w in watches {
            w.abort();
        }
        slices.stop();
        self.applier.stop_tunnel(dataplane).await;
        Ok(())
    }

    /// The ModelDeployments of the namespaces this agent serves (`--model-namespaces`).
    fn in_scope(&self, models: &Store<ModelDeployment>) -> Vec<Arc<ModelDeployment>> {
        let scope = &self.config.model_namespaces;
        models
            .state()
            .into_iter()
            .filter(|m| {
                scope.is_empty()
                    || m.metadata
                        .namespace
                        .as_ref()
                        .is_some_and(|n| scope.contains(n))
            })
            .collect()
    }

    /// One pass: desired state from the caches, applied, written down, acknowledged. Returns
    /// the number of service addresses in the maps.
    async fn sync(
        &mut self,
        dataplane: &mut Dataplane,
        models: &Store<ModelDeployment>,
        slices: &mut slices::NamedSlices,
        exempt_pods: &Store<Pod>,
        periodic: bool,
    ) -> usize {
        self.exemptions
            .update(&mut dataplane.maps, &exempt_pods.state());
        let models = self.in_scope(models);
        // A new set of names takes effect once its watch has listed (a later sync).
        slices.follow(slices::named_services(&models));
        let slices_state = slices.store().state();
        self.watched = WatchedSlices {
            services: slices.names(),
            cached: slices_state.len(),
            cached_services: slices::services_of(&slices_state),
        };
        let refs = desired::secret_refs(&models);
        self.secrets.refresh(&self.client, &refs, periodic).await;
        let mut ready = failover::ready_endpoints_by_service(&slices_state);
        self.hold_ends = self.holds.apply(&mut ready, Instant::now());
        let mut d = desired::desired(&models, &ready, &self.config.tunnels, &self.secrets.values);
        let problems: BTreeSet<String> = d.problems.iter().cloned().collect();
        for p in problems.difference(&self.reported) {
            warn!("{p}");
        }
        self.reported = problems;
        d.set.extra_ca_file = self.config.extra_ca_file.clone();
        let services = match self.applier.apply(dataplane, d.set).await {
            Ok(applied) => {
                if applied.updated + applied.removed > 0 {
                    info!(
                        services = applied.services,
                        updated = applied.updated,
                        removed = applied.removed,
                        "maps updated"
                    );
                }
                applied.services
            }
            Err(e) => {
                error!(
                    "applying the ModelDeployments' decisions: {e:#}; the maps keep their last state"
                );
                return 0;
            }
        };
        self.write_state(d.origins, d.problems);
        if periodic || self.lease.is_news(&d.applied) {
            match tokio::time::timeout(API_CALL_TIMEOUT, self.lease.publish(&d.applied)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!("acknowledging on the node's Lease: {e}; retrying at the next renewal")
                }
                Err(_) => warn!(
                    "acknowledging on the node's Lease timed out; retrying at the next renewal"
                ),
            }
        }
        services
    }

    fn write_state(&self, services: Vec<Origin>, problems: Vec<String>) {
        let state = NodeState {
            node: self.config.node_name.clone(),
            services,
            problems,
            exempt_pods: self.exemptions.describe(),
            endpoint_slices: self.watched.clone(),
        };
        let dir = &self.config.state_dir;
        let result = std::fs::create_dir_all(dir).and_then(|()| {
            let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec_pretty(&state).unwrap_or_default())?;
            std::fs::rename(&tmp, dir.join(STATE_FILE))
        });
        if let Err(e) = result {
            warn!(dir = %dir.display(), "writing the state `inspect` reads: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(uid: &str, percent: i32) -> ModelDeployment {
        let mut md: ModelDeployment = serde_saphyr::from_str(include_str!(
            "../../../tests/fixtures/model-deployment.yaml"
        ))
        .expect("seed parses");
        md.metadata.namespace = Some("models".into());
        md.metadata.uid = Some(uid.into());
        md.status = Some(beamlit_api::ModelDeploymentStatus {
            offload_percent: percent,
            ..Default::default()
        });
        md
    }

    #[test]
    fn writes_the_agent_does_not_apply_do_not_wake_it() {
        let mut changes = Changes::new(Some(desired::fingerprint as fn(&ModelDeployment) -> u64));
        let md = model("a", 0);
        // The first list: one wake-up when it is complete.
        assert!(!changes.matters(&Event::Init));
        assert!(!changes.matters(&Event::InitApply(md.clone())));
        assert!(changes.matters(&Event::InitDone));
        // The controller records an acknowledgement: nothing to apply.
        let mut acked = md.clone();
        acked.status.as_mut().expect("status").agents = Some(Default::default());
        assert!(!changes.matters(&Event::Apply(acked)));
        // A new decision.
        let decided = model("a", 50);
        assert!(changes.matters(&Event::Apply(decided.clone())));
        assert!(!changes.matters(&Event::Apply(decided.clone())));
        // A relist that finds the same objects still wakes once (the cache was replaced).
        assert!(!changes.matters(&Event::Init));
        assert!(!changes.matters(&Event::InitApply(decided.clone())));
        assert!(changes.matters(&Event::InitDone));
        assert!(!changes.matters(&Event::Apply(decided.clone())));
        // Deleted, then created again with the same content: both matter.
        assert!(changes.matters(&Event::Delete(decided.clone())));
        assert!(changes.matters(&Event::Apply(decided)));
    }

    #[test]
    fn without_a_fingerprint_every_event_after_the_list_matters() {
        let mut changes = Changes::<ModelDeployment>::new(None);
        let md = model("a", 0);
        assert!(!changes.matters(&Event::Init));
        assert!(!changes.matters(&Event::InitApply(md.clone())));
        assert!(changes.matters(&Event::InitDone));
        assert!(changes.matters(&Event::Apply(md.clone())));
        assert!(changes.matters(&Event::Apply(md.clone())));
        assert!(changes.matters(&Event::Delete(md)));
    }
}
