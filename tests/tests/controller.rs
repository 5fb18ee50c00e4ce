//! The controller against a real kube-apiserver, with the seed's php-apache served by simulated
//! pods: readiness drives the decision in status within a second, input errors become
//! conditions and Events, and the decision survives a controller restart.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use beamlit_api::acknowledgement::{
    AGENT_LEASE_LABEL_KEY, AGENT_LEASE_LABEL_VALUE, AGENT_LEASE_SELECTOR, APPLIED_ANNOTATION,
    NODE_LABEL, SHARD_LABEL, SHARDS_ANNOTATION, shard_lease_name,
};
use beamlit_testbed::{
    TestDir,
    cluster::TestCluster,
    controller_bin,
    crds::install_model_deployment_crd,
    require_privileges,
    seed::{
        ControllerProcess, Exporter, PHP_APACHE, condition, deploy_seed, events, php_apache_pod,
        scale, seed_model_deployment, start_prometheus, status, wait_status,
    },
};

#[test]
fn scaling_to_zero_offloads_everything_within_a_second_and_back() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlfail")?;
    deploy_seed(cluster, ns.name())?;
    let controller = ControllerProcess::start(cluster, ns.name())?;

    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "1 ready endpoint",
        |s| s["readyEndpoints"] == 1 && s["offloadPercent"] == 0,
    )
    .with_context(|| controller.log())?;
    let s = status(cluster, ns.name(), "php-apache")?;
    assert_eq!(s["service"]["port"], 80, "{s}");
    assert_eq!(s["workload"]["kind"], "Deployment", "{s}");
    assert_eq!(s["workload"]["readyReplicas"], 1, "{s}");
    assert!(
        s["service"]["addresses"][0]
            .as_str()
            .is_some_and(|a| a.starts_with("10.96.")),
        "{s}"
    );
    // The CPU metric has no source yet: reported, and never a reason to offload.
    assert!(s["metrics"][0]["error"].as_str().is_some(), "{s}");

    scale(cluster, ns.name(), 0)?;
    let started = Instant::now();
    while !cluster.ready_endpoints(ns.name(), "php-apache")?.is_empty() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the EndpointSlice kept ready endpoints");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(5),
        "100%/NoReadyEndpoints",
        |s| s["offloadPercent"] == 100 && s["reason"] == "NoReadyEndpoints",
    )
    .with_context(|| controller.log())?;
    println!("no ready endpoints -> status 100% in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(events(cluster, ns.name())?.contains("NoReadyEndpoints"));

    scale(cluster, ns.name(), 1)?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(60),
        "back to 0%",
        |s| s["offloadPercent"] == 0 && s["readyEndpoints"] == 1,
    )
    .with_context(|| controller.log())?;
    Ok(())
}

#[test]
fn input_errors_become_conditions_and_events_and_recover() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlerr")?;
    let md = seed_model_deployment(ns.name());
    let absent = md.replacen(
        "  serviceRef:\n    name: php-apache",
        "  serviceRef:\n    name: absent",
        1,
    );
    cluster.apply(ns.name(), &absent)?;
    let controller = ControllerProcess::start(cluster, ns.name())?;

    let ready_reason = |s: &serde_json::Value| {
        s["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or("").to_string(),
                    c["reason"].as_str().unwrap_or("").to_string(),
                )
            })
    };
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "ServiceNotFound",
        |s| ready_reason(s) == Some(("False".into(), "ServiceNotFound".into())),
    )
    .with_context(|| controller.log())?;
    let s = status(cluster, ns.name(), "php-apache")?;
    let message = s["conditions"][0]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("absent") && message.contains("spec.serviceRef"),
        "{s}"
    );
    // The Deployment does not exist yet either.
    let workload = condition(&s, "WorkloadFound");
    assert_eq!(workload["status"], "False", "{s}");
    assert!(
        workload["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.modelSourceRef")),
        "{s}"
    );
    let events_now = events(cluster, ns.name())?;
    assert!(
        events_now.contains("ServiceNotFound") && events_now.contains("WorkloadNotFound"),
        "{events_now}"
    );

    // A named port the Service does not have.
    cluster.apply(ns.name(), PHP_APACHE)?;
    cluster.apply(
        ns.name(),
        &md.replace("    targetPort: 80", "    targetPort: grpc"),
    )?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "PortNotFound",
        |s| ready_reason(s) == Some(("False".into(), "PortNotFound".into())),
    )
    .with_context(|| controller.log())?;

    // Fixed: the controller, still running, recovers.
    cluster.apply(ns.name(), &md)?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "Ready",
        |s| {
            ready_reason(s) == Some(("True".into(), "Resolved".into()))
                && condition(s, "WorkloadFound")["status"] == "True"
        },
    )
    .with_context(|| controller.log())?;
    Ok(())
}

