//! A real-node cluster leaves the machine as it found it: after shutdown no namespace, cgroup
//! (in any hierarchy), mount, nft table, bpffs entry, directory or process of it remains, and
//! the machine-wide sysctls kubelet and kube-proxy would write never moved. Its own test binary
//! (cargo runs test binaries one after another), so nothing else of ours runs meanwhile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use beamlit_testbed::cluster::node_tools::NodeBinaries;
use beamlit_testbed::cluster::{KubeBinaries, RealCluster, RealNodesOptions};
use beamlit_testbed::{OrPanic as _, list_netns, require_privileges};

/// Machine-wide values (the machine's own namespaces) a kubelet, kube-proxy or CNI would set.
const SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "fs/inotify/max_user_watches",
    "fs/inotify/max_user_instances",
];

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    sysctls: BTreeMap<String, String>,
    /// Network namespaces, cgroups, mounts, bpffs entries and temp dirs named after this process.
    ours: Vec<String>,
    nft_tables: String,
    /// Processes of the node binaries (kubelet, containerd, ...) or of the images.
    node_processes: Vec<String>,
}

fn snapshot() -> Snapshot {
    let pid = format!("-{}-", std::process::id());
    let sysctls = SYSCTLS
        .iter()
        .filter_map(|k| {
            std::fs::read_to_string(format!("/proc/sys/{k}"))
                .ok()
                .map(|v| (k.to_string(), v.trim().to_string()))
        })
        .collect();
    let mut ours: Vec<String> = list_netns()
        .or_panic()
        .into_iter()
        .filter(|n| n.contains(&pid))
        .map(|n| format!("netns {n}"))
        .collect();
    for line in std::fs::read_to_string("/proc/self/mounts")
        .or_panic()
        .lines()
    {
        if line.contains(&pid) {
            ours.push(format!("mount {line}"));
        }
    }
    for dir in ["/sys/fs/bpf", "/tmp"] {
        for e in std::fs::read_dir(dir).or_panic().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(&pid) {
                ours.push(format!("{dir}/{name}"));
            }
        }
    }
    for h in cgroup_hierarchies() {
        walk(&h, &mut |p| {
            if p.to_string_lossy().contains(&pid) {
                ours.push(format!("cgroup {}", p.display()));
            }
        });
    }
    ours.sort();
    let nft_tables = String::from_utf8_lossy(
        &Command::new("nft")
            .args(["list", "tables"])
            .output()
            .or_panic()
            .stdout,
    )
    .into_owned();
    Snapshot {
        sysctls,
        ours,
        nft_tables,
        node_processes: node_processes(),
    }
}

fn cgroup_hierarchies() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .or_panic()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

fn walk(dir: &Path, f: &mut impl FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            f(&e.path());
            walk(&e.path(), f);
        }
    }
}

/// Processes whose executable is a node binary, or a program of the cluster's images.
fn node_processes() -> Vec<String> {
    let kube = KubeBinaries::cache_dir().or_panic();
    let nodes = NodeBinaries::cache_dir().or_panic();
    let node_bins: Vec<PathBuf> = ["kubelet", "kube-proxy", "kube-scheduler"]
        .iter()
        .map(|b| kube.join(b))
        .collect();
    let image_programs = [
        "/usr/local/bin/netprobe",
        "/pause",
        "/coredns",
        "/metrics-server",
    ];
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").or_panic().flatten() {
        let Ok(exe) = std::fs::read_link(e.path().join("exe")) else {
            continue;
        };
        let s = exe.to_string_lossy().into_owned();
        if exe.starts_with(&nodes)
            || node_bins.contains(&exe)
            || image_programs.contains(&s.as_str())
        {
            found.push(format!("{} {s}", e.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn a_real_node_cluster_leaves_the_machine_as_it_found_it() {
    if !require_privileges() {
        return;
    }
    let before = snapshot();
    assert!(
        before.node_processes.is_empty(),
        "node processes before the test: {:?}",
        before.node_processes
    );
    let cluster = RealCluster::start(
        &RealNodesOptions {
            nodes: 1,
            metrics_server: false,
        },
        &[],
    )
    .expect("real-node cluster");
    // A pod, so containerd, runc, CNI and kube-proxy have all made their state.
    let ns = cluster.namespace("life").or_panic();
    cluster
        .apply(ns.name(), beamlit_testbed::seed::PHP_APACHE)
        .or_panic();
    cluster
        .wait_pods_ready(
            ns.name(),
            "run=php-apache",
            1,
            std::time::Duration::from_secs(120),
        )
        .or_panic();
    let during = snapshot();
    assert_eq!(
        during.sysctls, before.sysctls,
        "a machine-wide sysctl moved while the node ran"
    );
    assert!(
        during.ours.iter().any(|o| o.starts_with("netns ")),
        "the check sees nothing of a running cluster: {:?}",
        during.ours
    );
    assert!(
        during
            .ours
            .iter()
            .any(|o| o.starts_with("cgroup ") && o.contains("kubepods")),
        "no kubepods cgroup seen below this process's cgroup: {:?}",
        during.ours
    );
    assert!(
        !during.node_processes.is_empty(),
        "no kubelet or containerd seen while running"
    );
    assert_eq!(
        during.nft_tables, before.nft_tables,
        "an nft table in the machine's namespace"
    );
    drop(ns);
    cluster.shutdown();
    let after = snapshot();
    assert_eq!(after, before, "left behind after shutdown");
}
