//! Where metric values come from:
//! - `Resource` and `ContainerResource`: metrics.k8s.io (metrics-server), the pods' usage against
//!   their requests with the HPA's arithmetic, over the workload's running pods;
//! - `Pods` and `Object`: custom.metrics.k8s.io (an adapter such as prometheus-adapter);
//! - `External`: Prometheus instant queries when `prometheusUrl` is set (the metric name plus its
//!   label selector, rendered as PromQL), else external.metrics.k8s.io.
//!
//! As the HPA: `Resource`, `ContainerResource` and `Pods` metrics go through the HPA's rules for
//! which pods count ([`metric_math::pod_metric_verdict`]: missing, unready and young pods), and
//! the metric is above its target when the HPA would scale up; `AverageValue` of an `Object` or
//! `External` metric is its value divided by the workload's current (ready) replicas.
use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use k8s_openapi::api::{
    autoscaling::v2::{MetricSpec, MetricTarget},
    core::v1::Pod,
};
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};

use beamlit_api::MetricValue;

use crate::{
    decision::MetricReading,
    metric_math::{self, Target},
};

/// An in-cluster Prometheus, reached over plain HTTP (as in-cluster Prometheus usually is).
pub struct Prometheus {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl Prometheus {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        let uri: http::Uri = base
            .parse()
            .map_err(|e| anyhow::anyhow!("--prometheus-url `{url}`: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            anyhow::bail!("--prometheus-url `{url}` must be http://host:port");
        }
        Ok(Self {
            base,
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout: Duration::from_secs(5),
        })
    }

    /// The value of an instant query: exactly one series, or a scalar.
    pub async fn instant(&self, query: &str) -> Result<f64, String> {
        let encoded: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .finish();
        let uri: http::Uri = format!("{}/api/v1/query?{encoded}", self.base)
            .parse()
            .map_err(|e| format!("query URL: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .get(uri)
                .await
                .map_err(|e| format!("Prometheus at {} unreachable: {e}", self.base))?;
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading Prometheus' answer: {e}"))?
                .to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body)
                .map_err(|e| format!("Prometheus answered something that is not JSON: {e}"))
        };
        let json = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                format!(
                    "Prometheus at {} gave no answer within {:?}",
                    self.base, self.timeout
                )
            })??;
        metric_math::parse_prometheus_instant(&json).map_err(|e| format!("`{query}`: {e}"))
    }
}

/// The pods a ModelDeployment's metrics are computed over: the workload's, by its selector.
pub struct WorkloadPods<'a> {
    pub namespace: &'a str,
    /// The workload's label selector, rendered (`app=x,tier in (a,b)`).
    pub selector: &'a str,
    /// Ready replicas now, for `AverageValue` of `Object` and `External` metrics.
    pub replicas: i32,
}

/// What [`evaluate`] reads from.
pub struct Sources<'a> {
    pub client: &'a kube::Client,
    pub prometheus: Option<&'a Prometheus>,
    /// `None` when the workload was not found.
    pub pods: Option<WorkloadPods<'a>>,
    /// The ModelDeployment's namespace (where `Object` and `External` metrics are asked).
    pub namespace: &'a str,
}

/// One metric of a ModelDeployment: its reading for the decision and its value for status.
pub async fn evaluate(spec: &MetricSpec, sources: &Sources<'_>) -> (MetricReading, MetricValue) {
    let mut value = MetricValue {
        name: name(spec),
        ..MetricValue::default()
    };
    let prometheus = sources.prometheus;
    let result = match (spec.type_.as_str(), spec.external.as_ref()) {
        ("Resource", _) => match &spec.resource {
            Some(r) => resource(sources, &r.name, None, &r.target, &mut value).await,
            None => Err("type Resource requires resource".into()),
        },
        ("ContainerResource", _) => match &spec.container_resource {
            Some(r) => resource(sources, &r.name, Some(&r.container), &r.target, &mut value).await,
            None => Err("type ContainerResource requires containerResource".into()),
        },
        ("Pods", _) => match &spec.pods {
            Some(p) => custom_pods(sources, p, &mut value).await,
            None => Err("type Pods requires pods".into()),
        },
        ("Object", _) => match &spec.object {
            Some(o) => custom_object(sources, o, &mut value).await,
            None => Err("type Object requires object".into()),
        },
        ("External", Some(external)) => match prometheus {
            None => external_from_api(sources, external, &mut value).await,
            Some(p) => external_from_prometheus(sources, external, p, &mut value).await,
        },
        (other, _) => Err(format!(
            "{other} metrics are not collected by this controller version yet"
        )),
    };
    match result {
        Ok(above) => {
            value.above = above;
            (MetricReading::compared(above), value)
        }
        Err(why) => {
            value.error = Some(why.clone());
            (MetricReading::unavailable(why), value)
        }
    }
}