/// Lines of the namespace's Events with this reason.
fn events_with_reason(cluster: &TestCluster, ns: &str, reason: &str) -> Result<usize> {
    Ok(events(cluster, ns)?
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(reason))
        .count())
}

/// A restarted controller continues from the decision it finds in status. The new process
/// does reconcile the object (it reports the generation of a spec change made while no
/// controller ran, which nothing else writes), and keeps the 100% decision as it was: the same
/// `since` (a decision made anew would be dated now), the same `decisionGeneration` (the agents
/// are not asked to apply it again) and no second Event for it.
#[test]
fn a_restarted_controller_keeps_the_decision() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlrestart")?;
    deploy_seed(cluster, ns.name())?;
    let mut controller = ControllerProcess::start(cluster, ns.name())?;
    scale(cluster, ns.name(), 0)?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "100%",
        |s| s["offloadPercent"] == 100,
    )
    .with_context(|| controller.log())?;
    // The Event follows the status write: wait for it, so the count below is not racing it.
    let started = Instant::now();
    while events_with_reason(cluster, ns.name(), "NoReadyEndpoints")? != 1 {
        if started.elapsed() > Duration::from_secs(10) {
            bail!(
                "no single NoReadyEndpoints Event: {}",
                events(cluster, ns.name())?
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = status(cluster, ns.name(), "php-apache")?;
    controller.kill()?;

    // While no controller runs, a spec change the decision does not depend on (the share of a
    // metric-driven offload; without ready endpoints everything is offloaded anyway).
    cluster.kubectl(&[
        "patch",
        "modeldeployment",
        "php-apache",
        "-n",
        ns.name(),
        "--type=merge",
        "-p",
        r#"{"spec":{"offloadingConfig":{"behavior":{"percentage":40}}}}"#,
    ])?;
    let generation: i64 = cluster
        .kubectl(&[
            "get",
            "modeldeployment",
            "php-apache",
            "-n",
            ns.name(),
            "-o",
            "jsonpath={.metadata.generation}",
        ])?
        .trim()
        .parse()
        .context("metadata.generation")?;
    assert!(
        before["observedGeneration"]
            .as_i64()
            .is_some_and(|g| g < generation),
        "the patch did not move the generation past {}: {generation}",
        before["observedGeneration"]
    );

    controller.restart()?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "the new generation observed",
        |s| s["observedGeneration"] == generation,
    )
    .with_context(|| controller.log())?;
    let after = status(cluster, ns.name(), "php-apache")?;
    assert_eq!(after["offloadPercent"], 100, "{after}");
    assert_eq!(after["reason"], before["reason"], "{after}");
    assert_eq!(
        after["since"], before["since"],
        "the decision was made anew: {after}"
    );
    assert_eq!(
        after["decisionGeneration"], before["decisionGeneration"],
        "the agents were asked to apply an unchanged decision again: {after}"
    );
    // A reconcile of the new process has passed (the status write above); any Event for the
    // decision comes from that reconcile, after its write.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        events_with_reason(cluster, ns.name(), "NoReadyEndpoints")?,
        1,
        "the restarted controller announced the kept decision again: {}\n{}",
        events(cluster, ns.name())?,
        controller.log()
    );
    Ok(())
}

/// The seed's php-apache (Ready) with its ModelDeployment's CPU metric replaced by an External
/// one (`model_load` of php-apache, target 10) and a controller reading it from `prometheus_url`.
fn seed_with_external_metric(
    cluster: &TestCluster,
    ns: &str,
    prometheus_url: &str,
) -> Result<ControllerProcess> {
    cluster.apply(ns, PHP_APACHE)?;
    cluster.wait_deployment_ready(ns, "php-apache", 1, Duration::from_secs(60))?;
    let md = seed_model_deployment(ns).replace(
        "      - type: Resource\n        resource:\n          name: cpu\n          target:\n            type: Utilization\n            averageUtilization: 90\n",
        "      - type: External\n        external:\n          metric:\n            name: model_load\n            selector:\n              matchLabels:\n                model: php-apache\n          target:\n            type: Value\n            value: \"10\"\n",
    );
    assert!(
        md.contains("model_load"),
        "the seed's metric block moved: {md}"
    );
    cluster.apply(ns, &md)?;
    ControllerProcess::start_with(
        cluster,
        &[
            "--leader-election=false",
            "--namespaces",
            ns,
            "--prometheus-url",
            prometheus_url,
        ],
    )
}

