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
    /// Handle only the ModelDeployments of these namespaces (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Elect a leader among replicas with a coordination.k8s.io Lease; only the leader decides.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease (default: POD_NAMESPACE, else `default`).
    #[arg(long)]
    leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = "beamlit-controller")]
    leader_election_name: String,
    /// Seconds a Lease holds without renewal; another replica takes over after that.
    #[arg(long, default_value_t = 15)]
    lease_duration_secs: u64,
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
        namespaces: cli.namespaces.clone(),
    });
    let elector = cli.leader_election.then(|| {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
            format!(
                "{}-{}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "controller".into()),
                std::process::id()
            )
        });
        let lease_duration = Duration::from_secs(cli.lease_duration_secs.max(2));
        beamlit_controller::leader::Elector::new(
            ctx.client.clone(),
            beamlit_controller::leader::LeaderConfig {
                namespace: cli
                    .leader_election_namespace
                    .clone()
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .unwrap_or_else(|| "default".into()),
                name: cli.leader_election_name.clone(),
                identity,
                lease_duration,
                renew_every: lease_duration / 3,
            },
        )
    });
    if let Some(elector) = &elector {
        elector.acquire().await.context("leader election")?;
    }
    let keep_leading = async {
        match &elector {
            Some(elector) => elector.keep().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = reconcile::run(ctx) => {}
        () = keep_leading => {
            // Another replica may already be deciding: stop at once, as client-go does.
            anyhow::bail!("lost the leader lease; exiting so that only the leader decides");
        }
        result = http => {
            result.context("http server task")??;
        }
    }
    Ok(())
}