/// A metric left unread, and why (see the caller: no ready endpoint to measure).
pub fn not_read(spec: &MetricSpec, why: &str) -> (MetricReading, MetricValue) {
    let value = MetricValue {
        name: name(spec),
        error: Some(why.to_string()),
        ..MetricValue::default()
    };
    (MetricReading::unavailable(why), value)
}

/// How long one call to the metrics APIs may take.
const METRICS_API_TIMEOUT: Duration = Duration::from_secs(3);

/// metrics.k8s.io's PodMetrics (served by metrics-server).
fn pod_metrics_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("metrics.k8s.io", "v1beta1", "PodMetrics"),
        "pods",
    )
}

/// The workload's pods, all of them (the HPA's pod lister by the scale's selector): the HPA's
/// rules decide which count, not the list.
async fn workload_pods(
    scope: &WorkloadPods<'_>,
    client: &kube::Client,
) -> Result<Vec<Pod>, String> {
    let lp = ListParams::default().labels(scope.selector);
    // Bounded: an APIService that answers 503 (metrics-server still starting) would otherwise
    // be retried for minutes inside the client, holding this model's reconcile, and so its
    // failover, hostage.
    let pods = tokio::time::timeout(
        METRICS_API_TIMEOUT,
        Api::<Pod>::namespaced(client.clone(), scope.namespace).list(&lp),
    )
    .await
    .map_err(|_| format!("listing the workload's pods took over {METRICS_API_TIMEOUT:?}"))?
    .map_err(|e| format!("listing the workload's pods: {e}"))?;
    if pods.items.is_empty() {
        return Err("the workload has no pods (as the HPA, nothing to compute)".into());
    }
    Ok(pods.items)
}

/// One PodMetrics' usage of `resource` as the HPA reads it (`getPodMetrics`,
/// `getContainerMetrics`): the sum over its containers, missing (`None`) if it lists none or any
/// lacks the resource; for a `ContainerResource`, that container's usage, missing if absent.
fn pod_metrics_usage(
    m: &DynamicObject,
    resource: &str,
    container: Option<&str>,
) -> Result<Option<metric_math::PodValue>, String> {
    let pod = m.metadata.name.as_deref().unwrap_or_default();
    let containers = m.data["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let usage = |c: &serde_json::Value| -> Result<Option<i128>, String> {
        c["usage"][resource]
            .as_str()
            .map(|q| {
                metric_math::parse_quantity_milli(q)
                    .map_err(|e| format!("PodMetrics {pod}: usage of {resource}: {e}"))
            })
            .transpose()
    };
    let value = match container {
        Some(wanted) => match containers.iter().find(|c| c["name"] == wanted) {
            Some(c) => usage(c)?,
            None => None,
        },
        None if containers.is_empty() => None,
        None => {
            let mut total = Some(0i128);
            for c in containers {
                total = match (total, usage(c)?) {
                    (Some(sum), Some(u)) => Some(sum + u),
                    _ => None,
                };
            }
            total
        }
    };
    let Some(value_milli) = value else {
        return Ok(None);
    };
    // Absent, they are Go's zero values to the HPA (a sample from long ago, over no window);
    // unreadable, the HPA cannot decode the list at all.
    let timestamp = match m.data["timestamp"].as_str() {
        None => Timestamp::MIN,
        Some(t) => t
            .parse::<Timestamp>()
            .map_err(|e| format!("PodMetrics {pod}: timestamp {t:?}: {e}"))?,
    };
    let window = match m.data["window"].as_str() {
        None => Duration::ZERO,
        Some(w) => metric_math::parse_go_duration(w)
            .ok_or_else(|| format!("PodMetrics {pod}: window {w:?} is not a duration"))?,
    };
    Ok(Some(metric_math::PodValue {
        value_milli,
        timestamp,
        window,
    }))
}

