//! A metrics adapter the test controls, registered with the test API server as the aggregated
//! APIs `custom.metrics.k8s.io/v1beta2` and `external.metrics.k8s.io/v1beta1`, so that the
//! controller's requests take the production path (client → kube-apiserver → APIService →
//! adapter). It stands where prometheus-adapter would: a control-plane extension next to the
//! API server, on the machine's loopback (reached through an ExternalName Service named
//! `localhost`), serving HTTPS with a certificate from a test CA given to the APIService.
//!
//! Values are set by the test: per (namespace, metric) for pods, per object, and per external
//! metric. The last query string of each request is kept, to check selectors.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

use crate::{TestCa, TestDir, cluster::TestCluster};

#[derive(Default)]
struct Values {
    /// (namespace, metric) → pod → quantity.
    pods: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// (namespace, resource, name, metric) → quantity.
    objects: BTreeMap<(String, String, String, String), String>,
    /// (namespace, metric) → quantities of the series.
    external: BTreeMap<(String, String), Vec<String>>,
    /// path → last query string.
    queries: BTreeMap<String, String>,
}

pub struct MetricsAdapter {
    values: Arc<Mutex<Values>>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: TestDir,
}

const GROUPS: [(&str, &str); 2] = [
    ("custom.metrics.k8s.io", "v1beta2"),
    ("external.metrics.k8s.io", "v1beta1"),
];

