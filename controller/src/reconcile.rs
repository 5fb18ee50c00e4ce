//! The controller loop: thin. Gather what the ModelDeployment points at, ask the pure
//! [`crate::decision`] what to do, write it to status (server-side apply) and say so in
//! an Event when it changes. Every input error becomes a condition and an Event, never a crash.
use std::{sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
    coordination::v1::Lease,
    core::v1::Service,
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt as _,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tracing::{info, warn};

use beamlit_api::{
    AgentsApplied, MetricValue, ModelDeployment, ModelDeploymentStatus, ResolvedWorkload,
    WorkloadKind,
    acknowledgement::{self, AppliedDecisions},
    grant::ModelDeploymentGrant,
};

use crate::{
    admission::{self, Refusal},
    backend::{self, DefaultRemoteBackend},
    beamlit_sync, decision,
    resolve::{self, ResolveError},
    status::{self, ConditionState, DecisionFields, Observed},
};

pub const FIELD_MANAGER: &str = "beamlit-controller";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("ModelDeployment without a namespace")]
    NoNamespace,
    #[error("the caches of Services, EndpointSlices and workloads did not fill within 60 s")]
    CachesNotReady,
    #[error("{0}")]
    Beamlit(#[from] crate::beamlit_api::ApiError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    pub stabilization_window: Duration,
    /// Re-evaluation interval when nothing changes (metrics move without events).
    pub resync: Duration,
    pub metrics: crate::metrics::ControllerMetrics,
    /// Source of External metrics, if configured.
    pub prometheus: Option<crate::metric_source::Prometheus>,
    /// Namespaces whose ModelDeployments this controller handles; empty means all.
    pub namespaces: Vec<String>,
    /// Substituted for `$workspace` in remote backend paths.
    pub workspace: Option<String>,
    /// Where the agents' Leases live (their acknowledgements).
    pub agent_namespace: String,
    /// For ModelDeployments without their own remote backend.
    pub default_backend: Option<DefaultRemoteBackend>,
    /// The Beamlit API, when the controller has credentials for it.
    pub beamlit: Option<crate::beamlit_api::BeamlitApi>,
    /// The cluster admin's boundary: protected Services, allowed remote hosts, token URLs.
    pub policy: admission::Policy,
}

impl Context {
    fn handles(&self, namespace: Option<&str>) -> bool {
        self.namespaces.is_empty()
            || namespace.is_some_and(|n| self.namespaces.iter().any(|a| a == n))
    }
}

/// An API over one namespace when the controller handles exactly one, else over all.
fn scoped<K>(client: &Client, namespaces: &[String]) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespaces {
        [one] => Api::namespaced(client.clone(), one),
        _ => Api::all(client.clone()),
    }
}

/// Caches of what ModelDeployments point at, so that a reconcile reads memory instead of the
/// API (1000 models re-evaluated every 15 s would otherwise cost ~12 000 requests a minute).
/// Each cache is fed by the same watch stream that triggers reconciles, and the stream updates
/// the cache before it triggers: a reconcile never sees an older object than its trigger.
pub struct Caches {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    deployments: Store<Deployment>,
    statefulsets: Store<StatefulSet>,
    replicasets: Store<ReplicaSet>,
    daemonsets: Store<DaemonSet>,
    /// The agents' Leases (one per node), for "applied on N of M nodes".
    agent_leases: Store<Lease>,
    /// Grants of cross-namespace references (see [`crate::admission`]).
    grants: Store<ModelDeploymentGrant>,
    /// Bumped after every EndpointSlice event reaches `slices`, so that a reconcile waiting on
    /// a metrics source can notice its Service losing its last ready endpoint meanwhile.
    slices_changed: tokio::sync::watch::Receiver<()>,
    /// Set once every cache has listed (see [`Caches::ready`]).
    listed: tokio::sync::OnceCell<()>,
    /// Each Lease's acknowledgements, parsed once per resourceVersion rather than by every
    /// reconcile (the annotation lists every model the node applied).
    parsed_acks: std::sync::Mutex<std::collections::HashMap<String, ParsedAcks>>,
}

/// A Lease's resourceVersion and what it acknowledges.
type ParsedAcks = (Option<String>, Arc<AppliedDecisions>);

impl Caches {
    /// What `lease` acknowledges, from the parse cache.
    fn acknowledged(&self, lease: &Lease) -> Arc<AppliedDecisions> {
        let name = lease.name_any();
        let version = lease.resource_version();
        let mut cache = self
            .parsed_acks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((seen, parsed)) = cache.get(&name)
            && *seen == version
        {
            return parsed.clone();
        }
        let parsed = Arc::new(AppliedDecisions::from_annotation(
            lease
                .annotations()
                .get(acknowledgement::APPLIED_ANNOTATION)
                .map(String::as_str),
        ));
        cache.insert(name, (version, parsed.clone()));
        parsed
    }
}

