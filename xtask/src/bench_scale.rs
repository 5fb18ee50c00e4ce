//! `cargo xtask bench scale`: how the cluster side grows with the number of agents. One private
//! test cluster (a real kube-apiserver), the controller, 1000 ModelDeployments (each with its
//! Service), and in turn 1, 10 and 50 cluster-mode agents — real agent processes with the
//! chart's arguments, each with its own bpffs, its own cgroup (the programs attached to it)
//! and its own tunnel container beside it, all on the one simulated node.
//!
//! Per agent count:
//! - all applied at start: from the first agent's start until every ModelDeployment's
//!   `status.agents` says N of N;
//! - steady state: API requests per minute (the apiserver's own counter, all verbs but WATCH)
//!   and watch events it sent per minute, over a window, less an equally long window before the
//!   controller started (the test cluster's own background);
//! - one decision change (`spec.enabled` flipped on one ModelDeployment, alternately off and
//!   on): the time from the API call until that object's `status.agents` says N of N for the
//!   new decision generation, read on a watch opened before the call, and the API requests and
//!   watch events the change caused: the counters' difference over the change and a settle
//!   time after it, less the steady-state rate over the same time;
//! - controller RSS, and the largest agent RSS (VmHWM).
//!
//! Targets (issue 17): growth from 10 to 50 agents ≤ 5.5× for requests and watch events per
//! change and for steady-state requests; all applied ≤ 2 s after a change with 50 agents.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use beamlit_api::{ModelDeployment, acknowledgement};
use beamlit_testbed::{
    AgentFixture, TestCgroup, cluster::TestCluster, require_privileges, seed::OffloadBed,
};
use futures::StreamExt as _;
use kube::api::{Api, Patch, PatchParams, WatchEvent, WatchParams};

use crate::bench::verdict;

#[derive(clap::Args)]
pub struct ScaleArgs {
    /// Agent counts, measured one after another against the same models.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    agents: Vec<usize>,
    /// How many ModelDeployments (each with its own Service).
    #[arg(long, default_value_t = 1000)]
    models: usize,
    /// Decision changes timed per agent count (the median is reported).
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// Seconds of each steady-state window.
    #[arg(long, default_value_t = 30)]
    window_secs: u64,
}

/// After a change is applied everywhere, how long to keep counting what it caused (a last
/// `status.agents` patch, its watch events). Longer than the controller's acknowledgement
/// batch (250 ms) several times over.
const SETTLE: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(300);

/// What the apiserver counted: requests (all verbs but WATCH) and watch events sent.
#[derive(Clone, Copy, Default)]
struct Counters {
    requests: f64,
    watch_events: f64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            requests: self.requests - o.requests,
            watch_events: self.watch_events - o.watch_events,
        }
    }
}

impl Counters {
    fn read(cluster: &TestCluster) -> Result<Self> {
        let metrics = cluster.kubectl(&["get", "--raw", "/metrics"])?;
        let sum = |prefix: &str, skip: &dyn Fn(&str) -> bool| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(prefix) && !skip(l))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let watch_events = sum("apiserver_watch_events_total{", &|_| false);
        if watch_events == 0.0 {
            bail!("the apiserver's /metrics has no apiserver_watch_events_total");
        }
        Ok(Self {
            requests: sum("apiserver_request_total{", &|l| {
                l.contains("verb=\"WATCH\"")
            }),
            watch_events,
        })
    }

    /// Per minute, over `over`.
    fn rate(self, over: Duration) -> Counters {
        let f = 60.0 / over.as_secs_f64();
        Counters {
            requests: self.requests * f,
            watch_events: self.watch_events * f,
        }
    }

    /// What a per-minute rate accumulates in `over`.
    fn during(self, over: Duration) -> Counters {
        let f = over.as_secs_f64() / 60.0;
        Counters {
            requests: self.requests * f,
            watch_events: self.watch_events * f,
        }
    }
}

fn window(cluster: &TestCluster, secs: u64) -> Result<Counters> {
    let before = Counters::read(cluster)?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let after = Counters::read(cluster)?;
    Ok((after - before).rate(started.elapsed()))
}

struct Row {
    agents: usize,
    start_all_applied: Duration,
    change_applied: Vec<Duration>,
    change: Counters,
    steady: Counters,
    controller_rss_mib: f64,
    agent_peak_mib: f64,
}

