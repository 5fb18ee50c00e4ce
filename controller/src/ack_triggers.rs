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
//!   N agents acknowledging one decision cost about one reconcile and one status write, not N;
//! - an agent joining or leaving (a Lease first seen, or deleted) changes the count of every
//!   model, so N agents starting would rewrite every model's status N times, each write sent to
//!   every agent watching: [`Changes::membership`] is throttled to one batch per
//!   [`MEMBERSHIP_INTERVAL`] (the first one goes out after the short window, like any other).
//!   Acknowledgements of a decision never wait behind it.
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

/// How often, at most, agents joining or leaving re-queue the models they count in: what
/// `status.agents.total` may lag behind a node added or removed while others keep arriving.
/// The Lease renewal period, so the lag is no worse than an agent's own heartbeat.
pub const MEMBERSHIP_INTERVAL: Duration = Duration::from_secs(10);

/// The models (`namespace/name`) one Lease event re-queues, by why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Entries of a Lease already known that changed: an agent applied a new decision, took up
    /// a new model or dropped a deleted one. Re-queued after [`ACK_BATCH`].
    pub decisions: BTreeSet<String>,
    /// Every entry of a Lease first seen or gone: an agent joined or left (or the controller
    /// relisted). Throttled to [`MEMBERSHIP_INTERVAL`].
    pub membership: BTreeSet<String>,
}

impl Changes {
    fn decisions(decisions: BTreeSet<String>) -> Self {
        Self {
            decisions,
            ..Self::default()
        }
    }

    fn membership(membership: BTreeSet<String>) -> Self {
        Self {
            membership,
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty() && self.membership.is_empty()
    }
}

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
    pub fn on_event(&mut self, event: &Event<Lease>) -> Changes {
        match event {
            Event::Apply(lease) => self.update(lease),
            Event::Delete(lease) => {
                Changes::membership(changed(self.known.remove(&lease.name_any()).as_ref(), None))
            }
            Event::Init => {
                self.relisting = Some(HashSet::new());
                Changes::default()
            }
            Event::InitApply(lease) => {
                if let Some(seen) = &mut self.relisting {
                    seen.insert(lease.name_any());
                }
                self.update(lease)
            }
            Event::InitDone => {
                let Some(seen) = self.relisting.take() else {
                    return Changes::default();
                };
                let gone: Vec<String> = self
                    .known
                    .keys()
                    .filter(|name| !seen.contains(*name))
                    .cloned()
                    .collect();
                Changes::membership(
                    gone.iter()
                        .flat_map(|name| changed(self.known.remove(name).as_ref(), None))
                        .collect(),
                )
            }
        }
    }

