//! The Horizontal Pod Autoscaler's arithmetic and rules, as Kubernetes' own HPA controller has
//! them (v1.37, `pkg/controller/podautoscaler`).
//!
//! The controller fetches raw numbers (metrics.k8s.io, the custom and external metrics APIs,
//! Prometheus) and hands them to the pure functions here, which turn them into "is this metric
//! above its target?", which is "would the HPA scale up?". Nothing in this module performs I/O,
//! so every rule is pinned by table-driven unit tests, several of them the HPA's own test cases:
//!
//! - which pods' samples count ([`pod_rule`]: deleted, failed, pending, missing, and for CPU the
//!   readiness of young pods against the samples' timestamps and windows), and what the HPA does
//!   with missing and unready pods ([`pod_metric_verdict`]: counted at 0 on a scale-up, at the
//!   request or target on a scale-down, hold if that lands within the tolerance or reverses);
//! - the tolerance in the HPA's floating point ([`within_tolerance`], [`is_above`]);
//! - requests as the HPA sums them ([`pod_request_milli`]: pod-level, sidecars, one container);
//! - the defects of the earlier product: CPU utilization divided by the replica count a second
//!   time, `Value`/`AverageValue` compared inverted and off by 1000x (everything here is in the
//!   same milli-units, and the ratio is `current / target`), division by zero without requests,
//!   malformed Prometheus queries with several labels and failing scalar results
//!   ([`promql_for_metric`], [`parse_prometheus_instant`]).
//!
//! Units: quantities are integers in milli-units (`"250m"` is 250, `"1"` is 1000, `"1Ki"` is
//! 1_024_000). Utilization is in whole percent, truncated, as the HPA computes it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use k8s_openapi::api::autoscaling::v2::MetricTarget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// The HPA's default tolerance: no action while `current / target` is within 10% of 1.
pub const DEFAULT_TOLERANCE: f64 = 0.1;

/// Why a Kubernetes quantity string could not be read. Every variant names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The string was empty (or only whitespace).
    #[error("invalid quantity {input:?}: empty")]
    Empty {
        /// The input as given.
        input: String,
    },
    /// The string does not follow the Kubernetes quantity grammar.
    #[error("invalid quantity {input:?}: {reason}")]
    Invalid {
        /// The input as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The value does not fit in an `i128` of milli-units (about 1.7e35 units).
    #[error("invalid quantity {input:?}: too large")]
    Overflow {
        /// The input as given.
        input: String,
    },
}

/// Why a metric value could not be computed, or a query rendered or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricError {
    /// A quantity in a sample or target could not be parsed.
    #[error(transparent)]
    Quantity(#[from] QuantityError),
    /// No pods at all: nothing to average over.
    #[error("no pods to compute the metric over")]
    NoPods,
    /// The counted pods' requests add up to zero, so utilization is undefined (the HPA
    /// refuses too: "no metrics returned matched known pods"). The pods are named.
    #[error("the requests of the counted pods add up to 0, utilization is undefined; pods: {}", .pods.join(", "))]
    NoRequests {
        /// The counted pods.
        pods: Vec<String>,
    },
    /// No sample counts: every pod is missing one or was set aside (the HPA: "did not receive
    /// metrics for targeted pods (pods might be unready)"). Each pod is named with its rule.
    #[error("no usage sample counts, as the HPA's rules go; pods: {}", .pods.join(", "))]
    NoCountedPods {
        /// `pod (rule)` for each pod.
        pods: Vec<String>,
    },
    /// An arithmetic overflow (absurdly large sums).
    #[error("overflow while computing {what}")]
    Overflow {
        /// Which computation overflowed.
        what: &'static str,
    },
    /// A `MetricTarget` that cannot be compared against (wrong type or missing field).
    #[error("invalid metric target: {0}")]
    InvalidTarget(String),
    /// The metric name is not a valid classic Prometheus metric name.
    #[error("invalid Prometheus metric name {0:?}: must match [a-zA-Z_:][a-zA-Z0-9_:]*")]
    InvalidMetricName(String),
    /// A label selector key is not a valid Prometheus label name (for example
    /// `app.kubernetes.io/name`: Prometheus relabels such labels, and guessing how would
    /// silently query the wrong series).
    #[error("label {0:?} is not a valid Prometheus label name: must match [a-zA-Z_][a-zA-Z0-9_]*")]
    InvalidLabelName(String),
    /// A label selector requirement that is not well formed.
    #[error("invalid label selector requirement on {key:?} (operator {operator:?}): {reason}")]
    InvalidSelector {
        /// The requirement's key.
        key: String,
        /// The requirement's operator.
        operator: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Prometheus answered with an error.
    #[error("Prometheus query failed: {0}")]
    PrometheusError(String),
    /// The Prometheus answer is not the JSON of an instant query.
    #[error("malformed Prometheus response: {0}")]
    PrometheusMalformed(String),
    /// The query matched no series.
    #[error("no data: the Prometheus query returned no series")]
    NoData,
    /// The query matched several series; summing or picking one would hide a wrong query.
    #[error(
        "the Prometheus query returned {0} series, expected exactly one (aggregate it, e.g. with sum())"
    )]
    SeveralSeries(usize),
    /// The value is NaN or infinite.
    #[error("the metric value {0:?} is not a finite number")]
    NotFinite(String),
}

/// Parses a Kubernetes quantity (`"250m"`, `"1.5"`, `"2Gi"`, `"1e3"`, `"0.5Ki"`, ...) into
/// milli-units.
///
/// The grammar is Kubernetes': an optional sign, a decimal number (`1`, `1.5`, `.5`, `5.`), and
/// a suffix: binary (`Ki` `Mi` `Gi` `Ti` `Pi` `Ei`), decimal (`n` `u` `m`, none, `k` `M` `G`
/// `T` `P` `E`) or a decimal exponent (`e3`, `E-2`, `e+6`). `"1E"` is one exa, `"1E3"` is 1000.
///
/// The arithmetic is exact integer arithmetic (no floating point): a value that is not a whole
/// number of milli-units is rounded away from zero, as Kubernetes' `MilliValue()` does, so
/// `"0.1m"` is 1. Surrounding whitespace is ignored.
pub fn parse_quantity_milli(s: &str) -> Result<i128, QuantityError> {
    let input = s.trim();
    let invalid = |reason: &str| QuantityError::Invalid {
        input: s.to_owned(),
        reason: reason.to_owned(),
    };
    let overflow = || QuantityError::Overflow {
        input: s.to_owned(),
    };
    if input.is_empty() {
        return Err(QuantityError::Empty {
            input: s.to_owned(),
        });
    }

    // Sign.
    let (negative, rest) = match input.as_bytes()[0] {
        b'-' => (true, &input[1..]),
        b'+' => (false, &input[1..]),
        _ => (false, input),
    };

    // Number: digits, optionally '.', digits; at least one digit overall.
    let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    let int_digits = &rest[..int_len];
    let mut rest = &rest[int_len..];
    let mut frac_digits = "";
    if let Some(after_dot) = rest.strip_prefix('.') {
        let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
        frac_digits = &after_dot[..frac_len];
        rest = &after_dot[frac_len..];
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(invalid("expected a number"));
    }

    // Suffix: powers of ten and of two.
    let (mut exp10, exp2): (i64, u32) = match rest {
        "" => (0, 0),
        // metrics-server reports CPU in nanocores (`"485987319n"`).
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        other => {
            let exponent = other
                .strip_prefix('e')
                .or_else(|| other.strip_prefix('E'))
                .ok_or_else(|| invalid(&format!("unknown suffix {other:?}")))?;
            (
                parse_exponent(exponent)
                    .ok_or_else(|| invalid(&format!("unknown suffix {other:?}")))?,
                0,
            )
        }
    };

    // Mantissa: all digits as one integer, the decimal point moved into the exponent. Leading
    // and trailing zeros are dropped so that long spellings of small numbers still fit.
    let mut digits = String::with_capacity(int_digits.len() + frac_digits.len());
    digits.push_str(int_digits);
    digits.push_str(frac_digits);
    exp10 -= i64::try_from(frac_digits.len()).map_err(|_| overflow())?;
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        return Ok(0);
    }
    let significant = trimmed.trim_end_matches('0');
    exp10 += i64::try_from(trimmed.len() - significant.len()).map_err(|_| overflow())?;
    if significant.len() > 38 {
        return Err(invalid("more than 38 significant digits"));
    }
    let mantissa: i128 = significant.parse().map_err(|_| overflow())?;

    // Scale to milli-units: mantissa * 2^exp2 * 10^(exp10 + 3), rounded away from zero.
    let scaled = mantissa.checked_mul(1i128 << exp2).ok_or_else(overflow)?;
    let scale = exp10 + 3;
    let magnitude = if scale >= 0 {
        let factor = u32::try_from(scale)
            .ok()
            .and_then(|e| 10i128.checked_pow(e))
            .ok_or_else(overflow)?;
        scaled.checked_mul(factor).ok_or_else(overflow)?
    } else {
        match u32::try_from(-scale)
            .ok()
            .and_then(|e| 10i128.checked_pow(e))
        {
            // Divisor larger than any i128: the (non-zero) value is below one milli-unit.
            None => 1,
            Some(divisor) => {
                let quotient = scaled / divisor;
                if scaled % divisor == 0 {
                    quotient
                } else {
                    quotient + 1
                }
            }
        }
    };
    Ok(if negative { -magnitude } else { magnitude })
}

/// An exponent after `e`/`E`: optional sign and digits. Absurd magnitudes are clamped, which
/// later yields an overflow (large) or a rounding to one milli-unit (small).
fn parse_exponent(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value = digits.parse::<i64>().unwrap_or(i64::MAX).min(1_000_000);
    Some(if negative { -value } else { value })
}

/// [`parse_quantity_milli`] on a `Quantity` from the Kubernetes API.
pub fn quantity_milli(q: &Quantity) -> Result<i128, QuantityError> {
    parse_quantity_milli(&q.0)
}

