//! Which ModelDeployments an agent's acknowledgement re-queues, and when.
//!
//! Each agent writes the decisions its maps hold into its Lease (see
//! [`beamlit_api::acknowledgement`]); the controller turns them into `status.agents`. With N
//! agents and M models, re-queueing every model a Lease names on every write costs N × M
//! reconciles per decision change: one decision change makes every agent rewrite its Lease,
//! and each Lease names every model. Two things keep it linear:
//! - [`AckTriggers`] re-queues only the models whose entry changed in that Lease (a renewal
//!   changes none);
//! - [`batched`] gathers what arrives within a short window into one re-queue per model, so the
//!   N agents acknowledging one decision cost about one reconcile and one status write, not N.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::Duration,
};

use beamlit_api::{
    ModelDeployment,
    acknowledgement::{APPLIED_ANNOTATION, AppliedDecisions},
};
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    ResourceExt as _,
    runtime::{reflector::ObjectRef, watcher::Event},
};

/// How long acknowledgements are gathered before their models are re-queued: what
/// `status.agents` may lag behind the last agent.
pub const ACK_BATCH: Duration = Duration::from_millis(250);

/// What each Lease acknowledged last, to tell which models a new version of it changes.
#[derive(Default)]
pub struct AckTriggers {
    known: HashMap<String, AppliedDecisions>,
    /// During a relist, the Leases seen so far: those not seen by its end were deleted while
    /// the watch was down.
    relisting: Option<HashSet<String>>,
}

impl AckTriggers {
    /// The models (`namespace/name`) whose acknowledgement `event` changes.
    pub fn on_event(&mut self, event: &Event<Lease>) -> BTreeSet<String> {
        match event {
            Event::Apply(lease) => self.update(lease),
            Event::Delete(lease) => changed(self.known.remove(&lease.name_any()).as_ref(), None),
            Event::Init => {
                self.relisting = Some(HashSet::new());
                BTreeSet::new()
            }
            Event::InitApply(lease) => {
                if let Some(seen) = &mut self.relisting {
                    seen.insert(lease.name_any());
                }
                self.update(lease)
            }
            Event::InitDone => {
                let Some(seen) = self.relisting.take() else {
                    return BTreeSet::new();
                };
                let gone: Vec<String> = self
                    .known
                    .keys()
                    .filter(|name| !seen.contains(*name))
                    .cloned()
                    .collect();
                gone.iter()
                    .flat_map(|name| changed(self.known.remove(name).as_ref(), None))
                    .collect()
            }
        }
    }

    fn update(&mut self, lease: &Lease) -> BTreeSet<String> {
        let new = AppliedDecisions::from_annotation(
            lease
                .annotations()
                .get(APPLIED_ANNOTATION)
                .map(String::as_str),
        );
        let name = lease.name_any();
        let keys = changed(self.known.get(&name), Some(&new));
        self.known.insert(name, new);
        keys
    }
}

/// The models whose entry differs between `old` and `new` (added, removed or changed).
fn changed(old: Option<&AppliedDecisions>, new: Option<&AppliedDecisions>) -> BTreeSet<String> {
    let empty = AppliedDecisions::default();
    let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
    let added_or_changed = new
        .0
        .iter()
        .filter(|(key, applied)| old.0.get(*key) != Some(applied))
        .map(|(key, _)| key);
    let removed = old.0.keys().filter(|key| !new.0.contains_key(*key));
    added_or_changed.chain(removed).cloned().collect()
}

/// Re-queues the models of `changes`, gathered for `window` from the first change of a batch:
/// a model named by several changes within the window is re-queued once, at most `window`
/// after its first change.
pub fn batched(
    changes: impl Stream<Item = BTreeSet<String>> + Send + 'static,
    window: Duration,
) -> impl Stream<Item = ObjectRef<ModelDeployment>> + Send + 'static {
    futures::stream::unfold(Some(Box::pin(changes)), move |changes| async move {
        let mut changes = changes?;
        let mut batch = loop {
            match changes.next().await? {
                keys if keys.is_empty() => continue,
                keys => break keys,
            }
        };
        let deadline = tokio::time::sleep(window);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return Some((batch, Some(changes))),
                next = changes.next() => match next {
                    Some(keys) => batch.extend(keys),
                    // The last batch still goes out; then the stream ends.
                    None => return Some((batch, None)),
                },
            }
        }
    })
    .flat_map(|keys| futures::stream::iter(keys.into_iter().filter_map(|key| model_ref(&key))))
}

