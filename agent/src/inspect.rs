//! `beamlit-agent inspect`: the pinned maps in human terms (like `cilium bpf lb list`). Reads
//! only pins, so it works while the agent is stopped.
use std::path::Path;

use serde::Serialize;

use crate::{dataplane, maps::PinnedMaps, model};

#[derive(Debug, Serialize)]
pub struct Report {
    pub bpffs_dir: String,
    pub services: Vec<ServiceRow>,
    pub bypass_mark: u32,
    /// Cgroup ids never redirected (`exempt_cgroups`: the agent's own pod, the controller's).
    pub exempt_cgroups: Vec<u64>,
    /// Cluster mode: the pods behind those ids, as `name (cgroup id)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exempt_pods: Vec<String>,
    /// Milliseconds since the agent's tunnel last beat (`None`: never). Services whose tunnel is
    /// the agent's fail open once this passes 500 ms.
    pub tunnel_heartbeat_age_ms: Option<u64>,
    pub programs: Vec<ProgramRow>,
    /// Cluster mode: the node, and ModelDeployments this node could not apply (and why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Cluster mode: the Services whose EndpointSlices the agent watches, and the slices cached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_slices: Option<crate::cluster::WatchedSlices>,
}

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub address: String,
    pub protocol: &'static str,
    pub offload_percent: f64,
    pub share_bp: u16,
    pub tunnel: String,
    pub tunnel_ready: bool,
    pub generation: u32,
    pub local: u64,
    pub redirected: u64,
    pub fail_open: u64,
    pub bypassed: u64,
    /// Cluster mode: the ModelDeployment (`namespace/name`) this service comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_deployment: Option<String>,
    /// Cluster mode: why the share is what it is (the controller's reason, or node-local failover).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ProgramRow {
    pub name: &'static str,
    pub attached: bool,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    /// Non-zero only while kernel BPF statistics are enabled (`sysctl kernel.bpf_stats_enabled=1`
    /// or a BPF_ENABLE_STATS holder such as `cargo xtask bench`).
    pub run_count: u64,
    pub run_time_ns: u64,
    pub average_ns: Option<f64>,
}

/// `state_dir`: where a cluster-mode agent records each service's ModelDeployment and reason
/// (absent in standalone mode).
pub fn report(dir: &Path, state_dir: &Path) -> anyhow::Result<Report> {
    let maps = PinnedMaps::open(dir)?;
    let state = crate::cluster::read_state(state_dir);
    let mut services = Vec::new();
    for (key, entry) in maps.services()? {
        let counters = maps.counters(&entry)?;
        let route = model::entry_route(&key, &entry);
        let origin = state.as_ref().and_then(|s| {
            let addr = route.map(|r| r.service)?;
            s.services.iter().find(|o| o.service == addr)
        });
        services.push(ServiceRow {
            address: route.map_or_else(|| format!("{key:?}"), |r| r.service.to_string()),
            protocol: "tcp",
            offload_percent: f64::from(entry.share_bp) / 100.0,
            share_bp: entry.share_bp,
            tunnel: route.map_or_else(|| "?".into(), |r| r.tunnel.to_string()),
            tunnel_ready: route.is_some_and(|r| r.tunnel_ready),
            generation: entry.generation,
            local: counters.local,
            redirected: counters.redirected,
            fail_open: counters.fail_open,
            bypassed: counters.bypassed,
            model_deployment: origin.map(|o| o.model_deployment.clone()),
            reason: origin.map(|o| o.reason.clone()),
        });
    }
    let loaded: Vec<_> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .collect();
    let programs = dataplane::pinned_program_ids(dir)
        .into_iter()
        .map(|(name, link)| {
            let info = link.and_then(|l| loaded.iter().find(|p| p.id() == l.program_id));
            let run_count = info.map_or(0, |i| i.run_count());
            let run_time_ns = info.map_or(0, |i| i.run_time().as_nanos() as u64);
            ProgramRow {
                name,
                attached: link.is_some_and(|l| l.cgroup_id != 0),
                link_id: link.map(|l| l.link_id),
                program_id: link.map(|l| l.program_id),
                run_count,
                run_time_ns,
                average_ns: (run_count > 0).then(|| run_time_ns as f64 / run_count as f64),
            }
        })
        .collect();
    let config = maps.config()?;
    Ok(Report {
        bpffs_dir: dir.display().to_string(),
        services,
        bypass_mark: config.bypass_mark,
        exempt_cgroups: maps.exempt_cgroups()?.into_iter().collect(),
        exempt_pods: state
            .as_ref()
            .map(|s| s.exempt_pods.clone())
            .unwrap_or_default(),
        tunnel_heartbeat_age_ms: (config.tunnel_heartbeat_ns != 0).then(|| {
            crate::maps::monotonic_ns().saturating_sub(config.tunnel_heartbeat_ns) / 1_000_000
        }),
        programs,
        node: state.as_ref().map(|s| s.node.clone()),
        endpoint_slices: state.as_ref().map(|s| s.endpoint_slices.clone()),
        problems: state.map(|s| s.problems).unwrap_or_default(),
    })
}

