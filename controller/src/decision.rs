//! The offload decision: a pure function from (spec, readiness, metric readings, previous
//! decision, now) to (percent offloaded, reason).
//!
//! Nothing here performs I/O or reads a clock: `now` is an input, and the only state is the
//! previous [`Decision`], which the controller keeps in the ModelDeployment's `status` (it
//! serializes with RFC 3339 timestamps). A restarted controller therefore continues where the
//! previous one stopped, which the earlier product did not (its state lived in memory).
//!
//! # Rules, in order of precedence
//!
//! 1. `enabled: false` → 0 % ([`Reason::Disabled`]); no `offloadingConfig` → 0 %
//!    ([`Reason::NoOffloadingConfig`]). Nothing else matters.
//! 2. No ready endpoints → 100 % at once ([`Reason::NoReadyEndpoints`]), whatever came before.
//! 3. Any metric above its target → `behavior.percentage` ([`Reason::MetricAboveTarget`]),
//!    recording `last_metric_above = now`. This fires every time a metric is above, not once
//!    per spec change (an earlier defect).
//! 4. Otherwise, if the previous decision was offloading because of a metric (or because of
//!    missing endpoints: recovery) and the last time a metric was above is less than
//!    `stabilization_window` ago → keep `behavior.percentage` ([`Reason::Stabilizing`]).
//! 5. Otherwise, if some metric is unavailable → 0 % ([`Reason::MetricUnavailable`]).
//! 6. Otherwise → 0 % ([`Reason::Healthy`]).
//!
//! # Choices on ambiguous points
//!
//! - **Stabilization only keeps offloading on, it never turns it on.** Rule 4 applies only when
//!   the previous decision was `MetricAboveTarget`, `Stabilizing` or `NoReadyEndpoints`. From any
//!   other state (healthy, disabled, no previous decision, ...) a recent `last_metric_above`
//!   alone does not offload: e.g. a user who enlarges the window after the system went healthy
//!   must not see offloading come back. The earlier product turned offloading on at any
//!   "healthy" event; here only a metric above target or missing endpoints turn it on.
//! - **Recovery from `NoReadyEndpoints`** goes straight to the metric-driven value: `percentage`
//!   if a metric is above now (or was within the window, reason `Stabilizing`), else 0. Never
//!   stuck at 100 (an earlier defect), including when `percentage` is 100 (the reason then
//!   changes even though the percent does not).
//! - **The held percent is the current `behavior.percentage`**, not the previous decision's
//!   percent: the metric-driven value is by definition `percentage`, and this way an edit of the
//!   spec takes effect at once and recovery from 100 % knows what to go back to.
//! - **Metrics are still recorded while disabled or failed over**: `last_metric_above` is a fact
//!   about the metrics, kept for status and so that recovery from `NoReadyEndpoints` knows
//!   whether a metric was above during the outage. Because of the first point it cannot turn
//!   offloading on after a `Disabled` or `NoOffloadingConfig` decision.
//! - **An unavailable metric is not "above"**: it never turns offloading on. While an offload is
//!   stabilizing it does not end it early either (reason stays `Stabilizing`); once the window
//!   is over, offloading stops and the reason is `MetricUnavailable` rather than `Healthy`,
//!   because health cannot be claimed without the data. If another metric is above, the reason
//!   is `MetricAboveTarget` (any one metric above triggers).
//! - **`percentage` 0** is honoured literally: a metric above gives 0 % with reason
//!   `MetricAboveTarget` (the status tells the truth about the metric; the message says that
//!   nothing is offloaded), while 0 ready endpoints still give 100 %. Values above 100 are
//!   clamped to 100.
//! - **The window is half-open**: at exactly `last_metric_above + window` the window is over
//!   (→ `Healthy`). A `last_metric_above` in the future (clock skew between controller
//!   replicas) counts as inside the window.
//! - **`since`** is kept from the previous decision while percent and reason are unchanged, so
//!   status does not churn; the message never contains `now`, for the same reason.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The default stabilization window: how long offloading stays on after the last time a
/// metric was above its target.
pub const DEFAULT_STABILIZATION_WINDOW: Duration = Duration::from_secs(60);

/// Why the offload percent is what it is. Serialized (and displayed) as the PascalCase variant
/// name, the string used in `status` and as the Event reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Reason {
    /// `spec.enabled` is false: nothing is offloaded.
    Disabled,
    /// The spec has no `offloadingConfig`: nothing is offloaded.
    NoOffloadingConfig,
    /// The Service has no ready endpoints: everything is offloaded.
    NoReadyEndpoints,
    /// A metric is above its target: `behavior.percentage` is offloaded.
    MetricAboveTarget,
    /// No metric is above its target any more, but the stabilization window since the last one
    /// was is not over: `behavior.percentage` is still offloaded.
    Stabilizing,
    /// Nothing to offload for.
    Healthy,
    /// No metric is above its target, but some could not be read: nothing is offloaded.
    MetricUnavailable,
}

impl Reason {
    /// Every reason, for exhaustive tests and documentation.
    pub const ALL: [Reason; 7] = [
        Reason::Disabled,
        Reason::NoOffloadingConfig,
        Reason::NoReadyEndpoints,
        Reason::MetricAboveTarget,
        Reason::Stabilizing,
        Reason::Healthy,
        Reason::MetricUnavailable,
    ];

