use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// One pod: its own namespace, joined to the node by a veth pair.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// Shared with the [`Topology`], which deletes it on drop even if clones of
    /// this handle are still alive.
    pub netns: Arc<Netns>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// k in `10.200.<k>.0/24`, starting at 1.
    pub index: u8,
    /// The node-side veth, `vp<k>`; the pod side is always `eth0`.
    pub node_if: String,
}

impl Pod {
    /// The node-side address, which is the pod's default gateway.
    pub fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.index, 1)
    }

    pub fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, u16::from(self.index), 0, 0, 0, 0, 1)
    }
}

/// The standard layout: a "node" namespace that routes between pod namespaces
/// (every packet crosses the node's L3, so conntrack/DNAT work as on a real
/// node) and holds the tunnel address; Services are nftables DNAT rules there.
///
/// ```text
///   pod k (eth0 10.200.k.2/24, fd00:200:k::2/64)
///        |  veth
///   node (vp<k> 10.200.k.1/24, fd00:200:k::1/64; tun0 10.200.0.1/32, fd00:200::1/128)
/// ```
#[derive(Debug)]
pub struct Topology {
    hint: String,
    node: Netns,
    tunnel_if: String,
    pods: Vec<Pod>,
    /// Pods removed so far; indexes keep counting past them.
    removed_pods: usize,
    services: Mutex<BTreeMap<SocketAddr, SocketAddr>>,
    table_created: Mutex<bool>,
}

pub const SERVICE_TABLE: &str = "beamlit_test_svc";
const TUNNEL_IF: &str = "tun0";

impl Topology {
    pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
    pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
    pub const SERVICE_TABLE: &'static str = SERVICE_TABLE;