    fn update(&mut self, lease: &Lease) -> Changes {
        let new = AppliedDecisions::from_annotation(
            lease
                .annotations()
                .get(APPLIED_ANNOTATION)
                .map(String::as_str),
        );
        let name = lease.name_any();
        let old = self.known.get(&name);
        let keys = changed(old, Some(&new));
        let changes = match old {
            Some(_) => Changes::decisions(keys),
            None => Changes::membership(keys),
        };
        self.known.insert(name, new);
        changes
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

/// Re-queues the models of `changes`: decisions gathered for `window` from the first change of
/// a batch (a model named by several changes within the window is re-queued once, at most
/// `window` after its first change); membership likewise, but at most one batch per
/// `membership_interval`. A model re-queued for a decision leaves the membership batch (its
/// reconcile counts the agents anyway).
pub fn batched(
    changes: impl Stream<Item = Changes> + Send + 'static,
    window: Duration,
    membership_interval: Duration,
) -> impl Stream<Item = ObjectRef<ModelDeployment>> + Send + 'static {
    let state = Batches {
        changes: Some(Box::pin(changes)),
        decisions: Pending::default(),
        membership: Pending::default(),
        membership_sent: None,
    };
    futures::stream::unfold(state, move |mut state| async move {
        let keys = state.next(window, membership_interval).await?;
        Some((keys, state))
    })
    .flat_map(|keys| futures::stream::iter(keys.into_iter().filter_map(|key| model_ref(&key))))
}

/// Keys waiting to be re-queued, and when they go.
#[derive(Default)]
struct Pending {
    keys: BTreeSet<String>,
    due: Option<tokio::time::Instant>,
}

struct Batches<S> {
    /// `None` once the input ended.
    changes: Option<std::pin::Pin<Box<S>>>,
    decisions: Pending,
    membership: Pending,
    /// When the last membership batch went out.
    membership_sent: Option<tokio::time::Instant>,
}

impl<S: Stream<Item = Changes>> Batches<S> {
    /// The next batch; `None` when the input ended and nothing is left.
    async fn next(
        &mut self,
        window: Duration,
        membership_interval: Duration,
    ) -> Option<BTreeSet<String>> {
        loop {
            let Some(changes) = self.changes.as_mut() else {
                // The input ended: what is left goes out at once.
                let mut rest = std::mem::take(&mut self.decisions.keys);
                rest.append(&mut std::mem::take(&mut self.membership.keys));
                return (!rest.is_empty()).then_some(rest);
            };
            let decisions_due = self.decisions.due;
            let membership_due = self.membership.due;
            tokio::select! {
                () = sleep_until(decisions_due) => {
                    let keys = std::mem::take(&mut self.decisions.keys);
                    self.decisions.due = None;
                    self.membership.keys.retain(|k| !keys.contains(k));
                    if self.membership.keys.is_empty() {
                        self.membership.due = None;
                    }
                    return Some(keys);
                }
                () = sleep_until(membership_due) => {
                    let keys = std::mem::take(&mut self.membership.keys);
                    self.membership.due = None;
                    self.membership_sent = Some(tokio::time::Instant::now());
                    return Some(keys);
                }
                next = changes.next() => {
                    let Some(Changes { decisions, membership }) = next else {
                        self.changes = None;
                        continue;
                    };
                    let now = tokio::time::Instant::now();
                    if !decisions.is_empty() {
                        self.decisions.keys.extend(decisions);
                        self.decisions.due.get_or_insert(now + window);
                    }
                    if !membership.is_empty() {
                        self.membership.keys.extend(membership);
                        let throttled = self
                            .membership_sent
                            .map_or(now, |sent| sent + membership_interval);
                        self.membership.due.get_or_insert((now + window).max(throttled));
                    }
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
        /// What, the events in order, the models the last one re-queues: for a decision, for
        /// membership.
        type Case<'a> = (&'a str, &'a [Event<Lease>], &'a [&'a str], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                "a new Lease names all its models",
                &[Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)]))],
                &[],
                &["ns/a", "ns/b"],
            ),
            (
                "a renewal (same acknowledgement) names none",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                ],
                &[],
                &[],
            ),
            (
                "one decision changed: that model only",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 2), ("ns/b", 1)])),
                ],
                &["ns/a"],
                &[],
            ),
            (
                "a model dropped from the Lease",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                    Event::Apply(lease("n1", &[("ns/b", 1)])),
                ],
                &["ns/a"],
                &[],
            ),
            (
                "a model added to a known Lease is a decision to apply",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                ],
                &["ns/b"],
                &[],
            ),
            (
                "another node's Lease is its own: a new agent, membership",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1)])),
                    Event::Apply(lease("n2", &[("ns/a", 1)])),
                ],
                &[],
                &["ns/a"],
            ),
            (
                "a deleted Lease names what it held",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                    Event::Delete(lease("n1", &[("ns/a", 1), ("ns/b", 1)])),
                ],
                &[],
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
                &[],
                &["ns/a"],
            ),
        ];
        for (what, events, decisions, membership) in cases {
            let mut triggers = AckTriggers::default();
            let mut last = Changes::default();
            for event in *events {
                last = triggers.on_event(event);
            }
            let want = Changes {
                decisions: keys(decisions),
                membership: keys(membership),
            };
            assert_eq!(last, want, "{what}");
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
        assert_eq!(
            triggers.on_event(&Event::Apply(garbage)).decisions,
            keys(&["ns/a"])
        );
    }

    fn decisions(list: &[&str]) -> Changes {
        Changes::decisions(keys(list))
    }

    fn membership(list: &[&str]) -> Changes {
        Changes::membership(keys(list))
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_within_the_window_requeues_each_model_once() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Box::pin(batched(
            rx,
            Duration::from_millis(100),
            Duration::from_secs(10),
        ));
        for _ in 0..20 {
            tx.unbounded_send(decisions(&["ns/a"])).expect("open");
        }
        tx.unbounded_send(decisions(&["ns/b", "no-slash"]))
            .expect("open");
        let started = tokio::time::Instant::now();
        let first = out.next().await.expect("a batch");
        let second = out.next().await.expect("a batch");
        assert_eq!(started.elapsed(), Duration::from_millis(100));
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
        tx.unbounded_send(decisions(&["ns/a"])).expect("open");
        drop(tx);
        assert_eq!(out.next().await, Some(ObjectRef::new("a").within("ns")));
        assert_eq!(out.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn agents_joining_requeue_once_per_interval_and_decisions_never_wait() {
        let window = Duration::from_millis(250);
        let interval = Duration::from_secs(10);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Box::pin(batched(rx, window, interval));
        let t0 = tokio::time::Instant::now();
        // The first agent's Lease: after the short window, like a decision.
        tx.unbounded_send(membership(&["ns/a", "ns/b"]))
            .expect("open");
        assert_eq!(out.next().await, Some(ObjectRef::new("a").within("ns")));
        assert_eq!(out.next().await, Some(ObjectRef::new("b").within("ns")));
        assert_eq!(t0.elapsed(), window);
        // Nine more agents over the next 9 s: one batch, when the interval is over.
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.unbounded_send(membership(&["ns/a", "ns/b"]))
                .expect("open");
        }
        // Meanwhile a decision of ns/b is acknowledged: it goes after the short window, and
        // leaves the membership batch.
        let acked = tokio::time::Instant::now();
        tx.unbounded_send(decisions(&["ns/b"])).expect("open");
        assert_eq!(out.next().await, Some(ObjectRef::new("b").within("ns")));
        assert_eq!(acked.elapsed(), window);
        assert_eq!(out.next().await, Some(ObjectRef::new("a").within("ns")));
        assert_eq!(t0.elapsed(), window + interval, "once per interval");
        // After a quiet interval, the next agent goes after the short window again.
        tokio::time::sleep(interval).await;
        let joined = tokio::time::Instant::now();
        tx.unbounded_send(membership(&["ns/a"])).expect("open");
        assert_eq!(out.next().await, Some(ObjectRef::new("a").within("ns")));
        assert_eq!(joined.elapsed(), window);
        // The input ends with a membership batch pending: it goes out at once.
        tx.unbounded_send(membership(&["ns/b"])).expect("open");
        drop(tx);
        assert_eq!(out.next().await, Some(ObjectRef::new("b").within("ns")));
        assert_eq!(out.next().await, None);
    }
}