    /// The PascalCase string used in status and Events (equal to the serde form).
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Disabled => "Disabled",
            Reason::NoOffloadingConfig => "NoOffloadingConfig",
            Reason::NoReadyEndpoints => "NoReadyEndpoints",
            Reason::MetricAboveTarget => "MetricAboveTarget",
            Reason::Stabilizing => "Stabilizing",
            Reason::Healthy => "Healthy",
            Reason::MetricUnavailable => "MetricUnavailable",
        }
    }

    /// Whether this reason means "offloading because of metrics or of a failover", the states
    /// from which a stabilization window may keep offloading on.
    const fn may_stabilize(self) -> bool {
        matches!(
            self,
            Reason::MetricAboveTarget | Reason::Stabilizing | Reason::NoReadyEndpoints
        )
    }
}

/// The reason string is not one of [`Reason::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown offload reason {0:?}")]
pub struct UnknownReason(pub String);

impl std::str::FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reading per metric of `offloadingConfig.metrics`, in spec order: whether the metric was
/// above its target (see [`crate::metric_math::is_above`]), or why it could not be read.
///
/// `Ok(above)` / `Err(why)` convert into it (`MetricReading::from(result)`), so the caller can
/// feed the metric maths' results straight in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricReading {
    /// The metric is above its target, beyond the tolerance.
    Above,
    /// The metric was read and is not above its target.
    NotAbove,
    /// The metric could not be read or compared; the string says why (it ends up in status).
    Unavailable(String),
}

impl MetricReading {
    /// A metric that was read and compared: [`MetricReading::Above`] or
    /// [`MetricReading::NotAbove`].
    pub const fn compared(above: bool) -> Self {
        if above {
            MetricReading::Above
        } else {
            MetricReading::NotAbove
        }
    }

    /// A metric that could not be read.
    pub fn unavailable(why: impl Into<String>) -> Self {
        MetricReading::Unavailable(why.into())
    }
}

impl<E: fmt::Display> From<Result<bool, E>> for MetricReading {
    fn from(r: Result<bool, E>) -> Self {
        match r {
            Ok(above) => MetricReading::compared(above),
            Err(why) => MetricReading::Unavailable(why.to_string()),
        }
    }
}

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// `spec.enabled` (defaults to true).
    pub enabled: bool,
    /// Whether `spec.offloadingConfig` is present.
    pub has_offloading_config: bool,
    /// `offloadingConfig.behavior.percentage`, 0..=100 (larger values are clamped). 0 is valid:
    /// never offload because of metrics.
    pub percentage: u8,
    /// Ready endpoints of the Service (from its EndpointSlices).
    pub ready_endpoints: u32,
    /// One reading per spec metric.
    pub metrics: &'a [MetricReading],
    /// The previous decision, restored from status (`None` the first time).
    pub previous: Option<&'a Decision>,
    /// The current time, from the caller (this module never reads a clock).
    pub now: SystemTime,
    /// How long offloading stays on after a metric was last above
    /// ([`DEFAULT_STABILIZATION_WINDOW`] unless configured).
    pub stabilization_window: Duration,
}

/// The decision, as stored in `status` (camelCase fields, RFC 3339 timestamps with the
/// sub-second part when there is one, so that a restored decision equals the one stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// Share of new connections to offload, 0..=100.
    pub percent: u8,
    /// Why.
    pub reason: Reason,
    /// The last time any metric was above its target.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339_opt")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub last_metric_above: Option<SystemTime>,
    /// When percent or reason last changed.
    #[serde(with = "rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub since: SystemTime,
    /// A human-readable explanation, for status conditions and Events.
    pub message: String,
}

impl Decision {
    /// Rebuilds a decision from the status's string fields (`offloadPercent`, `reason`,
    /// `since`, `lastMetricAbove`, `message`), for a controller that keeps them flat in status.
    ///
    /// `None` when the reason is unknown or `since` is not RFC 3339: a corrupt status then
    /// counts as "no previous decision", which is safe because a stabilization window never
    /// turns offloading on from there. An unreadable `lastMetricAbove` is dropped on its own
    /// (it only shortens a stabilization). The percent is clamped to 0..=100.
    pub fn from_status_fields(
        percent: i32,
        reason: &str,
        since: &str,
        last_metric_above: Option<&str>,
        message: String,
    ) -> Option<Decision> {
        Some(Decision {
            percent: u8::try_from(percent.clamp(0, 100)).unwrap_or(100),
            reason: reason.parse().ok()?,
            last_metric_above: last_metric_above.and_then(parse_rfc3339),
            since: parse_rfc3339(since)?,
            message,
        })
    }

    /// `since` and `last_metric_above` as RFC 3339 strings, the form of the status fields
    /// ([`Decision::from_status_fields`] reads them back exactly, sub-seconds included). Times
    /// jiff cannot represent (beyond year 9999) fall back to the Unix epoch.
    pub fn status_times(&self) -> (String, Option<String>) {
        (
            format_rfc3339(self.since),
            self.last_metric_above.map(format_rfc3339),
        )
    }
}