/// Converts a floating-point metric value (Prometheus answers in floats) into milli-units,
/// rounded to the nearest milli-unit. NaN, infinities and values beyond the range are errors.
pub fn f64_to_milli(value: f64) -> Result<i128, MetricError> {
    if !value.is_finite() {
        return Err(MetricError::NotFinite(value.to_string()));
    }
    let milli = (value * 1000.0).round();
    // i128 covers about ±1.7e38; keep well inside so the cast is exact in range.
    if milli.abs() >= 1e38 {
        return Err(MetricError::Overflow {
            what: "milli-units of a float",
        });
    }
    #[allow(clippy::cast_possible_truncation)]
    Ok(milli as i128)
}

/// The per-pod average of a total, in milli-units (truncated toward zero, as the HPA's integer
/// division). Used for `Pods` metrics and `AverageValue` targets. Zero pods is an error, not a
/// division by zero.
pub fn average_value(total_milli: i128, pods: usize) -> Result<i128, MetricError> {
    let pods = i128::try_from(pods).map_err(|_| MetricError::Overflow {
        what: "the pod count",
    })?;
    if pods == 0 {
        return Err(MetricError::NoPods);
    }
    Ok(total_milli / pods)
}

// ---------------------------------------------------------------------------------------------
// Which pods count, and how: the HPA's rules for pod metrics.
//
// Everything below follows Kubernetes' own HPA controller, v1.37
// (k8s.io/kubernetes pkg/controller/podautoscaler/replica_calculator.go, `groupPods`,
// `GetResourceReplicas`, `calcPlainMetricReplicas`, `calculateRequests`; and metrics/utilization.go
// `GetResourceUtilizationRatio`, `GetMetricUsageRatio`). The HPA turns these rules into a replica
// count; the controller keeps the HPA's verdict (scale up, scale down, or hold) and turns "the HPA
// would scale up" into "the metric is above its target".

/// The kube-controller-manager settings the HPA's pod rules depend on; [`Default`] is its defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaSettings {
    /// `--horizontal-pod-autoscaler-tolerance` (0.1), in both directions.
    pub tolerance: f64,
    /// `--horizontal-pod-autoscaler-cpu-initialization-period` (5 min): how long after its start
    /// a pod's CPU samples are looked at closely.
    pub cpu_initialization_period: Duration,
    /// `--horizontal-pod-autoscaler-initial-readiness-delay` (30 s): an unready pod whose `Ready`
    /// condition last changed within this delay of its start has never been ready.
    pub initial_readiness_delay: Duration,
}

impl Default for HpaSettings {
    fn default() -> Self {
        Self {
            tolerance: DEFAULT_TOLERANCE,
            cpu_initialization_period: Duration::from_secs(5 * 60),
            initial_readiness_delay: Duration::from_secs(30),
        }
    }
}

/// A condition's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    /// `"True"`, `"False"`; anything else is `Unknown`, as the HPA only tests for `False`.
    pub fn parse(s: &str) -> Self {
        match s {
            "True" => Self::True,
            "False" => Self::False,
            _ => Self::Unknown,
        }
    }
}

/// What the HPA reads of a pod to decide whether its sample counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    /// `status.phase` as written (`Running`, `Pending`, `Failed`, ...; empty when unset).
    pub phase: String,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// The `Ready` condition: its status and `lastTransitionTime` (`None`: unset, which the HPA
    /// reads as Go's zero time, long ago).
    pub ready: Option<(ConditionStatus, Option<Timestamp>)>,
    /// `status.startTime`.
    pub start_time: Option<Timestamp>,
}

/// One pod's sample: the value (milli-units), when it was taken and over which window (what
/// metrics-server's PodMetrics carry as `timestamp` and `window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodValue {
    pub value_milli: i128,
    pub timestamp: Timestamp,
    pub window: Duration,
}

/// Why a pod's sample was not taken as it is: the HPA's rule that applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PodRule {
    /// Being deleted: left out entirely (the HPA's "ignored" pods).
    Deleting,
    /// Phase `Failed`: left out entirely.
    Failed,
    /// Phase `Pending`: unready.
    Pending,
    /// No sample for the pod: missing.
    NoSample,
    /// CPU: the pod has no `Ready` condition or no `startTime`: unready.
    NoReadiness,
    /// CPU, within the initialization period: `Ready` is `False`: unready.
    NotReadyStarting,
    /// CPU, within the initialization period: the sample does not cover a full window since the
    /// pod became ready (`timestamp < lastTransitionTime + window`): unready.
    SampleBeforeReady,
    /// CPU, after the initialization period: `Ready` is `False` and has been since the pod
    /// started (last transition within the initial readiness delay of the start): unready.
    NeverReady,
}

/// How the HPA treats the pods of one [`PodRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodGroup {
    /// Left out of every computation.
    Ignored,
    /// Its sample is set aside; counted at 0 when the others say "scale up".
    Unready,
    /// No sample; counted at 0 on a scale-up and at the target on a scale-down.
    Missing,
}

impl PodRule {
    pub const fn group(self) -> PodGroup {
        match self {
            Self::Deleting | Self::Failed => PodGroup::Ignored,
            Self::NoSample => PodGroup::Missing,
            Self::Pending
            | Self::NoReadiness
            | Self::NotReadyStarting
            | Self::SampleBeforeReady
            | Self::NeverReady => PodGroup::Unready,
        }
    }

    /// Short, for status.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Deleting => "being deleted",
            Self::Failed => "failed",
            Self::Pending => "pending",
            Self::NoSample => "no sample",
            Self::NoReadiness => "no Ready condition or start time",
            Self::NotReadyStarting => "not ready, within the CPU initialization period",
            Self::SampleBeforeReady => {
                "sample older than one window after it became ready, within the CPU initialization period"
            }
            Self::NeverReady => "not ready since it started",
        }
    }
}

/// `t + d`, saturating.
fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// The HPA's `groupPods` for one pod: `None` when its sample counts as it is.
///
/// In order: a pod being deleted or `Failed` is ignored; a `Pending` pod is unready; a pod without
/// a sample is missing. For CPU only (`cpu`), a pod with a sample is also unready when it has no
/// `Ready` condition or no start time; within `cpu_initialization_period` of its start, when it
/// is not ready or its sample was taken less than one window after it became ready (the sample
/// may include its start-up burst); after that period, when it is not ready and never was (its
/// `Ready` condition last changed within `initial_readiness_delay` of its start). A pod that was
/// ready and became unready later keeps its CPU sample, as in the HPA.
pub fn pod_rule(
    pod: &PodState,
    sample: Option<&PodValue>,
    cpu: bool,
    settings: &HpaSettings,
    now: Timestamp,
) -> Option<PodRule> {
    if pod.deleting {
        return Some(PodRule::Deleting);
    }
    match pod.phase.as_str() {
        "Failed" => return Some(PodRule::Failed),
        "Pending" => return Some(PodRule::Pending),
        _ => {}
    }
    let Some(sample) = sample else {
        return Some(PodRule::NoSample);
    };
    if !cpu {
        return None;
    }
    let (Some((status, transition)), Some(start)) = (pod.ready, pod.start_time) else {
        return Some(PodRule::NoReadiness);
    };
    // Go's zero time for an unset lastTransitionTime: before any start or sample.
    let transition = transition.unwrap_or(Timestamp::MIN);
    if plus(start, settings.cpu_initialization_period) > now {
        if status == ConditionStatus::False {
            return Some(PodRule::NotReadyStarting);
        }
        if sample.timestamp < plus(transition, sample.window) {
            return Some(PodRule::SampleBeforeReady);
        }
    } else if status == ConditionStatus::False
        && plus(start, settings.initial_readiness_delay) > transition
    {
        return Some(PodRule::NeverReady);
    }
    None
}

/// Whether `ratio` (current / target) is within the tolerance: the HPA's `Tolerances.isWithin`,
/// `1 - tolerance <= ratio <= 1 + tolerance`, in the same floating point as the HPA, so a value
/// exactly at the boundary (110% against 100%) is within on both sides. A negative or NaN
/// tolerance counts as 0.
pub fn within_tolerance(ratio: f64, tolerance: f64) -> bool {
    let tolerance = if tolerance.is_finite() && tolerance > 0.0 {
        tolerance
    } else {
        0.0
    };
    (1.0 - tolerance) <= ratio && ratio <= (1.0 + tolerance)
}

/// What the HPA would do for one metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Scale up: the metric is above its target.
    Up,
    /// Scale down.
    Down,
    /// Keep the replicas.
    Hold(HoldReason),
}

/// Why the HPA would keep the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReason {
    /// The ratio is within the tolerance.
    WithinTolerance,
    /// Counting the missing or unready pods reverses the direction (a scale-up that falls below
    /// the target, or a scale-down that rises above it).
    Reversed,
    /// The proposed replica count is the current one.
    Unchanged,
}

/// A pod metric's target, as the HPA uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodTarget<'a> {
    /// `averageUtilization` of a `Resource` or `ContainerResource` metric, in percent of the
    /// pods' requests (milli-units, by pod name: the HPA's `calculateRequests`).
    Utilization {
        percent: i32,
        requests: &'a BTreeMap<String, i128>,
    },
    /// `averageValue` per pod, in milli-units (a `Pods` metric, or a `Resource` metric with an
    /// `AverageValue` target).
    AverageValue(i128),
}

/// What missing pods were counted at, when the HPA counted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingAs {
    /// 0, on a scale-up.
    Zero,
    /// On a scale-down: `percent`% of their request (100, or the target when it is above 100).
    PercentOfRequest(i64),
    /// On a scale-down: the target value.
    Target,
}

/// The second computation the HPA makes when pods are missing or unready.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recount {
    /// What missing pods were counted at (`None`: there were none, or the ratio was exactly 1).
    pub missing_as: Option<MissingAs>,
    /// Unready pods were counted at 0 (the first ratio said "scale up").
    pub unready_at_zero: bool,
    /// The recomputed value (percent or milli-units) and ratio.
    pub current: i128,
    pub ratio: f64,
}

