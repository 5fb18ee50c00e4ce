//! The upstream HTTP client shared by forwarding and token requests: rustls with the system roots
//! plus an optional CA bundle (verification is always on), ALPN h2 and http/1.1, pooled. HTTPS
//! remotes that choose h2 are forwarded over [`super::h2pool`] instead; this client serves
//! HTTP/1.1 remotes, upgrades and token requests.
use std::{fs, io, path::Path, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper_rustls::HttpsConnector;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rustls_pki_types::{CertificateDer, pem::PemObject};

use super::dial::Dialer;

/// Errors of bodies in either direction: hyper's, or the plain-HTTP forwarder's ([`super::h1`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<HttpsConnector<Dialer>, Body>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn tls_config(extra_ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A malformed system certificate is skipped, not fatal.
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        let pem = fs::read(path)
            .map_err(|e| anyhow::anyhow!("reading CA bundle {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| anyhow::anyhow!("CA bundle {}: {e}", path.display()))?;
            roots.add(cert)?;
            added += 1;
        }
        if added == 0 {
            anyhow::bail!("CA bundle {} holds no certificate", path.display());
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    // ALPN (h2, http/1.1) is set by the connector from the protocols it enables.
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

pub fn http_client(tls: rustls::ClientConfig, dialer: Dialer) -> HttpClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(dialer);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

/// The innermost cause of an error chain, for messages users read ("connection refused",
/// "invalid peer certificate: UnknownIssuer").
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    let text = current.to_string();
    if let Some(io) = current.downcast_ref::<io::Error>()
        && let Some(inner) = io.get_ref()
    {
        return inner.to_string();
    }
    text
}
