//! `cargo xtask bench failover`: the agents' failover in a real (private) test cluster with the
//! controller, a cluster-mode agent and the fake Beamlit.
//!
//! 1. Failover latency: a Service whose EndpointSlice the benchmark owns (no pod start in the
//!    loop); each trial marks its only endpoint not ready through the API and times until the
//!    agent's pinned map says 100%, read in this process every 0.5 ms. The clock starts before
//!    the API call, so the figure includes the apiserver's write and the watch delivery.
//! 2. Requests lost: during all trials a client in the agent's cgroup opens new connections at
//!    a fixed rate (HTTP, one request each); a failed request is a lost one. The kube-proxy
//!    replacement drops the unready endpoint at the same moment (as kube-proxy would), so a
//!    connection the agent does not redirect in time is refused.
//! 3. Resync: N ModelDeployments (each with its Service) applied on the node, then the agent is
//!    SIGKILLed and started again; timed from the start to its "in sync with the cluster".
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::{
    ProbeOptions, TestCgroup,
    cluster::TestCluster,
    finish_probe,
    seed::{OffloadBed, PHP_APACHE},
    spawn_probe, start_server,
};

use beamlit_common::{ServiceEntry, ServiceKey};

use crate::bench::verdict;

#[derive(clap::Args)]
pub struct FailoverArgs {
    /// Failover trials (endpoint not ready, then ready again).
    #[arg(long, default_value_t = 50)]
    trials: usize,
    /// New connections per second during the trials.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// ModelDeployments on the node for the resync measurement.
    #[arg(long, default_value_t = 1000)]
    models: usize,
}

const SERVICE: &str = "failover-svc";
const NS_WAIT: Duration = Duration::from_secs(60);

pub fn failover(args: &FailoverArgs) -> Result<()> {
    crate::build_agent_and_testbed("benchmark", true)?;
    crate::cargo(&["build", "--release", "-p", "beamlit-controller", "--bins"])?;
    let release = crate::project_root().join("target/release");
    // SAFETY: no thread started yet; the test bed reads these when it starts processes.
    unsafe {
        std::env::set_var("BEAMLIT_CONTROLLER_BIN", release.join("beamlit-controller"));
        std::env::set_var("BEAMLIT_FAKEBEAMLIT_BIN", release.join("fakebeamlit"));
    }
    let cluster = TestCluster::start_with_nodes(1)?;
    let bed = OffloadBed::new(&cluster, "benchfail")?;
    let ns = bed.ns().to_string();
    cluster.apply(&ns, PHP_APACHE)?;
    cluster.wait_deployment_ready(&ns, "php-apache", 1, NS_WAIT)?;

    let backend = cluster.add_unmanaged_pod("backend")?;
    let _server = start_server(
        &backend.netns,
        None,
        (backend.ipv4, 80).into(),
        "local",
        true,
    )?;
    cluster.apply(&ns, &format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {SERVICE}}}\nspec:\n  ports: [{{port: 80}}]\n---\n\
         apiVersion: deployment.beamlit.com/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {SERVICE}}}\n\
         spec:\n  model: php-apache\n  modelSourceRef: {{kind: Deployment, name: php-apache}}\n  \
         serviceRef: {{name: {SERVICE}, targetPort: 80}}\n  offloadingConfig: {{behavior: {{percentage: 50}}}}\n"
    ))?;
    create_slice(&cluster, &ns, &backend.ipv4.to_string())?;
    let controller = bed.controller()?;
    let node = TestCgroup::new("benchnode")?;
    let mut agent = bed.agent("beamlit-node-1", &node)?;
    let status = |check: &dyn Fn(&serde_json::Value) -> bool| -> Result<()> {
        beamlit_testbed::seed::wait_status(&cluster, &ns, SERVICE, NS_WAIT, "status", check)
            .map(|_| ())
            .with_context(|| controller.log())
    };
    status(&|s| s["agents"]["applied"] == 1 && s["readyEndpoints"] == 1)?;
    let svc = {
        let s = beamlit_testbed::seed::status(&cluster, &ns, SERVICE)?;
        format!(
            "{}:80",
            s["service"]["addresses"][0]
                .as_str()
                .context("no Service address in status")?
        )
    };
    let svc_addr: std::net::SocketAddr = svc.parse()?;
    let maps = beamlit_agent_maps(agent.bpffs())?;
    let share = |maps: &Maps| -> Option<u16> { maps.share(svc_addr) };
    wait_until(Duration::from_secs(10), || share(&maps) == Some(0))
        .context("the agent never held the Service at 0%")?;

    // 1 + 2: trials under load.
    let client = cluster.add_unmanaged_pod("client")?;
    let stop = bed.dir.join("stop-load");
    let mut load = ProbeOptions::new(svc_addr, 0);
    load.http = true;
    load.timeout_ms = Some(2000);
    load.interval_ms = Some((1000 / args.rate.max(1)).max(1));
    load.until_file = Some(stop.clone());
    let probe = spawn_probe(&client.netns, Some(node.path()), &load)?;
    std::thread::sleep(Duration::from_secs(1));
    let ip = backend.ipv4.to_string();
    let mut latencies = Vec::with_capacity(args.trials);
    for trial in 0..args.trials {
        let started = Instant::now();
        set_ready(&cluster, &ns, &ip, false)?;
        wait_until(Duration::from_secs(5), || share(&maps) == Some(10_000))
            .with_context(|| format!("trial {trial}: the map never reached 100%"))?;
        latencies.push(started.elapsed());
        set_ready(&cluster, &ns, &ip, true)?;
        wait_until(Duration::from_secs(10), || share(&maps) == Some(0))
            .with_context(|| format!("trial {trial}: the map never came back to 0%"))?;
        // Let the controller's status settle, so each trial starts from the same state.
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::write(&stop, "")?;
    let report = finish_probe(probe, Duration::from_secs(60))?;
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i]
    };
    let (p50, p99, max) = (pct(0.50), pct(0.99), pct(1.0));

    // 3: resync with many models.
    println!(
        "[bench] applying {} ModelDeployments and Services",
        args.models
    );
    crate::bench_controller::apply_models(&cluster, &ns, 0..args.models, |_| {
        "php-apache".to_string()
    })?;
    let wanted = args.models + 1;
    wait_until(Duration::from_secs(300), || {
        maps.count().is_some_and(|n| n >= wanted)
    })
    .with_context(|| format!("the agent never held {wanted} services:\n{}", agent.log()))?;
    let restart = Instant::now();
    agent.restart()?;
    agent.wait_log("in sync with the cluster", Duration::from_secs(60))?;
    let resync = restart.elapsed();
    let rewrote = agent.log().contains("maps updated");
    let held = maps.count().unwrap_or(0);

    let mut out = String::new();
    writeln!(
        out,
        "\n== failover ({} trials, {} new connections/s) ==",
        args.trials, args.rate
    )?;
    writeln!(
        out,
        "EndpointSlice not ready -> agent map at 100%:  p50 {p50:.1?}  p99 {p99:.1?}  max {max:.1?}"
    )?;
    writeln!(
        out,
        "requests during the trials: {} sent, {} failed ({} remote, {} local)",
        report.attempts,
        report.failed,
        report.count("beamlit"),
        report.count("local")
    )?;
    if !report.errors.is_empty() {
        writeln!(out, "first errors: {:?}", report.errors)?;
    }
    writeln!(
        out,
        "agent restart with {} ModelDeployments: in sync after {resync:.2?} ({held} services in the map{})",
        args.models + 1,
        if rewrote {
            "; some entries were rewritten"
        } else {
            "; nothing rewritten"
        }
    )?;
    writeln!(
        out,
        "target: failover p99 ≤ 100 ms: {}",
        verdict(p99 <= Duration::from_millis(100))
    )?;
    writeln!(
        out,
        "target: 0 requests lost: {}",
        verdict(report.failed == 0)
    )?;
    writeln!(
        out,
        "target: resync ≤ 2 s: {}",
        verdict(resync <= Duration::from_secs(2))
    )?;
    print!("{out}");
    drop(node);
    Ok(())
}