/// `Resource` / `ContainerResource`: the workload's pods, their requests for `resource` (from
/// the pod specs) and their usage (from metrics.k8s.io), through the HPA's rules.
async fn resource(
    sources: &Sources<'_>,
    resource: &str,
    container: Option<&str>,
    target: &MetricTarget,
    value: &mut MetricValue,
) -> Result<bool, String> {
    let target = Target::from_metric_target(target).map_err(|e| e.to_string())?;
    if matches!(target, Target::Value(_)) {
        return Err(format!(
            "a {resource} metric takes a Utilization or AverageValue target (as the HPA), not Value"
        ));
    }
    let scope = sources
        .pods
        .as_ref()
        .ok_or("the workload was not found, so its pods are unknown")?;
    let unavailable = |why: String| {
        format!(
            "metrics.k8s.io is unavailable ({why}); install metrics-server (Helm: \
             --set installMetricServer=true)"
        )
    };
    let lp = ListParams::default().labels(scope.selector);
    let metrics = tokio::time::timeout(
        METRICS_API_TIMEOUT,
        Api::<DynamicObject>::namespaced_with(
            sources.client.clone(),
            scope.namespace,
            &pod_metrics_resource(),
        )
        .list(&lp),
    )
    .await
    .map_err(|_| unavailable(format!("no answer within {METRICS_API_TIMEOUT:?}")))?
    .map_err(|e| unavailable(e.to_string()))?;
    if metrics.items.is_empty() {
        return Err(
            "no usage sample for any of the workload's pods yet (metrics.k8s.io has no PodMetrics \
             for them)"
                .into(),
        );
    }
    let pods = workload_pods(scope, sources.client).await?;
    let mut samples = BTreeMap::new();
    for m in &metrics.items {
        if let (Some(name), Some(sample)) = (
            m.metadata.name.clone(),
            pod_metrics_usage(m, resource, container)?,
        ) {
            samples.insert(name, sample);
        }
    }
    let states: Vec<_> = pods.iter().map(metric_math::pod_state).collect();
    let settings = metric_math::HpaSettings::default();
    let now = Timestamp::now();
    let cpu = resource == "cpu";
    let verdict = match target {
        Target::Utilization(percent) => {
            // As the HPA: every pod needs the request, or the metric is refused.
            let mut requests = BTreeMap::new();
            for pod in &pods {
                requests.insert(
                    pod.metadata.name.clone().unwrap_or_default(),
                    metric_math::pod_request_milli(pod, resource, container)?,
                );
            }
            let verdict = metric_math::pod_metric_verdict(
                &states,
                &samples,
                cpu,
                metric_math::PodTarget::Utilization {
                    percent,
                    requests: &requests,
                },
                &settings,
                now,
            )
            .map_err(|e| e.to_string())?;
            value.current = Some(format!("{}%", verdict.current));
            value.target = Some(format!("{percent}%"));
            value.message = verdict.explain(|p| format!("{p}%"));
            verdict
        }
        _ => {
            let verdict = metric_math::pod_metric_verdict(
                &states,
                &samples,
                cpu,
                metric_math::PodTarget::AverageValue(target.amount()),
                &settings,
                now,
            )
            .map_err(|e| e.to_string())?;
            value.current = Some(format_milli(verdict.current));
            value.target = Some(format_milli(target.amount()));
            value.message = verdict.explain(format_milli);
            verdict
        }
    };
    Ok(verdict.above())
}

async fn external_from_prometheus(
    sources: &Sources<'_>,
    external: &k8s_openapi::api::autoscaling::v2::ExternalMetricSource,
    prometheus: &Prometheus,
    value: &mut MetricValue,
) -> Result<bool, String> {
    let target = Target::from_metric_target(&external.target).map_err(|e| e.to_string())?;
    let query = prometheus_query(&external.metric)?;
    let current = prometheus.instant(&query).await?;
    let current_milli = metric_math::f64_to_milli(current).map_err(|e| e.to_string())?;
    compare_total(sources, current_milli, target, value)
}

