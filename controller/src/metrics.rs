//! The controller's Prometheus metrics and its /metrics, /healthz, /readyz endpoint.
use std::{net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tracing::info;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone)]
pub struct ControllerMetrics {
    registry: Arc<Registry>,
    reconciles: Counter,
    errors: Counter,
    decisions: Family<ReasonLabel, Counter>,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("beamlit_controller");
        let reconciles = Counter::default();
        let errors = Counter::default();
        let decisions = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciliations of ModelDeployments",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed and will retry",
            errors.clone(),
        );
        registry.register(
            "decisions",
            "Offload decisions that changed, by reason",
            decisions.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reconciles,
            errors,
            decisions,
        }
    }
}

impl ControllerMetrics {
    pub fn reconcile(&self) {
        self.reconciles.inc();
    }

    pub fn reconcile_error(&self) {
        self.errors.inc();
    }

    pub fn decision(&self, reason: &str) {
        self.decisions
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// `/metrics`, `/healthz` and `/readyz` on `addr`.
pub async fn serve(addr: SocketAddr, metrics: ControllerMetrics) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--http-addr {addr}: {e}"))?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
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
                            "/healthz" | "/readyz" => (StatusCode::OK, "ok\n".to_string()),
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
