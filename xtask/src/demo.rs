//! `cargo xtask demo`: the seed README's walkthrough, live, on one machine.
//!
//! By default on real nodes (a control plane and two nodes with kubelet, containerd, kube-proxy
//! and CoreDNS): the chart installed with `helm install` from the cluster's registry, the
//! project's images run by containerd, the fake Beamlit behind a Service name; then the seed's
//! steps verbatim: php-apache, its ModelDeployment, the README's `curl-check` loop in a pod
//! (read through `kubectl logs -f`), `kubectl scale` to 0 and back. `--simulated` runs the same
//! walkthrough on the node simulator (a quicker look: the controller and the agent as processes,
//! pods as network namespaces). Every request prints the route it took; the summary counts
//! failures (the point is 0), times the switches, and writes a timeline picture (SVG).
use std::{
    io::{BufRead as _, BufReader, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::{
    ProbeOptions, TestCgroup,
    cluster::TestCluster,
    probe_command,
    seed::{OffloadBed, PHP_APACHE, scale, seed_model_deployment, status},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keep everything running at the end (until Ctrl-C) and print how to look at it with
    /// kubectl and `beamlit-agent inspect`.
    #[arg(long)]
    keep: bool,
    /// Non-interactive (CI): no spinner, and fail if any request failed or the route never
    /// switched.
    #[arg(long)]
    ci: bool,
    /// Use the binaries named by BEAMLIT_*_BIN instead of building (tests do).
    #[arg(long)]
    prebuilt: bool,
    /// Where the timeline picture goes.
    #[arg(long, default_value = "target/demo")]
    out: PathBuf,
    /// On the node simulator instead of real nodes: starts in seconds, with the controller and
    /// the agent as processes and pods as network namespaces (no container runtime, no Helm).
    #[arg(long)]
    simulated: bool,
}

pub fn demo(args: &DemoArgs) -> Result<()> {
    if !args.prebuilt {
        crate::setup::setup()?;
        println!("[demo] building the agent, the controller and the test bed");
        crate::build_agent_and_testbed("demo", false)?;
        crate::cargo(&["build", "-p", "beamlit-controller", "--bins"])?;
        if !args.simulated {
            println!(
                "[demo] checking the Kubernetes and node binaries (built once by setup, then cached)"
            );
            beamlit_testbed::cluster::KubeBinaries::ensure()?;
            beamlit_testbed::cluster::node_tools::NodeBinaries::ensure()?;
        }
    }
    // SAFETY: installs an async-signal-safe handler (one atomic store); the demo then stops at
    // its next step and every part is torn down by Drop.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    let result = if args.simulated {
        run(args)
    } else {
        run_real(args)
    };
    if INTERRUPTED.load(Ordering::SeqCst) {
        println!("\n[demo] interrupted; everything it created is removed");
        return Ok(());
    }
    result
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Announces a step with what the user would type in a real cluster, runs it (with a spinner on
/// a terminal), and says how long it took.
fn step<T>(ci: bool, what: &str, real: &[&str], f: impl FnOnce() -> Result<T>) -> Result<T> {
    interrupted()?;
    println!("\n==> {what}");
    for line in real {
        println!("    in a real cluster: $ {line}");
    }
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let spinner = (!ci && std::io::stdout().is_terminal()).then(|| {
        let done = done.clone();
        std::thread::spawn(move || {
            let frames = ['|', '/', '-', '\\'];
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                print!("\r    {} {:.0?}   ", frames[i % 4], started.elapsed());
                let _ = std::io::stdout().flush();
                i += 1;
                std::thread::sleep(Duration::from_millis(120));
            }
            print!("\r                          \r");
        })
    });
    let result = f();
    done.store(true, Ordering::Relaxed);
    if let Some(s) = spinner {
        let _ = s.join();
    }
    if result.is_ok() {
        println!("    done in {:.1?}", started.elapsed());
    }
    result
}

/// One request of the client's loop, as it ended.
#[derive(Clone)]
struct Request {
    at: Duration,
    route: Route,
}

#[derive(Clone, PartialEq, Eq)]
enum Route {
    Local(String),
    Beamlit,
    Failed(String),
}

fn run(args: &DemoArgs) -> Result<()> {
    let cluster = step(
        args.ci,
        "Starting a Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) and a simulated node",
        &["kind create cluster   # or any cluster of your own"],
        || TestCluster::start_with_nodes(1),
    )?;
    let (bed, _controller, _node, agent) = step(
        args.ci,
        "Installing Beamlit: the ModelDeployment CRD, the controller, the agent on the node (and the fake Beamlit, standing in for the SaaS)",
        &[
            "helm install beamlit-controller ./charts/beamlit-controller --set beamlitApiToken=$API_KEY \\",
            "    --set config.defaultRemoteBackend.authConfig.oauthConfig.clientId=$CLIENT_ID \\",
            "    --set config.defaultRemoteBackend.authConfig.oauthConfig.clientSecret=$CLIENT_SECRET",
        ],
        || {
            let bed = OffloadBed::new(&cluster, "demo")?;
            let controller = bed.controller()?;
            let node = TestCgroup::new("demo-node")?;
            let agent = bed.agent("beamlit-node-1", &node)?;
            Ok((bed, controller, node, agent))
        },
    )?;
    let ns = bed.ns().to_string();
    let kubectl = |args: &[&str]| -> Result<String> {
        let mut full = args.to_vec();
        full.extend(["-n", &ns]);
        cluster.kubectl(&full)
    };
    step(
        args.ci,
        "Deploying the model: the seed README's php-apache Deployment and Service",
        &["kubectl apply -f php-apache.yaml"],
        || {
            cluster.apply(&ns, PHP_APACHE)?;
            cluster.wait_deployment_ready(&ns, "php-apache", 1, Duration::from_secs(60))
        },
    )?;
    step(
        args.ci,
        "Applying the seed README's ModelDeployment",
        &["kubectl apply -f model-deployment.yaml"],
        || {
            cluster.apply(&ns, &seed_model_deployment(&ns))?;
            bed.wait_applied("the decision applied on the node", |s| {
                s["agents"]["applied"] == 1
            })
        },
    )?;
    println!("\n$ kubectl get modeldeployment");
    print!("{}", kubectl(&["get", "modeldeployment"])?);
    let svc = bed.service_address()?;

    let client = step(
        args.ci,
        "Starting a client pod",
        &["kubectl run curl-check --image=curlimages/curl --restart=Never -it -- sh"],
        || cluster.run_client_pod(&ns, "curl-check"),
    )?;
    println!(
        "\n==> Requesting http://{svc} every 100 ms from the client pod\n    in a real cluster: $ while true; do curl -si http://php-apache | grep -i x-served-by; sleep 0.1; done"
    );
    let stop = bed.dir.join("stop-requests");
    let mut opts = ProbeOptions::new(svc.parse()?, 0);
    opts.http = true;
    opts.each = true;
    opts.timeout_ms = Some(2000);
    opts.interval_ms = Some(100);
    opts.until_file = Some(stop.clone());
    let mut cmd = probe_command(&client.netns, &opts)?;
    cmd.stderr(std::process::Stdio::null());
    let mut probe = beamlit_testbed::spawn(cmd, Some(agent_cgroup(&agent)))?;
    let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
    let started = Instant::now();
    let reader = {
        let requests = requests.clone();
        let stdout = probe.take_stdout().context("the request loop's output")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Some(rest) = line.strip_prefix("EACH ") else {
                    continue;
                };
                let mut parts = rest.splitn(3, ' ');
                let (_, outcome, detail) = (parts.next(), parts.next(), parts.next());
                let route = match (outcome, detail) {
                    (Some("ok"), Some("beamlit")) => Route::Beamlit,
                    (Some("ok"), Some(pod)) => Route::Local(pod.to_string()),
                    (_, detail) => Route::Failed(detail.unwrap_or_default().to_string()),
                };
                let at = started.elapsed();
                print_request(at, &route);
                if let Ok(mut r) = requests.lock() {
                    r.push(Request { at, route });
                }
            }
        })
    };
    sleep_interruptibly(Duration::from_secs(3))?;

    println!(
        "\n==> The model fails: scaling php-apache to 0 replicas\n    $ kubectl scale deployment php-apache --replicas=0"
    );
    let down = started.elapsed();
    scale(&cluster, &ns, 0)?;
    let first_remote = first_after(
        &requests,
        down,
        &|r| *r == Route::Beamlit,
        Duration::from_secs(30),
    )?;
    sleep_interruptibly(Duration::from_secs(3))?;
    println!("\n$ kubectl get modeldeployment");
    print!("{}", kubectl(&["get", "modeldeployment"])?);

    println!(
        "\n==> The model is back: scaling php-apache to 1 replica\n    $ kubectl scale deployment php-apache --replicas=1"
    );
    let up = started.elapsed();
    scale(&cluster, &ns, 1)?;
    let first_local = first_after(
        &requests,
        up,
        &|r| matches!(r, Route::Local(_)),
        Duration::from_secs(60),
    )?;
    sleep_interruptibly(Duration::from_secs(3))?;
    std::fs::write(&stop, "")?;
    let _ = probe.wait_with_output_timeout(Duration::from_secs(10));
    let _ = reader.join();
    println!("\n$ kubectl get modeldeployment");
    print!("{}", kubectl(&["get", "modeldeployment"])?);
    let decided = status(&cluster, &ns, "php-apache")?;

    let requests = requests.lock().map(|r| r.clone()).unwrap_or_default();
    let counts = Summary {
        requests: &requests,
        down,
        up,
        end: started.elapsed(),
        first_remote,
        first_local,
        token_requests: bed.fake.stats()?.token_requests,
        decided,
    }
    .print(&args.out)?;

    let hint = format!(
        "\
             kubectl --kubeconfig {kc} get modeldeployment -A\n  \
             kubectl --kubeconfig {kc} -n {ns} scale deployment php-apache --replicas=0\n  \
             {agent_bin} --bpffs {bpffs} --state-dir {state} inspect",
        kc = cluster.kubeconfig().display(),
        agent_bin = beamlit_testbed::agent_bin().display(),
        bpffs = agent.bpffs().display(),
        state = agent.state_dir().display(),
    );
    finish(args.keep, &hint, counts)
}

