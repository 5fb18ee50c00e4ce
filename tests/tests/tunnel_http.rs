//! The egress tunnel's HTTP mode against the fake Beamlit (HTTPS with a test CA, OAuth client
//! credentials, echo, SSE, upload). Clients are curl and netprobe in a pod namespace, inside the
//! test cgroup; every address lives in namespaces the test made.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use beamlit_testbed::{
    AgentFixture, ChildGuard, FakeBeamlit, FakeBeamlitOptions, Pod, ProbeOptions, TestCa,
    TestCgroup, TestDir, Topology, netprobe_bin, require_privileges, run_in, run_probe, spawn,
    start_server_multi,
};

const SVC: &str = "10.96.0.10:80";
const CLIENT_SECRET: &str = "s3cret-never-logged";

struct Bed {
    client: Pod,
    cgroup: TestCgroup,
    fake: FakeBeamlit,
    dir: TestDir,
    node_netns: String,
    remote_ip: std::net::Ipv4Addr,
    remote_netns: std::sync::Arc<beamlit_testbed::Netns>,
    local_ip: std::net::Ipv4Addr,
    _local: ChildGuard,
    topology: Topology,
}

impl Bed {
    fn new(hint: &str, token_ttl: Duration) -> Result<Self> {
        let mut topology = Topology::new(hint)?;
        let client = topology.add_pod("client")?;
        let local = topology.add_pod("local")?;
        let remote = topology.add_pod("remote")?;
        let local_server = start_server_multi(
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
                http: vec![(remote.ipv4, 8080).into()],
                client_id: "agent-test".into(),
                client_secret: CLIENT_SECRET.into(),
                token_ttl,
                require_token: true,
                ..FakeBeamlitOptions::default()
            },
        )?;
        let dir = TestDir::new(hint)?;
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET)?;
        Ok(Self {
            client,
            cgroup: TestCgroup::new(hint)?,
            fake,
            node_netns: format!("/var/run/netns/{}", topology.node().name()),
            remote_ip: remote.ipv4,
            remote_netns: remote.netns.clone(),
            local_ip: local.ipv4,
            dir,
            _local: local_server,
            topology,
        })
    }

    fn routes(&self, ca: &std::path::Path) -> String {
        self.routes_to(ca, "https", 8443)
    }

    /// Routes to the fake's `scheme` listener on `port`; the token endpoint stays on HTTPS.
    fn routes_to(&self, ca: &std::path::Path, scheme: &str, port: u16) -> String {
        let remote = format!("{}:{port}", self.remote_ip);
        let token_host = format!("{}:8443", self.remote_ip);
        format!(
            "tunnel:\n  ipv4: 10.200.0.1:15001\n  caFile: {ca}\nservices:\n  - address: {SVC}\n    \
             offloadPercent: 100\n    remote:\n      scheme: {scheme}\n      host: \"{remote}\"\n      \
             pathPrefix: /$workspace/models/$model\n      workspace: ws\n      model: php-apache\n      \
             headersToAdd: {{X-Beamlit-Environment: production}}\n      connectTimeoutMs: 1000\n      \
             auth:\n        oauth:\n          tokenUrl: \"https://{token_host}/oauth/token\"\n          \
             clientId: agent-test\n          clientSecretFile: {secret}\n",
            ca = ca.display(),
            secret = self.dir.join("client-secret").display(),
        )
    }

    fn agent(&self, extra: &[&str]) -> Result<AgentFixture> {
        self.agent_to(Remote::Https, extra)
    }

    /// An agent whose Service goes to the fake's HTTPS or plain-HTTP listener.
    fn agent_to(&self, remote: Remote, extra: &[&str]) -> Result<AgentFixture> {
        let mut args = vec!["--tunnel-netns", self.node_netns.as_str()];
        args.extend_from_slice(extra);
        let (scheme, port) = remote.scheme_port();
        let routes = self.routes_to(self.fake.ca_pem(), scheme, port);
        AgentFixture::start(self.cgroup.path(), &routes, &args)
    }

    /// curl from the client pod, in the test cgroup (so the eBPF programs apply).
    fn curl(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.client.netns.cmd("curl");
        cmd.args(["-sS", "--max-time", "30"]).args(args);
        run_in(Some(self.cgroup.path()), cmd)
    }

    fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let out = self.curl(&[&format!("http://{SVC}{path}")])?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "not JSON: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