impl Caches {
    /// Ready endpoints of `service`, from the EndpointSlice cache.
    fn ready_endpoints(&self, service: &beamlit_api::ResolvedService) -> u32 {
        let slices = self.slices.state();
        resolve::ready_endpoints(slices.iter().map(AsRef::as_ref).filter(|slice| {
            slice.namespace().as_deref() == Some(service.namespace.as_str())
                && slice.labels().get(SERVICE_NAME_LABEL) == Some(&service.name)
        }))
    }

    /// Completes when `service` has no ready endpoint left, checked after each slice event
    /// that `changed` (marked before the last count) sees; never, if the slice watch ends.
    async fn last_endpoint_gone(
        &self,
        service: &beamlit_api::ResolvedService,
        mut changed: tokio::sync::watch::Receiver<()>,
    ) {
        while changed.changed().await.is_ok() {
            if self.ready_endpoints(service) == 0 {
                return;
            }
        }
        std::future::pending().await
    }

    /// Right after start, a cache may not have listed yet: wait, rather than report missing
    /// objects that exist.
    ///
    /// One task waits on the stores, the others on it: kube-runtime's `Store::wait_until_ready`
    /// keeps one waker (a futures oneshot), so of several reconciles waiting at once only the
    /// last one polled was woken, and the others hung until the 60 s timeout (seen: one of two
    /// models never reconciled after a start).
    async fn ready(&self) -> Result<(), Error> {
        self.listed
            .get_or_try_init(|| async {
                let all = async {
                    self.services.wait_until_ready().await?;
                    self.slices.wait_until_ready().await?;
                    self.deployments.wait_until_ready().await?;
                    self.statefulsets.wait_until_ready().await?;
                    self.replicasets.wait_until_ready().await?;
                    self.daemonsets.wait_until_ready().await?;
                    self.grants.wait_until_ready().await?;
                    self.agent_leases.wait_until_ready().await
                };
                match tokio::time::timeout(Duration::from_secs(60), all).await {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(Error::CachesNotReady),
                }
            })
            .await
            .copied()
    }
}

/// The context of the running controller: the configuration and the caches.
pub struct Running {
    ctx: Arc<Context>,
    caches: Caches,
}

/// A watch of `K` (scoped like the controller) that feeds a cache and yields the objects touched.
fn cached<K>(
    client: &Client,
    namespaces: &[String],
    config: watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = watcher(scoped::<K>(client, namespaces), config)
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    (store, stream)
}

