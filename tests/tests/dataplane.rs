//! The eBPF redirect data plane in the real kernel.
//!
//! Layout (every address lives in namespaces the test makes; programs attach to a test cgroup):
//! - a client pod (in the test cgroup) dials the Service addresses 10.96.0.10:80 and
//!   [fd00:96::10]:80;
//! - the node namespace DNATs them to a backend pod answering "local" (as kube-proxy would);
//! - a stand-in tunnel on the node's pod-facing address (10.200.0.1:15001, [fd00:200::1]:15001)
//!   answers "tunnel". A connection that reached "tunnel" was redirected by the agent.
use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use beamlit_testbed::{
    AgentFixture, ChildGuard, Pod, ProbeOptions, TestCgroup, Topology, finish_probe,
    require_privileges, run_probe, spawn_probe, start_server_multi,
};

const SVC4: &str = "10.96.0.10:80";
const SVC6: &str = "[fd00:96::10]:80";
const BYPASS_MARK: u32 = 0xbe;

struct Bed {
    client: Pod,
    cgroup: TestCgroup,
    _servers: Vec<ChildGuard>,
    // Dropped last: pods and node go after the processes inside them.
    _topology: Topology,
}

impl Bed {
    fn new(hint: &str) -> Result<Self> {
        let mut topology = Topology::new(hint)?;
        let client = topology.add_pod("client")?;
        let backend = topology.add_pod("backend")?;
        let local: Vec<SocketAddr> = vec![(backend.ipv4, 8080).into(), (backend.ipv6, 8080).into()];
        let tunnel: Vec<SocketAddr> = vec![
            (Topology::NODE_V4, 15001).into(),
            (Topology::NODE_V6, 15001).into(),
        ];
        let servers = vec![
            start_server_multi(&backend.netns, None, &local, "local", false)?,
            start_server_multi(topology.node(), None, &tunnel, "tunnel", false)?,
        ];
        topology.add_service(SVC4.parse()?, local[0])?;
        topology.add_service(SVC6.parse()?, local[1])?;
        let cgroup = TestCgroup::new(hint)?;
        Ok(Self {
            client,
            cgroup,
            _servers: servers,
            _topology: topology,
        })
    }

    fn probe(&self, opts: &ProbeOptions) -> Result<beamlit_testbed::ProbeReport> {
        run_probe(&self.client.netns, Some(self.cgroup.path()), opts)
    }

    fn agent(&self, v4_percent: f64, v6_percent: f64, extra: &[&str]) -> Result<AgentFixture> {
        AgentFixture::start(self.cgroup.path(), &routes(v4_percent, v6_percent), extra)
    }
}

fn routes(v4_percent: f64, v6_percent: f64) -> String {
    format!(
        "tunnel:\n  ipv4: 10.200.0.1:15001\n  ipv6: \"[fd00:200::1]:15001\"\nservices:\n  \
         - address: {SVC4}\n    offloadPercent: {v4_percent}\n  \
         - address: \"{SVC6}\"\n    offloadPercent: {v6_percent}\n"
    )
}

fn opts(addr: &str, count: u64) -> ProbeOptions {
    ProbeOptions::new(addr.parse().expect("test address"), count)
}

fn counter(agent: &AgentFixture, service: &str, name: &str) -> u64 {
    agent.service(service).expect("service in maps")[name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} missing"))
}

#[test]
fn share_decides_the_route_of_new_connections() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("share")?;
    let agent = bed.agent(0.0, 0.0, &[])?;

    let r = bed.probe(&opts(SVC4, 200))?;
    assert_eq!((r.failed, r.count("local")), (0, 200), "share 0: {r:?}");

    agent.write_routes(&routes(100.0, 0.0))?;
    agent.wait_share(SVC4, 10_000, Duration::from_secs(5))?;
    let r = bed.probe(&opts(SVC4, 200))?;
    assert_eq!((r.failed, r.count("tunnel")), (0, 200), "share 100: {r:?}");

    agent.write_routes(&routes(30.0, 0.0))?;
    agent.wait_share(SVC4, 3_000, Duration::from_secs(5))?;
    let before = counter(&agent, SVC4, "redirected");
    let r = bed.probe(&opts(SVC4, 2000))?;
    let tunnel = r.count("tunnel");
    assert_eq!(r.failed, 0, "{r:?}");
    assert_eq!(tunnel + r.count("local"), 2000);
    let percent = tunnel as f64 / 20.0;
    println!("share 30%: {tunnel} of 2000 connections redirected ({percent:.1}%)");
    assert!((25.0..=35.0).contains(&percent), "{percent}% redirected");
    // The eBPF counters saw exactly what the client saw.
    assert_eq!(counter(&agent, SVC4, "redirected") - before, tunnel);
    Ok(())
}

#[test]
fn redirected_socket_reports_the_service_address() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("peer")?;
    let _agent = bed.agent(100.0, 100.0, &[])?;
    for svc in [SVC4, SVC6] {
        let mut o = opts(svc, 100);
        o.check_peer = true;
        let r = bed.probe(&o)?;
        // Reached the tunnel, yet getpeername() says the Service.
        assert_eq!(r.count("tunnel"), 100, "{svc}: {r:?}");
        assert_eq!(r.peer_mismatch, 0, "{svc}: {r:?}");
    }
    Ok(())
}

