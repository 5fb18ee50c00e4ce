//! The agents' acknowledgements: one `coordination.k8s.io/v1` Lease per node, in the agents'
//! namespace, named `beamlit-agent-<node>`.
//!
//! A Lease because it already means "this holder is alive until renewTime + duration": the
//! controller counts only agents whose Lease is fresh, so a node that died stops counting without
//! anyone cleaning up. The applied decisions ride in one annotation (JSON), keyed by
//! ModelDeployment, each with the object's uid (a deleted and re-created ModelDeployment starts
//! its decision count again) and the `status.decisionGeneration` the agent's maps reflect.
//!
//! An annotation holds at most 256 KiB (all of an object's annotations together), about 3000
//! entries. Past [`ENTRIES_PER_SHARD`] entries a node's acknowledgement is split into shards by a
//! hash of the key ([`split`]): shard 0 is the Lease above, the only one renewed (the node's
//! liveness), and shard k > 0 is the Lease `beamlit-agent-<node>-ack-<k>` ([`shard_lease_name`]).
//! Every shard carries the labels [`NODE_LABEL`] and [`SHARD_LABEL`], and shard 0 the count
//! ([`SHARDS_ANNOTATION`]); the controller reads the union of shards 0..count of a node while
//! its shard 0 is fresh, so a shard left over from a larger count (agents may create and patch
//! Leases, not delete them) says nothing. The shard count is a power of two, so a model added
//! moves no other entry between shards, and a shard whose entries did not change is not
//! rewritten.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Label on every agent Lease, so the controller can list them (and nothing else).
pub const AGENT_LEASE_LABEL_KEY: &str = "app.kubernetes.io/component";
pub const AGENT_LEASE_LABEL_VALUE: &str = "beamlit-agent";
/// `AGENT_LEASE_LABEL_KEY=AGENT_LEASE_LABEL_VALUE`, as a label selector.
pub const AGENT_LEASE_SELECTOR: &str = "app.kubernetes.io/component=beamlit-agent";
/// Annotation holding [`AppliedDecisions`] as JSON.
pub const APPLIED_ANNOTATION: &str = "deployment.beamlit.com/applied";
/// The namespace agents and controller use unless configured otherwise (the Helm chart's).
pub const DEFAULT_AGENT_NAMESPACE: &str = "beamlit-system";

/// The Lease of the agent on `node`.
pub fn lease_name(node: &str) -> String {
    format!("beamlit-agent-{node}")
}

/// Label naming the node on each of its acknowledgement Leases.
pub const NODE_LABEL: &str = "deployment.beamlit.com/node";
/// The [`NODE_LABEL`] value for `node`: the name itself, or a hash of it when it is longer than
/// a label value may be (63 characters; node names may have 253).
pub fn node_label_value(node: &str) -> String {
    if node.len() <= 63 {
        node.to_string()
    } else {
        format!("node-{:016x}", fnv1a(node))
    }
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Label giving the shard (0 = the Lease that is renewed) of an acknowledgement Lease. A Lease
/// without it is shard 0 (agents before sharding).
pub const SHARD_LABEL: &str = "deployment.beamlit.com/ack-shard";
/// Annotation of shard 0: how many shards the node's acknowledgement has (absent: 1).
pub const SHARDS_ANNOTATION: &str = "deployment.beamlit.com/ack-shards";
/// Entries per shard at most: at ~80 bytes each (key, uid, decision), about 120 KiB, half of
/// what the API server allows for an object's annotations.
pub const ENTRIES_PER_SHARD: usize = 1500;

/// The Lease holding shard `shard` of `node`'s acknowledgement.
pub fn shard_lease_name(node: &str, shard: usize) -> String {
    match shard {
        0 => lease_name(node),
        k => format!("beamlit-agent-{node}-ack-{k}"),
    }
}

/// How many shards `entries` acknowledgements take: the smallest power of two that keeps each
/// within [`ENTRIES_PER_SHARD`] on average (hashing leaves some a little fuller).
pub fn shard_count(entries: usize) -> usize {
    entries
        .div_ceil(ENTRIES_PER_SHARD)
        .max(1)
        .next_power_of_two()
}

/// The shard of `key` among `count` (FNV-1a: stable across versions and platforms, unlike std's
/// hasher).
pub fn shard_of(key: &str, count: usize) -> usize {
    let hash = fnv1a(key);
    // count is at least 1; the remainder fits in usize.
    usize::try_from(hash % count.max(1) as u64).unwrap_or(0)
}

/// `applied` split into [`shard_count`] shards (shard i at index i).
pub fn split(applied: &AppliedDecisions) -> Vec<AppliedDecisions> {
    let count = shard_count(applied.0.len());
    let mut shards = vec![AppliedDecisions::default(); count];
    for (key, value) in &applied.0 {
        shards[shard_of(key, count)]
            .0
            .insert(key.clone(), value.clone());
    }
    shards
}

/// `namespace/name` of a ModelDeployment, the key of [`AppliedDecisions`].
pub fn model_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// What one agent has applied: ModelDeployment (`namespace/name`) → decision.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedDecisions(pub BTreeMap<String, Applied>);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub uid: String,
    /// The ModelDeployment's `status.decisionGeneration` the agent's maps reflect.
    pub decision: i64,
}

