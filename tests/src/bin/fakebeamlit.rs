//! fakebeamlit: a stand-in for the remote Beamlit SaaS, run by the privileged
//! tests inside a network namespace (see `beamlit_testbed::fake_beamlit`).
//!
//! It serves, over HTTPS (ALPN h2 / http/1.1) and plain HTTP/1.1:
//! - `POST .../oauth/token`: OAuth2 client credentials (RFC 6749 §4.4);
//! - the models API at `/v0/models` (the real one is `https://api.beamlit.com/v0`): `POST
//!   /v0/models` (create; 409 if it exists), `GET|PUT|DELETE /v0/models/{name}` (404 if
//!   missing), `GET /v0/models` (list), kept in memory and in the stats file; always behind a
//!   bearer token, with or without `--require-token`, and answering `--models-fail-status`
//!   instead when given. Other paths with `models` in them (the data plane's
//!   `/$workspace/models/$model/...`) reach the echo as before;
//! - `GET .../sse`: 10 server-sent events, 100 ms apart, each flushed;
//! - `POST|PUT .../upload`: streams the body through SHA-256;
//! - `/status/<code>` (after any prefix): that status;
//! - `GET .../upgrade`: a WebSocket opening handshake, as strict as real servers (RFC 6455
//!   §4.2): HTTP/1.1, `Connection` naming `upgrade`, `Upgrade` naming `websocket`, one
//!   `Sec-WebSocket-Key` of 16 bytes in base64 (else 400) and `Sec-WebSocket-Version: 13`
//!   (else 426 naming 13); then `101 Switching Protocols` with the key's `Sec-WebSocket-Accept`,
//!   and the raw bytes the client sends echoed back (not parsed as frames: what a tunnel must
//!   do is pass them through untouched);
//! - anything else: a JSON echo of the request;
//!
//! plus a raw TCP echo. Observations go to a stats file (rewritten atomically
//! after every request) because tests must not connect to it from the host.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use beamlit_testbed::fake_beamlit::{FakeAddresses, FakeStats};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

const USAGE: &str = "\
usage: fakebeamlit [--https ADDR]... [--http ADDR]... [--tcp-echo ADDR]...
                   [--cert PEM --key PEM] [--client-id ID --client-secret SECRET]
                   [--token-ttl-secs N] [--require-token] [--models-fail-status CODE]
                   [--stats-file PATH] [--ready-file PATH]

ADDR is IP:PORT or [IPv6]:PORT (IPv6 listeners are v6-only). --https needs
--cert (chain, leaf first) and --key. The ready file is written (atomically,
with the bound addresses as JSON) once every listener is bound; the stats file
resumes from its previous content if it exists.";

/// The echo returns at most this much of the request body.
const ECHO_BODY_PREFIX: usize = 64 * 1024;
/// Token requests are small forms; anything bigger is refused.
const MAX_FORM: usize = 64 * 1024;
/// A model is a small JSON document (a pod template at most).
const MAX_MODEL: usize = 1024 * 1024;
/// Where the models API lives, like the real API's `/v0`.
const MODELS_PATH: &str = "/v0/models";
const SSE_EVENTS: u32 = 10;
const SSE_INTERVAL: Duration = Duration::from_millis(100);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    let config = match Config::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fakebeamlit: error: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    // Two workers: the test machines are small, and a fake needs no more.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = runtime
        .context("building the tokio runtime")
        .and_then(|rt| rt.block_on(run(config)));
    if let Err(e) = result {
        eprintln!("fakebeamlit: error: {e:#}");
        std::process::exit(1);
    }
}

#[derive(Debug, Default)]
struct Config {
    https: Vec<SocketAddr>,
    http: Vec<SocketAddr>,
    tcp_echo: Vec<SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_id: String,
    client_secret: String,
    token_ttl_secs: u64,
    require_token: bool,
    models_fail_status: Option<StatusCode>,
    stats_file: Option<PathBuf>,
    ready_file: Option<PathBuf>,
}

