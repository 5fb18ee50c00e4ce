//! A real Kubernetes control plane for tests and the demo, with pods as
//! network namespaces.
//!
//! - [`KubeBinaries`]: pinned etcd, kube-apiserver, kube-controller-manager,
//!   kubectl and helm, built from their Go modules into `~/.cache/beamlit/bin/`.
//! - [`ControlPlane`]: etcd + kube-apiserver + kube-controller-manager on
//!   127.0.0.1 with a PKI and kubeconfig generated on the spot.
//! - [`SimulatedNodes`]: Node objects, a scheduler+kubelet that runs each pod
//!   as a network namespace with a small HTTP server, and a kube-proxy
//!   replacement (nftables DNAT from EndpointSlices) in the node namespace.
//! - [`TestCluster`]: all of the above for a test binary, torn down on drop
//!   (and at process exit for [`TestCluster::shared`]).
//!
//! ```no_run
//! use beamlit_testbed::cluster::TestCluster;
//! # fn main() -> anyhow::Result<()> {
//! if !beamlit_testbed::require_privileges() {
//!     return Ok(());
//! }
//! let cluster = TestCluster::shared()?;
//! let ns = cluster.namespace("example")?;
//! cluster.apply(ns.name(), "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n")?;
//! # Ok(())
//! # }
//! ```

pub mod control_plane;
pub mod node_images;
mod node_sim;
pub mod node_tools;
pub mod real_cluster;
pub mod real_nodes;
pub use node_sim::NETNS_ANNOTATION;
pub mod pki;
pub mod proxy;
pub mod relay;
pub mod tools;

use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod as KPod, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

pub use control_plane::{ClusterState, ControlPlane, ControlPlaneOptions, SERVICE_CIDR};
pub use real_cluster::{Neighbour, RealCluster, RealNamespace};
pub use real_nodes::RealNodesOptions;
pub use tools::{HELM_VERSION, KUBERNETES_VERSION, KubeBinaries};

use crate::probe::{ProbeOptions, ProbeReport, run_probe};
use crate::tempdir::TestDir;
use crate::topology::{Pod, Topology};

/// Bounds every wait helper unless the caller passes its own timeout.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// The repository root (the workspace this crate belongs to).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Logs of the node simulator and kube-proxy replacement to stderr, at
/// `default_level` unless `RUST_LOG` says otherwise. Keeps an existing
/// subscriber.
fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only on a terminal (test output is usually captured into a file), and never with
    // NO_COLOR set, which tracing-subscriber's own default honours and `with_ansi` replaces.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// A kube client for `kubeconfig` (on the current tokio runtime).
pub async fn client_for(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("loading the kubeconfig")?;
    Client::try_from(config).context("building the kube client")
}

/// Simulated nodes: Node objects, pods as network namespaces, and the
/// kube-proxy replacement, all driven from a tokio runtime.
pub struct SimulatedNodes {
    state: Arc<node_sim::SimState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SimulatedNodes {
    /// Creates the node namespace, registers `nodes` Node objects named
    /// `beamlit-node-<i>`, and starts the pod and service watchers on `rt`.
    /// Pod servers are `netprobe` (`netprobe` is located like
    /// [`crate::netprobe_bin`]).
    pub fn start(client: Client, rt: &tokio::runtime::Handle, nodes: usize) -> Result<Self> {
        if nodes == 0 {
            bail!("at least one node is needed");
        }
        let netprobe = crate::try_netprobe_bin()?;
        let topology = Topology::new("cluster")?;
        proxy::prepare_node(topology.node())?;
        let node_netns = topology.node().name().to_string();
        let names = (1..=nodes).map(|i| format!("beamlit-node-{i}")).collect();
        let state = Arc::new(node_sim::SimState::new(
            topology,
            node_netns.clone(),
            names,
            netprobe,
        ));
        let mut this = Self {
            state: Arc::clone(&state),
            tasks: Vec::new(),
        };
        rt.block_on(node_sim::register_nodes(&client, &state))?;
        let synced = Arc::new(tokio::sync::Notify::new());
        let first_sync = Arc::clone(&synced);
        let notified = first_sync.notified();
        let c = client.clone();
        this.tasks.push(rt.spawn(async move {
            if let Err(e) = proxy::run(c, node_netns, synced).await {
                tracing::error!("kube-proxy replacement stopped: {e:#}");
            }
        }));
        let st = Arc::clone(&state);
        this.tasks.push(rt.spawn(async move {
            if let Err(e) = node_sim::run(client, st).await {
                tracing::error!("node simulator stopped: {e:#}");
            }
        }));
        // The first ruleset (routing and rejects for existing Services) is in
        // place before anyone uses the cluster.
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), notified)
                .await
                .map_err(|_| anyhow!("the kube-proxy replacement did not sync within 20 s"))
        })?;
        Ok(this)
    }

    /// The node namespace's name (the cluster network; Service rules live there).
    pub fn node_netns(&self) -> &str {
        &self.state.node_netns
    }

    pub fn node_names(&self) -> &[String] {
        &self.state.nodes
    }

    /// Pod `namespace/name`'s network namespace and address, while it runs.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.state.pod(namespace, name)
    }

    /// A pod namespace attached to the node that no Kubernetes object knows
    /// about (a client outside the cluster's view, e.g. for load).
    pub fn add_unmanaged_pod(&self, name: &str) -> Result<Pod> {
        self.state.with_topology(|t| t.add_pod(name))
    }

    /// Stops the watchers, kills every pod server, deletes every namespace.
    /// Idempotent. Node objects are left (the control plane usually goes next).
    pub fn shutdown(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.state.stop_all();
    }
}

