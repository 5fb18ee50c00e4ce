//! Where a Service's offloaded traffic goes: the remote backend, as the tunnel uses it.
use std::{fmt, path::PathBuf, time::Duration};

use http::{HeaderName, HeaderValue, Uri};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// HTTP-aware: path prefix, headers, credentials, per-request errors.
    Http,
    /// Bytes pass through to host:port unchanged.
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A secret value (client secret, bearer token). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthClient {
    pub token_url: Uri,
    pub client_id: String,
    pub client_secret: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    /// A static token sent as `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// OAuth2 client credentials; the token is cached until shortly before it expires.
    OAuth(OAuthClient),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBackend {
    pub mode: Mode,
    pub scheme: Scheme,
    /// Host name or IP, without port.
    pub host: String,
    pub port: u16,
    /// With `$workspace` and `$model` substituted; no trailing slash ("" for none).
    pub path_prefix: String,
    pub headers_to_add: Vec<(HeaderName, HeaderValue)>,
    pub auth: Auth,
    pub connect_timeout: Duration,
    /// Time allowed for the remote's response headers once the request is sent.
    pub header_timeout: Duration,
}

impl RemoteBackend {
    /// `host[:port]` as it goes into the Host header and the upstream URI (port only when it is
    /// not the scheme's default).
    pub fn authority(&self) -> String {
        if self.port == self.scheme.default_port() {
            self.bracketed_host()
        } else {
            self.host_port()
        }
    }

    /// Scheme and authority as URI parts, for the upstream requests' URIs.
    pub fn origin(&self) -> Option<(http::uri::Scheme, http::uri::Authority)> {
        let scheme = match self.scheme {
            Scheme::Http => http::uri::Scheme::HTTP,
            Scheme::Https => http::uri::Scheme::HTTPS,
        };
        Some((scheme, self.authority().parse().ok()?))
    }

    /// `host:port` always, as a socket address to connect to.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.bracketed_host(), self.port)
    }

    fn bracketed_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host) // IPv6 literal
        } else {
            self.host.clone()
        }
    }
}

/// Default timeouts: connecting fails fast; a model can take a while to answer.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// `$workspace` and `$model` in a path prefix, as the earlier product did.
pub fn substitute_path_prefix(prefix: &str, workspace: &str, model: &str) -> String {
    normalize_path_prefix(
        &prefix
            .replace("$workspace", workspace)
            .replace("$model", model),
    )
}

/// A path prefix as the tunnel prepends it: a leading slash, no trailing one ("" for none).
pub fn normalize_path_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() || trimmed.starts_with('/') {
        trimmed.to_string()
    } else {
        format!("/{trimmed}")
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 literal.
pub fn split_host_port(text: &str, default_port: u16) -> Option<(String, u16)> {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok().filter(|p| *p != 0)?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    if text.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some((text.to_string(), default_port));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok().filter(|p| *p != 0)?),
        None => (text, default_port),
    };
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    valid.then(|| (host.to_string(), port))
}

/// The CA bundle to trust in addition to the system roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub extra_ca_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_prefix_substitution() {
        for (prefix, expected) in [
            ("/$workspace/models/$model", "/ws/models/m"),
            ("$workspace/$model/", "/ws/m"),
            ("", ""),
            ("/", ""),
            ("/fixed", "/fixed"),
        ] {
            assert_eq!(
                substitute_path_prefix(prefix, "ws", "m"),
                expected,
                "{prefix}"
            );
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let auth = Auth::Bearer(Secret::new("hunter2".into()));
        assert!(!format!("{auth:?}").contains("hunter2"));
    }

    #[test]
    fn authority_omits_default_ports_and_brackets_ipv6() {
        let mut b = RemoteBackend {
            mode: Mode::Http,
            scheme: Scheme::Https,
            host: "run.beamlit.com".into(),
            port: 443,
            path_prefix: String::new(),
            headers_to_add: vec![],
            auth: Auth::None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
        };
        assert_eq!(b.authority(), "run.beamlit.com");
        b.port = 8443;
        assert_eq!(b.authority(), "run.beamlit.com:8443");
        b.host = "fd00::9".into();
        assert_eq!(b.authority(), "[fd00::9]:8443");
    }
}