#[test]
fn an_external_metric_from_prometheus_drives_offloading_with_a_stabilization_window() -> Result<()>
{
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlprom")?;
    let exporter = Exporter::start(5.0)?;
    let dir = TestDir::new("prometheus")?;
    let (_prometheus, url) = start_prometheus(&dir, exporter.addr)?;
    let controller = seed_with_external_metric(cluster, ns.name(), &url)?;
    let wait = |what: &str, timeout: u64, check: &dyn Fn(&serde_json::Value) -> bool| {
        controller.wait_seed_status(
            cluster,
            ns.name(),
            Duration::from_secs(timeout),
            what,
            check,
        )
    };

    wait("metric 5 of 10: healthy", 30, &|s| {
        s["metrics"][0]["current"] == "5" && s["offloadPercent"] == 0 && s["reason"] == "Healthy"
    })?;
    assert_eq!(
        status(cluster, ns.name(), "php-apache")?["metrics"][0]["target"],
        "10"
    );

    exporter.set(50.0);
    let took = wait("metric 50 of 10: offload 50%", 15, &|s| {
        s["offloadPercent"] == 50 && s["reason"] == "MetricAboveTarget"
    })?;
    println!("metric above target -> 50% in {took:?} (1 s scrapes, 1 s resync)");

    exporter.set(5.0);
    let dropped = Instant::now();
    wait("back below: still offloading while stabilizing", 15, &|s| {
        s["metrics"][0]["current"] == "5"
            && s["offloadPercent"] == 50
            && s["reason"] == "Stabilizing"
    })?;
    wait("after the 5 s window: 0%", 20, &|s| {
        s["offloadPercent"] == 0 && s["reason"] == "Healthy"
    })?;
    let held = dropped.elapsed();
    println!("offloading stopped {held:?} after the metric fell (window 5 s)");
    assert!(
        held >= Duration::from_secs(4),
        "stopped before the window: {held:?}"
    );

    // And it fires again (the earlier product fired once per spec change).
    exporter.set(50.0);
    wait("above again: offload again", 15, &|s| {
        s["offloadPercent"] == 50
    })?;
    Ok(())
}

/// A Prometheus that accepts connections and never answers: every read waits out the
/// controller's timeout (5 s). The connections are held until the test ends.
struct HungPrometheus {
    url: String,
    _held: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl HungPrometheus {
    fn start() -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = held.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                h.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            }
        });
        Ok(Self { url, _held: held })
    }
}

#[test]
fn a_metrics_source_that_hangs_never_holds_back_the_failover() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlhung")?;
    let prometheus = HungPrometheus::start()?;
    let controller = seed_with_external_metric(cluster, ns.name(), &prometheus.url)?;
    // The read was tried and waited out: the source really hangs.
    controller.wait_seed_status(
        cluster,
        ns.name(),
        Duration::from_secs(30),
        "1 ready endpoint and the metric's read timed out",
        |s| {
            s["readyEndpoints"] == 1
                && s["offloadPercent"] == 0
                && s["metrics"][0]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("within"))
        },
    )?;

    // `kubectl scale` re-queues the model through its Deployment at once, while its endpoint
    // is still ready: that reconcile reads the metric and waits. The EndpointSlice then loses
    // its last ready endpoint; the decision must not wait for the read.
    scale(cluster, ns.name(), 0)?;
    let started = Instant::now();
    while !cluster.ready_endpoints(ns.name(), "php-apache")?.is_empty() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the EndpointSlice kept ready endpoints");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = controller.wait_seed_status(
        cluster,
        ns.name(),
        Duration::from_secs(10),
        "100%/NoReadyEndpoints",
        |s| s["offloadPercent"] == 100 && s["reason"] == "NoReadyEndpoints",
    )?;
    println!("no ready endpoints -> 100% in {took:?} with a metrics source that hangs 5 s");
    assert!(
        took < Duration::from_secs(1),
        "the decision waited for the hung metrics read: {took:?}\n{}",
        controller.log()
    );
    Ok(())
}

