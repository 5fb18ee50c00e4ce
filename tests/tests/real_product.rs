//! The product on real nodes, as the seed README runs it: `helm install beamlit-controller
//! oci://<registry>/beamlit-controller-chart` with the README's flags (the project's images
//! from the cluster's registry, under containerd), the seed's php-apache and ModelDeployment,
//! the README's own `curl-check` loop in a pod, `kubectl scale --replicas=0` and back, and
//! `helm uninstall`. The remote is the fake Beamlit, in the cluster network, reached through a
//! Service name CoreDNS resolves.
//!
//! One test, in steps, on a cluster of its own: the release is cluster-wide (CRD, ClusterRoles,
//! APIService), and `helm uninstall` must come last.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail, ensure};
use beamlit_testbed::cluster::real_cluster::check_output;
use beamlit_testbed::cluster::real_nodes::Site;
use beamlit_testbed::cluster::{RealCluster, RealNodesOptions};
use beamlit_testbed::product::{
    AGENT_SELECTOR, Answer, Product, RELEASE, REMOTE_HOST, WAIT, agent_pod, answers, client_log,
    failed, md_status, pods_gone, run_on_node, scale, start_client,
};
use beamlit_testbed::seed::PHP_APACHE;
use beamlit_testbed::{OrPanic as _, require_privileges};

/// The programs of the agent, as bpftool names them.
const PROGRAMS: [&str; 5] = [
    "getpeername4",
    "getpeername6",
    "sock_ops",
    "connect4",
    "connect6",
];
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Where the walkthrough's offloaded requests go.
enum Remote {
    /// The fake Beamlit, with the chart's default credentials: the client prints
    /// `Route: beamlit` (Beamlit's `Cf-Ray` header).
    Beamlit,
    /// A second cluster's php-apache behind a NodePort, with no credentials: the answer names
    /// one of `pods` in `X-Served-By` (the client still prints `Route: local`, there being no
    /// `Cf-Ray`).
    Cluster { pods: Vec<String> },
}

impl Remote {
    fn served(&self, a: &Answer) -> bool {
        match self {
            Remote::Beamlit => a.beamlit,
            Remote::Cluster { pods } => pods
                .iter()
                .any(|pod| header(&a.text, "x-served-by") == Some(pod.as_str())),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Remote::Beamlit => "Beamlit",
            Remote::Cluster { .. } => "the second cluster",
        }
    }
}