/// When the first request after `since` that `want` matches ended (waiting up to `timeout`).
fn first_after(
    requests: &Mutex<Vec<Request>>,
    since: Duration,
    want: &dyn Fn(&Route) -> bool,
    timeout: Duration,
) -> Result<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        interrupted()?;
        let found = requests.lock().ok().and_then(|r| {
            r.iter()
                .find(|q| q.at >= since && want(&q.route))
                .map(|q| q.at)
        });
        if let Some(at) = found {
            return Ok(at);
        }
        if Instant::now() > deadline {
            bail!("no such answer within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With --keep, waits for Ctrl-C after printing `hint` (what to try); then the verdict from
/// the (failed, local, remote) counts: no failure, and the route switched both ways.
fn finish(keep: bool, hint: &str, (failed, local, remote): (usize, usize, usize)) -> Result<()> {
    if keep {
        println!("\n[demo] --keep: everything stays up until Ctrl-C. Try:\n  {hint}");
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    if remote == 0 || local == 0 {
        bail!("the route never switched ({local} local, {remote} Beamlit)");
    }
    Ok(())
}

fn print_request(at: Duration, route: &Route) {
    match route {
        Route::Local(pod) if pod.is_empty() => {
            println!("    {:>6.1}s  Route: local", at.as_secs_f64())
        }
        Route::Local(pod) => println!("    {:>6.1}s  Route: local ({pod})", at.as_secs_f64()),
        Route::Beamlit => println!("    {:>6.1}s  Route: beamlit", at.as_secs_f64()),
        Route::Failed(e) => println!("    {:>6.1}s  FAILED: {e}", at.as_secs_f64()),
    }
}

/// The summary both modes print, and the timeline picture.
struct Summary<'a> {
    requests: &'a [Request],
    down: Duration,
    up: Duration,
    end: Duration,
    first_remote: Duration,
    first_local: Duration,
    token_requests: u64,
    decided: serde_json::Value,
}

impl Summary<'_> {
    /// Prints it, writes the picture; the numbers of failed, local and remote answers.
    fn print(&self, out: &Path) -> Result<(usize, usize, usize)> {
        let failed = self
            .requests
            .iter()
            .filter(|r| matches!(r.route, Route::Failed(_)))
            .count();
        let remote = self
            .requests
            .iter()
            .filter(|r| r.route == Route::Beamlit)
            .count();
        let local = self.requests.len() - failed - remote;
        let picture = out.join("timeline.svg");
        std::fs::create_dir_all(out)?;
        std::fs::write(
            &picture,
            timeline_svg(self.requests, self.down, self.up, self.end),
        )?;
        println!("\n== Summary");
        println!("requests sent                      {}", self.requests.len());
        println!("failed                             {failed}");
        println!("answered locally / by Beamlit      {local} / {remote}");
        println!(
            "scale to 0 -> first Beamlit answer {:.0?}",
            self.first_remote.saturating_sub(self.down)
        );
        println!(
            "scale to 1 -> first local answer   {:.1?} (the new pod starting, then the 1 s hold)",
            self.first_local.saturating_sub(self.up)
        );
        println!("OAuth token requests to Beamlit    {}", self.token_requests);
        println!(
            "the controller's decision now      {}% ({})",
            self.decided["offloadPercent"],
            self.decided["reason"].as_str().unwrap_or("?")
        );
        println!(
            "timeline picture                   {}",
            absolute(&picture).display()
        );
        Ok((failed, local, remote))
    }
}

/// The walkthrough on real nodes: everything as the README has the user type it.
fn run_real(args: &DemoArgs) -> Result<()> {
    use beamlit_testbed::product::{self, Product};
    let ci = args.ci;
    let p = step(
        ci,
        "Starting a Kubernetes control plane and two real nodes (kubelet, containerd, kube-proxy, CoreDNS), a registry holding the project's images, and the fake Beamlit standing in for the SaaS",
        &["kind create cluster   # or any cluster of your own"],
        Product::start,
    )?;
    let c = &p.cluster;
    step(
        ci,
        "Installing Beamlit with Helm from the registry: the CRD, the controller, an agent on every node, metrics-server",
        &[
            "helm install beamlit-controller oci://ghcr.io/beamlit/beamlit-controller-chart \\",
            "    --set installMetricServer=true --set beamlitApiToken=$API_KEY \\",
            "    --set config.defaultRemoteBackend.authConfig.oauthConfig.clientId=$CLIENT_ID \\",
            "    --set config.defaultRemoteBackend.authConfig.oauthConfig.clientSecret=$CLIENT_SECRET",
        ],
        || {
            p.helm_install(&[])?;
            let agent = "app.kubernetes.io/component=agent";
            let controller = "app.kubernetes.io/component=controller";
            c.wait_pods_ready("default", agent, c.node_names().len(), product::WAIT)?;
            c.wait_pods_ready("default", controller, 2, product::WAIT)?;
            Ok(())
        },
    )
    .with_context(|| p.report())?;
    step(
        ci,
        "Deploying the model: the seed README's php-apache Deployment and Service",
        &["kubectl apply -f php-apache.yaml"],
        || {
            c.apply("default", PHP_APACHE)?;
            c.wait_pods_ready("default", "run=php-apache", 1, product::WAIT)?;
            Ok(())
        },
    )?;
    step(
        ci,
        "Applying the seed README's ModelDeployment",
        &["kubectl apply -f model-deployment.yaml"],
        || {
            c.apply(
                "default",
                include_str!("../../tests/fixtures/model-deployment.yaml"),
            )?;
            let nodes = c.node_names().len();
            c.wait_for("the decision applied on every node", product::WAIT, || {
                Ok(product::md_status(c)?["agents"]["applied"] == nodes)
            })
        },
    )
    .with_context(|| p.report())?;
    println!("\n$ kubectl get modeldeployment");
    print!("{}", c.kubectl(&["get", "modeldeployment"])?);

    let client_node = c.node_names()[0].clone();
    step(
        ci,
        "Starting the README's client loop in a pod",
        &[&format!(
            "kubectl run curl-check --rm -it --image=curlimages/curl -- sh -c \"{}\"",
            product::SEED_CLIENT
                .replace('"', "\\\"")
                .replace('$', "\\$")
        )],
        || product::start_client(c, "curl-check", &client_node),
    )?;
    println!("\n==> Its answers, as `kubectl logs -f curl-check` shows them");
    let started = std::time::SystemTime::now();
    let mut follow = std::process::Command::new(c.binaries().kubectl());
    follow
        .arg(format!("--kubeconfig={}", c.kubeconfig().display()))
        .args([
            "logs",
            "-f",
            "--timestamps",
            "-n",
            "default",
            "curl-check",
            "--since=1s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // Killed when the demo ends, however it ends.
    let mut logs = beamlit_testbed::spawn(follow, None).context("kubectl logs -f")?;
    let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
    let reader = {
        let requests = requests.clone();
        let stdout = logs.take_stdout().context("the client's log")?;
        std::thread::spawn(move || {
            let mut parser = product::AnswerParser::default();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Some(answer) = parser.line(&line) else {
                    continue;
                };
                let at = answer.at.duration_since(started).unwrap_or_default();
                let route = match (answer.ok, answer.beamlit) {
                    (true, true) => Route::Beamlit,
                    (true, false) => Route::Local(String::new()),
                    (false, _) => Route::Failed(
                        answer
                            .text
                            .lines()
                            .find(|l| l.contains("curl:") || l.starts_with("HTTP/"))
                            .unwrap_or("no answer")
                            .to_string(),
                    ),
                };
                print_request(at, &route);
                if let Ok(mut r) = requests.lock() {
                    r.push(Request { at, route });
                }
            }
        })
    };
    let elapsed = || started.elapsed().unwrap_or_default();
    first_after(
        &requests,
        Duration::ZERO,
        &|r| matches!(r, Route::Local(_)),
        Duration::from_secs(30),
    )?;
    sleep_interruptibly(Duration::from_secs(3))?;

    println!(
        "\n==> The model fails: scaling php-apache to 0 replicas\n    $ kubectl scale deployment php-apache --replicas=0"
    );
    let down = elapsed();
    product::scale(c, 0)?;
    let first_remote = first_after(
        &requests,
        down,
        &|r| *r == Route::Beamlit,
        Duration::from_secs(30),
    )?;
    sleep_interruptibly(Duration::from_secs(5))?;
    println!("\n$ kubectl get modeldeployment");
    print!("{}", c.kubectl(&["get", "modeldeployment"])?);

    println!(
        "\n==> The model is back: scaling php-apache to 1 replica\n    $ kubectl scale deployment php-apache --replicas=1"
    );
    let up = elapsed();
    product::scale(c, 1)?;
    let first_local = first_after(
        &requests,
        up,
        &|r| matches!(r, Route::Local(_)),
        Duration::from_secs(90),
    )?;
    sleep_interruptibly(Duration::from_secs(3))?;
    let end = elapsed();
    logs.kill()?;
    let _ = reader.join();
    // The new pod's CPU reaches metrics-server within its resolution (15 s): until then the
    // metric is unavailable, after that the decision is Healthy.
    let mut decided = product::md_status(c)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    while decided["reason"] != "Healthy" && Instant::now() < deadline {
        interrupted()?;
        std::thread::sleep(Duration::from_millis(500));
        decided = product::md_status(c)?;
    }
    println!("\n$ kubectl get modeldeployment");
    print!("{}", c.kubectl(&["get", "modeldeployment"])?);
    let requests = requests.lock().map(|r| r.clone()).unwrap_or_default();
    let counts = Summary {
        requests: &requests,
        down,
        up,
        end,
        first_remote,
        first_local,
        token_requests: p.fake.stats()?.token_requests,
        decided,
    }
    .print(&args.out)?;
    let hint = format!(
        "\
             kubectl --kubeconfig {kc} get modeldeployment -A\n  \
             kubectl --kubeconfig {kc} scale deployment php-apache --replicas=0\n  \
             kubectl --kubeconfig {kc} exec ds/beamlit-controller-agent -- beamlit-agent inspect",
        kc = c.kubeconfig().display(),
    );
    finish(args.keep, &hint, counts)
}

fn agent_cgroup(agent: &beamlit_testbed::AgentFixture) -> &Path {
    agent.cgroup()
}

fn sleep_interruptibly(d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        interrupted()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Requests over time, one tick each, coloured by route (local green, Beamlit blue, failed
/// red), with the two scale commands marked.
fn timeline_svg(requests: &[Request], down: Duration, up: Duration, end: Duration) -> String {
    let (width, height, left, right) = (960.0, 240.0, 60.0, 20.0);
    let span = end.as_secs_f64().max(1.0);
    let x = |t: Duration| left + (width - left - right) * t.as_secs_f64() / span;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">Requests to the php-apache Service from the client pod (one tick each)</text>\n"
    );
    let lanes = [
        ("local", 60.0, "#2e7d32"),
        ("Beamlit", 110.0, "#1565c0"),
        ("failed", 160.0, "#c62828"),
    ];
    for (name, y, colour) in lanes {
        svg.push_str(&format!(
            "<text x=\"8\" y=\"{}\" fill=\"{colour}\">{name}</text>\n",
            y + 14.0
        ));
    }
    for r in requests {
        let (y, colour) = match r.route {
            Route::Local(_) => (lanes[0].1, lanes[0].2),
            Route::Beamlit => (lanes[1].1, lanes[1].2),
            Route::Failed(_) => (lanes[2].1, lanes[2].2),
        };
        svg.push_str(&format!(
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{y}\" y2=\"{}\" stroke=\"{colour}\" stroke-width=\"2\"/>\n",
            y + 20.0,
            x = x(r.at)
        ));
    }
    for (t, label) in [(down, "scale --replicas=0"), (up, "scale --replicas=1")] {
        svg.push_str(&format!(
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"40\" y2=\"190\" stroke=\"black\" stroke-dasharray=\"4 3\"/>\n\
             <text x=\"{tx:.1}\" y=\"36\">{label}</text>\n",
            x = x(t),
            tx = x(t) + 4.0
        ));
    }
    svg.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{}\" y1=\"200\" y2=\"200\" stroke=\"#999\"/>\n\
         <text x=\"{left}\" y=\"218\">0 s</text>\n<text x=\"{}\" y=\"218\" text-anchor=\"end\">{:.0} s</text>\n</svg>\n",
        width - right,
        width - right,
        span
    ));
    svg
}