impl Config {
    /// `--key value` or `--key=value`; flags take no value.
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut c = Config {
            client_id: "beamlit-test-client".into(),
            client_secret: "beamlit-test-secret".into(),
            token_ttl_secs: 3600,
            ..Config::default()
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            if key == "--require-token" {
                if inline.is_some() {
                    return Err("--require-token takes no value".into());
                }
                c.require_token = true;
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{key} needs a value"))?,
            };
            let addr = || -> Result<SocketAddr, String> {
                value
                    .parse()
                    .map_err(|_| format!("{key}: {value:?} is not IP:PORT or [IPv6]:PORT"))
            };
            match key {
                "--https" => c.https.push(addr()?),
                "--http" => c.http.push(addr()?),
                "--tcp-echo" => c.tcp_echo.push(addr()?),
                "--cert" => c.cert = Some(value.into()),
                "--key" => c.key = Some(value.into()),
                "--client-id" => c.client_id = value,
                "--client-secret" => c.client_secret = value,
                "--token-ttl-secs" => {
                    c.token_ttl_secs = value
                        .parse()
                        .map_err(|_| format!("{key}: {value:?} is not a number of seconds"))?;
                }
                "--models-fail-status" => {
                    let status = value
                        .parse::<u16>()
                        .ok()
                        .filter(|c| (200..=599).contains(c))
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .ok_or_else(|| format!("{key}: {value:?} is not a status in 200..=599"))?;
                    c.models_fail_status = Some(status);
                }
                "--stats-file" => c.stats_file = Some(value.into()),
                "--ready-file" => c.ready_file = Some(value.into()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if c.https.is_empty() && c.http.is_empty() && c.tcp_echo.is_empty() {
            return Err("no listener: give --https, --http or --tcp-echo".into());
        }
        if !c.https.is_empty() && (c.cert.is_none() || c.key.is_none()) {
            return Err("--https needs --cert and --key".into());
        }
        Ok(c)
    }
}

async fn run(config: Config) -> Result<()> {
    let tls = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) if !config.https.is_empty() => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let state = Arc::new(State::new(&config)?);

    // Everything is bound before anything is announced, so "ready" means every
    // address accepts connections.
    let mut bound = FakeAddresses::default();
    let mut https = Vec::new();
    for addr in &config.https {
        let l = bind(*addr)?;
        bound.https.push(l.local_addr()?);
        https.push(l);
    }
    let mut http = Vec::new();
    for addr in &config.http {
        let l = bind(*addr)?;
        bound.http.push(l.local_addr()?);
        http.push(l);
    }
    let mut echo = Vec::new();
    for addr in &config.tcp_echo {
        let l = bind(*addr)?;
        bound.tcp_echo.push(l.local_addr()?);
        echo.push(l);
    }
    {
        let mut out = std::io::stdout().lock();
        for addr in bound.https.iter().chain(&bound.http).chain(&bound.tcp_echo) {
            writeln!(out, "listening on {addr}")?;
        }
        out.flush()?;
    }
    if let Some(path) = &config.ready_file {
        write_atomically(path, &serde_json::to_vec(&bound)?)?;
    }

    let mut tasks = tokio::task::JoinSet::new();
    for l in https {
        tasks.spawn(serve_http(l, Arc::clone(&state), tls.clone()));
    }
    for l in http {
        tasks.spawn(serve_http(l, Arc::clone(&state), None));
    }
    for l in echo {
        tasks.spawn(serve_echo(l, Arc::clone(&state)));
    }
    // Accept loops never return; a panic in one is fatal rather than a
    // silently missing listener.
    while let Some(done) = tasks.join_next().await {
        done.context("a listener task failed")?;
    }
    Ok(())
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    // ring explicitly: the process-wide default provider would be ambiguous if
    // another dependency ever enabled aws-lc-rs too.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("server certificate and key do not match or are unsupported")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// SO_REUSEADDR so a restarted fake rebinds at once despite connections of the
/// previous process in TIME_WAIT; IPv6 sockets are v6-only so `0.0.0.0:P` and
/// `[::]:P` can both be given.
fn bind(addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .with_context(|| format!("socket for {addr}"))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket
        .listen(1024)
        .with_context(|| format!("listening on {addr}"))?;
    TcpListener::from_std(socket.into()).with_context(|| format!("registering {addr}"))
}

/// Shared counters and token store.
struct State {
    client_id: String,
    client_secret: String,
    token_ttl: Duration,
    require_token: bool,
    models_fail_status: Option<StatusCode>,
    stats_file: Option<PathBuf>,
    /// One lock for counters and file: each rewrite is a consistent snapshot,
    /// and the fixed temp name is never written by two requests at once.
    stats: Mutex<FakeStats>,
}

impl State {
    fn new(config: &Config) -> Result<Self> {
        let stats = match &config.stats_file {
            Some(path) => load_stats(path)?,
            None => FakeStats::default(),
        };
        let state = Self {
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            token_ttl: Duration::from_secs(config.token_ttl_secs),
            require_token: config.require_token,
            models_fail_status: config.models_fail_status,
            stats_file: config.stats_file.clone(),
            stats: Mutex::new(stats),
        };
        // Written before "ready", so readers always find a file; failing here
        // (unlike later) is fatal, as nothing could be observed.
        state.persist(&state.stats.lock().unwrap_or_else(|p| p.into_inner()))?;
        Ok(state)
    }

    /// Applies `f` to the counters and rewrites the stats file; returns what
    /// `f` returned. A failed write is only logged: the request is still
    /// answered (the test then sees stale stats, and the log says why).
    fn record<R>(&self, f: impl FnOnce(&mut FakeStats) -> R) -> R {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut stats);
        if let Err(e) = self.persist(&stats) {
            eprintln!("fakebeamlit: updating stats: {e:#}");
        }
        r
    }

    /// Called with the `stats` lock held (see there).
    fn persist(&self, stats: &FakeStats) -> Result<()> {
        match &self.stats_file {
            Some(path) => write_atomically(path, &serde_json::to_vec(stats)?),
            None => Ok(()),
        }
    }

    fn issue_token(&self) -> String {
        let expiry = now_unix_ms().saturating_add(self.token_ttl.as_millis() as u64);
        self.record(|s| {
            let token = format!("tok-{}", s.tokens_issued.len() + 1);
            s.tokens_issued.push(token.clone());
            s.token_expiry_unix_ms.insert(token.clone(), expiry);
            token
        })
    }

    fn check_token(&self, token: &str) -> Result<(), &'static str> {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        match stats.token_expiry_unix_ms.get(token) {
            None => Err("unknown token"),
            Some(&expiry) if now_unix_ms() >= expiry => Err("token expired"),
            Some(_) => Ok(()),
        }
    }
}

