//! The controller against a real kube-apiserver, with the seed's php-apache served by simulated
//! pods: readiness drives the decision in status within a second, input errors become
//! conditions and Events, and the decision survives a controller restart.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::{
    ChildGuard, TestDir, cluster::TestCluster, controller_bin, crds::install_model_deployment_crd,
    require_privileges, spawn,
};

const PHP_APACHE: &str = include_str!("../fixtures/php-apache.yaml");

/// The seed README's ModelDeployment, pointed at the test's namespace instead of `default`.
fn seed_model_deployment(namespace: &str) -> String {
    include_str!("../fixtures/model-deployment.yaml")
        .replace("namespace: default", &format!("namespace: {namespace}"))
}

/// `kubectl scale deployment php-apache --replicas=N`, as the seed README does.
fn scale(cluster: &TestCluster, namespace: &str, replicas: u32) -> Result<()> {
    let replicas = format!("--replicas={replicas}");
    cluster.kubectl(&[
        "scale",
        "deployment",
        "php-apache",
        &replicas,
        "-n",
        namespace,
    ])?;
    Ok(())
}

/// The seed's php-apache (Ready) and its ModelDeployment, in `namespace`.
fn deploy_seed(cluster: &TestCluster, namespace: &str) -> Result<()> {
    cluster.apply(namespace, PHP_APACHE)?;
    cluster.wait_deployment_ready(namespace, "php-apache", 1, Duration::from_secs(60))?;
    cluster.apply(namespace, &seed_model_deployment(namespace))?;
    Ok(())
}

struct ControllerProcess {
    child: Option<ChildGuard>,
    dir: TestDir,
    kubeconfig: std::path::PathBuf,
    extra_args: Vec<String>,
    starts: u32,
}

impl ControllerProcess {
    /// Without leader election, and handling only the test's namespace: tests run several
    /// controllers at once, and two controllers deciding for one object would both write.
    fn start(cluster: &TestCluster, namespace: &str) -> Result<Self> {
        Self::start_with(
            cluster,
            &["--leader-election=false", "--namespaces", namespace],
        )
    }

    fn start_with(cluster: &TestCluster, extra_args: &[&str]) -> Result<Self> {
        let mut c = Self {
            child: None,
            dir: TestDir::new("controller")?,
            kubeconfig: cluster.kubeconfig().to_path_buf(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            starts: 0,
        };
        c.spawn()?;
        Ok(c)
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("controller-{}.log", self.starts)))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = Command::new(controller_bin());
        cmd.args(["--resync-secs", "1", "--stabilization-window-secs", "5"])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(&self.extra_args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(spawn(cmd, None)?);
        Ok(())
    }

    fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
        }
        self.spawn()
    }

    fn pid(&mut self) -> Option<u32> {
        self.child.as_mut().map(|c| c.pid())
    }

    fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
        }
        Ok(())
    }

    fn wait_log(&self, needle: &str, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        while !self.log().contains(needle) {
            if started.elapsed() > timeout {
                bail!(
                    "controller did not log {needle:?} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(started.elapsed())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("controller-{}.log", self.starts)))
            .unwrap_or_default()
    }
}

fn status(cluster: &TestCluster, ns: &str, name: &str) -> Result<serde_json::Value> {
    let out = cluster.kubectl(&["get", "modeldeployment", name, "-n", ns, "-o", "json"])?;
    let md: serde_json::Value = serde_json::from_str(&out)?;
    Ok(md["status"].clone())
}

/// Polls the status until `check` holds; returns how long it took.
fn wait_status(
    cluster: &TestCluster,
    ns: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let s = status(cluster, ns, name)?;
        if check(&s) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("status never showed {what} within {timeout:?}: {s}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn condition(status: &serde_json::Value, type_: &str) -> serde_json::Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or_default()
}

fn events(cluster: &TestCluster, ns: &str) -> Result<String> {
    cluster.kubectl(&[
        "get",
        "events",
        "-n",
        ns,
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
    ])
}

#[test]
fn scaling_to_zero_offloads_everything_within_a_second_and_back() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlfail")?;
    deploy_seed(cluster, ns.name())?;
    let controller = ControllerProcess::start(cluster, ns.name())?;

    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "1 ready endpoint",
        |s| s["readyEndpoints"] == 1 && s["offloadPercent"] == 0,
    )
    .with_context(|| controller.log())?;
    let s = status(cluster, ns.name(), "php-apache")?;
    assert_eq!(s["service"]["port"], 80, "{s}");
    assert_eq!(s["workload"]["kind"], "Deployment", "{s}");
    assert_eq!(s["workload"]["readyReplicas"], 1, "{s}");
    assert!(
        s["service"]["addresses"][0]
            .as_str()
            .is_some_and(|a| a.starts_with("10.96.")),
        "{s}"
    );
    // The CPU metric has no source yet: reported, and never a reason to offload.
    assert!(s["metrics"][0]["error"].as_str().is_some(), "{s}");

    scale(cluster, ns.name(), 0)?;
    let started = Instant::now();
    while !cluster.ready_endpoints(ns.name(), "php-apache")?.is_empty() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the EndpointSlice kept ready endpoints");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(5),
        "100%/NoReadyEndpoints",
        |s| s["offloadPercent"] == 100 && s["reason"] == "NoReadyEndpoints",
    )
    .with_context(|| controller.log())?;
    println!("no ready endpoints -> status 100% in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(events(cluster, ns.name())?.contains("NoReadyEndpoints"));

    scale(cluster, ns.name(), 1)?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(60),
        "back to 0%",
        |s| s["offloadPercent"] == 0 && s["readyEndpoints"] == 1,
    )
    .with_context(|| controller.log())?;
    Ok(())
}

#[test]
fn input_errors_become_conditions_and_events_and_recover() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlerr")?;
    let md = seed_model_deployment(ns.name());
    let absent = md.replacen(
        "  serviceRef:\n    name: php-apache",
        "  serviceRef:\n    name: absent",
        1,
    );
    cluster.apply(ns.name(), &absent)?;
    let controller = ControllerProcess::start(cluster, ns.name())?;

    let ready_reason = |s: &serde_json::Value| {
        s["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or("").to_string(),
                    c["reason"].as_str().unwrap_or("").to_string(),
                )
            })
    };
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "ServiceNotFound",
        |s| ready_reason(s) == Some(("False".into(), "ServiceNotFound".into())),
    )
    .with_context(|| controller.log())?;
    let s = status(cluster, ns.name(), "php-apache")?;
    let message = s["conditions"][0]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("absent") && message.contains("spec.serviceRef"),
        "{s}"
    );
    // The Deployment does not exist yet either.
    let workload = condition(&s, "WorkloadFound");
    assert_eq!(workload["status"], "False", "{s}");
    assert!(
        workload["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.modelSourceRef")),
        "{s}"
    );
    let events_now = events(cluster, ns.name())?;
    assert!(
        events_now.contains("ServiceNotFound") && events_now.contains("WorkloadNotFound"),
        "{events_now}"
    );

    // A named port the Service does not have.
    cluster.apply(ns.name(), PHP_APACHE)?;
    cluster.apply(
        ns.name(),
        &md.replace("    targetPort: 80", "    targetPort: grpc"),
    )?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "PortNotFound",
        |s| ready_reason(s) == Some(("False".into(), "PortNotFound".into())),
    )
    .with_context(|| controller.log())?;

    // Fixed: the controller, still running, recovers.
    cluster.apply(ns.name(), &md)?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "Ready",
        |s| {
            ready_reason(s) == Some(("True".into(), "Resolved".into()))
                && condition(s, "WorkloadFound")["status"] == "True"
        },
    )
    .with_context(|| controller.log())?;
    Ok(())
}

