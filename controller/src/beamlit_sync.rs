//! Keeping the model on Beamlit in line with its ModelDeployment: the spec pushed when its
//! generation changes, the `offloading` label set when offloading starts or stops, failures
//! retried with backoff. What to do is a pure function of the last sync (in status), the object
//! and the decision, so it is tested without Beamlit, and survives a controller restart.
use std::time::Duration;

use beamlit_api::{BeamlitSync, ModelDeployment};

use crate::beamlit_api::{ApiError, Backoff, BeamlitApi, Model, Runtime, ServerlessConfig};

/// The finalizer that holds a ModelDeployment until its model is deleted on Beamlit.
pub const FINALIZER: &str = "deployment.beamlit.com/beamlit-model";

/// What to call on Beamlit now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing: Beamlit has this generation and this label.
    UpToDate,
    /// A failure is being waited out.
    Waiting,
    /// Create or update the whole model (with the label).
    Upsert,
    /// Only the `offloading` label changed.
    SetLabel,
}

pub fn plan(
    previous: Option<&BeamlitSync>,
    generation: Option<i64>,
    offloading: bool,
    now: jiff::Timestamp,
) -> Step {
    let previous = previous.cloned().unwrap_or_default();
    let stale_spec = previous.synced_generation != generation || generation.is_none();
    let stale_label = previous.offloading_label != Some(offloading);
    if !stale_spec && !stale_label {
        return Step::UpToDate;
    }
    let waiting = previous
        .retry_after
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .is_some_and(|t| now < t);
    if waiting {
        Step::Waiting
    } else if stale_spec {
        Step::Upsert
    } else {
        Step::SetLabel
    }
}

/// The sync state after an attempt.
pub fn after(
    previous: Option<&BeamlitSync>,
    step: Step,
    generation: Option<i64>,
    offloading: bool,
    result: Result<(), &ApiError>,
    now: jiff::Timestamp,
) -> BeamlitSync {
    let mut next = previous.cloned().unwrap_or_default();
    match result {
        Ok(()) => {
            if step == Step::Upsert {
                next.synced_generation = generation;
            }
            next.offloading_label = Some(offloading);
            next.failures = 0;
            next.retry_after = None;
            next.last_error = None;
        }
        Err(e) => {
            next.failures = next.failures.saturating_add(1);
            let delay = Backoff::default().delay(u32::try_from(next.failures).unwrap_or(u32::MAX));
            next.retry_after =
                Some((now + jiff::SignedDuration::try_from(delay).unwrap_or_default()).to_string());
            next.last_error = Some(e.to_string());
        }
    }
    next
}

/// When to look again while a failure is waited out.
pub fn retry_in(sync: &BeamlitSync, now: jiff::Timestamp) -> Option<Duration> {
    let at: jiff::Timestamp = sync.retry_after.as_deref()?.parse().ok()?;
    Some(Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO))
}

/// The model as Beamlit takes it, from the spec (the serving port from the resolved Service).
pub fn model_of(md: &ModelDeployment, serving_port: Option<i32>, offloading: bool) -> Model {
    let spec = &md.spec;
    let mut model = Model::new(
        &spec.model,
        &spec.environment,
        spec.enabled,
        spec.offloading_config.is_some(),
    )
    .with_offloading(offloading);
    model.spec.policies = spec.policies.iter().map(|p| p.name.clone()).collect();
    model.spec.runtime = serving_port.map(|port| Runtime {
        serving_port: Some(port),
        metric_port: spec
            .metric_service_ref
            .as_ref()
            .and_then(|r| match &r.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p)) => Some(*p),
                _ => None,
            }),
    });
    model.spec.serverless_config = spec.serverless_config.as_ref().map(|s| ServerlessConfig {
        min_num_replicas: Some(s.min_num_replicas),
        max_num_replicas: Some(s.max_num_replicas),
        metric: s.metric.clone(),
        target: s.target.clone(),
        scale_up_minimum: s.scale_up_minimum,
        scale_down_delay: s.scale_down_delay.clone(),
        stable_window: s.stable_window.clone(),
        last_pod_retention_period: s.last_pod_retention_period.clone(),
    });
    model
}

/// Runs `step` against Beamlit.
pub async fn run(api: &BeamlitApi, step: Step, model: &Model) -> Result<(), ApiError> {
    match step {
        Step::Upsert => api.upsert_model(model).await,
        Step::SetLabel => {
            let offloading = model
                .metadata
                .labels
                .get(crate::beamlit_api::LABEL_OFFLOADING)
                .is_some_and(|v| v == "true");
            api.set_offloading_label(
                &model.metadata.name,
                &model.metadata.environment,
                offloading,
            )
            .await
        }
        Step::UpToDate | Step::Waiting => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> jiff::Timestamp {
        s.parse().expect("time")
    }

    fn synced(generation: i64, label: bool) -> BeamlitSync {
        BeamlitSync {
            synced_generation: Some(generation),
            offloading_label: Some(label),
            ..BeamlitSync::default()
        }
    }

    #[test]
    fn plan_table() {
        let now = t("2026-11-24T01:00:00Z");
        let waiting = BeamlitSync {
            retry_after: Some("2026-11-24T01:00:30Z".into()),
            failures: 2,
            ..synced(1, false)
        };
        let expired = BeamlitSync {
            retry_after: Some("2026-11-24T00:59:00Z".into()),
            failures: 2,
            ..synced(1, false)
        };
        let cases = [
            ("never synced", None, Some(1), false, Step::Upsert),
            (
                "in line",
                Some(synced(1, false)),
                Some(1),
                false,
                Step::UpToDate,
            ),
            (
                "spec changed",
                Some(synced(1, false)),
                Some(2),
                false,
                Step::Upsert,
            ),
            (
                "offloading started",
                Some(synced(1, false)),
                Some(1),
                true,
                Step::SetLabel,
            ),
            (
                "offloading stopped",
                Some(synced(1, true)),
                Some(1),
                false,
                Step::SetLabel,
            ),
            (
                "failure waited out",
                Some(waiting),
                Some(2),
                false,
                Step::Waiting,
            ),
            ("backoff over", Some(expired), Some(2), false, Step::Upsert),
        ];
        for (name, previous, generation, offloading, expected) in cases {
            assert_eq!(
                plan(previous.as_ref(), generation, offloading, now),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn failures_back_off_and_success_clears_them() {
        let now = t("2026-11-24T01:00:00Z");
        let error = ApiError::Http {
            op: crate::beamlit_api::Operation::Update,
            model: "m".into(),
            status: 500,
            body: String::new(),
        };
        let first = after(None, Step::Upsert, Some(1), false, Err(&error), now);
        assert_eq!(first.failures, 1);
        assert_eq!(first.synced_generation, None);
        let wait1 = retry_in(&first, now).expect("retry time");
        let second = after(Some(&first), Step::Upsert, Some(1), false, Err(&error), now);
        let wait2 = retry_in(&second, now).expect("retry time");
        assert!(wait2 > wait1, "{wait1:?} then {wait2:?}");
        assert!(
            second
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("500"))
        );
        let ok = after(Some(&second), Step::Upsert, Some(1), true, Ok(()), now);
        assert_eq!(ok, synced(1, true));
    }
}