/// The HPA's reading of a pod metric.
#[derive(Debug, Clone, PartialEq)]
pub struct PodMetricVerdict {
    /// What the HPA reports as the metric's current value (its status): whole percent for
    /// [`PodTarget::Utilization`], the per-pod average in milli-units for
    /// [`PodTarget::AverageValue`]; over the pods whose sample counts.
    pub current: i128,
    /// Utilization only: Σ usage / pods counted, milli-units (the HPA's `averageValue`).
    pub average_milli: Option<i128>,
    /// `current / target`.
    pub ratio: f64,
    /// How many samples counted as they are.
    pub counted: usize,
    /// The pods whose sample was not taken as it is, and why; by name.
    pub set_aside: Vec<(String, PodRule)>,
    /// Present when missing or unready pods made the HPA compute again.
    pub recount: Option<Recount>,
    pub verdict: Verdict,
}

impl PodMetricVerdict {
    /// Whether the HPA would scale up, which is "above the target" for the controller.
    pub fn above(&self) -> bool {
        self.verdict == Verdict::Up
    }

    /// For status: the pods set aside, the rule applied and what it led to, as one sentence;
    /// `None` when every sample counted. `unit` formats a value of [`Self::current`].
    pub fn explain(&self, unit: impl Fn(i128) -> String) -> Option<String> {
        if self.set_aside.is_empty() {
            return None;
        }
        let mut out = String::from("as the HPA: ");
        let mut by_rule: Vec<(PodRule, Vec<&str>)> = Vec::new();
        for (pod, rule) in &self.set_aside {
            match by_rule.iter_mut().find(|(r, _)| r == rule) {
                Some((_, pods)) => pods.push(pod.as_str()),
                None => by_rule.push((*rule, vec![pod.as_str()])),
            }
        }
        by_rule.sort_by_key(|(rule, _)| *rule);
        for (i, (rule, pods)) in by_rule.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            let what = match rule.group() {
                PodGroup::Ignored => "left out",
                PodGroup::Unready => "sample set aside",
                PodGroup::Missing => "missing",
            };
            let _ = write!(out, "{} {what} ({})", pods.join(", "), rule.describe());
        }
        match &self.recount {
            None => {
                let _ = write!(out, "; {} over the other pods", unit(self.current));
            }
            Some(r) => {
                let mut counted_as = Vec::new();
                match r.missing_as {
                    Some(MissingAs::Zero) => counted_as.push("missing pods at 0".to_owned()),
                    Some(MissingAs::PercentOfRequest(p)) => {
                        counted_as.push(format!("missing pods at {p}% of their request"));
                    }
                    Some(MissingAs::Target) => {
                        counted_as.push("missing pods at the target".to_owned());
                    }
                    None => {}
                }
                if r.unready_at_zero {
                    counted_as.push("unready pods at 0".to_owned());
                }
                if counted_as.is_empty() {
                    let _ = write!(out, "; {} over the other pods", unit(self.current));
                } else {
                    let _ = write!(
                        out,
                        "; with {} (a scale-{}): {}",
                        counted_as.join(" and "),
                        if self.ratio > 1.0 { "up" } else { "down" },
                        unit(r.current)
                    );
                }
            }
        }
        out.push_str(match self.verdict {
            Verdict::Up => ", above the target",
            Verdict::Down => ", below the target",
            Verdict::Hold(HoldReason::WithinTolerance) => ", within the tolerance: hold",
            Verdict::Hold(HoldReason::Reversed) => ", which reverses the direction: hold",
            Verdict::Hold(HoldReason::Unchanged) => ", the same replica count: hold",
        });
        Some(out)
    }
}

/// `(current, ratio, average)` over `values` for `target`: `GetResourceUtilizationRatio` (values
/// without a request are extraneous and skipped; Σ requests of 0 is an error) or
/// `GetMetricUsageRatio` (the integer per-pod average).
fn pod_ratio(
    values: &BTreeMap<&str, i128>,
    target: &PodTarget<'_>,
) -> Result<(i128, f64, Option<i128>), MetricError> {
    let overflow = |what| MetricError::Overflow { what };
    match *target {
        PodTarget::Utilization { percent, requests } => {
            let (mut usage, mut request, mut entries) = (0i128, 0i128, 0usize);
            for (pod, value) in values {
                let Some(r) = requests.get(*pod) else {
                    continue;
                };
                usage = usage
                    .checked_add(*value)
                    .ok_or(overflow("the sum of usage"))?;
                request = request
                    .checked_add(*r)
                    .ok_or(overflow("the sum of requests"))?;
                entries += 1;
            }
            if request == 0 {
                return Err(MetricError::NoRequests {
                    pods: values.keys().map(|p| (*p).to_owned()).collect(),
                });
            }
            let current = usage.checked_mul(100).ok_or(overflow("utilization"))? / request;
            let current = current.clamp(i128::from(i32::MIN), i128::from(i32::MAX));
            #[allow(clippy::cast_precision_loss)]
            let ratio = current as f64 / f64::from(percent);
            Ok((current, ratio, Some(average_value(usage, entries)?)))
        }
        PodTarget::AverageValue(target) => {
            let mut total = 0i128;
            for value in values.values() {
                total = total
                    .checked_add(*value)
                    .ok_or(overflow("the sum of values"))?;
            }
            let current = average_value(total, values.len())?;
            #[allow(clippy::cast_precision_loss)]
            let ratio = current as f64 / target as f64;
            Ok((current, ratio, None))
        }
    }
}

/// The HPA's reading of a pod metric (`Resource`, `ContainerResource`, `Pods`): which samples
/// count ([`pod_rule`]), the ratio to the target, and, when pods are missing or unready, the
/// second computation and its verdict.
///
/// - Samples of ignored and unready pods are dropped; samples of pods not in `pods` stay (the
///   HPA counts such "superfluous" samples). No sample left is an error
///   ([`MetricError::NoCountedPods`], naming the pods and rules).
/// - Without missing pods, and unless unready pods are there while the ratio is above 1, the
///   verdict is the ratio's: within the tolerance → hold, else up or down.
/// - Otherwise the HPA computes again: on a scale-up (ratio > 1) missing pods count at 0; on a
///   scale-down (ratio < 1) at 100% of their request (or the target utilization if above 100%),
///   or at the target value for `AverageValue`; unready pods count at 0 on a scale-up. If the new
///   ratio is within the tolerance or on the other side of 1, the HPA holds.
///
/// The verdict is the HPA's proposal, `ceil(ratio × pods)`, against the replica count, which
/// here is the number of pods not ignored: what it is when the workload is at its replica count
/// (mid-rollout the HPA's count differs; docs/how-it-works.md names the difference). Above 1 plus the
/// tolerance, the proposal is always more than the pods, so "up" does not depend on it.
pub fn pod_metric_verdict(
    pods: &[PodState],
    samples: &BTreeMap<String, PodValue>,
    cpu: bool,
    target: PodTarget<'_>,
    settings: &HpaSettings,
    now: Timestamp,
) -> Result<PodMetricVerdict, MetricError> {
    if pods.is_empty() {
        return Err(MetricError::NoPods);
    }
    let mut set_aside = Vec::new();
    let mut values: BTreeMap<&str, i128> = samples
        .iter()
        .map(|(pod, v)| (pod.as_str(), v.value_milli))
        .collect();
    for pod in pods {
        if let Some(rule) = pod_rule(pod, samples.get(&pod.name), cpu, settings, now) {
            set_aside.push((pod.name.clone(), rule));
            values.remove(pod.name.as_str());
        }
    }
    set_aside.sort();
    if values.is_empty() {
        return Err(MetricError::NoCountedPods {
            pods: set_aside
                .iter()
                .map(|(pod, rule)| format!("{pod} ({})", rule.describe()))
                .collect(),
        });
    }
    let counted = values.len();
    let (current, ratio, average_milli) = pod_ratio(&values, &target)?;
    let in_group = |group: PodGroup| {
        set_aside
            .iter()
            .filter(move |(_, rule)| rule.group() == group)
            .map(|(pod, _)| pod.as_str())
    };
    let missing: Vec<&str> = in_group(PodGroup::Missing).collect();
    let unready_at_zero = ratio > 1.0 && in_group(PodGroup::Unready).next().is_some();
    // The HPA compares its proposal, ceil(ratio × pods), with the workload's replica count; here
    // that count is the pods it does not ignore (what it is once a workload is at its replicas).
    let ignored = set_aside
        .iter()
        .filter(|(_, rule)| rule.group() == PodGroup::Ignored)
        .count();
    #[allow(clippy::cast_precision_loss)]
    let (replicas, ready) = (
        (pods.len() - ignored) as f64,
        (pods.len() - set_aside.len()) as f64,
    );
    let against_replicas = |proposal: f64| {
        if proposal > replicas {
            Verdict::Up
        } else if proposal < replicas {
            Verdict::Down
        } else {
            Verdict::Hold(HoldReason::Unchanged)
        }
    };
    if missing.is_empty() && !unready_at_zero {
        let verdict = if within_tolerance(ratio, settings.tolerance) {
            Verdict::Hold(HoldReason::WithinTolerance)
        } else {
            against_replicas((ratio * ready).ceil())
        };
        return Ok(PodMetricVerdict {
            current,
            average_milli,
            ratio,
            counted,
            set_aside,
            recount: None,
            verdict,
        });
    }
    let mut missing_as = None;
    if !missing.is_empty() {
        let fill = if ratio < 1.0 {
            Some(match target {
                PodTarget::Utilization { percent, .. } => {
                    MissingAs::PercentOfRequest(i64::from(percent.max(100)))
                }
                PodTarget::AverageValue(_) => MissingAs::Target,
            })
        } else if ratio > 1.0 {
            Some(MissingAs::Zero)
        } else {
            None
        };
        for pod in missing.iter().copied() {
            let value = match (fill, target) {
                (Some(MissingAs::Zero), _) => 0,
                (Some(MissingAs::PercentOfRequest(p)), PodTarget::Utilization { requests, .. }) => {
                    requests.get(pod).copied().unwrap_or(0) * i128::from(p) / 100
                }
                (Some(MissingAs::Target), PodTarget::AverageValue(t)) => t,
                _ => continue,
            };
            values.insert(pod, value);
        }
        missing_as = fill;
    }
    if unready_at_zero {
        for pod in in_group(PodGroup::Unready) {
            values.insert(pod, 0);
        }
    }
    let (recounted, new_ratio, _) = pod_ratio(&values, &target)?;
    #[allow(clippy::cast_precision_loss)]
    let proposal = (new_ratio * values.len() as f64).ceil();
    let reversed = (ratio < 1.0 && new_ratio > 1.0)
        || (ratio > 1.0 && new_ratio < 1.0)
        || (new_ratio < 1.0 && proposal > replicas)
        || (new_ratio > 1.0 && proposal < replicas);
    let verdict = if within_tolerance(new_ratio, settings.tolerance) {
        Verdict::Hold(HoldReason::WithinTolerance)
    } else if reversed {
        Verdict::Hold(HoldReason::Reversed)
    } else {
        against_replicas(proposal)
    };
    Ok(PodMetricVerdict {
        current,
        average_milli,
        ratio,
        counted,
        set_aside,
        recount: Some(Recount {
            missing_as,
            unready_at_zero,
            current: recounted,
            ratio: new_ratio,
        }),
        verdict,
    })
}

