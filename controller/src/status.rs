//! The status the controller writes: a pure function of what it observed and decided, so that
//! conditions keep their transition times and unchanged facts never churn the object.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use beamlit_api::{
    AgentsApplied, EffectiveRemoteBackend, MetricValue, ModelDeploymentStatus, ResolvedService,
    ResolvedWorkload,
};

/// One condition's desired state; `lastTransitionTime` is carried over unless status changes.
pub struct ConditionState {
    pub type_: &'static str,
    pub ok: Option<bool>,
    pub reason: String,
    pub message: String,
}

pub struct Observed {
    pub generation: Option<i64>,
    pub service: Option<ResolvedService>,
    pub workload: Option<ResolvedWorkload>,
    pub ready_endpoints: u32,
    pub metrics: Vec<MetricValue>,
    pub conditions: Vec<ConditionState>,
    pub remote_backend: Option<EffectiveRemoteBackend>,
}

/// What the decision contributes to the status, in the status's own (string) terms.
pub struct DecisionFields {
    pub percent: i32,
    pub reason: String,
    pub message: String,
    pub since: String,
    pub last_metric_above: Option<String>,
}

/// `agents` counts the agents that applied a decision generation (see
/// [`beamlit_api::acknowledgement`]).
pub fn build(
    previous: Option<&ModelDeploymentStatus>,
    observed: Observed,
    decision: DecisionFields,
    now: jiff::Timestamp,
    agents: impl FnOnce(i64) -> Option<AgentsApplied>,
) -> ModelDeploymentStatus {
    let decision_generation = decision_generation(previous, &observed, decision.percent);
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let conditions = observed
        .conditions
        .into_iter()
        .map(|c| condition(previous_conditions, c, observed.generation, now))
        .collect();
    ModelDeploymentStatus {
        observed_generation: observed.generation,
        offload_percent: decision.percent,
        reason: Some(decision.reason),
        message: Some(decision.message),
        since: Some(decision.since),
        last_metric_above: decision.last_metric_above,
        conditions,
        service: observed.service,
        workload: observed.workload,
        ready_endpoints: i32::try_from(observed.ready_endpoints).unwrap_or(i32::MAX),
        metrics: observed.metrics,
        agents: agents(decision_generation),
        decision_generation,
        remote_backend: observed.remote_backend,
        // Filled by the Beamlit sync after the decision (see `beamlit_sync`); carried over here.
        beamlit: previous.and_then(|p| p.beamlit.clone()),
    }
}

/// Moves on whenever what the agents apply changes: the percent, the Service's addresses or
/// port, or the remote backend. Everything else in status (metric values, conditions) can change
/// without asking every node to acknowledge again.
fn decision_generation(
    previous: Option<&ModelDeploymentStatus>,
    observed: &Observed,
    percent: i32,
) -> i64 {
    let Some(p) = previous else {
        return 1;
    };
    let address = |s: &Option<ResolvedService>| s.as_ref().map(|s| (s.addresses.clone(), s.port));
    let same = p.offload_percent == percent
        && address(&p.service) == address(&observed.service)
        && p.remote_backend == observed.remote_backend;
    if same && p.decision_generation > 0 {
        p.decision_generation
    } else {
        p.decision_generation + 1
    }
}

fn condition(
    previous: &[Condition],
    state: ConditionState,
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> Condition {
    let status = match state.ok {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == state.type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: state.type_.to_string(),
        status: status.to_string(),
        reason: state.reason,
        message: state.message,
        last_transition_time,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(ok: bool) -> Observed {
        Observed {
            generation: Some(3),
            service: None,
            workload: None,
            ready_endpoints: 1,
            metrics: vec![],
            conditions: vec![ConditionState {
                type_: "Ready",
                ok: Some(ok),
                reason: if ok { "Resolved" } else { "ServiceNotFound" }.into(),
                message: String::new(),
            }],
            remote_backend: None,
        }
    }

    fn decision() -> DecisionFields {
        DecisionFields {
            percent: 0,
            reason: "Healthy".into(),
            message: String::new(),
            since: "2026-11-24T00:00:00Z".into(),
            last_metric_above: None,
        }
    }

    #[test]
    fn transition_time_moves_only_when_the_condition_changes() {
        let t1: jiff::Timestamp = "2026-11-24T01:00:00Z".parse().expect("time");
        let t2: jiff::Timestamp = "2026-11-24T02:00:00Z".parse().expect("time");
        let first = build(None, observed(true), decision(), t1, |_| None);
        assert_eq!(first.conditions[0].last_transition_time, Time(t1));
        let same = build(Some(&first), observed(true), decision(), t2, |_| None);
        assert_eq!(
            same.conditions[0].last_transition_time,
            Time(t1),
            "unchanged: kept"
        );
        let flipped = build(Some(&same), observed(false), decision(), t2, |_| None);
        assert_eq!(
            flipped.conditions[0].last_transition_time,
            Time(t2),
            "changed: now"
        );
        assert_eq!(flipped.conditions[0].status, "False");
        assert_eq!(flipped.observed_generation, Some(3));
    }

    #[test]
    fn decision_generation_moves_only_with_what_agents_apply() {
        let t: jiff::Timestamp = "2026-11-24T01:00:00Z".parse().expect("time");
        let first = build(None, observed(true), decision(), t, |_| None);
        assert_eq!(first.decision_generation, 1);
        // A condition flips: nothing for the agents to do.
        let same = build(Some(&first), observed(false), decision(), t, |_| None);
        assert_eq!(same.decision_generation, 1);
        let mut offload = decision();
        offload.percent = 50;
        let moved = build(Some(&same), observed(false), offload, t, |g| {
            Some(AgentsApplied {
                applied: i32::try_from(g).unwrap_or(0),
                total: 9,
            })
        });
        assert_eq!(moved.decision_generation, 2);
        assert_eq!(
            moved.agents.as_ref().map(|a| a.applied),
            Some(2),
            "counted for the new generation"
        );
        let mut with_backend = observed(false);
        with_backend.remote_backend = Some(EffectiveRemoteBackend {
            host: "h".into(),
            ..EffectiveRemoteBackend::default()
        });
        let mut offload = decision();
        offload.percent = 50;
        let backend = build(Some(&moved), with_backend, offload, t, |_| None);
        assert_eq!(backend.decision_generation, 3);
    }
}