/// The instant query of an External metric: its name rendered with its label selector, or, when
/// the name is not a plain metric name, the name itself as a full PromQL expression (which then
/// takes no selector: the query says it all).
fn prometheus_query(
    metric: &k8s_openapi::api::autoscaling::v2::MetricIdentifier,
) -> Result<String, String> {
    let selector = metric.selector.as_ref().filter(|s| {
        s.match_labels.as_ref().is_some_and(|m| !m.is_empty())
            || s.match_expressions.as_ref().is_some_and(|e| !e.is_empty())
    });
    if metric_math::is_metric_name(&metric.name) {
        return metric_math::promql_for_metric(&metric.name, selector).map_err(|e| e.to_string());
    }
    if selector.is_some() {
        return Err(format!(
            "`{}` is a full PromQL query, which takes no selector: put the label matchers in the \
             query, or use a plain metric name with the selector",
            metric.name
        ));
    }
    Ok(metric.name.clone())
}

/// A total (an `Object` or `External` metric) against its target: `Value` as it is,
/// `AverageValue` per ready replica of the workload (the HPA's rule).
fn compare_total(
    sources: &Sources<'_>,
    total_milli: i128,
    target: Target,
    value: &mut MetricValue,
) -> Result<bool, String> {
    let current = match target {
        Target::Value(_) => total_milli,
        Target::AverageValue(_) => {
            let replicas = sources
                .pods
                .as_ref()
                .map(|p| p.replicas)
                .ok_or("an AverageValue target needs the workload's replicas, and the workload was not found")?;
            metric_math::average_value(total_milli, usize::try_from(replicas).unwrap_or(0))
                .map_err(|e| format!("{e} (the workload has no ready replica)"))?
        }
        Target::Utilization(_) => {
            return Err("Utilization targets are for Resource metrics".into());
        }
    };
    Ok(compare(value, current, &target))
}

/// `current` (in the target's units) against `target`, with the HPA's tolerance; both go into
/// the metric's status.
fn compare(value: &mut MetricValue, current: i128, target: &Target) -> bool {
    value.current = Some(format_milli(current));
    value.target = Some(format_milli(target.amount()));
    metric_math::is_above(current, target, metric_math::DEFAULT_TOLERANCE)
}

/// GET on an aggregated metrics API through the API server, bounded in time.
async fn metrics_api_get(client: &kube::Client, path: &str) -> Result<serde_json::Value, String> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| format!("request {path}: {e}"))?;
    tokio::time::timeout(
        METRICS_API_TIMEOUT,
        client.request::<serde_json::Value>(request),
    )
    .await
    .map_err(|_| format!("{path}: no answer within {METRICS_API_TIMEOUT:?}"))?
    .map_err(|e| format!("{path}: {e}"))
}

