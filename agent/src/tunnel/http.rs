//! Forward layer, HTTP mode: a reverse proxy toward the Service's remote backend. Bodies stream
//! both ways (an SSE event reaches the client when the remote sends it; uploads pass with
//! bounded memory). Failures become fast 502/503/504 answers whose body says why.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    Route, auth,
    client::{self, Body},
};

/// Serves one accepted client connection (HTTP/1.1 with keep-alive and upgrades, or h2c).
pub async fn serve(stream: TcpStream, client_addr: SocketAddr, route: Arc<Route>) {
    let service = hyper::service::service_fn(move |req| {
        let route = route.clone();
        async move { Ok::<_, Infallible>(handle(req, client_addr, &route).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        debug!(client = %client_addr, "client connection ended: {e}");
    }
}

async fn handle(
    mut req: Request<Incoming>,
    client_addr: SocketAddr,
    route: &Route,
) -> Response<Body> {
    let metrics = &route.metrics;
    let backend = &route.backend;
    let authority = backend.authority();
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
    let upstream = match upstream_request(req, client_addr, route, authorization, upgrade) {
        Ok(r) => r,
        Err(e) => {
            metrics.request(&route.label, "bad_request");
            return error(StatusCode::BAD_REQUEST, "request", &e);
        }
    };

    let sent_at = Instant::now();
    let response =
        match tokio::time::timeout(backend.header_timeout, route.http.request(upstream)).await {
            Err(_) => {
                metrics.request(&route.label, "timeout");
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    &format!(
                        "remote backend {authority} sent no response headers within {:?}",
                        backend.header_timeout
                    ),
                );
            }
            Ok(Err(e)) => {
                let cause = client::root_cause(&e);
                metrics.request(&route.label, "unreachable");
                warn!(service = %route.label, remote = %authority, "upstream failed: {cause}");
                return error(
                    StatusCode::BAD_GATEWAY,
                    "unreachable",
                    &format!("remote backend {authority} unreachable: {cause}"),
                );
            }
            Ok(Ok(response)) => response,
        };
    route.stats.latency.observe(sent_at.elapsed().as_secs_f64());
    let status = response.status();
    route.stats.response(status.as_u16());

    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        return switch_protocols(response, client_upgrade, route);
    }

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
    client_addr: SocketAddr,
    route: &Route,
    authorization: Option<String>,
    upgrade: bool,
) -> Result<Request<Body>, String> {
    let backend = &route.backend;
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = format!(
        "{}://{}{}{}",
        backend.scheme.as_str(),
        backend.authority(),
        backend.path_prefix,
        path
    )
    .parse()
    .map_err(|e| format!("cannot build the upstream URI for {path}: {e}"))?;

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
    append_forwarded_for(&mut parts.headers, client_addr);
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
        .boxed();
    Ok(Request::from_parts(parts, body))
}

/// 101 from the remote: hand the client the switch, then splice the two upgraded streams.
fn switch_protocols(
    mut response: Response<Incoming>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    route: &Route,
) -> Response<Body> {
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let stats = route.stats.clone();
    let label = route.label.clone();
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(service = %label, "upgrade failed: {e}");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        if let Ok((sent, received)) =
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
        {
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
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client: SocketAddr) {
    let ip = client.ip().to_canonical().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {ip}"),
        None => ip,
    };
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert("x-forwarded-for", value);
    }
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
        append_forwarded_for(&mut h, "10.200.1.2:5000".parse().expect("addr"));
        append_forwarded_for(&mut h, "[::ffff:10.0.0.9]:5000".parse().expect("addr"));
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
