//! Agents in a cluster: a real kube-apiserver, the controller, cluster-mode agents (one per
//! simulated node, each attached to its node's test cgroup) and the fake Beamlit in its own
//! namespace on the cluster network. The seed's "Offload on failure" walkthrough runs with zero
//! failed requests; nodes acknowledge; an API outage changes nothing; deletion clears every node.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::{
    AgentFixture, Pod, ProbeOptions, ProbeReport, TestCgroup,
    cluster::TestCluster,
    finish_probe, require_privileges, run_in, run_probe,
    seed::{
        Exporter, OffloadBed, PHP_APACHE, deploy_seed, scale, seed_model_deployment,
        start_prometheus, status,
    },
    spawn_probe,
};

const WAIT: Duration = Duration::from_secs(60);

fn http_probe(addr: &str, count: u64) -> Result<ProbeOptions> {
    let mut opts = ProbeOptions::new(addr.parse()?, count);
    opts.http = true;
    opts.timeout_ms = Some(2000);
    Ok(opts)
}

/// `count` requests from `pod` (in `cgroup`); all must succeed, answered by `expected`.
fn all_answered_by(
    pod: &Pod,
    cgroup: &TestCgroup,
    addr: &str,
    count: u64,
    expected: impl Fn(&str) -> bool,
) -> Result<ProbeReport> {
    let report = run_probe(&pod.netns, Some(cgroup.path()), &http_probe(addr, count)?)?;
    let all = report.by_name.iter().all(|(name, _)| expected(name));
    if report.ok != count || !all {
        bail!("expected {count} answers from the expected side: {report:?}");
    }
    Ok(report)
}

fn is_remote(name: &str) -> bool {
    name == "beamlit"
}

fn is_local(name: &str) -> bool {
    name.starts_with("php-apache-")
}

