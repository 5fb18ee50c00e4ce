//! The seed README's walkthrough as test steps (its php-apache and ModelDeployment, `kubectl
//! scale`), the controller as a process, and a metric source the test controls (an exporter and
//! Debian's Prometheus on loopback). Shared by the controller and agent tests and the benchmarks.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use std::sync::atomic::{AtomicU16, Ordering};

use anyhow::{Context as _, Result, bail};

use crate::{
    AgentFixture, ChildGuard, FakeBeamlit, FakeBeamlitOptions, Pod, TestCgroup, TestDir, Topology,
    cluster::{TestCluster, TestNamespace},
    controller_bin,
    crds::install_model_deployment_crd,
    spawn,
};

pub const PHP_APACHE: &str = include_str!("../fixtures/php-apache.yaml");

/// The seed README's ModelDeployment, pointed at the test's namespace instead of `default`.
pub fn seed_model_deployment(namespace: &str) -> String {
    include_str!("../fixtures/model-deployment.yaml")
        .replace("namespace: default", &format!("namespace: {namespace}"))
}

/// `kubectl scale deployment php-apache --replicas=N`, as the seed README does.
pub fn scale(cluster: &TestCluster, namespace: &str, replicas: u32) -> Result<()> {
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
/// The name of the (first) php-apache pod in `namespace`.
pub fn php_apache_pod(cluster: &TestCluster, namespace: &str) -> Result<String> {
    let name = cluster.kubectl(&[
        "get",
        "pods",
        "-n",
        namespace,
        "-l",
        "run=php-apache",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    match name.trim() {
        "" => bail!("no php-apache pod in {namespace}"),
        n => Ok(n.to_string()),
    }
}

pub fn deploy_seed(cluster: &TestCluster, namespace: &str) -> Result<()> {
    cluster.apply(namespace, PHP_APACHE)?;
    cluster.wait_deployment_ready(namespace, "php-apache", 1, Duration::from_secs(60))?;
    cluster.apply(namespace, &seed_model_deployment(namespace))?;
    Ok(())
}

pub struct ControllerProcess {
    child: Option<ChildGuard>,
    dir: TestDir,
    kubeconfig: std::path::PathBuf,
    extra_args: Vec<String>,
    starts: u32,
    /// Runs inside this network namespace (by name), if set.
    netns: Option<String>,
    /// The loopback port of `/metrics` and the probes, of the current process.
    http_port: u16,
}

impl ControllerProcess {
    /// Without leader election, and handling only the test's namespace: tests run several
    /// controllers at once, and two controllers deciding for one object would both write.
    pub fn start(cluster: &TestCluster, namespace: &str) -> Result<Self> {
        Self::start_with(
            cluster,
            &["--leader-election=false", "--namespaces", namespace],
        )
    }

    /// The controller inside `netns` (to reach a remote there, e.g. the fake Beamlit's API),
    /// talking to the API server through a relay.
    pub fn start_in_netns(
        cluster: &TestCluster,
        netns: &crate::Netns,
        extra_args: &[&str],
    ) -> Result<(Self, crate::cluster::relay::ApiRelay)> {
        let upstream: std::net::SocketAddr = cluster
            .server()
            .trim_start_matches("https://")
            .parse()
            .context("the API server's address")?;
        let relay = crate::cluster::relay::ApiRelay::start(netns, upstream)?;
        let mut c = Self::unstarted(cluster, extra_args, Some(netns.name()))?;
        let original = std::fs::read_to_string(cluster.kubeconfig())?;
        let relayed = c.dir.join("kubeconfig");
        std::fs::write(&relayed, relay.kubeconfig(&original, cluster.server()))?;
        c.kubeconfig = relayed;
        c.spawn()?;
        Ok((c, relay))
    }

    pub fn start_with(cluster: &TestCluster, extra_args: &[&str]) -> Result<Self> {
        let mut c = Self::unstarted(cluster, extra_args, None)?;
        c.spawn()?;
        Ok(c)
    }

    fn unstarted(cluster: &TestCluster, extra_args: &[&str], netns: Option<&str>) -> Result<Self> {
        Ok(Self {
            child: None,
            dir: TestDir::new("controller")?,
            kubeconfig: cluster.kubeconfig().to_path_buf(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            starts: 0,
            netns: netns.map(str::to_string),
            http_port: 0,
        })
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("controller-{}.log", self.starts)))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(controller_bin());
                c
            }
            None => Command::new(controller_bin()),
        };
        // A test that sets its own resync keeps it (clap refuses a flag given twice).
        if !self.extra_args.iter().any(|a| a == "--resync-secs") {
            cmd.args(["--resync-secs", "1"]);
        }
        cmd.args(["--stabilization-window-secs", "5"])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(&self.extra_args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(spawn(cmd, None)?);
        self.http_port = port;
        Ok(())
    }

    /// The value of the counter or gauge `name` (no labels) on the controller's `/metrics`.
    pub fn metric(&self, name: &str) -> Result<f64> {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.http_port))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: controller\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .with_context(|| format!("no {name} on /metrics:\n{text}"))?
            .trim()
            .parse()
            .with_context(|| format!("{name} on /metrics"))
    }

    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
        }
        self.spawn()
    }

    pub fn pid(&mut self) -> Option<u32> {
        self.child.as_mut().map(|c| c.pid())
    }

    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
        }
        Ok(())
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<Duration> {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("controller-{}.log", self.starts)))
            .unwrap_or_default()
    }

    /// [`wait_status`] of the seed's `php-apache` ModelDeployment in `ns`; a failure carries
    /// this controller's log.
    pub fn wait_seed_status(
        &self,
        cluster: &TestCluster,
        ns: &str,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<Duration> {
        wait_status(cluster, ns, "php-apache", timeout, what, check).with_context(|| self.log())
    }
}