/// The HPA's `calculateRequests` for one pod: the request for `resource` in milli-units, from
/// the pod-level `spec.resources.requests` when set (and no `container` is named: pod-level
/// requests of cpu, memory or hugepages-*, plus the pod's overhead), else the sum over the
/// containers and restartable init containers (sidecars), or only over `container`. A container
/// without the request, or a named container that is not there, is an error naming both: the
/// HPA refuses the whole metric then, and so does the controller.
pub fn pod_request_milli(
    pod: &k8s_openapi::api::core::v1::Pod,
    resource: &str,
    container: Option<&str>,
) -> Result<i128, String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let Some(spec) = &pod.spec else {
        return Err(format!("pod {name} has no spec"));
    };
    let quantity = |q: &Quantity| {
        quantity_milli(q).map_err(|e| format!("request for {resource} of pod {name}: {e}"))
    };
    let pod_level = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .filter(|r| {
            r.keys()
                .any(|k| k == "cpu" || k == "memory" || k.starts_with("hugepages-"))
        });
    if let (Some(requests), None) = (pod_level, container) {
        let q = requests
            .get(resource)
            .ok_or_else(|| format!("missing pod-level request for {resource} in pod {name}"))?;
        let overhead = match spec.overhead.as_ref().and_then(|o| o.get(resource)) {
            Some(o) => quantity(o)?,
            None => 0,
        };
        return Ok(quantity(q)? + overhead);
    }
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let mut total = 0i128;
    for c in spec.containers.iter().chain(sidecars) {
        if container.is_some_and(|wanted| wanted != c.name) {
            continue;
        }
        let q = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get(resource))
            .ok_or_else(|| {
                format!(
                    "missing request for {resource} in container {} of pod {name}",
                    c.name
                )
            })?;
        total += quantity(q)?;
        if container.is_some() {
            return Ok(total);
        }
    }
    match container {
        Some(c) => Err(format!("container {c} not found in pod {name}")),
        None => Ok(total),
    }
}

/// What [`pod_rule`] reads of a pod from the API.
pub fn pod_state(pod: &k8s_openapi::api::core::v1::Pod) -> PodState {
    let status = pod.status.as_ref();
    PodState {
        name: pod.metadata.name.clone().unwrap_or_default(),
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        deleting: pod.metadata.deletion_timestamp.is_some(),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| {
                (
                    ConditionStatus::parse(&c.status),
                    c.last_transition_time.as_ref().map(|t| t.0),
                )
            }),
        start_time: status.and_then(|s| s.start_time.as_ref()).map(|t| t.0),
    }
}

/// A Go duration as metav1.Duration serializes it (`"15s"`, `"1m0s"`, `"1.5s"`, `"250ms"`), for
/// a PodMetrics' `window`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// A metric target, in the units [`is_above`] compares in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `averageUtilization`, in whole percent of the requests. Compare with
    /// [`UtilizationResult::percent`].
    Utilization(i32),
    /// `averageValue` in milli-units. Compare with the per-pod average ([`average_value`]).
    AverageValue(i128),
    /// `value` in milli-units. Compare with the total (object or external metric value).
    Value(i128),
}

impl Target {
    /// Reads an `autoscaling/v2` `MetricTarget`: `type` selects the field, which must be set.
    /// Quantities become milli-units here, once, so no caller compares units with milli-units.
    pub fn from_metric_target(t: &MetricTarget) -> Result<Self, MetricError> {
        let missing =
            |field: &str| MetricError::InvalidTarget(format!("type {} requires {field}", t.type_));
        match t.type_.as_str() {
            "Utilization" => t
                .average_utilization
                .map(Target::Utilization)
                .ok_or_else(|| missing("averageUtilization")),
            "AverageValue" => {
                let q = t
                    .average_value
                    .as_ref()
                    .ok_or_else(|| missing("averageValue"))?;
                Ok(Target::AverageValue(quantity_milli(q)?))
            }
            "Value" => {
                let q = t.value.as_ref().ok_or_else(|| missing("value"))?;
                Ok(Target::Value(quantity_milli(q)?))
            }
            other => Err(MetricError::InvalidTarget(format!(
                "unknown type {other:?} (expected Utilization, AverageValue or Value)"
            ))),
        }
    }

    /// The target number: percent for `Utilization`, milli-units otherwise.
    pub fn amount(&self) -> i128 {
        match *self {
            Target::Utilization(p) => i128::from(p),
            Target::AverageValue(m) | Target::Value(m) => m,
        }
    }
}

/// Whether `current` is above `target` beyond the tolerance, which is when the HPA would scale up
/// for it: the ratio `current / target` is above 1 and not [`within_tolerance`]
/// ([`DEFAULT_TOLERANCE`] is 0.1, so 100 against a target of 90 is above, 99 is not, and 110
/// against 100 is not: the HPA compares `ratio <= 1.0 + 0.1` in floating point, which is true
/// there).
///
/// `current` is in the target's units: whole percent for [`Target::Utilization`], milli-units
/// for [`Target::AverageValue`] (per-pod average) and [`Target::Value`] (total). The ratio is
/// `current / target`, never the inverse (an earlier defect). A negative or NaN tolerance counts
/// as 0. A target of zero or less cannot be used as a ratio (the API rejects it); it degenerates
/// to `current > target`.
pub fn is_above(current: i128, target: &Target, tolerance: f64) -> bool {
    let target = target.amount();
    if target <= 0 {
        return current > target;
    }
    #[allow(clippy::cast_precision_loss)]
    let ratio = current as f64 / target as f64;
    ratio > 1.0 && !within_tolerance(ratio, tolerance)
}

/// Renders a PromQL instant vector selector for a metric and a Kubernetes label selector:
/// `name{a="x",b=~"y|z",c!="w"}`.
///
/// - `matchLabels` `k: v` and `In [v]` render `k="v"`; `In [a, b]` renders `k=~"a|b"`;
///   `NotIn` likewise with `!=` / `!~`; `Exists` renders `k!=""` and `DoesNotExist` `k=""`
///   (Prometheus has no separate notion of an empty label).
/// - Values are escaped for PromQL strings (`\` and `"`), and for the regex in `=~`/`!~`
///   (so `v1.0` matches only itself).
/// - Matchers are sorted (by key, then text) and duplicates dropped, so the query is
///   deterministic and comparable across reconciles.
/// - No selector, or an empty one, renders just `name`.
///
/// The metric name and label keys must be classic Prometheus names; keys such as
/// `app.kubernetes.io/name` are an error that names them rather than a silently wrong query.
pub fn promql_for_metric(
    name: &str,
    selector: Option<&LabelSelector>,
) -> Result<String, MetricError> {
    if !is_metric_name(name) {
        return Err(MetricError::InvalidMetricName(name.to_owned()));
    }
    let mut matchers: Vec<(String, String)> = Vec::new();
    if let Some(selector) = selector {
        for (key, value) in selector.match_labels.iter().flatten() {
            check_label_name(key)?;
            matchers.push((key.clone(), format!("{key}=\"{}\"", escape_string(value))));
        }
        for req in selector.match_expressions.iter().flatten() {
            check_label_name(&req.key)?;
            let bad = |reason| MetricError::InvalidSelector {
                key: req.key.clone(),
                operator: req.operator.clone(),
                reason,
            };
            let mut values: Vec<&str> = req.values.iter().flatten().map(String::as_str).collect();
            values.sort_unstable();
            values.dedup();
            let key = &req.key;
            let rendered = match (req.operator.as_str(), values.as_slice()) {
                ("In" | "NotIn", []) => return Err(bad("In and NotIn need at least one value")),
                ("Exists" | "DoesNotExist", [_, ..]) => {
                    return Err(bad("Exists and DoesNotExist take no values"));
                }
                ("In", [one]) => format!("{key}=\"{}\"", escape_string(one)),
                ("NotIn", [one]) => format!("{key}!=\"{}\"", escape_string(one)),
                ("In", many) => format!("{key}=~\"{}\"", escape_string(&alternation(many))),
                ("NotIn", many) => format!("{key}!~\"{}\"", escape_string(&alternation(many))),
                ("Exists", []) => format!("{key}!=\"\""),
                ("DoesNotExist", []) => format!("{key}=\"\""),
                _ => {
                    return Err(bad(
                        "unknown operator (expected In, NotIn, Exists or DoesNotExist)",
                    ));
                }
            };
            matchers.push((key.clone(), rendered));
        }
    }
    if matchers.is_empty() {
        return Ok(name.to_owned());
    }
    matchers.sort();
    matchers.dedup();
    let mut out = String::from(name);
    out.push('{');
    for (i, (_, m)) in matchers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(m);
    }
    out.push('}');
    Ok(out)
}