#[test]
fn a_restarted_controller_keeps_the_decision() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlrestart")?;
    deploy_seed(cluster, ns.name())?;
    let mut controller = ControllerProcess::start(cluster, ns.name())?;
    scale(cluster, ns.name(), 0)?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "100%",
        |s| s["offloadPercent"] == 100,
    )
    .with_context(|| controller.log())?;
    let before = status(cluster, ns.name(), "php-apache")?;

    controller.restart()?;
    // Several resyncs of the new controller.
    std::thread::sleep(Duration::from_secs(5));
    let after = status(cluster, ns.name(), "php-apache")?;
    assert_eq!(after["offloadPercent"], 100, "{after}");
    assert_eq!(after["reason"], before["reason"], "{after}");
    assert_eq!(
        after["since"], before["since"],
        "the decision was made anew: {after}"
    );
    assert!(
        controller.log().contains("serving /metrics"),
        "{}",
        controller.log()
    );
    Ok(())
}

/// A metric the test controls, in Prometheus' text format on a loopback port.
struct Exporter {
    addr: std::net::SocketAddr,
    value: std::sync::Arc<std::sync::Mutex<f64>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Exporter {
    fn start(initial: f64) -> Result<Self> {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let value = std::sync::Arc::new(std::sync::Mutex::new(initial));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (v, st) = (value.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let mut buf = [0u8; 2048];
                        let _ = conn.read(&mut buf);
                        let current = v.lock().map(|g| *g).unwrap_or(f64::NAN);
                        let body = format!(
                            "# TYPE model_load gauge\nmodel_load{{model=\"php-apache\"}} {current}\n"
                        );
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self { addr, value, stop })
    }

    fn set(&self, v: f64) {
        if let Ok(mut g) = self.value.lock() {
            *g = v;
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Debian's Prometheus on loopback, scraping the exporter every second.
fn start_prometheus(dir: &TestDir, target: std::net::SocketAddr) -> Result<(ChildGuard, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  \
             - job_name: model\n    static_configs: [{{targets: [\"{target}\"]}}]\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = spawn(cmd, None)?;
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        let ready = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if ready {
            return Ok((child, url));
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "Prometheus did not start: {}",
                std::fs::read_to_string(dir.join("prometheus.log"))?
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_external_metric_from_prometheus_drives_offloading_with_a_stabilization_window() -> Result<()>
{
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlprom")?;
    cluster.apply(ns.name(), PHP_APACHE)?;
    cluster.wait_deployment_ready(ns.name(), "php-apache", 1, Duration::from_secs(60))?;
    let exporter = Exporter::start(5.0)?;
    let dir = TestDir::new("prometheus")?;
    let (_prometheus, url) = start_prometheus(&dir, exporter.addr)?;
    let md = seed_model_deployment(ns.name()).replace(
        "      - type: Resource\n        resource:\n          name: cpu\n          target:\n            type: Utilization\n            averageUtilization: 90\n",
        "      - type: External\n        external:\n          metric:\n            name: model_load\n            selector:\n              matchLabels:\n                model: php-apache\n          target:\n            type: Value\n            value: \"10\"\n",
    );
    assert!(
        md.contains("model_load"),
        "the seed's metric block moved: {md}"
    );
    cluster.apply(ns.name(), &md)?;
    let controller = ControllerProcess::start_with(
        cluster,
        &[
            "--leader-election=false",
            "--namespaces",
            ns.name(),
            "--prometheus-url",
            &url,
        ],
    )?;
    let wait = |what: &str, timeout: u64, check: &dyn Fn(&serde_json::Value) -> bool| {
        wait_status(
            cluster,
            ns.name(),
            "php-apache",
            Duration::from_secs(timeout),
            what,
            check,
        )
        .with_context(|| controller.log())
    };

    wait("metric 5 of 10: healthy", 30, &|s| {
        s["metrics"][0]["current"] == "5" && s["offloadPercent"] == 0 && s["reason"] == "Healthy"
    })?;
    assert_eq!(
        status(cluster, ns.name(), "php-apache")?["metrics"][0]["target"],
        "10"
    );

    exporter.set(50.0);
    let took = wait("metric 50 of 10: offload 50%", 15, &|s| {
        s["offloadPercent"] == 50 && s["reason"] == "MetricAboveTarget"
    })?;
    println!("metric above target -> 50% in {took:?} (1 s scrapes, 1 s resync)");

    exporter.set(5.0);
    let dropped = Instant::now();
    wait("back below: still offloading while stabilizing", 15, &|s| {
        s["metrics"][0]["current"] == "5"
            && s["offloadPercent"] == 50
            && s["reason"] == "Stabilizing"
    })?;
    wait("after the 5 s window: 0%", 20, &|s| {
        s["offloadPercent"] == 0 && s["reason"] == "Healthy"
    })?;
    let held = dropped.elapsed();
    println!("offloading stopped {held:?} after the metric fell (window 5 s)");
    assert!(
        held >= Duration::from_secs(4),
        "stopped before the window: {held:?}"
    );

    // And it fires again (the earlier product fired once per spec change).
    exporter.set(50.0);
    wait("above again: offload again", 15, &|s| {
        s["offloadPercent"] == 50
    })?;
    Ok(())
}

#[test]
fn one_leader_decides_and_a_follower_takes_over_when_it_dies() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctllead")?;
    deploy_seed(cluster, ns.name())?;
    let lease = format!("beamlit-test-{}", std::process::id());
    let args = [
        "--namespaces",
        ns.name(),
        "--leader-election-namespace",
        ns.name(),
        "--leader-election-name",
        &lease,
        "--lease-duration-secs",
        "3",
    ];
    let mut first = ControllerProcess::start_with(cluster, &args)?;
    first.wait_log("became the leader", Duration::from_secs(20))?;
    let second = ControllerProcess::start_with(cluster, &args)?;
    second.wait_log(
        "waiting for the lease held by another controller",
        Duration::from_secs(20),
    )?;
    let holder = cluster.kubectl(&[
        "get",
        "lease",
        &lease,
        "-n",
        ns.name(),
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    let first_pid = first.pid().context("first controller running")?;
    assert!(
        holder.ends_with(&format!("-{first_pid}")),
        "holder {holder}, leader pid {first_pid}"
    );
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "a decision",
        |s| s["readyEndpoints"] == 1,
    )
    .with_context(|| first.log())?;
    assert!(
        !second.log().contains("became the leader"),
        "two leaders:\n{}",
        second.log()
    );

    // The leader dies without a word; the follower takes over once the Lease expires.
    first.kill()?;
    let took = second.wait_log("became the leader", Duration::from_secs(15))?;
    println!("follower became the leader {took:?} after the leader was killed (lease 3 s)");
    scale(cluster, ns.name(), 0)?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "the new leader's 100%",
        |s| s["offloadPercent"] == 100,
    )
    .with_context(|| second.log())?;
    Ok(())
}

#[test]
fn the_binary_refuses_a_bad_configuration_naming_the_key() -> Result<()> {
    let dir = TestDir::new("ctlconfig")?;
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "stabilizationWindowSeconds: 30\nnamespaces: [models]\nleaderElection: {enabled: false}\n",
    )?;
    let out = Command::new(controller_bin())
        .args(["--check-config", "--config"])
        .arg(&good)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration valid"));

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "resyncSeconds: 5\nleaderElection:\n  leaseDuration: 5\n",
    )?;
    let out = Command::new(controller_bin())
        .args(["--check-config", "--config"])
        .arg(&bad)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad configuration was accepted");
    assert!(
        stderr.contains("leaseDuration") && stderr.contains("line 3"),
        "the error does not name the key and line: {stderr}"
    );
    Ok(())
}