/// Runs the controller until the process is told to stop.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let ns = ctx.namespaces.clone();
    let models: Api<ModelDeployment> = scoped(&client, &ns);
    let controller = Controller::new(models, watcher::Config::default()).shutdown_on_signal();
    let store = controller.store();
    let (services, services_stream) = cached::<Service>(&client, &ns, watcher::Config::default());
    let (slices, slices_stream) = cached::<EndpointSlice>(
        &client,
        &ns,
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    );
    // The store is written before the stream yields (reflect, then touched_objects): a
    // reconcile woken by this signal reads the slice that caused it.
    let (slices_tx, slices_changed) = tokio::sync::watch::channel(());
    let slices_stream = slices_stream.inspect(move |_| {
        slices_tx.send_replace(());
    });
    let (deployments, deployments_stream) =
        cached::<Deployment>(&client, &ns, watcher::Config::default());
    let (statefulsets, statefulsets_stream) =
        cached::<StatefulSet>(&client, &ns, watcher::Config::default());
    let (replicasets, replicasets_stream) =
        cached::<ReplicaSet>(&client, &ns, watcher::Config::default());
    let (daemonsets, daemonsets_stream) =
        cached::<DaemonSet>(&client, &ns, watcher::Config::default());
    let (grants, grants_stream) =
        cached::<ModelDeploymentGrant>(&client, &ns, watcher::Config::default());
    let (agent_leases, writer) = reflector::store();
    let mut acks = crate::ack_triggers::AckTriggers::default();
    let ack_changes = watcher(
        Api::<Lease>::namespaced(client.clone(), &ctx.agent_namespace),
        watcher::Config::default().labels(acknowledgement::AGENT_LEASE_SELECTOR),
    )
    .default_backoff()
    .reflect(writer)
    // Renewals (every few seconds per node) change no acknowledgement: only the models whose
    // entry changed count.
    .filter_map(move |event| futures::future::ready(event.ok().map(|e| acks.on_event(&e))));
    let running = Arc::new(Running {
        ctx,
        caches: Caches {
            services,
            slices,
            deployments,
            statefulsets,
            replicasets,
            daemonsets,
            agent_leases,
            grants,
            slices_changed,
            listed: tokio::sync::OnceCell::new(),
            parsed_acks: std::sync::Mutex::default(),
        },
    });
    let (s1, s2, s3, s4, s5, s6, s7) = (
        store.clone(),
        store.clone(),
        store.clone(),
        store.clone(),
        store.clone(),
        store.clone(),
        store.clone(),
    );
    controller
        // A Service appearing, changing or going away re-evaluates the models that use it.
        .watches_stream(services_stream, move |service| {
            referencing(&s1, service.namespace(), &service.name_any())
        })
        // Endpoint readiness is what drives failover.
        .watches_stream(slices_stream, move |slice| {
            let name = slice.labels().get(SERVICE_NAME_LABEL).cloned();
            name.map(|n| referencing(&s2, slice.namespace(), &n))
                .unwrap_or_default()
        })
        // The workload's changes (scaling, rollouts, deletion) are reported in status.
        .watches_stream(deployments_stream, move |w| {
            naming_workload(&s3, WorkloadKind::Deployment, w.namespace(), &w.name_any())
        })
        .watches_stream(statefulsets_stream, move |w| {
            naming_workload(&s4, WorkloadKind::StatefulSet, w.namespace(), &w.name_any())
        })
        .watches_stream(replicasets_stream, move |w| {
            naming_workload(&s5, WorkloadKind::ReplicaSet, w.namespace(), &w.name_any())
        })
        .watches_stream(daemonsets_stream, move |w| {
            naming_workload(&s6, WorkloadKind::DaemonSet, w.namespace(), &w.name_any())
        })
        // A grant written or withdrawn re-evaluates the models that reference its namespace.
        .watches_stream(grants_stream, move |g| {
            referencing_namespace(&s7, g.namespace().as_deref().unwrap_or_default())
        })
        // An agent acknowledging a decision updates "applied on N of M nodes" of the models
        // whose entry changed, gathered over ACK_BATCH once every node agrees, over
        // PROGRESS_INTERVAL before; agents joining or leaving, at most once per
        // MEMBERSHIP_INTERVAL (see crate::ack_triggers). An agent that dies is noticed at
        // the next resync, when its Lease has expired.
        .reconcile_on(crate::ack_triggers::batched(
            ack_changes,
            crate::ack_triggers::ACK_BATCH,
            crate::ack_triggers::PROGRESS_INTERVAL,
            crate::ack_triggers::MEMBERSHIP_INTERVAL,
        ))
        .run(reconcile, error_policy, running)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("reconcile: {e}");
            }
        })
        .await;
}

/// The ModelDeployments whose serviceRef names this Service.
fn referencing(
    store: &Store<ModelDeployment>,
    namespace: Option<String>,
    name: &str,
) -> Vec<ObjectRef<ModelDeployment>> {
    store
        .state()
        .iter()
        .filter(|md| {
            md.spec.service_ref.as_ref().is_some_and(|r| {
                r.name == name && r.namespace.clone().or_else(|| md.namespace()) == namespace
            })
        })
        .map(|md| ObjectRef::from_obj(md.as_ref()))
        .collect()
}

/// The ModelDeployments with a reference into another namespace, `namespace`.
fn referencing_namespace(
    store: &Store<ModelDeployment>,
    namespace: &str,
) -> Vec<ObjectRef<ModelDeployment>> {
    store
        .state()
        .iter()
        .filter(|md| {
            let service = md
                .spec
                .service_ref
                .as_ref()
                .and_then(|r| r.namespace.as_deref());
            let workload = md.spec.model_source_ref.namespace.as_deref();
            md.namespace().as_deref() != Some(namespace)
                && (service == Some(namespace) || workload == Some(namespace))
        })
        .map(|md| ObjectRef::from_obj(md.as_ref()))
        .collect()
}

/// The ModelDeployments whose modelSourceRef names this workload.
fn naming_workload(
    store: &Store<ModelDeployment>,
    kind: WorkloadKind,
    namespace: Option<String>,
    name: &str,
) -> Vec<ObjectRef<ModelDeployment>> {
    store
        .state()
        .iter()
        .filter(|md| {
            let r = &md.spec.model_source_ref;
            r.kind == kind
                && r.name == name
                && r.namespace.clone().or_else(|| md.namespace()) == namespace
        })
        .map(|md| ObjectRef::from_obj(md.as_ref()))
        .collect()
}

