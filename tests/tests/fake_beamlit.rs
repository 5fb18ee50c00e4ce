//! Privileged tests of the fake Beamlit (`fakebeamlit`): it runs in a "remote"
//! pod of a [`Topology`], and every client runs in a "client" pod (curl via
//! `ip netns exec`, or std sockets on a thread that joined the namespace), so
//! nothing is sent from the host namespace.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use beamlit_testbed::{
    FakeBeamlit, FakeBeamlitOptions, Netns, Pod, TestCa, TestDir, Topology, require_privileges,
    spawn,
};
use serde_json::Value;

const HTTPS_PORT: u16 = 8443;
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const CURL_DEADLINE: Duration = Duration::from_secs(20);

/// A topology with a client pod and a remote pod; the caller keeps the
/// topology alive for as long as the pods are used.
fn bed(hint: &str) -> Result<(Topology, Pod, Pod)> {
    let mut topo = Topology::new(hint)?;
    let client = topo.add_pod("client")?;
    let remote = topo.add_pod("remote")?;
    Ok((topo, client, remote))
}

fn options(remote: &Pod) -> FakeBeamlitOptions {
    FakeBeamlitOptions {
        https: vec![
            (remote.ipv4, HTTPS_PORT).into(),
            (remote.ipv6, HTTPS_PORT).into(),
        ],
        http: vec![(remote.ipv4, HTTP_PORT).into()],
        tcp_echo: vec![(remote.ipv4, ECHO_PORT).into()],
        ..Default::default()
    }
}

/// curl inside `ns`, never through a proxy from the environment.
fn curl(ns: &Netns, args: &[&str]) -> Result<Output> {
    let mut cmd = ns.cmd("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "15"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd, None)?.wait_with_output_timeout(CURL_DEADLINE)
}

/// A successful curl's (HTTP status, body); `-w` appends the status on its own line.
fn curl_status(ns: &Netns, args: &[&str]) -> Result<(u16, String)> {
    let mut all = args.to_vec();
    all.extend(["-w", "\n%{http_code}"]);
    let out = curl(ns, &all)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "curl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let (body, code) = stdout
        .rsplit_once('\n')
        .with_context(|| format!("no status line in {stdout:?}"))?;
    Ok((code.trim().parse()?, body.to_string()))
}

fn json(body: &str) -> Result<Value> {
    serde_json::from_str(body).with_context(|| format!("not JSON: {body:?}"))
}

fn get_token(ns: &Netns, fake: &FakeBeamlit) -> Result<String> {
    let ca = fake.ca_pem().display().to_string();
    let (code, body) = curl_status(
        ns,
        &[
            "--cacert",
            &ca,
            "-u",
            "beamlit-test-client:beamlit-test-secret",
            "-d",
            "grant_type=client_credentials",
            &fake.https_url("/oauth/token")?,
        ],
    )?;
    ensure!(code == 200, "token request: {code} {body}");
    json(&body)?["access_token"]
        .as_str()
        .map(str::to_string)
        .context("no access_token")
}

#[test]
fn token_endpoint_issues_and_counts_tokens() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, remote) = bed("fbtoken")?;
    let fake = FakeBeamlit::start(&remote.netns, options(&remote))?;
    let ca = fake.ca_pem().display().to_string();
    let url = fake.https_url("/oauth/token")?;
    let grant = "grant_type=client_credentials";

    // Basic authentication.
    let (code, body) = curl_status(
        &client.netns,
        &[
            "--cacert",
            &ca,
            "-u",
            "beamlit-test-client:beamlit-test-secret",
            "-d",
            grant,
            &url,
        ],
    )?;
    ensure!(code == 200, "basic: {code} {body}");
    let v = json(&body)?;
    assert_eq!(v["access_token"], "tok-1");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);

    // Form-field authentication, on a prefixed path and plain HTTP.
    let (code, body) = curl_status(
        &client.netns,
        &[
            "-d",
            grant,
            "-d",
            "client_id=beamlit-test-client",
            "-d",
            "client_secret=beamlit-test-secret",
            &fake.http_url("/v0/oauth/token")?,
        ],
    )?;
    ensure!(code == 200, "form: {code} {body}");
    assert_eq!(json(&body)?["access_token"], "tok-2");

    // Wrong secret, both ways.
    let (code, body) = curl_status(
        &client.netns,
        &[
            "--cacert",
            &ca,
            "-u",
            "beamlit-test-client:nope",
            "-d",
            grant,
            &url,
        ],
    )?;
    assert_eq!(
        (code, json(&body)?["error"].clone()),
        (401, "invalid_client".into())
    );
    let (code, body) = curl_status(
        &client.netns,
        &[
            "--cacert",
            &ca,
            "-d",
            grant,
            "-d",
            "client_id=beamlit-test-client",
            "-d",
            "client_secret=nope",
            &url,
        ],
    )?;
    assert_eq!(
        (code, json(&body)?["error"].clone()),
        (401, "invalid_client".into())
    );

    // Wrong grant type.
    let (code, body) = curl_status(
        &client.netns,
        &[
            "--cacert",
            &ca,
            "-u",
            "beamlit-test-client:beamlit-test-secret",
            "-d",
            "grant_type=password",
            &url,
        ],
    )?;
    assert_eq!(
        (code, json(&body)?["error"].clone()),
        (400, "unsupported_grant_type".into())
    );

    let stats = fake.stats()?;
    assert_eq!(stats.token_requests, 5);
    assert_eq!(stats.requests, 5);
    assert_eq!(stats.tokens_issued, ["tok-1", "tok-2"]);
    assert_eq!(stats.path_count("/oauth/token"), 4);
    assert_eq!(stats.path_count("/v0/oauth/token"), 1);
    Ok(())
}

