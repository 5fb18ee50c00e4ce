//! Real nodes: the seed's php-apache under containerd, Services through real kube-proxy, names
//! through CoreDNS, metrics through metrics-server, images pulled from the cluster's registry.
//! One two-node cluster for this test binary (`RealCluster::shared`), a namespace per test.

use std::time::{Duration, Instant};

use beamlit_testbed::cluster::real_cluster::check_output;
use beamlit_testbed::cluster::{RealCluster, RealNamespace};
use beamlit_testbed::seed::PHP_APACHE;
use beamlit_testbed::{OrPanic as _, require_privileges};

const POD_WAIT: Duration = Duration::from_secs(120);
/// The seed's client image, as its README names it.
const CURL: &str = "curlimages/curl";

fn cluster() -> Option<&'static RealCluster> {
    if !require_privileges() {
        return None;
    }
    Some(RealCluster::shared().expect("real-node cluster"))
}

/// The seed's php-apache Deployment and Service, applied verbatim; waits for `replicas` Ready.
fn php_apache(c: &RealCluster, ns: &RealNamespace<'_>) -> Vec<String> {
    c.apply(ns.name(), PHP_APACHE).expect("apply php-apache");
    c.wait_pods_ready(ns.name(), "run=php-apache", 1, POD_WAIT)
        .expect("php-apache Ready")
}

/// A pod of the curl image running `script` under `sh -c`: whether it exited 0, and its log.
fn curl_pod(c: &RealCluster, ns: &str, name: &str, extra: &[&str], script: &str) -> (bool, String) {
    c.run_pod(ns, name, CURL, extra, &["sh", "-c", script])
        .or_panic()
}

#[test]
fn seed_php_apache_runs_under_containerd_and_is_reached_through_coredns_and_kube_proxy() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("seed").expect("namespace");
    let pods = php_apache(c, &ns);
    // The image came from the registry under the seed's exact name.
    let image = c
        .kubectl(&[
            "get",
            "pod",
            &pods[0],
            "-n",
            ns.name(),
            "-o",
            "jsonpath={.status.containerStatuses[0].image} {.status.containerStatuses[0].imageID}",
        ])
        .or_panic();
    assert!(
        image.starts_with("registry.k8s.io/hpa-example:latest"),
        "{image}"
    );

    // By name (CoreDNS), through the ClusterIP (kube-proxy, nftables).
    let probe =
        "curl -sS -m 5 -o /tmp/body -w '%{http_code}' http://php-apache && echo && cat /tmp/body";
    let (ok, out) = curl_pod(c, ns.name(), "curl-up", &[], probe);
    assert!(ok, "curl to php-apache failed: {out}");
    assert!(out.contains("200"), "{out}");
    assert!(out.contains("OK!"), "{out}");

    // No endpoints: kube-proxy rejects, the connection is refused at once.
    c.kubectl(&[
        "scale",
        "deployment",
        "php-apache",
        "--replicas=0",
        "-n",
        ns.name(),
    ])
    .or_panic();
    c.wait_for("php-apache gone", POD_WAIT, || {
        Ok(c.kubectl(&[
            "get",
            "pods",
            "-n",
            ns.name(),
            "-l",
            "run=php-apache",
            "-o",
            "name",
        ])?
        .trim()
        .is_empty())
    })
    .or_panic();
    let started = Instant::now();
    let (ok, out) = curl_pod(
        c,
        ns.name(),
        "curl-down",
        &[],
        "curl -sS -m 5 http://php-apache",
    );
    assert!(!ok, "curl succeeded with no endpoints: {out}");
    // curl's 7 is "couldn't connect" at once (kube-proxy rejects a Service without endpoints);
    // a dropped SYN would be a timeout (28) after -m 5.
    assert!(
        out.contains("curl: (7)"),
        "expected a refused connection: {out}"
    );
    eprintln!("refused run took {:.1?}", started.elapsed());

    c.kubectl(&[
        "scale",
        "deployment",
        "php-apache",
        "--replicas=1",
        "-n",
        ns.name(),
    ])
    .or_panic();
    c.wait_pods_ready(ns.name(), "run=php-apache", 1, POD_WAIT)
        .or_panic();
    // The endpoint is programmed a moment after Ready; retry briefly inside the pod.
    let retry =
        "for i in $(seq 20); do curl -sS -m 2 http://php-apache && exit 0; sleep 0.5; done; exit 1";
    let (ok, out) = curl_pod(c, ns.name(), "curl-back", &[], retry);
    assert!(
        ok && out.contains("OK!"),
        "php-apache did not come back: {out}"
    );
}

