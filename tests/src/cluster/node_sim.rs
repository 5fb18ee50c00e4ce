//! Nodes and pods without containers: a tiny scheduler + kubelet.
//!
//! The simulator registers Node objects, binds pending pods to them
//! (round-robin; there is no kube-scheduler), and for every pod bound to one
//! of its nodes makes a network namespace with the pod's IP on a veth to the
//! node namespace ([`Topology::add_pod`]) and starts `netprobe serve --http`
//! there on every declared TCP container port (80 when none is declared). The
//! server answers `200 OK!` like the php-apache example and names the pod in
//! `X-Served-By`. Pod status stays honest: `Running` with its IP once the
//! server process runs, `Ready` only after an HTTP request to it from the node
//! namespace succeeded. Deleting a pod sends SIGTERM to its server, waits up to
//! the pod's grace period, kills it, removes the namespace and then removes the
//! object (grace period 0, uid precondition), as the kubelet does. The server
//! stops as web servers do on their stop signal: it answers what it accepted,
//! refuses new connections and exits (`netprobe serve`'s graceful stop).
//!
//! All simulated nodes share one node namespace (the cluster network): pod
//! addresses are unique across nodes and every pod is one hop from every other.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod as KPod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::cluster::tools::KUBERNETES_VERSION;
use crate::process::ChildGuard;
use crate::topology::{Pod, Topology};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pod annotation naming the pod's network namespace.
pub const NETNS_ANNOTATION: &str = "beamlit.dev/netns";
/// The kubelet's default when a pod does not say.
const DEFAULT_GRACE: u64 = 30;

/// A pod this simulator runs.
struct Running {
    /// `namespace/name`, also the pod's name in the [`Topology`].
    key: String,
    pod: Pod,
    server: Option<ChildGuard>,
    terminating: bool,
}

/// Shared between the watch loop and its per-pod tasks.
pub(crate) struct SimState {
    /// `None` once torn down.
    topology: Mutex<Option<Topology>>,
    pub(crate) node_netns: String,
    pub(crate) nodes: Vec<String>,
    netprobe: PathBuf,
    /// By pod uid.
    running: Mutex<HashMap<String, Running>>,
    next_node: AtomicUsize,
}

impl SimState {
    pub(crate) fn new(
        topology: Topology,
        node_netns: String,
        nodes: Vec<String>,
        netprobe: PathBuf,
    ) -> Self {
        Self {
            topology: Mutex::new(Some(topology)),
            node_netns,
            nodes,
            netprobe,
            running: Mutex::new(HashMap::new()),
            next_node: AtomicUsize::new(0),
        }
    }

    /// The network namespace of pod `namespace/name`, if the simulator runs it.
    pub(crate) fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        let key = format!("{namespace}/{name}");
        self.lock_running()
            .values()
            .find(|r| r.key == key && !r.terminating)
            .map(|r| r.pod.clone())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the topology; fails once [`Self::stop_all`] ran.
    pub(crate) fn with_topology<R>(&self, f: impl FnOnce(&mut Topology) -> Result<R>) -> Result<R> {
        let mut guard = self.topology.lock().unwrap_or_else(|p| p.into_inner());
        let topo = guard
            .as_mut()
            .context("the simulated cluster was shut down")?;
        f(topo)
    }

    /// Kills every server, removes every pod namespace, then the node
    /// namespace (teardown; idempotent).
    pub(crate) fn stop_all(&self) {
        let all: Vec<Running> = self.lock_running().drain().map(|(_, r)| r).collect();
        for r in all {
            self.remove_runtime(r);
        }
        let topo = self
            .topology
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(topo);
    }

    fn remove_runtime(&self, mut r: Running) {
        if let Some(mut s) = r.server.take() {
            let _ = s.kill();
        }
        if let Err(e) = self.with_topology(|t| t.remove_pod(&r.key)) {
            tracing::warn!("removing pod namespace of {}: {e:#}", r.key);
        }
    }
}