impl MetricsAdapter {
    /// Starts the adapter and registers both APIs with `cluster` (cluster-scoped: give it a
    /// cluster of its own), waiting until the API server reports them Available.
    pub fn start(cluster: &TestCluster) -> Result<Self> {
        let dir = TestDir::new("metrics-adapter")?;
        let ca = TestCa::new(dir.path())?;
        // The API server checks the name of the Service the APIService points at.
        let (cert, key) = ca.issue_server_cert(
            &["adapter.metrics-adapter.svc", "localhost"],
            &["127.0.0.1".parse()?],
        )?;
        let tls = tls_acceptor(&cert, &key)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let values = Arc::new(Mutex::new(Values::default()));
        let shared = values.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (tls, values) = (tls.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let values = values.clone();
                        async move { Ok::<_, Infallible>(answer(&values, &req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let adapter = Self {
            values,
            runtime: Some(runtime),
            _dir: dir,
        };
        register(cluster, port, &ca.ca_pem())?;
        Ok(adapter)
    }

    pub fn set_pods(&self, namespace: &str, metric: &str, pods: &[(&str, &str)]) {
        if let Ok(mut v) = self.values.lock() {
            v.pods.insert(
                (namespace.into(), metric.into()),
                pods.iter()
                    .map(|(p, q)| (p.to_string(), q.to_string()))
                    .collect(),
            );
        }
    }

    /// `resource` as the custom metrics API names it (`services`, `deployments.apps`).
    pub fn set_object(&self, namespace: &str, resource: &str, name: &str, metric: &str, q: &str) {
        if let Ok(mut v) = self.values.lock() {
            v.objects.insert(
                (
                    namespace.into(),
                    resource.into(),
                    name.into(),
                    metric.into(),
                ),
                q.into(),
            );
        }
    }

    pub fn set_external(&self, namespace: &str, metric: &str, series: &[&str]) {
        if let Ok(mut v) = self.values.lock() {
            v.external.insert(
                (namespace.into(), metric.into()),
                series.iter().map(|s| s.to_string()).collect(),
            );
        }
    }

    /// The query string of the last request whose path ended with `suffix`.
    pub fn last_query(&self, suffix: &str) -> Option<String> {
        let v = self.values.lock().ok()?;
        v.queries
            .iter()
            .find(|(path, _)| path.ends_with(suffix))
            .map(|(_, q)| q.clone())
    }
}

impl Drop for MetricsAdapter {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The ExternalName Service and both APIServices; waits until they are Available.
fn register(cluster: &TestCluster, port: u16, ca_pem: &str) -> Result<()> {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: metrics-adapter}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: adapter, namespace: metrics-adapter}}\n\
         spec: {{type: ExternalName, externalName: localhost, ports: [{{port: {port}}}]}}\n"
    );
    for (group, version) in GROUPS {
        yaml.push_str(&format!(
            "---\napiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {{name: {version}.{group}}}\n\
             spec:\n  group: {group}\n  version: {version}\n  groupPriorityMinimum: 100\n  versionPriority: 100\n  \
             caBundle: {ca}\n  service: {{namespace: metrics-adapter, name: adapter, port: {port}}}\n"
        ));
    }
    cluster.kubectl_with_stdin(&["apply", "-f", "-"], Some(&yaml))?;
    for (group, version) in GROUPS {
        cluster
            .kubectl(&[
                "wait",
                "--for=condition=Available",
                "--timeout=60s",
                &format!("apiservice/{version}.{group}"),
            ])
            .with_context(|| format!("the API server never reached the adapter for {group}"))?;
    }
    Ok(())
}

fn answer(values: &Mutex<Values>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    // Clients may send the pods wildcard percent-encoded.
    let path = req.uri().path().replace("%2A", "*").replace("%2a", "*");
    let query = req.uri().query().unwrap_or_default().to_string();
    let body = match values.lock() {
        Ok(mut v) => {
            v.queries.insert(path.clone(), query);
            route(&v, &path)
        }
        Err(_) => Err(anyhow!("adapter state poisoned")),
    };
    let (status, body) = match body {
        Ok(b) => (200, b),
        Err(e) => (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "message": e.to_string()}),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn route(v: &Values, path: &str) -> Result<Value> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["apis", group, version] => Ok(json!({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": format!("{group}/{version}"), "resources": []
        })),
        [
            "apis",
            "custom.metrics.k8s.io",
            "v1beta2",
            "namespaces",
            ns,
            "pods",
            "*",
            metric,
        ] => {
            let pods = v
                .pods
                .get(&(ns.to_string(), metric.to_string()))
                .ok_or_else(|| anyhow!("no pods metric {metric} in {ns}"))?;
            let items: Vec<Value> = pods
                .iter()
                .map(|(pod, q)| metric_value(ns, "Pod", "v1", pod, metric, q))
                .collect();
            Ok(
                json!({"kind": "MetricValueList", "apiVersion": "custom.metrics.k8s.io/v1beta2", "metadata": {}, "items": items}),
            )
        }
        [
            "apis",
            "custom.metrics.k8s.io",
            "v1beta2",
            "namespaces",
            ns,
            resource,
            name,
            metric,
        ] => {
            let q = v
                .objects
                .get(&(
                    ns.to_string(),
                    resource.to_string(),
                    name.to_string(),
                    metric.to_string(),
                ))
                .ok_or_else(|| anyhow!("no metric {metric} for {resource}/{name} in {ns}"))?;
            Ok(
                json!({"kind": "MetricValueList", "apiVersion": "custom.metrics.k8s.io/v1beta2", "metadata": {},
                      "items": [metric_value(ns, resource, "", name, metric, q)]}),
            )
        }
        [
            "apis",
            "external.metrics.k8s.io",
            "v1beta1",
            "namespaces",
            ns,
            metric,
        ] => {
            let series = v
                .external
                .get(&(ns.to_string(), metric.to_string()))
                .ok_or_else(|| anyhow!("no external metric {metric} in {ns}"))?;
            let items: Vec<Value> = series
                .iter()
                .map(|q| json!({"metricName": metric, "metricLabels": {}, "timestamp": "2026-11-24T00:00:00Z", "value": q}))
                .collect();
            Ok(
                json!({"kind": "ExternalMetricValueList", "apiVersion": "external.metrics.k8s.io/v1beta1", "metadata": {}, "items": items}),
            )
        }
        _ => Err(anyhow!("no such path {path}")),
    }
}

fn metric_value(
    ns: &str,
    kind: &str,
    api_version: &str,
    name: &str,
    metric: &str,
    q: &str,
) -> Value {
    json!({
        "describedObject": {"kind": kind, "namespace": ns, "name": name, "apiVersion": api_version},
        "metric": {"name": metric},
        "timestamp": "2026-11-24T00:00:00Z",
        "value": q
    })
}
