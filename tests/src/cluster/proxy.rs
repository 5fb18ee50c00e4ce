//! A kube-proxy replacement for the simulated node: it watches Services and
//! EndpointSlices and programs nftables in the node namespace with the
//! semantics of kube-proxy's nftables mode (for TCP and UDP ClusterIP
//! services):
//!
//! - ClusterIP:port → one of the service's *ready* endpoints, chosen per
//!   connection with `numgen random` (conntrack keeps a connection on its
//!   endpoint); when no endpoint is ready, terminating endpoints that are
//!   still serving are used (KEP-1669), as kube-proxy does;
//! - no usable endpoint → the connection is rejected with ICMP port
//!   unreachable (`reject`), which a TCP client sees as "connection refused",
//!   like kube-proxy's `no-endpoint-services` map;
//! - the whole Service CIDR is a `local` route in the node namespace, so
//!   traffic to an unknown ClusterIP or port ends in the node's input path
//!   and is refused there, never routed anywhere.
//!
//! Real kube-proxy cannot run here: it would have to reach the apiserver on
//! the host's loopback from inside the node namespace. The ruleset is rebuilt
//! whole and swapped in one `nft -f` transaction on every change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{FutureExt as _, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::io::AsyncWriteExt;

use super::control_plane::SERVICE_CIDR;

pub const PROXY_TABLE: &str = "beamlit_kube_proxy";

/// Objects by (namespace, name).
pub type Store<K> = BTreeMap<(String, String), K>;

/// One service port as the rules need it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServicePortRule {
    /// `namespace/name:port` for comments.
    pub id: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// Endpoints to balance across (already filtered: ready, or serving while
    /// terminating when none is ready).
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// Computes the rules from the current objects: pure, so it is unit-tested.
pub fn service_rules(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
) -> Vec<ServicePortRule> {
    let mut rules = Vec::new();
    for ((ns, name), svc) in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            // Headless ("None"), not yet allocated, or IPv6: nothing to program.
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let my_slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|((sns, _), s)| {
                sns == ns
                    && s.address_type == "IPv4"
                    && s.labels().get("kubernetes.io/service-name") == Some(name)
            })
            .map(|(_, s)| s)
            .collect();
        for sp in spec.ports.iter().flatten() {
            let protocol = match sp.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => "tcp",
                "UDP" => "udp",
                _ => continue,
            };
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            let port_name = sp.name.clone().unwrap_or_default();
            let mut ready = BTreeSet::new();
            let mut serving_terminating = BTreeSet::new();
            for slice in &my_slices {
                let Some(target) = slice.ports.iter().flatten().find(|p| {
                    p.name.clone().unwrap_or_default() == port_name
                        && p.protocol.as_deref().unwrap_or("TCP")
                            == sp.protocol.as_deref().unwrap_or("TCP")
                }) else {
                    continue;
                };
                let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                for ep in slice.endpoints.iter().flatten() {
                    let cond = ep.conditions.as_ref();
                    // API semantics: a nil `ready` means ready.
                    let is_ready = cond.and_then(|c| c.ready).unwrap_or(true);
                    let serving = cond.and_then(|c| c.serving).unwrap_or(is_ready);
                    let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
                    for addr in &ep.addresses {
                        let Ok(a) = addr.parse::<Ipv4Addr>() else {
                            continue;
                        };
                        if is_ready {
                            ready.insert((a, target_port));
                        } else if serving && terminating {
                            serving_terminating.insert((a, target_port));
                        }
                    }
                }
            }
            let endpoints = if ready.is_empty() {
                serving_terminating
            } else {
                ready
            };
            rules.push(ServicePortRule {
                id: format!(
                    "{ns}/{name}:{port_name}{}",
                    if port_name.is_empty() {
                        port.to_string()
                    } else {
                        String::new()
                    }
                ),
                cluster_ip: ip,
                port,
                protocol,
                endpoints: endpoints.into_iter().collect(),
            });
        }
    }
    rules.sort();
    rules
}