pub fn scale(args: &ScaleArgs) -> Result<()> {
    if !require_privileges() {
        bail!(
            "the benchmark starts a test cluster with simulated nodes and agents: run it as root"
        );
    }
    if args.agents.is_empty() || args.agents.contains(&0) {
        bail!("--agents takes a list of positive counts, e.g. --agents 1,10,50");
    }
    if args.changes == 0 {
        bail!("--changes must be at least 1");
    }
    crate::build_agent_and_testbed("benchmark", true)?;
    crate::cargo(&["build", "--release", "-p", "beamlit-controller", "--bins"])?;
    // SAFETY: no thread started yet; the test bed reads this when it starts the controller.
    unsafe {
        std::env::set_var(
            "BEAMLIT_CONTROLLER_BIN",
            crate::project_root().join("target/release/beamlit-controller"),
        );
    }

    let cluster = TestCluster::start_with_nodes(1)?;
    let bed = OffloadBed::new(&cluster, "benchscale")?;
    let ns = bed.ns().to_string();
    let created = Instant::now();
    // No workload and no endpoints: every model decides NoReadyEndpoints (100%) until the
    // benchmark disables one; what the agents apply is what matters here.
    crate::bench_controller::apply_models(&cluster, &ns, 0..args.models, |i| format!("model-{i}"))?;
    println!(
        "[bench] {} Services and ModelDeployments created in {:.1?}",
        args.models,
        created.elapsed()
    );
    println!(
        "[bench] background: {} s before the controller starts",
        args.window_secs
    );
    let background = window(&cluster, args.window_secs)?;

    let mut controller = bed.controller()?;
    wait_all(&cluster, &ns, args.models, WAIT, "decided", |_, _| true)
        .with_context(|| controller.log())?;
    println!("[bench] the controller decided all {} models", args.models);

    let mut rows = Vec::new();
    let mut enabled = true;
    for &n in &args.agents {
        println!("[bench] {n} agent(s): starting");
        let started = Instant::now();
        let mut agents: Vec<(AgentFixture, TestCgroup)> = Vec::with_capacity(n);
        for i in 0..n {
            let cgroup = TestCgroup::new(&format!("scale{i}"))?;
            let agent = bed
                .agent(&format!("beamlit-scale-{n}-{i}"), &cgroup)
                .with_context(|| format!("starting agent {i} of {n}"))?;
            agents.push((agent, cgroup));
        }
        // Agents start one after another, and each one's first acknowledgement moves every
        // model's `status.agents.total`; the controller throttles those to one pass over the
        // models per MEMBERSHIP_INTERVAL (10 s), so the start costs about models × start time
        // / 10 s status writes (the per-change figures below are the ones with targets).
        let start_wait = WAIT + Duration::from_secs(15) * n as u32;
        wait_all(
            &cluster,
            &ns,
            args.models,
            start_wait,
            "applied by every agent",
            |a, t| a == n && t == n,
        )
        .with_context(|| format!("{}\nfirst agent:\n{}", controller.log(), agents[0].0.log()))?;
        let start_all_applied = started.elapsed();
        println!(
            "[bench] {n} agent(s): all models applied {start_all_applied:.1?} after the first start"
        );

        println!(
            "[bench] {n} agent(s): steady state for {} s",
            args.window_secs
        );
        let steady = window(&cluster, args.window_secs)? - background;
        let steady = Counters {
            requests: steady.requests.max(0.0),
            watch_events: steady.watch_events.max(0.0),
        };

        let mut change_applied = Vec::new();
        let mut per_change = Vec::new();
        for c in 0..args.changes {
            enabled = !enabled;
            let (took, caused) = decision_change(&cluster, &ns, "model-0", enabled, n, steady)
                .with_context(|| format!("{n} agents, change {c}: {}", controller.log()))?;
            println!(
                "[bench] {n} agent(s): change {c} applied by all in {took:.0?}: {:.0} requests, {:.0} watch events",
                caused.requests, caused.watch_events
            );
            change_applied.push(took);
            per_change.push(caused);
        }
        let change = Counters {
            requests: median(per_change.iter().map(|c| c.requests).collect()),
            watch_events: median(per_change.iter().map(|c| c.watch_events).collect()),
        };
        let controller_rss_mib = controller
            .pid()
            .map(|pid| vm_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0)
            .unwrap_or(f64::NAN);
        let mut agent_peak_mib: f64 = 0.0;
        for (agent, _) in &mut agents {
            agent_peak_mib = agent_peak_mib.max(agent.peak_rss_kib()? as f64 / 1024.0);
        }
        // Each count's row as soon as it is measured: a later count that fails (see the
        // start-up note in docs/benchmarks.md) keeps the earlier ones on record.
        println!(
            "[bench] {n} agent(s): steady {:.0} requests/min, {:.0} watch events/min (over the \
             background); per change (median) {:.0} requests, {:.0} watch events; controller \
             RSS {controller_rss_mib:.1} MiB, largest agent peak {agent_peak_mib:.1} MiB",
            steady.requests, steady.watch_events, change.requests, change.watch_events
        );
        rows.push(Row {
            agents: n,
            start_all_applied,
            change_applied,
            change,
            steady,
            controller_rss_mib,
            agent_peak_mib,
        });

        // Stop them (each drop detaches and unpins), then remove their Leases so the next
        // count starts from no agent at all rather than waiting out the Leases' duration.
        drop(agents);
        cluster.kubectl(&[
            "delete",
            "lease",
            "-n",
            bed.agents.name(),
            "-l",
            acknowledgement::AGENT_LEASE_SELECTOR,
            "--wait=true",
        ])?;
        wait_all(
            &cluster,
            &ns,
            args.models,
            WAIT,
            "counted no agent",
            |_, t| t == 0,
        )
        .with_context(|| controller.log())?;
    }

    print!("{}", report(args, &rows)?);
    Ok(())
}