/// `count` agent Leases in `ns`, each acknowledging `acks` (model name in `ns` → uid,
/// decision), renewed now: what `count` agents would write.
fn agent_leases(ns: &str, count: usize, acks: &[(&str, &str, i64)]) -> String {
    let applied: serde_json::Map<String, serde_json::Value> = acks
        .iter()
        .map(|(name, uid, decision)| {
            (
                format!("{ns}/{name}"),
                serde_json::json!({"uid": uid, "decision": decision}),
            )
        })
        .collect();
    let annotation = serde_json::Value::Object(applied).to_string();
    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ");
    let items: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": format!("beamlit-agent-node-{i}"),
                    "namespace": ns,
                    "labels": {AGENT_LEASE_LABEL_KEY: AGENT_LEASE_LABEL_VALUE},
                    "annotations": {APPLIED_ANNOTATION: annotation},
                },
                "spec": {
                    "holderIdentity": format!("node-{i}"),
                    "leaseDurationSeconds": 300,
                    "renewTime": now.to_string(),
                },
            })
        })
        .collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

#[test]
fn agents_acknowledging_one_decision_requeue_that_model_only_and_once() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    const AGENTS: usize = 20;
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlacks")?;
    deploy_seed(cluster, ns.name())?;
    // A second model in the same Leases (its Service does not exist: it is reconciled all the
    // same, and reports it).
    cluster.apply(
        ns.name(),
        &seed_model_deployment(ns.name())
            .replacen("name: php-apache", "name: other", 1)
            .replace(
                "    name: php-apache\n    namespace",
                "    name: no-such-service\n    namespace",
            ),
    )?;
    // No periodic resync during the test: every reconcile counted has a trigger.
    let controller = ControllerProcess::start_with(
        cluster,
        &[
            "--leader-election=false",
            "--namespaces",
            ns.name(),
            "--agent-namespace",
            ns.name(),
            "--resync-secs",
            "600",
        ],
    )?;
    let decided = |name: &str| -> Result<(String, i64)> {
        let out = cluster.kubectl(&[
            "get",
            "modeldeployment",
            name,
            "-n",
            ns.name(),
            "-o",
            "json",
        ])?;
        let md: serde_json::Value = serde_json::from_str(&out)?;
        Ok((
            md["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            md["status"]["decisionGeneration"].as_i64().unwrap_or(0),
        ))
    };
    controller.wait_seed_status(
        cluster,
        ns.name(),
        Duration::from_secs(30),
        "a decision",
        |s| s["decisionGeneration"].as_i64().is_some_and(|g| g > 0),
    )?;
    wait_status(
        cluster,
        ns.name(),
        "other",
        Duration::from_secs(30),
        "a status",
        |s| !s.is_null(),
    )
    .with_context(|| controller.log())?;
    let (uid_a, gen_a) = decided("php-apache")?;
    let (uid_b, gen_b) = decided("other")?;

    // Every agent applies both models.
    cluster.apply(
        ns.name(),
        &agent_leases(
            ns.name(),
            AGENTS,
            &[("php-apache", &uid_a, gen_a), ("other", &uid_b, gen_b)],
        ),
    )?;
    controller.wait_seed_status(
        cluster,
        ns.name(),
        Duration::from_secs(10),
        "applied on every agent",
        |s| s["agents"]["applied"] == AGENTS && s["agents"]["total"] == AGENTS,
    )?;
    std::thread::sleep(Duration::from_secs(1));

    // Each agent rewrites its Lease with a new entry for php-apache only (as after a decision
    // change), one write per agent.
    let before = controller.metric("beamlit_controller_reconciles_total")?;
    cluster.apply(
        ns.name(),
        &agent_leases(
            ns.name(),
            AGENTS,
            &[("php-apache", &uid_a, gen_a + 1), ("other", &uid_b, gen_b)],
        ),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let reconciles = controller.metric("beamlit_controller_reconciles_total")? - before;
    println!("{AGENTS} Lease writes acknowledging one model -> {reconciles} reconcile(s)");
    // Re-queueing every model each Lease names would be 2 per write (40); one per write would
    // be 20. Gathered over the batch window, the 20 writes are a few batches of php-apache.
    assert!(
        (1.0..=4.0).contains(&reconciles),
        "{AGENTS} acknowledgements of one model cost {reconciles} reconciles\n{}",
        controller.log()
    );

    // Agents gone: the models they held are re-queued and count them out.
    cluster.kubectl(&[
        "delete",
        "lease",
        "-n",
        ns.name(),
        "-l",
        AGENT_LEASE_SELECTOR,
    ])?;
    controller.wait_seed_status(
        cluster,
        ns.name(),
        Duration::from_secs(10),
        "no agent left",
        |s| s["agents"]["total"] == 0,
    )?;
    Ok(())
}

/// One acknowledgement Lease of `node`: shard `shard`, with `entries` (key → uid, decision)
/// and, on shard 0, the shard count and a fresh renewal.
fn ack_shard(
    ns: &str,
    node: &str,
    shard: usize,
    count: usize,
    entries: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let mut lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": shard_lease_name(node, shard),
            "namespace": ns,
            "labels": {
                AGENT_LEASE_LABEL_KEY: AGENT_LEASE_LABEL_VALUE,
                NODE_LABEL: node,
                SHARD_LABEL: shard.to_string(),
            },
            "annotations": {
                APPLIED_ANNOTATION: serde_json::Value::Object(entries.clone()).to_string(),
            },
        },
        "spec": {"holderIdentity": node},
    });
    if shard == 0 {
        lease["metadata"]["annotations"][SHARDS_ANNOTATION] = count.to_string().into();
        lease["spec"]["leaseDurationSeconds"] = 300.into();
        lease["spec"]["renewTime"] = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
            .to_string()
            .into();
    }
    lease
}