/// Splits `curl -i` output into (lowercased header block, body).
fn split_head(out: &str) -> Result<(String, String)> {
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header block in {out:?}"))?;
    Ok((head.to_ascii_lowercase(), body.to_string()))
}

#[test]
fn echo_reports_the_request_and_negotiates_http2() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, remote) = bed("fbecho")?;
    let fake = FakeBeamlit::start(&remote.netns, options(&remote))?;
    let ca = fake.ca_pem().display().to_string();
    let url = fake.https_url("/v1/agents?x=1")?;

    // HTTP/2 over TLS, chosen by ALPN.
    let (code, out) = curl_status(
        &client.netns,
        &[
            "--cacert",
            &ca,
            "--http2",
            "-i",
            "-H",
            "X-Test: a",
            "-H",
            "X-Test: b",
            "-d",
            "hello",
            &url,
        ],
    )?;
    assert_eq!(code, 200);
    let (head, body) = split_head(&out)?;
    assert!(head.starts_with("http/2 200"), "{head}");
    assert!(head.contains("x-served-by: beamlit"), "{head}");
    assert!(head.contains("cf-ray: fake-1"), "{head}");
    let v = json(&body)?;
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/v1/agents?x=1");
    assert_eq!(v["version"], "HTTP/2");
    assert_eq!(v["tls"], true);
    assert_eq!(v["body"], "hello");
    assert_eq!(v["body_len"], 5);
    assert_eq!(v["headers"]["x-test"], "a, b");
    assert_eq!(v["served_by"], "fake-beamlit");
    assert_eq!(
        v["authority"],
        format!("{}:{HTTPS_PORT}", remote.ipv4).as_str()
    );

    // HTTP/1.1 over TLS when the client offers only that.
    let (code, body) = curl_status(&client.netns, &["--cacert", &ca, "--http1.1", &url])?;
    assert_eq!(code, 200);
    let v = json(&body)?;
    assert_eq!(
        (v["version"].clone(), v["method"].clone()),
        ("HTTP/1.1".into(), "GET".into())
    );

    // IPv6 (the certificate carries the listen addresses).
    let v6_url = format!("https://[{}]:{HTTPS_PORT}/six", remote.ipv6);
    let (code, body) = curl_status(&client.netns, &["--cacert", &ca, &v6_url])?;
    assert_eq!((code, json(&body)?["path"].clone()), (200, "/six".into()));

    // Plain HTTP.
    let (code, body) = curl_status(&client.netns, &[&fake.http_url("/plain")?])?;
    assert_eq!(code, 200);
    let v = json(&body)?;
    assert_eq!(
        (v["tls"].clone(), v["version"].clone()),
        (false.into(), "HTTP/1.1".into())
    );

    // Error statuses on demand, still marked as served by Beamlit.
    let (code, out) = curl_status(&client.netns, &["-i", &fake.http_url("/status/503")?])?;
    assert_eq!(code, 503);
    assert!(
        split_head(&out)?.0.contains("x-served-by: beamlit"),
        "{out}"
    );

    let stats = fake.stats()?;
    assert_eq!(stats.requests, 5);
    assert_eq!(stats.path_count("/v1/agents"), 2);
    assert_eq!(stats.token_requests, 0);
    Ok(())
}

