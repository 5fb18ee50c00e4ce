use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use beamlit_controller::{
    metrics::{self, ControllerMetrics},
    reconcile::{self, Context},
};
use clap::Parser;
use kube::runtime::events::Reporter;

/// Beamlit offloading controller.
///
/// Watches ModelDeployments, their Services and EndpointSlices, decides what share of each
/// model's new connections to offload (100% at once when the Service has no ready endpoints),
/// and writes the decision to the ModelDeployment's status, where the node agents read it.
/// Uses the in-cluster service account, or KUBECONFIG outside a cluster.
#[derive(Parser)]
#[command(name = "beamlit-controller", version, about, long_about)]
struct Cli {
    /// Seconds a metric must stay below target before offloading stops.
    #[arg(long, default_value_t = 60)]
    stabilization_window_secs: u64,
    /// Seconds between re-evaluations of each ModelDeployment when nothing changes.
    #[arg(long, default_value_t = 15)]
    resync_secs: u64,
    /// Prometheus to read External metrics from, e.g. http://prometheus.monitoring:9090.
    #[arg(long)]
    prometheus_url: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let prometheus = cli
        .prometheus_url
        .as_deref()
        .map(beamlit_controller::metric_source::Prometheus::new)
        .transpose()?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let controller_metrics = ControllerMetrics::default();
    let http = tokio::spawn(metrics::serve(cli.http_addr, controller_metrics.clone()));
    let ctx = Arc::new(Context {
        client,
        reporter: Reporter {
            controller: "beamlit-controller".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
        stabilization_window: Duration::from_secs(cli.stabilization_window_secs),
        resync: Duration::from_secs(cli.resync_secs.max(1)),
        metrics: controller_metrics,
        prometheus,
    });
    tokio::select! {
        () = reconcile::run(ctx) => {}
        result = http => {
            result.context("http server task")??;
        }
    }
    Ok(())
}