/// Resumes from an earlier run's file (a restart); a missing file is a fresh start.
fn load_stats(path: &Path) -> Result<FakeStats> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} exists but is not a stats file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FakeStats::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Readers never see a half-written file: write a sibling, then rename over.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn serve_http(listener: TcpListener, state: Arc<State>, tls: Option<TlsAcceptor>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                eprintln!("fakebeamlit: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small SSE frames must leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_conn(TokioIo::new(stream), state, false, peer).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => serve_conn(TokioIo::new(s), state, true, peer).await,
                        Ok(Err(e)) => eprintln!("fakebeamlit: TLS handshake with {peer}: {e}"),
                        Err(_) => eprintln!("fakebeamlit: TLS handshake with {peer} timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_conn<I>(io: I, state: Arc<State>, tls: bool, peer: SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(Arc::clone(&state), tls, peer, req));
    // `auto` tells HTTP/2 from HTTP/1.1 by the connection preface, which is
    // what ALPN negotiated on TLS (and h2c prior knowledge on plain HTTP).
    if let Err(e) = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(io, service)
        .await
    {
        eprintln!("fakebeamlit: connection from {peer}: {e}");
    }
}

async fn serve_echo(listener: TcpListener, state: Arc<State>) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("fakebeamlit: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        state.record(|s| s.tcp_connections += 1);
        eprintln!("fakebeamlit: tcp echo connection from {peer}");
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            if let Err(e) = echo_stream(&mut stream).await {
                eprintln!("fakebeamlit: tcp echo with {peer}: {e}");
            }
        });
    }
}

