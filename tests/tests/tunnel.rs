//! The egress tunnel in the real kernel: redirected connections are identified by the flow
//! `sock_ops` published, forwarded to the Service's remote backend, and anything the eBPF did not
//! redirect is refused.
//!
//! The agent runs in the host namespace (bpffs, cgroups) with its tunnel's sockets in the node
//! namespace (`--tunnel-netns`), listening on the node's pod-facing address 10.200.0.1:15001.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use beamlit_testbed::{
    AgentFixture, ChildGuard, Pod, ProbeOptions, TestCgroup, TestDir, Topology, finish_probe,
    require_privileges, run_probe, spawn_probe, start_server_multi,
};

const SVC4: &str = "10.96.0.10:80";

struct Bed {
    client: Pod,
    remote: Pod,
    cgroup: TestCgroup,
    node_netns: String,
    _servers: Vec<ChildGuard>,
    _topology: Topology,
}

impl Bed {
    fn new(hint: &str) -> Result<Self> {
        let mut topology = Topology::new(hint)?;
        let client = topology.add_pod("client")?;
        let local = topology.add_pod("local")?;
        let remote = topology.add_pod("remote")?;
        let servers = vec![
            start_server_multi(
                &local.netns,
                None,
                &[(local.ipv4, 8080).into()],
                "local",
                false,
            )?,
            start_server_multi(
                &remote.netns,
                None,
                &[(remote.ipv4, 9000).into()],
                "remote",
                false,
            )?,
        ];
        topology.add_service(SVC4.parse()?, (local.ipv4, 8080).into())?;
        Ok(Self {
            client,
            remote,
            cgroup: TestCgroup::new(hint)?,
            node_netns: format!("/var/run/netns/{}", topology.node().name()),
            _servers: servers,
            _topology: topology,
        })
    }

    fn routes(&self, percent: u32) -> String {
        format!(
            "tunnel:\n  ipv4: 10.200.0.1:15001\nservices:\n  - address: {SVC4}\n    \
             offloadPercent: {percent}\n    remote:\n      mode: tcp\n      host: {}:9000\n",
            self.remote.ipv4
        )
    }

    fn agent(&self, percent: u32) -> Result<AgentFixture> {
        AgentFixture::start(
            self.cgroup.path(),
            &self.routes(percent),
            &["--tunnel-netns", &self.node_netns],
        )
    }

    fn probe(&self, addr: &str, count: u64) -> Result<beamlit_testbed::ProbeReport> {
        let addr: SocketAddr = addr.parse()?;
        run_probe(
            &self.client.netns,
            Some(self.cgroup.path()),
            &ProbeOptions::new(addr, count),
        )
    }
}

#[test]
fn redirected_connections_reach_the_remote_through_the_tunnel() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tuntcp")?;
    let agent = bed.agent(100)?;
    // Ready only once the agent's own listener accepts; its heartbeat is fresh.
    assert_eq!(agent.service(SVC4)?["tunnel_ready"], true);
    let age = agent.inspect()?["tunnel_heartbeat_age_ms"].as_u64();
    assert!(age.is_some_and(|ms| ms < 500), "heartbeat age {age:?}");
    let r = bed.probe(SVC4, 200)?;
    assert_eq!((r.failed, r.count("remote")), (0, 200), "{r:?}");
    // Many at once: every accepted connection finds its own flow.
    let mut concurrent = ProbeOptions::new(SVC4.parse()?, 2000);
    concurrent.concurrency = Some(32);
    let r = run_probe(&bed.client.netns, Some(bed.cgroup.path()), &concurrent)?;
    assert_eq!((r.failed, r.count("remote")), (0, 2000), "{r:?}");
    Ok(())
}

#[test]
fn a_connection_the_ebpf_did_not_redirect_is_refused() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tunrefuse")?;
    let agent = bed.agent(100)?;
    // Dialling the tunnel directly: no flow, so no service and no credentials.
    let r = bed.probe("10.200.0.1:15001", 20)?;
    assert_eq!(
        r.ok, 0,
        "the tunnel served a connection it should refuse: {r:?}"
    );
    assert_eq!(r.failed, 20, "{r:?}");
    assert!(
        agent
            .log()
            .contains("refused a connection this node did not redirect"),
        "{}",
        agent.log()
    );
    // Redirected connections still work alongside.
    let r = bed.probe(SVC4, 20)?;
    assert_eq!(r.count("remote"), 20, "{r:?}");
    Ok(())
}

