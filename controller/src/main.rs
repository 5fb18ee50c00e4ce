use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use beamlit_controller::{
    config::{self, FileConfig},
    leader::{Elector, LeaderConfig},
    metric_source::Prometheus,
    metrics::{self, ControllerMetrics},
    reconcile::{self, Context},
};
use clap::Parser;
use kube::runtime::events::Reporter;

/// Beamlit offloading controller.
///
/// Watches ModelDeployments, their Services, EndpointSlices and workloads, decides what share of
/// each model's new connections to offload (100% at once when the Service has no ready
/// endpoints; `behavior.percentage` while a metric is above its target), and writes the decision
/// to the ModelDeployment's status, where the node agents read it. Uses the in-cluster service
/// account, or KUBECONFIG outside a cluster.
///
/// Settings come from flags, then from --config, then from the defaults shown.
#[derive(Parser)]
#[command(name = "beamlit-controller", version, about, long_about)]
struct Cli {
    /// YAML configuration file (what the Helm chart renders); unknown keys are refused.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Seconds a metric must stay below target before offloading stops [default: 60].
    #[arg(long)]
    stabilization_window_secs: Option<u64>,
    /// Seconds between re-evaluations of each ModelDeployment when nothing changes [default: 15].
    #[arg(long)]
    resync_secs: Option<u64>,
    /// Prometheus to read External metrics from, e.g. http://prometheus.monitoring:9090.
    #[arg(long)]
    prometheus_url: Option<String>,
    /// Handle only the ModelDeployments of these namespaces (comma-separated) [default: all].
    #[arg(long, value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Elect a leader among replicas with a coordination.k8s.io Lease; only the leader decides
    /// [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    leader_election: Option<bool>,
    /// Namespace of the Lease [default: POD_NAMESPACE, else `default`].
    #[arg(long)]
    leader_election_namespace: Option<String>,
    /// Name of the Lease [default: beamlit-controller].
    #[arg(long)]
    leader_election_name: Option<String>,
    /// Seconds a Lease holds without renewal; another replica takes over after that [default: 15].
    #[arg(long)]
    lease_duration_secs: Option<u64>,
    /// Address for /metrics, /healthz and /readyz [default: 0.0.0.0:8080].
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// Beamlit workspace, substituted for $workspace in remote backend paths.
    #[arg(long)]
    workspace: Option<String>,
    /// Namespace of the agents' Leases, which say what each node applied
    /// [default: POD_NAMESPACE, else beamlit-system].
    #[arg(long)]
    agent_namespace: Option<String>,
}

/// The settings in force: flag, else file, else default.
struct Settings {
    stabilization_window: Duration,
    resync: Duration,
    prometheus: Option<Prometheus>,
    namespaces: Vec<String>,
    leader: Option<LeaderConfig>,
    http_addr: SocketAddr,
    workspace: Option<String>,
    agent_namespace: String,
    default_backend: Option<beamlit_controller::backend::DefaultRemoteBackend>,
    beamlit_api: Option<config::BeamlitApiFileConfig>,
    policy: beamlit_controller::admission::Policy,
}