/// Decides how much to offload. See the module documentation for the rules and the choices made
/// on ambiguous points.
pub fn decide(inputs: &Inputs) -> Decision {
    let percentage = inputs.percentage.min(100);
    let previous = inputs.previous;
    let now = inputs.now;

    let above: Vec<usize> = inputs
        .metrics
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, MetricReading::Above))
        .map(|(i, _)| i)
        .collect();
    let unavailable: Vec<(usize, &str)> = inputs
        .metrics
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            MetricReading::Unavailable(why) => Some((i, why.as_str())),
            _ => None,
        })
        .collect();
    let last_metric_above = if above.is_empty() {
        previous.and_then(|p| p.last_metric_above)
    } else {
        Some(now)
    };

    let (percent, reason, message) = if !inputs.enabled {
        (
            0,
            Reason::Disabled,
            "offloading is disabled (spec.enabled is false)".to_owned(),
        )
    } else if !inputs.has_offloading_config {
        (
            0,
            Reason::NoOffloadingConfig,
            "no offloadingConfig: offloading is off".to_owned(),
        )
    } else if inputs.ready_endpoints == 0 {
        (
            100,
            Reason::NoReadyEndpoints,
            "the Service has no ready endpoints: offloading all new connections".to_owned(),
        )
    } else if !above.is_empty() {
        let which = list(above.iter().map(|i| format!("metrics[{i}]")));
        let message = if percentage == 0 {
            format!("{which} above target, but behavior.percentage is 0: not offloading")
        } else {
            format!("{which} above target: offloading {percentage}% of new connections")
        };
        (percentage, Reason::MetricAboveTarget, message)
    } else if let Some(until) = stabilizing_until(inputs, last_metric_above) {
        (
            percentage,
            Reason::Stabilizing,
            format!(
                "no metric above target since {}: keeping {percentage}% until {}",
                format_time(last_metric_above.unwrap_or(now)),
                format_time(until)
            ),
        )
    } else if !unavailable.is_empty() {
        let which = list(
            unavailable
                .iter()
                .map(|(i, why)| format!("metrics[{i}]: {why}")),
        );
        (
            0,
            Reason::MetricUnavailable,
            format!("no metric above target, but some are unavailable ({which}): not offloading"),
        )
    } else {
        (
            0,
            Reason::Healthy,
            "no metric above target: not offloading".to_owned(),
        )
    };

    let since = match previous {
        Some(p) if p.percent == percent && p.reason == reason => p.since,
        _ => now,
    };
    Decision {
        percent,
        reason,
        last_metric_above,
        since,
        message,
    }
}

/// The end of the stabilization window, if offloading should be held until then: only when
/// the previous decision offloaded because of a metric or a failover, and `now` is before
/// `last_metric_above + window`.
fn stabilizing_until(inputs: &Inputs, last_metric_above: Option<SystemTime>) -> Option<SystemTime> {
    let previous = inputs.previous?;
    if !previous.reason.may_stabilize() {
        return None;
    }
    let last = last_metric_above?;
    // A time in the future (clock skew) counts as just now.
    let elapsed = inputs.now.duration_since(last).unwrap_or(Duration::ZERO);
    if elapsed < inputs.stabilization_window {
        // Unrepresentable end (absurd window): hold until "now", which only shows in messages.
        Some(
            last.checked_add(inputs.stabilization_window)
                .unwrap_or(inputs.now),
        )
    } else {
        None
    }
}

/// The Event message for a change of percent or reason, `None` when neither changed. A first
/// decision (no previous one) is a change.
pub fn transition(previous: Option<&Decision>, next: &Decision) -> Option<String> {
    match previous {
        Some(p) if p.percent == next.percent && p.reason == next.reason => None,
        Some(p) => Some(format!(
            "offload {}% -> {}% ({} -> {}): {}",
            p.percent, next.percent, p.reason, next.reason, next.message
        )),
        None => Some(format!(
            "offload {}% ({}): {}",
            next.percent, next.reason, next.message
        )),
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// Converts to jiff's timestamp (which k8s-openapi uses for `Time`) through nanoseconds since
/// the epoch, so only jiff's core API is needed.
fn to_timestamp(t: SystemTime) -> Option<k8s_openapi::jiff::Timestamp> {
    let nanos = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).ok()?,
        Err(e) => -i128::try_from(e.duration().as_nanos()).ok()?,
    };
    k8s_openapi::jiff::Timestamp::from_nanosecond(nanos).ok()
}

fn from_timestamp(ts: k8s_openapi::jiff::Timestamp) -> Option<SystemTime> {
    let nanos = ts.as_nanosecond();
    let magnitude = nanos.unsigned_abs();
    let duration = Duration::new(
        u64::try_from(magnitude / 1_000_000_000).ok()?,
        u32::try_from(magnitude % 1_000_000_000).ok()?,
    );
    if nanos >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(duration)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(duration)
    }
}

/// RFC 3339 in UTC, e.g. `2025-01-02T03:04:05Z` or `2025-01-02T03:04:05.5Z`; `None` beyond
/// jiff's range (years -9999..=9999).
fn to_rfc3339(t: SystemTime) -> Option<String> {
    to_timestamp(t).map(|ts| ts.to_string())
}

fn format_rfc3339(t: SystemTime) -> String {
    to_rfc3339(t).unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// Any RFC 3339 time (offsets and sub-seconds accepted).
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    s.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .and_then(from_timestamp)
}

/// For messages only.
fn format_time(t: SystemTime) -> String {
    to_rfc3339(t).unwrap_or_else(|| format!("{t:?}"))
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _, ser::Error as _};

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ts = super::to_timestamp(*t).ok_or_else(|| S::Error::custom("time out of range"))?;
        s.collect_str(&ts)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        let ts: k8s_openapi::jiff::Timestamp = s
            .parse()
            .map_err(|e| D::Error::custom(format!("invalid RFC 3339 time {s:?}: {e}")))?;
        super::from_timestamp(ts)
            .ok_or_else(|| D::Error::custom(format!("time {s:?} out of range")))
    }
}

