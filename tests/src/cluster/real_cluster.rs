//! A control plane with real nodes ([`super::real_nodes`]), for tests and `cargo xtask cluster
//! up --real-nodes`: pods run in containerd, Services go through kube-proxy, names through
//! CoreDNS, images come from the cluster's registry.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::real_nodes::{
    ApiserverNetwork, ClusterNetwork, ControlPlaneView, RealNode, RealNodes, RealNodesOptions,
};
use super::{ControlPlane, ControlPlaneOptions, DEFAULT_WAIT, KubeBinaries, pki, run_with_stdin};
use crate::oci::ImageSpec;
use crate::tempdir::TestDir;

/// Control plane + real nodes, torn down on drop (and at exit for [`RealCluster::shared`]).
pub struct RealCluster {
    kubeconfig: PathBuf,
    binaries: KubeBinaries,
    server: String,
    parts: Mutex<Option<(RealNodes, ControlPlane, TestDir)>>,
    node_names: Vec<String>,
    /// helm's cache, config and data (never the user's ~/.cache/helm).
    helm_home: PathBuf,
    /// A kubeconfig for the cluster network (the API server through its relay).
    network_kubeconfig: PathBuf,
    /// The bridge namespace's name (the cluster network: registry, relay).
    bridge: String,
    registry: std::net::SocketAddr,
}

/// A second cluster on a [`RealCluster`]'s network ([`RealCluster::start_neighbour`]); torn down
/// on drop, before the cluster it borrows.
pub struct Neighbour<'a> {
    cluster: RealCluster,
    _main: std::marker::PhantomData<&'a RealCluster>,
}

impl std::ops::Deref for Neighbour<'_> {
    type Target = RealCluster;
    fn deref(&self) -> &RealCluster {
        &self.cluster
    }
}

impl std::fmt::Debug for RealCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealCluster")
            .field("server", &self.server)
            .field("nodes", &self.node_names)
            .finish_non_exhaustive()
    }
}

impl RealCluster {
    /// Builds what the cache lacks (printed), then starts the control plane and
    /// `opts.nodes` real nodes; returns when every node is Ready and CoreDNS (and
    /// metrics-server) serve. `images` are pushed to the registry besides the node images.
    pub fn start(opts: &RealNodesOptions, images: &[ImageSpec]) -> Result<Self> {
        Self::start_in(TestDir::new("rcluster")?, opts, images)
    }

    /// Like [`Self::start`] in a directory of the caller's (`cargo xtask cluster up`).
    pub fn start_in(dir: TestDir, opts: &RealNodesOptions, images: &[ImageSpec]) -> Result<Self> {
        Self::start_on(dir, opts, images, ClusterNetwork::create)
    }

