use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use beamlit_agent::{
    apply::Applier,
    cgroup::{self, AttachTo},
    cluster::{Cluster, ClusterConfig, desired::TunnelAddresses, exempt::ExemptPod},
    dataplane::{self, Dataplane, DataplaneConfig, EbpfLogLevel},
    inspect, routes,
    standalone::Standalone,
    tunnel::{limits::Limits, metrics::Metrics},
};
use clap::{Parser, Subcommand};
use tracing::info;

/// Beamlit offloading agent.
///
/// Redirects new connections to Kubernetes Service addresses, with a chosen share, toward an
/// egress tunnel that forwards them to a remote backend (Beamlit). Redirection happens in eBPF
/// programs attached to a cgroup v2 directory (connect4/6, getpeername4/6, sock_ops); local
/// traffic never passes through a proxy. Programs and maps are pinned under --bpffs, so they keep
/// working while the agent restarts.
#[derive(Parser)]
#[command(name = "beamlit-agent", version, about, long_about)]
struct Cli {
    /// bpffs directory holding the agent's pinned maps and links.
    #[arg(long, global = true, env = "BEAMLIT_BPFFS_DIR", default_value = dataplane::DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// Directory where a cluster-mode agent records why each service is redirected (the
    /// ModelDeployment and reason `inspect` shows).
    #[arg(
        long,
        global = true,
        env = "BEAMLIT_STATE_DIR",
        default_value = "/run/beamlit-agent"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the eBPF programs (adopting pinned ones without a gap), then keep the maps
    /// in line with the ModelDeployments of the cluster (cluster mode, the default) or with a
    /// routes file (--routes, standalone mode) until stopped. Stopping leaves redirection in
    /// place.
    Run(Box<RunArgs>),
    /// Validate a routes file and print the routes it describes; changes nothing.
    Check {
        /// Routes file (YAML) to validate.
        #[arg(long)]
        routes: PathBuf,
    },
    /// Print services, shares, tunnels and connection counters from the pinned maps (works while
    /// the agent is stopped).
    Inspect {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Detach the programs and remove every map and link the agent pinned.
    Cleanup,
    /// Run the egress tunnel alone, driven by `beamlit-agent run --tunnel-socket` over a unix
    /// socket: the agent pod's unprivileged container (non-root, no capabilities). It needs no
    /// bpffs and no privilege: it asks the agent which Service each accepted connection was
    /// redirected from (the flows map), so it still serves only redirected connections.
    Tunnel(TunnelArgs),
    /// Exit 0 if GET http://ADDR/healthz answers 200 within 2 s (an exec probe for a container
    /// whose /metrics listens on localhost only).
    Healthz {
        /// The agent's or tunnel's --metrics-addr.
        #[arg(long)]
        addr: std::net::SocketAddr,
    },
}

#[derive(clap::Args)]
struct TunnelArgs {
    /// Unix socket to listen on for the agent (in a volume the agent's container shares).
    #[arg(long)]
    control_socket: PathBuf,
    /// CA bundle (PEM) trusted besides the system roots, for private remote backends.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Worker threads (default: half the CPUs available, at least 1, at most 4; see
    /// `tunnel::default_workers`).
    #[arg(long)]
    workers: Option<usize>,
    /// Per-client limit: time from accepting a connection (or finishing a response on it) to a
    /// complete request head; also closes idle keep-alive connections.
    #[arg(long, default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// Per-client limit: a raw TCP or upgraded (WebSocket) connection with no byte either way
    /// for this long is closed.
    #[arg(long, default_value_t = 600_000)]
    idle_timeout_ms: u64,
    /// Per-client limit: connections open at once from one client address; more are reset.
    #[arg(long, default_value_t = 1024)]
    max_connections_per_client: usize,
    /// Serve the tunnel's Prometheus /metrics (and /healthz) on this address.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Standalone mode: YAML file listing Service addresses, offload percentages and tunnels
    /// (see docs/reference.md, "The routes file"). Edits are applied without a restart. Without it
    /// the agent runs in cluster mode (in-cluster service account, or KUBECONFIG).
    #[arg(long)]
    routes: Option<PathBuf>,
    /// Cluster mode: this node's name (the downward API's spec.nodeName); the agent acknowledges
    /// what it applied on the Lease `beamlit-agent-<node>`.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Cluster mode: namespace of the agents' Leases (the controller reads them there).
    #[arg(long, env = "POD_NAMESPACE", default_value = beamlit_api::acknowledgement::DEFAULT_AGENT_NAMESPACE)]
    namespace: String,
    /// Cluster mode: apply only the ModelDeployments of these namespaces (comma-separated)
    /// [default: all].
    #[arg(long, value_delimiter = ',')]
    model_namespaces: Vec<String>,
    /// Cluster mode: the tunnel's IPv4 address on this node, reachable from its pods
    /// (typically the node IP, status.hostIP, and a free port), e.g. 10.0.0.5:15001.
    #[arg(long)]
    tunnel_ipv4: Option<std::net::SocketAddr>,
    /// Cluster mode: the tunnel's IPv6 address on this node, for IPv6 Service addresses.
    #[arg(long)]
    tunnel_ipv6: Option<std::net::SocketAddr>,
    /// Cluster mode: CA bundle (PEM) the tunnel trusts besides the system roots, for private
    /// remote backends.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Validate the arguments (and the routes file) and exit without touching the kernel.
    #[arg(long)]
    check_config: bool,
    /// What the programs attach to (only processes in it or below it are redirected): `pods`,
    /// the kubelet's pods cgroup (`kubepods` or `kubepods.slice` in the unified hierarchy,
    /// found from this agent's own pod, see --pod-uid), so kubelet and host daemons are never
    /// redirected; or `node`, the cgroup v2 root, every process of the node.
    #[arg(long, value_enum, default_value_t = AttachTo::Pods)]
    attach_to: AttachTo,
    /// The node's cgroup v2 mount as the agent sees it (in Kubernetes: the hostPath volume of
    /// /sys/fs/cgroup). On a hybrid node, where /sys/fs/cgroup is a tmpfs, its `unified`
    /// subdirectory is used. Default: the first cgroup2 mount of /proc/mounts.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// This agent's pod UID (the downward API's metadata.uid): `--attach-to pods` finds the
    /// pods cgroup as the `kubepods` directory above this pod's own cgroup. Without it, a
    /// `kubepods` directly below the cgroup v2 root.
    #[arg(long, env = "POD_UID")]
    pod_uid: Option<String>,
    /// Exactly this cgroup v2 directory to attach to (overrides --attach-to).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Cluster mode: the agents' DaemonSet (in --namespace). When it is deleted (`helm
    /// uninstall`), a stopping agent detaches its programs and removes its pins instead of
    /// leaving them for the next agent; a rolling update keeps them.
    #[arg(long, env = "AGENT_DAEMONSET")]
    daemonset: Option<String>,
    /// Cluster mode: how long node-local failover (a Service with no ready endpoint, offloaded
    /// at once) lasts after its endpoints are ready again, so that the node's proxy has
    /// programmed them before connections go back to it. Keep it above kube-proxy's
    /// minSyncPeriod (1 s by default) plus its sync time.
    #[arg(long, default_value_t = 3000)]
    failover_hold_ms: u64,
    /// Cluster mode: a label selector of pods in --namespace (the controller's) whose
    /// connections are never redirected on this node, whatever a ModelDeployment says: their
    /// pod cgroups go into the `exempt_cgroups` map (the agent's own pod, from --pod-uid, is
    /// always there). Empty: only the agent's own.
    #[arg(long)]
    exempt_pods: Option<String>,
    /// SO_MARK that exempts a socket from redirection (the agent's own tunnel sockets).
    /// Decimal or 0x-hex; 0 disables the exemption.
    #[arg(long, default_value = "0xbe", value_parser = parse_mark)]
    bypass_mark: u32,
    /// Level of the eBPF programs' own log messages; `off` keeps formatting out of the hot path.
    #[arg(long, value_enum, default_value_t = EbpfLogLevel::Off)]
    ebpf_log_level: EbpfLogLevel,
    /// How often the routes file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 250)]
    reload_interval_ms: u64,
    /// Network namespace (a file such as /var/run/netns/NAME) in which the egress tunnel makes
    /// its sockets. Default: the agent's own (hostNetwork in Kubernetes).
    #[arg(long)]
    tunnel_netns: Option<PathBuf>,
    /// The egress tunnel runs in a process of its own (`beamlit-agent tunnel`, the agent pod's
    /// unprivileged container), driven over this unix socket; the --tunnel-* limits and
    /// workers are then that process's flags. Default: the tunnel runs in this process.
    #[arg(long)]
    tunnel_socket: Option<PathBuf>,
    /// Worker threads of the egress tunnel (default: half the CPUs available, at least 1, at
    /// most 4).
    #[arg(long)]
    tunnel_workers: Option<usize>,
    /// Per-client limit of the tunnel: time from accepting a connection (or finishing a
    /// response on it) to a complete request head; also closes idle keep-alive connections.
    #[arg(long, default_value_t = 10_000)]
    tunnel_header_timeout_ms: u64,
    /// Per-client limit of the tunnel: a raw TCP or upgraded (WebSocket) connection with no byte
    /// either way for this long is closed.
    #[arg(long, default_value_t = 600_000)]
    tunnel_idle_timeout_ms: u64,
    /// Per-client limit of the tunnel: connections open at once from one client address; more
    /// are reset (counted as outcome `client_limit`).
    #[arg(long, default_value_t = 1024)]
    tunnel_max_connections_per_client: usize,
    /// Serve Prometheus /metrics (and /healthz) on this address, e.g. 0.0.0.0:9464.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

fn tunnel(args: TunnelArgs) -> anyhow::Result<()> {
    let metrics = std::sync::Arc::new(Metrics::new());
    if let Some(addr) = args.metrics_addr {
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(rt) => {
                        if let Err(e) =
                            rt.block_on(beamlit_agent::tunnel::metrics::serve(addr, metrics))
                        {
                            tracing::error!("{e:#}");
                        }
                    }
                    Err(e) => tracing::error!("metrics runtime: {e}"),
                }
            })?;
    }
    let config = beamlit_agent::tunnel::TunnelConfig {
        netns: None,
        bpffs_dir: PathBuf::new(),
        extra_ca_file: args.ca_file,
        workers: args
            .workers
            .unwrap_or_else(beamlit_agent::tunnel::default_workers),
        limits: Limits {
            header_timeout: Duration::from_millis(args.header_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(args.idle_timeout_ms.max(1)),
            max_connections_per_client: args.max_connections_per_client.max(1),
        },
    };
    beamlit_agent::tunnel::control::serve(&args.control_socket, config, metrics)
}