/// The benchmark's own EndpointSlice for the Service: one IPv4 endpoint, ready or not. Created
/// with kubectl; flipped with one in-process API call, so no process start is on the clock.
fn create_slice(cluster: &TestCluster, ns: &str, ip: &str) -> Result<()> {
    cluster.apply(
        ns,
        &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {SERVICE}-bench\n  \
             labels: {{kubernetes.io/service-name: {SERVICE}, endpointslice.kubernetes.io/managed-by: bench.beamlit.com}}\n\
             addressType: IPv4\nports: [{{name: \"\", port: 80, protocol: TCP}}]\n\
             endpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}]\n"
        ),
    )?;
    Ok(())
}

fn set_ready(cluster: &TestCluster, ns: &str, ip: &str, ready: bool) -> Result<()> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<EndpointSlice> = Api::namespaced(cluster.client(), ns);
    let patch = serde_json::json!({
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}]
    });
    cluster.block_on(api.patch(
        &format!("{SERVICE}-bench"),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    ))?;
    Ok(())
}

fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// The agent's pinned `services` map, read in this process (what `inspect` reads).
struct Maps(aya::maps::HashMap<aya::maps::MapData, ServiceKey, ServiceEntry>);

fn beamlit_agent_maps(bpffs: &std::path::Path) -> Result<Maps> {
    let path = bpffs.join(beamlit_common::map_names::SERVICES);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(Maps(aya::maps::HashMap::try_from(
        aya::maps::Map::HashMap(data),
    )?))
}

impl Maps {
    /// The share (basis points) of an IPv4 service address.
    fn share(&self, service: std::net::SocketAddr) -> Option<u16> {
        let std::net::IpAddr::V4(ip) = service.ip() else {
            return None;
        };
        self.0.iter().filter_map(Result::ok).find_map(|(k, e)| {
            (k.family == beamlit_common::FAMILY_INET
                && k.addr[..4] == ip.octets()
                && k.port == service.port())
            .then_some(e.share_bp)
        })
    }

    fn count(&self) -> Option<usize> {
        Some(self.0.keys().filter(Result::is_ok).count())
    }
}