/// Echoes until the client half-closes, then half-closes back.
async fn echo_stream(stream: &mut TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let (mut r, mut w) = stream.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

async fn handle(
    state: Arc<State>,
    tls: bool,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let is_token = path.ends_with("/oauth/token");
    let n = state.record(|s| {
        s.requests += 1;
        *s.requests_by_path.entry(path.clone()).or_default() += 1;
        if is_token {
            s.token_requests += 1;
        }
        s.requests
    });
    let method = req.method().clone();
    let version = version_str(req.version());

    let mut resp = if is_token {
        token_endpoint(&state, req).await
    } else if let Some(route) = models_route(&path) {
        models_endpoint(&state, route, req).await
    } else if let Some(rejection) = unauthorized(&state, &req) {
        rejection
    } else if path.ends_with("/sse") && method == Method::GET {
        sse()
    } else if path.ends_with("/upload") && (method == Method::POST || method == Method::PUT) {
        upload(&state, req).await
    } else if let Some((_, code)) = path.rsplit_once("/status/") {
        status(code)
    } else if path.ends_with("/upgrade") && method == Method::GET {
        upgrade(req)
    } else {
        echo(req, tls, peer).await
    };

    let headers = resp.headers_mut();
    headers.insert("x-served-by", HeaderValue::from_static("beamlit"));
    if let Ok(ray) = HeaderValue::from_str(&format!("fake-{n}")) {
        headers.insert("cf-ray", ray);
    }
    eprintln!(
        "fakebeamlit: #{n} {method} {path} {version} tls={tls} -> {}",
        resp.status().as_u16()
    );
    Ok(resp)
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Reads at most `limit` bytes of body; `Err(None)` if it is longer.
async fn read_limited(body: Incoming, limit: usize) -> Result<Vec<u8>, Option<hyper::Error>> {
    let mut body = body;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(Some)?.into_data() {
            if buf.len() + data.len() > limit {
                return Err(None);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// RFC 6749 §4.4 (client credentials) with client authentication by HTTP Basic
/// (§2.3.1) or by form fields.
async fn token_endpoint(state: &State, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        let mut resp = oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint only accepts POST",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    let basic = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| auth_param(v, "basic"))
        .map(parse_basic);
    let body = match read_limited(req.into_body(), MAX_FORM).await {
        Ok(b) => b,
        Err(None) => {
            return oauth_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "form too large",
            );
        }
        Err(Some(e)) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("reading the body: {e}"),
            );
        }
    };
    let form: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    match form.get("grant_type").map(String::as_str) {
        None => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "missing grant_type",
            );
        }
        Some("client_credentials") => {}
        Some(other) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("grant_type {other:?} is not supported, use client_credentials"),
            );
        }
    }
    let used_basic = basic.is_some();
    let creds = match basic {
        Some(Some(pair)) => Some(pair),
        Some(None) => None,
        None => form
            .get("client_id")
            .zip(form.get("client_secret"))
            .map(|(id, secret)| (id.clone(), secret.clone())),
    };
    let authenticated = creds.is_some_and(|(id, secret)| {
        credential_matches(&id, &state.client_id)
            && credential_matches(&secret, &state.client_secret)
    });
    if !authenticated {
        let mut resp = oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client or wrong secret",
        );
        if used_basic {
            // §5.2: a failed Basic authentication answers with its challenge.
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"fake-beamlit\""),
            );
        }
        return resp;
    }
    let token = state.issue_token();
    let mut resp = json_response(
        StatusCode::OK,
        &json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": state.token_ttl.as_secs(),
        }),
    );
    // §5.1: token responses must not be cached.
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// The credentials of an `Authorization` value with `scheme` (case-insensitive).
fn auth_param<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = value.trim().split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

/// `base64(id:secret)`; `None` if malformed.
fn parse_basic(b64: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

/// RFC 6749 §2.3.1 form-encodes id and secret before Basic encoding them, but
/// many clients (curl -u among them) do not; both are accepted so the fake
/// tests the token flow, not that detail.
fn credential_matches(given: &str, expected: &str) -> bool {
    if given == expected {
        return true;
    }
    let decoded: String = form_urlencoded::parse(format!("v={given}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    decoded == expected
}

/// With `--require-token`, the 401 (RFC 6750 §3) for a missing, unknown or
/// expired bearer token; `None` if the request may proceed.
fn unauthorized(state: &State, req: &Request<Incoming>) -> Option<Response<Body>> {
    if !state.require_token {
        return None;
    }
    bearer_rejection(state, req)
}

/// The 401 for a request without a valid bearer token, whatever `--require-token` says.
fn bearer_rejection(state: &State, req: &Request<Incoming>) -> Option<Response<Body>> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| auth_param(v, "bearer"));
    let (error, why) = match token {
        None => ("missing_token", "no `Authorization: Bearer` header"),
        Some(t) => match state.check_token(t) {
            Ok(()) => return None,
            Err(why) => ("invalid_token", why),
        },
    };
    let mut resp = oauth_error(StatusCode::UNAUTHORIZED, error, why);
    let challenge = if token.is_none() {
        "Bearer realm=\"fake-beamlit\"".to_string()
    } else {
        format!(
            "Bearer realm=\"fake-beamlit\", error=\"invalid_token\", error_description=\"{why}\""
        )
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    Some(resp)
}

/// A request path of the models API.
#[derive(Debug, PartialEq, Eq)]
enum ModelsRoute {
    /// `/v0/models`
    Collection,
    /// `/v0/models/{name}`; the name as sent (not percent-decoded: test names are plain).
    Item(String),
}

fn models_route(path: &str) -> Option<ModelsRoute> {
    let rest = path.strip_prefix(MODELS_PATH)?;
    if rest.is_empty() || rest == "/" {
        return Some(ModelsRoute::Collection);
    }
    let name = rest.strip_prefix('/')?;
    (!name.is_empty() && !name.contains('/')).then(|| ModelsRoute::Item(name.to_string()))
}

fn api_error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": status.canonical_reason().unwrap_or("error"), "message": message}),
    )
}

