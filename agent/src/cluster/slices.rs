//! The EndpointSlices an agent caches: those of the Services its ModelDeployments name, not the
//! cluster's. Every agent watching every EndpointSlice costs each node memory and watch events
//! in proportion to the whole cluster's endpoints; a node only needs the Services it may
//! redirect.
//!
//! One watch, labelled `kubernetes.io/service-name in (…)` with the names the resolved
//! ModelDeployments give (`status.service`). When that set changes the watch is started again
//! with the new selector, beside the old one, and the old cache stays in use until the new one
//! has listed: a Service never looks as if it had no EndpointSlice (which would lose node-local
//! failover for it) in between. Services of the same name in other namespaces match the selector
//! too; they are cached and ignored (readiness is keyed by namespace and name).
use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use beamlit_api::{ModelDeployment, endpoints::SERVICE_NAME_LABEL};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    runtime::{
        reflector::{self, Store},
        watcher,
    },
};
use tracing::info;

/// The names of the Services the resolved ModelDeployments point at.
pub fn named_services(models: &[Arc<ModelDeployment>]) -> BTreeSet<String> {
    models
        .iter()
        .filter_map(|m| m.status.as_ref()?.service.as_ref())
        .map(|s| s.name.clone())
        .collect()
}

/// The Services (`namespace/name`) that `slices` belong to, each once.
pub fn services_of(slices: &[Arc<EndpointSlice>]) -> Vec<String> {
    slices
        .iter()
        .filter_map(|s| {
            let name = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
            Some(format!("{}/{name}", s.metadata.namespace.as_deref()?))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The label selector for `names` (`None`: nothing to watch).
pub fn selector(names: &BTreeSet<String>) -> Option<String> {
    (!names.is_empty()).then(|| {
        format!(
            "{SERVICE_NAME_LABEL} in ({})",
            names.iter().cloned().collect::<Vec<_>>().join(",")
        )
    })
}

/// One watch and its cache.
struct Watch {
    names: BTreeSet<String>,
    store: Store<EndpointSlice>,
    listed: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub struct NamedSlices {
    client: Client,
    changed: Arc<tokio::sync::Notify>,
    /// The cache in use.
    current: Watch,
    /// A watch with another set of names, until it has listed.
    next: Option<Watch>,
}

impl NamedSlices {
    /// Watching nothing yet; [`Self::follow`] names the Services.
    pub fn new(client: Client, changed: Arc<tokio::sync::Notify>) -> Self {
        let current = Self::start(&client, &changed, BTreeSet::new());
        Self {
            client,
            changed,
            current,
            next: None,
        }
    }

    fn start(
        client: &Client,
        changed: &Arc<tokio::sync::Notify>,
        names: BTreeSet<String>,
    ) -> Watch {
        let (store, mut writer) = reflector::store::<EndpointSlice>();
        let listed = Arc::new(AtomicBool::new(false));
        let task = match selector(&names) {
            Some(selector) => Some(tokio::spawn(super::watch(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default().labels(&selector),
                writer,
                changed.clone(),
                "EndpointSlices",
                None,
                Some(listed.clone()),
            ))),
            None => {
                // Nothing to list: an empty cache, complete at once.
                writer.apply_watcher_event(&watcher::Event::Init);
                writer.apply_watcher_event(&watcher::Event::InitDone);
                listed.store(true, Ordering::Release);
                None
            }
        };
        Watch {
            names,
            store,
            listed,
            task,
        }
    }

    /// Watches the EndpointSlices of `names` from now on (nothing changes when they are the
    /// names already watched or being listed).
    pub fn follow(&mut self, names: BTreeSet<String>) {
        let target = self.next.as_ref().unwrap_or(&self.current);
        if target.names == names {
            return;
        }
        info!(
            services = names.len(),
            "watching the EndpointSlices of the Services the ModelDeployments name"
        );
        // A watch still listing for an older set is dropped (aborted) here.
        self.next = Some(Self::start(&self.client, &self.changed, names));
        self.promote();
    }

    /// The cache to read: the newest watch that has listed.
    pub fn store(&mut self) -> &Store<EndpointSlice> {
        self.promote();
        &self.current.store
    }

    /// Whether the cache in use is that of the names last followed (the newest watch has
    /// listed).
    pub fn settled(&mut self) -> bool {
        self.promote();
        self.next.is_none()
    }

    /// The Services watched, for `inspect`.
    pub fn names(&self) -> Vec<String> {
        self.current.names.iter().cloned().collect()
    }

    fn promote(&mut self) {
        if self
            .next
            .as_ref()
            .is_some_and(|n| n.listed.load(Ordering::Acquire))
            && let Some(next) = self.next.take()
        {
            // The old watch is aborted as it drops.
            self.current = next;
        }
    }

    /// Stops every watch.
    pub fn stop(&mut self) {
        self.next = None;
        if let Some(task) = self.current.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selector_names_each_service_once() {
        let names: BTreeSet<String> = ["b", "a", "b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            selector(&names).as_deref(),
            Some("kubernetes.io/service-name in (a,b)")
        );
        assert_eq!(selector(&BTreeSet::new()), None);
    }
}