/// The value of the (last) header `name` in what curl printed, case-insensitive in the name.
fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .rev()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// The README's walkthrough with the client on `client_node`: 0 failed requests, the remote
/// within 1 s of the scale-down, local again after scaling back, one token request to Beamlit
/// (none for a remote without credentials).
fn walkthrough(
    p: &Product,
    client: &str,
    client_node: &str,
    model_node: &str,
    remote: &Remote,
) -> Result<()> {
    let c = &p.cluster;
    start_client(c, client, client_node)?;
    let tokens_before = p.fake.stats()?.token_requests;
    let scaled_down = scale(c, 0)?;
    c.wait_for(
        "the decision NoReadyEndpoints",
        Duration::from_secs(30),
        || {
            let s = md_status(c)?;
            Ok(s["reason"] == "NoReadyEndpoints" && s["offloadPercent"] == 100)
        },
    )?;
    // The controller's decision follows at once too (the metrics are not read without a ready
    // endpoint, so a slow metrics API cannot hold it back).
    let decided = scaled_down.elapsed().unwrap_or_default();
    ensure!(
        decided <= Duration::from_secs(2),
        "the controller decided NoReadyEndpoints {decided:?} after kubectl scale (target 2 s)"
    );
    c.wait_for(
        &format!("answers from {}", remote.name()),
        Duration::from_secs(30),
        || {
            Ok(answers(&client_log(c, client)?)
                .iter()
                .any(|a| remote.served(a)))
        },
    )?;
    // Offloaded for a while (and every pod gone: nothing local can answer).
    c.wait_for("php-apache pods gone", WAIT, || {
        pods_gone(c, "run=php-apache")
    })?;
    std::thread::sleep(Duration::from_secs(3));

    // A process of the node outside the pods' cgroup (this test, in the node's network
    // namespace) is not redirected: kube-proxy refuses, since the Service has no endpoint.
    let service_ip = c.kubectl(&[
        "get",
        "service",
        "php-apache",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let host = c.with_node(client_node, |n| {
        Command::new("ip")
            .args(["netns", "exec", n.netns().name()])
            .args(["curl", "-sS", "-m", "5", "-o", "/dev/null"])
            .arg(format!("http://{service_ip}/"))
            .output()
    })??;
    ensure!(
        host.status.code() == Some(7),
        "a host process on {client_node} dialling the offloaded Service should be refused by \
         kube-proxy (curl exit 7, not redirected), got {:?}: {}",
        host.status.code(),
        String::from_utf8_lossy(&host.stderr)
    );

    // What the README says to debug with: `beamlit-agent inspect` in the agent's pod.
    let agent_pod = agent_pod(c, client_node)?;
    let inspect = c.exec("default", &agent_pod, &["beamlit-agent", "inspect"])?;
    ensure!(
        inspect
            .lines()
            .any(|l| l.contains(&format!("{service_ip}:80"))
                && l.contains("100.00%")
                && l.contains("default/php-apache")),
        "inspect does not show {service_ip}:80 offloaded 100% for default/php-apache:\n{inspect}"
    );
    ensure!(
        inspect.matches("yes").count() >= PROGRAMS.len(),
        "inspect does not show the six programs attached:\n{inspect}"
    );

    let scaled_up = scale(c, 1)?;
    c.wait_pods_ready("default", "run=php-apache", 1, WAIT)?;
    c.wait_for("Route: local again", Duration::from_secs(60), || {
        let log = client_log(c, client)?;
        Ok(answers(&log)
            .iter()
            .filter(|a| a.at > scaled_up && a.ok && !remote.served(a))
            .count()
            >= 10)
    })?;
    let all = answers(&client_log(c, client)?);
    c.kubectl(&["delete", "pod", client, "-n", "default", "--wait=false"])?;

    let bad = failed(&all);
    // When, against the scale-down and -up (which race each one lost).
    let since = |a: &Answer| {
        let rel = |t: SystemTime| match a.at.duration_since(t) {
            Ok(d) => format!("+{d:.2?}"),
            Err(e) => format!("-{:.2?}", e.duration()),
        };
        format!(
            "{} after the scale-down, {} after the scale-up",
            rel(scaled_down),
            rel(scaled_up)
        )
    };
    ensure!(
        bad.is_empty(),
        "{} of {} requests failed (client on {client_node}, model on {model_node}), at {:?}; \
         first: {:?}",
        bad.len(),
        all.len(),
        bad.iter().map(|a| since(a)).collect::<Vec<_>>(),
        bad.first().map(|a| a.text.as_str())
    );
    let first_remote = all
        .iter()
        .find(|a| remote.served(a))
        .with_context(|| format!("no answer from {}", remote.name()))?;
    let delay = first_remote
        .at
        .duration_since(scaled_down)
        .unwrap_or_default();
    ensure!(
        delay <= Duration::from_secs(1),
        "first answer from {} {delay:?} after kubectl scale (target 1 s)",
        remote.name()
    );
    let from_remote: Vec<&Answer> = all.iter().filter(|a| remote.served(a)).collect();
    let tokens = p.fake.stats()?.token_requests - tokens_before;
    match remote {
        // The node's tunnel asks for a token once (possibly before: it fetches one as soon as
        // it has the backend) and reuses it.
        Remote::Beamlit => ensure!(
            tokens <= 1,
            "{tokens} OAuth token requests during the walkthrough (one tunnel, one token)"
        ),
        // No credentials at all: none fetched, none sent.
        Remote::Cluster { .. } => {
            ensure!(
                tokens == 0,
                "{tokens} OAuth token requests while offloading to a remote without credentials"
            );
            let with_auth: Vec<_> = from_remote
                .iter()
                .filter(|a| header(&a.text, "x-saw-authorization") != Some("no"))
                .collect();
            ensure!(
                with_auth.is_empty(),
                "{} of {} answers from the second cluster saw an Authorization header (or did \
                 not say); first: {:?}",
                with_auth.len(),
                from_remote.len(),
                with_auth.first().map(|a| a.text.as_str())
            );
        }
    }
    println!(
        "client on {client_node}, model on {model_node}: {} requests, 0 failed, {} from {}, \
         first {delay:?} after the scale-down (the controller's decision {decided:?}), {tokens} \
         new token request(s)",
        all.len(),
        from_remote.len(),
        remote.name()
    );
    Ok(())
}

/// The seed's php-apache in the second cluster, and a NodePort in front of it.
const NEIGHBOUR_NODE_PORT: u16 = 30080;

/// The README's walkthrough with a second real-node cluster as the remote: its php-apache
/// behind a NodePort, named by the ModelDeployment's `remoteBackend` (plain HTTP, no
/// credentials), allowed by the chart's `config.allowedRemoteHosts`. The default remote comes
/// back afterwards.
fn offload_to_second_cluster(p: &Product, client_node: &str) -> Result<()> {
    let c = &p.cluster;
    let b = c.start_neighbour(
        &RealNodesOptions {
            nodes: 1,
            metrics_server: false,
        },
        &[],
    )?;
    b.apply("default", PHP_APACHE)?;
    b.apply(
        "default",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: php-apache-external\nspec:\n  \
             type: NodePort\n  selector:\n    run: php-apache\n  ports:\n  - port: 80\n    \
             nodePort: {NEIGHBOUR_NODE_PORT}\n"
        ),
    )?;
    let pods = b.wait_pods_ready("default", "run=php-apache", 1, WAIT)?;
    let host = format!("{}:{NEIGHBOUR_NODE_PORT}", Site::Neighbour.node_ip(1));
    let set_remote = |patch: &str| -> Result<()> {
        c.kubectl(&[
            "patch",
            "modeldeployment",
            "php-apache",
            "-n",
            "default",
            "--type=json",
            "-p",
            patch,
        ])?;
        Ok(())
    };
    let applied = |host: &str| -> Result<bool> {
        let s = md_status(c)?;
        Ok(s["remoteBackend"]["host"] == host
            && s["agents"]["applied"] == s["agents"]["total"]
            && s["agents"]["total"] == c.node_names().len())
    };
    set_remote(&format!(
        r#"[{{"op":"add","path":"/spec/offloadingConfig/remoteBackend","value":{{"host":"{host}","scheme":"http"}}}}]"#
    ))?;
    c.wait_for(
        "both agents apply the second cluster as remote",
        WAIT,
        || applied(&host),
    )?;
    let model = model_node(c)?;
    walkthrough(
        p,
        "curl-check-b",
        client_node,
        &model,
        &Remote::Cluster { pods },
    )?;
    set_remote(r#"[{"op":"remove","path":"/spec/offloadingConfig/remoteBackend"}]"#)?;
    c.wait_for("both agents apply the default remote again", WAIT, || {
        applied(REMOTE_HOST)
    })?;

    // The second cluster leaves nothing behind on the network it shared.
    let netns = b.with_nodes(|n| {
        n.nodes()
            .iter()
            .map(|node| node.netns().name().to_string())
            .collect::<Vec<_>>()
    })?;
    drop(b);
    for ns in &netns {
        ensure!(
            !Path::new("/run/netns").join(ns).exists(),
            "the second cluster's node namespace {ns} is still there"
        );
    }
    let links = c.with_nodes(|n| n.network().bridge().ip(&["-o", "link", "show"]))??;
    ensure!(
        !links.contains(": vb"),
        "the second cluster's veths are still on the bridge:\n{links}"
    );
    Ok(())
}

/// A pinned map of the agent on `node`, from the machine (through the node's mount namespace).
fn node_map(c: &RealCluster, node: &str, name: &str) -> Result<PathBuf> {
    let root = c
        .with_node(node, |n| n.init_pid())?
        .context("the node is not running")?;
    Ok(PathBuf::from(format!(
        "/proc/{root}/root/sys/fs/bpf/beamlit/{name}"
    )))
}

/// A container's cgroup (unified hierarchy, as the machine sees it) of the pod `uid` on `node`:
/// the first child of the pod's directory that has processes.
fn container_cgroup(c: &RealCluster, node: &str, uid: &str) -> Result<PathBuf> {
    let kubepods = kubepods(c, node)?;
    let pod_dir = [kubepods.clone()]
        .into_iter()
        .chain(
            std::fs::read_dir(&kubepods)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir()),
        )
        .map(|d| d.join(format!("pod{uid}")))
        .find(|d| d.is_dir())
        .with_context(|| format!("no cgroup of pod {uid} below {}", kubepods.display()))?;
    let mut children: Vec<PathBuf> = std::fs::read_dir(&pod_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    children.sort();
    children
        .into_iter()
        .find(|d| {
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
        })
        .with_context(|| {
            format!(
                "no container cgroup with processes in {}",
                pod_dir.display()
            )
        })
}

/// The cgroup ids in the agent's `exempt_cgroups` on `node` (bpftool's JSON, with BTF).
fn exempt_ids(c: &RealCluster, node: &str) -> Result<BTreeSet<u64>> {
    let out = check_output(
        "bpftool map dump",
        &Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(node_map(c, node, "exempt_cgroups")?)
            .output()?,
    )?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    entries
        .iter()
        .map(|e| {
            e["formatted"]["key"]
                .as_u64()
                .or_else(|| e["key"].as_u64())
                .with_context(|| format!("no key in {e}"))
        })
        .collect()
}

/// The API server's Service with a hand-written `services` entry on each controller's node
/// (every connect to it sent to a closed port): a process in a plain pod's container cgroup is
/// redirected and refused; one in the controller's container cgroup on the same node reaches
/// the API server, because the agent put the controller's pod (and its own) in
/// `exempt_cgroups`. So no ModelDeployment, nor any entry, cuts the controller off.
fn controllers_never_redirected(c: &RealCluster) -> Result<()> {
    use std::net::SocketAddrV4;
    let api_ip = c.kubectl(&[
        "get",
        "service",
        "kubernetes",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let api: SocketAddrV4 = format!("{api_ip}:443").parse()?;
    let nowhere: SocketAddrV4 = "127.0.0.1:1".parse()?;
    let pods = |selector: &str| -> Result<Vec<(String, String, String)>> {
        let out = c.kubectl(&[
            "get",
            "pods",
            "-n",
            "default",
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} {.spec.nodeName}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace().map(str::to_string);
                Some((f.next()?, f.next()?, f.next()?))
            })
            .collect())
    };
    let controllers = pods("app.kubernetes.io/component=controller")?;
    ensure!(!controllers.is_empty(), "no controller pod");
    let pod_dir_id = |node: &str, uid: &str| -> Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        let ctr = container_cgroup(c, node, uid)?;
        Ok(std::fs::metadata(ctr.parent().context("a pod directory")?)?.ino())
    };
    for (pod, uid, node) in &controllers {
        // The agent's view: this controller's pod and the agent's own, by cgroup id.
        let agent = pods(AGENT_SELECTOR)?
            .into_iter()
            .find(|(_, _, n)| n == node)
            .with_context(|| format!("no agent on {node}"))?;
        let want = [pod_dir_id(node, uid)?, pod_dir_id(node, &agent.1)?];
        c.wait_for(
            &format!("{node}'s agent exempts {pod} and itself"),
            Duration::from_secs(30),
            || {
                let ids = exempt_ids(c, node)?;
                Ok(want.iter().all(|w| ids.contains(w)))
            },
        )?;

        let probe = format!("probe-{node}");
        if pods(&format!("run={probe}"))?.is_empty() {
            run_on_node(c, &probe, node, "sleep 600")?;
        }
        let probe_uid = c
            .wait_pods_ready("default", &format!("run={probe}"), 1, WAIT)
            .and_then(|_| pods(&format!("run={probe}")))?
            .first()
            .map(|p| p.1.clone())
            .context("the probe pod")?;
        let plain = container_cgroup(c, node, &probe_uid)?;
        let controller = container_cgroup(c, node, uid)?;
        let netns = c.with_node(node, |n| n.netns().name().to_string())?;
        let curl = |cgroup: &Path| -> Result<Option<i32>> {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &netns])
                .args(["curl", "-sk", "-m", "3", "-o", "/dev/null"])
                .arg(format!("https://{api}/version"));
            Ok(beamlit_testbed::run_in(Some(cgroup), cmd)?.status.code())
        };
        let services = node_map(c, node, "services")?;
        // The agent removes entries nobody asked for at its next sync (at most 10 s): both
        // dials must happen while the entry is there, or the round is tried again.
        let mut rounds = 0;
        let (refused, reached) = loop {
            rounds += 1;
            beamlit_testbed::write_service_entry(&services, api, nowhere, 10_000, 65_535)?;
            let refused = curl(&plain)?;
            let reached = curl(&controller)?;
            if beamlit_testbed::has_service_entry(&services, api)? || rounds == 5 {
                break (refused, reached);
            }
        };
        ensure!(
            refused == Some(7),
            "a plain pod's process on {node} dialling {api} with the hand-written entry should be \
             redirected to {nowhere} and refused (curl exit 7), got {refused:?}"
        );
        ensure!(
            reached == Some(0),
            "the controller {pod}'s container on {node} dialling {api} with the hand-written \
             entry should reach the API server (exempt), got curl exit {reached:?}"
        );
        c.wait_for(
            &format!("{node}'s agent removes the hand-written entry"),
            Duration::from_secs(30),
            || Ok(!beamlit_testbed::has_service_entry(&services, api)?),
        )?;
        println!(
            "{node}: with a hand-written entry for {api}, a plain pod is redirected (refused), the \
             controller {pod} is not (exempt cgroup), {rounds} round(s)"
        );
    }
    for (_, _, node) in &controllers {
        let _ = c.kubectl(&[
            "delete",
            "pod",
            &format!("probe-{node}"),
            "-n",
            "default",
            "--wait=false",
        ]);
    }
    Ok(())
}