impl AppliedDecisions {
    /// Whether this agent applied decision `decision` (or a later one) of the ModelDeployment
    /// `key` with `uid`.
    pub fn has_applied(&self, key: &str, uid: &str, decision: i64) -> bool {
        self.0
            .get(key)
            .is_some_and(|a| a.uid == uid && a.decision >= decision)
    }

    /// Parses the annotation; an agent of another version writing garbage counts as having
    /// applied nothing rather than failing the controller.
    pub fn from_annotation(text: Option<&str>) -> Self {
        text.and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default()
    }
}

/// The node an acknowledgement Lease belongs to (its holder; the name for a Lease without
/// one) and its shard ([`SHARD_LABEL`], 0 when absent or unreadable: agents before sharding).
pub fn lease_node_and_shard(lease: &k8s_openapi::api::coordination::v1::Lease) -> (&str, usize) {
    let node = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .or(lease.metadata.name.as_deref())
        .unwrap_or_default();
    let shard = lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SHARD_LABEL))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (node, shard)
}

/// How many shards shard 0 announces ([`SHARDS_ANNOTATION`]; 1 when absent or unreadable).
pub fn lease_shard_count(lease: &k8s_openapi::api::coordination::v1::Lease) -> usize {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SHARDS_ANNOTATION))
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1)
}

/// Whether a Lease renewed at `renew` for `duration_seconds` still holds at `now`.
pub fn lease_is_fresh(
    renew: Option<jiff::Timestamp>,
    duration_seconds: Option<i32>,
    now: jiff::Timestamp,
) -> bool {
    let (Some(renew), Some(seconds)) = (renew, duration_seconds) else {
        return false;
    };
    now.duration_since(renew).as_secs() < i64::from(seconds.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_needs_same_uid_and_a_recent_enough_decision() {
        let mut applied = AppliedDecisions::default();
        applied.0.insert(
            model_key("models", "php"),
            Applied {
                uid: "u1".into(),
                decision: 4,
            },
        );
        let cases = [
            ("models/php", "u1", 4, true),
            ("models/php", "u1", 3, true),
            ("models/php", "u1", 5, false),
            ("models/php", "u2", 4, false), // re-created under the same name
            ("models/other", "u1", 1, false),
        ];
        for (key, uid, decision, expected) in cases {
            assert_eq!(
                applied.has_applied(key, uid, decision),
                expected,
                "{key} {uid} {decision}"
            );
        }
    }

    #[test]
    fn annotation_round_trips_and_garbage_is_empty() {
        let mut applied = AppliedDecisions::default();
        applied.0.insert(
            "a/b".into(),
            Applied {
                uid: "u".into(),
                decision: 2,
            },
        );
        let text = serde_json::to_string(&applied).expect("serializes");
        assert_eq!(AppliedDecisions::from_annotation(Some(&text)), applied);
        assert_eq!(
            AppliedDecisions::from_annotation(Some("{not json")),
            AppliedDecisions::default()
        );
        assert_eq!(
            AppliedDecisions::from_annotation(None),
            AppliedDecisions::default()
        );
    }

    fn many(n: usize) -> AppliedDecisions {
        AppliedDecisions(
            (0..n)
                .map(|i| {
                    (
                        model_key("models", &format!("model-{i}")),
                        Applied {
                            uid: format!("{i:08}-0000-0000-0000-000000000000"),
                            decision: 12,
                        },
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn shards_stay_within_the_annotation_limit_and_cover_every_entry() {
        for (entries, shards) in [
            (0, 1),
            (1500, 1),
            (1501, 2),
            (3000, 2),
            (3001, 4),
            (20_000, 16),
        ] {
            assert_eq!(shard_count(entries), shards, "{entries} entries");
        }
        let applied = many(20_000);
        let parts = split(&applied);
        assert_eq!(parts.len(), 16);
        let mut union = AppliedDecisions::default();
        for part in &parts {
            let bytes = serde_json::to_string(part).expect("serializes").len();
            assert!(bytes < 200 * 1024, "a shard of {bytes} bytes");
            union.0.extend(part.0.clone());
        }
        assert_eq!(union, applied);
    }

    #[test]
    fn a_model_added_moves_no_other_entry() {
        let before = split(&many(2000));
        let mut grown = many(2000);
        grown.0.insert(
            "models/new".into(),
            Applied {
                uid: "u".into(),
                decision: 1,
            },
        );
        let after = split(&grown);
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 1);
    }

    #[test]
    fn freshness_follows_renew_time_and_duration() {
        let t: jiff::Timestamp = "2026-11-24T00:00:00Z".parse().expect("time");
        let later = |s: i64| t + jiff::SignedDuration::from_secs(s);
        assert!(lease_is_fresh(Some(t), Some(30), later(29)));
        assert!(!lease_is_fresh(Some(t), Some(30), later(30)));
        assert!(!lease_is_fresh(None, Some(30), later(1)));
        assert!(!lease_is_fresh(Some(t), None, later(1)));
    }
}
