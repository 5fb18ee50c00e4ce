//! Forward layer, HTTP mode: a reverse proxy toward the Service's remote backend. Bodies stream
//! both ways (an SSE event reaches the client when the remote sends it; uploads pass with
//! bounded memory). Failures become fast 502/503/504 answers whose body says why.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
    uri::PathAndQuery,
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::{debug, warn};

use super::{
    Route, auth,
    backend::Scheme,
    client::{self, Body, BoxError},
    h1, h2pool,
    limits::relay_until_idle,
};

/// What every request of one client connection shares.
struct ClientConn {
    /// The client's address as `X-Forwarded-For` carries it, made once per connection.
    forwarded_for: Option<HeaderValue>,
    /// Plain-HTTP remotes: this connection's own upstream connections, handed to the remote's
    /// pool when it ends (see `h1`).
    upstreams: Arc<h1::Upstreams>,
}

impl ClientConn {
    fn new(addr: SocketAddr, pool: Arc<h1::Pool>) -> Self {
        Self {
            forwarded_for: HeaderValue::try_from(addr.ip().to_canonical().to_string()).ok(),
            upstreams: Arc::new(h1::Upstreams::new(pool)),
        }
    }
}

/// The connection preface of HTTP/2 with prior knowledge (h2c, RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one accepted client connection: HTTP/1.1 (keep-alive, chunked bodies, upgrades), or
/// h2c when the client opens with the HTTP/2 preface (gRPC clients do).
pub async fn serve(stream: TcpStream, client_addr: SocketAddr, route: Arc<Route>) {
    // A client that sends nothing at all is cut at the header timeout too.
    let header_timeout = route.limits.header_timeout;
    let peeked = tokio::time::timeout(header_timeout, opens_with_h2_preface(&stream))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    let h2 = match peeked {
        Ok(h2) => h2,
        Err(e) => {
            debug!(client = %client_addr, "client connection ended before a request: {e}");
            return;
        }
    };
    let client = Arc::new(ClientConn::new(client_addr, route.h1_pool.clone()));
    let service = hyper::service::service_fn(move |req| {
        let route = route.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(handle(req, &client, &route).await) }
    });
    let io = TokioIo::new(stream);
    let served = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await
    } else {
        // The head deadline runs from the accept, and again after every response: it also
        // closes keep-alive connections left idle.
        hyper::server::conn::http1::Builder::new()
            // Header names as Go's net/http writes them (`Cf-Ray`, not the `cf-ray` an HTTP/2
            // remote sends): names are case-insensitive to every HTTP client, but scripts are
            // not, e.g. the README's walkthrough, `grep -q 'Cf-Ray'` on curl's output.
            .title_case_headers(true)
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    if let Err(e) = served {
        debug!(client = %client_addr, "client connection ended: {e}");
    }
}

/// Tells HTTP/2 from HTTP/1 by peeking at the first bytes, so they stay in the socket for the
/// protocol's own reader. (Reading them into a prefix buffer instead, as hyper-util's `auto`
/// server does, makes hyper grow every connection's read buffer to 16 KiB; with a thousand
/// connections that is 8 MB more.) HTTP/1 is known from the first byte that differs from the
/// preface, usually the first one.
async fn opens_with_h2_preface(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if first[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface so far. Peeking again returns at once while those bytes wait, so
        // pause briefly; clients rarely split these 24 bytes. (The caller bounds the wait.)
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn handle(mut req: Request<Incoming>, client: &ClientConn, route: &Route) -> Response<Body> {
    let metrics = &route.metrics;
    let backend = &route.backend;
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let authorization = match auth::authorization(&backend.auth, route.tokens.as_deref()).await {
        Ok(value) => value,
        Err(e) => {
            metrics.request(&route.label, "token_error");
            warn!(service = %route.label, "{e}");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "token",
                &format!(
                    "cannot authenticate to the remote backend of {}: {e}",
                    route.label
                ),
            );
        }
    };
    let upstream = match upstream_request(req, client, route, authorization, upgrade) {
        Ok(r) => r,
        Err(e) => {
            metrics.request(&route.label, "bad_request");
            return error(StatusCode::BAD_REQUEST, "request", &e);
        }
    };

    let sent_at = Instant::now();
    let reply = tokio::time::timeout(
        backend.header_timeout,
        forward(upstream, route, &client.upstreams, upgrade),
    )
    .await;
    let reply = match reply {
        Err(_) => {
            metrics.request(&route.label, "timeout");
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                &format!(
                    "remote backend {} sent no response headers within {:?}",
                    backend.authority(),
                    backend.header_timeout
                ),
            );
        }
        Ok(Err(failure)) => {
            metrics.request(&route.label, failure.kind);
            warn!(service = %route.label, remote = %backend.authority(), "upstream failed: {}", failure.cause);
            return error(
                failure.status,
                failure.kind,
                &format!(
                    "remote backend {} {}: {}",
                    backend.authority(),
                    failure.what,
                    failure.cause
                ),
            );
        }
        Ok(Ok(reply)) => reply,
    };
    route.stats.latency.observe(sent_at.elapsed().as_secs_f64());
    let response = match reply {
        Upstream::Response(response) => response,
        Upstream::Switched(response, upstream_io) => {
            route.stats.response(response.status().as_u16());
            return match client_upgrade {
                Some(client_upgrade) => {
                    switch_protocols(response, client_upgrade, upstream_io, route)
                }
                // A 101 the client did not ask for cannot be passed on.
                None => error(
                    StatusCode::BAD_GATEWAY,
                    "protocol",
                    &format!(
                        "remote backend {} switched protocols unasked",
                        backend.authority()
                    ),
                ),
            };
        }
    };
    let status = response.status();
    route.stats.response(status.as_u16());

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let from_remote = route.stats.from_remote.clone();
    let body = body
        .map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                from_remote.inc_by(data.len() as u64);
            }
            frame
        })
        .boxed();
    Response::from_parts(parts, body)
}