/// The node's pods cgroup, where the agent attaches.
fn kubepods(c: &RealCluster, node: &str) -> Result<PathBuf> {
    c.with_node(node, |n| n.kubepods_cgroup())?
        .context("the node has no unified kubepods cgroup")
}

/// Our programs on `cgroup`, by bpftool (the kernel's view).
fn attached(cgroup: &Path) -> Result<BTreeSet<String>> {
    let out = check_output(
        "bpftool cgroup show",
        &Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(cgroup)
            .output()?,
    )?;
    Ok(out
        .split_whitespace()
        .filter(|w| PROGRAMS.contains(w))
        .map(str::to_string)
        .collect())
}

/// The links pinned in the node's own bpffs.
fn pinned_links(c: &RealCluster, node: &str) -> Result<Vec<String>> {
    let root = c
        .with_node(node, |n| n.init_pid())?
        .context("the node is not running")?;
    let dir = PathBuf::from(format!("/proc/{root}/root/sys/fs/bpf/beamlit/links"));
    Ok(match std::fs::read_dir(&dir) {
        Ok(d) => d
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    })
}

/// Processes named `comm` in the pods of `kubepods` (a node's).
fn pod_processes(kubepods: &Path, comm: &str) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter(|pid| {
            let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
                return false;
            };
            cg.lines()
                .filter_map(|l| l.strip_prefix("0::"))
                .any(|path| match path.find("/kubepods/") {
                    Some(i) => kubepods.to_string_lossy().ends_with(&path[..i + 9]),
                    None => false,
                })
        })
        .collect()
}