/// The fake's two HTTP listeners: HTTPS goes through hyper's pooled client (HTTP/2 by ALPN),
/// plain HTTP through the client connection's own HTTP/1.1 connection (`tunnel::h1`).
#[derive(Debug, Clone, Copy)]
enum Remote {
    Https,
    Http,
}

impl Remote {
    fn scheme_port(self) -> (&'static str, u16) {
        match self {
            Remote::Https => ("https", 8443),
            Remote::Http => ("http", 8080),
        }
    }
}

/// (status, body, elapsed) of one request through the Service address.
fn status_of(bed: &Bed, path: &str) -> Result<(u16, String, Duration)> {
    let started = Instant::now();
    let out = bed.curl(&["-w", "\n%{http_code}", &format!("http://{SVC}{path}")])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').context("no status line")?;
    Ok((code.trim().parse()?, body.to_string(), started.elapsed()))
}

#[test]
fn requests_arrive_with_prefix_headers_host_and_token() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("thttp", Duration::from_secs(3600))?;
    let agent = bed.agent(&[])?;
    // HTTP/2 to the remote, chosen by ALPN.
    assert_forwarded_as_configured(&bed, &agent, Remote::Https, "HTTP/2")
}

/// One request through the Service: path prefix, added headers, token, `X-Forwarded-*`, and the
/// remote's own authority (not the Service's), in the protocol `version`.
fn assert_forwarded_as_configured(
    bed: &Bed,
    agent: &AgentFixture,
    remote: Remote,
    version: &str,
) -> Result<()> {
    let echo = bed.get_json("/predict?x=1")?;
    assert_eq!(echo["path"], "/ws/models/php-apache/predict?x=1", "{echo}");
    let headers = &echo["headers"];
    assert_eq!(headers["x-beamlit-environment"], "production", "{echo}");
    assert_eq!(headers["authorization"], "Bearer tok-1", "{echo}");
    assert_eq!(
        headers["x-forwarded-for"],
        bed.client.ipv4.to_string(),
        "{echo}"
    );
    assert_eq!(headers["x-forwarded-proto"], "http", "{echo}");
    // What the client sent as Host (curl omits the default port).
    assert_eq!(headers["x-forwarded-host"], "10.96.0.10", "{echo}");
    assert_eq!(echo["version"], version, "{echo}");
    let (_, port) = remote.scheme_port();
    assert_eq!(
        echo["authority"],
        format!("{}:{port}", bed.remote_ip),
        "{echo}"
    );
    assert!(
        !agent.log().contains(CLIENT_SECRET),
        "secret in the agent log"
    );
    Ok(())
}

#[test]
fn many_requests_share_one_token() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("ttoken", Duration::from_secs(3600))?;
    let _agent = bed.agent(&[])?;
    let mut opts = ProbeOptions::new(SVC.parse()?, 1000);
    opts.http = true;
    opts.concurrency = Some(8);
    let r = run_probe(&bed.client.netns, Some(bed.cgroup.path()), &opts)?;
    assert_eq!((r.failed, r.count("beamlit")), (0, 1000), "{r:?}");
    assert_eq!(bed.fake.stats()?.token_requests, 1);
    Ok(())
}

#[test]
fn short_lived_tokens_are_refreshed_before_they_expire() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("trefresh", Duration::from_secs(2))?;
    let _agent = bed.agent(&[])?;
    let started = Instant::now();
    let mut opts = ProbeOptions::new(SVC.parse()?, 1);
    opts.http = true;
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let r = run_probe(&bed.client.netns, Some(bed.cgroup.path()), &opts)?;
        assert_eq!(r.count("beamlit"), 1, "request {sent} failed: {r:?}");
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let tokens = bed.fake.stats()?.token_requests;
    println!("{sent} requests over 5 s with 2 s tokens: {tokens} token requests");
    assert!((2..=5).contains(&tokens), "{tokens} token requests");
    Ok(())
}

#[test]
fn server_sent_events_stream_as_they_are_produced() -> Result<()> {
    server_sent_events_stream(Remote::Https, "tsse")
}