fn selector_query(
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Result<Option<String>, String> {
    match selector {
        None => Ok(None),
        Some(s) => kube::core::Selector::try_from(s.clone())
            .map(|s| Some(s.to_string()).filter(|s| !s.is_empty()))
            .map_err(|e| format!("metric selector: {e}")),
    }
}

fn with_query(path: String, params: &[(&str, Option<String>)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (key, value) in params {
        if let Some(v) = value {
            query.append_pair(key, v);
            any = true;
        }
    }
    if any {
        format!("{path}?{}", query.finish())
    } else {
        path
    }
}

/// The values a metrics API answers at `path`, in milli-units; `api` names it in errors.
async fn read_values(client: &kube::Client, api: &str, path: &str) -> Result<Vec<i128>, String> {
    let list = metrics_api_get(client, path)
        .await
        .map_err(|e| unavailable_api(api, e))?;
    item_values(&list)
}

/// The values of a MetricValueList / ExternalMetricValueList, in milli-units.
fn item_values(list: &serde_json::Value) -> Result<Vec<i128>, String> {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| {
            let q = item["value"].as_str().ok_or("an item without a value")?;
            metric_math::parse_quantity_milli(q).map_err(|e| e.to_string())
        })
        .collect()
}

const CUSTOM_METRICS: &str = "/apis/custom.metrics.k8s.io/v1beta2";
const EXTERNAL_METRICS: &str = "/apis/external.metrics.k8s.io/v1beta1";

fn unavailable_api(api: &str, why: String) -> String {
    format!(
        "{api} is unavailable or has no such metric ({why}); install a metrics adapter (e.g. prometheus-adapter) that serves it"
    )
}

/// `Pods`: the metric of each of the workload's pods (custom.metrics.k8s.io), through the HPA's
/// rules for pod metrics (`calcPlainMetricReplicas`): failed and deleted pods left out, pending
/// pods and pods without a value counted at 0 on a scale-up, and at the target on a scale-down.
async fn custom_pods(
    sources: &Sources<'_>,
    pods: &k8s_openapi::api::autoscaling::v2::PodsMetricSource,
    value: &mut MetricValue,
) -> Result<bool, String> {
    let target = Target::from_metric_target(&pods.target).map_err(|e| e.to_string())?;
    if !matches!(target, Target::AverageValue(_)) {
        return Err("a Pods metric takes an AverageValue target (as the HPA)".into());
    }
    let scope = sources
        .pods
        .as_ref()
        .ok_or("the workload was not found, so its pods are unknown")?;
    let path = with_query(
        format!(
            "{CUSTOM_METRICS}/namespaces/{}/pods/*/{}",
            scope.namespace, pods.metric.name
        ),
        &[
            ("labelSelector", Some(scope.selector.to_string())),
            (
                "metricLabelSelector",
                selector_query(pods.metric.selector.as_ref())?,
            ),
        ],
    );
    let list = metrics_api_get(sources.client, &path)
        .await
        .map_err(|e| unavailable_api("custom.metrics.k8s.io", e))?;
    let now = Timestamp::now();
    let mut samples = BTreeMap::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let pod = item["describedObject"]["name"]
            .as_str()
            .ok_or("an item without describedObject.name")?;
        let q = item["value"].as_str().ok_or("an item without a value")?;
        let value_milli = metric_math::parse_quantity_milli(q).map_err(|e| e.to_string())?;
        // Timestamps matter only for CPU samples; the HPA's default window is one minute.
        let timestamp = item["timestamp"]
            .as_str()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .unwrap_or(now);
        samples.insert(
            pod.to_owned(),
            metric_math::PodValue {
                value_milli,
                timestamp,
                window: Duration::from_secs(60),
            },
        );
    }
    if samples.is_empty() {
        return Err(format!(
            "no pod reports {} (custom.metrics.k8s.io returned no items)",
            pods.metric.name
        ));
    }
    let states: Vec<_> = workload_pods(scope, sources.client)
        .await?
        .iter()
        .map(metric_math::pod_state)
        .collect();
    let verdict = metric_math::pod_metric_verdict(
        &states,
        &samples,
        false,
        metric_math::PodTarget::AverageValue(target.amount()),
        &metric_math::HpaSettings::default(),
        now,
    )
    .map_err(|e| e.to_string())?;
    value.current = Some(format_milli(verdict.current));
    value.target = Some(format_milli(target.amount()));
    value.message = verdict.explain(format_milli);
    Ok(verdict.above())
}

/// The custom metrics API's name for a kind: `deployments.apps`, `services`, `ingresses...`.
fn resource_of(api_version: Option<&str>, kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    let plural = if lower.ends_with('s') || lower.ends_with('x') || lower.ends_with("ch") {
        format!("{lower}es")
    } else if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else {
        format!("{lower}s")
    };
    match api_version.and_then(|v| v.split_once('/')) {
        Some((group, _)) => format!("{plural}.{group}"),
        None => plural,
    }
}