    /// A second cluster on this one's network, as a neighbouring cluster of the same data
    /// centre: a control plane, `opts.nodes` nodes (`neighbour-node-<i>`, 10.250.0.(20+i), pods
    /// 10.245.<i>.0/24) and CoreDNS of its own; its nodes reach this cluster's nodes on-link and
    /// pull from this cluster's registry (`images` are pushed there). Borrowing `self` keeps it
    /// from outliving the bridge it is on.
    pub fn start_neighbour(
        &self,
        opts: &RealNodesOptions,
        images: &[ImageSpec],
    ) -> Result<Neighbour<'_>> {
        let bridge = self.bridge.clone();
        let cluster = Self::start_on(TestDir::new("rneighbour")?, opts, images, |dir| {
            ClusterNetwork::neighbour(&bridge, dir)
        })?;
        Ok(Neighbour {
            cluster,
            _main: std::marker::PhantomData,
        })
    }

    fn start_on(
        dir: TestDir,
        opts: &RealNodesOptions,
        images: &[ImageSpec],
        network: impl FnOnce(&Path) -> Result<(ClusterNetwork, ApiserverNetwork)>,
    ) -> Result<Self> {
        let started = Instant::now();
        let binaries = KubeBinaries::ensure()?;
        super::node_tools::NodeBinaries::ensure()?;
        pki::generate(dir.path())?;
        let (net, apiserver_net) = network(dir.path())?;
        let control_plane = ControlPlane::start(
            binaries.clone(),
            ControlPlaneOptions {
                dir: dir.path().to_path_buf(),
                detached: false,
                real_nodes: Some(apiserver_net),
            },
        )?;
        let nodes = RealNodes::start(
            net,
            ControlPlaneView {
                dir: dir.path(),
                server: control_plane.server(),
                kube: &binaries,
                kubeconfig: control_plane.kubeconfig(),
            },
            opts,
            images,
        )?;
        let network_kubeconfig = dir.path().join("network.kubeconfig");
        let apiserver_port = control_plane
            .server()
            .rsplit(':')
            .next()
            .context("the API server's port")?
            .to_string();
        std::fs::write(
            &network_kubeconfig,
            std::fs::read_to_string(control_plane.kubeconfig())?.replace(
                control_plane.server(),
                &format!(
                    "https://{}:{apiserver_port}",
                    super::real_nodes::APISERVER_ADDR
                ),
            ),
        )?;
        let this = Self {
            kubeconfig: control_plane.kubeconfig().to_path_buf(),
            server: control_plane.server().to_string(),
            node_names: nodes.nodes().iter().map(|n| n.name.clone()).collect(),
            binaries,
            helm_home: dir.path().join("helm"),
            network_kubeconfig,
            bridge: nodes.network().bridge().name().to_string(),
            registry: nodes.registry_addr(),
            parts: Mutex::new(Some((nodes, control_plane, dir))),
        };
        eprintln!(
            "beamlit-testbed: real-node cluster up in {:.1?} ({} nodes)",
            started.elapsed(),
            this.node_names.len()
        );
        Ok(this)
    }

    /// The real-node cluster of this test binary (two nodes, metrics-server), started on
    /// first use and torn down when the process exits.
    pub fn shared() -> Result<&'static RealCluster> {
        static SHARED: OnceLock<std::result::Result<RealCluster, String>> = OnceLock::new();
        let r = SHARED.get_or_init(|| {
            let opts = RealNodesOptions {
                nodes: 2,
                metrics_server: true,
            };
            let r = Self::start(&opts, &[]).map_err(|e| format!("{e:#}"));
            if r.is_ok() {
                extern "C" fn teardown() {
                    if let Some(Ok(c)) = SHARED.get() {
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
            .map_err(|e| anyhow!("the shared real-node cluster failed to start: {e}"))
    }

    /// Stops nodes, registry, scheduler, control plane; removes every namespace, cgroup and
    /// directory. Idempotent; Drop calls it.
    pub fn shutdown(&self) {
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((nodes, mut cp, dir)) = parts {
            drop(nodes);
            cp.stop();
            drop(dir);
        }
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

    pub fn node_names(&self) -> &[String] {
        &self.node_names
    }

    /// Runs `f` with the nodes (network namespaces, directories, logs, cgroups).
    pub fn with_nodes<R>(&self, f: impl FnOnce(&RealNodes) -> R) -> Result<R> {
        let guard = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        let (nodes, ..) = guard.as_ref().context("the cluster was shut down")?;
        Ok(f(nodes))
    }

    /// What the API server's egress proxy refused (targets outside the cluster network).
    pub fn refused_egress(&self) -> Result<Vec<String>> {
        self.with_nodes(|n| n.network().refused())
    }

    /// The node named `name`'s details, through `f`.
    pub fn with_node<R>(&self, name: &str, f: impl FnOnce(&RealNode) -> R) -> Result<R> {
        self.with_nodes(|n| n.nodes().iter().find(|x| x.name == name).map(f))?
            .with_context(|| format!("no node {name}"))
    }

    /// `kubectl --kubeconfig <ours>` with `args`; stdout, or an error with stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_stdin(args, None)
    }

    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = Command::new(self.binaries.kubectl());
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args);
        run_with_stdin(cmd, stdin)
    }

    /// `kubectl` with `args`, whatever its exit status (for commands expected to fail).
    pub fn kubectl_output(&self, args: &[&str]) -> Result<Output> {
        Command::new(self.binaries.kubectl())
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")
    }

    /// `kubectl apply -n <namespace> -f -` with `yaml`.
    pub fn apply(&self, namespace: &str, yaml: &str) -> Result<String> {
        self.kubectl_with_stdin(&["apply", "-n", namespace, "-f", "-"], Some(yaml))
    }

    /// `helm` from the pinned cache, with our kubeconfig.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.binaries.helm());
        cmd.env("KUBECONFIG", &self.kubeconfig);
        self.helm_env(&mut cmd);
        cmd
    }

    /// `helm` inside the cluster network (the bridge namespace), where the registry serves
    /// charts as OCI artifacts (`oci://<registry_addr>/...`, plain HTTP) and the API server is
    /// reached through its relay, as from a machine of the cluster's network.
    pub fn helm_in_network(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.bridge])
            .arg(self.binaries.helm())
            .env("KUBECONFIG", &self.network_kubeconfig);
        self.helm_env(&mut cmd);
        cmd
    }

    fn helm_env(&self, cmd: &mut Command) {
        for (var, dir) in [
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ] {
            cmd.env(var, self.helm_home.join(dir));
        }
    }

    /// The cluster's registry (plain HTTP, in the cluster network): images under their
    /// mirrored names, and charts.
    pub fn registry_addr(&self) -> std::net::SocketAddr {
        self.registry
    }

    /// Pushes images to the registry (e.g. the project's, built by the test).
    pub fn push_images(&self, images: &[ImageSpec]) -> Result<()> {
        self.with_nodes(|n| images.iter().try_for_each(|i| n.push(i)))?
    }

    /// A fresh namespace `t-<hint>-<pid>-<n>`, deleted on drop; waits for its default service
    /// account.
    pub fn namespace(&self, hint: &str) -> Result<RealNamespace<'_>> {
        let name = super::test_namespace_name(hint);
        self.kubectl(&["create", "namespace", &name])?;
        let ns = RealNamespace {
            cluster: self,
            name,
        };
        self.wait_for(
            &format!("service account {}/default", ns.name),
            DEFAULT_WAIT,
            || {
                Ok(self
                    .kubectl_output(&["get", "serviceaccount", "default", "-n", &ns.name])?
                    .status
                    .success())
            },
        )?;
        Ok(ns)
    }

    /// Polls `check` every 200 ms until true; fails after `timeout` with the last error.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        super::poll_until(what, timeout, Duration::from_millis(200), check)
    }

    /// Waits until every pod matching `selector` in `namespace` is Ready and there are `count`.
    pub fn wait_pods_ready(
        &self,
        namespace: &str,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let r = self.wait_for(
            &format!("{count} Ready pod(s) {selector} in {namespace}"),
            timeout,
            || {
                let out = self.kubectl(&[
                    "get", "pods", "-n", namespace, "-l", selector, "-o",
                    "jsonpath={range .items[?(@.metadata.deletionTimestamp)]}-{end}{range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
                ])?;
                // A terminating pod (leading '-') is not counted as settled.
                if out.starts_with('-') {
                    return Ok(false);
                }
                let pods: Vec<(&str, &str)> =
                    out.lines().filter_map(|l| l.split_once('=')).collect();
                names = pods.iter().map(|(n, _)| n.to_string()).collect();
                Ok(pods.len() == count && pods.iter().all(|(_, r)| *r == "True"))
            },
        );
        r.map_err(|e| {
            let describe = self
                .kubectl(&["describe", "pods", "-n", namespace, "-l", selector])
                .unwrap_or_default();
            e.context(format!("pods:\n{describe}"))
        })?;
        Ok(names)
    }

    /// The node a pod runs on.
    pub fn pod_node(&self, namespace: &str, pod: &str) -> Result<String> {
        self.kubectl(&[
            "get",
            "pod",
            pod,
            "-n",
            namespace,
            "-o",
            "jsonpath={.spec.nodeName}",
        ])
    }

    /// `kubectl logs`.
    pub fn logs(&self, namespace: &str, pod: &str) -> Result<String> {
        self.kubectl(&["logs", "-n", namespace, pod])
    }

    /// `kubectl exec <pod> -- args`: stdout, or an error with stderr.
    pub fn exec(&self, namespace: &str, pod: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["exec", "-n", namespace, pod, "--"];
        all.extend_from_slice(args);
        self.kubectl(&all)
    }

    /// `kubectl run <name> --restart=Never --image=<image> [extra] -- args`, then waits until
    /// the pod has ended, returns whether it succeeded and its log, and deletes it. (Reading
    /// the log afterwards instead of attaching: `run -i` loses the output of a container that
    /// ends before the attach.)
    pub fn run_pod(
        &self,
        namespace: &str,
        name: &str,
        image: &str,
        extra: &[&str],
        args: &[&str],
    ) -> Result<(bool, String)> {
        let image_arg = format!("--image={image}");
        let mut all = vec!["run", name, "-n", namespace, "--restart=Never", &image_arg];
        all.extend_from_slice(extra);
        all.push("--");
        all.extend_from_slice(args);
        self.kubectl(&all)?;
        let mut phase = String::new();
        self.wait_for(
            &format!("pod {namespace}/{name} to end"),
            POD_RUN_TIMEOUT,
            || {
                phase = self.kubectl(&[
                    "get",
                    "pod",
                    name,
                    "-n",
                    namespace,
                    "-o",
                    "jsonpath={.status.phase}",
                ])?;
                Ok(phase == "Succeeded" || phase == "Failed")
            },
        )?;
        let logs = self.logs(namespace, name)?;
        self.kubectl(&["delete", "pod", name, "-n", namespace, "--wait=false"])?;
        Ok((phase == "Succeeded", logs))
    }

    /// `kubectl run <name> --rm -i --restart=Never --image=<image> -- args`, as a user types
    /// it: attached, the pod removed at the end. The command must outlive the attach (a
    /// container that ends first loses its output).
    pub fn run_pod_attached(
        &self,
        namespace: &str,
        name: &str,
        image: &str,
        args: &[&str],
    ) -> Result<Output> {
        let image_arg = format!("--image={image}");
        let mut all = vec![
            "run",
            name,
            "-n",
            namespace,
            "--rm",
            "-i",
            "--restart=Never",
            "--quiet",
            "--pod-running-timeout=90s",
            &image_arg,
            "--",
        ];
        all.extend_from_slice(args);
        Command::new(self.binaries.kubectl())
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(&all)
            .stdin(Stdio::piped())
            .output()
            .context("kubectl run")
    }
}

/// How long a pod of [`RealCluster::run_pod`] may take, image pull included.
const POD_RUN_TIMEOUT: Duration = Duration::from_secs(120);

impl Drop for RealCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A namespace of one test in a [`RealCluster`]; deleted (without waiting) on drop.
pub struct RealNamespace<'a> {
    cluster: &'a RealCluster,
    name: String,
}

impl RealNamespace<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for RealNamespace<'_> {
    fn drop(&mut self) {
        super::delete_test_namespace(|a| self.cluster.kubectl(a), &self.name);
    }
}

/// Fails with `what` and the command's output unless it succeeded.
pub fn check_output(what: &str, out: &Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