fn error_policy(md: Arc<ModelDeployment>, error: &Error, running: Arc<Running>) -> Action {
    warn!(model_deployment = %md.name_any(), "{error}; retrying in 5 s");
    running.ctx.metrics.reconcile_error();
    Action::requeue(Duration::from_secs(5))
}

/// With Beamlit credentials, a finalizer holds each ModelDeployment until its model is deleted on
/// Beamlit; without them no finalizer is added (one left by an earlier configuration is
/// released), so deleting never waits on a service this controller does not talk to.
pub async fn reconcile(md: Arc<ModelDeployment>, running: Arc<Running>) -> Result<Action, Error> {
    let namespace = md.namespace().ok_or(Error::NoNamespace)?;
    if !running.ctx.handles(Some(&namespace)) {
        return Ok(Action::await_change());
    }
    let holds_finalizer = md.finalizers().iter().any(|f| f == beamlit_sync::FINALIZER);
    if running.ctx.beamlit.is_none() && !holds_finalizer {
        return apply(md, &running).await;
    }
    let api: Api<ModelDeployment> = Api::namespaced(running.ctx.client.clone(), &namespace);
    finalizer(&api, beamlit_sync::FINALIZER, md, |event| async {
        match event {
            finalizer::Event::Apply(md) => apply(md, &running).await,
            finalizer::Event::Cleanup(md) => cleanup(md, &running).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// The ModelDeployment is being deleted: its model goes from Beamlit (404 = already gone).
async fn cleanup(md: Arc<ModelDeployment>, running: &Running) -> Result<Action, Error> {
    if let Some(api) = &running.ctx.beamlit {
        api.delete_model(&md.spec.model, &md.spec.environment)
            .await?;
        info!(model_deployment = %md.name_any(), model = %md.spec.model, "model deleted on Beamlit");
    }
    Ok(Action::await_change())
}

async fn apply(md: Arc<ModelDeployment>, running: &Running) -> Result<Action, Error> {
    let (ctx, caches) = (&running.ctx, &running.caches);
    let namespace = md.namespace().ok_or(Error::NoNamespace)?;
    ctx.metrics.reconcile();
    caches.ready().await?;
    let client = &ctx.client;
    let now = std::time::SystemTime::now();

    // The boundary first: a refused ModelDeployment is not resolved, and nothing of it reaches
    // the status fields the agents apply.
    let verdict = admission::check(
        &md.spec,
        &admission::Inputs {
            namespace: &namespace,
            policy: &ctx.policy,
            default_backend: ctx.default_backend.as_ref(),
            grants: &caches.grants.state(),
        },
    );
    let warnings = match verdict {
        Ok(warnings) => warnings,
        Err(refusal) => return refuse(&md, running, &namespace, &refusal, now).await,
    };

    let (service, service_error) = match resolve_service(caches, &md, &namespace) {
        Ok(service) => (Some(service), None),
        Err(e) => (None, Some(e)),
    };
    // Marked before counting: a slice event from here on wakes the metrics read below.
    let mut slices_changed = caches.slices_changed.clone();
    slices_changed.mark_unchanged();
    let ready_endpoints = service.as_ref().map_or(0, |s| caches.ready_endpoints(s));
    let (workload, workload_error) = match resolve_workload(caches, &md, &namespace) {
        Ok(w) => (Some(w), None),
        Err(why) => (None, Some(why)),
    };
    let selector = workload
        .as_ref()
        .and_then(|w| workload_selector(caches, &md.spec.model_source_ref.kind, w));
    let sources = crate::metric_source::Sources {
        client: &ctx.client,
        prometheus: ctx.prometheus.as_ref(),
        pods: match (&workload, &selector) {
            (Some(w), Some(selector)) => Some(crate::metric_source::WorkloadPods {
                namespace: &w.namespace,
                selector,
                replicas: w.ready_replicas,
            }),
            _ => None,
        },
        namespace: &namespace,
    };
    // No ready endpoint: everything is offloaded whatever the metrics say, so they are not read.
    // Reading them would hold the failover back: on real nodes, metrics-server answers 503 for
    // seconds while pods come and go, and each call waits up to METRICS_API_TIMEOUT (seen: the
    // decision 4.9 s after `kubectl scale --replicas=0` instead of at once). For the same
    // reason a read already under way is abandoned when the last endpoint goes meanwhile (seen
    // on CI: `kubectl scale` re-queued the model through its Deployment while one endpoint was
    // still ready, that read waited 3 s on metrics-server, and the EndpointSlice's reconcile
    // queued behind it).
    let (ready_endpoints, (readings, metric_values)) = match &service {
        Some(_) if ready_endpoints == 0 => (0, unread_metrics(&md)),
        Some(s) => {
            let read = evaluate_metrics(&md, &sources);
            let gone = caches.last_endpoint_gone(s, slices_changed);
            tokio::select! {
                biased;
                () = gone => (0, unread_metrics(&md)),
                read = read => (ready_endpoints, read),
            }
        }
        None => (0, evaluate_metrics(&md, &sources).await),
    };

    let previous_status = md.status.clone();
    let previous = previous_status.as_ref().and_then(decision_from_status);
    let offloading = md.spec.offloading_config.as_ref();
    let inputs = decision::Inputs {
        enabled: md.spec.enabled,
        has_offloading_config: offloading.is_some(),
        percentage: offloading.map_or(0, |o| {
            u8::try_from(o.behavior.percentage.clamp(0, 100)).unwrap_or(100)
        }),
        // Without a resolvable Service there is nothing to offload: keep the decision neutral
        // rather than claim "no ready endpoints".
        ready_endpoints: if service.is_some() {
            ready_endpoints
        } else {
            u32::MAX
        },
        metrics: &readings,
        previous: previous.as_ref(),
        now,
        stabilization_window: ctx.stabilization_window,
    };
    let next = decision::decide(&inputs);

    let mut conditions = vec![ConditionState {
        type_: "Ready",
        ok: Some(service_error.is_none()),
        reason: service_error
            .as_ref()
            .map_or("Resolved".to_string(), |e| e.reason().to_string()),
        message: service_error
            .as_ref()
            .map_or_else(|| "the Service resolved".to_string(), ToString::to_string),
    }];
    conditions.push(ConditionState {
        type_: "WorkloadFound",
        ok: Some(workload_error.is_none()),
        reason: if workload_error.is_none() {
            "Found".into()
        } else {
            "WorkloadNotFound".into()
        },
        message: workload_error
            .clone()
            .unwrap_or_else(|| "the workload exists".into()),
    });
    conditions.push(ConditionState {
        type_: "Offloading",
        ok: Some(next.percent > 0),
        reason: next.reason.to_string(),
        message: next.message.clone(),
    });
    let backend = backend::effective(
        &md,
        &namespace,
        ctx.default_backend.as_ref(),
        ctx.workspace.as_deref(),
    );
    conditions.push(match &backend {
        None => ConditionState {
            type_: "RemoteBackendConfigured",
            ok: Some(false),
            reason: "NoOffloadingConfig".into(),
            message: "spec.offloadingConfig is absent: this model is never offloaded".into(),
        },
        Some(Ok(b)) => ConditionState {
            type_: "RemoteBackendConfigured",
            ok: Some(true),
            reason: if b.source == "spec" {
                "InSpec".into()
            } else {
                "UsesDefault".into()
            },
            message: format!(
                "offloaded connections go to {}://{}{}",
                match b.scheme {
                    beamlit_api::Scheme::Http => "http",
                    beamlit_api::Scheme::Https => "https",
                },
                b.host,
                b.path_prefix
            ),
        },
        Some(Err(e)) => ConditionState {
            type_: "RemoteBackendConfigured",
            ok: Some(false),
            reason: e.reason().into(),
            message: e.to_string(),
        },
    });
    conditions.push(ConditionState {
        type_: "Accepted",
        ok: Some(true),
        reason: "Accepted".into(),
        message: "the references, the remote backend and every field are allowed".into(),
    });
    for w in &warnings {
        conditions.push(ConditionState {
            type_: "Deprecated",
            ok: Some(true),
            reason: w.reason().into(),
            message: w.message().into(),
        });
    }
    let backend_error = match &backend {
        Some(Err(e)) => Some(e.clone()),
        _ => None,
    };
    let remote_backend = backend.and_then(Result::ok);
    let timestamp = jiff::Timestamp::try_from(now).unwrap_or_else(|_| jiff::Timestamp::now());
    let mut requeue = ctx.resync;
    let serving_port = service.as_ref().map(|s| match &s.target_port {
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p)) => *p,
        _ => s.port,
    });
    let beamlit = match &ctx.beamlit {
        None => None,
        Some(api) => {
            let previous_sync = previous_status.as_ref().and_then(|s| s.beamlit.as_ref());
            let offloading = next.percent > 0;
            let step =
                beamlit_sync::plan(previous_sync, md.metadata.generation, offloading, timestamp);
            let (sync, error) = match step {
                beamlit_sync::Step::UpToDate | beamlit_sync::Step::Waiting => {
                    (previous_sync.cloned().unwrap_or_default(), None)
                }
                step => {
                    let model = beamlit_sync::model_of(&md, serving_port, offloading);
                    let result = beamlit_sync::run(api, step, &model).await;
                    let sync = beamlit_sync::after(
                        previous_sync,
                        step,
                        md.metadata.generation,
                        offloading,
                        result.as_ref().map(|_| ()),
                        timestamp,
                    );
                    (sync, result.err())
                }
            };
            if let Some(wait) = beamlit_sync::retry_in(&sync, timestamp) {
                requeue = requeue.min(wait.max(Duration::from_secs(1)));
            }
            conditions.push(ConditionState {
                type_: "BeamlitSynced",
                ok: Some(sync.last_error.is_none()),
                reason: match &error {
                    Some(e) => e.reason().to_string(),
                    None if sync.last_error.is_some() => "RetryingWithBackoff".into(),
                    None => "Synced".into(),
                },
                message: sync.last_error.clone().unwrap_or_else(|| {
                    format!(
                        "model {} is on Beamlit, as of this generation",
                        md.spec.model
                    )
                }),
            });
            Some((sync, error))
        }
    };
    let mut status = status::build(
        previous_status.as_ref(),
        Observed {
            generation: md.metadata.generation,
            service,
            workload,
            ready_endpoints,
            metrics: metric_values,
            conditions,
            remote_backend,
        },
        decision_fields(&next),
        timestamp,
        |generation| Some(agents_applied(caches, &md, generation, timestamp)),
    );
    let beamlit_error = beamlit.as_ref().and_then(|(_, e)| e.clone());
    if let Some((sync, _)) = beamlit {
        status.beamlit = Some(sync);
    }
    // An unchanged status is not written again: a resync of a quiet object costs no write.
    if previous_status.as_ref() != Some(&status) {
        patch_status(client, &md, &namespace, &status).await?;
    }

    let recorder = Recorder::new(client.clone(), ctx.reporter.clone());
    let reference = md.object_ref(&());
    if let Some(message) = decision::transition(previous.as_ref(), &next) {
        info!(model_deployment = %md.name_any(), percent = next.percent, reason = %next.reason, "{message}");
        ctx.metrics.decision(&next.reason.to_string());
        publish(
            &recorder,
            &reference,
            EventType::Normal,
            &next.reason.to_string(),
            "Decide",
            &message,
        )
        .await;
    }
    if let Some(why) = &workload_error {
        let was = previous_status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "WorkloadFound"))
            .map(|c| c.status.clone());
        if was.as_deref() != Some("False") {
            publish(
                &recorder,
                &reference,
                EventType::Warning,
                "WorkloadNotFound",
                "Resolve",
                why,
            )
            .await;
        }
    }
    if let Some(e) = &beamlit_error {
        warn!(model_deployment = %md.name_any(), "{e}");
        publish(
            &recorder,
            &reference,
            EventType::Warning,
            e.reason(),
            "SyncBeamlit",
            &e.to_string(),
        )
        .await;
    }
    // Input errors: one Warning when the condition's reason changes, not one per resync.
    let problems = [
        (
            "RemoteBackendConfigured",
            backend_error.as_ref().map(|e| (e.reason(), e.to_string())),
        ),
        (
            "Ready",
            service_error.as_ref().map(|e| (e.reason(), e.to_string())),
        ),
        (
            "Deprecated",
            warnings
                .first()
                .map(|w| (w.reason(), w.message().to_string())),
        ),
    ];
    for (condition, problem) in problems {
        let Some((reason, message)) = problem else {
            continue;
        };
        let was = previous_status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition))
            .map(|c| c.reason.clone());
        if was.as_deref() != Some(reason) {
            publish(
                &recorder,
                &reference,
                EventType::Warning,
                reason,
                "Resolve",
                &message,
            )
            .await;
        }
    }
    Ok(Action::requeue(requeue))
}