impl Settings {
    fn resolve(cli: &Cli, file: FileConfig) -> anyhow::Result<Self> {
        let policy = file.policy();
        let prometheus_url = cli.prometheus_url.clone().or(file.prometheus_url);
        let prometheus = prometheus_url.as_deref().map(Prometheus::new).transpose()?;
        let leader = &file.leader_election;
        let lease_duration = Duration::from_secs(
            cli.lease_duration_secs
                .or(leader.lease_duration_seconds)
                .unwrap_or(15)
                .max(2),
        );
        let (renew_deadline, renew_every) = LeaderConfig::timings(lease_duration);
        let leader = cli
            .leader_election
            .or(leader.enabled)
            .unwrap_or(true)
            .then(|| LeaderConfig {
                namespace: cli
                    .leader_election_namespace
                    .clone()
                    .or(leader.namespace.clone())
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .unwrap_or_else(|| "default".into()),
                name: cli
                    .leader_election_name
                    .clone()
                    .or(leader.name.clone())
                    .unwrap_or_else(|| "beamlit-controller".into()),
                identity: identity(),
                lease_duration,
                renew_deadline,
                renew_every,
            });
        Ok(Self {
            stabilization_window: Duration::from_secs(
                cli.stabilization_window_secs
                    .or(file.stabilization_window_seconds)
                    .unwrap_or(60),
            ),
            resync: Duration::from_secs(
                cli.resync_secs.or(file.resync_seconds).unwrap_or(15).max(1),
            ),
            prometheus,
            namespaces: if cli.namespaces.is_empty() {
                file.namespaces
            } else {
                cli.namespaces.clone()
            },
            leader,
            http_addr: cli
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            workspace: cli.workspace.clone().or(file.workspace),
            agent_namespace: cli
                .agent_namespace
                .clone()
                .or(file.agent_namespace)
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| beamlit_api::acknowledgement::DEFAULT_AGENT_NAMESPACE.into()),
            policy,
            default_backend: file.default_remote_backend,
            beamlit_api: file.beamlit_api,
        })
    }
}

/// The Beamlit API client from `beamlitApi` (the token file is read here, once).
fn beamlit_client(
    config: &config::BeamlitApiFileConfig,
    workspace: &str,
) -> anyhow::Result<beamlit_controller::beamlit_api::BeamlitApi> {
    use beamlit_controller::beamlit_api::{BeamlitApi, BeamlitApiConfig, parse_api_token};
    let token = std::fs::read_to_string(&config.token_file).with_context(|| {
        format!(
            "beamlitApi.tokenFile: cannot read {}",
            config.token_file.display()
        )
    })?;
    let (client_id, secret) = parse_api_token(&token).context("beamlitApi.tokenFile")?;
    let mut api = BeamlitApiConfig::new(client_id, secret, workspace);
    if let Some(base) = &config.base_url {
        api.base_url = base.clone();
    }
    api.extra_ca_file = config.ca_file.clone();
    let client = BeamlitApi::new(api).context("beamlitApi")?;
    tracing::info!(base = %config.base_url.as_deref().unwrap_or(beamlit_controller::beamlit_api::DEFAULT_BASE_URL), "Beamlit API configured: models are kept in line, with a finalizer");
    Ok(client)
}

/// POD_NAME in a cluster; hostname and pid elsewhere.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        format!(
            "{}-{}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "controller".into()),
            std::process::id()
        )
    })
}

/// Colour codes only when a person reads stderr on a terminal: the Deployment's logs, a file or a
/// pipe get plain text. `NO_COLOR` (https://no-color.org) turns them off on a terminal too, as
/// tracing-subscriber does by default (setting `with_ansi` replaces that default).
fn colour_logs() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs())
        .init();
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => config::load(path)?,
        None => FileConfig::default(),
    };
    let settings = Settings::resolve(&cli, file).context("not starting")?;
    if cli.check_config {
        println!("configuration valid");
        return Ok(());
    }

    let beamlit = match &settings.beamlit_api {
        None => None,
        Some(api) => Some(beamlit_client(
            api,
            settings.workspace.as_deref().unwrap_or_default(),
        )?),
    };
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let controller_metrics = ControllerMetrics::default();
    let http = tokio::spawn(metrics::serve(
        settings.http_addr,
        controller_metrics.clone(),
    ));
    let ctx = Arc::new(Context {
        client: client.clone(),
        reporter: Reporter {
            controller: "beamlit-controller".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
        stabilization_window: settings.stabilization_window,
        resync: settings.resync,
        metrics: controller_metrics,
        prometheus: settings.prometheus,
        namespaces: settings.namespaces,
        workspace: settings.workspace,
        agent_namespace: settings.agent_namespace,
        default_backend: settings.default_backend,
        beamlit,
        policy: settings.policy,
    });
    let elector = settings.leader.map(|config| Elector::new(client, config));
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