/// Flips `spec.enabled` of one model and times until every one of the `agents` applied the
/// decision generation it led to. Returns that time and what the change cost the apiserver.
/// `apiserver_watch_events_total` summed per resource (its `resource` label).
fn watch_events_by_resource(cluster: &TestCluster) -> Result<BTreeMap<String, f64>> {
    let metrics = cluster.kubectl(&["get", "--raw", "/metrics"])?;
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(labels) = line.strip_prefix("apiserver_watch_events_total{") else {
            continue;
        };
        let resource = labels
            .split(',')
            .find_map(|l| l.strip_prefix("resource=\""))
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        *out.entry(resource.to_string()).or_insert(0.0) += value;
    }
    Ok(out)
}

fn decision_change(
    cluster: &TestCluster,
    ns: &str,
    name: &str,
    enabled: bool,
    agents: usize,
    steady: Counters,
) -> Result<(Duration, Counters)> {
    let api: Api<ModelDeployment> = Api::namespaced(cluster.client(), ns);
    let current = cluster.block_on(api.get(name))?;
    let old_generation = current.status.as_ref().map_or(0, |s| s.decision_generation);
    let version = current
        .metadata
        .resource_version
        .clone()
        .context("no resourceVersion")?;
    let before = Counters::read(cluster)?;
    let kinds_before = watch_events_by_resource(cluster)?;
    let (took, own_events) = cluster.block_on(async {
        // The watch is opened before the change (a WATCH, not counted as a request).
        let params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(290);
        let mut events = api.watch(&params, &version).await?.boxed();
        let started = Instant::now();
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"enabled": enabled}})),
        )
        .await?;
        let mut own_events = 0u32;
        while let Some(event) = events.next().await {
            own_events += 1;
            if let WatchEvent::Modified(md) = event? {
                let status = md.status.as_ref();
                let generation = status.map_or(0, |s| s.decision_generation);
                let applied = status.and_then(|s| s.agents.as_ref());
                if generation > old_generation
                    && applied
                        .is_some_and(|a| a.applied as usize == agents && a.total as usize == agents)
                {
                    return anyhow::Ok((started.elapsed(), own_events));
                }
            }
            if started.elapsed() > WAIT {
                break;
            }
        }
        bail!("{name}: the new decision was not applied by all {agents} agents within {WAIT:?}")
    })?;
    let counted_from = Instant::now() - took;
    std::thread::sleep(SETTLE);
    let after = Counters::read(cluster)?;
    let kinds_after = watch_events_by_resource(cluster)?;
    let elapsed = counted_from.elapsed();
    // Where the events went (background included), and how many versions of the model its own
    // watch saw: each one is a write delivered to every agent.
    let mut by_resource: Vec<(String, f64)> = kinds_after
        .into_iter()
        .map(|(k, v)| (v - kinds_before.get(&k).copied().unwrap_or(0.0), k))
        .filter(|(d, _)| *d > 0.0)
        .map(|(d, k)| (k, d))
        .collect();
    by_resource.sort_by(|a, b| b.1.total_cmp(&a.1));
    let shown: Vec<String> = by_resource
        .iter()
        .take(5)
        .map(|(k, d)| format!("{k} {d:.0}"))
        .collect();
    println!(
        "[bench]   {name}: {own_events} versions seen until all applied; watch events by resource: {}",
        shown.join(", ")
    );
    // Less: the background over the same time, the benchmark's own GET and PATCH, and the
    // events its own watch received.
    let mut caused = after - before - steady.during(elapsed);
    caused.requests -= 2.0;
    caused.watch_events -= f64::from(own_events);
    Ok((took, caused))
}