fn healthz(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let timeout = Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    if answer.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!(
            "{addr}/healthz answered {:?}",
            answer.lines().next().unwrap_or("nothing")
        )
    }
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("`{s}` is not a mark; write a number like 190 or 0xbe"))
}

/// Colour codes only when a person reads stderr on a terminal: the DaemonSet's logs, a file or a
/// pipe get plain text. `NO_COLOR` (https://no-color.org) turns them off on a terminal too, as
/// tracing-subscriber does by default (setting `with_ansi` replaces that default).
fn colour_logs() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if let Command::Run(args) = &cli.command
        && let Some(level) = args.ebpf_log_level.as_tracing()
    {
        // Records from the eBPF programs carry the eBPF crate as their target; the level chosen
        // at load time decides what they send, so let all of it through.
        filter = filter.add_directive(
            format!("{}={level}", dataplane::EBPF_LOG_TARGET)
                .parse()
                .context("eBPF log filter")?,
        );
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs())
        .init();
    match cli.command {
        Command::Run(args) => run(&cli.bpffs, &cli.state_dir, *args),
        Command::Check { routes } => {
            let parsed = routes::load(&routes)?;
            println!(
                "{}: {} service(s), valid",
                routes.display(),
                parsed.routes.len()
            );
            for r in &parsed.routes {
                let remote = parsed.backends.get(&r.service).map_or_else(
                    || "external tunnel".to_string(),
                    |(_, b)| {
                        format!(
                            "remote {}://{}{}",
                            b.scheme.as_str(),
                            b.authority(),
                            b.path_prefix
                        )
                    },
                );
                println!(
                    "  {}  offload {:.2}%  tunnel {}  {remote}",
                    r.service,
                    r.share.percent(),
                    r.tunnel
                );
            }
            Ok(())
        }
        Command::Inspect { json } => {
            let report = inspect::report(&cli.bpffs, &cli.state_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", inspect::render(&report));
            }
            Ok(())
        }
        Command::Cleanup => {
            let removed = dataplane::cleanup(&cli.bpffs)?;
            if removed.is_empty() {
                println!("nothing to remove under {}", cli.bpffs.display());
            }
            for pin in removed {
                println!("removed {}", pin.display());
            }
            Ok(())
        }
        Command::Tunnel(args) => tunnel(args),
        Command::Healthz { addr } => healthz(addr),
    }
}

