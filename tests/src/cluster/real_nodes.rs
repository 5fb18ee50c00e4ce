//! Real Kubernetes nodes on one machine, kind-style without containers: each node is a network
//! namespace, a mount namespace and a PID namespace of its own, running containerd (with runc
//! and the CNI bridge), kubelet (cgroupfs driver, its own cgroup root) and kube-proxy (nftables
//! mode), with a bpffs of its own.
//!
//! ```text
//!  machine's loopback                     cluster network namespace (bridge br0, 10.250.0.1/24)
//!  kube-apiserver 127.0.0.1:P  <-- relay -- 10.250.0.1:P   (the `kubernetes` Service's endpoint)
//!  egress proxy (unix socket) -- dials --> 10.250.0.0/24, 10.244.0.0/16 only (kubelets, pods)
//!                                          registry 10.250.0.1:5000 (mirror of registry.k8s.io,
//!                                                                     docker.io, ghcr.io)
//!      node i: netns + mount ns + pid ns, eth0 10.250.0.(10+i) on br0, pods 10.244.i.0/24 (cni0)
//!      a neighbour cluster's node i (its own control plane, relay, egress proxy and CoreDNS):
//!               eth0 10.250.0.(20+i) on the same br0, pods 10.245.i.0/24
//! ```
//!
//! A neighbour ([`Site::Neighbour`]) is a second cluster on the same network, as two clusters
//! of one data centre are: its nodes reach the first cluster's nodes on-link (and back), each
//! cluster's pods and Services stay its own, and it pulls from the first cluster's registry.
//!
//! What keeps the machine untouched:
//! - no namespace has a default route: node namespaces route only the node network, the other
//!   nodes' pod CIDRs and the Service CIDR; pods route only the cluster's ranges. An image pull
//!   or DNS query to anywhere else fails locally.
//! - the API server reaches kubelets and aggregated API servers (metrics-server) only through
//!   the egress proxy (`--egress-selector-config-file`, as konnectivity does), which dials IP
//!   addresses of the cluster's ranges and refuses (and records) anything else, names included:
//!   nothing is ever resolved through the machine's resolver.
//! - kubelet's machine-wide sysctls (vm.overcommit_memory, kernel.panic, ...) are files of the
//!   node bind-mounted over `/proc/sys` inside its mount namespace, holding the values kubelet
//!   wants, so it never writes them; kube-proxy is configured to write none.
//! - each node's cgroups sit below the cgroups this process is in, in every hierarchy; kubelet
//!   and containerd write only below the node's own directory (bind mounts, config paths).
//! - a node's processes die with its PID namespace, whose init dies with this process
//!   (`PR_SET_PDEATHSIG`); [`RealNodes`]'s drop removes cgroups, namespaces and directories.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::control_plane::{SERVICE_CIDR, spawn_tied};
use super::node_images;
use super::node_tools::{CNI_PLUGINS, NodeBinaries, PAUSE_IMAGE};
use super::pki::{self, Usage};
use super::tools::KubeBinaries;
use crate::Netns;
use crate::oci::{BuildInfo, ImageSpec};
use crate::process::ChildGuard;

/// The API server's address in the cluster network (a relay to its loopback port).
pub const APISERVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
pub const REGISTRY_PORT: u16 = 5000;
/// CoreDNS's Service address (kubelet's `clusterDNS`).
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_NET_PREFIX: u8 = 24;
/// Registries whose pulls go to the cluster's registry instead.
const MIRRORED: [&str; 3] = ["registry.k8s.io", "docker.io", "ghcr.io"];
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Where a real-node cluster sits on the cluster network: the first one owns the bridge and the
/// registry; a neighbour joins that bridge with node addresses, pod CIDRs and node names of its
/// own (for offloading from one cluster to another).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Site {
    #[default]
    Main,
    Neighbour,
}

impl Site {
    fn index(self) -> u8 {
        match self {
            Site::Main => 0,
            Site::Neighbour => 1,
        }
    }

    /// The address of node `i` (1-based): 10.250.0.(10+i), a neighbour's 10.250.0.(20+i).
    pub fn node_ip(self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, 0, 10 * (self.index() + 1) + i as u8)
    }

    /// Every pod CIDR of the cluster (kube-proxy's `clusterCIDR`).
    pub fn pod_cidr(self) -> String {
        format!("10.{}.0.0/16", 244 + self.index())
    }

    /// The pod CIDR of node `i` (1-based).
    pub fn node_pod_cidr(self, i: usize) -> String {
        format!("10.{}.{i}.0/24", 244 + self.index())
    }

    /// Node `i`'s name.
    pub fn node_name(self, i: usize) -> String {
        match self {
            Site::Main => format!("beamlit-node-{i}"),
            Site::Neighbour => format!("neighbour-node-{i}"),
        }
    }

    /// The bridge side of node `i`'s veth (unique on the bridge: interface names are per
    /// namespace, and every site's nodes share one).
    fn veth(self, i: usize) -> String {
        let tag = match self {
            Site::Main => "vn",
            Site::Neighbour => "vb",
        };
        format!("{tag}{i}-{}", std::process::id() % 100_000)
    }
}

/// Whether `ip` is an address of the cluster network (nodes, and every site's pods): the only
/// ones the egress proxies dial.
pub fn in_cluster_network(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    (o[0] == 10 && o[1] == 250 && o[2] == 0) || (o[0] == 10 && (o[1] == 244 || o[1] == 245))
}