#[test]
fn require_token_rejects_missing_unknown_and_expired_tokens() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, remote) = bed("fbauth")?;
    let fake = FakeBeamlit::start(
        &remote.netns,
        FakeBeamlitOptions {
            token_ttl: Duration::from_secs(1),
            require_token: true,
            ..options(&remote)
        },
    )?;
    let ca = fake.ca_pem().display().to_string();
    let url = fake.https_url("/v1/models")?;

    let (code, body) = curl_status(&client.netns, &["--cacert", &ca, &url])?;
    assert_eq!(
        (code, json(&body)?["error"].clone()),
        (401, "missing_token".into())
    );

    let (code, body) = curl_status(
        &client.netns,
        &["--cacert", &ca, "-H", "Authorization: Bearer tok-99", &url],
    )?;
    let v = json(&body)?;
    assert_eq!(code, 401);
    assert_eq!(v["error"], "invalid_token");
    assert_eq!(v["error_description"], "unknown token");

    let issued = Instant::now();
    let token = get_token(&client.netns, &fake)?;
    let bearer = format!("Authorization: Bearer {token}");
    let (code, body) = curl_status(&client.netns, &["--cacert", &ca, "-H", &bearer, &url])?;
    ensure!(code == 200, "fresh token refused: {code} {body}");

    // Past the 1 s lifetime (counted from before the token request).
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(issued.elapsed()));
    let (code, body) = curl_status(&client.netns, &["--cacert", &ca, "-H", &bearer, &url])?;
    let v = json(&body)?;
    assert_eq!(code, 401);
    assert_eq!(v["error_description"], "token expired");
    assert_eq!(fake.stats()?.tokens_issued, [token]);
    Ok(())
}

/// Reads an SSE response on a thread inside `ns` and returns when each of the
/// 10 events arrived, measured from the request.
fn sse_arrivals(ns: &Netns, addr: SocketAddr) -> Result<Vec<Duration>> {
    ns.enter(move || -> Result<Vec<Duration>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let start = Instant::now();
        s.write_all(b"GET /events/sse HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n")?;
        let mut seen = Vec::new();
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).context("reading the event stream")?;
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            while text.contains(&format!("data: event {} at ", seen.len())) {
                seen.push(start.elapsed());
            }
        }
        ensure!(seen.len() == 10, "got {} events: {text:?}", seen.len());
        ensure!(
            text.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{text:?}"
        );
        Ok(seen)
    })?
}