pub fn status(cluster: &TestCluster, ns: &str, name: &str) -> Result<serde_json::Value> {
    let out = cluster.kubectl(&["get", "modeldeployment", name, "-n", ns, "-o", "json"])?;
    let md: serde_json::Value = serde_json::from_str(&out)?;
    Ok(md["status"].clone())
}

/// Polls the status until `check` holds; returns how long it took.
pub fn wait_status(
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

pub fn condition(status: &serde_json::Value, type_: &str) -> serde_json::Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or_default()
}

pub fn events(cluster: &TestCluster, ns: &str) -> Result<String> {
    cluster.kubectl(&[
        "get",
        "events",
        "-n",
        ns,
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
    ])
}

/// A metric the test controls, in Prometheus' text format on a loopback port.
pub struct Exporter {
    pub addr: std::net::SocketAddr,
    value: std::sync::Arc<std::sync::Mutex<f64>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Exporter {
    pub fn start(initial: f64) -> Result<Self> {
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

    pub fn set(&self, v: f64) {
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
pub fn start_prometheus(
    dir: &TestDir,
    target: std::net::SocketAddr,
) -> Result<(ChildGuard, String)> {
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

pub const CLIENT_ID: &str = "agents-test";
pub const CLIENT_SECRET: &str = "agents-s3cret";
const WAIT: Duration = Duration::from_secs(60);

/// Tunnel ports on the shared node address: one per agent, never reused in this process.
static NEXT_TUNNEL_PORT: AtomicU16 = AtomicU16::new(15101);

/// One test's world: its namespaces (models; agents and credentials), the fake Beamlit, and
/// the controller configured with Beamlit as its default remote backend.
pub struct OffloadBed<'c> {
    pub cluster: &'c TestCluster,
    pub models: TestNamespace<'c>,
    pub agents: TestNamespace<'c>,
    pub fake: FakeBeamlit,
    pub dir: TestDir,
    pub fake_pod: Pod,
}

impl<'c> OffloadBed<'c> {
    pub fn new(cluster: &'c TestCluster, hint: &str) -> Result<Self> {
        install_model_deployment_crd(cluster)?;
        let models = cluster.namespace(hint)?;
        let agents = cluster.namespace(&format!("{hint}-agents"))?;
        cluster.kubectl(&[
            "create",
            "secret",
            "generic",
            "beamlit-credentials",
            "-n",
            agents.name(),
            &format!("--from-literal=clientSecret={CLIENT_SECRET}"),
        ])?;
        let fake_pod = cluster.add_unmanaged_pod("beamlit")?;
        let fake = FakeBeamlit::start(
            &fake_pod.netns,
            FakeBeamlitOptions {
                https: vec![(fake_pod.ipv4, 8443).into()],
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                require_token: true,
                ..FakeBeamlitOptions::default()
            },
        )?;
        let dir = TestDir::new(hint)?;
        Ok(Self {
            cluster,
            models,
            agents,
            fake,
            dir,
            fake_pod,
        })
    }

    pub fn ns(&self) -> &str {
        self.models.name()
    }

    /// The Helm chart rendered for this bed (release namespace: the agents' namespace), with
    /// the fake Beamlit as the default remote backend and the test's pace (see
    /// [`crate::chart::TestReleaseValues`]): the controller and the agents run from what the
    /// chart renders, not from hand-written arguments.
    pub fn render(&self, tunnel_port: u16) -> Result<crate::chart::Rendered> {
        let remote = format!("{}:8443", self.fake_pod.ipv4);
        let token_url = format!("https://{remote}/oauth/token");
        let values = crate::chart::TestReleaseValues {
            models_namespace: self.ns(),
            remote: &remote,
            workspace: "ws",
            client_id: CLIENT_ID,
            token_url: &token_url,
            secret_name: "beamlit-credentials",
            ca_file: Some(self.fake.ca_pem()),
            tunnel_port,
        };
        crate::chart::render(self.agents.name(), &values.values())
    }

    /// The controller with the chart's arguments and configuration (plus `extra`).
    pub fn controller_with(&self, extra: &[&str]) -> Result<ControllerProcess> {
        let rendered = self.render(NEXT_TUNNEL_PORT.load(Ordering::Relaxed))?;
        let host = crate::chart::HostEnv::new(&self.dir.join("controller-pod")).pod(
            "controller-0",
            self.agents.name(),
            "beamlit-node-1",
            &Topology::NODE_V4.to_string(),
        );
        let command = rendered.controller()?.command_line(&rendered, &host)?;
        let mut args: Vec<&str> = command.args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        ControllerProcess::start_with(self.cluster, &args)
    }

    pub fn controller(&self) -> Result<ControllerProcess> {
        self.controller_with(&[])
    }

    /// A cluster-mode agent for `node` with the chart's arguments, attached to `cgroup` (the
    /// node's pods), its tunnel in the node namespace on a port of its own.
    pub fn agent(&self, node: &str, cgroup: &TestCgroup) -> Result<AgentFixture> {
        let port = NEXT_TUNNEL_PORT.fetch_add(1, Ordering::Relaxed);
        let rendered = self.render(port)?;
        let netns = format!("/var/run/netns/{}", self.cluster.node_netns());
        AgentFixture::start_rendered(
            &rendered,
            self.cluster.kubeconfig(),
            cgroup.path(),
            self.agents.name(),
            node,
            &Topology::NODE_V4.to_string(),
            &["--tunnel-netns", &netns],
        )
    }

    /// The Service address the controller resolved (the seed's php-apache, port 80).
    pub fn service_address(&self) -> Result<String> {
        let s = status(self.cluster, self.ns(), "php-apache")?;
        let ip = s["service"]["addresses"][0]
            .as_str()
            .with_context(|| format!("no resolved Service in {s}"))?;
        Ok(format!("{ip}:80"))
    }

    pub fn wait_applied(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<()> {
        wait_status(self.cluster, self.ns(), "php-apache", WAIT, what, check)?;
        Ok(())
    }
}
