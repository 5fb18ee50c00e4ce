//! The egress tunnel in the real kernel: redirected connections are identified by the flow
//! `sock_ops` published, forwarded to the Service's remote backend, and anything the eBPF did not
//! redirect is refused.
//!
//! The agent runs in the host namespace (bpffs, cgroups) with its tunnel's sockets in the node
//! namespace (`--tunnel-netns`), listening on the node's pod-facing address 10.200.0.1:15001.
use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use beamlit_testbed::{
    AgentFixture, ChildGuard, Pod, ProbeOptions, TestCgroup, Topology, require_privileges,
    run_probe, start_server_multi,
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
