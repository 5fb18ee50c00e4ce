//! Where metric values come from. Today: Prometheus instant queries for `External` metrics (the
//! metric name plus its label selector, rendered as PromQL). The other sources (metrics.k8s.io,
//! custom and external metrics APIs) are not collected yet and report so.
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use k8s_openapi::api::autoscaling::v2::MetricSpec;

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

/// One metric of a ModelDeployment: its reading for the decision and its value for status.
pub async fn evaluate(
    spec: &MetricSpec,
    prometheus: Option<&Prometheus>,
) -> (MetricReading, MetricValue) {
    let mut value = MetricValue {
        name: name(spec),
        ..MetricValue::default()
    };
    let result = match (spec.type_.as_str(), spec.external.as_ref()) {
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
