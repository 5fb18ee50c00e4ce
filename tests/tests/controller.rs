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
    r#"apiVersion: deployment.beamlit.com/v1alpha1
kind: ModelDeployment
metadata:
  name: php-apache
spec:
  model: "php-apache"
  environment: "production"
  modelSourceRef:
    apiVersion: apps/v1
    kind: Deployment
    name: php-apache
    namespace: default
  serviceRef:
    name: php-apache
    namespace: default
    targetPort: 80
  offloadingConfig:
    behavior:
      percentage: 50
    metrics:
      - type: Resource
        resource:
          name: cpu
          target:
            type: Utilization
            averageUtilization: 90
"#
    .replace("namespace: default", &format!("namespace: {namespace}"))
}

struct ControllerProcess {
    child: Option<ChildGuard>,
    dir: TestDir,
    kubeconfig: std::path::PathBuf,
    starts: u32,
}

impl ControllerProcess {
    fn start(cluster: &TestCluster) -> Result<Self> {
        let mut c = Self {
            child: None,
            dir: TestDir::new("controller")?,
            kubeconfig: cluster.kubeconfig().to_path_buf(),
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
        cmd.args(["--resync-secs", "2", "--stabilization-window-secs", "5"])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
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
    cluster.apply(ns.name(), PHP_APACHE)?;
    cluster.wait_deployment_ready(ns.name(), "php-apache", 1, Duration::from_secs(60))?;
    cluster.apply(ns.name(), &seed_model_deployment(ns.name()))?;
    let controller = ControllerProcess::start(cluster)?;

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
    assert!(
        s["service"]["addresses"][0]
            .as_str()
            .is_some_and(|a| a.starts_with("10.96.")),
        "{s}"
    );
    // The CPU metric has no source yet: reported, and never a reason to offload.
    assert!(s["metrics"][0]["error"].as_str().is_some(), "{s}");

    cluster.kubectl(&[
        "scale",
        "deployment",
        "php-apache",
        "--replicas=0",
        "-n",
        ns.name(),
    ])?;
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

    cluster.kubectl(&[
        "scale",
        "deployment",
        "php-apache",
        "--replicas=1",
        "-n",
        ns.name(),
    ])?;
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
    let controller = ControllerProcess::start(cluster)?;

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
    assert!(events(cluster, ns.name())?.contains("ServiceNotFound"));

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
        |s| ready_reason(s) == Some(("True".into(), "Resolved".into())),
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
    cluster.apply(ns.name(), PHP_APACHE)?;
    cluster.wait_deployment_ready(ns.name(), "php-apache", 1, Duration::from_secs(60))?;
    cluster.apply(ns.name(), &seed_model_deployment(ns.name()))?;
    let mut controller = ControllerProcess::start(cluster)?;
    cluster.kubectl(&[
        "scale",
        "deployment",
        "php-apache",
        "--replicas=0",
        "-n",
        ns.name(),
    ])?;
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