/// What the control plane needs to know before it starts, for real nodes.
#[derive(Debug, Clone)]
pub struct ApiserverNetwork {
    /// `--egress-selector-config-file`.
    pub egress_config: PathBuf,
    /// `--kubelet-client-certificate` / `--kubelet-client-key`.
    pub kubelet_client: (PathBuf, PathBuf),
    /// `--proxy-client-cert-file` / `--proxy-client-key-file` (aggregated API servers).
    pub proxy_client: (PathBuf, PathBuf),
}

/// The cluster network as one cluster sees it: the bridge namespace (its own, or the main
/// cluster's for a neighbour), its API server's relay on it, and its API server's egress proxy.
pub struct ClusterNetwork {
    /// A neighbour's is a handle on the main cluster's (dropping it deletes nothing).
    bridge: Netns,
    site: Site,
    egress: EgressProxy,
    relay: Option<super::relay::ApiRelay>,
}

impl ClusterNetwork {
    /// Creates the bridge namespace and the egress proxy's socket in `dir`, and writes the API
    /// server's egress configuration and client identities (signed by the CA in `dir/pki`).
    pub fn create(dir: &Path) -> Result<(Self, ApiserverNetwork)> {
        let bridge = Netns::new("knet")?;
        bridge.ip(&["link", "set", "lo", "up"])?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&[
            "addr",
            "add",
            &format!("{APISERVER_ADDR}/{NODE_NET_PREFIX}"),
            "dev",
            "br0",
        ])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        // Between nodes' pod CIDRs and toward pods from the egress proxy; per namespace.
        bridge.sysctl("net.ipv4.ip_forward", "1")?;
        Self::on_bridge(bridge, Site::Main, dir)
    }

    /// The network of a neighbour cluster (its CA in `dir/pki`) on the main cluster's bridge
    /// namespace `bridge`, which must outlive it.
    pub fn neighbour(bridge: &str, dir: &Path) -> Result<(Self, ApiserverNetwork)> {
        Self::on_bridge(Netns::handle(bridge), Site::Neighbour, dir)
    }

    fn on_bridge(bridge: Netns, site: Site, dir: &Path) -> Result<(Self, ApiserverNetwork)> {
        let socket = dir.join("egress.sock");
        let egress = EgressProxy::start(&socket, bridge.name())?;
        let config = dir.join("egress-selector.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\n\
                 egressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n\
                 \x20   transport:\n      uds:\n        udsName: {}\n",
                socket.display()
            ),
        )?;
        let pki_dir = dir.join("pki");
        let kubelet_client = pki::write_identity(
            &pki_dir,
            "apiserver-kubelet-client",
            &pki::sign(
                dir,
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
                Usage::Client,
            )?,
        )?;
        let proxy_client = pki::write_identity(
            &pki_dir,
            "front-proxy-client",
            &pki::sign(dir, "front-proxy-client", None, Usage::Client)?,
        )?;
        Ok((
            Self {
                bridge,
                site,
                egress,
                relay: None,
            },
            ApiserverNetwork {
                egress_config: config,
                kubelet_client,
                proxy_client,
            },
        ))
    }

    pub fn site(&self) -> Site {
        self.site
    }

    /// Relays `APISERVER_ADDR:<port>` in the cluster network to the API server on loopback.
    pub fn start_relay(&mut self, apiserver: SocketAddr) -> Result<()> {
        let listen = SocketAddr::from((APISERVER_ADDR, apiserver.port()));
        self.relay = Some(super::relay::ApiRelay::start_on(
            &self.bridge,
            listen,
            apiserver,
        )?);
        Ok(())
    }

    pub fn bridge(&self) -> &Netns {
        &self.bridge
    }

    /// Every target the egress proxy refused (anything not an IP address of the cluster's
    /// networks): empty unless something tried to leave.
    pub fn refused(&self) -> Vec<String> {
        self.egress.refused()
    }
}

/// An HTTP CONNECT proxy on a unix socket for the API server's "cluster" egress. Dials only
/// IPv4 addresses of [`in_cluster_network`], from inside the bridge namespace; never resolves
/// a name.
struct EgressProxy {
    stop: Arc<AtomicBool>,
    refused: Arc<Mutex<Vec<String>>>,
    path: PathBuf,
}

impl EgressProxy {
    fn start(path: &Path, bridge: &str) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (done, log) = (stop.clone(), refused.clone());
        let bridge = bridge.to_string();
        std::thread::Builder::new()
            .name("egress-proxy".into())
            .spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let (bridge, log) = (bridge.clone(), log.clone());
                            std::thread::spawn(move || {
                                if let Err(e) = serve_connect(client, &bridge, &log) {
                                    tracing::debug!("egress proxy: {e:#}");
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(Self {
            stop,
            refused,
            path: path.to_path_buf(),
        })
    }

    fn refused(&self) -> Vec<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_connect(client: UnixStream, bridge: &str, refused: &Mutex<Vec<String>>) -> Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["CONNECT", target, _] => target.to_string(),
        _ => bail!("not a CONNECT request: {line:?}"),
    };
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let mut client_w = client.try_clone()?;
    let addr = target
        .parse::<SocketAddrV4>()
        .ok()
        .filter(|a| in_cluster_network(*a.ip()));
    let Some(addr) = addr else {
        refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(target.clone());
        client_w.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")?;
        bail!("refused CONNECT {target}: not an address of the cluster network");
    };
    let upstream = crate::netns::enter_named(bridge, move || {
        TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))
    })?;
    let upstream = match upstream {
        Ok(s) => s,
        Err(e) => {
            client_w.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")?;
            bail!("dialling {addr}: {e}");
        }
    };
    client_w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    client.set_read_timeout(None)?;
    // Bytes the reader buffered past the CONNECT head belong to the tunnel.
    let buffered = reader.buffer().to_vec();
    let (mut up_r, mut up_w) = (upstream.try_clone()?, upstream);
    up_w.write_all(&buffered)?;
    let mut client_r = reader.into_inner();
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_r, &mut up_w);
        let _ = up_w.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_r, &mut client_w);
    let _ = client_w.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