/// `namespace/name` as a reference (a key without a `/` is an agent's garbage: skipped).
fn model_ref(key: &str) -> Option<ObjectRef<ModelDeployment>> {
    let (namespace, name) = key.split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use beamlit_api::acknowledgement::Applied;
    use kube::api::ObjectMeta;

    use super::*;

    fn lease(name: &str, acks: &[(&str, i64)]) -> Lease {
        let applied = AppliedDecisions(
            acks.iter()
                .map(|(key, decision)| {
                    (
                        key.to_string(),
                        Applied {
                            uid: format!("uid-{key}"),
                            decision: *decision,
                        },
                    )
                })
                .collect(),
        );
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(BTreeMap::from([(
                    APPLIED_ANNOTATION.to_string(),
                    serde_json::to_string(&applied).expect("serializable"),
                )])),
                ..ObjectMeta::default()
            },
            ..Lease::default()
        }
    }

    fn keys(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn only_the_models_whose_entry_changed_are_requeued() {
        /// What, the events in order, the models the last one re-queues.
        type Case<'a> = (&'a str, &'a [Event<Lease>], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                "a new Lease names all its models",
                &[Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)]))],
                &["ns/a", "ns/b"],
            ),
            (
                "a renewal (same acknowledgement) names none",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                ],
                &[],
            ),
            (
                "one decision changed: that model only",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 2), ("ns/b", 1)])),
                ],
                &["ns/a"],
            ),
            (
                "a model dropped from the Lease",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                    Event::Apply(lease("n1", &[("ns/b", 1)])),
                ],
                &["ns/a"],
            ),
            (
                "another node's Lease is its own",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1)])),
                    Event::Apply(lease("n2", &[("ns/a", 1)])),
                ],
                &["ns/a"],
            ),
            (
                "a deleted Lease names what it held",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                    Event::Delete(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                ],
                &["ns/a", "ns/b"],
            ),
            (
                "a relist that no longer has a Lease names what it held",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1)])),
                    Event::Apply(lease("n2", &[("ns/b", 1)])),
                    Event::Init,
                    Event::InitApply(lease("n2", &[("ns/b", 1)])),
                    Event::InitDone,
                ],
                &["ns/a"],
            ),
        ];
        for (what, events, want) in cases {
            let mut triggers = AckTriggers::default();
            let mut last = BTreeSet::new();
            for event in *events {
                last = triggers.on_event(event);
            }
            assert_eq!(last, keys(want), "{what}");
        }
    }

    #[test]
    fn an_unparsable_annotation_acknowledges_nothing() {
        let mut triggers = AckTriggers::default();
        triggers.on_event(&Event::Apply(lease("n1", &[("ns/a", 1)])));
        let mut garbage = lease("n1", &[]);
        garbage
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(APPLIED_ANNOTATION.into(), "{not json".into());
        assert_eq!(triggers.on_event(&Event::Apply(garbage)), keys(&["ns/a"]));
    }

    #[tokio::test]
    async fn a_burst_within_the_window_requeues_each_model_once() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Box::pin(batched(rx, Duration::from_millis(100)));
        for _ in 0..20 {
            tx.unbounded_send(keys(&["ns/a"])).expect("open");
        }
        tx.unbounded_send(keys(&["ns/b", "no-slash"]))
            .expect("open");
        let started = std::time::Instant::now();
        let first = out.next().await.expect("a batch");
        let second = out.next().await.expect("a batch");
        assert!(started.elapsed() >= Duration::from_millis(90));
        assert_eq!(
            (first, second),
            (
                ObjectRef::new("a").within("ns"),
                ObjectRef::new("b").within("ns")
            )
        );
        // Nothing more until the next change; then a batch of its own.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), out.next())
                .await
                .is_err()
        );
        tx.unbounded_send(keys(&["ns/a"])).expect("open");
        drop(tx);
        assert_eq!(out.next().await, Some(ObjectRef::new("a").within("ns")));
        assert_eq!(out.next().await, None);
    }
}