#[test]
fn when_the_tunnel_stops_new_connections_fail_open_to_the_local_path() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tunstop")?;
    let mut agent = bed.agent(100)?;
    let r = bed.probe(SVC4, 20)?;
    assert_eq!(r.count("remote"), 20, "{r:?}");
    // An invalid edit just before stopping: readiness is still cleared from the routes in force.
    agent.write_routes("services: [\n")?;
    agent.wait_log("keeping the last good routes", Duration::from_secs(5))?;
    agent.terminate(Duration::from_secs(5))?;
    // The agent cleared readiness before its tunnel went away; the pinned programs now let
    // connections through to the local backend instead of a closed port.
    assert_eq!(agent.service(SVC4)?["tunnel_ready"], false);
    let r = bed.probe(SVC4, 50)?;
    assert_eq!((r.failed, r.count("local")), (0, 50), "{r:?}");
    assert_eq!(agent.service(SVC4)?["fail_open"], 50);
    Ok(())
}

#[test]
fn a_killed_agents_tunnel_stops_receiving_connections_within_half_a_second() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tunkill")?;
    let mut agent = bed.agent(100)?;
    let r = bed.probe(SVC4, 20)?;
    assert_eq!(r.count("remote"), 20, "{r:?}");
    // SIGKILL: nobody clears the ready flag, but the tunnel's heartbeat stops.
    agent.kill9()?;
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        agent.service(SVC4)?["tunnel_ready"],
        true,
        "flag is stale by design"
    );
    let r = bed.probe(SVC4, 50)?;
    assert_eq!((r.failed, r.count("local")), (0, 50), "{r:?}");
    // A new agent adopts the pins, its tunnel beats again, and offloading resumes.
    agent.restart()?;
    std::thread::sleep(Duration::from_millis(200));
    let r = bed.probe(SVC4, 20)?;
    assert_eq!((r.failed, r.count("remote")), (0, 20), "{r:?}");
    Ok(())
}

/// Routes the tunnel does not serve (an external tunnel, never dialled), to make a map update
/// long: each is one more entry to read and rewrite.
fn filler_routes(count: u32, percent: u32) -> String {
    (0..count)
        .map(|i| {
            format!(
                "  - address: 10.97.{}.{}:80\n    offloadPercent: {percent}\n    tunnel: 10.200.0.1:15999\n",
                i / 250,
                i % 250 + 1
            )
        })
        .collect()
}