mod rfc3339_opt {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, ser::Error as _};

    #[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`
    pub(super) fn serialize<S: Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => {
                let ts =
                    super::to_timestamp(*t).ok_or_else(|| S::Error::custom("time out of range"))?;
                s.serialize_some(&ts.to_string())
            }
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::rfc3339")] SystemTime);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(t)| t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    /// Seconds after a fixed origin (2025-01-01T00:00:00Z), so tests never read a clock.
    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_689_600 + secs)
    }

    /// A compact description of the world at one instant.
    #[derive(Clone)]
    struct World {
        enabled: bool,
        config: bool,
        percentage: u8,
        ready: u32,
        metrics: Vec<MetricReading>,
    }

    fn world(percentage: u8, ready: u32, metrics: &[MetricReading]) -> World {
        World {
            enabled: true,
            config: true,
            percentage,
            ready,
            metrics: metrics.to_vec(),
        }
    }

    const ABOVE: MetricReading = MetricReading::Above;
    const BELOW: MetricReading = MetricReading::NotAbove;

    fn down() -> MetricReading {
        MetricReading::unavailable("metrics.k8s.io unavailable")
    }

    fn run(w: &World, previous: Option<&Decision>, now: SystemTime) -> Decision {
        decide(&Inputs {
            enabled: w.enabled,
            has_offloading_config: w.config,
            percentage: w.percentage,
            ready_endpoints: w.ready,
            metrics: &w.metrics,
            previous,
            now,
            stabilization_window: WINDOW,
        })
    }

    /// Runs a scenario: a list of (seconds, world, expected percent, expected reason), each
    /// step seeing the previous step's decision. Returns the decisions.
    fn scenario(what: &str, steps: &[(u64, World, u8, Reason)]) -> Vec<Decision> {
        let mut out: Vec<Decision> = Vec::new();
        for (i, (t, w, percent, reason)) in steps.iter().enumerate() {
            let d = run(w, out.last(), at(*t));
            assert_eq!(
                (d.percent, d.reason),
                (*percent, *reason),
                "{what}: step {i} at t={t}: {}",
                d.message
            );
            out.push(d);
        }
        out
    }

    fn previous(percent: u8, reason: Reason, last_above: Option<u64>) -> Decision {
        Decision {
            percent,
            reason,
            last_metric_above: last_above.map(at),
            since: at(0),
            message: String::new(),
        }
    }

    #[test]
    fn single_step_rules() {
        use Reason::*;
        let disabled = World {
            enabled: false,
            ..world(50, 0, &[ABOVE])
        };
        let no_config = World {
            config: false,
            ..world(50, 0, &[ABOVE])
        };
        let both_off = World {
            enabled: false,
            config: false,
            ..world(50, 3, &[])
        };
        let stabilizing = previous(50, MetricAboveTarget, Some(100));
        let failed_over = previous(100, NoReadyEndpoints, None);
        let healthy = previous(0, Healthy, Some(10));
        #[rustfmt::skip]
        /// (what, world, previous, seconds, expected percent, expected reason)
        type Case = (&'static str, World, Option<Decision>, u64, u8, Reason);
        let cases: Vec<Case> = vec![
            (
                "disabled wins over no endpoints and metrics",
                disabled.clone(),
                None,
                120,
                0,
                Disabled,
            ),
            (
                "disabled wins over stabilizing",
                disabled,
                Some(stabilizing.clone()),
                120,
                0,
                Disabled,
            ),
            (
                "no config wins over no endpoints",
                no_config.clone(),
                None,
                120,
                0,
                NoOffloadingConfig,
            ),
            (
                "no config wins over failed over",
                no_config,
                Some(failed_over.clone()),
                120,
                0,
                NoOffloadingConfig,
            ),
            (
                "disabled is reported before no config",
                both_off,
                None,
                120,
                0,
                Disabled,
            ),
            (
                "no endpoints: 100 at once",
                world(50, 0, &[BELOW]),
                None,
                120,
                100,
                NoReadyEndpoints,
            ),
            (
                "no endpoints from healthy",
                world(50, 0, &[]),
                Some(healthy.clone()),
                120,
                100,
                NoReadyEndpoints,
            ),
            (
                "no endpoints beats a metric above",
                world(50, 0, &[ABOVE]),
                None,
                120,
                100,
                NoReadyEndpoints,
            ),
            (
                "no endpoints beats unavailable metrics",
                world(50, 0, &[down()]),
                None,
                120,
                100,
                NoReadyEndpoints,
            ),
            (
                "metric above",
                world(50, 2, &[BELOW, ABOVE]),
                None,
                120,
                50,
                MetricAboveTarget,
            ),
            (
                "metric above with percentage 100",
                world(100, 2, &[ABOVE]),
                None,
                120,
                100,
                MetricAboveTarget,
            ),
            (
                "metric above beats unavailable",
                world(30, 2, &[down(), ABOVE]),
                None,
                120,
                30,
                MetricAboveTarget,
            ),
            (
                "percentage over 100 is clamped",
                world(200, 2, &[ABOVE]),
                None,
                120,
                100,
                MetricAboveTarget,
            ),
            (
                "no metrics configured",
                world(50, 2, &[]),
                None,
                120,
                0,
                Healthy,
            ),
            (
                "all below",
                world(50, 2, &[BELOW, BELOW]),
                None,
                120,
                0,
                Healthy,
            ),
            (
                "inside the window",
                world(50, 2, &[BELOW]),
                Some(stabilizing.clone()),
                159,
                50,
                Stabilizing,
            ),
            (
                "window uses the current percentage",
                world(70, 2, &[BELOW]),
                Some(stabilizing.clone()),
                130,
                70,
                Stabilizing,
            ),
            (
                "after the window",
                world(50, 2, &[BELOW]),
                Some(stabilizing.clone()),
                161,
                0,
                Healthy,
            ),
            (
                "unavailable metric alone",
                world(50, 2, &[down()]),
                None,
                120,
                0,
                MetricUnavailable,
            ),
            (
                "unavailable among healthy ones",
                world(50, 2, &[BELOW, down()]),
                None,
                120,
                0,
                MetricUnavailable,
            ),
            (
                "unavailable while stabilizing keeps stabilizing",
                world(50, 2, &[down()]),
                Some(stabilizing.clone()),
                150,
                50,
                Stabilizing,
            ),
            (
                "unavailable after the window",
                world(50, 2, &[down()]),
                Some(stabilizing.clone()),
                160,
                0,
                MetricUnavailable,
            ),
            (
                "unavailable from healthy",
                world(50, 2, &[down()]),
                Some(healthy.clone()),
                120,
                0,
                MetricUnavailable,
            ),
            (
                "recent last_metric_above alone never turns offloading on",
                world(50, 2, &[BELOW]),
                Some(previous(0, Healthy, Some(110))),
                120,
                0,
                Healthy,
            ),
            (
                "nor after re-enabling",
                world(50, 2, &[BELOW]),
                Some(previous(0, Disabled, Some(110))),
                120,
                0,
                Healthy,
            ),
            (
                "nor after MetricUnavailable",
                world(50, 2, &[BELOW]),
                Some(previous(0, MetricUnavailable, Some(110))),
                120,
                0,
                Healthy,
            ),
            (
                "recovery, no recent metric: healthy",
                world(50, 2, &[BELOW]),
                Some(failed_over.clone()),
                120,
                0,
                Healthy,
            ),
            (
                "recovery, metric above: percentage",
                world(50, 2, &[ABOVE]),
                Some(failed_over.clone()),
                120,
                50,
                MetricAboveTarget,
            ),
            (
                "recovery, metric recently above: stabilizing",
                world(50, 2, &[BELOW]),
                Some(previous(100, NoReadyEndpoints, Some(100))),
                120,
                50,
                Stabilizing,
            ),
            (
                "recovery, metric unavailable: not stuck",
                world(100, 2, &[down()]),
                Some(failed_over.clone()),
                120,
                0,
                MetricUnavailable,
            ),
            (
                "stabilizing with a future last_metric_above (clock skew)",
                world(50, 2, &[BELOW]),
                Some(previous(50, Stabilizing, Some(500))),
                120,
                50,
                Stabilizing,
            ),
            (
                "stabilizing without last_metric_above ends",
                world(50, 2, &[BELOW]),
                Some(previous(50, Stabilizing, None)),
                120,
                0,
                Healthy,
            ),
        ];
        for (what, w, prev, t, percent, reason) in cases {
            let d = run(&w, prev.as_ref(), at(t));
            assert_eq!(
                (d.percent, d.reason),
                (percent, reason),
                "{what}: {}",
                d.message
            );
        }
    }

    #[test]
    fn last_metric_above_is_recorded_and_carried() {
        let prev = previous(50, Reason::MetricAboveTarget, Some(100));
        #[rustfmt::skip]
        let cases: Vec<(&str, World, Option<u64>)> = vec![
            ("above: now", world(50, 2, &[ABOVE]), Some(120)),
            ("below: carried", world(50, 2, &[BELOW]), Some(100)),
            ("unavailable: carried", world(50, 2, &[down()]), Some(100)),
            ("above during an outage: recorded", world(50, 0, &[ABOVE]), Some(120)),
            ("above while disabled: recorded", World { enabled: false, ..world(50, 2, &[ABOVE]) }, Some(120)),
        ];
        for (what, w, want) in cases {
            assert_eq!(
                run(&w, Some(&prev), at(120)).last_metric_above,
                want.map(at),
                "{what}"
            );
        }
        assert_eq!(
            run(&world(50, 2, &[BELOW]), None, at(120)).last_metric_above,
            None
        );
    }

    #[test]
    fn stabilization_boundary_is_exactly_the_window() {
        let steps = scenario(
            "boundary",
            &[
                (100, world(50, 2, &[ABOVE]), 50, Reason::MetricAboveTarget),
                (101, world(50, 2, &[BELOW]), 50, Reason::Stabilizing),
            ],
        );
        let last = &steps[1];
        let probe = |now: SystemTime| {
            let d = decide(&Inputs {
                enabled: true,
                has_offloading_config: true,
                percentage: 50,
                ready_endpoints: 2,
                metrics: &[BELOW],
                previous: Some(last),
                now,
                stabilization_window: WINDOW,
            });
            (d.percent, d.reason)
        };
        let one_ns = Duration::from_nanos(1);
        assert_eq!(probe(at(160) - one_ns), (50, Reason::Stabilizing));
        assert_eq!(probe(at(160)), (0, Reason::Healthy));
        assert_eq!(probe(at(160) + one_ns), (0, Reason::Healthy));
        // A zero window goes healthy at the first reading below.
        let d = decide(&Inputs {
            enabled: true,
            has_offloading_config: true,
            percentage: 50,
            ready_endpoints: 2,
            metrics: &[BELOW],
            previous: Some(&steps[0]),
            now: at(100),
            stabilization_window: Duration::ZERO,
        });
        assert_eq!((d.percent, d.reason), (0, Reason::Healthy));
    }

    #[test]
    fn never_stuck_at_100_after_recovery() {
        use Reason::*;
        for percentage in [100, 50] {
            scenario(
                &format!("recovery, percentage {percentage}"),
                &[
                    (0, world(percentage, 2, &[BELOW]), 0, Healthy),
                    (10, world(percentage, 0, &[BELOW]), 100, NoReadyEndpoints),
                    (20, world(percentage, 0, &[BELOW]), 100, NoReadyEndpoints),
                    (30, world(percentage, 1, &[BELOW]), 0, Healthy),
                    (40, world(percentage, 1, &[BELOW]), 0, Healthy),
                ],
            );
            scenario(
                &format!("recovery while a metric is above, percentage {percentage}"),
                &[
                    (
                        0,
                        world(percentage, 2, &[ABOVE]),
                        percentage,
                        MetricAboveTarget,
                    ),
                    (10, world(percentage, 0, &[ABOVE]), 100, NoReadyEndpoints),
                    (
                        20,
                        world(percentage, 3, &[ABOVE]),
                        percentage,
                        MetricAboveTarget,
                    ),
                    (30, world(percentage, 3, &[BELOW]), percentage, Stabilizing),
                    (80, world(percentage, 3, &[BELOW]), 0, Healthy),
                ],
            );
            scenario(
                &format!("recovery without metrics, percentage {percentage}"),
                &[
                    (0, world(percentage, 0, &[]), 100, NoReadyEndpoints),
                    (5, world(percentage, 1, &[]), 0, Healthy),
                ],
            );
        }
    }

    #[test]
    fn metric_offloading_fires_every_time() {
        use Reason::*;
        scenario(
            "above, healthy, above again",
            &[
                (0, world(40, 2, &[BELOW]), 0, Healthy),
                (10, world(40, 2, &[ABOVE]), 40, MetricAboveTarget),
                (20, world(40, 2, &[BELOW]), 40, Stabilizing),
                (70, world(40, 2, &[BELOW]), 0, Healthy),
                (80, world(40, 2, &[ABOVE]), 40, MetricAboveTarget),
                (90, world(40, 2, &[BELOW]), 40, Stabilizing),
                (100, world(40, 2, &[ABOVE]), 40, MetricAboveTarget), // window restarts
                (150, world(40, 2, &[BELOW]), 40, Stabilizing),       // 50 s after the last above
                (160, world(40, 2, &[BELOW]), 0, Healthy),
                (170, world(40, 2, &[BELOW, ABOVE]), 40, MetricAboveTarget), // another metric
            ],
        );
    }

    #[test]
    fn healthy_alone_never_turns_offloading_on() {
        use Reason::*;
        let steps = scenario(
            "healthy readings only",
            &[
                (0, world(100, 3, &[BELOW]), 0, Healthy),
                (10, world(100, 3, &[BELOW]), 0, Healthy),
                (20, world(100, 3, &[]), 0, Healthy),
                (30, world(100, 3, &[down()]), 0, MetricUnavailable),
                (40, world(100, 3, &[BELOW]), 0, Healthy),
            ],
        );
        assert!(steps.iter().all(|d| d.last_metric_above.is_none()));
        // From no previous decision at all, either.
        assert_eq!(run(&world(100, 3, &[BELOW]), None, at(0)).percent, 0);
    }

    #[test]
    fn percentage_zero_never_offloads_on_metrics_but_fails_over() {
        use Reason::*;
        scenario(
            "percentage 0",
            &[
                (0, world(0, 2, &[ABOVE]), 0, MetricAboveTarget),
                (10, world(0, 2, &[BELOW]), 0, Stabilizing),
                (20, world(0, 0, &[ABOVE]), 100, NoReadyEndpoints),
                (30, world(0, 2, &[ABOVE]), 0, MetricAboveTarget),
                (100, world(0, 2, &[BELOW]), 0, Healthy),
            ],
        );
        let d = run(&world(0, 2, &[ABOVE]), None, at(0));
        assert!(d.message.contains("not offloading"), "{}", d.message);
    }

    #[test]
    fn since_changes_only_with_percent_or_reason() {
        use Reason::*;
        let steps = scenario(
            "since",
            &[
                (0, world(50, 2, &[BELOW]), 0, Healthy),
                (10, world(50, 2, &[BELOW]), 0, Healthy),
                (20, world(50, 2, &[ABOVE]), 50, MetricAboveTarget),
                (30, world(50, 2, &[ABOVE]), 50, MetricAboveTarget),
                (40, world(50, 2, &[BELOW]), 50, Stabilizing),
                (50, world(50, 2, &[BELOW]), 50, Stabilizing),
                (100, world(50, 2, &[BELOW]), 0, Healthy),
                (110, world(100, 0, &[]), 100, NoReadyEndpoints),
                (120, world(100, 2, &[ABOVE]), 100, MetricAboveTarget), // same percent, new reason
            ],
        );
        let since: Vec<SystemTime> = steps.iter().map(|d| d.since).collect();
        let want = [0, 0, 20, 20, 40, 40, 100, 110, 120].map(at);
        assert_eq!(since, want);
        // The message of a steady state does not change from one reconcile to the next.
        assert_eq!(steps[4].message, steps[5].message);
        assert_eq!(steps[2].message, steps[3].message);
    }

    #[test]
    fn transitions() {
        use Reason::*;
        let d = |percent, reason| Decision {
            percent,
            reason,
            last_metric_above: None,
            since: at(0),
            message: "why".into(),
        };
        #[rustfmt::skip]
        let cases: Vec<(Option<Decision>, Decision, Option<&str>)> = vec![
            (None, d(0, Healthy), Some("offload 0% (Healthy): why")),
            (Some(d(0, Healthy)), d(0, Healthy), None),
            (Some(d(0, Healthy)), d(50, MetricAboveTarget), Some("offload 0% -> 50% (Healthy -> MetricAboveTarget): why")),
            (Some(d(100, NoReadyEndpoints)), d(100, MetricAboveTarget), Some("offload 100% -> 100% (NoReadyEndpoints -> MetricAboveTarget): why")),
            (Some(d(50, MetricAboveTarget)), d(50, Stabilizing), Some("offload 50% -> 50% (MetricAboveTarget -> Stabilizing): why")),
            (Some(d(50, Stabilizing)), Decision { message: "other".into(), ..d(50, Stabilizing) }, None),
        ];
        for (prev, next, want) in cases {
            assert_eq!(transition(prev.as_ref(), &next).as_deref(), want);
        }
    }

    #[test]
    fn reasons_display_as_pascal_case() {
        for r in Reason::ALL {
            assert_eq!(r.to_string(), r.as_str());
            assert_eq!(
                serde_json::to_value(r).ok(),
                Some(serde_json::json!(r.as_str()))
            );
            let back: Reason = serde_json::from_value(serde_json::json!(r.as_str()))
                .unwrap_or_else(|e| panic!("{r}: {e}"));
            assert_eq!(back, r);
        }
        assert_eq!(Reason::NoReadyEndpoints.as_str(), "NoReadyEndpoints");
    }

    #[test]
    fn serialized_form() {
        let d = Decision {
            percent: 50,
            reason: Reason::Stabilizing,
            last_metric_above: Some(at(10) + Duration::from_millis(500)),
            since: at(20),
            message: "m".into(),
        };
        let v = serde_json::to_value(&d).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v,
            serde_json::json!({
                "percent": 50,
                "reason": "Stabilizing",
                "lastMetricAbove": "2025-01-01T00:00:10.5Z",
                "since": "2025-01-01T00:00:20Z",
                "message": "m",
            })
        );
        let back: Decision = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, d);

        let none = Decision {
            last_metric_above: None,
            ..d.clone()
        };
        let v = serde_json::to_value(&none).unwrap_or_else(|e| panic!("{e}"));
        assert!(v.get("lastMetricAbove").is_none(), "{v}");
        let back: Decision = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, none);

        // Other RFC 3339 spellings are accepted; explicit null too.
        let v = serde_json::json!({
            "percent": 0, "reason": "Healthy", "lastMetricAbove": null,
            "since": "2025-01-01T01:00:00+01:00", "message": ""
        });
        let back: Decision = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((back.since, back.last_metric_above), (at(0), None));

        for bad in [
            serde_json::json!({"percent": 0, "reason": "Healthy", "since": "yesterday", "message": ""}),
            serde_json::json!({"percent": 0, "reason": "Fine", "since": "2025-01-01T00:00:00Z", "message": ""}),
        ] {
            assert!(serde_json::from_value::<Decision>(bad).is_err());
        }
        // Times before the epoch round-trip too.
        let early = Decision {
            since: SystemTime::UNIX_EPOCH - Duration::from_millis(1500),
            ..none
        };
        let s = serde_json::to_string(&early).unwrap_or_else(|e| panic!("{e}"));
        assert!(s.contains("1969-12-31T23:59:58.5Z"), "{s}");
        assert_eq!(serde_json::from_str::<Decision>(&s).ok(), Some(early));
    }

    #[test]
    fn survives_a_restart() {
        use Reason::*;
        // The same history, once with the decision kept in memory and once with it only
        // restored from its serialized form (as a restarted controller reads it from status).
        let history: Vec<(u64, World)> = vec![
            (0, world(60, 2, &[ABOVE])),
            (5, world(60, 2, &[BELOW])),
            (30, world(60, 0, &[BELOW])),
            (40, world(60, 2, &[BELOW])),
            (59, world(60, 2, &[down()])),
            (65, world(60, 2, &[BELOW])),
        ];
        let want = [
            (60, MetricAboveTarget),
            (60, Stabilizing),
            (100, NoReadyEndpoints),
            (60, Stabilizing),
            (60, Stabilizing),
            (0, Healthy),
        ];
        let mut in_memory: Option<Decision> = None;
        let mut stored: Option<String> = None;
        for ((t, w), want) in history.iter().zip(want) {
            let a = run(w, in_memory.as_ref(), at(*t) + Duration::from_nanos(123));
            let restored: Option<Decision> = stored
                .as_deref()
                .map(|s| serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}")));
            let b = run(w, restored.as_ref(), at(*t) + Duration::from_nanos(123));
            assert_eq!(a, b, "t={t}");
            assert_eq!((a.percent, a.reason), want, "t={t}: {}", a.message);
            stored = Some(serde_json::to_string(&b).unwrap_or_else(|e| panic!("{e}")));
            in_memory = Some(a);
        }
        // Without the restored state, the restarted controller would have forgotten the
        // stabilization in progress: that is what the status is for.
        assert_eq!(run(&history[1].1, None, at(5)).reason, Healthy);
    }

    #[test]
    fn readings_from_results() {
        #[rustfmt::skip]
        let cases: Vec<(Result<bool, String>, MetricReading)> = vec![
            (Ok(true), MetricReading::Above),
            (Ok(false), MetricReading::NotAbove),
            (Err("no data".into()), MetricReading::Unavailable("no data".into())),
        ];
        for (input, want) in cases {
            assert_eq!(MetricReading::from(input), want);
        }
        let err: Result<bool, crate::metric_math::MetricError> =
            Err(crate::metric_math::MetricError::NoData);
        assert!(
            matches!(MetricReading::from(err), MetricReading::Unavailable(why) if why.contains("no data"))
        );
        assert_eq!(MetricReading::compared(true), MetricReading::Above);
    }

    #[test]
    fn status_fields_round_trip() {
        let d = Decision {
            percent: 40,
            reason: Reason::Stabilizing,
            last_metric_above: Some(at(10) + Duration::from_nanos(1)),
            since: at(20),
            message: "m".into(),
        };
        let (since, last) = d.status_times();
        assert_eq!(since, "2025-01-01T00:00:20Z");
        assert_eq!(last.as_deref(), Some("2025-01-01T00:00:10.000000001Z"));
        let back =
            Decision::from_status_fields(40, "Stabilizing", &since, last.as_deref(), "m".into());
        assert_eq!(back.as_ref(), Some(&d));

        #[rustfmt::skip]
        /// (percent, reason, since, lastMetricAbove) -> (percent, reason, lastMetricAbove)
        type Case = (i32, &'static str, &'static str, Option<&'static str>, Option<(u8, Reason, Option<SystemTime>)>);
        let cases: Vec<Case> = vec![
            (
                0,
                "Healthy",
                "2025-01-01T00:00:00Z",
                None,
                Some((0, Reason::Healthy, None)),
            ),
            (
                250,
                "NoReadyEndpoints",
                "2025-01-01T00:00:00Z",
                None,
                Some((100, Reason::NoReadyEndpoints, None)),
            ),
            (
                -5,
                "Healthy",
                "2025-01-01T00:00:00Z",
                None,
                Some((0, Reason::Healthy, None)),
            ),
            (
                50,
                "Stabilizing",
                "2025-01-01T01:00:00+01:00",
                Some("garbage"),
                Some((50, Reason::Stabilizing, None)),
            ),
            (
                50,
                "MetricAboveTarget",
                "2025-01-01T00:00:00Z",
                Some("2025-01-01T00:00:05Z"),
                Some((50, Reason::MetricAboveTarget, Some(at(5)))),
            ),
            (50, "Overloaded", "2025-01-01T00:00:00Z", None, None),
            (50, "healthy", "2025-01-01T00:00:00Z", None, None),
            (50, "Healthy", "not a time", None, None),
            (50, "Healthy", "", None, None),
        ];
        for (percent, reason, since, last, want) in cases {
            let got = Decision::from_status_fields(percent, reason, since, last, String::new());
            assert_eq!(
                got.map(|d| (d.percent, d.reason, d.last_metric_above)),
                want,
                "{reason} {since}"
            );
        }
        assert_eq!("Stabilizing".parse::<Reason>(), Ok(Reason::Stabilizing));
        assert!(
            "Nope"
                .parse::<Reason>()
                .is_err_and(|e| e.to_string().contains("\"Nope\""))
        );
    }

    #[test]
    fn survives_a_restart_through_status_fields() {
        use Reason::*;
        let history: Vec<(u64, World, u8, Reason)> = vec![
            (0, world(60, 2, &[ABOVE]), 60, MetricAboveTarget),
            (30, world(60, 2, &[BELOW]), 60, Stabilizing),
            (59, world(60, 2, &[BELOW]), 60, Stabilizing),
            (60, world(60, 2, &[BELOW]), 0, Healthy),
        ];
        let mut stored: Option<(i32, String, String, Option<String>, String)> = None;
        let mut in_memory: Option<Decision> = None;
        for (t, w, percent, reason) in history {
            let now = at(t) + Duration::from_micros(250);
            let restored = stored.as_ref().and_then(|(p, r, s, l, m)| {
                Decision::from_status_fields(*p, r, s, l.as_deref(), m.clone())
            });
            assert_eq!(restored, in_memory, "t={t}");
            let d = run(&w, restored.as_ref(), now);
            assert_eq!(
                (d.percent, d.reason),
                (percent, reason),
                "t={t}: {}",
                d.message
            );
            let (since, last) = d.status_times();
            stored = Some((
                i32::from(d.percent),
                d.reason.to_string(),
                since,
                last,
                d.message.clone(),
            ));
            in_memory = Some(d);
        }
    }

    #[test]
    fn messages_explain() {
        let d = run(&world(50, 2, &[BELOW, down()]), None, at(0));
        assert!(
            d.message.contains("metrics[1]: metrics.k8s.io unavailable"),
            "{}",
            d.message
        );
        let d = run(&world(50, 2, &[ABOVE, BELOW, ABOVE]), None, at(0));
        assert!(
            d.message.contains("metrics[0], metrics[2] above target"),
            "{}",
            d.message
        );
        assert!(d.message.contains("50%"), "{}", d.message);
        let prev = previous(50, Reason::MetricAboveTarget, Some(0));
        let d = run(&world(50, 2, &[BELOW]), Some(&prev), at(30));
        assert!(
            d.message.contains("until 2025-01-01T00:01:00Z"),
            "{}",
            d.message
        );
    }
}
