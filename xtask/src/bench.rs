//! `cargo xtask bench dataplane`: the cost of the agent on connections it does not redirect.
//!
//! One topology, two sibling test cgroups: the agent's programs are attached to one ("with
//! agent", 10 000 services in the map, all at share 0) and not to the other ("without agent").
//! The same client pod runs wrk (a new connection per request) and a connect-latency probe from
//! each cgroup in alternating rounds, against nginx behind the same Service address, so both
//! sides see the same machine state. Kernel BPF statistics give the programs' own run time.
use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::{
    AgentFixture, ChildGuard, Netns, ProbeOptions, TestCgroup, Topology, run_in, run_probe, spawn,
};

const SERVICE: &str = "10.96.0.10:80";
const SERVICES_IN_MAP: usize = 10_000;
const WRK_CONNECTIONS: u32 = 32;
const CONNECTS_PER_ROUND: u64 = 3000;

#[derive(Default)]
struct Side {
    requests_per_sec: Vec<f64>,
    connect_p50_us: Vec<f64>,
    connect_p99_us: Vec<f64>,
}

#[derive(clap::Args)]
pub struct DataplaneArgs {
    /// Rounds; each runs both sides, the first side alternating from round to round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of wrk per side and round.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
}

pub fn dataplane(args: &DataplaneArgs) -> Result<()> {
    let (rounds, seconds) = (args.rounds.max(1), args.seconds.max(1));
    crate::build_agent_and_testbed("benchmark", true)?;

    let mut topology = Topology::new("bench")?;
    let client = topology.add_pod("client")?;
    // Thousands of new connections a second for minutes: without reuse of TIME_WAIT ports the
    // client runs out of ephemeral ports and both sides collapse alike.
    client.netns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client
        .netns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let backend = topology.add_pod("backend")?;
    // Removed when the run ends, failed or not (declared before the processes that use it, so
    // dropped after them).
    let workdir_guard = beamlit_testbed::TestDir::new("bench")?;
    let workdir = workdir_guard.path().to_path_buf();
    let backend_addr: SocketAddr = (backend.ipv4, 8080).into();
    let _nginx = Nginx::start(
        &backend.netns,
        &workdir,
        &static_server(backend_addr),
        backend_addr,
    )?;
    topology.add_service(SERVICE.parse()?, (backend.ipv4, 8080).into())?;

    let without = TestCgroup::new("benchoff")?;
    let with = TestCgroup::new("benchon")?;
    println!("[bench] writing {SERVICES_IN_MAP} services at share 0 into the agent's map");
    let agent = AgentFixture::start(with.path(), &routes(), &[])?;
    let services = agent.inspect()?["services"].as_array().map_or(0, Vec::len);
    if services != SERVICES_IN_MAP {
        bail!("the agent holds {services} services, expected {SERVICES_IN_MAP}");
    }
    let (mut off, mut on) = (Side::default(), Side::default());
    for round in 1..=rounds {
        let mut sides = [
            ("without agent", &without, &mut off),
            ("with agent", &with, &mut on),
        ];
        // ABBA: whichever side runs second in a round runs first in the next, so slow drift in
        // the machine's state does not favour one side.
        if round % 2 == 0 {
            sides.reverse();
        }
        for (label, cgroup, side) in sides {
            let rps = wrk(
                &client.netns,
                cgroup.path(),
                &Wrk::new_connections(SERVICE, seconds),
            )?
            .requests_per_sec;
            let mut probe = ProbeOptions::new(SERVICE.parse()?, CONNECTS_PER_ROUND);
            probe.http = true;
            let report = run_probe(&client.netns, Some(cgroup.path()), &probe)?;
            if report.failed > 0 {
                bail!(
                    "{label}: {} of {} connects failed: {report:?}",
                    report.failed,
                    report.attempts
                );
            }
            println!(
                "[bench] round {round} {label:>13}: {rps:>9.0} req/s, connect p50 {:.0} µs, p99 {:.0} µs",
                report.connect_us.p50, report.connect_us.p99
            );
            side.requests_per_sec.push(rps);
            side.connect_p50_us.push(report.connect_us.p50 as f64);
            side.connect_p99_us.push(report.connect_us.p99 as f64);
        }
    }
    // The programs' run time in a phase of its own: kernel BPF statistics cost two clock
    // reads per program run, so the throughput rounds above run without them, as a node does
    // by default (`kernel.bpf_stats_enabled` is 0).
    let stats = enable_bpf_stats()?;
    let before = [
        program_stats(&agent, "connect4")?,
        program_stats(&agent, "sock_ops")?,
    ];
    // Under the same load as the rounds (warm caches), not a serial probe.
    wrk(
        &client.netns,
        with.path(),
        &Wrk::new_connections(SERVICE, seconds),
    )?;
    let average_ns = |name: &str, (runs0, ns0): (u64, u64)| -> Result<(u64, f64)> {
        let (runs, ns) = program_stats(&agent, name)?;
        let runs = runs - runs0;
        Ok((
            runs,
            if runs > 0 {
                (ns - ns0) as f64 / runs as f64
            } else {
                f64::NAN
            },
        ))
    };
    let (runs, avg_ns) = average_ns("connect4", before[0])?;
    let (ops_runs, ops_ns) = average_ns("sock_ops", before[1])?;
    drop(stats);

    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratio = median(&on.requests_per_sec) / median(&off.requests_per_sec);
    let mut out = String::new();
    writeln!(
        out,
        "\ndataplane benchmark: medians of {rounds} alternating rounds; wrk -t1 -c{WRK_CONNECTIONS} \
         -d{seconds}s with a new connection per request; {CONNECTS_PER_ROUND} probe connects"
    )?;
    writeln!(
        out,
        "{:<24}{:>16}{:>34}{:>10}",
        "",
        "without agent",
        format!("with agent ({SERVICES_IN_MAP} svcs, share 0)"),
        "ratio"
    )?;
    for (name, a, b) in [
        ("requests/s", &off.requests_per_sec, &on.requests_per_sec),
        ("connect p50 (µs)", &off.connect_p50_us, &on.connect_p50_us),
        ("connect p99 (µs)", &off.connect_p99_us, &on.connect_p99_us),
    ] {
        let (a, b) = (median(a), median(b));
        writeln!(out, "{name:<24}{a:>16.1}{b:>34.1}{:>10.3}", b / a)?;
    }
    writeln!(
        out,
        "connect4 average run time: {avg_ns:.0} ns over {runs} runs; sock_ops {ops_ns:.0} ns over \
         {ops_runs} runs ({:.1} per connect4 run; no program runs at socket close) (kernel BPF \
         stats, on only for a wrk run of their own after the rounds)",
        ops_runs as f64 / runs.max(1) as f64
    )?;
    writeln!(
        out,
        "targets (issue 17): throughput ratio ≥ 0.99: {} ({ratio:.3}); connect4 ≤ 100 ns: {} \
         (with {SERVICES_IN_MAP} services; the map holds at most {}, so the issue's \
         100 000 cannot be loaded)",
        verdict(ratio >= 0.99),
        verdict(avg_ns <= 100.0),
        beamlit_common::MAX_SERVICES
    )?;
    print!("{out}");
    Ok(())
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn routes() -> String {
    let mut yaml = String::from("tunnel:\n  ipv4: 10.200.0.1:15001\nservices:\n");
    yaml.push_str(&format!("  - address: {SERVICE}\n    offloadPercent: 0\n"));
    for i in 1..SERVICES_IN_MAP {
        let _ = write!(
            yaml,
            "  - address: 10.97.{}.{}:80\n    offloadPercent: 0\n",
            i / 250,
            i % 250 + 1
        );
    }
    yaml
}

pub(crate) struct Wrk {
    pub url: String,
    pub seconds: u32,
    pub connections: u32,
    /// A new connection per request (measures connect), or keep-alive (measures requests).
    pub close: bool,
}

impl Wrk {
    fn new_connections(target: &str, seconds: u32) -> Self {
        Self {
            url: format!("http://{target}/"),
            seconds,
            connections: WRK_CONNECTIONS,
            close: true,
        }
    }
}

pub(crate) struct WrkResult {
    pub requests_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

pub(crate) fn wrk(ns: &Netns, cgroup: &Path, w: &Wrk) -> Result<WrkResult> {
    let mut cmd = ns.cmd("wrk");
    cmd.args([
        "-t1",
        &format!("-c{}", w.connections),
        &format!("-d{}s", w.seconds),
        "--latency",
    ]);
    if w.close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(&w.url);
    let out = run_in(Some(cgroup), cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if let Some(errors) = text
        .lines()
        .find(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
    {
        println!("[bench] wrk {}: {}", w.url, errors.trim());
    }
    let requests_per_sec = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let percentile = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(|v| parse_duration_us(v.trim()))
    };
    Ok(WrkResult {
        requests_per_sec,
        p50_us: percentile("50%").unwrap_or(f64::NAN),
        p99_us: percentile("99%").unwrap_or(f64::NAN),
    })
}

/// wrk's "123.45us", "1.23ms", "2.00s".
fn parse_duration_us(text: &str) -> Option<f64> {
    let (number, scale) = [("us", 1.0), ("ms", 1_000.0), ("s", 1_000_000.0)]
        .into_iter()
        .find_map(|(suffix, scale)| text.strip_suffix(suffix).map(|n| (n, scale)))?;
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// (run count, run time ns) of one of the agent's programs.
fn program_stats(agent: &AgentFixture, name: &str) -> Result<(u64, u64)> {
    let report = agent.inspect()?;
    let program = report["programs"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .with_context(|| format!("{name} not in inspect output"))?;
    Ok((
        program["run_count"].as_u64().unwrap_or(0),
        program["run_time_ns"].as_u64().unwrap_or(0),
    ))
}

/// BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): the kernel times programs while the returned fd is
/// open, without touching the machine-wide sysctl.
pub(crate) fn enable_bpf_stats() -> Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let mut attr = [0u64; 16];
    // SAFETY: attr is a zeroed bpf_attr; enable_stats.type = BPF_STATS_RUN_TIME (0).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Debian's nginx in a pod, with its own config, pid file and logs in a temp dir. One
/// process (`master_process off`): killing it leaves no orphaned worker holding the namespace.
pub(crate) struct Nginx {
    child: ChildGuard,
}

impl Nginx {
    /// `http_block`: the contents of nginx's `http {}` (servers, upstreams); `ready`: an
    /// address inside `ns` that answers once nginx is up.
    pub(crate) fn start(
        ns: &Netns,
        workdir: &Path,
        http_block: &str,
        ready: SocketAddr,
    ) -> Result<Self> {
        fs::create_dir_all(workdir)?;
        let conf = workdir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
                 error_log {dir}/error.log;\nevents {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n  \
                 fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
                 {http_block}\n}}\n",
                dir = workdir.display()
            ),
        )?;
        let mut cmd = ns.cmd("nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(workdir);
        let child = spawn(cmd, None)?;
        if answers_soon(ns, ready)? {
            return Ok(Self { child });
        }
        bail!("nginx did not start; see {}/error.log", workdir.display())
    }
}

impl Nginx {
    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// Whether `addr` accepts a TCP connection from inside `ns` within 5 s.
fn answers_soon(ns: &Netns, addr: SocketAddr) -> Result<bool> {
    for _ in 0..100 {
        let probe = ns
            .cmd("bash")
            .args([
                "-c",
                &format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()),
            ])
            .output()?;
        if probe.status.success() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(false)
}

/// Debian's HAProxy in a pod as an HTTP reverse proxy to one server (and, on `listen_tcp`, a raw
/// TCP proxy to the same server: `mode tcp`), in the foreground (`-db`),
/// with one thread (like the one nginx worker beside it: on two cores shared with the client
/// and the upstream, more threads only contend) and server-side connection reuse
/// (`http-reuse always`, so a client's new connection need not open a new one upstream).
pub(crate) struct Haproxy {
    child: ChildGuard,
}

impl Haproxy {
    pub(crate) fn start(
        ns: &Netns,
        workdir: &Path,
        listen: SocketAddr,
        listen_tcp: SocketAddr,
        server: SocketAddr,
        // Appended to the HTTP backend's server line (TLS to the server, say).
        server_options: &str,
    ) -> Result<Self> {
        fs::create_dir_all(workdir)?;
        let conf = workdir.join("haproxy.cfg");
        fs::write(
            &conf,
            format!(
                "global\n  nbthread 1\n  maxconn 4096\n  pidfile {dir}/haproxy.pid\n\
                 defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  \
                 timeout server 30s\n  http-reuse always\n\
                 frontend bench\n  bind {listen}\n  default_backend remote\n\
                 backend remote\n  server remote {server} {server_options}\n\
                 listen bench_tcp\n  mode tcp\n  bind {listen_tcp}\n  server remote {server}\n",
                dir = workdir.display()
            ),
        )?;
        let mut cmd = ns.cmd("haproxy");
        cmd.arg("-db").arg("-f").arg(&conf);
        let log = fs::File::create(workdir.join("haproxy.log"))?;
        cmd.stderr(log.try_clone()?).stdout(log);
        let child = spawn(cmd, None)?;
        if answers_soon(ns, listen)? && answers_soon(ns, listen_tcp)? {
            return Ok(Self { child });
        }
        bail!(
            "haproxy did not start; see {}/haproxy.log",
            workdir.display()
        )
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// CPU time (user + system, all threads) a process has used so far, in microseconds.
pub(crate) fn cpu_time_us(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5), i.e. 11 and 12 after the name.
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no field {i} in /proc/{pid}/stat"))
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) * 1e6 / per_second)
}

/// An nginx `server` answering 200 with a fixed body: the upstream of every benchmark.
pub(crate) fn static_server(listen: SocketAddr) -> String {
    format!(
        "  server {{\n    listen {listen} backlog=4096;\n    \
         location / {{ add_header X-Served-By nginx; return 200 \"nginx\\n\"; }}\n  }}\n"
    )
}