#[test]
fn an_acknowledgement_split_over_shards_counts_once_per_node() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlshards")?;
    deploy_seed(cluster, ns.name())?;
    let controller = ControllerProcess::start_with(
        cluster,
        &[
            "--leader-election=false",
            "--namespaces",
            ns.name(),
            "--agent-namespace",
            ns.name(),
        ],
    )?;
    controller.wait_seed_status(
        cluster,
        ns.name(),
        Duration::from_secs(30),
        "a decision",
        |s| s["decisionGeneration"].as_i64().is_some_and(|g| g > 0),
    )?;
    let out = cluster.kubectl(&[
        "get",
        "modeldeployment",
        "php-apache",
        "-n",
        ns.name(),
        "-o",
        "json",
    ])?;
    let md: serde_json::Value = serde_json::from_str(&out)?;
    let (uid, generation) = (
        md["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        md["status"]["decisionGeneration"].as_i64().unwrap_or(0),
    );
    let entry = |key: &str| {
        let mut m = serde_json::Map::new();
        m.insert(
            key.to_string(),
            serde_json::json!({"uid": uid, "decision": generation}),
        );
        m
    };
    let own = format!("{}/php-apache", ns.name());
    let filler = {
        let mut m = serde_json::Map::new();
        for i in 0..1000 {
            m.insert(
                format!("{}/model-{i}", ns.name()),
                serde_json::json!({"uid": format!("{i:08}"), "decision": 1}),
            );
        }
        m
    };
    let items = vec![
        // node-a: two shards, the model's entry in the second.
        ack_shard(ns.name(), "node-a", 0, 2, &filler),
        ack_shard(ns.name(), "node-a", 1, 2, &entry(&own)),
        // node-b: one shard without the model; a shard left from a larger count has it, and
        // says nothing.
        ack_shard(ns.name(), "node-b", 0, 1, &filler),
        ack_shard(ns.name(), "node-b", 1, 1, &entry(&own)),
    ];
    cluster.apply(
        ns.name(),
        &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    )?;
    controller.wait_seed_status(
        cluster,
        ns.name(),
        Duration::from_secs(10),
        "applied on node-a only, of 2 nodes",
        |s| s["agents"]["applied"] == 1 && s["agents"]["total"] == 2,
    )?;
    Ok(())
}

#[test]
fn one_leader_decides_and_a_follower_takes_over_when_it_dies() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctllead")?;
    deploy_seed(cluster, ns.name())?;
    let lease = format!("beamlit-test-{}", std::process::id());
    let args = [
        "--namespaces",
        ns.name(),
        "--leader-election-namespace",
        ns.name(),
        "--leader-election-name",
        &lease,
        "--lease-duration-secs",
        "3",
    ];
    let mut first = ControllerProcess::start_with(cluster, &args)?;
    first.wait_log("became the leader", Duration::from_secs(20))?;
    let second = ControllerProcess::start_with(cluster, &args)?;
    second.wait_log(
        "waiting for the lease held by another controller",
        Duration::from_secs(20),
    )?;
    let holder = cluster.kubectl(&[
        "get",
        "lease",
        &lease,
        "-n",
        ns.name(),
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    let first_pid = first.pid().context("first controller running")?;
    assert!(
        holder.ends_with(&format!("-{first_pid}")),
        "holder {holder}, leader pid {first_pid}"
    );
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "a decision",
        |s| s["readyEndpoints"] == 1,
    )
    .with_context(|| first.log())?;
    assert!(
        !second.log().contains("became the leader"),
        "two leaders:\n{}",
        second.log()
    );

    // The leader dies without a word; the follower takes over once the Lease expires.
    first.kill()?;
    let took = second.wait_log("became the leader", Duration::from_secs(15))?;
    println!("follower became the leader {took:?} after the leader was killed (lease 3 s)");
    scale(cluster, ns.name(), 0)?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "the new leader's 100%",
        |s| s["offloadPercent"] == 100,
    )
    .with_context(|| second.log())?;
    Ok(())
}

