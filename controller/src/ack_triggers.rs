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
//! - while only some nodes acknowledged a model's decision, [`Changes::progress`] waits
//!   [`PROGRESS_INTERVAL`]: agents on more nodes spread their acknowledgements over more time,
//!   and a status write per 250 ms of that spread, each delivered to every agent, grew faster
//!   than the node count. The acknowledgement after which every node agrees
//!   ([`Changes::decisions`]) goes after the short window and takes the model out of the
//!   waiting batches, so a change costs about two status writes (the decision, and "all
//!   applied") whatever the number of nodes;
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
    acknowledgement::{self, APPLIED_ANNOTATION, Applied, AppliedDecisions},
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

/// How long acknowledgements that leave some nodes behind are gathered: how far `applied` in
/// `status.agents` may lag while a decision is rolling out.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// The models (`namespace/name`) one Lease event re-queues, by why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Entries of a Lease already known that changed, after which every node's Leases hold the
    /// same entry for the model (or none does): the last agent applied a new decision, took up
    /// a new model or dropped a deleted one. Re-queued after [`ACK_BATCH`].
    pub decisions: BTreeSet<String>,
    /// Entries that changed while other nodes still hold another entry (or none): a rollout in
    /// progress. Re-queued after [`PROGRESS_INTERVAL`], unless it completes first.
    pub progress: BTreeSet<String>,
    /// Every entry of a Lease first seen or gone: an agent joined or left (or the controller
    /// relisted). Throttled to [`MEMBERSHIP_INTERVAL`].
    pub membership: BTreeSet<String>,
}

impl Changes {
    fn membership(membership: BTreeSet<String>) -> Self {
        Self {
            membership,
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty() && self.progress.is_empty() && self.membership.is_empty()
    }
}

/// What the controller knows of one Lease.
struct Known {
    node: String,
    /// Shard 0 of its node (the one renewed, whose freshness is the node's).
    first_shard: bool,
    renew: Option<jiff::Timestamp>,
    duration_seconds: Option<i32>,
    applied: AppliedDecisions,
}

impl Known {
    fn of(lease: &Lease, applied: AppliedDecisions) -> Self {
        let (node, shard) = acknowledgement::lease_node_and_shard(lease);
        let spec = lease.spec.as_ref();
        Self {
            node: node.to_string(),
            first_shard: shard == 0,
            renew: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            duration_seconds: spec.and_then(|s| s.lease_duration_seconds),
            applied,
        }
    }
}

/// What each Lease acknowledged last, to tell which models a new version of it changes.
#[derive(Default)]
pub struct AckTriggers {
    /// Lease name → its node and what it acknowledges.
    known: HashMap<String, Known>,
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
                let gone = self.known.remove(&lease.name_any()).map(|k| k.applied);
                Changes::membership(changed(gone.as_ref(), None))
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
                        .flat_map(|name| {
                            changed(self.known.remove(name).map(|k| k.applied).as_ref(), None)
                        })
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
        let old = self.known.insert(name, Known::of(lease, new.clone()));
        let keys = changed(old.as_ref().map(|k| &k.applied), Some(&new));
        if old.is_none() {
            return Changes::membership(keys);
        }
        let (decisions, progress) = keys.into_iter().partition(|key| self.agreed(key));
        Changes {
            decisions,
            progress,
            ..Changes::default()
        }
    }