/// Waits until every ModelDeployment has a decision and `check(applied, total)` holds of its
/// `status.agents` (absent counts as 0 of 0).
fn wait_all(
    cluster: &TestCluster,
    ns: &str,
    models: usize,
    timeout: Duration,
    what: &str,
    check: impl Fn(usize, usize) -> bool,
) -> Result<()> {
    let started = Instant::now();
    let mut last = 0;
    loop {
        let out = cluster.kubectl(&[
            "get",
            "modeldeployments",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.status.reason} {.status.agents.applied} {.status.agents.total}{\"\\n\"}{end}",
        ])?;
        let done = out
            .lines()
            .filter(|l| {
                let mut f = l.split_whitespace();
                let reason = f.next().unwrap_or_default();
                let n = |s: Option<&str>| s.and_then(|s| s.parse().ok()).unwrap_or(0);
                !reason.is_empty() && check(n(f.next()), n(f.next()))
            })
            .count();
        if done >= models {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("only {done} of {models} ModelDeployments {what} after {timeout:?}");
        }
        if done != last && started.elapsed().as_secs().is_multiple_of(10) {
            println!("[bench]   {done} of {models} {what}");
        }
        last = done;
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn report(args: &ScaleArgs, rows: &[Row]) -> Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "\nscale benchmark: {} ModelDeployments, one decision change = spec.enabled flipped on one ({} per agent count, median)",
        args.models, args.changes
    )?;
    writeln!(
        out,
        "{:>6}  {:>12}  {:>18}  {:>12}  {:>14}  {:>12}  {:>13}  {:>10}  {:>10}",
        "agents",
        "start→all",
        "change→all p50/max",
        "req/change",
        "events/change",
        "steady req/m",
        "steady evt/m",
        "ctl RSS",
        "agent RSS"
    )?;
    for r in rows {
        let mut applied = r.change_applied.clone();
        applied.sort();
        let p50 = applied[applied.len() / 2];
        let max = applied[applied.len() - 1];
        writeln!(
            out,
            "{:>6}  {:>12.1?}  {:>8.0?} / {:>7.0?}  {:>12.0}  {:>14.0}  {:>12.0}  {:>13.0}  {:>6.1} MiB  {:>6.1} MiB",
            r.agents,
            r.start_all_applied,
            p50,
            max,
            r.change.requests,
            r.change.watch_events,
            r.steady.requests,
            r.steady.watch_events,
            r.controller_rss_mib,
            r.agent_peak_mib
        )?;
    }
    let find = |n: usize| rows.iter().find(|r| r.agents == n);
    if let (Some(ten), Some(fifty)) = (find(10), find(50)) {
        let growth = |a: f64, b: f64| if a > 0.0 { b / a } else { f64::INFINITY };
        let req = growth(ten.change.requests, fifty.change.requests);
        let evt = growth(ten.change.watch_events, fifty.change.watch_events);
        let steady = growth(ten.steady.requests, fifty.steady.requests);
        writeln!(
            out,
            "growth 10 → 50 agents: requests per change {req:.2}×, watch events per change {evt:.2}×, steady requests {steady:.2}×"
        )?;
        writeln!(
            out,
            "target: growth ≤ 5.5× for 5× the agents: {}",
            verdict(req <= 5.5 && evt <= 5.5 && steady <= 5.5)
        )?;
        let mut applied = fifty.change_applied.clone();
        applied.sort();
        let p50 = applied[applied.len() / 2];
        writeln!(
            out,
            "target: a change applied by all 50 agents ≤ 2 s (median {p50:.0?}): {}",
            verdict(p50 <= Duration::from_secs(2))
        )?;
    } else {
        writeln!(
            out,
            "(the targets compare 10 and 50 agents: run with --agents including both)"
        )?;
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
