//! The Horizontal Pod Autoscaler's arithmetic, done right.
//!
//! The controller fetches raw numbers (metrics.k8s.io, the custom and external metrics APIs,
//! Prometheus) and hands them to the pure functions here, which turn them into "is this metric
//! above its target?". Nothing in this module performs I/O, so every rule is pinned by
//! table-driven unit tests, including the defects of the earlier product:
//!
//! - CPU utilization was divided by the replica count a second time ([`resource_utilization`]
//!   does not);
//! - `Value`/`AverageValue` targets were compared inverted and off by 1000x (everything here is
//!   in the same milli-units, and [`is_above`] computes `current / target`);
//! - pods without requests caused a division by zero ([`resource_utilization`] reports them and
//!   errors out only when no pod has a request);
//! - Prometheus queries with several labels were malformed and scalar results failed
//!   ([`promql_for_metric`], [`parse_prometheus_instant`]).
//!
//! Units: quantities are integers in milli-units (`"250m"` is 250, `"1"` is 1000, `"1Ki"` is
//! 1_024_000). Utilization is in whole percent, as the HPA computes it.

use std::fmt::Write as _;

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
    /// No pod declares a request for the resource, so utilization is undefined (the HPA
    /// refuses too). The pods are named so the user knows which ones to fix.
    #[error("no pod has a resource request, utilization is undefined; pods without a request: {}", .pods.join(", "))]
    NoRequests {
        /// The pods without a (positive) request.
        pods: Vec<String>,
    },
    /// Pods have requests but none of them has a usage sample yet.
    #[error("no usage sample for any pod with a request; pods without usage: {}", .pods.join(", "))]
    NoUsage {
        /// The pods with a request but without usage.
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
/// a suffix: binary (`Ki` `Mi` `Gi` `Ti` `Pi` `Ei`), decimal (`m`, none, `k` `M` `G` `T` `P`
/// `E`) or a decimal exponent (`e3`, `E-2`, `e+6`). `"1E"` is one exa, `"1E3"` is 1000.
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

/// One pod's (or, for `ContainerResource`, one container's) resource usage and request, in
/// milli-units (millicores for CPU, milli-bytes for memory, as Kubernetes quantities are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSample {
    /// The pod's name, used in reports and errors.
    pub name: String,
    /// Current usage from metrics.k8s.io, `None` when the pod has no sample yet.
    pub usage_milli: Option<i128>,
    /// The sum of the containers' requests for the resource, `None` when any container lacks
    /// one (a partial request would inflate utilization).
    pub request_milli: Option<i128>,
}

/// The result of [`resource_utilization`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UtilizationResult {
    /// `Σ usage * 100 / Σ requests` over the counted pods, truncated to whole percent as the
    /// HPA does (saturating at `i32::MAX`). Compare with [`Target::Utilization`].
    pub percent: i32,
    /// `Σ usage / counted pods` in milli-units (the HPA's "raw" value), for status.
    pub average_usage_milli: i128,
    /// Σ usage over the counted pods.
    pub usage_milli: i128,
    /// Σ requests over the counted pods.
    pub request_milli: i128,
    /// How many pods had both a usage sample and a request.
    pub pods_counted: usize,
    /// Pods left out because they have no (or a non-positive) request, in input order.
    pub missing_request: Vec<String>,
    /// Pods left out because they have a request but no (valid) usage sample, in input order.
    pub missing_usage: Vec<String>,
}