    /// Whether every live node's Leases hold the same entry for `key`, or none holds one. A
    /// node counts while its shard 0 is fresh, as in `status.agents.total`: a node gone for
    /// good leaves its Lease (agents cannot delete it), and must not hold every rollout back.
    fn agreed(&self, key: &str) -> bool {
        let now = jiff::Timestamp::now();
        let live: HashSet<&str> = self
            .known
            .values()
            .filter(|k| {
                k.first_shard && acknowledgement::lease_is_fresh(k.renew, k.duration_seconds, now)
            })
            .map(|k| k.node.as_str())
            .collect();
        let mut nodes: HashMap<&str, Option<&Applied>> = HashMap::new();
        for k in self
            .known
            .values()
            .filter(|k| live.contains(k.node.as_str()))
        {
            let entry = nodes.entry(k.node.as_str()).or_default();
            // A node's entry sits in one of its shards; the others say nothing of it.
            if let Some(a) = k.applied.0.get(key) {
                *entry = Some(a);
            }
        }
        let mut entries = nodes.into_values();
        let first = entries.next().flatten();
        entries.all(|e| e == first)
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
/// `window` after its first change); progress likewise over `progress_window`; membership
/// after `window` too, but at most one batch per `membership_interval`. A model re-queued
/// leaves the other batches (its reconcile counts everything anyway).
pub fn batched(
    changes: impl Stream<Item = Changes> + Send + 'static,
    window: Duration,
    progress_window: Duration,
    membership_interval: Duration,
) -> impl Stream<Item = ObjectRef<ModelDeployment>> + Send + 'static {
    let state = Batches {
        changes: Some(Box::pin(changes)),
        pending: Default::default(),
        membership_sent: None,
    };
    futures::stream::unfold(state, move |mut state| async move {
        let keys = state
            .next(window, progress_window, membership_interval)
            .await?;
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

impl Pending {
    fn add(&mut self, keys: BTreeSet<String>, due: tokio::time::Instant) {
        if !keys.is_empty() {
            self.keys.extend(keys);
            self.due.get_or_insert(due);
        }
    }
}

/// Indexes of [`Batches::pending`].
const DECISIONS: usize = 0;
const PROGRESS: usize = 1;
const MEMBERSHIP: usize = 2;

struct Batches<S> {
    /// `None` once the input ended.
    changes: Option<std::pin::Pin<Box<S>>>,
    /// Decisions, progress, membership.
    pending: [Pending; 3],
    /// When the last membership batch went out.
    membership_sent: Option<tokio::time::Instant>,
}

impl<S: Stream<Item = Changes>> Batches<S> {
    /// The next batch; `None` when the input ended and nothing is left.
    async fn next(
        &mut self,
        window: Duration,
        progress_window: Duration,
        membership_interval: Duration,
    ) -> Option<BTreeSet<String>> {
        loop {
            let Some(changes) = self.changes.as_mut() else {
                // The input ended: what is left goes out at once.
                let rest: BTreeSet<String> = self
                    .pending
                    .iter_mut()
                    .flat_map(|p| std::mem::take(&mut p.keys))
                    .collect();
                return (!rest.is_empty()).then_some(rest);
            };
            let due = self.pending.each_ref().map(|p| p.due);
            let fired = tokio::select! {
                () = sleep_until(due[DECISIONS]) => DECISIONS,
                () = sleep_until(due[PROGRESS]) => PROGRESS,
                () = sleep_until(due[MEMBERSHIP]) => MEMBERSHIP,
                next = changes.next() => {
                    let Some(Changes { decisions, progress, membership }) = next else {
                        self.changes = None;
                        continue;
                    };
                    let now = tokio::time::Instant::now();
                    self.pending[DECISIONS].add(decisions, now + window);
                    self.pending[PROGRESS].add(progress, now + progress_window);
                    let throttled = self
                        .membership_sent
                        .map_or(now, |sent| sent + membership_interval);
                    self.pending[MEMBERSHIP].add(membership, (now + window).max(throttled));
                    continue;
                }
            };
            let keys = std::mem::take(&mut self.pending[fired].keys);
            self.pending[fired].due = None;
            if fired == MEMBERSHIP {
                self.membership_sent = Some(tokio::time::Instant::now());
            }
            for other in &mut self.pending {
                other.keys.retain(|k| !keys.contains(k));
                if other.keys.is_empty() {
                    other.due = None;
                }
            }
            return Some(keys);
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

    use k8s_openapi::{
        api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime,
    };
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
            // A live agent's Lease: renewed just now.
            spec: Some(LeaseSpec {
                holder_identity: Some(name.into()),
                renew_time: Some(MicroTime(jiff::Timestamp::now())),
                lease_duration_seconds: Some(30),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Shard `shard` of `node`'s acknowledgement (see beamlit_api::acknowledgement).
    fn shard(node: &str, shard: usize, acks: &[(&str, i64)]) -> Lease {
        let mut l = lease(&format!("{node}-ack-{shard}"), acks);
        l.spec.get_or_insert_default().holder_identity = Some(node.into());
        l.metadata
            .labels
            .get_or_insert_default()
            .insert(acknowledgement::SHARD_LABEL.into(), shard.to_string());
        l
    }

    /// The Lease of a node gone for good: last renewed an hour ago.
    fn stale(name: &str, acks: &[(&str, i64)]) -> Lease {
        let mut l = lease(name, acks);
        l.spec.get_or_insert_default().renew_time = Some(MicroTime(
            jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1),
        ));
        l
    }

    fn keys(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn only_the_models_whose_entry_changed_are_requeued() {
        /// What, the events in order, the models the last one re-queues: for a decision, for
        /// progress, for membership.
        type Case<'a> = (
            &'a str,
            &'a [Event<Lease>],
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            (
                "a new Lease names all its models",
                &[Event::Apply(lease("n1", &[("ns/a", 1), ("ns/b", 1)]))],
                &[],
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
                &[],
            ),
            (
                "one node of two applied a new decision: progress",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1)])),
                    Event::Apply(lease("n2", &[("ns/a", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 2)])),
                ],
                &[],
                &["ns/a"],
                &[],
            ),
            (
                "the last node applied it: every node agrees, a decision",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1)])),
                    Event::Apply(lease("n2", &[("ns/a", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 2)])),
                    Event::Apply(lease("n2", &[("ns/a", 2)])),
                ],
                &["ns/a"],
                &[],
                &[],
            ),
            (
                "a node gone for good (stale Lease) does not hold a rollout back",
                &[
                    Event::Apply(stale("n0", &[("ns/a", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 2)])),
                ],
                &["ns/a"],
                &[],
                &[],
            ),
            (
                "a node's entry in another shard counts as its entry",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1)])),
                    Event::Apply(lease("n2", &[])),
                    Event::Apply(shard("n2", 1, &[("ns/a", 1)])),
                    Event::Apply(lease("n1", &[("ns/a", 2)])),
                    Event::Apply(shard("n2", 1, &[("ns/a", 2)])),
                ],
                &["ns/a"],
                &[],
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
                &[],
            ),
            (
                "another node's Lease is its own: a new agent, membership",
                &[
                    Event::Apply(lease("n1", &[("ns/a", 1)])),
                    Event::Apply(lease("n2", &[("ns/a", 1)])),
                ],
                &[],
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
                &[],
                &["ns/a"],
            ),
        ];
        for (what, events, decisions, progress, membership) in cases {
            let mut triggers = AckTriggers::default();
            let mut last = Changes::default();
            for event in *events {
                last = triggers.on_event(event);
            }
            let want = Changes {
                decisions: keys(decisions),
                progress: keys(progress),
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
        Changes {
            decisions: keys(list),
            ..Changes::default()
        }
    }

    fn progress(list: &[&str]) -> Changes {
        Changes {
            progress: keys(list),
            ..Changes::default()
        }
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
            Duration::from_secs(2),
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
    async fn a_rollout_in_progress_waits_and_its_completion_does_not() {
        let window = Duration::from_millis(250);
        let progress_window = Duration::from_secs(2);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Box::pin(batched(
            rx,
            window,
            progress_window,
            Duration::from_secs(10),
        ));
        // Nodes acknowledging one after another, 300 ms apart, the last one at 900 ms: no
        // re-queue until the last, then one, after the short window.
        let t0 = tokio::time::Instant::now();
        for _ in 0..3 {
            tx.unbounded_send(progress(&["ns/a"])).expect("open");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        tx.unbounded_send(decisions(&["ns/a"])).expect("open");
        assert_eq!(out.next().await, Some(ObjectRef::new("a").within("ns")));
        assert_eq!(t0.elapsed(), Duration::from_millis(900) + window);
        // A rollout slower than the progress window shows its progress once per window.
        let t1 = tokio::time::Instant::now();
        tx.unbounded_send(progress(&["ns/b"])).expect("open");
        assert_eq!(out.next().await, Some(ObjectRef::new("b").within("ns")));
        assert_eq!(t1.elapsed(), progress_window);
        drop(tx);
        assert_eq!(out.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn agents_joining_requeue_once_per_interval_and_decisions_never_wait() {
        let window = Duration::from_millis(250);
        let interval = Duration::from_secs(10);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Box::pin(batched(rx, window, Duration::from_secs(2), interval));
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