/// Waits until the agent no longer holds `addr`.
fn wait_removed(agent: &AgentFixture, addr: &str) -> Result<()> {
    let started = Instant::now();
    while agent.service(addr).is_ok() {
        if started.elapsed() > WAIT {
            bail!("{addr} still in the agent's maps:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The seed README's "Offload on failure", as written: the Deployment, Service and
/// ModelDeployment applied verbatim; a client pod requests the ClusterIP every 100 ms; the
/// Deployment scaled to 0 and back. Every request succeeds: local, then Beamlit, then local.
#[test]
fn seed_offload_on_failure_walkthrough_has_zero_failed_requests() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    let bed = OffloadBed::new(cluster, "walk")?;
    deploy_seed(cluster, bed.ns())?;
    let controller = bed.controller()?;
    let node = TestCgroup::new("node1")?;
    let agent = bed.agent("beamlit-node-1", &node)?;
    bed.wait_applied("healthy, applied on 1 of 1 nodes", |s| {
        s["offloadPercent"] == 0 && s["agents"]["applied"] == 1 && s["agents"]["total"] == 1
    })
    .with_context(|| format!("{}\n{}", controller.log(), agent.log()))?;
    let svc = bed.service_address()?;
    agent.wait_share(&svc, 0, WAIT)?;
    let row = agent.service(&svc)?;
    assert_eq!(
        row["model_deployment"],
        format!("{}/php-apache", bed.ns()),
        "{row}"
    );
    // The controller's reason (the seed's CPU metric has no source here: MetricUnavailable).
    let decided = status(cluster, bed.ns(), "php-apache")?["reason"].clone();
    assert_eq!(row["reason"], decided, "{row}");

    let client = cluster.run_client_pod(bed.ns(), "curl-check")?;
    all_answered_by(&client, &node, &svc, 5, is_local)?;
    let stop = bed.dir.join("stop-requests");
    let mut loop_opts = http_probe(&svc, 0)?;
    loop_opts.interval_ms = Some(100);
    loop_opts.until_file = Some(stop.clone());
    let requests = spawn_probe(&client.netns, Some(node.path()), &loop_opts)?;
    // The probe's errors say when they happened, from its start; the timeline lines them up.
    let probe_started = Instant::now();
    let mut timeline = vec![format!(
        "probe started at {}",
        k8s_openapi::jiff::Timestamp::now()
    )];
    std::thread::sleep(Duration::from_secs(2));

    timeline.push(format!(
        "scale to 0 at {} ms",
        probe_started.elapsed().as_millis()
    ));
    scale(cluster, bed.ns(), 0)?;
    let scaled = Instant::now();
    agent.wait_share(&svc, 10_000, Duration::from_secs(10))?;
    println!(
        "scaled to 0 -> the agent's map at 100% in {:?}",
        scaled.elapsed()
    );
    bed.wait_applied("100%, applied on 1 of 1", |s| {
        s["offloadPercent"] == 100
            && s["reason"] == "NoReadyEndpoints"
            && s["agents"]["applied"] == 1
    })?;
    std::thread::sleep(Duration::from_secs(2));
    all_answered_by(&client, &node, &svc, 5, is_remote)?;
    let row = agent.service(&svc)?;
    assert!(
        row["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("NoReadyEndpoints")),
        "{row}"
    );

    timeline.push(format!(
        "scale to 1 at {} ms",
        probe_started.elapsed().as_millis()
    ));
    scale(cluster, bed.ns(), 1)?;
    let restored = Instant::now();
    cluster.wait_deployment_ready(bed.ns(), "php-apache", 1, WAIT)?;
    timeline.push(format!(
        "ready at {} ms",
        probe_started.elapsed().as_millis()
    ));
    agent.wait_share(&svc, 0, WAIT)?;
    timeline.push(format!(
        "map at 0% by {} ms",
        probe_started.elapsed().as_millis()
    ));
    println!(
        "scaled back -> the agent's map at 0% in {:?}",
        restored.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    all_answered_by(&client, &node, &svc, 5, is_local)?;

    std::fs::write(&stop, "")?;
    let report = finish_probe(requests, Duration::from_secs(30))?;
    println!("request loop: {report:?}");
    assert_eq!(
        report.failed,
        0,
        "failed requests: {report:?}\ntimeline: {timeline:?}\nagent log:\n{}",
        agent.log()
    );
    let remote = report.count("beamlit");
    let local: u64 = report
        .by_name
        .iter()
        .filter(|(n, _)| is_local(n))
        .map(|(_, c)| c)
        .sum();
    assert!(remote >= 10, "too few remote answers: {report:?}");
    assert!(local >= 20, "too few local answers: {report:?}");
    let stats = bed.fake.stats()?;
    assert!(
        stats
            .requests_by_path
            .keys()
            .any(|p| p.starts_with("/ws/models/php-apache")),
        "the default backend's path prefix: {stats:?}"
    );
    assert_eq!(stats.token_requests, 1, "one token for every request");
    Ok(())
}

/// Two nodes, one agent each: both apply the controller's decision and acknowledge it
/// (status counts 2 of 2), clients on both nodes are offloaded, and deleting the
/// ModelDeployment removes its entries on both.
#[test]
fn two_nodes_apply_acknowledge_and_forget_a_deleted_model() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    let bed = OffloadBed::new(cluster, "twonodes")?;
    deploy_seed(cluster, bed.ns())?;
    let controller = bed.controller()?;
    let (cg1, cg2) = (TestCgroup::new("node1")?, TestCgroup::new("node2")?);
    let agent1 = bed.agent("beamlit-node-1", &cg1)?;
    let agent2 = bed.agent("beamlit-node-2", &cg2)?;
    bed.wait_applied("applied on 2 of 2 nodes", |s| {
        s["agents"]["applied"] == 2 && s["agents"]["total"] == 2
    })
    .with_context(|| controller.log())?;
    let svc = bed.service_address()?;
    // Each agent caches the EndpointSlices of the Service its ModelDeployment names (and of
    // same-named Services elsewhere), not the cluster's: not this one, written beside it.
    cluster.apply(
        bed.ns(),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: unrelated-1\n  \
         labels:\n    kubernetes.io/service-name: unrelated\naddressType: IPv4\nports: \
         [{name: http, port: 80, protocol: TCP}]\nendpoints: [{addresses: [10.244.9.9], \
         conditions: {ready: true}}]\n",
    )?;
    let own = format!("{}/php-apache", bed.ns());
    for agent in [&agent1, &agent2] {
        let watched = &agent.inspect()?["endpoint_slices"];
        assert_eq!(
            watched["services"],
            serde_json::json!(["php-apache"]),
            "{watched}"
        );
        let cached: Vec<&str> = watched["cached_services"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        assert!(cached.contains(&own.as_str()), "{watched}");
        assert!(
            cached.iter().all(|s| s.ends_with("/php-apache")),
            "an EndpointSlice of a Service no ModelDeployment names is cached: {watched}"
        );
    }

    scale(cluster, bed.ns(), 0)?;
    agent1.wait_share(&svc, 10_000, Duration::from_secs(10))?;
    agent2.wait_share(&svc, 10_000, Duration::from_secs(10))?;
    let generation = {
        bed.wait_applied("the 100% decision applied on 2 of 2", |s| {
            s["offloadPercent"] == 100 && s["agents"]["applied"] == 2
        })?;
        status(cluster, bed.ns(), "php-apache")?["decisionGeneration"].clone()
    };
    assert!(generation.as_i64().is_some_and(|g| g >= 2), "{generation}");
    let client1 = cluster.add_unmanaged_pod("client1")?;
    let client2 = cluster.add_unmanaged_pod("client2")?;
    all_answered_by(&client1, &cg1, &svc, 10, is_remote)?;
    all_answered_by(&client2, &cg2, &svc, 10, is_remote)?;

    cluster.kubectl(&["delete", "modeldeployment", "php-apache", "-n", bed.ns()])?;
    wait_removed(&agent1, &svc)?;
    wait_removed(&agent2, &svc)?;
    // No ModelDeployment left: no EndpointSlice watched or cached.
    let watched = &agent1.inspect()?["endpoint_slices"];
    assert_eq!(watched["services"], serde_json::json!([]), "{watched}");
    assert_eq!(watched["cached"], 0, "{watched}");
    // Without the product, the Service has no endpoint: refused, as plain Kubernetes does.
    let report = run_probe(&client1.netns, Some(cg1.path()), &http_probe(&svc, 3)?)?;
    assert_eq!(report.ok, 0, "{report:?}");
    Ok(())
}

/// The API server stopped for 30 s while a model is offloaded: the maps keep their state and
/// traffic keeps flowing to Beamlit; when it is back, the agent resyncs (a change made after
/// the outage reaches the maps). Its own cluster: the outage must not disturb other tests.
#[test]
fn an_api_server_outage_changes_nothing_and_the_agent_resyncs() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::start_with_nodes(1)?;
    let bed = OffloadBed::new(&cluster, "outage")?;
    deploy_seed(&cluster, bed.ns())?;
    let _controller = bed.controller()?;
    let node = TestCgroup::new("node1")?;
    let mut agent = bed.agent("beamlit-node-1", &node)?;
    bed.wait_applied("applied on 1 of 1", |s| s["agents"]["applied"] == 1)?;
    let svc = bed.service_address()?;
    scale(&cluster, bed.ns(), 0)?;
    agent.wait_share(&svc, 10_000, Duration::from_secs(10))?;
    let client = cluster.add_unmanaged_pod("client")?;
    all_answered_by(&client, &node, &svc, 3, is_remote)?;

    let stop = bed.dir.join("stop-requests");
    let mut loop_opts = http_probe(&svc, 0)?;
    loop_opts.interval_ms = Some(100);
    loop_opts.until_file = Some(stop.clone());
    let requests = spawn_probe(&client.netns, Some(node.path()), &loop_opts)?;
    cluster.stop_apiserver();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(1));
        let row = agent.service(&svc)?;
        assert_eq!(
            row["share_bp"], 10_000,
            "the map changed during the outage: {row}"
        );
    }
    std::fs::write(&stop, "")?;
    let report = finish_probe(requests, Duration::from_secs(30))?;
    println!("during the 30 s outage: {report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.count("beamlit") >= 200, "{report:?}");
    assert!(
        agent.log().contains("the maps keep their last state"),
        "the agent did not notice the outage:\n{}",
        agent.log()
    );

    cluster.start_apiserver()?;
    // After the outage the agent follows changes again: the model disabled (a change the
    // controller and agent see without the workload controllers, which reconnect at their own
    // pace) leaves the maps.
    // The watches retry with client-go's reflector backoff (kube-rs' default: 0.8 s doubling to
    // 30 s, with jitter, as kubelet and kube-proxy do, to spare an apiserver that is coming
    // back): after a 30 s outage the next try can be 30 s away, more on a loaded machine.
    agent.wait_log("ModelDeployments: watching again", Duration::from_secs(120))?;
    cluster.kubectl(&[
        "patch",
        "modeldeployment",
        "php-apache",
        "-n",
        bed.ns(),
        "--type=merge",
        "-p",
        r#"{"spec":{"enabled":false}}"#,
    ])?;
    wait_removed(&agent, &svc)?;
    Ok(())
}

/// A restarted agent adopts its pins and resyncs without a gap. While no agent runs (SIGKILL:
/// its tunnel's heartbeat goes stale), the programs stay attached and the pinned entry stays as
/// it was: a client's connections keep being answered and keep being counted in the pinned
/// counters. The restarted agent takes that entry over: its counters go on from where they
/// were (a map made anew would start at zero), its generation is unchanged and nothing is
/// rewritten once it is in sync, and it follows the next change.
#[test]
fn an_agent_restart_adopts_its_maps_and_resyncs() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    let bed = OffloadBed::new(cluster, "restart")?;
    deploy_seed(cluster, bed.ns())?;
    let _controller = bed.controller()?;
    let node = TestCgroup::new("node1")?;
    let mut agent = bed.agent("beamlit-node-1", &node)?;
    bed.wait_applied("applied on 1 of 1", |s| s["agents"]["applied"] == 1)?;
    let svc = bed.service_address()?;
    agent.wait_share(&svc, 0, WAIT)?;
    let client = cluster.add_unmanaged_pod("client")?;
    const FIRST: u64 = 5;
    all_answered_by(&client, &node, &svc, FIRST, is_local)?;
    let before = agent.service(&svc)?;
    let local = |row: &serde_json::Value| row["local"].as_u64().unwrap_or(0);
    assert!(
        local(&before) >= FIRST,
        "the connects were not counted: {before}"
    );

    // Connections every 50 ms across the kill, the time without agent and the restart.
    let stop = bed.dir.join("stop-requests");
    let mut loop_opts = http_probe(&svc, 0)?;
    loop_opts.interval_ms = Some(50);
    loop_opts.until_file = Some(stop.clone());
    let requests = spawn_probe(&client.netns, Some(node.path()), &loop_opts)?;
    std::thread::sleep(Duration::from_millis(500));
    agent.kill9()?;
    let killed = agent.service(&svc)?;
    // Down until the tunnel's heartbeat is stale (the agent is really gone) and connections
    // made since the kill were counted (the programs still run, on the pinned maps).
    let down = Instant::now();
    let while_down = loop {
        let report = agent.inspect()?;
        let row = agent.service(&svc)?;
        let stale = report["tunnel_heartbeat_age_ms"]
            .as_u64()
            .is_some_and(|age| age >= 600);
        if stale && local(&row) > local(&killed) {
            break row;
        }
        if down.elapsed() > Duration::from_secs(10) {
            bail!("while no agent ran: {report}\nat the kill: {killed}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (&while_down["share_bp"], &while_down["generation"]),
        (&before["share_bp"], &before["generation"]),
        "the entry changed while no agent ran: {while_down}"
    );

    agent.restart()?;
    // "listed; applying" comes before the first sync; this line after it.
    agent.wait_log("in sync with the cluster", Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, "")?;
    let report = finish_probe(requests, Duration::from_secs(30))?;
    println!("across the restart: {report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.count("beamlit"), 0, "{report:?}");
    let after = agent.service(&svc)?;
    assert_eq!(
        after["generation"], before["generation"],
        "an unchanged route must not be rewritten on restart: {after}"
    );
    // Every connect of this test, before, during and after the restart, is in the adopted
    // counters: a map created anew by the restarted agent would hold only those since.
    assert!(
        local(&after) >= FIRST + report.attempts,
        "counters lost across the restart ({FIRST} + {} connects): {after}",
        report.attempts
    );
    assert!(
        !agent.log().contains("maps updated"),
        "a restart with nothing changed rewrote the maps:\n{}",
        agent.log()
    );

    // The restarted agent follows the cluster: the next change moves the adopted entry on.
    scale(cluster, bed.ns(), 0)?;
    agent.wait_share(&svc, 10_000, WAIT)?;
    let moved = agent.service(&svc)?;
    assert!(
        moved["generation"].as_u64() > before["generation"].as_u64(),
        "{moved}"
    );
    assert!(local(&moved) >= local(&after), "{moved}");
    Ok(())
}

/// The agent's own connections to the API server carry the bypass mark, so no `services` entry
/// (here one written by hand with bpftool for the API server's own address) can redirect them:
/// an agent inside the cgroup its programs watch, as on a node, still lists, applies and
/// acknowledges. The same entry does redirect an unmarked client in that cgroup.
#[test]
fn a_hand_written_entry_for_the_api_server_does_not_redirect_the_agents_own_connections()
-> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    let bed = OffloadBed::new(cluster, "apiexempt")?;
    deploy_seed(cluster, bed.ns())?;
    let _controller = bed.controller()?;
    let node = TestCgroup::new("node1")?;
    let mut agent = bed.agent("beamlit-node-1", &node)?;
    bed.wait_applied("applied on 1 of 1", |s| s["agents"]["applied"] == 1)?;
    let server = cluster.server();
    let api: std::net::SocketAddrV4 = server
        .trim_start_matches("https://")
        .parse()
        .with_context(|| format!("API server address in {server}"))?;
    // Every redirected connect goes to a closed loopback port: refused at once.
    let nowhere: std::net::SocketAddrV4 = "127.0.0.1:1".parse()?;
    agent.write_entry_by_hand(api, nowhere, 10_000, 65_535)?;
    assert_eq!(agent.service(&api.to_string())?["share_bp"], 10_000);
    let curl = |cgroup: Option<&std::path::Path>| -> Result<bool> {
        let mut cmd = std::process::Command::new("curl");
        cmd.args([
            "-sk",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            &format!("{server}/version"),
        ]);
        Ok(run_in(cgroup, cmd)?.status.success())
    };
    assert!(curl(None)?, "the API server answers outside the cgroup");
    assert!(
        !curl(Some(node.path()))?,
        "the hand-written entry must redirect an unmarked client in the cgroup"
    );
    // The agent restarts inside the cgroup with the entry in place: its first list, its Lease
    // and its Secret reads all connect while the entry says "redirect everything".
    agent.set_inside_cgroup(true);
    agent.restart()?;
    agent.wait_log("listed; applying", Duration::from_secs(20))?;
    // It applied: the entry nobody asked for is gone from the maps, the model's is there.
    wait_removed(&agent, &api.to_string())?;
    let svc = bed.service_address()?;
    agent.wait_share(&svc, 0, WAIT)?;
    // And it keeps following the cluster from inside the cgroup.
    scale(cluster, bed.ns(), 0)?;
    agent.wait_share(&svc, 10_000, WAIT)?;
    Ok(())
}

/// Metric-driven offloading through the agents: an External metric (Prometheus, scraping an
/// exporter the test controls) above its target sends about `behavior.percentage` (50%) of new
/// connections to Beamlit, and none once the stabilization window (5 s here) has passed.
#[test]
fn a_metric_above_target_offloads_about_the_percentage_then_none() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    let bed = OffloadBed::new(cluster, "metric")?;
    cluster.apply(bed.ns(), PHP_APACHE)?;
    cluster.wait_deployment_ready(bed.ns(), "php-apache", 1, WAIT)?;
    let exporter = Exporter::start(5.0)?;
    let (_prometheus, url) = start_prometheus(&bed.dir, exporter.addr)?;
    let md = seed_model_deployment(bed.ns()).replace(
        "      - type: Resource\n        resource:\n          name: cpu\n          target:\n            type: Utilization\n            averageUtilization: 90\n",
        "      - type: External\n        external:\n          metric:\n            name: model_load\n            selector:\n              matchLabels:\n                model: php-apache\n          target:\n            type: Value\n            value: \"10\"\n",
    );
    assert!(
        md.contains("model_load"),
        "the seed's metric block moved: {md}"
    );
    cluster.apply(bed.ns(), &md)?;
    let controller = bed.controller_with(&["--prometheus-url", &url])?;
    let node = TestCgroup::new("node1")?;
    let agent = bed.agent("beamlit-node-1", &node)?;
    bed.wait_applied("healthy, applied", |s| {
        s["metrics"][0]["current"] == "5" && s["offloadPercent"] == 0 && s["agents"]["applied"] == 1
    })
    .with_context(|| controller.log())?;
    let svc = bed.service_address()?;
    let client = cluster.add_unmanaged_pod("client")?;

    exporter.set(50.0);
    agent.wait_share(&svc, 5_000, Duration::from_secs(20))?;
    let mut opts = http_probe(&svc, 1000)?;
    opts.concurrency = Some(8);
    let report = run_probe(&client.netns, Some(node.path()), &opts)?;
    assert_eq!(report.failed, 0, "{report:?}");
    let remote = report.count("beamlit") as f64 / report.ok as f64 * 100.0;
    println!("metric above target: {remote:.1}% of 1000 connections remote (target 50 ± 5)");
    assert!((45.0..=55.0).contains(&remote), "{remote:.1}%: {report:?}");

    exporter.set(5.0);
    let below = Instant::now();
    agent.wait_share(&svc, 0, Duration::from_secs(30))?;
    let held = below.elapsed();
    println!("metric back below: offloading stopped after {held:?} (window 5 s)");
    assert!(
        held >= Duration::from_secs(4),
        "before the window: {held:?}"
    );
    all_answered_by(&client, &node, &svc, 50, is_local)?;
    Ok(())
}

/// The node's acknowledgement past what one annotation holds: the agent's Lease writer splits
/// it over shard Leases (each within the API server's limit, shard 0 giving the count), and a
/// smaller one later empties the shards it no longer needs.
#[test]
fn a_large_acknowledgement_is_split_over_leases_and_shrinks_back() -> Result<()> {
    use beamlit_api::acknowledgement::{
        APPLIED_ANNOTATION, Applied, AppliedDecisions, SHARDS_ANNOTATION, shard_lease_name,
    };
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    let ns = cluster.namespace("acklarge")?;
    let applied = |n: usize| {
        AppliedDecisions(
            (0..n)
                .map(|i| {
                    (
                        format!("models-with-a-long-namespace/model-deployment-{i}"),
                        Applied {
                            uid: format!("{i:08}-1111-2222-3333-444444444444"),
                            decision: 1234,
                        },
                    )
                })
                .collect(),
        )
    };
    let annotation = |name: &str, key: &str| -> Result<Option<String>> {
        let out = cluster.kubectl(&["get", "lease", name, "-n", ns.name(), "-o", "json"])?;
        let lease: serde_json::Value = serde_json::from_str(&out)?;
        Ok(lease["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_string))
    };
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(beamlit_testbed::cluster::client_for(cluster.kubeconfig()))?;
    let mut writer = beamlit_agent::cluster::ack::LeaseWriter::new(client, ns.name(), "big-node");

    // 5000 entries: about 500 KB of JSON, twice what one object's annotations may hold.
    let large = applied(5000);
    rt.block_on(writer.publish(&large))?;
    assert_eq!(
        annotation(&shard_lease_name("big-node", 0), SHARDS_ANNOTATION)?.as_deref(),
        Some("4")
    );
    let mut union = AppliedDecisions::default();
    for shard in 0..4 {
        let text = annotation(&shard_lease_name("big-node", shard), APPLIED_ANNOTATION)?
            .with_context(|| format!("shard {shard} has no acknowledgement"))?;
        assert!(
            text.len() < 200 * 1024,
            "shard {shard}: {} bytes",
            text.len()
        );
        union
            .0
            .extend(AppliedDecisions::from_annotation(Some(&text)).0);
    }
    assert_eq!(
        union, large,
        "the shards together are not what was published"
    );

    // Back to 10 entries: one shard, the others emptied.
    rt.block_on(writer.publish(&applied(10)))?;
    assert_eq!(
        annotation(&shard_lease_name("big-node", 0), SHARDS_ANNOTATION)?.as_deref(),
        Some("1")
    );
    assert_eq!(
        AppliedDecisions::from_annotation(
            annotation(&shard_lease_name("big-node", 0), APPLIED_ANNOTATION)?.as_deref()
        ),
        applied(10)
    );
    for shard in 1..4 {
        assert_eq!(
            annotation(&shard_lease_name("big-node", shard), APPLIED_ANNOTATION)?.as_deref(),
            Some("{}"),
            "shard {shard} kept entries"
        );
    }
    Ok(())
}
