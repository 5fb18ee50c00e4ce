//! `cargo xtask bench tunnel`: the egress tunnel against a direct connection and against nginx
//! as a reverse proxy, side by side in one run.
//!
//! One upstream (nginx answering a fixed body in the "remote" pod), three ways to reach it from
//! the same client pod with wrk (keep-alive connections): directly; through the Service address,
//! redirected by eBPF to the agent's tunnel (plain HTTP upstream, so TLS does not blur the
//! comparison); and through Debian's nginx configured as a reverse proxy with upstream keep-alive.
//! Rounds alternate the order. Then the agent's peak memory with 1000 open client connections.
use std::{fmt::Write as _, fs, net::SocketAddr};

use anyhow::Result;
use beamlit_testbed::{AgentFixture, TestCgroup, Topology};

use crate::bench::{Nginx, Wrk, WrkResult, static_server, verdict, wrk};

const SERVICE: &str = "10.96.0.10:80";

#[derive(clap::Args)]
pub struct TunnelArgs {
    /// Rounds; each measures the three paths, in an order that rotates per round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of wrk per path and round.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Concurrent keep-alive connections of wrk.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Passed to the agent as --tunnel-workers (default: the agent's own default).
    #[arg(long)]
    tunnel_workers: Option<usize>,
}

pub fn tunnel(args: &TunnelArgs) -> Result<()> {
    crate::build_agent_and_testbed("benchmark", true)?;

    let mut topology = Topology::new("benchtun")?;
    let client = topology.add_pod("client")?;
    let local = topology.add_pod("local")?;
    let remote = topology.add_pod("remote")?;
    let proxy = topology.add_pod("proxy")?;
    let workdir = std::env::temp_dir().join(format!("beamlit-bench-tunnel-{}", std::process::id()));
    let upstream: SocketAddr = (remote.ipv4, 8080).into();
    let proxy_addr: SocketAddr = (proxy.ipv4, 8081).into();
    let _upstream = Nginx::start(
        &remote.netns,
        &workdir.join("upstream"),
        &static_server(upstream),
        upstream,
    )?;
    let _proxy = Nginx::start(
        &proxy.netns,
        &workdir.join("proxy"),
        &format!(
            "  upstream remote {{ server {upstream}; keepalive 64; }}\n  server {{\n    \
             listen {proxy_addr} backlog=4096;\n    location / {{ proxy_pass http://remote; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n"
        ),
        proxy_addr,
    )?;
    // The Service's own backend exists (as in a cluster) but at share 100 nothing reaches it.
    let local_addr: SocketAddr = (local.ipv4, 8080).into();
    let _local = Nginx::start(
        &local.netns,
        &workdir.join("local"),
        &static_server(local_addr),
        local_addr,
    )?;
    topology.add_service(SERVICE.parse()?, local_addr)?;

    let cgroup = TestCgroup::new("benchtun")?;
    let node_netns = format!("/var/run/netns/{}", topology.node().name());
    let routes = format!(
        "tunnel:\n  ipv4: 10.200.0.1:15001\nservices:\n  - address: {SERVICE}\n    \
         offloadPercent: 100\n    remote:\n      scheme: http\n      host: \"{upstream}\"\n"
    );
    let workers = args.tunnel_workers.map(|n| n.to_string());
    let mut agent_args = vec!["--tunnel-netns", node_netns.as_str()];
    if let Some(n) = &workers {
        agent_args.extend(["--tunnel-workers", n.as_str()]);
    }
    let mut agent = AgentFixture::start(cgroup.path(), &routes, &agent_args)?;

    let paths = [
        ("direct", format!("http://{upstream}/")),
        ("tunnel", format!("http://{SERVICE}/")),
        ("nginx proxy", format!("http://{proxy_addr}/")),
    ];
    let mut results: Vec<Vec<WrkResult>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for round in 0..args.rounds.max(1) {
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let (name, url) = &paths[i];
            let w = Wrk {
                url: url.clone(),
                seconds: args.seconds.max(1),
                connections: args.connections,
                close: false,
            };
            let r = wrk(&client.netns, cgroup.path(), &w)?;
            println!(
                "[bench] round {} {name:>12}: {:>9.0} req/s, p50 {:.0} µs, p99 {:.0} µs",
                round + 1,
                r.requests_per_sec,
                r.p50_us,
                r.p99_us
            );
            results[i].push(r);
        }
    }

    // Per-hop latency: one keep-alive connection, so queueing does not hide what each hop adds.
    let mut single: Vec<Vec<WrkResult>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for round in 0..args.rounds.max(1) {
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let w = Wrk {
                url: paths[i].1.clone(),
                seconds: args.seconds.max(1),
                connections: 1,
                close: false,
            };
            let r = wrk(&client.netns, cgroup.path(), &w)?;
            println!(
                "[bench] round {} {:>12} (1 connection): p50 {:.0} µs, p99 {:.0} µs",
                round + 1,
                paths[i].0,
                r.p50_us,
                r.p99_us
            );
            single[i].push(r);
        }
    }

    println!("[bench] 1000 open client connections through the tunnel");
    let crowd = Wrk {
        url: paths[1].1.clone(),
        seconds: 5,
        connections: 1000,
        close: false,
    };
    let crowd_result = wrk(&client.netns, cgroup.path(), &crowd)?;
    let peak_mib = agent.peak_rss_kib()? as f64 / 1024.0;

    let median = |rs: &[WrkResult], f: fn(&WrkResult) -> f64| {
        let mut v: Vec<f64> = rs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rps = |i: usize| median(&results[i], |r| r.requests_per_sec);
    let p50 = |i: usize| median(&results[i], |r| r.p50_us);
    let p99 = |i: usize| median(&results[i], |r| r.p99_us);
    let hop_p50 = |i: usize| median(&single[i], |r| r.p50_us);
    let hop_p99 = |i: usize| median(&single[i], |r| r.p99_us);
    let mut out = String::new();
    writeln!(
        out,
        "\ntunnel benchmark: medians of {} rounds; wrk -t1 -c{} -d{}s, keep-alive; plain HTTP upstream",
        args.rounds.max(1),
        args.connections,
        args.seconds
    )?;
    writeln!(
        out,
        "{:<14}{:>12}{:>12}{:>12}{:>18}",
        "path", "req/s", "p50 µs", "p99 µs", "req/s vs nginx"
    )?;
    for (i, (name, _)) in paths.iter().enumerate() {
        writeln!(
            out,
            "{name:<14}{:>12.0}{:>12.0}{:>12.0}{:>18.2}",
            rps(i),
            p50(i),
            p99(i),
            rps(i) / rps(2)
        )?;
    }
    writeln!(out, "\nper-hop latency, one keep-alive connection:")?;
    writeln!(
        out,
        "{:<14}{:>12}{:>12}{:>18}",
        "path", "p50 µs", "p99 µs", "p50 over direct"
    )?;
    for (i, (name, _)) in paths.iter().enumerate() {
        writeln!(
            out,
            "{name:<14}{:>12.0}{:>12.0}{:>18.0}",
            hop_p50(i),
            hop_p99(i),
            hop_p50(i) - hop_p50(0)
        )?;
    }
    writeln!(
        out,
        "agent peak RSS with 1000 open client connections: {peak_mib:.1} MiB ({:.0} req/s meanwhile)",
        crowd_result.requests_per_sec
    )?;
    writeln!(
        out,
        "targets: tunnel req/s ≥ nginx's: {} ({:.2}); tunnel p50 ≤ direct + 150 µs (one \
         connection): {} (+{:.0} µs); RSS ≤ 64 MB: {}",
        verdict(rps(1) >= rps(2)),
        rps(1) / rps(2),
        verdict(hop_p50(1) <= hop_p50(0) + 150.0),
        hop_p50(1) - hop_p50(0),
        verdict(peak_mib <= 64.0)
    )?;
    print!("{out}");
    drop(agent);
    let _ = fs::remove_dir_all(&workdir);
    Ok(())
}