#[test]
fn sse_events_are_streamed_100ms_apart() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, remote) = bed("fbsse")?;
    let fake = FakeBeamlit::start(&remote.netns, options(&remote))?;

    let arrivals = sse_arrivals(&client.netns, fake.addresses().http[0])?;
    let (first, last) = (arrivals[0], arrivals[9]);
    // Buffering would deliver everything at once, at the end.
    assert!(first < Duration::from_millis(400), "{arrivals:?}");
    assert!(last - first >= Duration::from_millis(800), "{arrivals:?}");
    for pair in arrivals.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(40),
            "{arrivals:?}"
        );
    }

    // Over TLS and HTTP/2 as well: first byte early, whole stream ~0.9 s later.
    let ca = fake.ca_pem().display().to_string();
    let out = curl(
        &client.netns,
        &[
            "--cacert",
            &ca,
            "--http2",
            "-N",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{time_starttransfer} %{time_total}",
            &fake.https_url("/sse")?,
        ],
    )?;
    ensure!(
        out.status.success(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<&str> = w.split_whitespace().collect();
    ensure!(fields.len() == 3, "curl -w printed {w:?}");
    let ttfb: f64 = fields[1].parse()?;
    let total: f64 = fields[2].parse()?;
    assert_eq!(fields[0], "2", "{w}");
    assert!(total - ttfb >= 0.8, "{w}");
    Ok(())
}

#[test]
fn upload_streams_20_mb() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    const SIZE: usize = 20 * 1024 * 1024;
    let (_topo, client, remote) = bed("fbupload")?;
    let fake = FakeBeamlit::start(&remote.netns, options(&remote))?;
    let dir = TestDir::new("fbupload")?;
    let file = dir.join("payload.bin");
    // Not all zeros, so a truncated or reordered body changes the digest.
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data)?;
    let want_sha = ring::digest::digest(&ring::digest::SHA256, &data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    drop(data);
    let upload = format!("@{}", file.display());
    let ca = fake.ca_pem().display().to_string();

    // POST over HTTP/2 with TLS, PUT over plain HTTP/1.1.
    let (code, body) = curl_status(
        &client.netns,
        &[
            "--cacert",
            &ca,
            "--http2",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &upload,
            &fake.https_url("/v1/upload")?,
        ],
    )?;
    ensure!(code == 200, "{code} {body}");
    let v = json(&body)?;
    assert_eq!(v["bytes"], SIZE as u64);
    assert_eq!(v["sha256"], want_sha.as_str());

    let file_arg = file.display().to_string();
    let (code, body) = curl_status(
        &client.netns,
        &["-T", &file_arg, &fake.http_url("/upload")?],
    )?;
    ensure!(code == 200, "{code} {body}");
    assert_eq!(json(&body)?["bytes"], SIZE as u64);

    assert_eq!(fake.stats()?.bytes_uploaded, 2 * SIZE as u64);
    // Streaming, not buffering: the fake's peak memory stays below one upload.
    let pid = fake.pid().context("fake not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    assert!(hwm_kb * 1024 < SIZE as u64, "peak RSS {hwm_kb} kB");
    Ok(())
}

#[test]
fn tcp_echo_echoes() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, remote) = bed("fbtcp")?;
    let fake = FakeBeamlit::start(
        &remote.netns,
        FakeBeamlitOptions {
            tcp_echo: vec![(remote.ipv4, ECHO_PORT).into()],
            ..Default::default()
        },
    )?;
    let addr = fake.addresses().tcp_echo[0];
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let to_send = sent.clone();
    let got = client.netns.enter(move || -> Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = s.try_clone()?;
        // Read concurrently: the echo cannot send everything back until we read.
        let rx = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).map(|_| got)
        });
        s.write_all(&to_send)?;
        s.shutdown(Shutdown::Write)?;
        match rx.join() {
            Ok(r) => Ok(r?),
            Err(_) => bail!("reader thread panicked"),
        }
    })??;
    assert!(got == sent, "echoed {} of {} bytes", got.len(), sent.len());
    assert_eq!(fake.stats()?.tcp_connections, 1);
    Ok(())
}

