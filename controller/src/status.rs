//! The status the controller writes: a pure function of what it observed and decided, so that
//! conditions keep their transition times and unchanged facts never churn the object.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{MetricValue, ModelDeploymentStatus, ResolvedService, ResolvedWorkload};

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
}

/// What the decision contributes to the status, in the status's own (string) terms.
pub struct DecisionFields {
    pub percent: i32,
    pub reason: String,
    pub message: String,
    pub since: String,
    pub last_metric_above: Option<String>,
}

pub fn build(
    previous: Option<&ModelDeploymentStatus>,
    observed: Observed,
    decision: DecisionFields,
    now: jiff::Timestamp,
) -> ModelDeploymentStatus {
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
        // Filled from the agents' acknowledgements once cluster mode exists; kept as it was.
        agents: previous.and_then(|p| p.agents.clone()),
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
        let first = build(None, observed(true), decision(), t1);
        assert_eq!(first.conditions[0].last_transition_time, Time(t1));
        let same = build(Some(&first), observed(true), decision(), t2);
        assert_eq!(
            same.conditions[0].last_transition_time,
            Time(t1),
            "unchanged: kept"
        );
        let flipped = build(Some(&same), observed(false), decision(), t2);
        assert_eq!(
            flipped.conditions[0].last_transition_time,
            Time(t2),
            "changed: now"
        );
        assert_eq!(flipped.conditions[0].status, "False");
        assert_eq!(flipped.observed_generation, Some(3));
    }
}