/// `Object`: one object's metric (`describedObject`, in the ModelDeployment's namespace).
async fn custom_object(
    sources: &Sources<'_>,
    object: &k8s_openapi::api::autoscaling::v2::ObjectMetricSource,
    value: &mut MetricValue,
) -> Result<bool, String> {
    let target = Target::from_metric_target(&object.target).map_err(|e| e.to_string())?;
    let described = &object.described_object;
    let path = with_query(
        format!(
            "{CUSTOM_METRICS}/namespaces/{}/{}/{}/{}",
            sources.namespace,
            resource_of(described.api_version.as_deref(), &described.kind),
            described.name,
            object.metric.name
        ),
        &[(
            "metricLabelSelector",
            selector_query(object.metric.selector.as_ref())?,
        )],
    );
    let values = read_values(sources.client, "custom.metrics.k8s.io", &path).await?;
    let total = values.first().copied().ok_or_else(|| {
        format!(
            "no value for {} of {} {}",
            object.metric.name, described.kind, described.name
        )
    })?;
    compare_total(sources, total, target, value)
}

/// `External` from external.metrics.k8s.io: the sum of the series the selector matches.
async fn external_from_api(
    sources: &Sources<'_>,
    external: &k8s_openapi::api::autoscaling::v2::ExternalMetricSource,
    value: &mut MetricValue,
) -> Result<bool, String> {
    let target = Target::from_metric_target(&external.target).map_err(|e| e.to_string())?;
    let path = with_query(
        format!(
            "{EXTERNAL_METRICS}/namespaces/{}/{}",
            sources.namespace, external.metric.name
        ),
        &[(
            "labelSelector",
            selector_query(external.metric.selector.as_ref())?,
        )],
    );
    let values = read_values(
        sources.client,
        "external.metrics.k8s.io (or set prometheusUrl)",
        &path,
    )
    .await?;
    if values.is_empty() {
        return Err(format!(
            "external.metrics.k8s.io has no series for {}",
            external.metric.name
        ));
    }
    compare_total(sources, values.iter().sum(), target, value)
}

fn name(m: &MetricSpec) -> String {
    m.resource
        .as_ref()
        .map(|r| r.name.clone())
        .or_else(|| m.container_resource.as_ref().map(|r| r.name.clone()))
        .or_else(|| m.pods.as_ref().map(|p| p.metric.name.clone()))
        .or_else(|| m.object.as_ref().map(|o| o.metric.name.clone()))
        .or_else(|| m.external.as_ref().map(|e| e.metric.name.clone()))
        .unwrap_or_else(|| m.type_.clone())
}

fn format_milli(milli: i128) -> String {
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_as_people_write_them() {
        assert_eq!(format_milli(10_000), "10");
        assert_eq!(format_milli(250), "250m");
    }

    #[test]
    fn prometheus_queries_from_a_name_and_selector_or_a_full_expression() {
        let metric = |yaml: &str| -> k8s_openapi::api::autoscaling::v2::MetricIdentifier {
            serde_saphyr::from_str(yaml).expect("test metric")
        };
        let cases = [
            (
                "{name: model_load, selector: {matchLabels: {model: php, tier: a}}}",
                Ok(r#"model_load{model="php",tier="a"}"#),
            ),
            ("{name: model_load}", Ok("model_load")),
            (
                "{name: 'sum(rate(http_requests_total{model=\"php\"}[1m]))'}",
                Ok(r#"sum(rate(http_requests_total{model="php"}[1m]))"#),
            ),
            (
                "{name: 'sum(x)', selector: {matchLabels: {a: b}}}",
                Err("takes no selector"),
            ),
        ];
        for (yaml, expected) in cases {
            match (prometheus_query(&metric(yaml)), expected) {
                (Ok(q), Ok(want)) => assert_eq!(q, want, "{yaml}"),
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{yaml}: {e}"),
                (got, want) => panic!("{yaml}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn custom_metrics_resource_names() {
        for (api_version, kind, expected) in [
            (Some("apps/v1"), "Deployment", "deployments.apps"),
            (Some("v1"), "Service", "services"),
            (
                Some("networking.k8s.io/v1"),
                "Ingress",
                "ingresses.networking.k8s.io",
            ),
            (None, "Pod", "pods"),
            (Some("example.com/v1"), "Policy", "policies.example.com"),
        ] {
            assert_eq!(resource_of(api_version, kind), expected, "{kind}");
        }
    }

    #[test]
    fn only_plain_http_urls() {
        assert!(Prometheus::new("http://prometheus.monitoring:9090").is_ok());
        assert!(Prometheus::new("https://p:9090").is_err());
        assert!(Prometheus::new("p:9090").is_err());
    }
}