/// Where the main cluster's registry serves, on the bridge (every site's nodes pull from it).
pub fn registry_addr() -> SocketAddr {
    SocketAddr::from((APISERVER_ADDR, REGISTRY_PORT))
}

/// The cluster's registry (distribution), in the bridge namespace.
pub struct Registry {
    _proc: ChildGuard,
}

impl Registry {
    pub fn start(bins: &NodeBinaries, net: &ClusterNetwork, dir: &Path) -> Result<Self> {
        let root = dir.join("registry");
        std::fs::create_dir_all(&root)?;
        let addr = registry_addr();
        let config = root.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                root.join("data").display()
            ),
        )?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", net.bridge.name()))
            .arg("--")
            .arg(bins.path("registry"))
            .arg("serve")
            .arg(&config)
            // Tracing stays off: no exporter tries to reach a collector.
            .env("OTEL_TRACES_EXPORTER", "none")
            .env("OTEL_SDK_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("logs/registry.log"))?)
            .stderr(std::fs::File::create(dir.join("logs/registry.err.log"))?);
        let proc = spawn_tied(cmd, "registry")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = net
                .bridge
                .enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))?
                .ok()
                .and_then(|mut s| node_images::request(&mut s, "GET", "/v2/", &[], &[]).ok())
                .is_some_and(|r| r.status == 200);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the registry did not answer on {addr}; its log:\n{}",
                    std::fs::read_to_string(dir.join("logs/registry.err.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self { _proc: proc })
    }
}

/// A node's cgroup directories, in every hierarchy of the machine, below the cgroups this
/// process is in; removed (deepest first) on drop.
struct NodeCgroups {
    /// The path kubelet gets as `cgroupRoot` (the same in every hierarchy).
    root: String,
    /// Directories this value created, in creation order.
    created: Vec<PathBuf>,
    hierarchies: Vec<PathBuf>,
}

/// Mount points of the machine's cgroup hierarchies (v1 controllers and the unified v2).
fn cgroup_mounts() -> Result<Vec<(PathBuf, String, String)>> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && (f[2] == "cgroup" || f[2] == "cgroup2"))
                .then(|| (PathBuf::from(f[1]), f[2].to_string(), f[3].to_string()))
        })
        .collect())
}

/// The deepest cgroup this process is in, in any hierarchy (the machine's memory limit is on
/// one of them): nodes go below it, under the same path in every hierarchy.
fn cgroup_base() -> Result<String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    Ok(own
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .max_by_key(|p| p.len())
        .unwrap_or("/")
        .trim_end_matches('/')
        .to_string())
}

/// Removes node cgroups (in every hierarchy) of test processes that died without cleaning up;
/// part of [`crate::cleanup_stale`]. Returns the paths removed.
pub(crate) fn sweep_stale_cgroups() -> Vec<String> {
    let (Ok(base), Ok(mounts)) = (cgroup_base(), cgroup_mounts()) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for (h, ..) in mounts {
        let Ok(entries) = std::fs::read_dir(h.join(base.trim_start_matches('/'))) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dead = crate::naming::creator_pid(&name, crate::naming::CGROUP_PREFIX)
                .is_some_and(|pid| !crate::naming::pid_alive(pid));
            if dead && name.contains("-node") {
                let mut dirs = Vec::new();
                collect_dirs(&e.path(), &mut dirs);
                dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
                for d in dirs {
                    let _ = std::fs::remove_dir(&d);
                }
                if !e.path().exists() {
                    removed.push(e.path().display().to_string());
                }
            }
        }
    }
    removed
}

