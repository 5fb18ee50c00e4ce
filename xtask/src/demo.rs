//! `cargo xtask demo` (standalone, no Kubernetes yet): a client pod requests a Service address
//! every 100 ms while the agent's offload share goes 0% → 100% → 50% → 0%. Each request prints
//! the route it took. Offloaded requests take the product's real path: eBPF redirection to the
//! agent's egress tunnel on the node, then HTTPS with an OAuth token to the fake Beamlit (a
//! stand-in for the SaaS, in its own pod namespace).
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use beamlit_testbed::{
    AgentFixture, FakeBeamlit, FakeBeamlitOptions, ProbeOptions, TestCgroup, TestDir, Topology,
    run_probe, start_server_multi,
};

const SERVICE: &str = "10.96.0.10:80";
const REQUESTS_PER_PHASE: usize = 20;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn demo() -> Result<()> {
    crate::setup::setup()?;
    println!("[demo] building the agent");
    crate::build_agent_and_testbed("demo", false)?;
    // SAFETY: installs an async-signal-safe handler (one atomic store); Ctrl-C then ends the
    // loop and every fixture is torn down by Drop.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    let result = run();
    if INTERRUPTED.load(Ordering::SeqCst) {
        println!("\n[demo] interrupted; cleaned up");
        return Ok(());
    }
    result
}

fn run() -> Result<()> {
    println!(
        "[demo] creating a node, a model pod (php-apache) and a client pod (network namespaces)"
    );
    let mut topology = Topology::new("demo")?;
    let client = topology.add_pod("client")?;
    let model = topology.add_pod("phpapache")?;
    let _model_server = start_server_multi(
        &model.netns,
        None,
        &[(model.ipv4, 80).into()],
        "php-apache",
        true,
    )?;
    let remote = topology.add_pod("beamlit")?;
    let beamlit = FakeBeamlit::start(
        &remote.netns,
        FakeBeamlitOptions {
            https: vec![(remote.ipv4, 443).into()],
            require_token: true,
            ..FakeBeamlitOptions::default()
        },
    )?;
    let secrets = TestDir::new("demo")?;
    let secret_file = secrets.join("client-secret");
    std::fs::write(&secret_file, &beamlit.options().client_secret)?;
    topology.add_service(SERVICE.parse()?, (model.ipv4, 80).into())?;
    let cgroup = TestCgroup::new("demo")?;
    println!(
        "[demo] starting beamlit-agent: eBPF attached to {} (the client pod's cgroup)",
        cgroup.path().display()
    );
    let remote_backend = format!(
        "    remote:\n      scheme: https\n      host: \"{ip}:443\"\n      \
         pathPrefix: /$workspace/models/$model\n      workspace: demo\n      model: php-apache\n      \
         auth:\n        oauth:\n          tokenUrl: \"https://{ip}:443/oauth/token\"\n          \
         clientId: {id}\n          clientSecretFile: {secret}\n",
        ip = remote.ipv4,
        id = beamlit.options().client_id,
        secret = secret_file.display(),
    );
    let routes = |percent: u64| {
        format!(
            "tunnel:\n  ipv4: 10.200.0.1:15001\n  caFile: {ca}\nservices:\n  - address: {SERVICE}\n    \
             offloadPercent: {percent}\n{remote_backend}",
            ca = beamlit.ca_pem().display()
        )
    };
    let node_netns = format!("/var/run/netns/{}", topology.node().name());
    println!("[demo] the agent's egress tunnel listens on the node at 10.200.0.1:15001");
    let agent = AgentFixture::start(cgroup.path(), &routes(0), &["--tunnel-netns", &node_netns])?;
    println!("[demo] routes file: {}\n", agent.routes_path().display());

    let mut totals = Totals::default();
    for (percent, why) in [
        (0, "healthy: everything stays local"),
        (
            100,
            "the model fails: offload everything (the controller would decide this)",
        ),
        (
            50,
            "the model is overloaded: offload half of the new connections",
        ),
        (0, "recovered: back to local"),
    ] {
        println!("== offloadPercent: {percent}  ({why})");
        println!(
            "   $ edit {}  # offloadPercent: {percent}",
            agent.routes_path().display()
        );
        agent.write_routes(&routes(percent))?;
        agent.wait_share(SERVICE, percent * 100, Duration::from_secs(5))?;
        let phase = requests(&client.netns, &cgroup, &mut totals)?;
        println!(
            "   -> {} local, {} beamlit, {} failed\n",
            phase.local, phase.remote, phase.failed
        );
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Ok(());
        }
    }
    println!(
        "$ beamlit-agent --bpffs {} inspect",
        agent.bpffs().display()
    );
    let report = std::process::Command::new(beamlit_testbed::agent_bin())
        .arg("--bpffs")
        .arg(agent.bpffs())
        .arg("inspect")
        .output()?;
    print!("{}", String::from_utf8_lossy(&report.stdout));
    let stats = beamlit.stats()?;
    println!(
        "\nthe fake Beamlit served {} requests with {} OAuth token request(s)",
        stats.requests - stats.token_requests,
        stats.token_requests
    );
    println!(
        "summary: {} requests, {} failed, {} local, {} offloaded through the tunnel",
        totals.local + totals.remote + totals.failed,
        totals.failed,
        totals.local,
        totals.remote
    );
    if totals.failed > 0 {
        bail!("{} requests failed", totals.failed);
    }
    if totals.remote == 0 || totals.local == 0 {
        bail!("the route never switched");
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    local: usize,
    remote: usize,
    failed: usize,
}

fn requests(
    ns: &beamlit_testbed::Netns,
    cgroup: &TestCgroup,
    totals: &mut Totals,
) -> Result<Totals> {
    let mut phase = Totals::default();
    let mut opts = ProbeOptions::new(SERVICE.parse()?, 1);
    opts.http = true;
    for i in 1..=REQUESTS_PER_PHASE {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        let started = Instant::now();
        let report = run_probe(ns, Some(cgroup.path()), &opts)?;
        let line = if report.count("beamlit") == 1 {
            phase.remote += 1;
            "Route: beamlit"
        } else if report.count("php-apache") == 1 {
            phase.local += 1;
            "Route: local"
        } else {
            phase.failed += 1;
            "FAILED"
        };
        println!("   request {i:>2}: {line}");
        std::thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
    }
    totals.local += phase.local;
    totals.remote += phase.remote;
    totals.failed += phase.failed;
    Ok(phase)
}