#[test]
fn server_sent_events_stream_from_a_plain_http_remote() -> Result<()> {
    server_sent_events_stream(Remote::Http, "tssep")
}

fn server_sent_events_stream(remote: Remote, hint: &str) -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new(hint, Duration::from_secs(3600))?;
    let _agent = bed.agent_to(remote, &[])?;
    let mut cmd = bed.client.netns.cmd("curl");
    cmd.args(["-sSN", "--max-time", "10", &format!("http://{SVC}/sse")])
        .stdout(Stdio::piped());
    let started = Instant::now();
    let mut curl = spawn(cmd, Some(bed.cgroup.path()))?;
    let stdout = curl.take_stdout().context("curl stdout")?;
    let mut first = None;
    let mut events = 0;
    for line in BufReader::new(stdout).lines() {
        if line?.starts_with("data:") {
            events += 1;
            first.get_or_insert(started.elapsed());
        }
    }
    let total = started.elapsed();
    let first = first.context("no event arrived")?;
    println!(
        "{remote:?}: first SSE event after {first:?}, stream of {events} events took {total:?}"
    );
    assert_eq!(events, 10);
    // The fake sends one event every 100 ms: buffering would deliver everything at the end.
    assert!(
        first + Duration::from_millis(600) < total,
        "first {first:?}, total {total:?}"
    );
    Ok(())
}

#[test]
fn a_100_mb_upload_streams_with_bounded_memory() -> Result<()> {
    upload_streams(Remote::Https, "tupload")
}

#[test]
fn a_100_mb_upload_streams_to_a_plain_http_remote() -> Result<()> {
    upload_streams(Remote::Http, "tuploadp")
}

fn upload_streams(remote: Remote, hint: &str) -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new(hint, Duration::from_secs(3600))?;
    let mut agent = bed.agent_to(remote, &[])?;
    let file = bed.dir.join("upload.bin");
    let size: u64 = 100 * 1024 * 1024;
    std::fs::File::create(&file)?.set_len(size)?;
    let out = bed.curl(&[
        "--data-binary",
        &format!("@{}", file.display()),
        "-H",
        "Content-Type: application/octet-stream",
        &format!("http://{SVC}/upload"),
    ])?;
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
    assert_eq!(answer["bytes"], size, "{answer}");
    // A client that streams with chunked transfer encoding (no Content-Length).
    let chunked = bed.dir.join("chunked.bin");
    std::fs::File::create(&chunked)?.set_len(10 * 1024 * 1024)?;
    let out = bed.curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", chunked.display()),
        &format!("http://{SVC}/upload"),
    ])?;
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
    assert_eq!(answer["bytes"], 10 * 1024 * 1024, "{answer}");
    let peak = agent.peak_rss_kib()?;
    println!(
        "{remote:?}: agent peak RSS after a 100 MB upload: {} MiB",
        peak / 1024
    );
    assert!(
        peak < 64 * 1024,
        "agent peak RSS {peak} KiB: the body was buffered"
    );
    Ok(())
}

#[test]
fn remote_down_gives_a_fast_clear_502_and_recovers() -> Result<()> {
    remote_down_and_back(Remote::Https, "tdown")
}

#[test]
fn a_plain_http_remote_down_gives_a_fast_clear_502_and_recovers() -> Result<()> {
    remote_down_and_back(Remote::Http, "tdownp")
}

fn remote_down_and_back(remote: Remote, hint: &str) -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let mut bed = Bed::new(hint, Duration::from_secs(3600))?;
    let _agent = bed.agent_to(remote, &[])?;
    assert_eq!(status_of(&bed, "/ok")?.0, 200);
    bed.fake.stop()?;
    let (code, body, elapsed) = status_of(&bed, "/ok")?;
    println!("{remote:?} remote down: {code} in {elapsed:?}: {body}");
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("unreachable") && body.contains("refused"),
        "{body}"
    );
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    bed.fake.restart()?;
    let mut ok = false;
    for _ in 0..20 {
        if status_of(&bed, "/ok")?.0 == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "requests did not recover after the remote came back");
    Ok(())
}

