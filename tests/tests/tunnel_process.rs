//! The tunnel in a process of its own, as the agent pod's unprivileged container runs it:
//! `beamlit-agent tunnel` as uid/gid 65532 with no capability at all (`setpriv`), in the node's
//! network namespace, driven by `beamlit-agent run --tunnel-socket` (root, the eBPF part) over
//! a unix socket, which answers its questions about each accepted connection's flow. Clients
//! are curl in a pod namespace inside the test cgroup.
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use beamlit_testbed::{
    AgentFixture, FakeBeamlit, FakeBeamlitOptions, TUNNEL_UID, TestCgroup, TestDir, Topology,
    require_privileges, run_in, start_server_multi, start_tunnel_process,
};

const SVC: &str = "10.96.0.10:80";
const TUNNEL: &str = "10.200.0.1:15001";
const CLIENT_SECRET: &str = "s3cret-split";

fn status_field(pid: u32, field: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if ok()? {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{what}: not after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_unprivileged_tunnel_process_serves_redirected_connections_only() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let mut topology = Topology::new("tproc")?;
    let client = topology.add_pod("client")?;
    let local = topology.add_pod("local")?;
    let remote = topology.add_pod("remote")?;
    let _local = start_server_multi(
        &local.netns,
        None,
        &[(local.ipv4, 8080).into()],
        "local",
        true,
    )?;
    topology.add_service(SVC.parse()?, (local.ipv4, 8080).into())?;
    let fake = FakeBeamlit::start(
        &remote.netns,
        FakeBeamlitOptions {
            https: vec![(remote.ipv4, 8443).into()],
            client_id: "agent-test".into(),
            client_secret: CLIENT_SECRET.into(),
            require_token: true,
            ..FakeBeamlitOptions::default()
        },
    )?;
    let cgroup = TestCgroup::new("tproc")?;
    let dir = TestDir::new("tproc")?;
    std::fs::write(dir.join("client-secret"), CLIENT_SECRET)?;
    // The pod's shared volume: writable by the tunnel's user.
    let volume = dir.join("tunnel");
    std::fs::create_dir_all(&volume)?;
    std::fs::set_permissions(&volume, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let socket = volume.join("control.sock");
    let log = dir.join("tunnel.log");
    let node = topology.node().name().to_string();
    let tunnel_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let remote_addr = format!("{}:8443", remote.ipv4);
    let routes = format!(
        "tunnel:\n  ipv4: {TUNNEL}\nservices:\n  - address: {SVC}\n    offloadPercent: 100\n    \
         remote:\n      scheme: https\n      host: \"{remote_addr}\"\n      pathPrefix: /$workspace/models/$model\n      \
         workspace: ws\n      model: php-apache\n      auth:\n        oauth:\n          \
         tokenUrl: \"https://{remote_addr}/oauth/token\"\n          clientId: agent-test\n          \
         clientSecretFile: {secret}\n",
        secret = dir.join("client-secret").display(),
    );
    let socket_arg = socket.display().to_string();
    // The agent first, with no tunnel process yet: its service fails open to the local pod.
    let agent = AgentFixture::start(cgroup.path(), &routes, &["--tunnel-socket", &socket_arg])?;
    let curl = |url: &str| -> Result<(Option<i32>, String)> {
        let mut cmd = client.netns.cmd("curl");
        cmd.args(["-sS", "--max-time", "10", url]);
        let out = run_in(Some(cgroup.path()), cmd)?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let served_remotely = || -> Result<bool> {
        let (code, body) = curl(&format!("http://{SVC}/predict"))?;
        Ok(code == Some(0) && body.contains("/ws/models/php-apache/predict"))
    };
    ensure!(
        curl(&format!("http://{SVC}/"))?.1.contains("local"),
        "without a tunnel process the service must fail open to the local pod"
    );

    let ca = fake.ca_pem().display().to_string();
    let mut tunnel = start_tunnel_process(&node, &socket, &["--ca-file", &ca], &log)?;
    let pid = tunnel.pid();
    // What the kernel says the tunnel process may do.
    ensure!(
        status_field(pid, "Name")? == "beamlit-agent",
        "pid {pid} is not the tunnel"
    );
    let uid = status_field(pid, "Uid")?;
    ensure!(
        uid.split_whitespace().all(|u| u == TUNNEL_UID.to_string()),
        "Uid {uid}"
    );
    for field in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        let caps = status_field(pid, field)?;
        ensure!(
            u64::from_str_radix(&caps, 16)? == 0,
            "{field} {caps}: the tunnel process holds capabilities"
        );
    }
    ensure!(status_field(pid, "NoNewPrivs")? == "1", "no_new_privs off");

    // The agent finds it (it tries again every second) and the route turns ready: redirected by
    // the agent's eBPF, served by the unprivileged process, with prefix and token.
    wait_for(
        "requests served through the tunnel process",
        Duration::from_secs(10),
        served_remotely,
    )
    .with_context(|| format!("agent:\n{}\ntunnel:\n{}", agent.log(), tunnel_log()))?;
    // It holds no BPF object: the agent answers its flow questions (under the runtime's
    // default seccomp profile an unprivileged container has no bpf() at all).
    let bpf_fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .filter(|t| t.contains("bpf"))
        .collect();
    ensure!(bpf_fds.is_empty(), "the tunnel process holds {bpf_fds:?}");
    let (_, body) = curl(&format!("http://{SVC}/predict"))?;
    let echo: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("not the fake's echo: {body}"))?;
    ensure!(echo["headers"]["authorization"] == "Bearer tok-1", "{echo}");
    ensure!(
        !tunnel_log().contains(CLIENT_SECRET) && !agent.log().contains(CLIENT_SECRET),
        "the client secret in a log"
    );

    // Dialled directly (no redirect, so no flow): refused, and said.
    let (code, _) = curl(&format!("http://{TUNNEL}/predict"))?;
    ensure!(code != Some(0), "a direct dial of the tunnel was served");
    wait_for("the refusal logged", Duration::from_secs(5), || {
        Ok(tunnel_log().contains("refused a connection this node did not redirect"))
    })?;

    // The tunnel process gone: its beats stop, so new connections fail open to the local pod.
    tunnel.kill()?;
    let _ = tunnel.wait_timeout(Duration::from_secs(5));
    wait_for(
        "connections fail open once the tunnel's heartbeat is stale",
        Duration::from_secs(5),
        || Ok(curl(&format!("http://{SVC}/"))?.1.contains("local")),
    )?;
    // A new tunnel process (a restarted container): the agent connects again by itself.
    let mut tunnel = start_tunnel_process(&node, &socket, &["--ca-file", &ca], &log)?;
    wait_for(
        "requests served by the restarted tunnel process",
        Duration::from_secs(10),
        served_remotely,
    )
    .with_context(|| format!("agent:\n{}", agent.log()))?;
    // SIGTERM, as the kubelet stops the container: the tunnel is its container's PID 1 here,
    // so without a handler it would wait for the grace period's SIGKILL. It exits by itself,
    // at the latest once the agent has had its 2 s to take the services off it.
    tunnel.signal(libc::SIGTERM)?;
    let status = tunnel.wait_timeout(Duration::from_secs(8))?;
    ensure!(
        status.is_some_and(|s| s.success()),
        "the tunnel process did not exit on SIGTERM within 8 s: {status:?}\n{}",
        tunnel_log()
    );
    Ok(())
}
