//! Uninstall: when the agents' DaemonSet is deleted (`helm uninstall`, `kubectl delete`), the
//! stopping agents detach their programs and remove their pins, so nothing of the product
//! stays on the nodes. A rolling update or a deleted pod keeps them (the next agent adopts
//! them, and redirection never stops).
//!
//! The DaemonSet is watched from start-up, because by the time the pods get SIGTERM the
//! uninstall may already have deleted the agents' RBAC too: a question asked only then could be
//! refused. A last GET at stop covers a watch that had not delivered the deletion yet.
use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{
    Api, Client,
    runtime::watcher::{self, Event},
};
use tracing::{info, warn};

use crate::dataplane;

const FINAL_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the watch has seen of the DaemonSet.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// It existed at some point (a name that never existed is a misconfiguration, not an
    /// uninstall).
    pub existed: bool,
    /// It is gone, or marked for deletion.
    pub deleted: bool,
    /// Within a relist: whether it was in the list so far.
    in_list: bool,
}

impl Seen {
    /// Folds one watch event in (pure, table-tested).
    pub fn on_event(&mut self, event: &Event<DaemonSet>) {
        match event {
            Event::Apply(ds) | Event::InitApply(ds) => {
                self.existed = true;
                self.in_list = true;
                self.deleted = ds.metadata.deletion_timestamp.is_some();
            }
            Event::Delete(_) => {
                self.existed = true;
                self.deleted = true;
            }
            Event::Init => self.in_list = false,
            Event::InitDone => {
                // A relist without it, after it existed: deleted while the watch was down.
                if self.existed && !self.in_list {
                    self.deleted = true;
                }
            }
        }
    }
}

pub struct Watch {
    api: Api<DaemonSet>,
    name: String,
    deleted: tokio::sync::watch::Receiver<bool>,
    existed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    pub fn start(client: Client, namespace: &str, name: &str) -> Self {
        let api: Api<DaemonSet> = Api::namespaced(client, namespace);
        let (deleted_tx, deleted) = tokio::sync::watch::channel(false);
        let existed = Arc::new(AtomicBool::new(false));
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher::watcher(api.clone(), config);
        let (e, n, get) = (existed.clone(), name.to_string(), api.clone());
        let task = tokio::spawn(async move {
            // Known to exist from the start, even if the watch never gets going.
            if let Ok(Some(_)) = get.get_opt(&n).await {
                e.store(true, Ordering::Relaxed);
            }
            let mut seen = Seen::default();
            let mut stream = std::pin::pin!(stream);
            let mut failing = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(event) => {
                        failing = false;
                        seen.on_event(&event);
                        if seen.existed {
                            e.store(true, Ordering::Relaxed);
                        }
                        if seen.deleted && !*deleted_tx.borrow() {
                            info!(daemonset = %n, "the agents' DaemonSet is being deleted: this agent will remove its programs and pins when it stops");
                            let _ = deleted_tx.send(true);
                        }
                    }
                    Err(err) => {
                        if !failing {
                            warn!(daemonset = %n, "watching the agents' DaemonSet: {err}; retrying");
                        }
                        failing = true;
                    }
                }
            }
        });
        Self {
            api,
            name: name.to_string(),
            deleted,
            existed,
            task,
        }
    }

    /// Whether the DaemonSet is gone or going: what the watch saw, else a GET (an existing
    /// DaemonSet answers at once: a rolling update or a deleted pod stops without delay). When
    /// the GET cannot tell (an uninstall may have deleted the agents' RBAC already), the watch
    /// gets [`FINAL_CHECK_TIMEOUT`] more to deliver the deletion.
    pub async fn uninstalling(mut self) -> bool {
        let verdict = self.decide().await;
        self.task.abort();
        verdict
    }

    async fn decide(&mut self) -> bool {
        if *self.deleted.borrow() {
            return true;
        }
        let why =
            match tokio::time::timeout(FINAL_CHECK_TIMEOUT, self.api.get_opt(&self.name)).await {
                Ok(Ok(None)) => return self.existed.load(Ordering::Relaxed),
                Ok(Ok(Some(ds))) => return ds.metadata.deletion_timestamp.is_some(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer".to_string(),
            };
        let delivered = tokio::time::timeout(FINAL_CHECK_TIMEOUT, self.deleted.wait_for(|d| *d));
        if matches!(delivered.await, Ok(Ok(_))) {
            return true;
        }
        warn!(daemonset = %self.name, "could not tell whether the agents' DaemonSet is being deleted ({why}); keeping the programs and pins (`beamlit-agent cleanup` removes them)");
        false
    }
}

/// Detaches the programs and removes every pin (the maps already send nothing to the tunnel:
/// the agent fails its services open before it stops).
pub fn detach(bpffs: &Path) {
    match dataplane::cleanup(bpffs) {
        Ok(removed) => info!(
            pins = removed.len(),
            bpffs = %bpffs.display(),
            "uninstall: programs detached and pins removed; connections take the node's own Service routing"
        ),
        Err(e) => warn!(
            "uninstall: removing the pins under {}: {e}",
            bpffs.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn ds(deleting: bool) -> DaemonSet {
        DaemonSet {
            metadata: ObjectMeta {
                name: Some("beamlit-controller-agent".into()),
                deletion_timestamp: deleting.then_some(Time(jiff::Timestamp::UNIX_EPOCH)),
                ..ObjectMeta::default()
            },
            ..DaemonSet::default()
        }
    }

    #[test]
    fn deletion_is_seen_in_every_form_and_updates_are_not_deletions() {
        use Event::*;
        let cases: Vec<(&str, Vec<Event<DaemonSet>>, bool)> = vec![
            (
                "listed, then updated (rolling update)",
                vec![Init, InitApply(ds(false)), InitDone, Apply(ds(false))],
                false,
            ),
            (
                "deleted",
                vec![Init, InitApply(ds(false)), InitDone, Delete(ds(false))],
                true,
            ),
            (
                "foreground deletion",
                vec![Init, InitApply(ds(false)), InitDone, Apply(ds(true))],
                true,
            ),
            (
                "gone at a relist",
                vec![Init, InitApply(ds(false)), InitDone, Init, InitDone],
                true,
            ),
            ("never existed", vec![Init, InitDone], false),
            (
                "relisted, still there",
                vec![
                    Init,
                    InitApply(ds(false)),
                    InitDone,
                    Init,
                    InitApply(ds(false)),
                    InitDone,
                ],
                false,
            ),
        ];
        for (what, events, deleted) in cases {
            let mut seen = Seen::default();
            for e in &events {
                seen.on_event(e);
            }
            assert_eq!(seen.deleted, deleted, "{what}");
        }
    }
}