/// Whether the process's root mount is read-only.
fn root_read_only(pid: u32) -> Result<bool> {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .context("the root mount")?;
    Ok(root
        .split_whitespace()
        .nth(5)
        .is_some_and(|o| o.split(',').any(|x| x == "ro")))
}

fn status_field(pid: u32, field: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// argv[1] of a process (`run` for the agent, `tunnel` for the tunnel container).
fn subcommand(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .nth(1)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// The agent runs as the chart says: root, exactly BPF, NET_ADMIN and PERFMON, no new
/// privileges, under the runtime's default seccomp profile, listening on nothing but the
/// node's loopback; the tunnel beside it (what parses pods' bytes) as a non-root user with no
/// capability at all, read-only root, seccomp; the controller as non-root on a read-only root
/// filesystem.
fn check_security_context(c: &RealCluster) -> Result<()> {
    let expected = (1u64 << CAP_BPF) | (1u64 << CAP_NET_ADMIN) | (1u64 << CAP_PERFMON);
    let mut controllers = 0;
    for node in c.node_names() {
        let pods = kubepods(c, node)?;
        let processes = pod_processes(&pods, "beamlit-agent");
        let of = |sub: &str| -> Vec<u32> {
            processes
                .iter()
                .copied()
                .filter(|p| subcommand(*p) == sub)
                .collect()
        };
        let (agents, tunnels) = (of("run"), of("tunnel"));
        ensure!(
            agents.len() == 1 && tunnels.len() == 1,
            "on {node}: agent processes {agents:?}, tunnel processes {tunnels:?}"
        );
        let tunnel = tunnels[0];
        let uid = status_field(tunnel, "Uid:")?;
        ensure!(
            uid.split_whitespace().all(|u| u == "65532"),
            "tunnel uid {uid}"
        );
        for field in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
            let caps = status_field(tunnel, field)?;
            ensure!(
                u64::from_str_radix(&caps, 16)? == 0,
                "the tunnel on {node} holds capabilities: {field} {caps}"
            );
        }
        ensure!(status_field(tunnel, "Seccomp:")? == "2", "tunnel seccomp");
        ensure!(
            status_field(tunnel, "NoNewPrivs:")? == "1",
            "tunnel no_new_privs"
        );
        ensure!(
            root_read_only(tunnel)?,
            "the tunnel's root filesystem is writable"
        );
        let pid = agents[0];
        // What the agent listens on (the node's network namespace is the pod's: hostNetwork).
        let netns = c.with_node(node, |n| n.netns().name().to_string())?;
        let ss = check_output(
            "ss",
            &Command::new("ip")
                .args(["netns", "exec", &netns, "ss", "-Hltnp"])
                .output()?,
        )?;
        let listening: Vec<&str> = ss
            .lines()
            .filter(|l| l.contains(&format!("pid={pid},")))
            .collect();
        ensure!(
            !listening.is_empty(),
            "the agent on {node} serves no /healthz:\n{ss}"
        );
        ensure!(
            listening.iter().all(|l| l
                .split_whitespace()
                .nth(3)
                .is_some_and(|a| a.starts_with("127.0.0.1:"))),
            "the agent on {node} listens beyond the node's loopback: {listening:?}"
        );
        let eff = u64::from_str_radix(&status_field(pid, "CapEff:")?, 16)?;
        ensure!(
            eff == expected,
            "agent CapEff {eff:#x}, expected {expected:#x}"
        );
        ensure!(
            status_field(pid, "Seccomp:")? == "2",
            "the agent is not under a seccomp filter (RuntimeDefault)"
        );
        ensure!(status_field(pid, "NoNewPrivs:")? == "1");
        ensure!(status_field(pid, "Uid:")?.starts_with("0\t"));
        for pid in pod_processes(&pods, "beamlit-control") {
            controllers += 1;
            let uid = status_field(pid, "Uid:")?;
            ensure!(uid.starts_with("65532\t"), "controller uid {uid}");
            ensure!(
                root_read_only(pid)?,
                "the controller's root filesystem is writable"
            );
            ensure!(status_field(pid, "Seccomp:")? == "2");
        }
    }
    ensure!(
        controllers == 2,
        "{controllers} controller processes, expected 2"
    );
    Ok(())
}

/// Every node's agent attached all six programs to its pods cgroup, pinned them in the node's
/// bpffs, and nothing of ours is on the machine's cgroup v2 root.
fn check_attachment(c: &RealCluster) -> Result<()> {
    for node in c.node_names() {
        let pods = kubepods(c, node)?;
        let programs = attached(&pods)?;
        ensure!(
            programs.len() == PROGRAMS.len(),
            "on {node}'s pods cgroup: {programs:?}"
        );
        let mut links = pinned_links(c, node)?;
        links.sort();
        let mut want: Vec<String> = PROGRAMS.iter().map(|p| p.to_string()).collect();
        want.sort();
        ensure!(links == want, "links pinned on {node}: {links:?}");
        // The node's daemon cgroup (kubelet, containerd) is the parent's sibling: not covered.
        let node_root = pods.parent().context("kubepods' parent")?;
        ensure!(
            attached(node_root)?.is_empty(),
            "programs on {}",
            node_root.display()
        );
    }
    let machine_root = beamlit_testbed::cgroup2_mount()?;
    ensure!(
        attached(&machine_root)?.is_empty(),
        "our programs on the machine's cgroup v2 root"
    );
    Ok(())
}

/// Offload on metrics, end to end: load on php-apache (the seed's CPU metric through the
/// chart's metrics-server) offloads `behavior.percentage` (50), measured at the client; load
/// off, back to 0 after the stabilization window (the chart's 60 s).
fn metric_offload(p: &Product, load_node: &str) -> Result<()> {
    let c = &p.cluster;
    c.wait_pods_ready("default", "run=php-apache", 1, WAIT)?;
    c.wait_for("the metric is read (Healthy, below target)", WAIT, || {
        let s = md_status(c)?;
        Ok(s["reason"] == "Healthy" && s["offloadPercent"] == 0)
    })
    .with_context(|| format!("{}", md_status(c).unwrap_or_default()))?;
    // Four clients back to back, bounded in time so that nothing outlives a failed test.
    let load = "end=$(( $(date +%s) + 600 )); for i in 1 2 3 4; do (while [ $(date +%s) -lt $end ]; do curl -s -o /dev/null http://php-apache; done) & done; wait";
    run_on_node(c, "load", load_node, load)?;
    let loaded = Instant::now();
    c.wait_for("MetricAboveTarget: the seed's 50%", WAIT, || {
        let s = md_status(c)?;
        Ok(s["offloadPercent"] == 50 && s["reason"] == "MetricAboveTarget")
    })
    .with_context(|| format!("{}", md_status(c).unwrap_or_default()))?;
    let to_offload = loaded.elapsed();
    // The share clients see: 1000 requests, each a new connection, counted by the remote's
    // header (50 ± 5 is over 3 standard deviations of a fair split).
    let measure = "n=0; for i in $(seq 1000); do curl -s -D - -o /dev/null http://php-apache | grep -qi '^cf-ray' && n=$((n+1)); done; echo remote=$n";
    let (ok, out) = c.run_pod(
        "default",
        "share",
        "curlimages/curl",
        &[],
        &["sh", "-c", measure],
    )?;
    ensure!(ok, "the share client failed: {out}");
    let remote: u32 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("remote="))
        .context("no count")?
        .parse()?;
    let share = f64::from(remote) / 10.0;
    ensure!(
        (45.0..=55.0).contains(&share),
        "{share:.1}% of 1000 new connections went to Beamlit, the decision is 50%"
    );
    roll_agents(p, load_node)?;
    c.kubectl(&[
        "delete",
        "pod",
        "load",
        "-n",
        "default",
        "--grace-period=0",
        "--force",
    ])?;
    let unloaded = Instant::now();
    c.wait_for(
        "back to 0 after the window",
        Duration::from_secs(240),
        || {
            let s = md_status(c)?;
            Ok(s["offloadPercent"] == 0 && s["reason"] == "Healthy")
        },
    )
    .with_context(|| format!("{}", md_status(c).unwrap_or_default()))?;
    let back = unloaded.elapsed();
    ensure!(
        back >= Duration::from_secs(60),
        "offloading stopped {back:?} after the load, before the 60 s stabilization window"
    );
    println!(
        "metrics: 50% offloaded {to_offload:?} after the load started, {share:.1}% of new \
         connections to Beamlit, back to 0 {back:?} after it stopped"
    );
    Ok(())
}

