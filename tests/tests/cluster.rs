//! The simulated Kubernetes cluster: a real control plane (etcd,
//! kube-apiserver, kube-controller-manager built from pinned sources), pods as
//! network namespaces and kube-proxy-like Service routing.
//!
//! Privileged: root, network namespaces, nftables. The first run on a machine
//! builds the pinned binaries (minutes; `cargo xtask cluster build` does it
//! ahead of time).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use beamlit_testbed::cluster::{KubeBinaries, TestCluster, workspace_root};
use beamlit_testbed::{ProbeOptions, ProbeReport, list_netns, require_privileges};

/// The seed README's php-apache Deployment and Service, verbatim (checked
/// against the seed by `fixture_matches_seed`).
const PHP_APACHE: &str = include_str!("../fixtures/php-apache.yaml");
const WAIT: Duration = Duration::from_secs(60);

fn cluster_ip(cluster: &TestCluster, ns: &str, svc: &str) -> SocketAddr {
    let ip = cluster
        .kubectl(&[
            "get",
            "service",
            svc,
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .expect("kubectl get service");
    format!("{}:80", ip.trim())
        .parse()
        .expect("the Service has an IPv4 ClusterIP")
}

fn http_probe(addr: SocketAddr, count: u64) -> ProbeOptions {
    let mut opts = ProbeOptions::new(addr, count);
    opts.http = true;
    opts.timeout_ms = Some(2000);
    opts
}

fn pod_names(cluster: &TestCluster, ns: &str) -> Vec<String> {
    let out = cluster
        .kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "run=php-apache",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .expect("kubectl get pods");
    out.split_whitespace().map(str::to_string).collect()
}

/// One `GET /` with `Connection: close`; the whole response. Call it inside a
/// pod's namespace ([`beamlit_testbed::Netns::enter`]).
fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: php-apache\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn all_refused(r: &ProbeReport) -> bool {
    r.ok == 0 && r.failed == r.attempts && r.errors.iter().all(|e| e.contains("Connection refused"))
}

/// The seed's walkthrough without the product: apply php-apache as written,
/// get 200s through the ClusterIP from a client pod, scale to zero (the
/// EndpointSlice empties and connections are refused: the failure the product
/// hides), scale back up (200s again, spread over the pods).
#[test]
fn php_apache_through_cluster_ip_scale_to_zero_and_back() {
    if !require_privileges() {
        return;
    }
    let cluster = TestCluster::shared().expect("test cluster");
    let ns = cluster.namespace("php").expect("namespace");
    let ns = ns.name();

    cluster
        .apply(ns, PHP_APACHE)
        .expect("apply the seed's YAML");
    cluster
        .wait_deployment_ready(ns, "php-apache", 1, WAIT)
        .expect("php-apache becomes ready");
    let pods = pod_names(cluster, ns);
    assert_eq!(pods.len(), 1, "{pods:?}");
    let pod_ip = cluster
        .pod(ns, &pods[0])
        .expect("pod runs")
        .ipv4
        .to_string();
    cluster
        .wait_for("the pod in the EndpointSlice", WAIT, || {
            Ok(cluster.ready_endpoints(ns, "php-apache")? == vec![pod_ip.clone()])
        })
        .expect("EndpointSlice from the controller");

    cluster
        .run_client_pod(ns, "curl-check")
        .expect("client pod");
    let svc = cluster_ip(cluster, ns, "php-apache");

    // The proxy follows the EndpointSlice asynchronously.
    cluster
        .wait_for("a first 200 through the ClusterIP", WAIT, || {
            Ok(cluster
                .probe_from(ns, "curl-check", &http_probe(svc, 1))?
                .ok
                == 1)
        })
        .expect("routing to php-apache");
    let report = cluster
        .probe_from(ns, "curl-check", &http_probe(svc, 20))
        .expect("probe");
    assert_eq!(report.ok, 20, "{report:?}");
    assert_eq!(report.count(&pods[0]), 20, "served by the pod: {report:?}");
    // The answer is the php-apache example's ("OK!"), naming the pod that served it.
    let client = cluster.pod(ns, "curl-check").expect("client pod runs");
    let response = client
        .netns
        .enter(move || http_get(svc))
        .expect("enter the client pod")
        .expect("GET through the ClusterIP");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.contains(&format!("X-Served-By: {}\r\n", pods[0])),
        "{response}"
    );
    assert!(response.ends_with("\r\n\r\nOK!"), "{response}");

    // Scale to zero: no ready endpoints, and the client is refused.
    cluster
        .kubectl(&[
            "scale",
            "deployment",
            "php-apache",
            "--replicas=0",
            "-n",
            ns,
        ])
        .expect("kubectl scale");
    cluster
        .wait_for("no ready endpoints", WAIT, || {
            Ok(cluster.has_endpoint_slice(ns, "php-apache")?
                && cluster.ready_endpoints(ns, "php-apache")?.is_empty())
        })
        .expect("EndpointSlice empties");
    cluster
        .wait_for("pods gone after graceful termination", WAIT, || {
            Ok(pod_names(cluster, ns).is_empty())
        })
        .expect("pods deleted");
    cluster
        .wait_for("connections refused", WAIT, || {
            Ok(all_refused(&cluster.probe_from(
                ns,
                "curl-check",
                &http_probe(svc, 1),
            )?))
        })
        .expect("refused with no endpoints");
    let report = cluster
        .probe_from(ns, "curl-check", &http_probe(svc, 5))
        .expect("probe");
    assert!(all_refused(&report), "{report:?}");

    // Scale back up: 200s again, from both new pods.
    cluster
        .kubectl(&[
            "scale",
            "deployment",
            "php-apache",
            "--replicas=2",
            "-n",
            ns,
        ])
        .expect("kubectl scale");
    cluster
        .wait_deployment_ready(ns, "php-apache", 2, WAIT)
        .expect("php-apache ready again");
    let pods = pod_names(cluster, ns);
    assert_eq!(pods.len(), 2, "{pods:?}");
    cluster
        .wait_for("both pods in the EndpointSlice", WAIT, || {
            Ok(cluster.ready_endpoints(ns, "php-apache")?.len() == 2)
        })
        .expect("EndpointSlice refills");
    cluster
        .wait_for("200s through the ClusterIP again", WAIT, || {
            Ok(cluster
                .probe_from(ns, "curl-check", &http_probe(svc, 1))?
                .ok
                == 1)
        })
        .expect("routing restored");
    let report = cluster
        .probe_from(ns, "curl-check", &http_probe(svc, 60))
        .expect("probe");
    assert_eq!(report.ok, 60, "{report:?}");
    for p in &pods {
        // P(a pod never drawn in 60 random picks) = 2^-59.
        assert!(report.count(p) > 0, "{p} never served: {report:?}");
    }
}

/// helm from the pinned cache accepts the chart in `charts/`.
#[test]
fn helm_lint_and_template_the_chart() {
    let bins = match KubeBinaries::find().expect("cache dir") {
        Some(b) => b,
        None if std::env::var_os("CI").is_some() || require_privileges() => {
            KubeBinaries::ensure().expect("building the pinned binaries")
        }
        None => return,
    };
    let chart = workspace_root().join("charts/beamlit-controller");
    let lint = Command::new(bins.helm())
        .args(["lint", "--strict"])
        .arg(&chart)
        .output()
        .expect("helm lint");
    assert!(lint.status.success(), "helm lint: {lint:?}");
    let template = Command::new(bins.helm())
        .args(["template", "beamlit-controller"])
        .arg(&chart)
        .args(["--namespace", "beamlit-system"])
        .output()
        .expect("helm template");
    assert!(template.status.success(), "helm template: {template:?}");
    let rendered = String::from_utf8_lossy(&template.stdout);
    assert!(rendered.contains("kind: "), "{rendered}");
    assert!(rendered.contains("beamlit-controller"), "{rendered}");
}

/// A second cluster start with a warm cache (the shared one, or an earlier
/// run, built the binaries) stays within 20 s, and tears down to nothing.
/// Two nodes, to cover multi-node registration.
#[test]
fn warm_cluster_up_within_20s_and_teardown_is_complete() {
    if !require_privileges() {
        return;
    }
    KubeBinaries::ensure().expect("binaries");
    let started = Instant::now();
    let cluster = TestCluster::start_with_nodes(2).expect("cluster");
    let nodes = cluster
        .kubectl(&["get", "nodes", "-o", "name"])
        .expect("kubectl get nodes");
    let elapsed = started.elapsed();
    eprintln!("warm cluster up (control plane + node + proxy) took {elapsed:.1?}");
    println!("warm cluster up took {elapsed:.1?}");
    assert!(nodes.contains("node/beamlit-node-1"), "{nodes}");
    assert!(nodes.contains("node/beamlit-node-2"), "{nodes}");
    assert!(
        elapsed <= Duration::from_secs(20),
        "cluster up took {elapsed:?}"
    );

    let node_ns = cluster.node_netns().to_string();
    let dir = cluster.kubeconfig().parent().expect("dir").to_path_buf();
    let pids = cluster_pids(&dir.display().to_string());
    assert!(
        pids.len() >= 3,
        "etcd, apiserver, controller-manager: {pids:?}"
    );
    drop(cluster);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !list_netns().expect("netns list").contains(&node_ns),
        "node namespace left behind"
    );
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "process {pid} still running"
        );
    }
}

/// Pids of processes whose command line mentions `dir` (the cluster's state dir).
fn cluster_pids(dir: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(dir)
        {
            pids.push(pid);
        }
    }
    pids
}

/// The fixture is the seed README's YAML as written.
#[test]
fn fixture_matches_seed() {
    let seed = workspace_root().join("../shared/seed/beamlit-controller-README.md");
    let Ok(text) = std::fs::read_to_string(&seed) else {
        eprintln!("{} not present; skipping", seed.display());
        return;
    };
    let start = text
        .find("kubectl apply -f - <<EOF\napiVersion: apps/v1\nkind: Deployment")
        .expect("php-apache block in the seed");
    let body = &text[start + "kubectl apply -f - <<EOF\n".len()..];
    let end = body.find("\nEOF\n").expect("end of the block");
    assert_eq!(&body[..=end], PHP_APACHE);
}