#[test]
fn dual_stack_socket_dialling_an_ipv4_service_is_redirected() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("mapped")?;
    let _agent = bed.agent(100.0, 0.0, &[])?;
    // An AF_INET6 socket to ::ffff:10.96.0.10 goes through connect6, not connect4.
    let mut o = opts("[::ffff:10.96.0.10]:80", 100);
    o.check_peer = true;
    let r = bed.probe(&o)?;
    assert_eq!((r.failed, r.count("tunnel")), (0, 100), "{r:?}");
    assert_eq!(
        r.peer_mismatch, 0,
        "getpeername must return the mapped address: {r:?}"
    );
    Ok(())
}

#[test]
fn ipv6_service_is_redirected() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("ipv6")?;
    let agent = bed.agent(0.0, 100.0, &[])?;
    let r = bed.probe(&opts(SVC6, 200))?;
    assert_eq!((r.failed, r.count("tunnel")), (0, 200), "{r:?}");
    // The IPv4 Service at share 0 is untouched meanwhile.
    let r = bed.probe(&opts(SVC4, 50))?;
    assert_eq!(r.count("local"), 50, "{r:?}");
    agent.write_routes(&routes(0.0, 0.0))?;
    agent.wait_share(SVC6, 0, Duration::from_secs(5))?;
    let r = bed.probe(&opts(SVC6, 100))?;
    assert_eq!((r.failed, r.count("local")), (0, 100), "{r:?}");
    Ok(())
}

#[test]
fn redirection_never_stops_across_sigkill_and_restart() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("restart")?;
    let mut agent = bed.agent(100.0, 100.0, &[])?;
    let stop = std::env::temp_dir().join(format!("beamlit-test-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let mut o = opts(SVC4, 0);
    o.until_file = Some(stop.clone());
    o.interval_ms = Some(2);
    let probe = spawn_probe(&bed.client.netns, Some(bed.cgroup.path()), &o)?;

    std::thread::sleep(Duration::from_millis(300));
    agent.kill9()?;
    // No agent at all: the pinned links and maps keep redirecting, and inspect reads the pins.
    let row = agent.service(SVC4)?;
    assert_eq!(row["share_bp"], 10_000, "{row}");
    assert!(row["redirected"].as_u64() > Some(0), "{row}");
    std::thread::sleep(Duration::from_millis(500));
    agent.restart()?;
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&stop, b"")?;
    let r = finish_probe(probe, Duration::from_secs(10))?;
    let _ = std::fs::remove_file(&stop);

    println!("during kill and restart: {r:?}");
    assert!(r.attempts > 100, "too few attempts to mean anything: {r:?}");
    assert_eq!(r.failed, 0, "{r:?}");
    assert_eq!(
        r.count("tunnel"),
        r.attempts,
        "some connection was not redirected: {r:?}"
    );
    let log = agent.log();
    assert!(
        log.contains("adopted pinned link"),
        "restart did not adopt:\n{log}"
    );
    assert!(
        !log.contains("attached program"),
        "restart re-attached:\n{log}"
    );
    Ok(())
}

/// Agents before socket-local storage kept each redirected socket's destination in a
/// cookie-keyed map (`sockets`) and ran `sock_release` on every socket close to delete it. An
/// agent started over such pins removes both once its own programs are in place, and then
/// redirects (and reports the dialled address to getpeername) with no program on socket close.
#[test]
fn an_agent_started_over_an_earlier_versions_pins_removes_them_and_redirects() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("retired")?;
    let mut agent = bed.agent(100.0, 0.0, &[])?;
    agent.terminate(Duration::from_secs(10))?;
    // Stand-ins for the earlier version's pins: any pinned object at those paths.
    let retired = [
        agent.bpffs().join("sockets"),
        agent.bpffs().join("links").join("sock_release"),
    ];
    for pin in &retired {
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(pin)
            .args([
                "type", "hash", "key", "8", "value", "20", "entries", "16", "name", "retired",
            ])
            .output()?;
        assert!(
            out.status.success(),
            "bpftool map create {}: {out:?}",
            pin.display()
        );
    }
    agent.restart()?;
    agent.wait_log(
        "removed a pin of an earlier agent version",
        Duration::from_secs(10),
    )?;
    for pin in &retired {
        assert!(
            !pin.exists(),
            "{} still pinned:\n{}",
            pin.display(),
            agent.log()
        );
    }
    let programs = agent.inspect()?["programs"].clone();
    let names: Vec<&str> = programs
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(!names.is_empty(), "inspect lists no program: {programs}");
    assert!(!names.contains(&"sock_release"), "{names:?}");
    // Many short connections: every one redirected, each socket's record created at connect
    // and freed by the kernel with the socket.
    let mut o = opts(SVC4, 5_000);
    o.concurrency = Some(4);
    o.check_peer = true;
    let r = bed.probe(&o)?;
    assert_eq!(r.count("tunnel"), 5_000, "{r:?}");
    assert_eq!(
        r.peer_mismatch, 0,
        "getpeername must return the Service: {r:?}"
    );
    Ok(())
}