/// The nft script for `rules`: replaces the whole table atomically.
pub fn render(rules: &[ServicePortRule]) -> String {
    let mut dispatch = String::new();
    let mut chains = String::new();
    let mut reject = String::new();
    for (i, r) in rules.iter().enumerate() {
        let matcher = format!(
            "ip daddr {} meta l4proto {} th dport {}",
            r.cluster_ip, r.protocol, r.port
        );
        let comment = r.id.replace('"', "");
        if r.endpoints.is_empty() {
            reject.push_str(&format!(
                "    {matcher} reject comment \"{comment} has no endpoints\"\n"
            ));
            continue;
        }
        dispatch.push_str(&format!(
            "    {matcher} goto svc-{i} comment \"{comment}\"\n"
        ));
        let arms: Vec<String> = (0..r.endpoints.len())
            .map(|j| format!("{j} : goto svc-{i}-ep-{j}"))
            .collect();
        chains.push_str(&format!(
            "  chain svc-{i} {{\n    numgen random mod {} vmap {{ {} }}\n  }}\n",
            r.endpoints.len(),
            arms.join(", ")
        ));
        for (j, (ip, port)) in r.endpoints.iter().enumerate() {
            chains.push_str(&format!(
                "  chain svc-{i}-ep-{j} {{\n    meta l4proto {} dnat to {ip}:{port}\n  }}\n",
                r.protocol
            ));
        }
    }
    format!(
        "table ip {PROXY_TABLE} {{}}\n\
         delete table ip {PROXY_TABLE}\n\
         table ip {PROXY_TABLE} {{\n\
         \x20 chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n\
         \x20 chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}\n\
         \x20 chain filter-input {{\n    type filter hook input priority -10; policy accept;\n    jump no-endpoints\n  }}\n\
         \x20 chain filter-forward {{\n    type filter hook forward priority -10; policy accept;\n    jump no-endpoints\n  }}\n\
         \x20 chain filter-output {{\n    type filter hook output priority -10; policy accept;\n    jump no-endpoints\n  }}\n\
         \x20 chain services {{\n{dispatch}  }}\n\
         \x20 chain no-endpoints {{\n{reject}  }}\n\
         {chains}}}\n"
    )
}

