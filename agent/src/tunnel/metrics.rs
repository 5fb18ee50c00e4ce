//! The tunnel's Prometheus metrics, and the one server of `/metrics` and `/healthz` ([`serve`])
//! that the agent and the tunnel process use. Labels carry Service addresses and outcomes,
//! never credentials.
use std::{net::SocketAddr, sync::Arc};

use tracing::info;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceOutcome {
    pub service: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceDirection {
    pub service: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteLabel {
    /// `host:port` of a remote backend.
    pub remote: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [Counter; 5],
    pub to_remote: Counter,
    pub from_remote: Counter,
    pub latency: Histogram,
    pub accepted: Counter,
}

impl RouteMetrics {
    pub fn response(&self, status: u16) {
        let index = usize::from((status / 100).clamp(1, 5) - 1);
        self.by_class[index].inc();
    }
}

pub struct Metrics {
    registry: Registry,
    connections: Family<ServiceOutcome, Counter>,
    requests: Family<ServiceOutcome, Counter>,
    bytes: Family<ServiceDirection, Counter>,
    upstream_latency: Family<ServiceLabel, Histogram>,
    token_refreshes: Family<OutcomeLabel, Counter>,
    upstream_h2_connections: Family<RemoteLabel, Gauge>,
    refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("beamlit_tunnel");
        let connections = Family::<ServiceOutcome, Counter>::default();
        let requests = Family::<ServiceOutcome, Counter>::default();
        let bytes = Family::<ServiceDirection, Counter>::default();
        let upstream_latency = Family::<ServiceLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        });
        let token_refreshes = Family::<OutcomeLabel, Counter>::default();
        let upstream_h2_connections = Family::<RemoteLabel, Gauge>::default();
        let refused = Counter::default();
        registry.register(
            "connections",
            "Connections accepted by the tunnel, per Service and outcome",
            connections.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests forwarded, per Service and outcome (status class or error)",
            requests.clone(),
        );
        registry.register(
            "bytes",
            "Bytes forwarded, per Service and direction (to_remote, from_remote)",
            bytes.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            upstream_latency.clone(),
        );
        registry.register(
            "token_refreshes",
            "OAuth token requests, per outcome",
            token_refreshes.clone(),
        );
        registry.register(
            "upstream_h2_connections",
            "HTTP/2 connections open to each HTTPS remote backend (host:port)",
            upstream_h2_connections.clone(),
        );
        registry.register(
            "refused_connections",
            "Connections refused because this node's eBPF did not redirect them",
            refused.clone(),
        );
        Self {
            registry,
            connections,
            requests,
            bytes,
            upstream_latency,
            token_refreshes,
            upstream_h2_connections,
            refused,
        }
    }

    pub fn connection(&self, service: &str, outcome: &str) {
        self.connections
            .get_or_create(&ServiceOutcome {
                service: service.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn refused(&self) {
        self.refused.inc();
    }

    pub fn request(&self, service: &str, outcome: &str) {
        self.requests
            .get_or_create(&ServiceOutcome {
                service: service.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn bytes(&self, service: &str, direction: &str, n: u64) {
        self.bytes
            .get_or_create(&ServiceDirection {
                service: service.into(),
                direction: direction.into(),
            })
            .inc_by(n);
    }

    pub fn token_refresh(&self, ok: bool) {
        self.token_refreshes
            .get_or_create(&OutcomeLabel {
                outcome: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }

    /// The gauge of HTTP/2 connections open to `remote` (`host:port`), kept by its
    /// [`super::h2pool::Pool`].
    pub fn upstream_h2_connections(&self, remote: &str) -> Gauge {
        self.upstream_h2_connections
            .get_or_create(&RemoteLabel {
                remote: remote.into(),
            })
            .clone()
    }

    /// Handles on one Service's hot-path series, resolved once when its route is built, so a
    /// request costs atomic increments instead of label lookups.
    pub fn for_route(&self, service: &str) -> RouteMetrics {
        let class = |c: &str| {
            self.requests
                .get_or_create(&ServiceOutcome {
                    service: service.into(),
                    outcome: c.into(),
                })
                .clone()
        };
        let direction = |d: &str| {
            self.bytes
                .get_or_create(&ServiceDirection {
                    service: service.into(),
                    direction: d.into(),
                })
                .clone()
        };
        RouteMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            to_remote: direction("to_remote"),
            from_remote: direction("from_remote"),
            latency: self
                .upstream_latency
                .get_or_create(&ServiceLabel {
                    service: service.into(),
                })
                .clone(),
            accepted: self
                .connections
                .get_or_create(&ServiceOutcome {
                    service: service.into(),
                    outcome: "accepted".into(),
                })
                .clone(),
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The one `/metrics` (Prometheus text) and `/healthz` server of the agent and of the tunnel
/// process, on `addr`, in the process's own network namespace.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::{Response, StatusCode, body::Bytes};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics address {addr}: {e}"))?;
    info!(%addr, "serving /metrics");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/metrics" => (StatusCode::OK, metrics.encode()),
                            "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                            _ => (StatusCode::NOT_FOUND, "try /metrics\n".to_string()),
                        };
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