/// A classic Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn is_metric_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

fn check_label_name(s: &str) -> Result<(), MetricError> {
    let mut bytes = s.bytes();
    let ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(MetricError::InvalidLabelName(s.to_owned()))
    }
}

/// Escapes a value for a double-quoted PromQL string.
fn escape_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// `a|b|c` with each value's RE2 metacharacters escaped, so values match literally.
fn alternation(values: &[&str]) -> String {
    let mut out = String::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        for c in v.chars() {
            if "\\.+*?()|[]{}^$".contains(c) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// Reads the value of a Prometheus instant query (`/api/v1/query`).
///
/// Accepts the whole response (`{"status": "success", "data": {...}}`) or just its `data`.
/// `resultType` `scalar` gives its value; `vector` must hold exactly one series: none is
/// [`MetricError::NoData`], several is [`MetricError::SeveralSeries`] with the count (summing
/// them would hide a query that matches more than intended; aggregate in PromQL instead).
/// NaN and infinities are errors, as are `matrix` and `string` results.
pub fn parse_prometheus_instant(json: &serde_json::Value) -> Result<f64, MetricError> {
    let malformed = |why: &str| MetricError::PrometheusMalformed(why.to_owned());
    let data = match json.get("status") {
        Some(status) => {
            if status.as_str() != Some("success") {
                let kind = json
                    .get("errorType")
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown");
                let error = json
                    .get("error")
                    .and_then(|v| v.as_str())
                    .unwrap_or("no error message");
                return Err(MetricError::PrometheusError(format!("{kind}: {error}")));
            }
            json.get("data").ok_or_else(|| malformed("no \"data\""))?
        }
        None => json,
    };
    let result_type = data
        .get("resultType")
        .and_then(|v| v.as_str())
        .ok_or_else(|| malformed("no \"resultType\""))?;
    let result = data
        .get("result")
        .ok_or_else(|| malformed("no \"result\""))?;
    let sample = match result_type {
        "scalar" => result,
        "vector" => {
            let series = result
                .as_array()
                .ok_or_else(|| malformed("vector \"result\" is not an array"))?;
            match series.as_slice() {
                [] => return Err(MetricError::NoData),
                [one] => one
                    .get("value")
                    .ok_or_else(|| malformed("series without \"value\""))?,
                many => return Err(MetricError::SeveralSeries(many.len())),
            }
        }
        other => {
            return Err(malformed(&format!(
                "resultType {other:?} (expected vector or scalar from an instant query)"
            )));
        }
    };
    let value = sample
        .as_array()
        .and_then(|pair| pair.get(1))
        .ok_or_else(|| malformed("sample is not [timestamp, value]"))?;
    let parsed = match value {
        serde_json::Value::String(s) => {
            parse_prom_float(s).ok_or_else(|| malformed(&format!("value {s:?} is not a number")))?
        }
        serde_json::Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| malformed("value is not a number"))?,
        _ => return Err(malformed("value is not a string")),
    };
    if parsed.is_finite() {
        Ok(parsed)
    } else {
        Err(MetricError::NotFinite(
            value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned),
        ))
    }
}