impl Drop for SimulatedNodes {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs [`SimulatedNodes`] against the cluster of `kubeconfig` until SIGTERM
/// or SIGINT, then tears them down: the node process behind `cargo xtask
/// cluster up`. Creates `ready_file` once nodes and Service rules are in place.
pub fn run_nodes_daemon(kubeconfig: &Path, nodes: usize, ready_file: &Path) -> Result<()> {
    init_logging("info");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let client = rt.block_on(client_for(kubeconfig))?;
    let mut sim = SimulatedNodes::start(client, rt.handle(), nodes)?;
    std::fs::write(ready_file, sim.node_netns())
        .with_context(|| format!("writing {}", ready_file.display()))?;
    println!(
        "nodes {:?} up; node namespace {}",
        sim.node_names(),
        sim.node_netns()
    );
    let waited: Result<()> = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        Ok(())
    });
    println!("stopping nodes");
    sim.shutdown();
    rt.shutdown_timeout(Duration::from_secs(2));
    waited
}

/// What [`TestCluster::shutdown`] takes apart, in this order.
struct Parts {
    runtime: tokio::runtime::Runtime,
    nodes: SimulatedNodes,
    control_plane: ControlPlane,
    dir: TestDir,
}

/// A whole simulated cluster for tests: control plane on free loopback ports
/// in a per-process temp dir, one node, pods as namespaces, Service routing.
pub struct TestCluster {
    client: Client,
    handle: tokio::runtime::Handle,
    kubeconfig: PathBuf,
    binaries: KubeBinaries,
    server: String,
    node_netns: String,
    state: Arc<node_sim::SimState>,
    parts: Mutex<Option<Parts>>,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("server", &self.server)
            .field("kubeconfig", &self.kubeconfig)
            .finish_non_exhaustive()
    }
}

impl TestCluster {
    /// Builds the binaries if the cache is cold (minutes, printed), then starts
    /// a cluster with one node. Needs root (namespaces, nftables).
    pub fn start() -> Result<Self> {
        Self::start_with_nodes(1)
    }

    /// Like [`Self::start`] with `nodes` Node objects (`beamlit-node-1`, ...);
    /// pods are bound to them round-robin.
    pub fn start_with_nodes(nodes: usize) -> Result<Self> {
        let started = Instant::now();
        init_logging("warn");
        let binaries = KubeBinaries::ensure()?;
        let dir = TestDir::new("cluster")?;
        let control_plane = ControlPlane::start(
            binaries.clone(),
            ControlPlaneOptions {
                dir: dir.path().to_path_buf(),
                detached: false,
                real_nodes: None,
            },
        )?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("beamlit-cluster")
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let kubeconfig = control_plane.kubeconfig().to_path_buf();
        let client = runtime.block_on(client_for(&kubeconfig))?;
        let nodes = SimulatedNodes::start(client.clone(), runtime.handle(), nodes)?;
        let this = Self {
            client,
            handle: runtime.handle().clone(),
            kubeconfig,
            binaries,
            server: control_plane.server().to_string(),
            node_netns: nodes.node_netns().to_string(),
            state: Arc::clone(&nodes.state),
            parts: Mutex::new(Some(Parts {
                runtime,
                nodes,
                control_plane,
                dir,
            })),
        };
        this.wait_service_account("default", DEFAULT_WAIT)?;
        tracing::info!("test cluster up in {:.1?}", started.elapsed());
        Ok(this)
    }