/// The id of each pinned link of `node`, by bpftool (`link show pinned`).
fn link_ids(c: &RealCluster, node: &str) -> Result<Vec<(String, u64, u64)>> {
    let root = c
        .with_node(node, |n| n.init_pid())?
        .context("the node is not running")?;
    let mut ids = Vec::new();
    for program in PROGRAMS {
        let pin = format!("/proc/{root}/root/sys/fs/bpf/beamlit/links/{program}");
        let out = check_output(
            "bpftool link show pinned",
            &Command::new("bpftool")
                .args(["-j", "link", "show", "pinned", &pin])
                .output()?,
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        ids.push((
            program.to_string(),
            v["id"].as_u64().context("link id")?,
            v["prog_id"].as_u64().context("program id")?,
        ));
    }
    Ok(ids)
}

/// While half the traffic is offloaded (the local pod answers the rest): the agent pod of
/// `client_node` deleted, then the DaemonSet rolled to a new image tag with `helm upgrade`.
/// The README's client on that node sees no failed request; every node keeps its links (same
/// ids: adopted, not re-attached) with the new agent's programs in them.
fn roll_agents(p: &Product, client_node: &str) -> Result<()> {
    let c = &p.cluster;
    let before: Vec<_> = c
        .node_names()
        .iter()
        .map(|n| link_ids(c, n))
        .collect::<Result<_>>()?;
    start_client(c, "curl-roll", client_node)?;
    let agent_pod = agent_pod(c, client_node)?;
    c.kubectl(&["delete", "pod", &agent_pod, "-n", "default"])?;
    c.wait_pods_ready("default", AGENT_SELECTOR, 2, WAIT)?;

    // A new tag of the same image: what an upgrade changes in the DaemonSet.
    let mut next = p
        .images
        .iter()
        .find(|i| i.name.ends_with("/beamlit-agent"))
        .context("the agent image")?
        .clone();
    next.tag = format!("{}-next", next.tag);
    c.push_images(std::slice::from_ref(&next))?;
    check_output(
        "helm upgrade",
        &c.helm_in_network()
            .args(["upgrade", RELEASE])
            .arg(format!(
                "oci://{}/beamlit/beamlit-controller-chart",
                c.registry_addr()
            ))
            .args(["--version", env!("CARGO_PKG_VERSION"), "--plain-http"])
            .args([
                "--reuse-values",
                "--set",
                &format!("agent.image.tag={}", next.tag),
            ])
            .output()?,
    )?;
    check_output(
        "kubectl rollout status",
        &c.kubectl_output(&[
            "rollout",
            "status",
            "daemonset/beamlit-controller-agent",
            "-n",
            "default",
            "--timeout=180s",
        ])?,
    )?;
    let images = c.kubectl(&[
        "get",
        "pods",
        "-n",
        "default",
        "-l",
        AGENT_SELECTOR,
        "-o",
        "jsonpath={.items[*].spec.containers[0].image}",
    ])?;
    ensure!(
        images.split_whitespace().all(|i| i.ends_with(&next.tag)),
        "agents after the roll: {images}"
    );
    // A few more answers through the new agents.
    std::thread::sleep(Duration::from_secs(3));
    let all = answers(&client_log(c, "curl-roll")?);
    c.kubectl(&[
        "delete",
        "pod",
        "curl-roll",
        "-n",
        "default",
        "--wait=false",
    ])?;
    let bad = failed(&all);
    ensure!(
        bad.is_empty(),
        "{} of {} requests failed while the agents were replaced: {:?}",
        bad.len(),
        all.len(),
        bad.first().map(|a| a.text.as_str())
    );
    let remote = all.iter().filter(|a| a.beamlit).count();
    ensure!(remote > 0, "no request offloaded during the roll");
    for (node, before) in c.node_names().iter().zip(before) {
        let after = link_ids(c, node)?;
        for ((program, link, prog), (_, link_after, prog_after)) in before.iter().zip(&after) {
            ensure!(
                link == link_after,
                "{node}: link of {program} replaced ({link} -> {link_after}): redirection had a gap"
            );
            ensure!(
                prog != prog_after,
                "{node}: {program} still runs the first agent's program {prog}"
            );
        }
    }
    println!(
        "agent pod deleted and DaemonSet rolled to {}: {} requests, 0 failed, {remote} offloaded; \
         links adopted on every node",
        next.tag,
        all.len()
    );
    Ok(())
}

fn model_node(c: &RealCluster) -> Result<String> {
    let pods = c.wait_pods_ready("default", "run=php-apache", 1, WAIT)?;
    c.pod_node("default", &pods[0])
}

#[test]
fn the_seed_readme_on_real_nodes_from_helm_install_to_uninstall() {
    if !require_privileges() {
        return;
    }
    let p = Product::start().or_panic();
    let c = &p.cluster;
    let step = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            panic!("{what}: {e:#}\n{}", p.report());
        }
        println!("ok: {what}");
    };

    step(
        "helm install from the registry",
        (|| {
            // The second cluster's node is a remote a ModelDeployment may name (by address).
            let out = p.helm_install(&[&format!(
                "config.allowedRemoteHosts={{{}}}",
                Site::Neighbour.node_ip(1)
            )])?;
            ensure!(out.contains("STATUS: deployed"), "{out}");
            c.kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/modeldeployments.deployment.beamlit.com",
            ])?;
            c.wait_pods_ready("default", AGENT_SELECTOR, 2, WAIT)?;
            c.wait_pods_ready("default", "app.kubernetes.io/component=controller", 2, WAIT)?;
            Ok(())
        })(),
    );
    step(
        "the chart's security context on containerd",
        check_security_context(c),
    );

    step(
        "the seed's php-apache and ModelDeployment",
        (|| {
            c.apply("default", PHP_APACHE)?;
            c.wait_pods_ready("default", "run=php-apache", 1, WAIT)?;
            c.apply("default", include_str!("../fixtures/model-deployment.yaml"))?;
            // The README's status command.
            c.wait_for("both agents acknowledge the model", WAIT, || {
                let acked = c.node_names().iter().all(|node| {
                    c.kubectl(&[
                        "get",
                        "lease",
                        &format!("beamlit-agent-{node}"),
                        "-n",
                        "default",
                        "-o",
                        "json",
                    ])
                    .is_ok_and(|l| l.contains("default/php-apache"))
                });
                Ok(acked)
            })?;
            let table = c.kubectl(&["get", "modeldeployment", "php-apache"])?;
            ensure!(table.contains("php-apache"), "{table}");
            Ok(())
        })(),
    );
    step(
        "programs on the pods cgroup, pins in the node's bpffs",
        check_attachment(c),
    );
    step(
        "the controllers' connections are never redirected, whatever a map says",
        controllers_never_redirected(c),
    );

    let model = model_node(c).or_panic();
    step(
        "the walkthrough, client beside the model",
        walkthrough(&p, "curl-check", &model, &model, &Remote::Beamlit),
    );
    // The new php-apache pod may have landed on either node.
    let model = model_node(c).or_panic();
    let other = c
        .node_names()
        .iter()
        .find(|n| **n != model)
        .expect("a second node")
        .clone();
    step(
        "the walkthrough, client on the node without the model",
        walkthrough(&p, "curl-check-2", &other, &model, &Remote::Beamlit),
    );
    step(
        "the walkthrough offloaded to a second cluster (NodePort, no credentials)",
        offload_to_second_cluster(&p, &other),
    );
    step(
        "offload on the CPU metric, and back after the window",
        metric_offload(&p, &other),
    );

    step(
        "helm uninstall: nothing attached or pinned, the client keeps its answers",
        (|| {
            start_client(c, "curl-check-3", &other)?;
            // The finalizer needs the controller: the model goes first, as docs/operations.md says.
            c.kubectl(&[
                "delete",
                "modeldeployment",
                "php-apache",
                "-n",
                "default",
                "--timeout=60s",
            ])?;
            // The agents' logs to their end (their pods are gone when the checks run).
            let mut followers = Vec::new();
            let mut agent_logs = Vec::new();
            for node in c.node_names() {
                let pod = agent_pod(c, node)?;
                let path = p.dir.join(format!("agent-{node}.log"));
                let mut cmd = Command::new(c.binaries().kubectl());
                cmd.arg(format!("--kubeconfig={}", c.kubeconfig().display()))
                    .args(["logs", "-f", "-n", "default", &pod])
                    .stdout(std::fs::File::create(&path)?);
                followers.push(beamlit_testbed::spawn(cmd, None)?);
                agent_logs.push(path);
            }
            let logs = || {
                agent_logs
                    .iter()
                    .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n----\n")
            };
            let started = SystemTime::now();
            check_output(
                "helm uninstall",
                &c.helm()
                    .args(["uninstall", RELEASE, "--wait", "--timeout=120s"])
                    .output()?,
            )?;
            c.wait_for("agents gone", WAIT, || pods_gone(c, AGENT_SELECTOR))?;
            drop(followers);
            for node in c.node_names() {
                let left = attached(&kubepods(c, node)?)?;
                ensure!(
                    left.is_empty(),
                    "still attached on {node}: {left:?}\nthe agents' logs:\n{}",
                    logs()
                );
                let pins = pinned_links(c, node)?;
                ensure!(
                    pins.is_empty(),
                    "still pinned on {node}: {pins:?}\n{}",
                    logs()
                );
                // Maps too: the agent's bpffs directory is gone.
                let dir = node_map(c, node, "")?;
                ensure!(
                    !dir.exists(),
                    "{} still exists on {node}: {:?}\n{}",
                    dir.display(),
                    std::fs::read_dir(&dir)
                        .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
                    logs()
                );
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            let all = answers(&client_log(c, "curl-check-3")?);
            let after = all.iter().filter(|a| a.at > started).count();
            let bad = failed(&all);
            ensure!(
                after >= 10,
                "{after} answers during and after the uninstall"
            );
            ensure!(
                bad.is_empty(),
                "{} failed during the uninstall: {:?}",
                bad.len(),
                bad.first().map(|a| a.text.as_str())
            );
            ensure!(
                all.iter().all(|a| !a.beamlit),
                "offloaded during the uninstall"
            );
            Ok(())
        })(),
    );
    if let Err(e) = (|| -> Result<()> {
        // One token per party for the whole run, each reusing it: the leading controller (the
        // Beamlit API) and every agent process: two, one more for the deleted pod's successor,
        // two more for the rolled DaemonSet.
        let tokens = p.fake.stats()?.token_requests;
        ensure!(tokens <= 6, "{tokens} OAuth token requests in all");
        println!("OAuth token requests in all: {tokens}");
        let refused = c.refused_egress()?;
        if !refused.is_empty() {
            bail!("something tried to leave the cluster network: {refused:?}");
        }
        Ok(())
    })() {
        panic!("{e:#}");
    }
}