/// The models API: an in-memory store (kept in the stats file, so a restarted fake still has
/// them). `?environment=` on GET/DELETE must match the model's `metadata.environment` when the
/// model has one, like a store keyed by name and environment.
async fn models_endpoint(
    state: &State,
    route: ModelsRoute,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    state.record(|s| *s.model_requests.entry(method.to_string()).or_default() += 1);
    // Unlike the echo, always protected: the controller's client must send its token.
    if let Some(rejection) = bearer_rejection(state, &req) {
        return rejection;
    }
    if let Some(status) = state.models_fail_status {
        return api_error(status, "failure injected by --models-fail-status");
    }
    let environment: Option<String> = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "environment")
            .map(|(_, v)| v.into_owned())
    });
    let in_environment = |model: &serde_json::Value| match &environment {
        None => true,
        Some(env) => model["metadata"]["environment"]
            .as_str()
            .is_none_or(|have| have == env),
    };
    match (route, method) {
        (ModelsRoute::Collection, Method::GET) => {
            let models: Vec<serde_json::Value> = state.record(|s| {
                s.models
                    .values()
                    .filter(|m| in_environment(m))
                    .cloned()
                    .collect()
            });
            json_response(StatusCode::OK, &serde_json::Value::Array(models))
        }
        (ModelsRoute::Collection, Method::POST) => {
            let model = match read_model(req).await {
                Ok(m) => m,
                Err((status, why)) => return api_error(status, &why),
            };
            let Some(name) = model["metadata"]["name"].as_str().map(str::to_string) else {
                return api_error(StatusCode::BAD_REQUEST, "metadata.name is required");
            };
            let created = state.record(|s| {
                if s.models.contains_key(&name) {
                    return false;
                }
                s.models.insert(name.clone(), model.clone());
                true
            });
            if created {
                json_response(StatusCode::OK, &model)
            } else {
                api_error(
                    StatusCode::CONFLICT,
                    &format!("model {name:?} already exists"),
                )
            }
        }
        (ModelsRoute::Item(name), Method::GET) => {
            match state.record(|s| s.models.get(&name).filter(|m| in_environment(m)).cloned()) {
                Some(model) => json_response(StatusCode::OK, &model),
                None => api_error(StatusCode::NOT_FOUND, &format!("no model {name:?}")),
            }
        }
        (ModelsRoute::Item(name), Method::PUT) => {
            let model = match read_model(req).await {
                Ok(m) => m,
                Err((status, why)) => return api_error(status, &why),
            };
            if model["metadata"]["name"].as_str() != Some(name.as_str()) {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    &format!("metadata.name must be {name:?}"),
                );
            }
            let updated = state.record(|s| match s.models.get_mut(&name) {
                Some(slot) => {
                    *slot = model.clone();
                    true
                }
                None => false,
            });
            if updated {
                json_response(StatusCode::OK, &model)
            } else {
                api_error(StatusCode::NOT_FOUND, &format!("no model {name:?}"))
            }
        }
        (ModelsRoute::Item(name), Method::DELETE) => {
            let removed = state.record(|s| {
                if s.models.get(&name).is_some_and(in_environment) {
                    s.models.remove(&name)
                } else {
                    None
                }
            });
            match removed {
                Some(model) => json_response(StatusCode::OK, &model),
                None => api_error(StatusCode::NOT_FOUND, &format!("no model {name:?}")),
            }
        }
        (route, method) => {
            let allow = match route {
                ModelsRoute::Collection => "GET, POST",
                ModelsRoute::Item(_) => "GET, PUT, DELETE",
            };
            let mut resp = api_error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} is not allowed here"),
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            resp
        }
    }
}