/// Prometheus formats floats as Go does: `1.5`, `1e+06`, `NaN`, `+Inf`, `-Inf`.
fn parse_prom_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        other => other.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[test]
    fn quantities() {
        let cases: &[(&str, i128)] = &[
            ("0", 0),
            ("250m", 250),
            ("1", 1000),
            ("1.5", 1500),
            ("+1.5", 1500),
            ("-1.5", -1500),
            (".5", 500),
            ("5.", 5000),
            ("0.000", 0),
            ("100k", 100_000_000),
            ("1M", 1_000_000_000),
            ("1G", 1_000_000_000_000),
            ("1T", 1_000_000_000_000_000),
            ("1P", 1_000_000_000_000_000_000),
            ("1E", 1_000_000_000_000_000_000_000),
            ("1Ki", 1_024_000),
            ("0.5Ki", 512_000),
            ("500Mi", 500 * 1024 * 1024 * 1000),
            ("2Gi", 2 * 1024 * 1024 * 1024 * 1000),
            ("1Ti", (1i128 << 40) * 1000),
            ("1Pi", (1i128 << 50) * 1000),
            ("1Ei", (1i128 << 60) * 1000),
            ("1e3", 1_000_000),
            ("1E3", 1_000_000),
            ("1e+3", 1_000_000),
            ("1.5e-3", 2), // 1.5 milli-units, rounded away from zero
            ("25e-1", 2500),
            ("1e-3", 1),
            ("0.1m", 1), // Kubernetes' MilliValue rounds up
            ("-0.1m", -1),
            ("1m", 1),
            ("1500m", 1500),
            ("0.0000000000000000000000000000000000000000001", 1),
            ("1e-1000000", 1),
            ("  2  ", 2000),
            ("1000000000000000000000000000000000000000000e-40", 100_000),
            ("0.3333333333", 334),
            // metrics-server's CPU usage, in nanocores (seen on real nodes).
            ("485987319n", 486),
            ("1000000n", 1),
            ("1n", 1),
            ("250000u", 250),
            ("1500u", 2),
        ];
        for (input, want) in cases {
            assert_eq!(parse_quantity_milli(input), Ok(*want), "{input}");
        }
    }

    #[test]
    fn quantity_errors_name_the_input() {
        let cases: &[&str] = &[
            "", "   ", "abc", "1x", "1 Gi", "1e", "1e+", "1ee3", "Ki", ".", "-", "1.2.3", "1ki",
            "1mi", "1.5.Ki", "--1", "1K",
        ];
        for input in cases {
            let err = match parse_quantity_milli(input) {
                Err(e) => e,
                Ok(v) => panic!("{input:?} parsed as {v}"),
            };
            assert!(
                err.to_string().contains(&format!("{input:?}")),
                "{input:?}: {err}"
            );
        }
        assert!(matches!(
            parse_quantity_milli("1e40"),
            Err(QuantityError::Overflow { .. })
        ));
        assert!(matches!(
            parse_quantity_milli("99999999999999999999999999999999999Ei"),
            Err(QuantityError::Overflow { .. })
        ));
        assert!(matches!(
            parse_quantity_milli("1e99999999999999999999"),
            Err(QuantityError::Overflow { .. })
        ));
        assert_eq!(
            quantity_milli(&Quantity("2Gi".into())),
            Ok(2_147_483_648_000)
        );
    }

    #[test]
    fn floats_to_milli() {
        let cases: &[(f64, Option<i128>)] = &[
            (0.0, Some(0)),
            (1.1, Some(1100)), // 1.1 * 1000 is 1100.0000000000002 in f64: rounded, not ceiled
            (0.25, Some(250)),
            (-2.5, Some(-2500)),
            (0.0004, Some(0)),
            (1e6, Some(1_000_000_000)),
            (f64::NAN, None),
            (f64::INFINITY, None),
            (1e300, None),
        ];
        for (input, want) in cases {
            assert_eq!(f64_to_milli(*input).ok(), *want, "{input}");
        }
    }

    // ---- The HPA's rules (cases named after the HPA's own tests in replica_calculator_test.go,
    // v1.37, where they are ports of them).

    fn at(seconds_before_now: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 - seconds_before_now).unwrap_or_else(|e| panic!("{e}"))
    }

    fn now() -> Timestamp {
        at(0)
    }

    /// A pod started `started` seconds ago, `Ready` with `status` since `transition` seconds ago.
    fn pod_at(
        name: &str,
        phase: &str,
        ready: Option<(ConditionStatus, i64)>,
        started: Option<i64>,
    ) -> PodState {
        PodState {
            name: name.into(),
            phase: phase.into(),
            deleting: false,
            ready: ready.map(|(s, t)| (s, Some(at(t)))),
            start_time: started.map(at),
        }
    }

    /// Running, ready for ten minutes: every rule lets its sample count.
    fn settled(name: &str) -> PodState {
        pod_at(
            name,
            "Running",
            Some((ConditionStatus::True, 600)),
            Some(610),
        )
    }

    fn sample(value: i128, taken: i64, window: u64) -> PodValue {
        PodValue {
            value_milli: value,
            timestamp: at(taken),
            window: Duration::from_secs(window),
        }
    }

    #[test]
    fn which_samples_count() {
        use ConditionStatus::{False, True, Unknown};
        let s = HpaSettings::default();
        let fresh = sample(100, 0, 30);
        // (what, pod, its sample, CPU?, the rule that applies)
        type Case = (
            &'static str,
            PodState,
            Option<PodValue>,
            bool,
            Option<PodRule>,
        );
        let cases: Vec<Case> = vec![
            (
                "count in a ready pod - memory",
                settled("p"),
                Some(fresh),
                false,
                None,
            ),
            (
                "count in a ready pod - CPU",
                settled("p"),
                Some(fresh),
                true,
                None,
            ),
            (
                "unready a pod without ready condition - CPU",
                pod_at("p", "Running", None, Some(600)),
                Some(fresh),
                true,
                Some(PodRule::NoReadiness),
            ),
            (
                "no start time - CPU",
                pod_at("p", "Running", Some((True, 600)), None),
                Some(fresh),
                true,
                Some(PodRule::NoReadiness),
            ),
            (
                "no ready condition is no reason for memory",
                pod_at("p", "Running", None, None),
                Some(fresh),
                false,
                None,
            ),
            (
                "count in a ready pod with fresh metrics during initialization period - CPU",
                pod_at("p", "Running", Some((True, 50)), Some(60)),
                Some(sample(100, 0, 30)),
                true,
                None,
            ),
            (
                "unready a ready pod without fresh metrics during initialization period - CPU",
                pod_at("p", "Running", Some((True, 50)), Some(60)),
                Some(sample(100, 0, 60)),
                true,
                Some(PodRule::SampleBeforeReady),
            ),
            (
                "a sample exactly one window after becoming ready counts",
                pod_at("p", "Running", Some((True, 30)), Some(60)),
                Some(sample(100, 0, 30)),
                true,
                None,
            ),
            (
                "unready an unready pod during initialization period - CPU",
                pod_at("p", "Running", Some((False, 50)), Some(60)),
                Some(fresh),
                true,
                Some(PodRule::NotReadyStarting),
            ),
            (
                "Unknown is not False: within the period, only the window rule applies",
                pod_at("p", "Running", Some((Unknown, 100)), Some(120)),
                Some(fresh),
                true,
                None,
            ),
            (
                "count in a ready pod without fresh metrics after initialization period - CPU",
                pod_at("p", "Running", Some((True, 10)), Some(600)),
                Some(sample(100, 0, 60)),
                true,
                None,
            ),
            (
                "count in an unready pod that was ready after initialization period - CPU",
                pod_at("p", "Running", Some((False, 60)), Some(600)),
                Some(fresh),
                true,
                None,
            ),
            (
                "unready pod that has never been ready after initialization period - CPU",
                pod_at("p", "Running", Some((False, 590)), Some(600)),
                Some(fresh),
                true,
                Some(PodRule::NeverReady),
            ),
            (
                "a missing pod",
                settled("p"),
                None,
                true,
                Some(PodRule::NoSample),
            ),
            (
                "pending pods are unreadied",
                pod_at("p", "Pending", None, None),
                None,
                false,
                Some(PodRule::Pending),
            ),
            (
                "ignore pods in a failed state",
                pod_at("p", "Failed", Some((False, 10)), Some(600)),
                Some(fresh),
                false,
                Some(PodRule::Failed),
            ),
            (
                "ignore pods with deletion timestamps",
                PodState {
                    deleting: true,
                    ..settled("p")
                },
                Some(fresh),
                false,
                Some(PodRule::Deleting),
            ),
        ];
        for (what, pod, sample, cpu, want) in cases {
            assert_eq!(
                pod_rule(&pod, sample.as_ref(), cpu, &s, now()),
                want,
                "{what}"
            );
        }
        // An unset lastTransitionTime is Go's zero time: long before the start.
        let zero = PodState {
            ready: Some((False, None)),
            ..pod_at("p", "Running", None, Some(600))
        };
        assert_eq!(
            pod_rule(&zero, Some(&fresh), true, &s, now()),
            Some(PodRule::NeverReady)
        );
        let starting = PodState {
            ready: Some((True, None)),
            ..pod_at("p", "Running", None, Some(60))
        };
        assert_eq!(pod_rule(&starting, Some(&fresh), true, &s, now()), None);
    }

    #[test]
    fn the_tolerance_is_the_hpas_floating_point() {
        // isWithin: (1 - t) <= ratio <= (1 + t), in float64.
        assert!(within_tolerance(110.0 / 100.0, 0.1));
        assert!(within_tolerance(88.0 / 80.0, 0.1));
        assert!(within_tolerance(99.0 / 90.0, 0.1));
        assert!(within_tolerance(90.0 / 100.0, 0.1));
        assert!(!within_tolerance(111.0 / 100.0, 0.1));
        assert!(!within_tolerance(100.0 / 90.0, 0.1));
        assert!(!within_tolerance(89.0 / 100.0, 0.1));
        assert!(within_tolerance(1.0, 0.0));
        assert!(!within_tolerance(1.01, f64::NAN));
        assert!(!within_tolerance(f64::NAN, 0.1));
    }

    /// Requests of 1 CPU (1000m) for each pod.
    fn requests(pods: &[&str], milli: i128) -> BTreeMap<String, i128> {
        pods.iter().map(|p| ((*p).to_owned(), milli)).collect()
    }

    fn samples(values: &[(&str, i128)]) -> BTreeMap<String, PodValue> {
        values
            .iter()
            .map(|(p, v)| ((*p).to_owned(), sample(*v, 0, 30)))
            .collect()
    }

    /// A pod that started 60 s ago and is not ready yet (a CPU sample from it is set aside).
    fn starting_unready(name: &str) -> PodState {
        pod_at(
            name,
            "Running",
            Some((ConditionStatus::False, 50)),
            Some(60),
        )
    }

    struct VerdictCase {
        what: &'static str,
        pods: Vec<PodState>,
        samples: BTreeMap<String, PodValue>,
        /// Utilization (percent) with these requests, or an average value.
        target: (Option<BTreeMap<String, i128>>, i128),
        current: i128,
        recounted: Option<i128>,
        verdict: Verdict,
    }

    #[test]
    fn verdicts_as_the_hpa() {
        use HoldReason::{Reversed, Unchanged, WithinTolerance};
        use Verdict::{Down, Hold, Up};
        let abc = ["a", "b", "c"];
        let abcd = ["a", "b", "c", "d"];
        let settled_all = |names: &[&str]| names.iter().map(|n| settled(n)).collect::<Vec<_>>();
        let with_unready = |names: &[&str]| {
            let mut pods = settled_all(names);
            pods[0] = starting_unready(names[0]);
            pods
        };
        let cases = vec![
            VerdictCase {
                what: "the issue's case: two pods at 125% and one without a sample hold (83% with it at 0)",
                pods: settled_all(&abc),
                samples: samples(&[("a", 250), ("b", 250)]),
                target: (Some(requests(&abc, 200)), 90),
                current: 125,
                recounted: Some(83),
                verdict: Hold(WithinTolerance),
            },
            VerdictCase {
                what: "scale up",
                pods: settled_all(&abc),
                samples: samples(&[("a", 300), ("b", 500), ("c", 700)]),
                target: (Some(requests(&abc, 1000)), 30),
                current: 50,
                recounted: None,
                verdict: Up,
            },
            VerdictCase {
                what: "scale up: unready pod scales less (counted at 0)",
                pods: with_unready(&abc),
                samples: samples(&[("a", 300), ("b", 500), ("c", 700)]),
                target: (Some(requests(&abc, 1000)), 30),
                current: 60,
                recounted: Some(40),
                verdict: Up,
            },
            VerdictCase {
                what: "unready pod counted at 0 lands within the tolerance: hold",
                pods: with_unready(&abc),
                samples: samples(&[("a", 900), ("b", 600), ("c", 600)]),
                target: (Some(requests(&abc, 1000)), 40),
                current: 60,
                recounted: Some(40),
                verdict: Hold(WithinTolerance),
            },
            VerdictCase {
                what: "scale down: exclude unready pods",
                pods: with_unready(&abc),
                samples: samples(&[("a", 100), ("b", 300), ("c", 300)]),
                target: (Some(requests(&abc, 1000)), 50),
                current: 30,
                recounted: None,
                verdict: Down,
            },
            VerdictCase {
                what: "scale up: failed pods ignored",
                pods: {
                    let mut p = settled_all(&["a", "b", "c", "f"]);
                    p[3].phase = "Failed".into();
                    p
                },
                samples: samples(&[("a", 600), ("b", 600), ("c", 600), ("f", 0)]),
                target: (Some(requests(&["a", "b", "c", "f"], 1000)), 30),
                current: 60,
                recounted: None,
                verdict: Up,
            },
            VerdictCase {
                what: "no change: unready pod metric missing (the missing pod at 100% reverses)",
                pods: with_unready(&abc),
                samples: samples(&[("a", 100), ("b", 450)]),
                target: (Some(requests(&abc, 1000)), 50),
                current: 45,
                recounted: Some(72),
                verdict: Hold(Reversed),
            },
            VerdictCase {
                what: "scale up: unready pod metric missing",
                pods: with_unready(&abc),
                samples: samples(&[("a", 100), ("b", 2000)]),
                target: (Some(requests(&abc, 1000)), 50),
                current: 200,
                recounted: Some(66),
                verdict: Up,
            },
            VerdictCase {
                what: "scale down: unready pod metric missing",
                pods: with_unready(&abcd),
                samples: samples(&[("a", 100), ("b", 100), ("c", 100)]),
                target: (Some(requests(&abcd, 1000)), 50),
                current: 10,
                recounted: Some(40),
                verdict: Down,
            },
            VerdictCase {
                what: "scale down: target over 100 (missing pods at the target's percent)",
                pods: with_unready(&abcd),
                samples: samples(&[("a", 200), ("b", 100), ("c", 100)]),
                target: (
                    Some(
                        [("a", 1000), ("b", 1000), ("c", 2000), ("d", 2000)]
                            .iter()
                            .map(|(p, r)| ((*p).to_owned(), *r))
                            .collect(),
                    ),
                    300,
                ),
                current: 6,
                recounted: Some(124),
                verdict: Down,
            },
            VerdictCase {
                what: "superfluous metrics counted",
                pods: settled_all(&abcd),
                samples: samples(&[
                    ("a", 4000),
                    ("b", 9500),
                    ("c", 3000),
                    ("d", 7000),
                    ("e", 3200),
                    ("f", 2000),
                ]),
                target: (Some(requests(&abcd, 1000)), 100),
                current: 587,
                recounted: None,
                verdict: Up,
            },
            VerdictCase {
                what: "some pods missing metrics scales down",
                pods: settled_all(&abcd),
                samples: samples(&[("a", 400), ("b", 95)]),
                target: (Some(requests(&abcd, 1000)), 100),
                current: 24,
                recounted: Some(62),
                verdict: Down,
            },
            VerdictCase {
                what: "no change: metric equal to target",
                pods: settled_all(&["a", "b"]),
                samples: samples(&[("a", 1000)]),
                target: (Some(requests(&["a", "b"], 1000)), 100),
                current: 100,
                recounted: Some(100),
                verdict: Hold(WithinTolerance),
            },
            VerdictCase {
                what: "no change: metric above target (the missing pod at 0 lands within)",
                pods: settled_all(&["a", "b"]),
                samples: samples(&[("a", 1900)]),
                target: (Some(requests(&["a", "b"], 1000)), 100),
                current: 190,
                recounted: Some(95),
                verdict: Hold(WithinTolerance),
            },
            VerdictCase {
                what: "no change: metric below target (ceil(0.8 x 2) is 2)",
                pods: settled_all(&["a", "b"]),
                samples: samples(&[("a", 600)]),
                target: (Some(requests(&["a", "b"], 1000)), 100),
                current: 60,
                recounted: Some(80),
                verdict: Hold(Unchanged),
            },
            VerdictCase {
                what: "a missing pod at 0 that leaves the rest above: still up",
                pods: settled_all(&abc),
                samples: samples(&[("a", 1000), ("b", 1000)]),
                target: (Some(requests(&abc, 1000)), 50),
                current: 100,
                recounted: Some(66),
                verdict: Up,
            },
            VerdictCase {
                what: "at the tolerance boundary: 110% of a 100% target is within",
                pods: settled_all(&["a"]),
                samples: samples(&[("a", 1100)]),
                target: (Some(requests(&["a"], 1000)), 100),
                current: 110,
                recounted: None,
                verdict: Hold(WithinTolerance),
            },
            VerdictCase {
                what: "just past the boundary: 111%",
                pods: settled_all(&["a"]),
                samples: samples(&[("a", 1110)]),
                target: (Some(requests(&["a"], 1000)), 100),
                current: 111,
                recounted: None,
                verdict: Up,
            },
            VerdictCase {
                what: "utilization truncates: 1109m of 1000m is 110%, within",
                pods: settled_all(&["a"]),
                samples: samples(&[("a", 1109)]),
                target: (Some(requests(&["a"], 1000)), 100),
                current: 110,
                recounted: None,
                verdict: Hold(WithinTolerance),
            },
            // Pods metrics (calcPlainMetricReplicas): no CPU readiness rule; missing pods at the
            // target on a scale-down.
            VerdictCase {
                what: "pods metric: scale up",
                pods: settled_all(&abc),
                samples: samples(&[("a", 20_000), ("b", 30_000), ("c", 40_000)]),
                target: (None, 15_000),
                current: 30_000,
                recounted: None,
                verdict: Up,
            },
            VerdictCase {
                what: "pods metric: a missing pod at the target on a scale-down: ceil(0.78 x 3) is 3",
                pods: settled_all(&abc),
                samples: samples(&[("a", 4000), ("b", 9500)]),
                target: (None, 10_000),
                current: 6750,
                recounted: Some(7833),
                verdict: Hold(Unchanged),
            },
            VerdictCase {
                what: "pods metric: a missing pod at 0 brings 120 over 100 back within",
                pods: settled_all(&["a", "b", "c", "d", "e", "f"]),
                samples: samples(&[("a", 120), ("b", 120), ("c", 120), ("d", 120), ("e", 120)]),
                target: (None, 100),
                current: 120,
                recounted: Some(100),
                verdict: Hold(WithinTolerance),
            },
            VerdictCase {
                what: "pods metric: a pending pod at 0 on a scale-up",
                pods: {
                    let mut p = settled_all(&abc);
                    p[2] = pod_at("c", "Pending", None, None);
                    p
                },
                samples: samples(&[("a", 300), ("b", 300)]),
                target: (None, 200),
                current: 300,
                recounted: Some(200),
                verdict: Hold(WithinTolerance),
            },
        ];
        let s = HpaSettings::default();
        for c in cases {
            let target = match &c.target {
                (Some(requests), percent) => PodTarget::Utilization {
                    percent: i32::try_from(*percent).unwrap_or(i32::MAX),
                    requests,
                },
                (None, value) => PodTarget::AverageValue(*value),
            };
            let cpu = c.target.0.is_some();
            let v = pod_metric_verdict(&c.pods, &c.samples, cpu, target, &s, now())
                .unwrap_or_else(|e| panic!("{}: {e}", c.what));
            assert_eq!(v.current, c.current, "{}: {v:?}", c.what);
            assert_eq!(
                v.recount.map(|r| r.current),
                c.recounted,
                "{}: {v:?}",
                c.what
            );
            assert_eq!(v.verdict, c.verdict, "{}: {v:?}", c.what);
            assert_eq!(v.above(), c.verdict == Up, "{}", c.what);
        }
    }

    #[test]
    fn verdict_errors_name_the_pods() {
        let s = HpaSettings::default();
        let reqs = requests(&["a", "b"], 1000);
        let target = PodTarget::Utilization {
            percent: 50,
            requests: &reqs,
        };
        assert_eq!(
            pod_metric_verdict(&[], &samples(&[]), true, target, &s, now()),
            Err(MetricError::NoPods)
        );
        let err = pod_metric_verdict(
            &[starting_unready("a"), settled("b")],
            &samples(&[("a", 100)]),
            true,
            target,
            &s,
            now(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("a (not ready, within the CPU initialization period)")
                && err.contains("b (no sample)"),
            "{err}"
        );
        // "disjoint pod and metric names": no request matches a sample.
        let err = pod_metric_verdict(
            &[settled("a")],
            &samples(&[("a", 100), ("an-older-pod-name", 100)]),
            true,
            PodTarget::Utilization {
                percent: 50,
                requests: &requests(&["a"], 0),
            },
            &s,
            now(),
        );
        assert!(
            matches!(err, Err(MetricError::NoRequests { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn status_names_the_pods_and_the_rule() {
        let abc = ["php-a", "php-b", "php-c"];
        let reqs = requests(&abc, 200);
        let v = pod_metric_verdict(
            &abc.iter().map(|n| settled(n)).collect::<Vec<_>>(),
            &samples(&[("php-a", 250), ("php-b", 250)]),
            true,
            PodTarget::Utilization {
                percent: 90,
                requests: &reqs,
            },
            &HpaSettings::default(),
            now(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v.explain(|p| format!("{p}%")).as_deref(),
            Some(
                "as the HPA: php-c missing (no sample); with missing pods at 0 (a scale-up): 83%, \
                 within the tolerance: hold"
            )
        );
        let v = pod_metric_verdict(
            &[
                starting_unready("php-a"),
                settled("php-b"),
                settled("php-c"),
            ],
            &samples(&[("php-a", 100), ("php-b", 300)]),
            true,
            PodTarget::Utilization {
                percent: 90,
                requests: &reqs,
            },
            &HpaSettings::default(),
            now(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v.explain(|p| format!("{p}%")).as_deref(),
            Some(
                "as the HPA: php-c missing (no sample); php-a sample set aside (not ready, within \
                 the CPU initialization period); with missing pods at 0 and unready pods at 0 (a \
                 scale-up): 50%, which reverses the direction: hold"
            )
        );
        let all = pod_metric_verdict(
            &[settled("a")],
            &samples(&[("a", 100)]),
            true,
            PodTarget::AverageValue(100),
            &HpaSettings::default(),
            now(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all.explain(|p| p.to_string()), None);
    }

    #[test]
    fn requests_as_the_hpa_sums_them() {
        let pod = |yaml: &str| -> k8s_openapi::api::core::v1::Pod {
            serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
        };
        let two = pod(
            "metadata: {name: p}\nspec:\n  containers:\n  - {name: a, resources: {requests: {cpu: 100m}}}\n  \
             - {name: b, resources: {requests: {cpu: 200m, memory: 1Mi}}}\n  initContainers:\n  \
             - {name: side, restartPolicy: Always, resources: {requests: {cpu: 50m}}}\n  \
             - {name: init, resources: {requests: {cpu: '2'}}}\n",
        );
        assert_eq!(pod_request_milli(&two, "cpu", None), Ok(350));
        assert_eq!(pod_request_milli(&two, "cpu", Some("b")), Ok(200));
        assert_eq!(pod_request_milli(&two, "cpu", Some("side")), Ok(50));
        assert_eq!(
            pod_request_milli(&two, "memory", None),
            Err("missing request for memory in container a of pod p".into())
        );
        assert_eq!(
            pod_request_milli(&two, "memory", Some("b")),
            Ok(1_048_576_000)
        );
        assert_eq!(
            pod_request_milli(&two, "cpu", Some("nope")),
            Err("container nope not found in pod p".into())
        );
        let pod_level = pod(
            "metadata: {name: q}\nspec:\n  resources: {requests: {cpu: '1'}}\n  overhead: {cpu: 10m}\n  \
             containers:\n  - {name: a}\n  - {name: b, resources: {requests: {cpu: 100m}}}\n",
        );
        assert_eq!(pod_request_milli(&pod_level, "cpu", None), Ok(1010));
        assert_eq!(pod_request_milli(&pod_level, "cpu", Some("b")), Ok(100));
        assert_eq!(
            pod_request_milli(&pod_level, "memory", None),
            Err("missing pod-level request for memory in pod q".into())
        );
    }

    #[test]
    fn go_durations() {
        let cases: &[(&str, Option<f64>)] = &[
            ("15s", Some(15.0)),
            ("1m0s", Some(60.0)),
            ("1.5s", Some(1.5)),
            ("250ms", Some(0.25)),
            ("1h2m3s", Some(3723.0)),
            ("0", Some(0.0)),
            ("", None),
            ("5", None),
            ("1x", None),
            ("s", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_go_duration(input).map(|d| d.as_secs_f64()),
                *want,
                "{input:?}"
            );
        }
    }

    #[test]
    fn averages() {
        assert_eq!(average_value(3000, 3), Ok(1000));
        assert_eq!(average_value(1000, 3), Ok(333));
        assert_eq!(average_value(0, 2), Ok(0));
        assert_eq!(average_value(1000, 0), Err(MetricError::NoPods));
    }

    #[test]
    fn above_target() {
        let q = |s: &str| parse_quantity_milli(s).unwrap_or_else(|e| panic!("{e}"));
        let cases: &[(&str, i128, Target, f64, bool)] = &[
            (
                "utilization well above",
                95,
                Target::Utilization(80),
                0.1,
                true,
            ),
            ("utilization below", 50, Target::Utilization(80), 0.1, false),
            (
                "utilization inside tolerance",
                85,
                Target::Utilization(80),
                0.1,
                false,
            ),
            (
                "exactly at 1 + tolerance is not above",
                110,
                Target::Utilization(100),
                0.1,
                false,
            ),
            (
                "just past 1 + tolerance",
                111,
                Target::Utilization(100),
                0.1,
                true,
            ),
            (
                "88 vs 80 is exactly 1.1",
                88,
                Target::Utilization(80),
                0.1,
                false,
            ),
            ("89 vs 80", 89, Target::Utilization(80), 0.1, true),
            ("zero tolerance", 101, Target::Utilization(100), 0.0, true),
            (
                "zero tolerance, equal",
                100,
                Target::Utilization(100),
                0.0,
                false,
            ),
            (
                "NaN tolerance counts as 0",
                101,
                Target::Utilization(100),
                f64::NAN,
                true,
            ),
            (
                "negative tolerance counts as 0",
                100,
                Target::Utilization(100),
                -0.5,
                false,
            ),
            // Earlier defect: inverted comparison (target / current). Both directions pinned.
            (
                "value: 2 against 1 is above",
                q("2"),
                Target::Value(q("1")),
                0.1,
                true,
            ),
            (
                "value: 500m against 1 is not above",
                q("500m"),
                Target::Value(q("1")),
                0.1,
                false,
            ),
            // Earlier defect: milli-units against units (off by 1000x): 900m vs "1" compared as
            // 900 vs 1 would be "above".
            (
                "value: 900m against 1 is not above",
                q("900m"),
                Target::Value(q("1")),
                0.1,
                false,
            ),
            (
                "value: 1.5 against 1000m is above",
                q("1.5"),
                Target::Value(q("1000m")),
                0.1,
                true,
            ),
            (
                "value: 2 against 1k is not above",
                q("2"),
                Target::Value(q("1k")),
                0.1,
                false,
            ),
            (
                "value: 1200 against 1k is above",
                q("1200"),
                Target::Value(q("1k")),
                0.1,
                true,
            ),
            (
                "average: 150m vs 100m",
                150,
                Target::AverageValue(100),
                0.1,
                true,
            ),
            (
                "average: 105m vs 100m",
                105,
                Target::AverageValue(100),
                0.1,
                false,
            ),
            (
                "average: 50m vs 100m",
                50,
                Target::AverageValue(100),
                0.1,
                false,
            ),
            (
                "memory: 600Mi vs 512Mi",
                q("600Mi"),
                Target::AverageValue(q("512Mi")),
                0.1,
                true,
            ),
            (
                "memory: 550Mi vs 512Mi",
                q("550Mi"),
                Target::AverageValue(q("512Mi")),
                0.1,
                false,
            ),
            (
                "huge values fall back to floats",
                i128::MAX / 2,
                Target::Value(i128::MAX / 4),
                0.1,
                true,
            ),
            (
                "huge values fall back to floats, below",
                i128::MAX / 4,
                Target::Value(i128::MAX / 2),
                0.1,
                false,
            ),
            ("zero target degenerates", 1, Target::Value(0), 0.1, true),
            ("zero target, zero current", 0, Target::Value(0), 0.1, false),
        ];
        for (what, current, target, tolerance, want) in cases {
            assert_eq!(is_above(*current, target, *tolerance), *want, "{what}");
        }
    }

    #[test]
    fn targets_from_the_api() {
        let t =
            |type_: &str, util: Option<i32>, avg: Option<&str>, value: Option<&str>| MetricTarget {
                type_: type_.into(),
                average_utilization: util,
                average_value: avg.map(|s| Quantity(s.into())),
                value: value.map(|s| Quantity(s.into())),
            };
        let cases = [
            (
                t("Utilization", Some(80), None, None),
                Some(Target::Utilization(80)),
            ),
            (
                t("AverageValue", None, Some("100m"), None),
                Some(Target::AverageValue(100)),
            ),
            (
                t("Value", None, None, Some("1k")),
                Some(Target::Value(1_000_000)),
            ),
            (t("Utilization", None, Some("1"), None), None),
            (t("Value", None, Some("1"), None), None),
            (t("Value", None, None, Some("lots")), None),
            (t("Percent", Some(1), None, None), None),
        ];
        for (input, want) in cases {
            assert_eq!(Target::from_metric_target(&input).ok(), want, "{input:?}");
        }
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| (*v).to_owned()).collect())
            },
        }
    }

    fn sel(labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: if labels.is_empty() {
                None
            } else {
                Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<BTreeMap<_, _>>(),
                )
            },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        }
    }

    #[test]
    fn promql() {
        let cases: Vec<(&str, Option<LabelSelector>, &str)> = vec![
            ("http_requests", None, "http_requests"),
            ("http_requests", Some(sel(&[], vec![])), "http_requests"),
            (
                "ns:rate5m",
                Some(sel(&[("a", "x")], vec![])),
                r#"ns:rate5m{a="x"}"#,
            ),
            // Earlier defect: several labels were malformed.
            (
                "m",
                Some(sel(&[("b", "2"), ("a", "1"), ("c", "3")], vec![])),
                r#"m{a="1",b="2",c="3"}"#,
            ),
            (
                "m",
                Some(sel(
                    &[("a", "x")],
                    vec![req("b", "In", &["z", "y"]), req("c", "NotIn", &["w"])],
                )),
                r#"m{a="x",b=~"y|z",c!="w"}"#,
            ),
            (
                "m",
                Some(sel(
                    &[],
                    vec![
                        req("e", "DoesNotExist", &[]),
                        req("d", "Exists", &[]),
                        req("c", "NotIn", &["v2", "v1"]),
                        req("b", "In", &["only"]),
                    ],
                )),
                r#"m{b="only",c!~"v1|v2",d!="",e=""}"#,
            ),
            (
                "m",
                Some(sel(&[], vec![req("a", "In", &["x", "x", "y"])])),
                r#"m{a=~"x|y"}"#,
            ),
            (
                "m",
                Some(sel(&[("a", "x")], vec![req("a", "In", &["x"])])),
                r#"m{a="x"}"#,
            ),
            (
                "m",
                Some(sel(&[("a", r#"say "hi" \o/"#)], vec![])),
                r#"m{a="say \"hi\" \\o/"}"#,
            ),
            (
                "m",
                Some(sel(&[], vec![req("v", "In", &["1.0", "a|b", r#"q"x"#])])),
                r#"m{v=~"1\\.0|a\\|b|q\"x"}"#,
            ),
            (
                "m",
                Some(sel(&[("a", "line\nbreak")], vec![])),
                r#"m{a="line\nbreak"}"#,
            ),
        ];
        for (name, selector, want) in cases {
            assert_eq!(
                promql_for_metric(name, selector.as_ref()).as_deref(),
                Ok(want)
            );
        }
    }

    #[test]
    fn promql_errors() {
        let cases: Vec<(&str, LabelSelector, &str)> = vec![
            ("1bad", sel(&[], vec![]), "1bad"),
            ("has-dash", sel(&[], vec![]), "has-dash"),
            ("", sel(&[], vec![]), "metric name"),
            (
                "m",
                sel(&[("app.kubernetes.io/name", "x")], vec![]),
                "app.kubernetes.io/name",
            ),
            (
                "m",
                sel(&[], vec![req("bad-key", "Exists", &[])]),
                "bad-key",
            ),
            (
                "m",
                sel(&[], vec![req("a", "In", &[])]),
                "at least one value",
            ),
            (
                "m",
                sel(&[], vec![req("a", "NotIn", &[])]),
                "at least one value",
            ),
            ("m", sel(&[], vec![req("a", "Exists", &["x"])]), "no values"),
            ("m", sel(&[], vec![req("a", "Gt", &["1"])]), "\"Gt\""),
        ];
        for (name, selector, needle) in cases {
            match promql_for_metric(name, Some(&selector)) {
                Err(e) => assert!(e.to_string().contains(needle), "{e} lacks {needle}"),
                Ok(q) => panic!("{name} {selector:?} rendered {q}"),
            }
        }
    }

    #[test]
    fn prometheus_answers() {
        let vector = |values: &[&str]| {
            json!({"status": "success", "data": {"resultType": "vector", "result":
                values.iter().map(|v| json!({"metric": {}, "value": [1_700_000_000.5, v]})).collect::<Vec<_>>()}})
        };
        let ok: Vec<(serde_json::Value, f64)> = vec![
            (vector(&["42"]), 42.0),
            (vector(&["0.25"]), 0.25),
            (vector(&["1e+06"]), 1e6),
            // Earlier defect: scalar results failed.
            (
                json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3.5"]}}),
                3.5,
            ),
            (json!({"resultType": "scalar", "result": [1.0, "7"]}), 7.0),
            (
                json!({"resultType": "vector", "result": [{"metric": {"a": "b"}, "value": [1, 2.5]}]}),
                2.5,
            ),
        ];
        for (input, want) in ok {
            assert_eq!(parse_prometheus_instant(&input), Ok(want), "{input}");
        }
        let err: Vec<(serde_json::Value, &str)> = vec![
            (vector(&[]), "no data"),
            (vector(&["1", "2", "3"]), "returned 3 series"),
            (vector(&["NaN"]), "not a finite"),
            (vector(&["+Inf"]), "not a finite"),
            (vector(&["-Inf"]), "not a finite"),
            (vector(&["many"]), "\"many\""),
            (
                json!({"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}),
                "bad_data: parse error at char 3",
            ),
            (
                json!({"status": "success", "data": {"resultType": "matrix", "result": []}}),
                "\"matrix\"",
            ),
            (json!({"status": "success"}), "no \"data\""),
            (json!({"resultType": "scalar"}), "no \"result\""),
            (
                json!({"resultType": "scalar", "result": "3"}),
                "[timestamp, value]",
            ),
            (
                json!({"resultType": "vector", "result": [{"metric": {}}]}),
                "without \"value\"",
            ),
            (json!([]), "resultType"),
        ];
        for (input, needle) in err {
            match parse_prometheus_instant(&input) {
                Err(e) => assert!(e.to_string().contains(needle), "{e} lacks {needle}"),
                Ok(v) => panic!("{input} parsed as {v}"),
            }
        }
    }
}