/// Applies `script` with `nft -f -` inside namespace `netns`.
async fn nft_apply(netns: &str, script: &str) -> Result<()> {
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning nft")?;
    let mut stdin = child.stdin.take().context("nft stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "nft failed: {}\nscript:\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Routes the Service CIDR locally in the node namespace (see the module docs).
pub fn prepare_node(node: &crate::Netns) -> Result<()> {
    node.ip(&["route", "replace", "local", SERVICE_CIDR, "dev", "lo"])
        .map(|_| ())
        .context("routing the Service CIDR in the node namespace")
}

enum Change {
    Svc(Box<Event<Service>>),
    Slice(Box<Event<EndpointSlice>>),
}

/// Watches Services and EndpointSlices (all namespaces) and keeps the node
/// namespace's rules in sync until the future is dropped.
pub async fn run(
    client: Client,
    node_netns: String,
    synced: Arc<tokio::sync::Notify>,
) -> Result<()> {
    let svc_stream = watcher::watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .map_ok(|e| Change::Svc(Box::new(e)))
    .boxed();
    let slice_stream = watcher::watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    )
    .map_ok(|e| Change::Slice(Box::new(e)))
    .boxed();
    let mut changes = futures::stream::select(svc_stream, slice_stream);

    let mut services: Store<Service> = BTreeMap::new();
    let mut slices: Store<EndpointSlice> = BTreeMap::new();
    let (mut svc_init, mut slice_init) = (BTreeMap::new(), BTreeMap::new());
    let mut applied: Option<String> = None;
    loop {
        let change = match changes.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                // The watcher recovers by itself (relist); keep going.
                tracing::warn!("kube-proxy watch error: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            None => return Ok(()),
        };
        match change {
            Change::Svc(ev) => apply_event(*ev, &mut services, &mut svc_init),
            Change::Slice(ev) => apply_event(*ev, &mut slices, &mut slice_init),
        }
        // Batch whatever else is already queued before touching nft.
        while let Some(Some(Ok(c))) = changes.next().now_or_never() {
            match c {
                Change::Svc(ev) => apply_event(*ev, &mut services, &mut svc_init),
                Change::Slice(ev) => apply_event(*ev, &mut slices, &mut slice_init),
            }
        }
        let script = render(&service_rules(&services, &slices));
        if applied.as_deref() != Some(script.as_str()) {
            match nft_apply(&node_netns, &script).await {
                Ok(()) => applied = Some(script),
                Err(e) => tracing::error!("kube-proxy: {e:#}"),
            }
        }
        synced.notify_waiters();
    }
}

fn apply_event<K: kube::Resource + Clone>(ev: Event<K>, store: &mut Store<K>, init: &mut Store<K>) {
    let k = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
    match ev {
        Event::Apply(o) => {
            store.insert(k(&o), o);
        }
        Event::Delete(o) => {
            store.remove(&k(&o));
        }
        Event::Init => init.clear(),
        Event::InitApply(o) => {
            init.insert(k(&o), o);
        }
        Event::InitDone => *store = std::mem::take(init),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str, port: i32) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": [{"port": port, "protocol": "TCP"}]}
        }))
        .expect("valid service")
    }

    fn slice(ns: &str, svc: &str, eps: &[(&str, Option<bool>, bool, bool)]) -> EndpointSlice {
        let endpoints: Vec<_> = eps
            .iter()
            .map(|(ip, ready, serving, terminating)| {
                serde_json::json!({"addresses": [ip], "conditions": {
                    "ready": ready, "serving": serving, "terminating": terminating}})
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{svc}-abc"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"port": 8080, "protocol": "TCP", "name": ""}]
        }))
        .expect("valid slice")
    }

    fn maps(s: Vec<Service>, e: Vec<EndpointSlice>) -> (Store<Service>, Store<EndpointSlice>) {
        let k = |ns: Option<String>, n: String| (ns.unwrap_or_default(), n);
        (
            s.into_iter()
                .map(|o| (k(o.namespace(), o.name_any()), o))
                .collect(),
            e.into_iter()
                .map(|o| (k(o.namespace(), o.name_any()), o))
                .collect(),
        )
    }

    #[test]
    fn ready_endpoints_only_and_terminating_fallback() {
        let (s, e) = maps(
            vec![
                svc("a", "web", "10.96.0.10", 80),
                svc("a", "down", "10.96.0.11", 80),
            ],
            vec![
                slice(
                    "a",
                    "web",
                    &[
                        ("10.200.1.2", Some(true), true, false),
                        ("10.200.2.2", Some(false), false, false),
                        ("10.200.3.2", None, true, false),
                    ],
                ),
                slice("a", "down", &[("10.200.4.2", Some(false), true, true)]),
            ],
        );
        let rules = service_rules(&s, &e);
        assert_eq!(rules.len(), 2);
        let down = rules
            .iter()
            .find(|r| r.id.starts_with("a/down"))
            .expect("down");
        assert_eq!(
            down.endpoints,
            vec![("10.200.4.2".parse().expect("ip"), 8080)]
        );
        let web = rules
            .iter()
            .find(|r| r.id.starts_with("a/web"))
            .expect("web");
        assert_eq!(
            web.endpoints,
            vec![
                ("10.200.1.2".parse().expect("ip"), 8080),
                ("10.200.3.2".parse().expect("ip"), 8080)
            ]
        );
        let script = render(&rules);
        assert!(script.contains("numgen random mod 2 vmap"));
        assert!(script.contains("dnat to 10.200.3.2:8080"));
    }

    #[test]
    fn no_endpoints_rejects() {
        let (s, e) = maps(vec![svc("a", "web", "10.96.0.10", 80)], vec![]);
        let script = render(&service_rules(&s, &e));
        assert!(
            script.contains("ip daddr 10.96.0.10 meta l4proto tcp th dport 80 reject"),
            "{script}"
        );
        assert!(!script.contains("dnat"));
    }

    #[test]
    fn headless_is_skipped() {
        let (s, e) = maps(vec![svc("a", "h", "None", 80)], vec![]);
        assert!(service_rules(&s, &e).is_empty());
    }
}