#[test]
fn a_remote_signed_by_another_ca_is_refused_and_nothing_is_sent() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tca", Duration::from_secs(3600))?;
    let other = TestCa::with_name(bed.dir.path(), "unrelated-ca")?;
    let agent = AgentFixture::start(
        bed.cgroup.path(),
        &bed.routes(other.ca_pem_path()),
        &["--tunnel-netns", &bed.node_netns],
    )?;
    let (code, body, _) = status_of(&bed, "/ok")?;
    assert_eq!(
        code, 503,
        "the token request is the first TLS contact: {body}"
    );
    assert!(body.to_lowercase().contains("certificate"), "{body}");
    let stats = bed.fake.stats()?;
    assert_eq!((stats.token_requests, stats.requests), (0, 0), "{stats:?}");
    drop(agent);
    Ok(())
}

#[test]
fn metrics_count_requests_and_refusals_without_secrets() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tmetrics", Duration::from_secs(3600))?;
    let port = free_loopback_port()?;
    let metrics_addr = format!("127.0.0.1:{port}");
    let _agent = bed.agent(&["--metrics-addr", &metrics_addr])?;
    for _ in 0..3 {
        assert_eq!(status_of(&bed, "/ok")?.0, 200);
    }
    let mut direct = ProbeOptions::new("10.200.0.1:15001".parse()?, 2);
    direct.timeout_ms = Some(1000);
    let _ = run_probe(&bed.client.netns, Some(bed.cgroup.path()), &direct)?;
    // Loopback in the host namespace: the agent's own metrics endpoint.
    let out = Command::new("curl")
        .args(["-sS", &format!("http://{metrics_addr}/metrics")])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.starts_with(needle) && !l.starts_with('#'))
    };
    let requests = line(&format!(
        "beamlit_tunnel_requests_total{{service=\"{SVC}\",outcome=\"2xx\"}}"
    ))
    .with_context(|| format!("no request counter in:\n{text}"))?;
    assert!(requests.ends_with(" 3"), "{requests}");
    assert!(
        line("beamlit_tunnel_refused_connections_total 2").is_some(),
        "{text}"
    );
    assert!(
        line("beamlit_tunnel_token_refreshes_total{outcome=\"ok\"} 1").is_some(),
        "{text}"
    );
    assert!(
        text.contains("beamlit_tunnel_upstream_latency_seconds_bucket"),
        "{text}"
    );
    assert!(
        !text.contains(CLIENT_SECRET) && !text.contains("tok-1"),
        "secret in metrics"
    );
    Ok(())
}