#[test]
fn the_agents_own_sockets_are_never_redirected() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("bypass")?;
    let agent = bed.agent(100.0, 100.0, &[])?;
    for svc in [SVC4, SVC6] {
        let mut o = opts(svc, 100);
        o.mark = Some(BYPASS_MARK);
        let r = bed.probe(&o)?;
        assert_eq!((r.failed, r.count("local")), (0, 100), "{svc}: {r:?}");
        assert_eq!(counter(&agent, svc, "bypassed"), 100);
        // Another mark is an ordinary client.
        o.mark = Some(BYPASS_MARK + 1);
        let r = bed.probe(&o)?;
        assert_eq!(r.count("tunnel"), 100, "{svc}: {r:?}");
    }
    Ok(())
}

#[test]
fn invalid_routes_are_rejected_and_the_last_good_ones_stay() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("invalid")?;
    let mut agent = bed.agent(100.0, 0.0, &[])?;
    agent.write_routes(&routes(150.0, 0.0))?;
    agent.wait_log("keeping the last good routes", Duration::from_secs(5))?;
    let log = agent.log();
    assert!(
        log.contains("services[0].offloadPercent") && log.contains("line 6"),
        "error does not name the field and line:\n{log}"
    );
    let r = bed.probe(&opts(SVC4, 100))?;
    assert_eq!(r.count("tunnel"), 100, "previous routes lost: {r:?}");
    assert_eq!(agent.service(SVC4)?["share_bp"], 10_000);

    // `check` says the same, with a non-zero exit.
    let out = std::process::Command::new(beamlit_testbed::agent_bin())
        .args(["check", "--routes"])
        .arg(agent.routes_path())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("0 to 100"), "{stderr}");

    // A restart with the bad file refuses to start and changes nothing.
    let restart = agent.restart();
    assert!(restart.is_err(), "agent started with an invalid file");
    assert!(agent.log().contains("not starting"), "{}", agent.log());
    let r = bed.probe(&opts(SVC4, 100))?;
    assert_eq!(r.count("tunnel"), 100, "{r:?}");
    Ok(())
}

#[test]
fn bpftool_and_inspect_show_the_maps_in_human_terms() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("debug")?;
    let agent = bed.agent(30.0, 100.0, &[])?;
    let r = bed.probe(&opts(SVC4, 300))?;
    assert_eq!(r.failed, 0);

    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(agent.bpffs().join("services"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let entries = dump.as_array().expect("bpftool prints an array");
    assert_eq!(entries.len(), 2, "{dump}");
    // With -j, bpftool prints raw bytes under key/value and the BTF view under "formatted".
    let v4 = &entries
        .iter()
        .find(|e| e["formatted"]["key"]["family"] == 4)
        .unwrap_or_else(|| panic!("no BTF-formatted IPv4 entry: {dump}"))["formatted"];
    // Field names from BTF, readable values.
    assert_eq!(v4["key"]["port"], 80, "{v4}");
    assert_eq!(
        v4["key"]["addr"],
        serde_json::json!([10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        "{v4}"
    );
    assert_eq!(v4["value"]["share_bp"], 3000, "{v4}");
    assert_eq!(v4["value"]["tunnel_port"], 15001, "{v4}");

    let row = agent.service(SVC4)?;
    assert_eq!(
        row["local"].as_u64().unwrap_or(0) + row["redirected"].as_u64().unwrap_or(0),
        300,
        "{row}"
    );
    assert_eq!(row["redirected"].as_u64(), Some(r.count("tunnel")), "{row}");
    assert_eq!(row["tunnel"], "10.200.0.1:15001");

    let table = std::process::Command::new(beamlit_testbed::agent_bin())
        .arg("--bpffs")
        .arg(agent.bpffs())
        .arg("inspect")
        .output()?;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("SERVICE") && table.contains("REDIRECTED"),
        "{table}"
    );
    assert!(
        table.contains("10.96.0.10:80") && table.contains("30.00%"),
        "{table}"
    );
    Ok(())
}

#[test]
fn ebpf_log_messages_reach_the_agent_log() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("logs")?;
    let mut agent = bed.agent(100.0, 0.0, &["--ebpf-log-level", "debug"])?;
    let r = bed.probe(&opts(SVC4, 3))?;
    assert_eq!(r.count("tunnel"), 3);
    agent.wait_log("redirected a socket", Duration::from_secs(5))?;
    drop(agent);

    // Off (the default): nothing is logged from eBPF.
    let quiet = bed.agent(100.0, 0.0, &[])?;
    let r = bed.probe(&opts(SVC4, 3))?;
    assert_eq!(r.count("tunnel"), 3);
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !quiet.log().contains("redirected a socket"),
        "{}",
        quiet.log()
    );
    Ok(())
}