#[test]
fn a_pod_on_node_two_reaches_a_pod_on_node_one_through_the_service() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("xnode").expect("namespace");
    let (first, second) = (&c.node_names()[0], &c.node_names()[1]);
    c.apply(ns.name(), PHP_APACHE).or_panic();
    // Pin the server to node 1 (a patch of the seed's Deployment, not a copy of it).
    c.kubectl(&[
        "patch",
        "deployment",
        "php-apache",
        "-n",
        ns.name(),
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"template":{{"spec":{{"nodeName":"{first}"}}}}}}}}"#),
    ])
    .or_panic();
    let pods = c
        .wait_pods_ready(ns.name(), "run=php-apache", 1, POD_WAIT)
        .or_panic();
    assert_eq!(&c.pod_node(ns.name(), &pods[0]).or_panic(), first);

    let overrides = format!(r#"--overrides={{"spec":{{"nodeName":"{second}"}}}}"#);
    let (ok, out) = curl_pod(
        c,
        ns.name(),
        "client",
        &[&overrides],
        "curl -sS -m 5 -D - http://php-apache.$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace).svc.cluster.local",
    );
    assert!(ok, "cross-node request failed: {out}");
    assert!(
        out.contains(&format!("X-Served-By: {}", pods[0])),
        "not served by the pod on {first}: {out}"
    );
}

#[test]
fn kubectl_top_shows_php_apache_cpu_rising_under_load() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("top").expect("namespace");
    let pods = php_apache(c, &ns);
    let pod = &pods[0];
    let cpu = || -> Option<u64> {
        let out = c
            .kubectl(&["top", "pod", pod, "-n", ns.name(), "--no-headers"])
            .ok()?;
        out.split_whitespace()
            .nth(1)?
            .trim_end_matches('m')
            .parse()
            .ok()
    };
    let mut idle = None;
    c.wait_for(
        "a first metrics-server sample",
        Duration::from_secs(90),
        || {
            idle = cpu();
            Ok(idle.is_some())
        },
    )
    .or_panic();
    let idle = idle.expect("a sample was seen");
    // 60 s of back-to-back requests from a client pod (bounded: it stops by itself).
    let load = "end=$(( $(date +%s) + 60 )); while [ $(date +%s) -lt $end ]; do curl -s -o /dev/null http://php-apache; done";
    c.kubectl(&[
        "run",
        "load",
        "-n",
        ns.name(),
        "--restart=Never",
        &format!("--image={CURL}"),
        "--",
        "sh",
        "-c",
        load,
    ])
    .or_panic();
    let mut busy = 0;
    c.wait_for("php-apache CPU to rise", Duration::from_secs(75), || {
        busy = cpu().unwrap_or(0);
        Ok(busy >= idle + 100)
    })
    .unwrap_or_else(|e| panic!("{e:#}; idle {idle}m, last {busy}m"));
    eprintln!("php-apache CPU: idle {idle}m, under load {busy}m");
}

#[test]
fn kubectl_logs_and_exec_reach_the_kubelet_by_address_only() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("logs").expect("namespace");
    let pods = php_apache(c, &ns);
    let out = c
        .exec(ns.name(), &pods[0], &["/usr/local/bin/netprobe", "--help"])
        .or_panic();
    assert!(out.contains("usage"), "{out}");
    // The pod's log: netprobe prints where it listens.
    let logs = c.logs(ns.name(), &pods[0]).or_panic();
    assert!(logs.contains("listening on 0.0.0.0:80"), "{logs}");
    // As a user types it: attached, removed at the end (the sleep outlives the attach).
    let out = c
        .run_pod_attached(
            ns.name(),
            "echo",
            CURL,
            &["sh", "-c", "sleep 3; echo hello-from-$HOSTNAME"],
        )
        .or_panic();
    let text = check_output("kubectl run --rm -i", &out).or_panic();
    assert!(text.contains("hello-from-echo"), "{text}");
    // Everything went to kubelets by IP address inside the cluster network.
    assert_eq!(c.refused_egress().or_panic(), Vec::<String>::new());
}

#[test]
fn nothing_leaves_the_cluster_network() {
    let Some(c) = cluster() else { return };
    let ns = c.namespace("egress").expect("namespace");
    // From a pod: an outside address has no route (fails locally, at once); an outside name
    // is not resolved (CoreDNS forwards nothing).
    let (ok, out) = curl_pod(
        c,
        ns.name(),
        "outside",
        &[],
        "curl -sS -m 5 http://192.0.2.1/ ; echo rc=$?; curl -sS -m 5 http://example.com/ ; echo rc=$?",
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("rc=7"),
        "an outside address was reachable: {out}"
    );
    assert!(out.contains("rc=6"), "an outside name resolved: {out}");
    assert!(!out.contains("rc=0"), "{out}");
    // From every node namespace: no route off the machine.
    c.with_nodes(|nodes| {
        for n in nodes.nodes() {
            let err = n
                .netns()
                .ip(&["route", "get", "192.0.2.1"])
                .expect_err("a node namespace has a route off the machine");
            assert!(
                format!("{err:#}").contains("unreachable"),
                "{}: {err:#}",
                n.name
            );
        }
    })
    .or_panic();
    assert_eq!(c.refused_egress().or_panic(), Vec::<String>::new());
}