/// A JSON object body, or the 4xx status and why.
async fn read_model(req: Request<Incoming>) -> Result<serde_json::Value, (StatusCode, String)> {
    let body = match read_limited(req.into_body(), MAX_MODEL).await {
        Ok(b) => b,
        Err(None) => return Err((StatusCode::PAYLOAD_TOO_LARGE, "model too large".into())),
        Err(Some(e)) => {
            return Err((StatusCode::BAD_REQUEST, format!("reading the body: {e}")));
        }
    };
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err((
            StatusCode::BAD_REQUEST,
            "the model must be a JSON object".into(),
        )),
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )),
    }
}

/// Each event is its own body frame; hyper writes and flushes a frame as soon
/// as it is produced, so clients see them 100 ms apart.
fn sse() -> Response<Body> {
    let start = Instant::now();
    let mut interval = tokio::time::interval(SSE_INTERVAL);
    // After a stall, keep the spacing rather than bursting to catch up.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = futures::stream::unfold((0u32, interval), move |(i, mut interval)| async move {
        if i >= SSE_EVENTS {
            return None;
        }
        interval.tick().await;
        let event = format!("data: event {i} at {}\n\n", start.elapsed().as_millis());
        Some((
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(event))),
            (i + 1, interval),
        ))
    });
    let mut resp = Response::new(StreamBody::new(events).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells buffering proxies (nginx-style) in between not to hold events back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// RFC 6455 §1.3: appended to the client's key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Whether a comma-separated token of any `name` header is `token` (case-insensitive), as
/// `Connection: keep-alive, Upgrade` names `upgrade`.
fn has_token(headers: &hyper::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 6455 §4.2.2: base64 of the SHA-1 of the key and the GUID.
fn websocket_accept(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{WEBSOCKET_GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Checks a WebSocket opening handshake as real servers do (RFC 6455 §4.2.1, §4.4): the
/// `Sec-WebSocket-Accept` to answer, or the status and reason to refuse it with.
fn websocket_handshake(req: &Request<Incoming>) -> Result<String, (StatusCode, &'static str)> {
    let h = req.headers();
    let bad = StatusCode::BAD_REQUEST;
    if req.version() != Version::HTTP_11 {
        return Err((bad, "a WebSocket handshake is an HTTP/1.1 request"));
    }
    // A proxy that drops `Connection: upgrade` (a hop-by-hop header) is caught here.
    if !has_token(h, header::CONNECTION, "upgrade") {
        return Err((bad, "Connection must name upgrade"));
    }
    if !has_token(h, header::UPGRADE, "websocket") {
        return Err((bad, "Upgrade must name websocket"));
    }
    let mut keys = h.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key.to_str().unwrap_or_default().trim(),
        _ => return Err((bad, "send one Sec-WebSocket-Key")),
    };
    let nonce = base64::engine::general_purpose::STANDARD.decode(key);
    if !nonce.is_ok_and(|n| n.len() == 16) {
        return Err((bad, "Sec-WebSocket-Key must be 16 bytes in base64"));
    }
    let version = h.get(header::SEC_WEBSOCKET_VERSION);
    if version.is_none_or(|v| v.as_bytes().trim_ascii() != b"13") {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    Ok(websocket_accept(key))
}

/// A WebSocket handshake ([`websocket_handshake`] says what it takes): switch protocols, then
/// echo whatever the client sends on the raw stream.
fn upgrade(mut req: Request<Incoming>) -> Response<Body> {
    let accept = match websocket_handshake(&req) {
        Ok(accept) => accept,
        Err((status, why)) => {
            let mut resp = Response::new(full(format!("{why}\n")));
            *resp.status_mut() = status;
            if status == StatusCode::UPGRADE_REQUIRED {
                // RFC 6455 §4.4: the versions the server speaks.
                resp.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            return resp;
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                    eprintln!("fakebeamlit: upgraded echo: {e}");
                }
            }
            Err(e) => eprintln!("fakebeamlit: upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}

async fn upload(state: &State, req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    total += data.len() as u64;
                    digest.update(&data);
                }
            }
            Err(e) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": format!("reading the upload after {total} bytes: {e}")}),
                );
            }
        }
    }
    state.record(|s| s.bytes_uploaded += total);
    json_response(
        StatusCode::OK,
        &json!({"bytes": total, "sha256": hex(digest.finish().as_ref())}),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn status(code: &str) -> Response<Body> {
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
    else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("/status/{code}: want a code in 200..=599")}),
        );
    };
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        // These must not carry a body.
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = status;
        return resp;
    }
    json_response(
        status,
        &json!({"status": status.as_u16(), "served_by": "fake-beamlit"}),
    )
}