#[test]
fn a_client_trusting_another_ca_fails_the_handshake() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, remote) = bed("fbca")?;
    let dir = TestDir::new("fbca")?;
    let ca = TestCa::new(dir.path())?;
    let other = TestCa::with_name(dir.path(), "other-ca")?;
    let fake = FakeBeamlit::start_with_ca(&remote.netns, options(&remote), &ca)?;
    assert_eq!(fake.ca_pem(), ca.ca_pem_path());
    let resolve = format!("beamlit.test:{HTTPS_PORT}:{}", remote.ipv4);
    let by_name = format!("https://beamlit.test:{HTTPS_PORT}/");
    let good = ca.ca_pem_path().display().to_string();
    let bad = other.ca_pem_path().display().to_string();

    let (code, _) = curl_status(
        &client.netns,
        &["--cacert", &good, "--resolve", &resolve, &by_name],
    )?;
    assert_eq!(code, 200);

    // curl exit code 60: peer certificate cannot be authenticated.
    let out = curl(
        &client.netns,
        &["--cacert", &bad, "--resolve", &resolve, &by_name],
    )?;
    assert_eq!(
        out.status.code(),
        Some(60),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl(&client.netns, &["--cacert", &bad, &fake.https_url("/")?])?;
    assert_eq!(
        out.status.code(),
        Some(60),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Right CA, wrong name.
    let wrong = format!("wrong.test:{HTTPS_PORT}:{}", remote.ipv4);
    let out = curl(
        &client.netns,
        &[
            "--cacert",
            &good,
            "--resolve",
            &wrong,
            &format!("https://wrong.test:{HTTPS_PORT}/"),
        ],
    )?;
    assert_eq!(
        out.status.code(),
        Some(60),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Only the trusted request got through to the application.
    assert_eq!(fake.stats()?.requests, 1);
    // The fake logs the rejected handshakes (asynchronously to curl's exit).
    // Only the two unknown-CA ones: after a name mismatch the server may
    // already count the TLS 1.3 handshake as done and log a connection error.
    let deadline = Instant::now() + Duration::from_secs(3);
    while fake.log().matches("TLS handshake").count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        fake.log().matches("TLS handshake").count() >= 2,
        "{}",
        fake.log()
    );
    Ok(())
}

#[test]
fn stop_and_restart_keep_addresses_counters_and_tokens() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, remote) = bed("fbrestart")?;
    let mut fake = FakeBeamlit::start(
        &remote.netns,
        FakeBeamlitOptions {
            require_token: true,
            // Port 0: the restart must rebind the port chosen the first time.
            http: vec![(remote.ipv4, 0).into()],
            ..options(&remote)
        },
    )?;
    let http_addr = fake.addresses().http[0];
    assert_ne!(http_addr.port(), 0);
    let token = get_token(&client.netns, &fake)?;
    let bearer = format!("Authorization: Bearer {token}");
    let url = fake.http_url("/x")?;
    let (code, _) = curl_status(&client.netns, &["-H", &bearer, &url])?;
    assert_eq!(code, 200);

    fake.stop()?;
    assert!(!fake.is_running());
    // Remote down: connections are refused (curl exit 7).
    let out = curl(&client.netns, &["-H", &bearer, &url])?;
    assert_eq!(
        out.status.code(),
        Some(7),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );

    fake.restart()?;
    assert_eq!(fake.addresses().http[0], http_addr);
    let (code, body) = curl_status(&client.netns, &["-H", &bearer, &url])?;
    ensure!(code == 200, "token from before the restart: {code} {body}");
    assert_eq!(get_token(&client.netns, &fake)?, "tok-2");
    let stats = fake.stats()?;
    assert_eq!((stats.requests, stats.token_requests), (4, 2));

    // Drop kills the process and removes its files.
    let pid = fake.pid().context("not running")?;
    let dir = fake.dir().to_path_buf();
    drop(fake);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "fakebeamlit {pid} still alive"
    );
    Ok(())
}

#[test]
fn start_reports_why_the_fake_could_not_listen() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, _client, remote) = bed("fbfail")?;
    // An address of another namespace: bind fails with EADDRNOTAVAIL.
    let err = FakeBeamlit::start(
        &remote.netns,
        FakeBeamlitOptions {
            http: vec![(Topology::NODE_V4, HTTP_PORT).into()],
            ..Default::default()
        },
    )
    .err()
    .context("the fake started on an address it does not have")?;
    let msg = format!("{err:#}");
    assert!(msg.contains("exited") && msg.contains("binding"), "{msg}");
    assert!(FakeBeamlit::start(&remote.netns, FakeBeamlitOptions::default()).is_err());
    Ok(())
}

/// RFC 6455's example key (§1.3) and the accept value it gives.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Sends `head` (request line and headers, without the blank line) on a new connection from
/// `ns`; returns the response's status, its lowercased header block and the connection.
fn raw_handshake(ns: &Netns, addr: SocketAddr, head: &str) -> Result<(u16, String, TcpStream)> {
    let request = format!("{head}\r\n\r\n");
    ns.enter(move || -> Result<(u16, String, TcpStream)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        // Byte by byte: what follows a 101 is the echo's, not the head's.
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte)? == 0 {
                bail!("closed before the end of the response head: {got:?}");
            }
            got.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        Ok((status, head, s))
    })?
}