#[test]
fn a_service_removed_from_the_routes_is_served_until_the_maps_stop_redirecting_it() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tunorder")?;
    // Removals come after every upsert in a map update, so with 4000 fillers changing at the
    // same time SVC4 stays redirected for a while after the edit is read. The tunnel must keep
    // serving it for that whole while: dropping its route first (as the agent once did) resets
    // the connections that land in that window instead of serving them or failing open.
    const FILLERS: u32 = 4_000;
    let agent = AgentFixture::start(
        bed.cgroup.path(),
        &format!("{}{}", bed.routes(100), filler_routes(FILLERS, 100)),
        &["--tunnel-netns", &bed.node_netns],
    )?;
    let dir = TestDir::new("tunorder")?;
    let stop = dir.join("stop");
    let mut opts = ProbeOptions::new(SVC4.parse()?, 0);
    opts.until_file = Some(stop.clone());
    opts.timeout_ms = Some(2000);
    let probe = spawn_probe(&bed.client.netns, Some(bed.cgroup.path()), &opts)?;
    std::thread::sleep(Duration::from_millis(500));
    agent.write_routes(&format!(
        "tunnel:\n  ipv4: 10.200.0.1:15001\nservices:\n{}",
        filler_routes(FILLERS, 50)
    ))?;
    let edited = Instant::now();
    while agent.service(SVC4).is_ok() {
        if edited.elapsed() > Duration::from_secs(30) {
            bail!("{SVC4} still in the maps:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("{SVC4} left the maps {:?} after the edit", edited.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, "")?;
    let r = finish_probe(probe, Duration::from_secs(30))?;
    println!("{r:?}");
    // What the wrong order does: the listener closes under redirected connects (refused), or
    // the route goes while its connections arrive (reset by the tunnel, logged).
    let log = agent.log();
    assert!(
        !r.errors.iter().any(|e| e.contains("refused"))
            && !log.contains("without a remote backend")
            && !log.contains("refused a connection"),
        "connections refused or reset by the tunnel around the edit: {r:?}\n{log}"
    );
    // Not explained yet: about every other run, one connection in ~5500 sees a read reset
    // that the tunnel does not log; more than that is a regression.
    assert!(
        r.failed <= 1,
        "connections failed around the edit: {r:?}\n{log}"
    );
    assert!(r.count("remote") > 0 && r.count("local") > 0, "{r:?}");
    // The removal took effect: new connections go to the local backend.
    let r = bed.probe(SVC4, 20)?;
    assert_eq!((r.failed, r.count("local")), (0, 20), "{r:?}");
    Ok(())
}

#[test]
fn a_client_beyond_its_connection_cap_is_refused_while_other_clients_are_served() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    const SVC4B: &str = "10.96.0.11:80";
    let mut bed = Bed::new("tuncap")?;
    let other = bed._topology.add_pod("other")?;
    let routes = format!(
        "{}  - address: {SVC4B}\n    offloadPercent: 100\n    remote:\n      mode: tcp\n      \
         host: {}:9000\n",
        bed.routes(100),
        bed.remote.ipv4
    );
    let agent = AgentFixture::start(
        bed.cgroup.path(),
        &routes,
        &[
            "--tunnel-netns",
            &bed.node_netns,
            "--tunnel-max-connections-per-client",
            "4",
        ],
    )?;
    // The client holds 4 connections (each answered by the remote, then left open); a fifth,
    // even to the other model, is reset. While it holds them, another pod is served on both
    // models; once it lets go, it is served again.
    let script = r#"
import socket, time
def answer(addr):
    try:
        s = socket.create_connection(addr, timeout=5)
    except ConnectionResetError:
        # The tunnel's reset can arrive before connect() returns: refused all the same.
        return socket.socket(), "reset"
    except OSError as e:
        return socket.socket(), f"connect failed: {e}"
    try:
        return s, s.recv(100).decode().strip()
    except OSError:
        return s, "reset"
held = [answer(("10.96.0.10", 80)) for _ in range(4)]
print("HELD", " ".join(a for _, a in held))
s, a = answer(("10.96.0.11", 80))
print("FIFTH", a or "closed")
s.close()
print("HOLDING", flush=True)
time.sleep(4)
for s, _ in held:
    s.close()
time.sleep(0.3)
s, a = answer(("10.96.0.11", 80))
print("AFTER", a)
"#;
    let mut cmd = bed.client.netns.cmd("python3");
    cmd.args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let held = beamlit_testbed::spawn(cmd, Some(bed.cgroup.path()))?;
    std::thread::sleep(Duration::from_millis(1500));
    for svc in [SVC4, SVC4B] {
        let r = run_probe(
            &other.netns,
            Some(bed.cgroup.path()),
            &ProbeOptions::new(svc.parse()?, 20),
        )?;
        assert_eq!((r.failed, r.count("remote")), (0, 20), "{svc}: {r:?}");
    }
    let out = held.wait_with_output_timeout(Duration::from_secs(20))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    let line = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(str::to_string)
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        line("HELD").as_deref(),
        Some("remote remote remote remote"),
        "{stdout}{stderr}"
    );
    let fifth = line("FIFTH").unwrap_or_default();
    assert!(
        fifth == "reset" || fifth == "closed",
        "the fifth connection was served: {stdout}{stderr}"
    );
    assert_eq!(line("AFTER").as_deref(), Some("remote"), "{stdout}");
    assert!(
        agent
            .log()
            .contains("the client holds the most connections allowed per client"),
        "{}",
        agent.log()
    );
    Ok(())
}