async fn echo(req: Request<Incoming>, tls: bool, peer: SocketAddr) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let mut prefix = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    total += data.len() as u64;
                    let room = ECHO_BODY_PREFIX.saturating_sub(prefix.len());
                    prefix.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Err(e) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": format!("reading the body after {total} bytes: {e}")}),
                );
            }
        }
    }
    let path = parts.uri.path_and_query().map_or_else(
        || parts.uri.path().to_string(),
        |pq| pq.as_str().to_string(),
    );
    // HTTP/2 carries the host in `:authority`, which is not a header.
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| headers.get("host").cloned());
    json_response(
        StatusCode::OK,
        &json!({
            "method": parts.method.as_str(),
            "path": path,
            "authority": authority,
            "version": version_str(parts.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&prefix),
            "body_len": total,
            "tls": tls,
            // The client's address and port: requests with the same one came over the same
            // connection.
            "peer": peer.to_string(),
            "served_by": "fake-beamlit",
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_flags() {
        let c = Config::parse(&args(
            "--https 10.0.0.1:443 --https=[::1]:443 --http 0.0.0.0:80 --tcp-echo 10.0.0.1:7 \
             --cert c.pem --key k.pem --client-id me --client-secret s3 --token-ttl-secs 1 \
             --require-token --stats-file s.json --ready-file r.json --models-fail-status 503",
        ))
        .expect("valid flags");
        assert_eq!(c.models_fail_status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert!(Config::parse(&args("--http 1.2.3.4:5 --models-fail-status 42")).is_err());
        assert_eq!(c.https.len(), 2);
        assert_eq!(c.http.len(), 1);
        assert_eq!(c.tcp_echo.len(), 1);
        assert_eq!(c.token_ttl_secs, 1);
        assert!(c.require_token);
        assert_eq!(c.client_id, "me");
        assert!(Config::parse(&args("--https 10.0.0.1:443")).is_err());
        assert!(Config::parse(&args("")).is_err());
        assert!(Config::parse(&args("--http nowhere")).is_err());
        assert!(Config::parse(&args("--http 1.2.3.4:5 --bogus 1")).is_err());
    }

    #[test]
    fn basic_and_bearer_parsing() {
        // "id:se:cret" — the secret may itself contain a colon.
        let b64 = base64::engine::general_purpose::STANDARD.encode("id:se:cret");
        assert_eq!(
            auth_param(&format!("basic {b64}"), "Basic").and_then(parse_basic),
            Some(("id".to_string(), "se:cret".to_string()))
        );
        assert_eq!(parse_basic("!!"), None);
        assert_eq!(auth_param("Bearer tok-1", "bearer"), Some("tok-1"));
        assert_eq!(auth_param("Bearer tok-1", "basic"), None);
        assert!(credential_matches("a%2Bb", "a+b"));
        assert!(credential_matches("a+b", "a+b"));
        assert!(!credential_matches("a", "b"));
    }

    #[test]
    fn models_routes() {
        assert_eq!(models_route("/v0/models"), Some(ModelsRoute::Collection));
        assert_eq!(models_route("/v0/models/"), Some(ModelsRoute::Collection));
        assert_eq!(
            models_route("/v0/models/llama"),
            Some(ModelsRoute::Item("llama".into()))
        );
        // The data plane's paths and other prefixes stay with the echo.
        for other in [
            "/v0/models/llama/predict",
            "/ws/models/llama",
            "/v1/models",
            "/v0/modelsx",
            "/",
        ] {
            assert_eq!(models_route(other), None, "{other}");
        }
    }

    #[test]
    fn status_codes() {
        assert_eq!(status("503").status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status("204").status(), StatusCode::NO_CONTENT);
        assert_eq!(status("99").status(), StatusCode::BAD_REQUEST);
        assert_eq!(status("x").status(), StatusCode::BAD_REQUEST);
    }
}