/// The status of a refused ModelDeployment: `Accepted=False` naming the field and the fix, 0%,
/// and no Service or remote backend, so that no agent applies anything of it (an agent that
/// applied an earlier, accepted version removes it). A Warning Event when the reason changes.
async fn refuse(
    md: &ModelDeployment,
    running: &Running,
    namespace: &str,
    refusal: &Refusal,
    now: std::time::SystemTime,
) -> Result<Action, Error> {
    let ctx = &running.ctx;
    let timestamp = jiff::Timestamp::try_from(now).unwrap_or_else(|_| jiff::Timestamp::now());
    let previous_status = md.status.as_ref();
    let was = previous_status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"))
        .filter(|c| c.status == "False")
        .map(|c| c.reason.clone());
    let since = previous_status
        .filter(|s| s.reason.as_deref() == Some("Refused"))
        .and_then(|s| s.since.clone())
        .unwrap_or_else(|| timestamp.to_string());
    let message = refusal.to_string();
    let status = status::build(
        previous_status,
        Observed {
            generation: md.metadata.generation,
            service: None,
            workload: None,
            ready_endpoints: 0,
            metrics: vec![],
            conditions: vec![ConditionState {
                type_: "Accepted",
                ok: Some(false),
                reason: refusal.reason().into(),
                message: message.clone(),
            }],
            remote_backend: None,
        },
        DecisionFields {
            percent: 0,
            reason: "Refused".into(),
            message: format!("not offloaded: {message}"),
            since,
            last_metric_above: None,
        },
        timestamp,
        |generation| Some(agents_applied(&running.caches, md, generation, timestamp)),
    );
    if previous_status != Some(&status) {
        patch_status(&ctx.client, md, namespace, &status).await?;
    }
    if was.as_deref() != Some(refusal.reason()) {
        warn!(model_deployment = %md.name_any(), "refused: {message}");
        let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        publish(
            &recorder,
            &md.object_ref(&()),
            EventType::Warning,
            refusal.reason(),
            "Admit",
            &message,
        )
        .await;
    }
    Ok(Action::requeue(ctx.resync))
}