fn free_loopback_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[test]
fn connection_upgrades_are_spliced_through_to_an_http1_remote() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tupgrade", Duration::from_secs(3600))?;
    // Upgrades exist only in HTTP/1.1: the fake's plain listener speaks nothing else.
    let _agent = AgentFixture::start(
        bed.cgroup.path(),
        &bed.routes_to(bed.fake.ca_pem(), "http", 8080),
        &["--tunnel-netns", &bed.node_netns],
    )?;
    let script = format!(
        r#"
import socket
s = socket.create_connection(("10.96.0.10", 80), timeout=5)
s.sendall(b"GET /upgrade HTTP/1.1\r\nHost: 10.96.0.10\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf:
    chunk = s.recv(4096)
    if not chunk:
        break
    buf += chunk
head, _, rest = buf.partition(b"\r\n\r\n")
lines = head.split(b"\r\n")
print(lines[0].decode())
print([l.split(b":", 1)[1].strip().decode() for l in lines[1:] if l.lower().startswith(b"sec-websocket-accept:")])
s.sendall(b"{payload}\n")
got = rest
while b"\n" not in got:
    chunk = s.recv(4096)
    if not chunk:
        break
    got += chunk
print(got.decode().strip())
"#,
        payload = "ping through the tunnel"
    );
    let mut cmd = bed.client.netns.cmd("python3");
    cmd.args(["-c", &script]);
    let out = run_in(Some(bed.cgroup.path()), cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some("HTTP/1.1 101 Switching Protocols"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The key is RFC 6455's example (§1.3), whose accept value it gives: the handshake's
    // end-to-end headers crossed the tunnel both ways.
    assert_eq!(
        lines.next(),
        Some("['s3pPLMBiTxaQ9kYGzzhZRbK+xOo=']"),
        "{stdout}"
    );
    assert_eq!(lines.next(), Some("ping through the tunnel"), "{stdout}");
    Ok(())
}

#[test]
fn plain_http_remotes_get_prefix_headers_host_and_token_over_one_kept_alive_connection()
-> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tplain", Duration::from_secs(3600))?;
    let agent = bed.agent_to(Remote::Http, &[])?;
    assert_forwarded_as_configured(&bed, &agent, Remote::Http, "HTTP/1.1")?;

    // One client connection, messages of every framing: the upstream connection is reused
    // throughout (the fake sees one peer), so each body was delimited exactly.
    let script = r#"
import http.client, json
c = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
peers = []
def echo(method, path, **kw):
    c.request(method, path, **kw)
    r = c.getresponse()
    d = json.loads(r.read())
    peers.append(d["peer"])
    return d
for i in range(3):
    echo("GET", f"/keepalive/{i}")
c.request("HEAD", "/head")
r = c.getresponse(); r.read()
print("HEAD", r.status)
c.request("GET", "/status/204")
r = c.getresponse(); r.read()
print("204", r.status)
d = echo("POST", "/fixed", body=b"x" * 100000)
print("FIXED", d["body_len"])
d = echo("POST", "/chunked", body=iter([b"a" * 1000, b"b" * 2000]), encode_chunked=True)
print("CHUNKED", d["body_len"])
echo("GET", "/last")
print("PEERS", len(set(peers)), len(peers))
"#;
    let mut cmd = bed.client.netns.cmd("python3");
    cmd.args(["-c", script]);
    let out = run_in(Some(bed.cgroup.path()), cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    for expected in [
        "HEAD 200",
        "204 204",
        "FIXED 100000",
        "CHUNKED 3000",
        "PEERS 1 6",
    ] {
        assert!(
            stdout.lines().any(|l| l == expected),
            "{expected:?} missing:\n{stdout}{stderr}"
        );
    }
    Ok(())
}

#[test]
fn h2c_clients_are_served_whatever_the_remote_speaks() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("th2c", Duration::from_secs(3600))?;
    const STREAMS: usize = 8;
    for remote in [Remote::Https, Remote::Http] {
        let agent = bed.agent_to(remote, &[])?;
        // One prior-knowledge connection carrying 8 streams at once, as a gRPC client opens them.
        let mut cmd = bed.client.netns.cmd(netprobe_bin());
        cmd.args([
            "h2c",
            "--addr",
            SVC,
            "--path-prefix",
            "/h2c/",
            "--streams",
            &STREAMS.to_string(),
        ]);
        let out = run_in(Some(bed.cgroup.path()), cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut peers = std::collections::BTreeSet::new();
        let mut answered = 0;
        for line in stdout.lines() {
            let mut fields = line.splitn(4, ' ');
            let (Some("STREAM"), Some(i), Some("200"), Some(body)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let echo: serde_json::Value = serde_json::from_str(body)?;
            assert_eq!(
                echo["path"],
                format!("/ws/models/php-apache/h2c/{i}"),
                "{echo}"
            );
            peers.insert(echo["peer"].to_string());
            answered += 1;
        }
        println!(
            "{remote:?}: {answered} of {STREAMS} h2c streams answered over {} remote connection(s)",
            peers.len()
        );
        assert_eq!(
            answered,
            STREAMS,
            "{remote:?}: {stdout}{}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        if let Remote::Https = remote {
            // HTTP/2 to the remote as well: the streams share one remote connection.
            assert_eq!(peers.len(), 1, "{peers:?}");
        }
        drop(agent);
    }
    Ok(())
}

#[test]
fn the_tunnel_s_own_connections_are_never_redirected_back_into_it() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tloop", Duration::from_secs(3600))?;
    // The remote backend is an address the node's eBPF offloads: here the Service itself. The
    // agent runs inside the cgroup its programs are attached to, as on a node, so without the
    // bypass mark on its upstream socket the tunnel would dial itself, again and again.
    let routes = format!(
        "tunnel:\n  ipv4: 10.200.0.1:15001\nservices:\n  - address: {SVC}\n    \
         offloadPercent: 100\n    remote:\n      scheme: http\n      host: \"{SVC}\"\n"
    );
    // A route for the Service address on the node, as a real node's default route provides;
    // kube-proxy's rule then rewrites it to the local pod.
    let route = bed
        .topology
        .node()
        .cmd("ip")
        .args(["route", "add", "10.96.0.0/16", "via"])
        .arg(bed.local_ip.to_string())
        .output()?;
    anyhow::ensure!(
        route.status.success(),
        "ip route: {}",
        String::from_utf8_lossy(&route.stderr)
    );
    let agent = AgentFixture::start_inside_cgroup(
        bed.cgroup.path(),
        &routes,
        &["--tunnel-netns", &bed.node_netns],
    )?;
    let (code, body, elapsed) = status_of(&bed, "/loop")?;
    println!("through the tunnel to the Service itself: {code} in {elapsed:?}: {body}");
    assert_eq!((code, body.trim()), (200, "local"), "{}", agent.log());
    let row = agent.service(SVC)?;
    // The client's connection went to the tunnel; the tunnel's own went past the programs.
    assert_eq!(row["redirected"], 1, "{row}");
    assert_eq!(row["bypassed"], 1, "{row}");
    Ok(())
}

#[test]
fn an_early_answer_reaches_the_client_while_it_is_still_uploading() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tearly", Duration::from_secs(3600))?;
    // 200 MB: far more than the socket buffers on the way hold, so a forwarder that sends the
    // whole body before reading the answer would sit on a blocked write.
    let file = bed.dir.join("big.bin");
    std::fs::File::create(&file)?.set_len(200 * 1024 * 1024)?;
    for remote in [Remote::Http, Remote::Https] {
        let agent = bed.agent_to(remote, &[])?;
        // The fake answers /status/413 at once, without reading the body.
        let (code, elapsed, stderr) = upload_status(&bed, &file, "/status/413")?;
        println!("{remote:?}: early 413 after {elapsed:?}");
        assert_eq!(
            code,
            "413",
            "{remote:?}: {stderr}\nagent log:\n{}",
            agent.log()
        );
        assert!(elapsed < Duration::from_secs(10), "{remote:?}: {elapsed:?}");
        drop(agent);
    }

    // A remote that answers early and then neither reads nor closes: only a forwarder that reads
    // while it sends sees the answer (one that sends first waits on a full socket buffer).
    let script = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9090))
