//! The agents' acknowledgements: one `coordination.k8s.io/v1` Lease per node, in the agents'
//! namespace, named `beamlit-agent-<node>`.
//!
//! A Lease because it already means "this holder is alive until renewTime + duration": the
//! controller counts only agents whose Lease is fresh, so a node that died stops counting without
//! anyone cleaning up. The applied decisions ride in one annotation (JSON), keyed by
//! ModelDeployment, each with the object's uid (a deleted and re-created ModelDeployment starts
//! its decision count again) and the `status.decisionGeneration` the agent's maps reflect.
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