/// The Lease's `renewTime` as a holder whose clock is `offset_secs` off would write it.
fn skewed_micro_time(offset_secs: i64) -> String {
    let t = k8s_openapi::jiff::Timestamp::now()
        + k8s_openapi::jiff::SignedDuration::from_secs(offset_secs);
    t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

#[test]
fn a_holder_whose_clock_is_behind_keeps_the_lease_while_it_renews() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlskew")?;
    let lease = format!("beamlit-skew-{}", std::process::id());
    // Another replica holds the Lease and renews it, but its clock is an hour behind ours:
    // every renewTime it writes looks an hour old here. Comparing that with the local clock
    // takes the Lease from a live leader (two leaders); only a record that stops changing for
    // the lease duration, as this process sees it, may be taken.
    cluster.apply(
        ns.name(),
        &format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {lease}\n\
             spec:\n  holderIdentity: skewed-replica\n  leaseDurationSeconds: 3\n  \
             renewTime: \"{}\"\n",
            skewed_micro_time(-3600)
        ),
    )?;
    let renew = || -> Result<String> {
        cluster.kubectl(&[
            "patch",
            "lease",
            &lease,
            "-n",
            ns.name(),
            "--type",
            "merge",
            "-p",
            &format!(
                r#"{{"spec":{{"renewTime":"{}"}}}}"#,
                skewed_micro_time(-3600)
            ),
        ])
    };
    let controller = ControllerProcess::start_with(
        cluster,
        &[
            "--namespaces",
            ns.name(),
            "--leader-election-namespace",
            ns.name(),
            "--leader-election-name",
            &lease,
            "--lease-duration-secs",
            "3",
        ],
    )?;
    controller.wait_log(
        "waiting for the lease held by another controller",
        Duration::from_secs(20),
    )?;
    // Renewed every 500 ms for three lease durations: the holder is alive throughout.
    let renewing = Instant::now();
    while renewing.elapsed() < Duration::from_secs(9) {
        renew()?;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !controller.log().contains("became the leader"),
        "took the lease from a live holder:\n{}",
        controller.log()
    );
    // The holder stops renewing: its record no longer changes, and after the lease duration
    // (by this process's clock) the controller takes over.
    let stopped = Instant::now();
    controller.wait_log("became the leader", Duration::from_secs(15))?;
    let took = stopped.elapsed();
    println!("took the lease {took:?} after the holder stopped renewing (lease 3 s)");
    assert!(
        took >= Duration::from_secs(2),
        "took over too early: {took:?}"
    );
    let holder = cluster.kubectl(&[
        "get",
        "lease",
        &lease,
        "-n",
        ns.name(),
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    assert_ne!(holder, "skewed-replica");
    Ok(())
}

#[test]
fn the_binary_refuses_a_bad_configuration_naming_the_key() -> Result<()> {
    let dir = TestDir::new("ctlconfig")?;
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "stabilizationWindowSeconds: 30\nnamespaces: [models]\nleaderElection: {enabled: false}\n",
    )?;
    let out = Command::new(controller_bin())
        .args(["--check-config", "--config"])
        .arg(&good)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration valid"));

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "resyncSeconds: 5\nleaderElection:\n  leaseDuration: 5\n",
    )?;
    let out = Command::new(controller_bin())
        .args(["--check-config", "--config"])
        .arg(&bad)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad configuration was accepted");
    assert!(
        stderr.contains("leaseDuration") && stderr.contains("line 3"),
        "the error does not name the key and line: {stderr}"
    );
    Ok(())
}

/// One PodMetrics object (what metrics-server serves) for `pod`, with `cpu` usage in its only
/// container, labelled like the pod (metrics-server copies the pod's labels), taken now over the
/// last second: as the HPA, the controller sets aside the CPU sample of a pod that started within
/// five minutes when it was taken less than one window after the pod became ready.
fn pod_metrics(pod: &str, cpu: &str) -> String {
    // One second ahead of now, floored: the pod's Ready transition is stored floored to the
    // second, so the sample is always at least one window after it (a sample of "now" floored
    // is not when the pod became ready within the same second, and the HPA's rule sets it aside).
    let now = k8s_openapi::jiff::Timestamp::now().as_second() + 1;
    let now = k8s_openapi::jiff::Timestamp::from_second(now).unwrap_or_default();
    format!(
        "apiVersion: metrics.k8s.io/v1beta1\nkind: PodMetrics\nmetadata:\n  name: {pod}\n  \
         labels: {{run: php-apache}}\ntimestamp: \"{now}\"\nwindow: 1s\n\
         containers:\n  - name: php-apache\n    usage: {{cpu: \"{cpu}\", memory: 10Mi}}\n"
    )
}