/// Registers the nodes (Ready, with capacity and the node namespace's
/// address) and returns when they exist.
pub(crate) async fn register_nodes(client: &Client, state: &SimState) -> Result<()> {
    let api = Api::<Node>::all(client.clone());
    for name in &state.nodes {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "beamlit.dev/simulated": "true",
                }
            },
            "spec": {"podCIDR": "10.200.0.0/16", "podCIDRs": ["10.200.0.0/16"]},
        }))?;
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("registering node {name}")),
        }
        let now = Timestamp::now().to_string();
        let cond = |t: &str, s: &str, reason: &str| {
            json!({"type": t, "status": s, "reason": reason, "message": "simulated by beamlit-testbed",
                   "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        let status = json!({"status": {
            "conditions": [
                cond("Ready", "True", "KubeletReady"),
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": crate::Topology::NODE_V4.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            "nodeInfo": {
                "machineID": name, "systemUUID": name, "bootID": name,
                "kernelVersion": kernel_release(), "osImage": "beamlit simulated node",
                "containerRuntimeVersion": "beamlit-netns://0", "kubeletVersion": KUBERNETES_VERSION,
                "kubeProxyVersion": KUBERNETES_VERSION, "operatingSystem": "linux", "architecture": "amd64"
            }
        }});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("setting status of node {name}"))?;
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Watches pods until the future is dropped.
pub(crate) async fn run(client: Client, state: Arc<SimState>) -> Result<()> {
    let pods = Api::<KPod>::all(client.clone());
    let mut events = watcher::watcher(pods, watcher::Config::default()).boxed();
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!("node simulator watch error: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match ev {
            Event::Apply(p) | Event::InitApply(p) => {
                if let Err(e) = reconcile(&client, &state, p).await {
                    tracing::warn!("node simulator: {e:#}");
                }
            }
            Event::Delete(p) => {
                let uid = p.uid().unwrap_or_default();
                let gone = state.lock_running().remove(&uid);
                if let Some(r) = gone {
                    let st = Arc::clone(&state);
                    tokio::task::spawn_blocking(move || st.remove_runtime(r));
                }
            }
            Event::Init | Event::InitDone => {}
        }
    }
    Ok(())
}