s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = c.recv(4096)
        if not chunk:
            break
        head += chunk
    c.sendall(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
    time.sleep(60)
"#;
    let mut cmd = bed.remote_netns.cmd("python3");
    cmd.args(["-c", script, &bed.remote_ip.to_string()])
        .stdout(Stdio::piped());
    let mut server = spawn(cmd, None)?;
    let stdout = server.take_stdout().context("server stdout")?;
    let mut ready = String::new();
    BufReader::new(stdout).read_line(&mut ready)?;
    anyhow::ensure!(ready.trim() == "ready", "the stubborn server did not start");
    let agent = AgentFixture::start(
        bed.cgroup.path(),
        &bed.routes_to(bed.fake.ca_pem(), "http", 9090),
        &["--tunnel-netns", &bed.node_netns],
    )?;
    let (code, elapsed, stderr) = upload_status(&bed, &file, "/anything")?;
    println!("a remote that stops reading: 413 after {elapsed:?}");
    assert_eq!(code, "413", "{stderr}\nagent log:\n{}", agent.log());
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    Ok(())
}

/// POSTs `file` through the Service to `path`: (status code, time taken, curl's stderr).
fn upload_status(
    bed: &Bed,
    file: &std::path::Path,
    path: &str,
) -> Result<(String, Duration, String)> {
    let started = Instant::now();
    let out = bed.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{SVC}{path}"),
    ])?;
    Ok((
        String::from_utf8_lossy(&out.stdout).to_string(),
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

/// Runs a Python script in the client pod, inside the test cgroup; returns its stdout lines.
fn python_in_client(bed: &Bed, script: &str) -> Result<Vec<String>> {
    let mut cmd = bed.client.netns.cmd("python3");
    cmd.args(["-c", script]);
    let out = run_in(Some(bed.cgroup.path()), cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        anyhow::bail!(
            "python failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("{stdout}");
    Ok(stdout.lines().map(str::to_string).collect())
}

/// Seconds in a `NAME <seconds>` line of the script's output.
fn seconds(lines: &[String], name: &str) -> Result<f64> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {name} line in {lines:?}"))
}

#[test]
fn a_client_that_sends_its_request_head_too_slowly_is_cut_at_the_header_timeout() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tslowhdr", Duration::from_secs(3600))?;
    let _agent = bed.agent(&["--tunnel-header-timeout-ms", "1000"])?;
    // A partial head trickled a byte every 200 ms, a client that sends nothing at all, and an
    // idle keep-alive connection after one answered request: each is closed by the tunnel
    // about a second in, instead of holding a connection (and a task) for as long as it likes.
    let script = r#"
import socket, time
def until_closed(s):
    t0 = time.monotonic()
    try:
        while True:
            if not s.recv(4096):
                break
    except (ConnectionResetError, TimeoutError, socket.timeout):
        pass
    return time.monotonic() - t0
s = socket.create_connection(("10.96.0.10", 80), timeout=10)
s.sendall(b"GET /slow HTTP/1.1\r\n")
t0 = time.monotonic()
closed = False
for b in b"Host: 10.96.0.10\r\nX-Slow: " + b"a" * 50:
    try:
        s.sendall(bytes([b]))
    except (BrokenPipeError, ConnectionResetError):
        closed = True
        break
    time.sleep(0.2)
    if time.monotonic() - t0 > 5:
        break
print("TRICKLE", time.monotonic() - t0 + (0 if closed else until_closed(s)))
s = socket.create_connection(("10.96.0.10", 80), timeout=10)
print("SILENT", until_closed(s))
s = socket.create_connection(("10.96.0.10", 80), timeout=10)
s.sendall(b"GET /first HTTP/1.1\r\nHost: 10.96.0.10\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
print("ANSWERED", head.split(b"\r\n")[0].decode())
print("KEEPALIVE", until_closed(s))
"#;
    let lines = python_in_client(&bed, script)?;
    for name in ["TRICKLE", "SILENT", "KEEPALIVE"] {
        let s = seconds(&lines, name)?;
        assert!(
            (0.8..3.0).contains(&s),
            "{name}: closed after {s:.2}s, not ~1s"
        );
    }
    assert!(
        lines.iter().any(|l| l == "ANSWERED HTTP/1.1 200 OK"),
        "{lines:?}"
    );
    // A client that sends its request at once is served as before.
    let echo = bed.get_json("/after")?;
    assert_eq!(echo["path"], "/ws/models/php-apache/after", "{echo}");
    Ok(())
}

#[test]
fn an_upgraded_connection_idle_beyond_the_idle_timeout_is_closed() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let bed = Bed::new("tidle", Duration::from_secs(3600))?;
    let _agent = bed.agent_to(Remote::Http, &["--tunnel-idle-timeout-ms", "1000"])?;
    // Echo traffic every 300 ms for 2 s keeps the switched connection open past the timeout;
    // then silence closes it about a second after the last echo.
    let script = r#"
import socket, time
s = socket.create_connection(("10.96.0.10", 80), timeout=10)
s.sendall(b"GET /upgrade HTTP/1.1\r\nHost: 10.96.0.10\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
print("STATUS", buf.split(b"\r\n")[0].decode())
echoed = 0
t0 = time.monotonic()
while time.monotonic() - t0 < 2.0:
    s.sendall(b"ping\n")
    got = b""
    while not got.endswith(b"ping\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    echoed += got.count(b"ping\n")
    last = time.monotonic()
    time.sleep(0.3)
print("ECHOED", echoed)
try:
    while s.recv(4096):
        pass
except ConnectionResetError:
    pass
print("IDLE", time.monotonic() - last)
"#;
    let lines = python_in_client(&bed, script)?;
    assert!(
        lines
            .iter()
            .any(|l| l == "STATUS HTTP/1.1 101 Switching Protocols"),
        "{lines:?}"
    );
    let echoed: u32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("ECHOED "))
        .and_then(|v| v.parse().ok())
        .context("ECHOED line")?;
    assert!(echoed >= 5, "the chatty phase was cut: {lines:?}");
    let idle = seconds(&lines, "IDLE")?;
    assert!(
        (0.8..3.0).contains(&idle),
        "closed after {idle:.2}s idle, not ~1s"
    );
    Ok(())
}