    /// The cluster of this test binary, started on first use and torn down
    /// when the process exits (after the last test), so tests share its ~10 s
    /// start-up. Tests isolate themselves with [`Self::namespace`].
    pub fn shared() -> Result<&'static TestCluster> {
        static SHARED: OnceLock<std::result::Result<TestCluster, String>> = OnceLock::new();
        let r = SHARED.get_or_init(|| {
            // Two nodes, so agent tests can run one agent per node.
            let r = Self::start_with_nodes(2).map_err(|e| format!("{e:#}"));
            if r.is_ok() {
                extern "C" fn teardown() {
                    if let Some(Ok(c)) = SHARED.get() {
                        // Never unwind across the C boundary.
                        let _ =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.shutdown()));
                    }
                }
                // SAFETY: registers a plain extern "C" fn with no arguments.
                unsafe { libc::atexit(teardown) };
            }
            r
        });
        r.as_ref()
            .map_err(|e| anyhow!("the shared test cluster failed to start: {e}"))
    }

    /// Stops everything: watchers, pod servers, namespaces, control plane,
    /// temp dir. Idempotent; Drop calls it.
    pub fn shutdown(&self) {
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut p) = parts {
            p.nodes.shutdown();
            p.runtime.shutdown_timeout(Duration::from_secs(2));
            p.control_plane.stop();
            drop(p.dir);
        }
    }

    /// Stops the API server (an outage); [`Self::start_apiserver`] brings it back.
    pub fn stop_apiserver(&self) {
        if let Some(p) = self
            .parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            p.control_plane.stop_apiserver();
        }
    }

    pub fn start_apiserver(&self) -> Result<()> {
        match self
            .parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(p) => p.control_plane.start_apiserver(),
            None => bail!("the cluster is shut down"),
        }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs a future on the cluster's runtime (for kube-rs calls from sync tests).
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.handle.block_on(fut)
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn binaries(&self) -> &KubeBinaries {
        &self.binaries
    }

    /// The node namespace (the cluster network, where Service rules live).
    pub fn node_netns(&self) -> &str {
        &self.node_netns
    }

    /// `kubectl --kubeconfig <ours>` with `args`; returns stdout, or an error
    /// with stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_stdin(args, None)
    }

    /// Like [`Self::kubectl`], feeding `stdin`.
    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = Command::new(self.binaries.kubectl());
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args);
        run_with_stdin(cmd, stdin)
    }

    /// `kubectl apply -n <namespace> -f -` with `yaml`.
    pub fn apply(&self, namespace: &str, yaml: &str) -> Result<String> {
        self.kubectl_with_stdin(&["apply", "-n", namespace, "-f", "-"], Some(yaml))
    }

    /// `helm` from the pinned cache; add arguments (it gets our kubeconfig).
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.binaries.helm());
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// A fresh Kubernetes namespace `t-<hint>-<pid>-<n>`, deleted on drop.
    /// Waits for its default service account (pods need it).
    pub fn namespace(&self, hint: &str) -> Result<TestNamespace<'_>> {
        let name = test_namespace_name(hint);
        self.kubectl(&["create", "namespace", &name])?;
        let ns = TestNamespace {
            cluster: self,
            name,
        };
        self.wait_service_account(&ns.name, DEFAULT_WAIT)?;
        Ok(ns)
    }

    fn wait_service_account(&self, namespace: &str, timeout: Duration) -> Result<()> {
        let api = Api::<ServiceAccount>::namespaced(self.client(), namespace);
        self.wait_for(
            &format!("service account {namespace}/default"),
            timeout,
            || Ok(self.block_on(api.get_opt("default"))?.is_some()),
        )
    }

    /// Polls `check` every 100 ms until it returns true; fails after `timeout`
    /// (with the last error `check` returned, if any).
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        poll_until(what, timeout, Duration::from_millis(100), check)
    }

    /// Waits until Deployment `name` has observed its latest spec and has
    /// exactly `replicas` pods, all ready.
    pub fn wait_deployment_ready(
        &self,
        namespace: &str,
        name: &str,
        replicas: i32,
        timeout: Duration,
    ) -> Result<()> {
        let api = Api::<Deployment>::namespaced(self.client(), namespace);
        self.wait_for(
            &format!("deployment {namespace}/{name} with {replicas} ready replicas"),
            timeout,
            || {
                let d = self.block_on(api.get(name))?;
                let gen_ok =
                    d.status.as_ref().and_then(|s| s.observed_generation) >= d.metadata.generation;
                let s = d.status.unwrap_or_default();
                Ok(gen_ok
                    && s.replicas.unwrap_or(0) == replicas
                    && s.ready_replicas.unwrap_or(0) == replicas
                    && s.updated_replicas.unwrap_or(0) == replicas)
            },
        )
    }

    /// Addresses of the ready endpoints in Service `service`'s EndpointSlices.
    pub fn ready_endpoints(&self, namespace: &str, service: &str) -> Result<Vec<String>> {
        let api = Api::<EndpointSlice>::namespaced(self.client(), namespace);
        let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
        let slices = self.block_on(api.list(&lp))?;
        let mut out: Vec<String> = slices
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Whether any EndpointSlice exists for `service` (the controller made it).
    pub fn has_endpoint_slice(&self, namespace: &str, service: &str) -> Result<bool> {
        let api = Api::<EndpointSlice>::namespaced(self.client(), namespace);
        let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
        Ok(!self.block_on(api.list(&lp))?.items.is_empty())
    }

    /// The running pod `namespace/name` (its network namespace and address).
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.state.pod(namespace, name)
    }

    /// A namespace on the cluster network that no Kubernetes object knows about (the fake
    /// Beamlit, say: a remote service outside the cluster). Named `<hint>-<pid>-<n>`; removed
    /// with the cluster.
    pub fn add_unmanaged_pod(&self, hint: &str) -> Result<Pod> {
        let name = format!(
            "{}-{}-{}",
            crate::naming::sanitize_hint(hint),
            std::process::id(),
            crate::naming::next_id()
        );
        self.state.with_topology(|t| t.add_pod(&name))
    }

    /// Creates a bare Pod `name` (a client, like the seed's `kubectl run
    /// curl-check`) and waits until it is Ready; returns its namespace handle.
    pub fn run_client_pod(&self, namespace: &str, name: &str) -> Result<Pod> {
        let api = Api::<KPod>::namespaced(self.client(), namespace);
        let pod: KPod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"run": name}},
            "spec": {"containers": [{"name": name, "image": "curlimages/curl"}],
                     "restartPolicy": "Never", "terminationGracePeriodSeconds": 1}
        }))?;
        self.block_on(api.create(&PostParams::default(), &pod))
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        self.wait_pod_ready(namespace, name, DEFAULT_WAIT)?;
        self.pod(namespace, name)
            .with_context(|| format!("pod {namespace}/{name} is Ready but not running here"))
    }

    pub fn wait_pod_ready(&self, namespace: &str, name: &str, timeout: Duration) -> Result<()> {
        let api = Api::<KPod>::namespaced(self.client(), namespace);
        self.wait_for(&format!("pod {namespace}/{name} Ready"), timeout, || {
            let p = self.block_on(api.get(name))?;
            Ok(p.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"))
        })
    }

    /// Runs `args` inside pod `namespace/name`'s network namespace.
    pub fn exec_in_pod(&self, namespace: &str, name: &str, args: &[&str]) -> Result<Output> {
        let pod = self
            .pod(namespace, name)
            .with_context(|| format!("no running pod {namespace}/{name}"))?;
        let (program, rest) = args.split_first().context("empty command")?;
        let mut cmd = pod.netns.cmd(program);
        cmd.args(rest).stdin(Stdio::null());
        cmd.output()
            .with_context(|| format!("running {args:?} in pod {namespace}/{name}"))
    }

    /// `netprobe connect` from pod `namespace/name` (see [`ProbeOptions`]).
    pub fn probe_from(
        &self,
        namespace: &str,
        name: &str,
        opts: &ProbeOptions,
    ) -> Result<ProbeReport> {
        let pod = self
            .pod(namespace, name)
            .with_context(|| format!("no running pod {namespace}/{name}"))?;
        run_probe(&pod.netns, None, opts)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A Kubernetes namespace for one test; deleted (without waiting) on drop.
#[derive(Debug)]
pub struct TestNamespace<'a> {
    cluster: &'a TestCluster,
    name: String,
}

impl TestNamespace<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace<'_> {
    fn drop(&mut self) {
        delete_test_namespace(|a| self.cluster.kubectl(a), &self.name);
    }
}

/// Calls `check` every `interval` until it returns true; fails after `timeout` with the last
/// error `check` returned, if any. The one wait loop of both kinds of cluster.
pub fn poll_until(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("waiting for {what} ({timeout:?})")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(interval);
    }
}

/// `kubectl delete namespace <name> --wait=false` for a test namespace's drop; reports, never
/// panics.
fn delete_test_namespace(kubectl: impl FnOnce(&[&str]) -> Result<String>, name: &str) {
    if let Err(e) = kubectl(&["delete", "namespace", name, "--wait=false"]) {
        eprintln!("beamlit-testbed: deleting namespace {name}: {e:#}");
    }
}

/// `t-<hint>-<pid>-<n>`: a test namespace's name.
fn test_namespace_name(hint: &str) -> String {
    format!(
        "t-{}-{}-{}",
        crate::naming::sanitize_hint(hint),
        std::process::id(),
        crate::naming::next_id()
    )
}

fn run_with_stdin(mut cmd: Command, stdin: Option<&str>) -> Result<String> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