/// What `run` will do, decided (and validated) before anything touches the kernel.
enum Mode {
    Standalone(PathBuf),
    Cluster(Box<ClusterConfig>),
}

fn mode(args: &RunArgs, state_dir: &std::path::Path) -> anyhow::Result<Mode> {
    if let Some(path) = &args.routes {
        // Validate before touching the kernel: a bad file must not change anything.
        routes::load(path)
            .context("not starting; the routes already in the maps (if any) stay in force")?;
        return Ok(Mode::Standalone(path.clone()));
    }
    let node_name = args
        .node_name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .context(
            "cluster mode needs --node-name (or NODE_NAME, from the downward API's spec.nodeName); \
         for standalone mode give --routes FILE",
        )?;
    let tunnels = TunnelAddresses {
        ipv4: args.tunnel_ipv4,
        ipv6: args.tunnel_ipv6,
    };
    if tunnels.ipv4.is_none() && tunnels.ipv6.is_none() {
        anyhow::bail!(
            "cluster mode needs --tunnel-ipv4 (and/or --tunnel-ipv6): the address on this node \
             where pods' redirected connections arrive, e.g. --tunnel-ipv4 $(HOST_IP):15001"
        );
    }
    if tunnels.ipv4.is_some_and(|a| !a.is_ipv4()) {
        anyhow::bail!(
            "--tunnel-ipv4: {} is not an IPv4 address",
            args.tunnel_ipv4.map_or_else(String::new, |a| a.to_string())
        );
    }
    if tunnels.ipv6.is_some_and(|a| !a.is_ipv6()) {
        anyhow::bail!(
            "--tunnel-ipv6: {} is not an IPv6 address",
            args.tunnel_ipv6.map_or_else(String::new, |a| a.to_string())
        );
    }
    if let Some(ca) = &args.ca_file {
        std::fs::metadata(ca).with_context(|| format!("--ca-file {}", ca.display()))?;
    }
    Ok(Mode::Cluster(Box::new(ClusterConfig {
        node_name,
        namespace: args.namespace.clone(),
        model_namespaces: args.model_namespaces.clone(),
        tunnels,
        extra_ca_file: args.ca_file.clone(),
        state_dir: state_dir.to_path_buf(),
        daemonset: args.daemonset.clone().filter(|d| !d.trim().is_empty()),
        exempt_pods: args.exempt_pods.clone().filter(|s| !s.trim().is_empty()),
        own_pod: args
            .pod_uid
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|uid| ExemptPod {
                name: "this agent's pod".into(),
                uid: uid.to_string(),
            }),
        // Set once the cgroup to attach to is chosen.
        pods_cgroup: PathBuf::new(),
        failover_hold: Duration::from_millis(args.failover_hold_ms),
    })))
}