fn upstream_request(
    req: Request<Incoming>,
    client: &ClientConn,
    route: &Route,
    authorization: Option<String>,
    upgrade: bool,
) -> Result<Request<Body>, String> {
    let backend = &route.backend;
    let (mut parts, body) = req.into_parts();
    let uri = upstream_uri(route, parts.uri.path_and_query())?;

    let original_host = parts.headers.get(header::HOST).cloned();
    let upgrade_headers = upgrade.then(|| {
        (
            parts.headers.get(header::UPGRADE).cloned(),
            parts.headers.get(header::CONNECTION).cloned(),
        )
    });
    strip_hop_by_hop(&mut parts.headers);
    // The client pool sets Host (HTTP/1.1) or :authority (HTTP/2) from the URI: the remote's.
    parts.headers.remove(header::HOST);
    append_forwarded_for(&mut parts.headers, client.forwarded_for.as_ref());
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = original_host {
        parts.headers.insert("x-forwarded-host", host);
    }
    for (name, value) in &backend.headers_to_add {
        parts.headers.insert(name.clone(), value.clone());
    }
    if let Some(value) = authorization {
        let value = HeaderValue::try_from(value).map_err(|_| "invalid token value".to_string())?;
        parts.headers.insert(header::AUTHORIZATION, value);
    }
    if let Some((Some(up), connection)) = upgrade_headers {
        parts.headers.insert(header::UPGRADE, up);
        parts.headers.insert(
            header::CONNECTION,
            connection.unwrap_or(HeaderValue::from_static("upgrade")),
        );
    }
    parts.uri = uri;
    // Let the pool pick HTTP/2 or HTTP/1.1 by ALPN; upgrades exist only in HTTP/1.1.
    parts.version = Version::HTTP_11;
    let to_remote = route.stats.to_remote.clone();
    let body = body
        .map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                to_remote.inc_by(data.len() as u64);
            }
            frame
        })
        .map_err(BoxError::from)
        .boxed();
    Ok(Request::from_parts(parts, body))
}