/// The seed's own metric, CPU `Utilization` 90 (metrics.k8s.io), with the HPA's arithmetic:
/// usage over the pod's request (php-apache requests 200m): 100m is 50% (healthy), 300m is 150%
/// (above: `percentage`, 50); without requests the metric is unavailable, naming the pod, and
/// never offloads.
#[test]
fn cpu_utilization_from_metrics_k8s_io_drives_offloading() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    beamlit_testbed::crds::install_pod_metrics_crd(cluster)?;
    let ns = cluster.namespace("ctlcpu")?;
    // The seed's Resource metric, and the same as a ContainerResource of its one container.
    cluster.apply(ns.name(), PHP_APACHE)?;
    cluster.wait_deployment_ready(ns.name(), "php-apache", 1, Duration::from_secs(60))?;
    let md = seed_model_deployment(ns.name()).replace(
        "            averageUtilization: 90\n",
        "            averageUtilization: 90\n      - type: ContainerResource\n        containerResource:\n          \
         name: cpu\n          container: php-apache\n          target: {type: Utilization, averageUtilization: 90}\n",
    );
    assert!(
        md.contains("ContainerResource"),
        "the seed's metric block moved: {md}"
    );
    cluster.apply(ns.name(), &md)?;
    let controller = ControllerProcess::start(cluster, ns.name())?;
    let wait = |what: &str, check: &dyn Fn(&serde_json::Value) -> bool| {
        controller.wait_seed_status(cluster, ns.name(), Duration::from_secs(30), what, check)
    };
    wait("no sample yet: unavailable", &|s| {
        s["metrics"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("usage"))
            && s["offloadPercent"] == 0
    })?;
    let pod = php_apache_pod(cluster, ns.name())?;
    cluster.apply(ns.name(), &pod_metrics(&pod, "100m"))?;
    wait("100m of 200m: 50%, healthy", &|s| {
        s["metrics"][0]["current"] == "50%"
            && s["metrics"][0]["target"] == "90%"
            && s["metrics"][1]["current"] == "50%"
            && s["offloadPercent"] == 0
    })?;
    cluster.apply(ns.name(), &pod_metrics(&pod, "300m"))?;
    wait("300m of 200m: 150%, offload the seed's 50%", &|s| {
        s["metrics"][0]["current"] == "150%"
            && s["metrics"][1]["current"] == "150%"
            && s["offloadPercent"] == 50
            && s["reason"] == "MetricAboveTarget"
    })?;
    // Falls: offloading continues through the window (5 s here), then stops.
    cluster.apply(ns.name(), &pod_metrics(&pod, "100m"))?;
    let fell = std::time::Instant::now();
    wait("back below: stabilizing", &|s| {
        s["metrics"][0]["current"] == "50%" && s["offloadPercent"] == 50
    })?;
    wait("after the window: 0%", &|s| s["offloadPercent"] == 0)?;
    assert!(
        fell.elapsed() >= Duration::from_secs(4),
        "stopped before the window: {:?}",
        fell.elapsed()
    );

    // Requests removed: utilization is undefined; reported, never a division by zero.
    cluster.kubectl(&[
        "patch",
        "deployment",
        "php-apache",
        "-n",
        ns.name(),
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/template/spec/containers/0/resources"}]"#,
    ])?;
    cluster.wait_deployment_ready(ns.name(), "php-apache", 1, Duration::from_secs(60))?;
    // As the HPA: one pod without the request refuses the metric, naming the pod and container.
    wait("no request: unavailable, naming the pod", &|s| {
        s["metrics"][0]["error"].as_str().is_some_and(|e| {
            e.contains("missing request for cpu in container php-apache of pod php-apache-")
        }) && s["offloadPercent"] == 0
    })?;
    Ok(())
}