impl NodeCgroups {
    fn create(name: &str) -> Result<Self> {
        let base = cgroup_base()?;
        let root = format!("{base}/{name}");
        let mut this = Self {
            root: root.clone(),
            created: Vec::new(),
            hierarchies: cgroup_mounts()?.into_iter().map(|(p, ..)| p).collect(),
        };
        for h in this.hierarchies.clone() {
            let mut path = h.clone();
            for part in format!("{root}/daemons")
                .split('/')
                .filter(|p| !p.is_empty())
            {
                let parent = path.clone();
                path.push(part);
                if path.is_dir() {
                    continue;
                }
                std::fs::create_dir(&path)
                    .with_context(|| format!("creating cgroup {}", path.display()))?;
                this.created.push(path.clone());
                // cgroup v1 cpuset: a new cgroup has no CPUs or memory nodes until given some.
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
                        let _ = std::fs::write(path.join(f), v.trim());
                    }
                }
            }
        }
        Ok(this)
    }

    /// The `cgroup.procs` files of the node's daemon cgroup, one per hierarchy.
    fn daemon_procs(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| {
                h.join(self.root.trim_start_matches('/'))
                    .join("daemons/cgroup.procs")
            })
            .collect()
    }

    /// `<cgroupRoot>/kubepods` in the unified hierarchy: where the node's pods are, and where
    /// the agent attaches on this node.
    fn kubepods_unified(&self) -> Option<PathBuf> {
        cgroup_mounts()
            .ok()?
            .into_iter()
            .find(|(_, t, _)| t == "cgroup2")
            .map(|(p, ..)| p.join(self.root.trim_start_matches('/')).join("kubepods"))
    }

    /// Removes every directory below the node's root (what kubelet and runc made), then what
    /// this value made; retried while the last processes exit.
    fn remove(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for h in &self.hierarchies {
            let top = h.join(self.root.trim_start_matches('/'));
            loop {
                let mut dirs = Vec::new();
                collect_dirs(&top, &mut dirs);
                dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
                let mut left = false;
                for d in dirs {
                    if std::fs::remove_dir(&d).is_err() && d.exists() {
                        left = true;
                    }
                }
                if !left || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for d in self.created.drain(..).rev() {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

impl Drop for NodeCgroups {
    fn drop(&mut self) {
        self.remove();
    }
}

/// One real node.
pub struct RealNode {
    pub name: String,
    pub index: usize,
    pub ip: Ipv4Addr,
    netns: Netns,
    dir: PathBuf,
    init: Option<ChildGuard>,
    cgroups: NodeCgroups,
}

impl RealNode {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<cgroupRoot>/kubepods` in the unified hierarchy (the pods' cgroup).
    pub fn kubepods_cgroup(&self) -> Option<PathBuf> {
        self.cgroups.kubepods_unified()
    }

    /// The node's init (PID 1 of its PID namespace), as this process sees it: `/proc/<pid>/root`
    /// shows the node's mounts (its bpffs at `sys/fs/bpf`).
    pub fn init_pid(&self) -> Option<u32> {
        self.init.as_ref().map(ChildGuard::pid)
    }

    /// The end of a node daemon's log (`containerd`, `kubelet`, `kube-proxy`, `node`).
    pub fn log_tail(&self, daemon: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("logs/{daemon}.log")))
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn stop(&mut self) {
        if let Some(mut init) = self.init.take() {
            // PID 1 of the namespace: when it dies the kernel kills every process in it.
            let _ = init.kill();
            let _ = init.wait_timeout(Duration::from_secs(10));
        }
        self.cgroups.remove();
        let _ = self.netns.delete();
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How many nodes, and which add-ons.
#[derive(Debug, Clone)]
pub struct RealNodesOptions {
    pub nodes: usize,
    /// metrics-server from the test bed (leave it out when a chart installs its own).
    pub metrics_server: bool,
}

/// Everything a real-node cluster adds to a control plane.
pub struct RealNodes {
    // Field order is drop order: nodes first (their processes use the network), then the
    // registry and scheduler, then the network.
    nodes: Vec<RealNode>,
    /// The main cluster's; a neighbour pulls from it.
    _registry: Option<Registry>,
    _scheduler: ChildGuard,
    net: ClusterNetwork,
    dir: PathBuf,
    node_bins: NodeBinaries,
}

/// The inputs [`RealNodes::start`] needs from the control plane.
pub struct ControlPlaneView<'a> {
    pub dir: &'a Path,
    pub server: &'a str,
    pub kube: &'a KubeBinaries,
    pub kubeconfig: &'a Path,
}

impl RealNodes {
    /// Starts the registry (and pushes `images` plus the node images; a neighbour pushes only
    /// `images`, to the main cluster's registry), kube-scheduler and the
    /// nodes, waits until every node is Ready, then installs CoreDNS (and metrics-server).
    pub fn start(
        mut net: ClusterNetwork,
        cp: ControlPlaneView<'_>,
        opts: &RealNodesOptions,
        images: &[ImageSpec],
    ) -> Result<Self> {
        if opts.nodes == 0 || opts.nodes > 9 {
            bail!("real nodes: between 1 and 9 nodes, not {}", opts.nodes);
        }
        let started = Instant::now();
        let node_bins = NodeBinaries::ensure()?;
        let dir = cp.dir.join("real-nodes");
        std::fs::create_dir_all(dir.join("logs"))?;
        let apiserver: SocketAddr = cp
            .server
            .trim_start_matches("https://")
            .parse()
            .context("the API server's address")?;
        net.start_relay(apiserver)?;
        let cluster_server = format!("https://{APISERVER_ADDR}:{}", apiserver.port());
        let ca_pem = std::fs::read_to_string(cp.dir.join("pki/ca.crt"))?;

        let (registry, mut all) = match net.site {
            Site::Main => {
                let netprobe = crate::try_netprobe_bin()?;
                let info = BuildInfo::from_git(&super::workspace_root())?;
                (
                    Some(Registry::start(&node_bins, &net, &dir)?),
                    node_images::node_images(&node_bins, &netprobe, &info)?,
                )
            }
            Site::Neighbour => (None, Vec::new()),
        };
        all.extend(images.iter().cloned());
        for spec in &all {
            node_images::push(&net.bridge, registry_addr(), spec)
                .with_context(|| format!("pushing {}", spec.reference()))?;
        }
        tracing::info!("pushed {} images to {}", all.len(), registry_addr());

        let sched = pki::sign(cp.dir, "system:kube-scheduler", None, Usage::Client)?;
        let sched_kc = dir.join("scheduler.kubeconfig");
        std::fs::write(
            &sched_kc,
            pki::kubeconfig(cp.server, &ca_pem, &sched, "system:kube-scheduler"),
        )?;
        let mut cmd = Command::new(cp.kube.kube_scheduler());
        cmd.arg(format!("--kubeconfig={}", sched_kc.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                sched_kc.display()
            ))
            .arg(format!("--authorization-kubeconfig={}", sched_kc.display()))
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg("--leader-elect=false")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("logs/kube-scheduler.log"))?)
            .stderr(std::fs::File::create(
                dir.join("logs/kube-scheduler.err.log"),
            )?);
        let scheduler = spawn_tied(cmd, "kube-scheduler")?;

        let mut nodes = Vec::new();
        for i in 1..=opts.nodes {
            nodes.push(start_node(
                i,
                opts.nodes,
                &net,
                &node_bins,
                cp.kube,
                cp.dir,
                &dir,
                &cluster_server,
                &ca_pem,
            )?);
        }
        let this = Self {
            nodes,
            _registry: registry,
            _scheduler: scheduler,
            net,
            dir,
            node_bins,
        };
        this.wait_nodes_ready(cp.kube, cp.kubeconfig)?;
        this.install_addons(cp.kube, cp.kubeconfig, opts)?;
        tracing::info!(
            "{} real node(s) ready in {:.1?}",
            this.nodes.len(),
            started.elapsed()
        );
        Ok(this)
    }

    pub fn nodes(&self) -> &[RealNode] {
        &self.nodes
    }

    pub fn network(&self) -> &ClusterNetwork {
        &self.net
    }

    /// The registry's address (the main cluster's, for a neighbour too).
    pub fn registry_addr(&self) -> SocketAddr {
        registry_addr()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn node_binaries(&self) -> &NodeBinaries {
        &self.node_bins
    }

    /// Pushes one more image (the project's, after a rebuild).
    pub fn push(&self, spec: &ImageSpec) -> Result<()> {
        node_images::push(&self.net.bridge, registry_addr(), spec)
    }

    fn wait_nodes_ready(&self, kube: &KubeBinaries, kubeconfig: &Path) -> Result<()> {
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        loop {
            let out = Command::new(kube.kubectl())
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args([
                    "get",
                    "nodes",
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
                ])
                .stdin(Stdio::null())
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let ready: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_suffix("=True"))
                .collect();
            if self.nodes.iter().all(|n| ready.contains(&n.name.as_str())) {
                return Ok(());
            }
            for n in &self.nodes {
                if n.init.is_none() {
                    bail!("node {} is not running", n.name);
                }
            }
            if Instant::now() > deadline {
                let n = &self.nodes[0];
                bail!(
                    "nodes not Ready after {NODE_READY_TIMEOUT:?} ({text}); {}'s node log:\n{}\nkubelet:\n{}\ncontainerd:\n{}",
                    n.name,
                    n.log_tail("node", 20),
                    n.log_tail("kubelet", 30),
                    n.log_tail("containerd", 10)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn install_addons(
        &self,
        kube: &KubeBinaries,
        kubeconfig: &Path,
        opts: &RealNodesOptions,
    ) -> Result<()> {
        let mut yaml = coredns_manifest();
        if opts.metrics_server {
            yaml.push_str(&metrics_server_manifest());
        }
        let mut child = Command::new(kube.kubectl())
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "installing CoreDNS and metrics-server: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut wait = vec!["deployment/coredns"];
        if opts.metrics_server {
            wait.push("deployment/metrics-server");
        }
        for d in wait {
            let out = Command::new(kube.kubectl())
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args([
                    "-n",
                    "kube-system",
                    "rollout",
                    "status",
                    d,
                    "--timeout=120s",
                ])
                .stdin(Stdio::null())
                .output()?;
            if !out.status.success() {
                let describe = Command::new(kube.kubectl())
                    .arg(format!("--kubeconfig={}", kubeconfig.display()))
                    .args(["-n", "kube-system", "describe", "pods"])
                    .stdin(Stdio::null())
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let logs = Command::new(kube.kubectl())
                    .arg(format!("--kubeconfig={}", kubeconfig.display()))
                    .args(["-n", "kube-system", "logs", d, "--tail=20"])
                    .stdin(Stdio::null())
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let n = &self.nodes[0];
                bail!(
                    "{d} did not become ready: {}{}\n{describe}\nits log:\n{logs}\n{} kubelet:\n{}\ncontainerd:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    n.name,
                    n.log_tail("kubelet", 25),
                    n.log_tail("containerd", 15)
                );
            }
        }
        Ok(())
    }
}

impl Drop for RealNodes {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.stop();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn start_node(
    i: usize,
    count: usize,
    net: &ClusterNetwork,
    bins: &NodeBinaries,
    kube: &KubeBinaries,
    cp_dir: &Path,
    cluster_dir: &Path,
    server: &str,
    ca_pem: &str,
) -> Result<RealNode> {
    let site = net.site;
    let name = site.node_name(i);
    let ip = site.node_ip(i);
    let netns = Netns::new(&format!("node{i}"))?;
    let dir = cluster_dir.join(&name);
    for d in [
        "logs",
        "run-containerd",
        "lib-kubelet",
        "lib-containerd",
        "lib-cni",
        "log-pods",
        "log-containers",
        "opt",
        "volume-plugins",
        "cni-conf",
        "cni-bin",
        "sysctl",
    ] {
        std::fs::create_dir_all(dir.join(d))?;
    }

    // Network: eth0 on the bridge; routes to the node network, the other nodes' pods and the
    // Service CIDR (kube-proxy rewrites those), nothing else.
    let veth = site.veth(i);
    net.bridge.ip(&[
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        netns.name(),
    ])?;
    net.bridge
        .ip(&["link", "set", &veth, "master", "br0", "up"])?;
    netns.ip(&["link", "set", "lo", "up"])?;
    netns.ip(&[
        "addr",
        "add",
        &format!("{ip}/{NODE_NET_PREFIX}"),
        "dev",
        "eth0",
    ])?;
    netns.ip(&["link", "set", "eth0", "up"])?;
    netns.ip(&[
        "route",
        "add",
        SERVICE_CIDR,
        "via",
        &APISERVER_ADDR.to_string(),
    ])?;
    for j in 1..=count {
        if j != i {
            netns.ip(&[
                "route",
                "add",
                &site.node_pod_cidr(j),
                "via",
                &site.node_ip(j).to_string(),
            ])?;
        }
    }
    net.bridge.ip(&[
        "route",
        "add",
        &site.node_pod_cidr(i),
        "via",
        &ip.to_string(),
    ])?;
    netns.sysctl("net.ipv4.ip_forward", "1")?;

    // Identities: kubelet's client (Node authorizer) and serving certificates, kube-proxy's.
    let kubelet_id = pki::sign(
        cp_dir,
        &format!("system:node:{name}"),
        Some("system:nodes"),
        Usage::Client,
    )?;
    std::fs::write(
        dir.join("kubelet.kubeconfig"),
        pki::kubeconfig(server, ca_pem, &kubelet_id, &format!("system:node:{name}")),
    )?;
    let serving = pki::sign(cp_dir, &name, None, Usage::Server(&[ip]))?;
    pki::write_identity(&dir, "kubelet-serving", &serving)?;
    let proxy_id = pki::sign(cp_dir, "system:kube-proxy", None, Usage::Client)?;
    std::fs::write(
        dir.join("kube-proxy.kubeconfig"),
        pki::kubeconfig(server, ca_pem, &proxy_id, "system:kube-proxy"),
    )?;
    std::fs::write(dir.join("ca.crt"), ca_pem)?;

    for p in CNI_PLUGINS {
        std::fs::copy(bins.path(p), dir.join("cni-bin").join(p))?;
    }
    // Named like every test object (prefix, pid, counter), so a sweep after a crash finds it.
    let cgroups = NodeCgroups::create(&crate::naming::unique_name(
        crate::naming::CGROUP_PREFIX,
        &format!("node{i}"),
    ))?;
    write_node_configs(site, i, &name, ip, &dir, bins, &cgroups.root)?;

    let script = dir.join("node.sh");
    std::fs::write(&script, node_script(&dir, &name, ip, bins, kube, &cgroups)?)?;
    let log = std::fs::File::create(dir.join("logs/node.log"))?;
    let mut cmd = Command::new("unshare");
    // A mount and PID namespace of its own (init dies with us: --kill-child, and spawn_tied's
    // death signal on unshare itself), in the node's network namespace.
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "--",
        "nsenter",
    ])
    .arg(format!("--net=/run/netns/{}", netns.name()))
    .arg("--")
    .arg("bash")
    .arg(&script)
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    let init = spawn_tied(cmd, &format!("node {name}"))?;
    Ok(RealNode {
        name,
        index: i,
        ip,
        netns,
        dir,
        init: Some(init),
        cgroups,
    })
}

fn write_node_configs(
    site: Site,
    i: usize,
    name: &str,
    ip: Ipv4Addr,
    dir: &Path,
    bins: &NodeBinaries,
    cgroup_root: &str,
) -> Result<()> {
    let d = dir.display();
    // containerd: every path below the node's directory (bind-mounted on the usual places in
    // the node's mount namespace), pulls through the cluster's registry only.
    let mut containerd = format!(
        r#"version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins.'io.containerd.internal.v1.opt']
  path = "{d}/opt"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{d}/certs.d"
[plugins.'io.containerd.cri.v1.runtime']
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "{runc}"
      SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{d}/cni-bin"]
    conf_dir = "{d}/cni-conf"
"#,
        runc = bins.path("runc").display()
    );
    containerd.push('\n');
    std::fs::write(dir.join("containerd.toml"), containerd)?;
    let mirror = format!("http://{}", registry_addr());
    // `_default` too: no pull of any other registry leaves the cluster network either.
    for host in MIRRORED.iter().chain(&["_default"]) {
        let hd = dir.join("certs.d").join(host);
        std::fs::create_dir_all(&hd)?;
        std::fs::write(
            hd.join("hosts.toml"),
            format!(
                "server = \"{mirror}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
    }
    // CNI: the bridge with this node's pod CIDR; pods route only the cluster's ranges.
    std::fs::write(
        dir.join("cni-conf/10-beamlit.conflist"),
        serde_json::to_string_pretty(&serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "beamlit",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": format!("{d}/lib-cni/networks"),
                        "ranges": [[{"subnet": site.node_pod_cidr(i)}]],
                        "routes": [
                            {"dst": site.pod_cidr()},
                            {"dst": SERVICE_CIDR},
                            {"dst": format!("10.250.0.0/{NODE_NET_PREFIX}")},
                        ],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        }))?,
    )?;
    std::fs::write(
        dir.join("kubelet.yaml"),
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "0%"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
resolvConf: ""
clusterDNS: ["{CLUSTER_DNS}"]
clusterDomain: cluster.local
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
volumePluginDir: {d}/volume-plugins
tlsCertFile: {d}/kubelet-serving.crt
tlsPrivateKeyFile: {d}/kubelet-serving.key
rotateCertificates: false
serverTLSBootstrap: false
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {d}/ca.crt
authorization:
  mode: Webhook
registerNode: true
maxPods: 110
podCIDR: {pod_cidr}
"#,
            pod_cidr = site.node_pod_cidr(i)
        ),
    )?;
    // kube-proxy, nftables: conntrack settings at 0 so it writes no (machine-wide) sysctl.
    std::fs::write(
        dir.join("kube-proxy.yaml"),
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: {pod_cidrs}
bindAddress: {ip}
nodePortAddresses: ["{ip}/32"]
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
hostnameOverride: {name}
clientConnection:
  kubeconfig: {d}/kube-proxy.kubeconfig
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
"#,
            pod_cidrs = site.pod_cidr()
        ),
    )?;
    // The machine-wide sysctls kubelet sets (pkg/kubelet/cm: setupKernelTunables), already
    // holding the values it wants, so it reads them and writes nothing.
    for (key, value) in KUBELET_SYSCTLS {
        std::fs::write(dir.join("sysctl").join(key), format!("{value}\n"))?;
    }
    std::fs::write(
        dir.join("resolv.conf"),
        format!("nameserver {CLUSTER_DNS}\nsearch cluster.local\n"),
    )?;
    Ok(())
}

/// kubelet's kernel tunables, as `/proc/sys` paths with dots, and the values it wants.
pub const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm.overcommit_memory", "1"),
    ("vm.panic_on_oom", "0"),
    ("kernel.panic", "10"),
    ("kernel.panic_on_oops", "1"),
    ("kernel.keys.root_maxkeys", "1000000"),
    ("kernel.keys.root_maxbytes", "25000000"),
];

/// The node's init script: PID 1 of the node's PID namespace, in its mount and network
/// namespaces.
fn node_script(
    dir: &Path,
    name: &str,
    ip: Ipv4Addr,
    bins: &NodeBinaries,
    kube: &KubeBinaries,
    cgroups: &NodeCgroups,
) -> Result<String> {
    let d = dir.display();
    let mut s = String::from(
        "#!/bin/bash\n# Generated by beamlit-testbed (cluster::real_nodes).\nset -euo pipefail\n",
    );
    s.push_str("log() { echo \"[node $(date +%T.%N | cut -c1-12)] $*\"; }\n");
    // Join the node's daemon cgroup in every hierarchy ("0" is the writer itself).
    for procs in cgroups.daemon_procs() {
        s.push_str(&format!("echo 0 > {}\n", procs.display()));
    }
    s.push_str("mount --make-rshared /\n");
    // A sysfs of this network namespace, and the cgroup hierarchies again below it.
    s.push_str("umount -l /sys\nmount -t sysfs sysfs /sys\nmount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup\n");
    for (path, fstype, opts) in cgroup_mounts()? {
        let o: Vec<&str> = opts
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "ro" | "relatime" | "nosuid" | "nodev" | "noexec"))
            .collect();
        let o = if o.is_empty() {
            String::new()
        } else {
            format!("-o {}", o.join(","))
        };
        s.push_str(&format!(
            "mkdir -p {p}\nmount -t {fstype} {o} {fstype} {p}\n",
            p = path.display()
        ));
    }
    s.push_str("mount -t bpf bpf /sys/fs/bpf\n");
    s.push_str(
        "mount -t tmpfs tmpfs /run\nmount -t tmpfs tmpfs /var/lib\nmount -t tmpfs tmpfs /var/log\n",
    );
    for (from, to) in [
        ("run-containerd", "/run/containerd"),
        ("lib-kubelet", "/var/lib/kubelet"),
        ("lib-containerd", "/var/lib/containerd"),
        ("lib-cni", "/var/lib/cni"),
        ("log-pods", "/var/log/pods"),
        ("log-containers", "/var/log/containers"),
    ] {
        s.push_str(&format!("mkdir -p {to}\nmount --bind {d}/{from} {to}\n"));
    }
    s.push_str(&format!("mount --bind {d}/resolv.conf /etc/resolv.conf\n"));
    for (key, _) in KUBELET_SYSCTLS {
        s.push_str(&format!(
            "mount --bind {d}/sysctl/{key} /proc/sys/{}\n",
            key.replace('.', "/")
        ));
    }
    s.push_str(&format!(
        "export PATH={}:{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
        bins.dir().display(),
        kube.dir().display()
    ));
    s.push_str(&format!(
        r#"log "mounts ready; starting containerd"
containerd --config {d}/containerd.toml > {d}/logs/containerd.log 2>&1 &
CONTAINERD=$!
for _ in $(seq 200); do [ -S /run/containerd/containerd.sock ] && break; sleep 0.05; done
log "starting kubelet and kube-proxy"
kubelet --config={d}/kubelet.yaml --kubeconfig={d}/kubelet.kubeconfig --hostname-override={name} --node-ip={ip} --v=1 > {d}/logs/kubelet.log 2>&1 &
KUBELET=$!
kube-proxy --config={d}/kube-proxy.yaml --v=1 > {d}/logs/kube-proxy.log 2>&1 &
PROXY=$!
# PID 1 reaps orphans (containerd's shims) while it waits; a daemon that exits ends the node.
while kill -0 $CONTAINERD $KUBELET $PROXY 2>/dev/null; do sleep 1; done
log "a node daemon exited; stopping the node"
exit 1
"#
    ));
    Ok(s)
}

/// CoreDNS serving `cluster.local` (and reverse zones) from the API, forwarding nothing:
/// other names get SERVFAIL/REFUSED here instead of a query to the machine's resolver.
fn coredns_manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: coredns, namespace: kube-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:coredns"}}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects: [{{kind: ServiceAccount, name: coredns, namespace: kube-system}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: coredns, namespace: kube-system}}
data:
  Corefile: |
    .:53 {{
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {{
            pods insecure
        }}
        cache 30
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{k8s-app: kube-dns}}}}
  template:
    metadata: {{labels: {{k8s-app: kube-dns}}}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      containers:
      - name: coredns
        image: {image}:{tag}
        args: ["-conf", "/etc/coredns/Corefile"]
        ports:
        - {{containerPort: 53, name: dns, protocol: UDP}}
        - {{containerPort: 53, name: dns-tcp, protocol: TCP}}
        readinessProbe:
          httpGet: {{path: /ready, port: 8181}}
          periodSeconds: 2
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {{drop: [ALL], add: [NET_BIND_SERVICE]}}
        volumeMounts: [{{name: config, mountPath: /etc/coredns, readOnly: true}}]
      volumes:
      - name: config
        configMap: {{name: coredns}}
---
apiVersion: v1
kind: Service
metadata: {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  clusterIP: {CLUSTER_DNS}
  selector: {{k8s-app: kube-dns}}
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
---
"#,
        image = node_images::COREDNS_IMAGE,
        tag = super::node_tools::COREDNS_VERSION,
    )
}

/// metrics-server reading every kubelet by its InternalIP (kubelets serve certificates of the
/// cluster CA; metrics-server is not given that CA, hence `--kubelet-insecure-tls`).
fn metrics_server_manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: metrics-server, namespace: kube-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: "system:aggregated-metrics-reader"
  labels: {{rbac.authorization.k8s.io/aggregate-to-view: "true", rbac.authorization.k8s.io/aggregate-to-edit: "true", rbac.authorization.k8s.io/aggregate-to-admin: "true"}}
rules:
- apiGroups: [metrics.k8s.io]
  resources: [pods, nodes]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:metrics-server"}}
rules:
- apiGroups: [""]
  resources: [nodes/metrics]
  verbs: [get]
- apiGroups: [""]
  resources: [pods, nodes]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: "metrics-server-auth-reader", namespace: kube-system}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: extension-apiserver-authentication-reader}}
subjects: [{{kind: ServiceAccount, name: metrics-server, namespace: kube-system}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "metrics-server:system:auth-delegator"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:auth-delegator"}}
subjects: [{{kind: ServiceAccount, name: metrics-server, namespace: kube-system}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:metrics-server"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:metrics-server"}}
subjects: [{{kind: ServiceAccount, name: metrics-server, namespace: kube-system}}]
---
apiVersion: v1
kind: Service
metadata: {{name: metrics-server, namespace: kube-system, labels: {{k8s-app: metrics-server}}}}
spec:
  selector: {{k8s-app: metrics-server}}
  ports: [{{name: https, port: 443, protocol: TCP, targetPort: https}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: metrics-server, namespace: kube-system, labels: {{k8s-app: metrics-server}}}}
spec:
  selector: {{matchLabels: {{k8s-app: metrics-server}}}}
  template:
    metadata: {{labels: {{k8s-app: metrics-server}}}}
    spec:
      serviceAccountName: metrics-server
      containers:
      - name: metrics-server
        image: {image}:{tag}
        args:
        - --cert-dir=/tmp
        - --secure-port=10250
        - --kubelet-preferred-address-types=InternalIP
        - --kubelet-use-node-status-port
        - --kubelet-insecure-tls
        - --metric-resolution=15s
        ports: [{{containerPort: 10250, name: https, protocol: TCP}}]
        readinessProbe:
          httpGet: {{path: /readyz, port: https, scheme: HTTPS}}
          periodSeconds: 2
          failureThreshold: 3
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          runAsNonRoot: true
          runAsUser: 65532
          capabilities: {{drop: [ALL]}}
        volumeMounts: [{{name: tmp, mountPath: /tmp}}]
      volumes: [{{name: tmp, emptyDir: {{}}}}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {{name: v1beta1.metrics.k8s.io}}
spec:
  service: {{name: metrics-server, namespace: kube-system}}
  group: metrics.k8s.io
  version: v1beta1
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 100
  versionPriority: 100
---
"#,
        image = node_images::METRICS_SERVER_IMAGE,
        tag = super::node_tools::METRICS_SERVER_VERSION,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_network_is_nodes_and_pods_only() {
        assert!(in_cluster_network(Ipv4Addr::new(10, 250, 0, 11)));
        assert!(in_cluster_network(Ipv4Addr::new(10, 244, 2, 7)));
        assert!(!in_cluster_network(Ipv4Addr::new(10, 96, 0, 1)));
        assert!(!in_cluster_network(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(!in_cluster_network(Ipv4Addr::new(8, 8, 8, 8)));
        assert!(!in_cluster_network(Ipv4Addr::new(10, 250, 1, 1)));
        assert!(in_cluster_network(Ipv4Addr::new(10, 245, 1, 3)));
        assert!(!in_cluster_network(Ipv4Addr::new(10, 246, 1, 3)));
    }

    #[test]
    fn node_addresses() {
        assert_eq!(Site::Main.node_ip(1), Ipv4Addr::new(10, 250, 0, 11));
        assert_eq!(Site::Main.node_pod_cidr(2), "10.244.2.0/24");
        assert_eq!(Site::Main.pod_cidr(), "10.244.0.0/16");
        assert_eq!(Site::Neighbour.node_ip(1), Ipv4Addr::new(10, 250, 0, 21));
        assert_eq!(Site::Neighbour.node_pod_cidr(1), "10.245.1.0/24");
        assert_eq!(Site::Neighbour.node_name(1), "neighbour-node-1");
        // Every site's pods inside what the egress proxies dial.
        for site in [Site::Main, Site::Neighbour] {
            let net: Ipv4Addr = site
                .node_pod_cidr(9)
                .split('/')
                .next()
                .and_then(|a| a.parse().ok())
                .expect("an address");
            assert!(in_cluster_network(net), "{site:?}");
            assert!(in_cluster_network(site.node_ip(9)), "{site:?}");
        }
    }
}