/// Agents alive (fresh Lease) and, of those, the ones that applied `generation` of this model.
fn agents_applied(
    caches: &Caches,
    md: &ModelDeployment,
    generation: i64,
    now: jiff::Timestamp,
) -> AgentsApplied {
    let key = acknowledgement::model_key(
        md.namespace().as_deref().unwrap_or_default(),
        &md.name_any(),
    );
    let uid = md.uid().unwrap_or_default();
    let leases = caches.agent_leases.state();
    // Shard 0 of each node (see beamlit_api::acknowledgement): its freshness and shard count.
    let mut nodes: std::collections::HashMap<&str, (bool, usize)> = Default::default();
    for lease in &leases {
        let (node, shard) = acknowledgement::lease_node_and_shard(lease);
        if shard == 0 {
            let spec = lease.spec.as_ref();
            let fresh = acknowledgement::lease_is_fresh(
                spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
                spec.and_then(|s| s.lease_duration_seconds),
                now,
            );
            nodes.insert(node, (fresh, acknowledgement::lease_shard_count(lease)));
        }
    }
    let mut applied = std::collections::HashSet::new();
    for lease in &leases {
        let (node, shard) = acknowledgement::lease_node_and_shard(lease);
        if nodes
            .get(node)
            .is_some_and(|&(fresh, count)| fresh && shard < count)
            && caches
                .acknowledged(lease)
                .has_applied(&key, &uid, generation)
        {
            applied.insert(node);
        }
    }
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    AgentsApplied {
        applied: count(applied.len()),
        total: count(nodes.values().filter(|(fresh, _)| *fresh).count()),
    }
}