    pub fn new(hint: &str) -> Result<Self> {
        let node = Netns::new(hint)?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // Kernels without CONFIG_DUMMY (like the CI one) get a veth pair whose
        // peer stays in the node namespace; for traffic to the tunnel address
        // both behave the same (local delivery).
        if node
            .ip(&["link", "add", TUNNEL_IF, "type", "dummy"])
            .is_err()
        {
            let peer = format!("{TUNNEL_IF}p");
            node.ip(&[
                "link", "add", TUNNEL_IF, "type", "veth", "peer", "name", &peer,
            ])
            .context("creating the tunnel interface (neither dummy nor veth works)")?;
            node.ip(&["link", "set", &peer, "up"])?;
        }
        node.ip(&["link", "set", TUNNEL_IF, "up"])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/32", Self::NODE_V4),
            "dev",
            TUNNEL_IF,
        ])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/128", Self::NODE_V6),
            "dev",
            TUNNEL_IF,
            "nodad",
        ])?;
        Ok(Self {
            hint: hint.to_string(),
            node,
            tunnel_if: TUNNEL_IF.to_string(),
            pods: Vec::new(),
            removed_pods: 0,
            services: Mutex::new(BTreeMap::new()),
            table_created: Mutex::new(false),
        })
    }

    /// Adds pod k = (number of pods added so far, removed ones included, + 1).
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        let index = u8::try_from(self.pods.len() + self.removed_pods + 1)
            .ok()
            .filter(|k| *k < 255)
            .context("at most 254 pods per topology")?;
        let netns = Arc::new(Netns::new(&self.hint)?);
        let node_if = format!("vp{index}");
        let node_v4 = format!("10.200.{index}.1");
        let node_v6 = format!("fd00:200:{index:x}::1");
        let pod_v4 = Ipv4Addr::new(10, 200, index, 2);
        let pod_v6 = Ipv6Addr::new(0xfd00, 0x200, u16::from(index), 0, 0, 0, 0, 2);

        // Created from inside the node namespace with the peer placed directly
        // in the pod, so no interface ever appears in the host namespace (where
        // names from parallel tests would collide).
        self.node.ip(&[
            "link",
            "add",
            &node_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        self.node
            .ip(&["addr", "add", &format!("{node_v4}/24"), "dev", &node_if])?;
        self.node.ip(&[
            "addr",
            "add",
            &format!("{node_v6}/64"),
            "dev",
            &node_if,
            "nodad",
        ])?;
        self.node.ip(&["link", "set", &node_if, "up"])?;
        netns.ip(&["addr", "add", &format!("{pod_v4}/24"), "dev", "eth0"])?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{pod_v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &node_v4])?;
        netns.ip(&["-6", "route", "add", "default", "via", &node_v6])?;

        let pod = Pod {
            name: name.to_string(),
            netns,
            ipv4: pod_v4,
            ipv6: pod_v6,
            index,
            node_if,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Deletes pod `name`'s namespace (and with it the veth pair). Its index is
    /// not reused, so a later pod never inherits a stale conntrack entry or
    /// neighbour. Stop the pod's processes first: they would keep the
    /// namespace alive (though unreachable).
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let pos = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        let pod = self.pods.remove(pos);
        self.removed_pods += 1;
        pod.netns.delete()
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub fn node(&self) -> &Netns {
        &self.node
    }

    pub fn node_addr_v4(&self) -> Ipv4Addr {
        Self::NODE_V4
    }

    pub fn node_addr_v6(&self) -> Ipv6Addr {
        Self::NODE_V6
    }

    /// The interface in the node namespace holding the tunnel addresses.
    pub fn tunnel_if(&self) -> &str {
        &self.tunnel_if
    }

    /// Prefix of every namespace name of this topology (for leak checks).
    pub fn netns_prefix(&self) -> String {
        crate::naming::netns_prefix(&self.hint)
    }

    /// kube-proxy-like TCP DNAT `service` → `backend` in the node namespace
    /// (prerouting for pod traffic, output for node-local clients). Adding the
    /// same service again replaces its backend.
    pub fn add_service(&self, service: SocketAddr, backend: SocketAddr) -> Result<()> {
        if service.is_ipv4() != backend.is_ipv4() {
            bail!("service {service} and backend {backend} are of different IP families");
        }
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let previous = services.insert(service, backend);
        if let Err(e) = self.sync_services(&services) {
            match previous {
                Some(prev) => services.insert(service, prev),
                None => services.remove(&service),
            };
            return Err(e);
        }
        Ok(())
    }

    pub fn remove_service(&self, service: SocketAddr) -> Result<()> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if services.remove(&service).is_none() {
            bail!("no service {service}");
        }
        self.sync_services(&services)
    }

    /// The rule set is regenerated whole and swapped atomically by one nft
    /// transaction: simpler than tracking rule handles, and never half-applied.
    fn sync_services(&self, services: &BTreeMap<SocketAddr, SocketAddr>) -> Result<()> {
        let rules: String = services
            .iter()
            .map(|(svc, be)| match (svc, be) {
                (SocketAddr::V4(s), SocketAddr::V4(b)) => format!(
                    "    ip daddr {} tcp dport {} dnat ip to {}:{}\n",
                    s.ip(),
                    s.port(),
                    b.ip(),
                    b.port()
                ),
                (s, b) => format!(
                    "    ip6 daddr {} tcp dport {} dnat ip6 to [{}]:{}\n",
                    s.ip(),
                    s.port(),
                    b.ip(),
                    b.port()
                ),
            })
            .collect();
        let script = format!(
            "table inet {SERVICE_TABLE} {{}}\n\
             delete table inet {SERVICE_TABLE}\n\
             table inet {SERVICE_TABLE} {{\n\
             \x20 chain prerouting {{\n\
             \x20   type nat hook prerouting priority dstnat; policy accept;\n\
             {rules}\
             \x20 }}\n\
             \x20 chain output {{\n\
             \x20   type nat hook output priority -100; policy accept;\n\
             {rules}\
             \x20 }}\n\
             }}\n"
        );
        *self.table_created.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.nft_script(&script)
            .with_context(|| format!("applying nft rules:\n{script}"))
    }

    fn nft_script(&self, script: &str) -> Result<()> {
        let mut child = self
            .node
            .cmd("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())
            .context("writing to nft")?;
        let out = child.wait_with_output().context("waiting for nft")?;
        if !out.status.success() {
            bail!(
                "nft failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The table would vanish with the namespace, but deleting it first keeps
        // teardown correct even if something still pins the namespace.
        if *self.table_created.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = self
                .node
                .run(&["nft", "delete", "table", "inet", SERVICE_TABLE]);
        }
        for pod in &self.pods {
            if let Err(e) = pod.netns.delete() {
                eprintln!("beamlit-testbed: {e:#}");
            }
        }
        if let Err(e) = self.node.delete() {
            eprintln!("beamlit-testbed: {e:#}");
        }
    }
}
