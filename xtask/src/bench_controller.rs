//! `cargo xtask bench controller`: 1000 ModelDeployments against a real kube-apiserver (a private
//! test cluster): time for a freshly started controller to reconcile them all, its memory, and
//! the API requests it makes per minute at steady state — measured on the apiserver's own
//! request counter, as the difference between a window with the controller and an equally long
//! baseline window without it.
use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::{
    TestDir, cluster::TestCluster, crds::install_model_deployment_crd, require_privileges, spawn,
};

use crate::bench::verdict;

#[derive(clap::Args)]
pub struct ControllerArgs {
    /// How many ModelDeployments (each with its own Service).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Seconds of each steady-state window (baseline, then with the controller).
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// The controller's --resync-secs.
    #[arg(long, default_value_t = 15)]
    resync_secs: u64,
}

pub fn controller(args: &ControllerArgs) -> Result<()> {
    if !require_privileges() {
        bail!("the benchmark starts a test cluster with simulated nodes: run it as root");
    }
    crate::cargo(&["build", "--release", "-p", "beamlit-controller", "--bins"])?;
    let bin = crate::project_root().join("target/release/beamlit-controller");

    let cluster = TestCluster::start()?;
    install_model_deployment_crd(&cluster)?;
    let ns = cluster.namespace("benchctl")?;
    let created = Instant::now();
    // Each model's workload does not exist: only the Service and the decision matter here.
    apply_models(&cluster, ns.name(), 0..args.count, |i| format!("model-{i}"))?;
    println!(
        "[bench] created {} Services and ModelDeployments in {:.1?}",
        args.count,
        created.elapsed()
    );

    println!(
        "[bench] baseline: {} s without the controller",
        args.window_secs
    );
    let baseline = requests_in_window(&cluster, Duration::from_secs(args.window_secs))?;

    let dir = TestDir::new("benchctl")?;
    let log = std::fs::File::create(dir.join("controller.log"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cmd = Command::new(&bin);
    cmd.args(["--leader-election=false", "--namespaces", ns.name()])
        .args(["--resync-secs", &args.resync_secs.to_string()])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", cluster.kubeconfig())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let started = Instant::now();
    let mut controller = spawn(cmd, None)?;
    let pid = controller.pid();
    loop {
        let reasons = cluster.kubectl(&[
            "get",
            "modeldeployments",
            "-n",
            ns.name(),
            "-o",
            "jsonpath={range .items[*]}{.status.reason}{\"\\n\"}{end}",
        ])?;
        let decided = reasons.lines().filter(|l| !l.trim().is_empty()).count();
        if decided >= args.count {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {decided} of {} decided after 10 minutes", args.count);
        }
        if let Some(status) = controller.try_wait()? {
            bail!(
                "controller exited ({status}): {}",
                std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let reconcile_all = started.elapsed();
    println!(
        "[bench] all {} reconciled {reconcile_all:.1?} after start",
        args.count
    );
    println!(
        "[bench] steady state: {} s with the controller",
        args.window_secs
    );
    let with = requests_in_window(&cluster, Duration::from_secs(args.window_secs))?;
    let (rss_mib, peak_mib) = memory_mib(pid)?;
    drop(controller);

    let per_minute = |n: f64| n * 60.0 / args.window_secs as f64;
    let controller_rpm = per_minute(with - baseline);
    let mut out = String::new();
    writeln!(
        out,
        "\ncontroller benchmark: {} ModelDeployments (each with a Service, no endpoints), resync {} s",
        args.count, args.resync_secs
    )?;
    writeln!(
        out,
        "time to reconcile all after start  {reconcile_all:>10.1?}"
    )?;
    writeln!(
        out,
        "controller RSS now / peak          {rss_mib:>6.1} / {peak_mib:.1} MiB"
    )?;
    writeln!(
        out,
        "API requests/min at steady state   {controller_rpm:>10.0}  (apiserver: {:.0} with, {:.0} without)",
        per_minute(with),
        per_minute(baseline)
    )?;
    writeln!(out, "target: RSS ≤ 150 MB: {}", verdict(peak_mib <= 150.0))?;
    print!("{out}");
    Ok(())
}

/// `model-<i>` for each `i` of `range`: a Service without selector (no endpoints, so every model
/// decides NoReadyEndpoints) and a ModelDeployment on it (50% on metrics) whose workload is
/// `workload(i)`, applied 100 at a time.
pub(crate) fn apply_models(
    cluster: &TestCluster,
    namespace: &str,
    range: std::ops::Range<usize>,
    workload: impl Fn(usize) -> String,
) -> Result<()> {
    for batch in range.collect::<Vec<_>>().chunks(100) {
        let mut yaml = String::new();
        for i in batch {
            write!(
                yaml,
                "apiVersion: v1\nkind: Service\nmetadata: {{name: model-{i}}}\nspec:\n  ports: [{{port: 80}}]\n---\n\
                 apiVersion: deployment.beamlit.com/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: model-{i}}}\n\
                 spec:\n  model: model-{i}\n  modelSourceRef: {{kind: Deployment, name: {workload}}}\n  \
                 serviceRef: {{name: model-{i}, targetPort: 80}}\n  offloadingConfig: {{behavior: {{percentage: 50}}}}\n---\n",
                workload = workload(*i)
            )?;
        }
        cluster.apply(namespace, &yaml)?;
    }
    Ok(())
}

/// Requests the apiserver served during `window` (all verbs but WATCH, which is one long
/// request per watcher and says nothing about load).
fn requests_in_window(cluster: &TestCluster, window: Duration) -> Result<f64> {
    let before = apiserver_requests(cluster)?;
    std::thread::sleep(window);
    Ok(apiserver_requests(cluster)? - before)
}

fn apiserver_requests(cluster: &TestCluster) -> Result<f64> {
    let metrics = cluster.kubectl(&["get", "--raw", "/metrics"])?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && !l.contains("verb=\"WATCH\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}