async fn publish(
    recorder: &Recorder,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        warn!("publishing an Event: {e}");
    }
}

/// The workload of `modelSourceRef`; namespace defaults to the ModelDeployment's. `Err` says
/// what is missing and how to fix it.
fn resolve_workload(
    caches: &Caches,
    md: &ModelDeployment,
    namespace: &str,
) -> Result<ResolvedWorkload, String> {
    let r = &md.spec.model_source_ref;
    let ns = r.namespace.clone().unwrap_or_else(|| namespace.to_string());
    // Ready replicas as each kind reports them (ready pods for a DaemonSet).
    let ready = match r.kind {
        WorkloadKind::Deployment => {
            cached_ready(&caches.deployments, &r.name, &ns, |w: &Deployment| {
                w.status.as_ref().and_then(|s| s.ready_replicas)
            })
        }
        WorkloadKind::StatefulSet => {
            cached_ready(&caches.statefulsets, &r.name, &ns, |w: &StatefulSet| {
                w.status.as_ref().and_then(|s| s.ready_replicas)
            })
        }
        WorkloadKind::ReplicaSet => {
            cached_ready(&caches.replicasets, &r.name, &ns, |w: &ReplicaSet| {
                w.status.as_ref().and_then(|s| s.ready_replicas)
            })
        }
        WorkloadKind::DaemonSet => {
            cached_ready(&caches.daemonsets, &r.name, &ns, |w: &DaemonSet| {
                w.status.as_ref().map(|s| s.number_ready)
            })
        }
    };
    let kind = format!("{:?}", r.kind);
    match ready {
        Some(ready_replicas) => Ok(ResolvedWorkload {
            kind,
            name: r.name.clone(),
            namespace: ns,
            ready_replicas,
        }),
        None => Err(format!(
            "{kind} {ns}/{} does not exist; create it or fix spec.modelSourceRef",
            r.name
        )),
    }
}