/// The report as aligned tables.
pub fn render(report: &Report) -> String {
    let cluster = report.services.iter().any(|s| s.model_deployment.is_some());
    let mut rows = vec![
        [
            "SERVICE",
            "PROTO",
            "OFFLOAD",
            "TUNNEL",
            "READY",
            "LOCAL",
            "REDIRECTED",
            "FAIL-OPEN",
            "BYPASSED",
            "GEN",
        ]
        .map(String::from)
        .to_vec(),
    ];
    if cluster {
        rows[0].extend(["MODELDEPLOYMENT", "REASON"].map(String::from));
    }
    for s in &report.services {
        rows.push(vec![
            s.address.clone(),
            s.protocol.to_string(),
            format!("{:.2}%", s.offload_percent),
            s.tunnel.clone(),
            if s.tunnel_ready { "yes" } else { "no" }.to_string(),
            s.local.to_string(),
            s.redirected.to_string(),
            s.fail_open.to_string(),
            s.bypassed.to_string(),
            s.generation.to_string(),
        ]);
        if cluster && let Some(row) = rows.last_mut() {
            row.push(s.model_deployment.clone().unwrap_or_else(|| "-".into()));
            row.push(s.reason.clone().unwrap_or_else(|| "-".into()));
        }
    }
    let mut out = table(&rows);
    if report.services.is_empty() {
        out.push_str("(no services)\n");
    }
    let heartbeat = report.tunnel_heartbeat_age_ms.map_or_else(
        || "never (no agent tunnel)".to_string(),
        |ms| {
            let state = if ms < 500 {
                "alive"
            } else {
                "stale: its services fail open"
            };
            format!("{ms} ms ago ({state})")
        },
    );
    let exempt = if !report.exempt_pods.is_empty() {
        report.exempt_pods.join(", ")
    } else if report.exempt_cgroups.is_empty() {
        "none".to_string()
    } else {
        let ids: Vec<String> = report.exempt_cgroups.iter().map(u64::to_string).collect();
        format!("cgroups {}", ids.join(", "))
    };
    if let Some(w) = &report.endpoint_slices {
        let services = if w.services.is_empty() {
            "none".to_string()
        } else {
            w.services.join(", ")
        };
        out.push_str(&format!(
            "\nEndpointSlices watched: of the Services named {services} ({} cached)",
            w.cached
        ));
    }
    out.push_str(&format!(
        "\nbypass mark: {:#x}\nnever redirected: {exempt}\ntunnel heartbeat: {heartbeat}\npins: {}\n\n",
        report.bypass_mark, report.bpffs_dir
    ));
    let mut programs = vec![
        ["PROGRAM", "ATTACHED", "LINK", "PROG-ID", "RUNS", "AVG-NS"]
            .map(String::from)
            .to_vec(),
    ];
    for p in &report.programs {
        programs.push(vec![
            p.name.to_string(),
            if p.attached { "yes" } else { "no" }.to_string(),
            p.link_id.map_or("-".into(), |v| v.to_string()),
            p.program_id.map_or("-".into(), |v| v.to_string()),
            p.run_count.to_string(),
            p.average_ns.map_or("-".into(), |v| format!("{v:.0}")),
        ]);
    }
    out.push_str(&table(&programs));
    if let Some(node) = &report.node {
        out.push_str(&format!("\nnode: {node}\n"));
    }
    for p in &report.problems {
        out.push_str(&format!("not applied: {p}\n"));
    }
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