/// The HPA's formula for `Resource` and `ContainerResource` metrics with a `Utilization`
/// target: `Σ usage / Σ requests × 100`, both sums over the *same* pods, those that have a
/// usage sample and a positive request.
///
/// This is already an average over the pods: it is not divided by the replica count again
/// (the earlier product did, reporting 4 pods at 80% as 20%). Pods without a request are left
/// out and listed; if no pod has one the result is an error naming them, never a division by
/// zero. Pods without usage (or with a negative one) are left out and listed; their request is
/// not counted either, or missing samples would pull utilization down.
pub fn resource_utilization(pods: &[PodSample]) -> Result<UtilizationResult, MetricError> {
    if pods.is_empty() {
        return Err(MetricError::NoPods);
    }
    let mut missing_request = Vec::new();
    let mut missing_usage = Vec::new();
    let (mut usage_total, mut request_total, mut counted) = (0i128, 0i128, 0usize);
    for pod in pods {
        let request = match pod.request_milli {
            Some(r) if r > 0 => r,
            _ => {
                missing_request.push(pod.name.clone());
                continue;
            }
        };
        let usage = match pod.usage_milli {
            Some(u) if u >= 0 => u,
            _ => {
                missing_usage.push(pod.name.clone());
                continue;
            }
        };
        usage_total = usage_total
            .checked_add(usage)
            .ok_or(MetricError::Overflow {
                what: "the sum of usage",
            })?;
        request_total = request_total
            .checked_add(request)
            .ok_or(MetricError::Overflow {
                what: "the sum of requests",
            })?;
        counted += 1;
    }
    if counted == 0 {
        return Err(if missing_usage.is_empty() {
            MetricError::NoRequests {
                pods: missing_request,
            }
        } else {
            MetricError::NoUsage {
                pods: missing_usage,
            }
        });
    }
    let percent = usage_total.checked_mul(100).ok_or(MetricError::Overflow {
        what: "utilization",
    })? / request_total;
    Ok(UtilizationResult {
        percent: i32::try_from(percent).unwrap_or(i32::MAX),
        average_usage_milli: average_value(usage_total, counted)?,
        usage_milli: usage_total,
        request_milli: request_total,
        pods_counted: counted,
        missing_request,
        missing_usage,
    })
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

/// Whether `current` is above `target` beyond the tolerance: `current / target > 1 + tolerance`
/// (the HPA's rule; [`DEFAULT_TOLERANCE`] is 0.1, so 100 against a target of 90 is above,
/// 99 is not).
///
/// `current` is in the target's units: whole percent for [`Target::Utilization`], milli-units
/// for [`Target::AverageValue`] (per-pod average) and [`Target::Value`] (total). The ratio is
/// `current / target`, never the inverse (an earlier defect).
///
/// The comparison is exact at the boundary: the tolerance is taken in parts per million and
/// compared in integers, so 110 against 100 with tolerance 0.1 is *not* above (floating point
/// says `1.1 - 1.0 > 0.1`). A negative or NaN tolerance counts as 0. A target of zero or less
/// cannot be used as a ratio (the API rejects it); it degenerates to `current > target`.
pub fn is_above(current: i128, target: &Target, tolerance: f64) -> bool {
    let target = target.amount();
    if target <= 0 {
        return current > target;
    }
    let tolerance = if tolerance.is_finite() && tolerance > 0.0 {
        tolerance.min(1e12)
    } else {
        0.0
    };
    #[allow(clippy::cast_possible_truncation)]
    let tolerance_ppm = (tolerance * 1e6).round() as i128;
    let exact = current.checked_mul(1_000_000).and_then(|lhs| {
        target
            .checked_mul(1_000_000 + tolerance_ppm)
            .map(|rhs| lhs > rhs)
    });
    #[allow(clippy::cast_precision_loss)]
    exact.unwrap_or_else(|| current as f64 / target as f64 > 1.0 + tolerance)
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

    fn pod(name: &str, usage: Option<i128>, request: Option<i128>) -> PodSample {
        PodSample {
            name: name.into(),
            usage_milli: usage,
            request_milli: request,
        }
    }

    #[test]
    fn utilization() {
        struct Case {
            what: &'static str,
            pods: Vec<PodSample>,
            percent: i32,
            counted: usize,
            missing_request: &'static [&'static str],
            missing_usage: &'static [&'static str],
        }
        let cases = [
            Case {
                // Earlier defect: 4 pods at 80% each were reported as 80 / 4 = 20%.
                what: "not divided by the replica count again",
                pods: (0..4)
                    .map(|i| pod(&format!("p{i}"), Some(400), Some(500)))
                    .collect(),
                percent: 80,
                counted: 4,
                missing_request: &[],
                missing_usage: &[],
            },
            Case {
                what: "sum over sum, not mean of ratios",
                pods: vec![
                    pod("a", Some(100), Some(100)),
                    pod("b", Some(100), Some(300)),
                ],
                percent: 50, // 200 / 400, the mean of ratios would be 66
                counted: 2,
                missing_request: &[],
                missing_usage: &[],
            },
            Case {
                what: "above 100%",
                pods: vec![pod("a", Some(750), Some(250))],
                percent: 300,
                counted: 1,
                missing_request: &[],
                missing_usage: &[],
            },
            Case {
                what: "truncated like the HPA",
                pods: vec![pod("a", Some(999), Some(1000))],
                percent: 99,
                counted: 1,
                missing_request: &[],
                missing_usage: &[],
            },
            Case {
                what: "pod without request left out of both sums and reported",
                pods: vec![pod("a", Some(500), Some(1000)), pod("b", Some(900), None)],
                percent: 50,
                counted: 1,
                missing_request: &["b"],
                missing_usage: &[],
            },
            Case {
                what: "zero request counts as missing (no division by zero)",
                pods: vec![
                    pod("a", Some(500), Some(1000)),
                    pod("b", Some(900), Some(0)),
                ],
                percent: 50,
                counted: 1,
                missing_request: &["b"],
                missing_usage: &[],
            },
            Case {
                what: "pod without usage: its request is not counted either",
                pods: vec![
                    pod("a", Some(800), Some(1000)),
                    pod("b", None, Some(1000)),
                    pod("c", Some(-5), Some(1000)),
                ],
                percent: 80, // not 800 / 3000 = 26
                counted: 1,
                missing_request: &[],
                missing_usage: &["b", "c"],
            },
            Case {
                what: "pod missing both is reported once, as missing its request",
                pods: vec![pod("a", Some(10), Some(100)), pod("b", None, None)],
                percent: 10,
                counted: 1,
                missing_request: &["b"],
                missing_usage: &[],
            },
        ];
        for c in cases {
            let r = resource_utilization(&c.pods).unwrap_or_else(|e| panic!("{}: {e}", c.what));
            assert_eq!(r.percent, c.percent, "{}", c.what);
            assert_eq!(r.pods_counted, c.counted, "{}", c.what);
            assert_eq!(r.missing_request, c.missing_request, "{}", c.what);
            assert_eq!(r.missing_usage, c.missing_usage, "{}", c.what);
        }
        let r = resource_utilization(&[
            pod("a", Some(300), Some(400)),
            pod("b", Some(100), Some(400)),
        ]);
        assert_eq!(
            r.map(|r| (r.usage_milli, r.request_milli, r.average_usage_milli)),
            Ok((400, 800, 200))
        );
    }

    #[test]
    fn utilization_errors() {
        let cases: Vec<(Vec<PodSample>, MetricError)> = vec![
            (vec![], MetricError::NoPods),
            (
                vec![pod("a", Some(1), None), pod("b", Some(1), Some(0))],
                MetricError::NoRequests {
                    pods: vec!["a".into(), "b".into()],
                },
            ),
            (
                vec![pod("a", None, Some(100)), pod("b", Some(1), None)],
                MetricError::NoUsage {
                    pods: vec!["a".into()],
                },
            ),
        ];
        for (pods, want) in cases {
            assert_eq!(resource_utilization(&pods), Err(want));
        }
        let msg = MetricError::NoRequests {
            pods: vec!["web-1".into(), "web-2".into()],
        }
        .to_string();
        assert!(msg.contains("web-1, web-2"), "{msg}");
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