/// The upgrade endpoint is a WebSocket server as strict as real ones: a handshake missing any
/// of `Connection: upgrade`, `Upgrade: websocket`, a 16-byte `Sec-WebSocket-Key` or
/// `Sec-WebSocket-Version: 13` is refused (400, or 426 naming version 13, as RFC 6455 §4.4
/// says), so a tunnel that drops or mangles one of them fails the tests that go through it. A
/// complete one gets `101` with the key's `Sec-WebSocket-Accept`, then an echo.
#[test]
fn websocket_handshakes_missing_a_header_are_refused() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, remote) = bed("fbws")?;
    let fake = FakeBeamlit::start(&remote.netns, options(&remote))?;
    let addr = fake.addresses().http[0];
    let headers = |connection: &str, upgrade: &str, key: &str, version: &str| {
        let mut head = format!("GET /ws/upgrade HTTP/1.1\r\nHost: {addr}");
        for (name, value) in [
            ("Connection", connection),
            ("Upgrade", upgrade),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", version),
        ] {
            if !value.is_empty() {
                head.push_str(&format!("\r\n{name}: {value}"));
            }
        }
        head
    };

    // Complete, with the tokens in lists and in other cases.
    for (connection, upgrade) in [
        ("Upgrade", "websocket"),
        ("keep-alive, UPGRADE", "WebSocket"),
    ] {
        let (status, head, mut s) = raw_handshake(
            &client.netns,
            addr,
            &headers(connection, upgrade, WS_KEY, "13"),
        )?;
        assert_eq!(status, 101, "{connection} / {upgrade}: {head}");
        assert!(
            head.contains(&format!(
                "sec-websocket-accept: {}",
                WS_ACCEPT.to_ascii_lowercase()
            )),
            "{head}"
        );
        assert!(head.contains("upgrade: websocket"), "{head}");
        s.write_all(b"ping\n")?;
        let mut echoed = [0u8; 5];
        s.read_exact(&mut echoed)?;
        assert_eq!(&echoed, b"ping\n");
    }

    let fifteen_bytes = "AAAAAAAAAAAAAAAAAAAA";
    let refused = [
        ("no Connection", headers("", "websocket", WS_KEY, "13"), 400),
        (
            "Connection without upgrade",
            headers("keep-alive", "websocket", WS_KEY, "13"),
            400,
        ),
        ("no Upgrade", headers("Upgrade", "", WS_KEY, "13"), 400),
        (
            "Upgrade of another protocol",
            headers("Upgrade", "echo", WS_KEY, "13"),
            400,
        ),
        ("no key", headers("Upgrade", "websocket", "", "13"), 400),
        (
            "a key of 15 bytes",
            headers("Upgrade", "websocket", fifteen_bytes, "13"),
            400,
        ),
        (
            "a key that is not base64",
            headers("Upgrade", "websocket", "not base64 at all!!!", "13"),
            400,
        ),
        (
            "two keys",
            format!(
                "{}\r\nSec-WebSocket-Key: {WS_KEY}",
                headers("Upgrade", "websocket", WS_KEY, "13")
            ),
            400,
        ),
        (
            "no version",
            headers("Upgrade", "websocket", WS_KEY, ""),
            426,
        ),
        (
            "version 8",
            headers("Upgrade", "websocket", WS_KEY, "8"),
            426,
        ),
        (
            "HTTP/1.0",
            headers("Upgrade", "websocket", WS_KEY, "13").replacen("HTTP/1.1", "HTTP/1.0", 1),
            400,
        ),
    ];
    for (what, head, want) in refused {
        let (status, response, _) = raw_handshake(&client.netns, addr, &head)?;
        assert_eq!(status, want, "{what}: {response}");
        assert!(
            !response.contains("sec-websocket-accept"),
            "{what}: {response}"
        );
        if want == 426 {
            assert!(
                response.contains("sec-websocket-version: 13"),
                "{what}: {response}"
            );
        }
    }
    Ok(())
}