/// With Beamlit credentials the controller keeps the model on Beamlit: created with the spec
/// (and a finalizer on the ModelDeployment), the `offloading` label set when offloading starts
/// and cleared when it stops, and the model deleted when the ModelDeployment is. The controller
/// runs in a pod namespace (the fake Beamlit is a remote there) and reaches the API server
/// through a relay.
#[test]
fn the_model_is_kept_on_beamlit_and_deleted_with_its_model_deployment() -> Result<()> {
    use base64::Engine as _;
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("ctlapi")?;
    let fake_pod = cluster.add_unmanaged_pod("beamlit")?;
    let fake = beamlit_testbed::FakeBeamlit::start(
        &fake_pod.netns,
        beamlit_testbed::FakeBeamlitOptions {
            https: vec![(fake_pod.ipv4, 8443).into()],
            ..beamlit_testbed::FakeBeamlitOptions::default()
        },
    )?;
    let dir = TestDir::new("ctlapi")?;
    let opts = fake.options();
    std::fs::write(
        dir.join("api-token"),
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", opts.client_id, opts.client_secret)),
    )?;
    std::fs::write(
        dir.join("controller.yaml"),
        format!(
            "workspace: ws\nbeamlitApi:\n  baseUrl: https://{ip}:8443/v0\n  tokenFile: {token}\n  caFile: {ca}\n",
            ip = fake_pod.ipv4,
            token = dir.join("api-token").display(),
            ca = fake.ca_pem().display()
        ),
    )?;
    deploy_seed(cluster, ns.name())?;
    let home = cluster.add_unmanaged_pod("controller")?;
    let config = dir.join("controller.yaml").display().to_string();
    let (controller, _relay) = ControllerProcess::start_in_netns(
        cluster,
        &home.netns,
        &[
            "--leader-election=false",
            "--namespaces",
            ns.name(),
            "--config",
            &config,
        ],
    )?;
    let label = |fake: &beamlit_testbed::FakeBeamlit| -> Option<String> {
        let stats = fake.stats().ok()?;
        stats.models.get("php-apache")?["metadata"]["labels"]["offloading"]
            .as_str()
            .map(str::to_string)
    };
    let wait_label = |want: &str| {
        cluster
            .wait_for(
                &format!("offloading label {want}"),
                Duration::from_secs(30),
                || Ok(label(&fake).as_deref() == Some(want)),
            )
            .with_context(|| controller.log())
    };
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "synced to Beamlit",
        |s| condition(s, "BeamlitSynced")["status"] == "True",
    )
    .with_context(|| controller.log())?;
    wait_label("false")?;
    let finalizers = cluster.kubectl(&[
        "get",
        "modeldeployment",
        "php-apache",
        "-n",
        ns.name(),
        "-o",
        "jsonpath={.metadata.finalizers}",
    ])?;
    assert!(
        finalizers.contains("deployment.beamlit.com/beamlit-model"),
        "{finalizers}"
    );
    let model = fake.stats()?.models["php-apache"].clone();
    assert_eq!(model["metadata"]["environment"], "production", "{model}");
    assert_eq!(model["spec"]["enabled"], true, "{model}");

    scale(cluster, ns.name(), 0)?;
    wait_label("true")?;

    // Beamlit down: the label cannot be cleared; a condition says so and retries back off.
    let mut fake = fake;
    fake.stop()?;
    scale(cluster, ns.name(), 1)?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(60),
        "BeamlitSynced=False while Beamlit is down",
        |s| {
            condition(s, "BeamlitSynced")["status"] == "False"
                && s["beamlit"]["failures"].as_i64().is_some_and(|f| f >= 1)
                && s["beamlit"]["retryAfter"].is_string()
        },
    )
    .with_context(|| controller.log())?;
    let seen = events(cluster, ns.name())?;
    assert!(
        seen.contains("BeamlitUnreachable") || seen.contains("BeamlitTokenFailed"),
        "no Warning Event for the failure: {seen}"
    );
    fake.restart()?;
    let wait_label = |want: &str| {
        cluster
            .wait_for(
                &format!("offloading label {want}"),
                Duration::from_secs(60),
                || Ok(label(&fake).as_deref() == Some(want)),
            )
            .with_context(|| controller.log())
    };
    wait_label("false")?;
    wait_status(
        cluster,
        ns.name(),
        "php-apache",
        Duration::from_secs(30),
        "synced again",
        |s| condition(s, "BeamlitSynced")["status"] == "True",
    )?;

    cluster.kubectl(&[
        "delete",
        "modeldeployment",
        "php-apache",
        "-n",
        ns.name(),
        "--wait=false",
    ])?;
    cluster
        .wait_for(
            "the model gone from Beamlit and the object deleted",
            Duration::from_secs(30),
            || {
                let gone = !fake.stats()?.models.contains_key("php-apache");
                let deleted = cluster
                    .kubectl(&["get", "modeldeployment", "-n", ns.name(), "-o", "name"])?
                    .trim()
                    .is_empty();
                Ok(gone && deleted)
            },
        )
        .with_context(|| controller.log())?;
    Ok(())
}