/// The remote's scheme and authority (parsed once per route) with the path prefix and the
/// client's path and query.
fn upstream_uri(route: &Route, client_path: Option<&PathAndQuery>) -> Result<Uri, String> {
    let path = client_path.map_or("/", PathAndQuery::as_str);
    let Some((scheme, authority)) = &route.origin else {
        return Err(format!(
            "cannot build the upstream URI for {path}: invalid remote host {}",
            route.backend.authority()
        ));
    };
    let prefix = &route.backend.path_prefix;
    let path_and_query = match client_path {
        Some(p) if prefix.is_empty() => p.clone(),
        _ => PathAndQuery::try_from(format!("{prefix}{path}"))
            .map_err(|e| format!("cannot build the upstream URI for {path}: {e}"))?,
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(scheme.clone());
    uri.authority = Some(authority.clone());
    uri.path_and_query = Some(path_and_query);
    Uri::from_parts(uri).map_err(|e| format!("cannot build the upstream URI for {path}: {e}"))
}

/// What the remote answered, as the client's side needs it.
enum Upstream {
    Response(Response<Body>),
    /// `101 Switching Protocols`: the head, and the remote's side of the switched connection.
    Switched(Response<Body>, SwitchedRemote),
}

enum SwitchedRemote {
    /// From hyper's client (HTTPS remotes).
    Hyper(hyper::upgrade::OnUpgrade),
    /// From the plain-HTTP forwarder.
    Plain(h1::Upgraded),
}

/// Why forwarding failed, as the client is told.
struct Failure {
    status: StatusCode,
    /// The metric outcome and the `x-beamlit-agent-error` value.
    kind: &'static str,
    what: &'static str,
    cause: String,
}

impl Failure {
    fn unreachable(cause: String) -> Self {
        Self {
            status: StatusCode::BAD_GATEWAY,
            kind: "unreachable",
            what: "unreachable",
            cause,
        }
    }
}

/// Sends the request on the way the remote's scheme calls for: the client connection's own
/// HTTP/1.1 connection for plain HTTP; for HTTPS the remote's HTTP/2 connections
/// ([`super::h2pool`]) when its ALPN says h2, else (and for upgrades, which exist only in
/// HTTP/1.1) hyper's pooled client.
async fn forward(
    req: Request<Body>,
    route: &Route,
    upstreams: &Arc<h1::Upstreams>,
    upgrade: bool,
) -> Result<Upstream, Failure> {
    let backend = &route.backend;
    match backend.scheme {
        Scheme::Http => {
            let reply = h1::send(upstreams, &route.target, route.dialer, req).await;
            match reply {
                Ok(h1::Reply::Response(response)) => Ok(Upstream::Response(response)),
                Ok(h1::Reply::Upgraded(response, io)) => {
                    Ok(Upstream::Switched(response, SwitchedRemote::Plain(io)))
                }
                Err(e @ (h1::SendError::Connect(_) | h1::SendError::Io(_))) => {
                    Err(Failure::unreachable(e.to_string()))
                }
                Err(e @ h1::SendError::Protocol(_)) => Err(Failure {
                    status: StatusCode::BAD_GATEWAY,
                    kind: "protocol",
                    what: "sent an answer that is not valid HTTP/1.1",
                    cause: e.to_string(),
                }),
                Err(e @ h1::SendError::ClientBody(_)) => Err(Failure {
                    status: StatusCode::BAD_REQUEST,
                    kind: "request",
                    what: "did not get the whole request",
                    cause: e.to_string(),
                }),
            }
        }
        Scheme::Https => {
            let req = match &route.h2_pool {
                Some(pool) if !upgrade => match pool.send(req).await {
                    Ok(h2pool::Sent::Response(response)) => {
                        return Ok(Upstream::Response(response));
                    }
                    Ok(h2pool::Sent::Http1(req)) => req,
                    Err(cause) => return Err(Failure::unreachable(cause)),
                },
                _ => req,
            };
            legacy(req, &route.http).await
        }
    }
}

/// An HTTPS request through hyper's pooled client (HTTP/1.1 remotes, upgrades).
async fn legacy(req: Request<Body>, http: &client::HttpClient) -> Result<Upstream, Failure> {
    match http.request(req).await {
        Ok(mut response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let remote = hyper::upgrade::on(&mut response);
            let (parts, _) = response.into_parts();
            Ok(Upstream::Switched(
                Response::from_parts(parts, client::full(Bytes::new())),
                SwitchedRemote::Hyper(remote),
            ))
        }
        Ok(response) => Ok(Upstream::Response(
            response.map(|body| body.map_err(BoxError::from).boxed()),
        )),
        Err(e) => Err(Failure::unreachable(client::root_cause(&e))),
    }
}

/// 101 from the remote: hand the client the switch, then splice the two switched connections.
fn switch_protocols(
    response: Response<Body>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    remote: SwitchedRemote,
    route: &Route,
) -> Response<Body> {
    let stats = route.stats.clone();
    let label = route.label.clone();
    let idle = route.limits.idle_timeout;
    tokio::spawn(async move {
        let mut client = match client_upgrade.await {
            Ok(io) => TokioIo::new(io),
            Err(e) => {
                debug!(service = %label, "client upgrade failed: {e}");
                return;
            }
        };
        let relayed = match remote {
            SwitchedRemote::Hyper(remote) => match remote.await {
                Ok(io) => relay_until_idle(&mut client, &mut TokioIo::new(io), idle).await,
                Err(e) => {
                    debug!(service = %label, "remote upgrade failed: {e}");
                    return;
                }
            },
            SwitchedRemote::Plain(h1::Upgraded { early, mut stream }) => {
                // Bytes the remote sent right behind its 101 head go first.
                if client.write_all(&early).await.is_err() {
                    return;
                }
                stats.from_remote.inc_by(early.len() as u64);
                relay_until_idle(&mut client, &mut stream, idle).await
            }
        };
        if let Ok((sent, received)) = relayed {
            stats.to_remote.inc_by(sent);
            stats.from_remote.inc_by(received);
        }
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, client::full(Bytes::new()))
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those the
/// Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of a lookup for each.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::try_from(t.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Appends the client to `X-Forwarded-For` (`client`: its address as a header value).
fn append_forwarded_for(headers: &mut HeaderMap, client: Option<&HeaderValue>) {
    let Some(client) = client else {
        return;
    };
    let combined = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|existing| {
            let ip = client.to_str().ok()?;
            HeaderValue::try_from(format!("{existing}, {ip}")).ok()
        });
    headers.insert(
        "x-forwarded-for",
        combined.unwrap_or_else(|| client.clone()),
    );
}

/// An answer from the agent itself (not the remote): says which part failed and why.
pub fn error(status: StatusCode, kind: &'static str, message: &str) -> Response<Body> {
    let mut response = Response::new(client::full(format!("beamlit-agent: {message}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert("x-beamlit-agent-error", HeaderValue::from_static(kind));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_with_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        for addr in ["10.200.1.2:5000", "[::ffff:10.0.0.9]:5000"] {
            let client = ClientConn::new(addr.parse().expect("addr"), Arc::default());
            append_forwarded_for(&mut h, client.forwarded_for.as_ref());
        }
        assert_eq!(h["x-forwarded-for"], "10.200.1.2, 10.0.0.9");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&h));
    }
}