/// `Some(ready replicas)` if the cache holds the workload.
fn cached_ready<K>(
    store: &Store<K>,
    name: &str,
    namespace: &str,
    ready: impl Fn(&K) -> Option<i32>,
) -> Option<i32>
where
    K: Resource + Clone,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    store
        .get(&ObjectRef::new(name).within(namespace))
        .map(|w| ready(&w).unwrap_or(0))
}

fn resolve_service(
    caches: &Caches,
    md: &ModelDeployment,
    namespace: &str,
) -> Result<beamlit_api::ResolvedService, ResolveError> {
    let Some(service_ref) = &md.spec.service_ref else {
        return Err(ResolveError::NoServiceRef);
    };
    let service_namespace = service_ref
        .namespace
        .clone()
        .unwrap_or_else(|| namespace.to_string());
    match caches
        .services
        .get(&ObjectRef::new(&service_ref.name).within(&service_namespace))
    {
        Some(service) => resolve::resolve_service(&service, service_ref, &service_namespace),
        None => Err(ResolveError::ServiceNotFound {
            namespace: service_namespace,
            name: service_ref.name.clone(),
        }),
    }
}

/// The workload's pod selector, rendered for a list call (from the cached workload).
fn workload_selector(caches: &Caches, kind: &WorkloadKind, w: &ResolvedWorkload) -> Option<String> {
    let (name, ns) = (w.name.as_str(), w.namespace.as_str());
    let selector = match kind {
        WorkloadKind::Deployment => caches
            .deployments
            .get(&ObjectRef::new(name).within(ns))?
            .spec
            .selector
            .clone(),
        WorkloadKind::StatefulSet => caches
            .statefulsets
            .get(&ObjectRef::new(name).within(ns))?
            .spec
            .selector
            .clone(),
        WorkloadKind::ReplicaSet => caches
            .replicasets
            .get(&ObjectRef::new(name).within(ns))?
            .spec
            .selector
            .clone(),
        WorkloadKind::DaemonSet => caches
            .daemonsets
            .get(&ObjectRef::new(name).within(ns))?
            .spec
            .selector
            .clone(),
    };
    kube::core::Selector::try_from(selector)
        .ok()
        .map(|s| s.to_string())
        .filter(|s| !s.is_empty())
}

/// Every metric of the spec, left unread while the Service has no ready endpoint.
fn unread_metrics(md: &ModelDeployment) -> (Vec<decision::MetricReading>, Vec<MetricValue>) {
    md.spec
        .offloading_config
        .as_ref()
        .map(|o| o.metrics.as_slice())
        .unwrap_or(&[])
        .iter()
        .map(|m| {
            crate::metric_source::not_read(
                m,
                "not read while the Service has no ready endpoint (everything is offloaded)",
            )
        })
        .unzip()
}

/// Every metric of the spec, read and compared (see [`crate::metric_source`]).
async fn evaluate_metrics(
    md: &ModelDeployment,
    sources: &crate::metric_source::Sources<'_>,
) -> (Vec<decision::MetricReading>, Vec<MetricValue>) {
    let metrics = md
        .spec
        .offloading_config
        .as_ref()
        .map(|o| o.metrics.as_slice())
        .unwrap_or(&[]);
    let mut readings = Vec::with_capacity(metrics.len());
    let mut values = Vec::with_capacity(metrics.len());
    for metric in metrics {
        let (reading, value) = crate::metric_source::evaluate(metric, sources).await;
        readings.push(reading);
        values.push(value);
    }
    (readings, values)
}

async fn patch_status(
    client: &Client,
    md: &ModelDeployment,
    namespace: &str,
    status: &ModelDeploymentStatus,
) -> Result<(), Error> {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(
        &md.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// The previous decision, restored from status: this is how a restarted controller continues
/// where it was.
fn decision_from_status(status: &ModelDeploymentStatus) -> Option<decision::Decision> {
    decision::Decision::from_status_fields(
        status.offload_percent,
        status.reason.as_deref()?,
        status.since.as_deref()?,
        status.last_metric_above.as_deref(),
        status.message.clone().unwrap_or_default(),
    )
}

fn decision_fields(d: &decision::Decision) -> DecisionFields {
    let (since, last_metric_above) = d.status_times();
    DecisionFields {
        percent: i32::from(d.percent),
        reason: d.reason.to_string(),
        message: d.message.clone(),
        since,
        last_metric_above,
    }
}