async fn reconcile(client: &Client, state: &Arc<SimState>, pod: KPod) -> Result<()> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    let api = Api::<KPod>::namespaced(client.clone(), &ns);
    let spec = pod.spec.clone().unwrap_or_default();
    let node = spec.node_name.clone().unwrap_or_default();

    if pod.metadata.deletion_timestamp.is_some() {
        if !node.is_empty() && !state.nodes.contains(&node) {
            return Ok(());
        }
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .and_then(|g| u64::try_from(g).ok())
            .unwrap_or(DEFAULT_GRACE);
        let server = {
            let mut running = state.lock_running();
            match running.get_mut(&uid) {
                Some(r) if r.terminating => return Ok(()),
                Some(r) => {
                    r.terminating = true;
                    r.server.take()
                }
                None => None,
            }
        };
        let st = Arc::clone(state);
        let api = api.clone();
        tokio::spawn(async move {
            if let Err(e) = terminate(&st, &api, &name, &uid, server, grace).await {
                tracing::warn!("terminating {name}: {e:#}");
            }
        });
        return Ok(());
    }

    if node.is_empty() {
        if spec
            .scheduler_name
            .as_deref()
            .unwrap_or("default-scheduler")
            != "default-scheduler"
        {
            return Ok(());
        }
        let i = state.next_node.fetch_add(1, Ordering::Relaxed) % state.nodes.len();
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": state.nodes[i]}
        });
        match api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {}
            // Already bound (we saw an old version) or gone: the watch tells us more.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("binding {ns}/{name}")),
        }
        return Ok(());
    }
    if !state.nodes.contains(&node) || state.lock_running().contains_key(&uid) {
        return Ok(());
    }
    // A pod that already ran and finished is left alone.
    if matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(());
    }

    let key = format!("{ns}/{name}");
    let ports: Vec<u16> = {
        let mut v: Vec<u16> = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .collect();
        v.sort_unstable();
        v.dedup();
        if v.is_empty() { vec![80] } else { v }
    };
    let st = Arc::clone(state);
    let key2 = key.clone();
    let ports2 = ports.clone();
    let (topo_pod, server) = tokio::task::spawn_blocking(move || st.start_pod(&key2, &ports2))
        .await
        .context("pod start task")??;
    let ip = topo_pod.ipv4;
    let netns_name = topo_pod.netns.name().to_string();
    state.lock_running().insert(
        uid.clone(),
        Running {
            key: key.clone(),
            pod: topo_pod,
            server: Some(server),
            terminating: false,
        },
    );

    let node_ip = crate::Topology::NODE_V4.to_string();
    let now = Timestamp::now().to_string();
    let containers: Vec<_> = spec
        .containers
        .iter()
        .map(|c| {
            json!({"name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                   "containerID": format!("beamlit-netns://{uid}/{}", c.name),
                   "ready": false, "started": true, "restartCount": 0,
                   "state": {"running": {"startedAt": now}}})
        })
        .collect();
    let status = move |ready: bool, containers: &Vec<serde_json::Value>| {
        let r = if ready { "True" } else { "False" };
        let mut containers = containers.clone();
        for c in &mut containers {
            c["ready"] = json!(ready);
        }
        let now = Timestamp::now().to_string();
        json!({"status": {
            "phase": "Running",
            "hostIP": node_ip, "hostIPs": [{"ip": node_ip}],
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": r, "lastTransitionTime": now},
                {"type": "Ready", "status": r, "lastTransitionTime": now},
            ],
            "containerStatuses": containers,
        }})
    };
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&status(false, &containers)),
    )
    .await
    .with_context(|| format!("setting {key} Running"))?;
    // Where to find the pod for `ip netns exec` (there is no `kubectl exec`).
    let annotate = json!({"metadata": {"annotations": {NETNS_ANNOTATION: netns_name}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .with_context(|| format!("annotating {key}"))?;

    // Readiness: an HTTP request from the node namespace, like a kubelet probe.
    let st = Arc::clone(state);
    tokio::spawn(async move {
        let target = SocketAddr::from((ip, ports[0]));
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if !st.lock_running().get(&uid).is_some_and(|r| !r.terminating) {
                return;
            }
            let netns = st.node_netns.clone();
            let ok = tokio::task::spawn_blocking(move || http_probe(&netns, target))
                .await
                .unwrap_or(false);
            if ok {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("{key}: server never answered on {target}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Err(e) = api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&status(true, &containers)),
            )
            .await
        {
            tracing::warn!("setting {key} Ready: {e}");
        }
    });
    Ok(())
}

impl SimState {
    /// Namespace + veth + server for one pod (blocking: runs `ip` and spawns).
    fn start_pod(&self, key: &str, ports: &[u16]) -> Result<(Pod, ChildGuard)> {
        let pod = self.with_topology(|t| t.add_pod(key))?;
        let name = key.rsplit('/').next().unwrap_or(key);
        let mut cmd = pod.netns.cmd(&self.netprobe);
        cmd.args(["serve", "--http", "--name", name, "--body", "OK!"]);
        for p in ports {
            cmd.arg("--listen").arg(format!("0.0.0.0:{p}"));
        }
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        match crate::cluster::control_plane::spawn_tied(cmd, "netprobe") {
            Ok(server) => Ok((pod, server)),
            Err(e) => {
                let _ = self.with_topology(|t| t.remove_pod(key));
                Err(e)
            }
        }
    }
}

async fn terminate(
    st: &Arc<SimState>,
    api: &Api<KPod>,
    name: &str,
    uid: &str,
    server: Option<ChildGuard>,
    grace: u64,
) -> Result<()> {
    if let Some(mut server) = server {
        tracing::debug!("pod {name} deleted: SIGTERM to its server");
        let _ = server.signal(libc::SIGTERM);
        let grace = Duration::from_secs(grace);
        let _ = tokio::task::spawn_blocking(move || {
            if server.wait_timeout(grace).ok().flatten().is_none() {
                let _ = server.kill();
            }
        })
        .await;
    }
    let gone = st.lock_running().remove(uid);
    if let Some(r) = gone {
        let st2 = Arc::clone(st);
        tokio::task::spawn_blocking(move || st2.remove_runtime(r)).await?;
    }
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e).context("deleting the pod object"),
    }
}

/// `GET /` to `target` from inside namespace `netns`; true on any HTTP 200.
fn http_probe(netns: &str, target: SocketAddr) -> bool {
    let Ok(file) = std::fs::File::open(format!("/run/netns/{netns}")) else {
        return false;
    };
    let handle = std::thread::spawn(move || -> bool {
        // SAFETY: setns only affects this short-lived thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return false;
        }
        let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(500)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 16];
        let mut n = 0;
        while n < buf.len() {
            match s.read(&mut buf[n..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        buf[..n].starts_with(b"HTTP/1.1 200")
    });
    handle.join().unwrap_or(false)
}
