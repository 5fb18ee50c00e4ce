//! Where metric values come from:
//! - `Resource` and `ContainerResource`: metrics.k8s.io (metrics-server), the pods' usage against
//!   their requests with the HPA's arithmetic, over the workload's running pods;
//! - `External`: Prometheus instant queries (the metric name plus its label selector, rendered
//!   as PromQL).
//!
//! The custom and external metrics APIs (`Pods`, `Object`) are not collected yet and report so.
use std::time::Duration;

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
}

/// What [`evaluate`] reads from.
pub struct Sources<'a> {
    pub client: &'a kube::Client,
    pub prometheus: Option<&'a Prometheus>,
    /// `None` when the workload was not found.
    pub pods: Option<WorkloadPods<'a>>,
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
        ("External", Some(external)) => match prometheus {
            None => Err(
                "External metrics are read from Prometheus: start the controller with \
                         --prometheus-url"
                    .to_string(),
            ),
            Some(p) => external_from_prometheus(external, p, &mut value).await,
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

/// How long one call to the metrics APIs may take.
const METRICS_API_TIMEOUT: Duration = Duration::from_secs(3);

/// metrics.k8s.io's PodMetrics (served by metrics-server).
fn pod_metrics_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("metrics.k8s.io", "v1beta1", "PodMetrics"),
        "pods",
    )
}

/// `Resource` / `ContainerResource`: the workload's running pods, their requests for `resource`
/// (from the pod specs) and their usage (from metrics.k8s.io), compared as the HPA does.
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
    let lp = ListParams::default().labels(scope.selector);
    // Bounded: an APIService that answers 503 (metrics-server still starting) would otherwise
    // be retried for minutes inside the client, holding this model's reconcile, and so its
    // failover, hostage.
    let pods = tokio::time::timeout(
        METRICS_API_TIMEOUT,
        Api::<Pod>::namespaced(sources.client.clone(), scope.namespace).list(&lp),
    )
    .await
    .map_err(|_| format!("listing the workload's pods took over {METRICS_API_TIMEOUT:?}"))?
    .map_err(|e| format!("listing the workload's pods: {e}"))?;
    let unavailable = |why: String| {
        format!(
            "metrics.k8s.io is unavailable ({why}); install metrics-server (Helm: \
             --set installMetricServer=true)"
        )
    };
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
    let wanted = |name: &str| container.is_none_or(|c| c == name);
    let mut usage = std::collections::HashMap::new();
    for m in &metrics.items {
        let Some(pod) = m.metadata.name.clone() else {
            continue;
        };
        let mut total: Option<i128> = None;
        for c in m.data["containers"].as_array().into_iter().flatten() {
            if !wanted(c["name"].as_str().unwrap_or_default()) {
                continue;
            }
            if let Some(q) = c["usage"][resource].as_str() {
                let milli = metric_math::parse_quantity_milli(q)
                    .map_err(|e| format!("pod {pod} usage of {resource}: {e}"))?;
                total = Some(total.unwrap_or(0) + milli);
            }
        }
        usage.insert(pod, total);
    }
    let mut samples = Vec::new();
    for pod in &pods.items {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if !running || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let containers: Vec<_> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .filter(|c| wanted(&c.name))
            .collect();
        if let Some(c) = container
            && containers.is_empty()
        {
            return Err(format!("pod {name} has no container named {c}"));
        }
        // A partial request would inflate utilization: any container without one voids it.
        let mut request: Option<i128> = Some(0);
        for c in &containers {
            let q = c
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get(resource));
            request = match (request, q) {
                (Some(sum), Some(q)) => {
                    Some(sum + metric_math::quantity_milli(q).map_err(|e| e.to_string())?)
                }
                _ => None,
            };
        }
        samples.push(metric_math::PodSample {
            usage_milli: usage.get(&name).copied().flatten(),
            request_milli: request,
            name,
        });
    }
    match target {
        Target::Utilization(percent) => {
            let r = metric_math::resource_utilization(&samples).map_err(|e| e.to_string())?;
            value.current = Some(format!("{}%", r.percent));
            value.target = Some(format!("{percent}%"));
            let mut left_out = Vec::new();
            if !r.missing_request.is_empty() {
                left_out.push(format!(
                    "pods without a {resource} request: {}",
                    r.missing_request.join(", ")
                ));
            }
            if !r.missing_usage.is_empty() {
                left_out.push(format!(
                    "pods without usage yet: {}",
                    r.missing_usage.join(", ")
                ));
            }
            if !left_out.is_empty() {
                value.error = Some(format!("left out: {}", left_out.join("; ")));
            }
            Ok(metric_math::is_above(
                i128::from(r.percent),
                &target,
                metric_math::DEFAULT_TOLERANCE,
            ))
        }
        _ => {
            let measured: Vec<i128> = samples.iter().filter_map(|s| s.usage_milli).collect();
            let average = metric_math::average_value(measured.iter().sum(), measured.len())
                .map_err(|e| e.to_string())?;
            value.current = Some(format_milli(average));
            value.target = Some(format_milli(target.amount()));
            Ok(metric_math::is_above(
                average,
                &target,
                metric_math::DEFAULT_TOLERANCE,
            ))
        }
    }
}

async fn external_from_prometheus(
    external: &k8s_openapi::api::autoscaling::v2::ExternalMetricSource,
    prometheus: &Prometheus,
    value: &mut MetricValue,
) -> Result<bool, String> {
    let target = Target::from_metric_target(&external.target).map_err(|e| e.to_string())?;
    if matches!(target, Target::AverageValue(_)) {
        // The HPA divides an External metric by the current replica count for AverageValue.
        return Err(
            "AverageValue targets of External metrics are not supported yet; use Value".into(),
        );
    }
    let query =
        metric_math::promql_for_metric(&external.metric.name, external.metric.selector.as_ref())
            .map_err(|e| e.to_string())?;
    let current = prometheus.instant(&query).await?;
    let current_milli = metric_math::f64_to_milli(current).map_err(|e| e.to_string())?;
    value.current = Some(format_number(current));
    value.target = Some(format_milli(target.amount()));
    Ok(metric_math::is_above(
        current_milli,
        &target,
        metric_math::DEFAULT_TOLERANCE,
    ))
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

fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
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
        assert_eq!(format_number(5.0), "5");
        assert_eq!(format_number(0.25), "0.25");
        assert_eq!(format_milli(10_000), "10");
        assert_eq!(format_milli(250), "250m");
    }

    #[test]
    fn only_plain_http_urls() {
        assert!(Prometheus::new("http://prometheus.monitoring:9090").is_ok());
        assert!(Prometheus::new("https://p:9090").is_err());
        assert!(Prometheus::new("p:9090").is_err());
    }
}