fn run(bpffs: &std::path::Path, state_dir: &std::path::Path, args: RunArgs) -> anyhow::Result<()> {
    let mut mode = mode(&args, state_dir)?;
    if args.check_config {
        println!("configuration valid");
        return Ok(());
    }
    let target = cgroup::resolve(
        args.cgroup.as_deref(),
        args.attach_to,
        args.cgroup_root.as_deref(),
        args.pod_uid.as_deref(),
    )
    .context("choosing the cgroup to attach to; nothing was loaded or attached")?;
    let cgroup = target.path;
    info!(cgroup = %cgroup.display(), "attaching to {}", target.how);
    if let Mode::Cluster(c) = &mut mode {
        c.pods_cgroup = cgroup.clone();
    }
    let config = DataplaneConfig {
        bpffs_dir: bpffs.to_path_buf(),
        cgroup: cgroup.clone(),
        bypass_mark: args.bypass_mark,
        ebpf_log_level: args.ebpf_log_level,
    };
    let mut dp = Dataplane::start(&config).context("starting the data plane")?;
    info!(cgroup = %cgroup.display(), bpffs = %bpffs.display(), "data plane ready");
    let metrics = std::sync::Arc::new(Metrics::new());
    let applier = Applier::new(
        args.tunnel_netns,
        bpffs.to_path_buf(),
        metrics.clone(),
        args.tunnel_workers
            .unwrap_or_else(beamlit_agent::tunnel::default_workers),
        Limits {
            header_timeout: Duration::from_millis(args.tunnel_header_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(args.tunnel_idle_timeout_ms.max(1)),
            max_connections_per_client: args.tunnel_max_connections_per_client.max(1),
        },
    )
    .with_tunnel_socket(args.tunnel_socket.clone());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            if let Some(addr) = args.metrics_addr {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = beamlit_agent::tunnel::metrics::serve(addr, metrics).await {
                        tracing::error!("{e:#}");
                    }
                });
            }
            match mode {
                Mode::Standalone(routes) => {
                    let mut standalone = Standalone::new(
                        routes,
                        Duration::from_millis(args.reload_interval_ms.max(10)),
                        applier,
                    );
                    let text = standalone.apply_file(&mut dp).await?;
                    standalone.run(&mut dp, text).await
                }
                Mode::Cluster(config) => {
                    // Marked like the tunnel's sockets: never redirected by the node's eBPF.
                    let client =
                        beamlit_agent::cluster::api_client::infer(args.bypass_mark).await?;
                    Cluster::new(*config, client, applier)
                        .run(&mut dp, bpffs)
                        .await
                }
            }
        })
}
