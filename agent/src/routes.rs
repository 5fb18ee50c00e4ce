//! The routes file of standalone mode (`beamlit-agent run --routes FILE`).
//!
//! ```yaml
//! tunnel:                       # default tunnel, one address per family
//!   ipv4: 10.200.0.1:15001
//!   ipv6: "[fd00:200::1]:15001"
//! services:
//!   - address: 10.96.0.10:80    # the Service address clients dial (ClusterIP:port)
//!     offloadPercent: 30        # share of new connections sent to the tunnel, 0..=100
//!   - address: "[fd00:96::10]:80"
//!     offloadPercent: 100
//!     tunnel: "[fd00:200::1]:15002"   # per-service override
//!     remote:                   # optional: the agent's own tunnel forwards to this backend
//!       scheme: https
//!       host: run.beamlit.com
//!       pathPrefix: /$workspace/models/$model
//!       workspace: my-workspace
//!       model: my-model
//!       headersToAdd: {X-Beamlit-Environment: production}
//!       auth:
//!         oauth: {tokenUrl: "https://api.beamlit.com/v0/oauth/token", clientId: ID,
//!                 clientSecretFile: /etc/beamlit/client-secret}
//! ```
//!
//! Field checks live in `Deserialize` impls so that the parser reports them with the field's
//! path, line and column; checks across fields name the service and the line and column the
//! parser recorded for the address (or tunnel) at fault.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use beamlit_api::yaml::YamlError;
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use crate::{
    model::{Route, Share},
    tunnel::backend::{self, Auth, Mode, OAuthClient, RemoteBackend, Scheme, Secret},
};

/// A parsed routes file.
#[derive(Debug, Default, Clone)]
pub struct RouteSet {
    pub routes: Vec<Route>,
    /// Services the agent's own tunnel serves: service → (tunnel address, remote backend).
    pub backends: BTreeMap<SocketAddr, (SocketAddr, RemoteBackend)>,
    /// CA bundle trusted in addition to the system roots, for private backends.
    pub extra_ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("cannot read routes file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The parser's error names the field path, line and column. Not a `source`: the message
    /// holds it already, and `{:#}` would print it twice.
    #[error("invalid routes file {path}: {error}")]
    Syntax { path: String, error: YamlError },
    #[error("invalid routes file {path}: {field}: {message} (line {line}, column {column})")]
    Invalid {
        path: String,
        line: u64,
        column: u64,
        field: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    tunnel: Option<DefaultTunnel>,
    #[serde(default, deserialize_with = "beamlit_api::yaml::null_as_default")]
    services: Vec<ServiceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
struct DefaultTunnel {
    #[serde(default)]
    ipv4: Option<Spanned<Address>>,
    #[serde(default)]
    ipv6: Option<Spanned<Address>>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RemoteSpec {
    #[serde(default)]
    mode: Option<ModeSpec>,
    #[serde(default)]
    scheme: Option<SchemeSpec>,
    host: String,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    workspace: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default, deserialize_with = "beamlit_api::yaml::null_as_default")]
    headers_to_add: BTreeMap<String, String>,
    #[serde(default)]
    auth: Option<AuthSpec>,
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    header_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ModeSpec {
    Http,
    Tcp,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum SchemeSpec {
    Http,
    Https,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AuthSpec {
    #[serde(default)]
    bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    oauth: Option<OAuthSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OAuthSpec {
    token_url: String,
    client_id: String,
    client_secret_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceSpec {
    address: Spanned<Address>,
    offload_percent: Percent,
    #[serde(default)]
    tunnel: Option<Spanned<Address>>,
    #[serde(default)]
    remote: Option<RemoteSpec>,
}

/// Keys whose values are `Spanned`, for the error paths (see `beamlit_api::yaml::from_str`). The
/// top-level `tunnel:` is not, but has no `value` key either.
const SPANNED: &[&str] = &["address", "tunnel", "ipv4", "ipv6"];

/// `IP:PORT`, port not 0. The error path names the field.
#[derive(Debug, Clone, Copy)]
struct Address(SocketAddr);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let addr: SocketAddr = text.parse().map_err(|_| {
            serde::de::Error::custom(format_args!(
                "`{text}` is not IP:PORT; write 10.96.0.10:80, or \"[fd00::10]:80\" for IPv6 \
                 (quoted in YAML)"
            ))
        })?;
        if addr.port() == 0 {
            return Err(serde::de::Error::custom(format_args!(
                "`{text}` has port 0; give the port clients connect to"
            )));
        }
        Ok(Address(addr))
    }
}

/// 0..=100, at most two decimals matter (the data plane counts in basis points).
#[derive(Debug, Clone, Copy)]
struct Percent(Share);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Percent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number from 0 to 100")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Percent, E> {
                Share::from_percent(v).map(Percent).ok_or_else(|| {
                    E::custom(format_args!(
                        "{v} is out of range; give a number from 0 to 100"
                    ))
                })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Percent, E> {
                self.visit_f64(v as f64)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Percent, E> {
                self.visit_f64(v as f64)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Parses and validates a routes file. The result has distinct service addresses, each with a
/// tunnel of its own family.
pub fn parse(path_label: &str, text: &str) -> Result<RouteSet, RoutesError> {
    let file: RoutesFile = if text.trim().is_empty() {
        RoutesFile {
            tunnel: None,
            services: Vec::new(),
        }
    } else {
        beamlit_api::yaml::from_str(text, SPANNED).map_err(|error| RoutesError::Syntax {
            path: path_label.to_string(),
            error,
        })?
    };
    let mut seen = BTreeSet::new();
    let mut routes = Vec::with_capacity(file.services.len());
    let mut backends = BTreeMap::new();
    for (index, spec) in file.services.iter().enumerate() {
        let service = spec.address.value.0;
        // At the line and column where the parser found the value at fault: the service's
        // address, or the tunnel chosen for it.
        let invalid_at =
            |at: &serde_saphyr::Location, field: String, message: String| RoutesError::Invalid {
                path: path_label.to_string(),
                line: at.line(),
                column: at.column(),
                field,
                message,
            };
        let invalid = |field: &str, message: String| {
            invalid_at(
                &spec.address.referenced,
                format!("services[{index}].{field}"),
                message,
            )
        };
        if !seen.insert(service) {
            return Err(invalid(
                "address",
                format!("{service} is listed twice; keep one entry per Service address"),
            ));
        }
        let family = if service.is_ipv4() { "ipv4" } else { "ipv6" };
        let default = file.tunnel.as_ref().and_then(|t| {
            if service.is_ipv4() {
                t.ipv4.as_ref()
            } else {
                t.ipv6.as_ref()
            }
        });
        // The field named in an error about the tunnel: the service's own, or the default.
        let (chosen, tunnel_field) = match (&spec.tunnel, default) {
            (Some(own), _) => (Some(own), format!("services[{index}].tunnel")),
            (None, default) => (default, format!("tunnel.{family}")),
        };
        let Some(chosen) = chosen else {
            return Err(invalid(
                "tunnel",
                format!(
                    "no tunnel for {service}: set `tunnel:` on this service or `tunnel.{family}:` \
                     at the top of the file"
                ),
            ));
        };
        let tunnel = chosen.value.0;
        if tunnel.is_ipv4() != service.is_ipv4() {
            return Err(invalid_at(
                &chosen.referenced,
                tunnel_field,
                format!(
                    "tunnel {tunnel} and service {service} (services[{index}]) are of different \
                     IP families; a connection can only be redirected within its family"
                ),
            ));
        }
        if let Some(remote) = &spec.remote {
            let backend = remote_backend(remote)
                .map_err(|(field, message)| invalid(&format!("remote.{field}"), message))?;
            backends.insert(service, (tunnel, backend));
        }
        routes.push(Route {
            service,
            share: spec.offload_percent.0,
            tunnel,
            // Without `remote`, the tunnel is whatever listens there, outside the agent. With
            // it, the agent sets readiness from its own listener (see `standalone`).
            tunnel_ready: true,
            tunnel_heartbeat: spec.remote.is_some(),
        });
    }
    Ok(RouteSet {
        routes,
        backends,
        extra_ca_file: file.tunnel.and_then(|t| t.ca_file),
    })
}

/// Checks across a `remote:` section; errors are (field, message).
fn remote_backend(spec: &RemoteSpec) -> Result<RemoteBackend, (String, String)> {
    let scheme = match spec.scheme.unwrap_or(SchemeSpec::Https) {
        SchemeSpec::Http => Scheme::Http,
        SchemeSpec::Https => Scheme::Https,
    };
    let (host, port) = backend::split_host_port(&spec.host, scheme.default_port()).ok_or_else(|| {
        (
            "host".to_string(),
            format!(
                "`{}` is not host[:port]; write run.beamlit.com, 10.0.0.9:8443 or [fd00::9]:443",
                spec.host
            ),
        )
    })?;
    let mut headers_to_add = Vec::new();
    for (name, value) in &spec.headers_to_add {
        let header = http::HeaderName::try_from(name.as_str()).map_err(|_| {
            (
                format!("headersToAdd.{name}"),
                "is not a valid header name".to_string(),
            )
        })?;
        let value = http::HeaderValue::try_from(value.as_str()).map_err(|_| {
            (
                format!("headersToAdd.{name}"),
                "has a value that is not a valid header value".to_string(),
            )
        })?;
        headers_to_add.push((header, value));
    }
    let read_secret = |field: &str, path: &Path| -> Result<Secret, (String, String)> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            (
                field.to_string(),
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let value = text.trim().to_string();
        if value.is_empty() {
            return Err((field.to_string(), format!("{} is empty", path.display())));
        }
        Ok(Secret::new(value))
    };
    let auth = match &spec.auth {
        None => Auth::None,
        Some(AuthSpec {
            bearer_token_file: Some(_),
            oauth: Some(_),
        }) => {
            return Err((
                "auth".into(),
                "set either bearerTokenFile or oauth, not both".into(),
            ));
        }
        Some(AuthSpec {
            bearer_token_file: Some(path),
            ..
        }) => Auth::Bearer(read_secret("auth.bearerTokenFile", path)?),
        Some(AuthSpec {
            oauth: Some(oauth), ..
        }) => {
            let token_url: http::Uri = oauth.token_url.parse().map_err(|_| {
                (
                    "auth.oauth.tokenUrl".to_string(),
                    format!("`{}` is not a URL", oauth.token_url),
                )
            })?;
            if !matches!(token_url.scheme_str(), Some("http" | "https")) {
                return Err((
                    "auth.oauth.tokenUrl".into(),
                    format!(
                        "`{}` must start with https:// (or http://)",
                        oauth.token_url
                    ),
                ));
            }
            Auth::OAuth(OAuthClient {
                token_url,
                client_id: oauth.client_id.clone(),
                client_secret: read_secret(
                    "auth.oauth.clientSecretFile",
                    &oauth.client_secret_file,
                )?,
            })
        }
        Some(_) => Auth::None,
    };
    Ok(RemoteBackend {
        mode: match spec.mode.unwrap_or(ModeSpec::Http) {
            ModeSpec::Http => Mode::Http,
            ModeSpec::Tcp => Mode::Tcp,
        },
        scheme,
        host,
        port,
        path_prefix: backend::substitute_path_prefix(
            spec.path_prefix.as_deref().unwrap_or(""),
            spec.workspace.as_deref().unwrap_or(""),
            spec.model.as_deref().unwrap_or(""),
        ),
        headers_to_add,
        auth,
        connect_timeout: spec
            .connect_timeout_ms
            .map_or(backend::DEFAULT_CONNECT_TIMEOUT, Duration::from_millis),
        header_timeout: spec
            .header_timeout_ms
            .map_or(backend::DEFAULT_HEADER_TIMEOUT, Duration::from_millis),
    })
}

pub fn load(path: &Path) -> Result<RouteSet, RoutesError> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RoutesError::Read {
        path: label.clone(),
        source,
    })?;
    parse(&label, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
tunnel:
  ipv4: 10.200.0.1:15001
  ipv6: \"[fd00:200::1]:15001\"
services:
  - address: 10.96.0.10:80
    offloadPercent: 30
  - address: \"[fd00:96::10]:80\"
    offloadPercent: 12.5
    tunnel: \"[fd00:200::1]:15002\"
";

    #[test]
    fn parses_a_good_file() {
        let routes = parse("r.yaml", GOOD).expect("valid file").routes;
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].service.to_string(), "10.96.0.10:80");
        assert_eq!(routes[0].share.basis_points(), 3000);
        assert_eq!(routes[0].tunnel.to_string(), "10.200.0.1:15001");
        assert_eq!(routes[1].share.basis_points(), 1250);
        assert_eq!(routes[1].tunnel.to_string(), "[fd00:200::1]:15002");
    }

    #[test]
    fn remote_backend_with_defaults_and_substitution() {
        let text = "tunnel: {ipv4: 10.200.0.1:15001}\nservices:\n  - address: 10.96.0.10:80\n    \
                    offloadPercent: 100\n    remote:\n      host: run.beamlit.com\n      \
                    pathPrefix: /$workspace/models/$model\n      workspace: ws\n      model: m\n      \
                    headersToAdd: {X-Env: prod}\n";
        let set = parse("r.yaml", text).expect("valid");
        let (tunnel, b) = &set.backends[&"10.96.0.10:80".parse().expect("addr")];
        assert_eq!(tunnel.to_string(), "10.200.0.1:15001");
        assert_eq!((b.scheme, b.mode), (Scheme::Https, Mode::Http));
        assert_eq!((b.host.as_str(), b.port), ("run.beamlit.com", 443));
        assert_eq!(b.path_prefix, "/ws/models/m");
        assert_eq!(b.headers_to_add[0].0.as_str(), "x-env");
        assert_eq!(b.auth, Auth::None);
    }

    #[test]
    fn host_port_forms() {
        for (text, expected) in [
            ("run.beamlit.com", Some(("run.beamlit.com", 443))),
            ("10.0.0.9:8443", Some(("10.0.0.9", 8443))),
            ("[fd00::9]:80", Some(("fd00::9", 80))),
            ("fd00::9", Some(("fd00::9", 443))),
            ("host:0", None),
            ("a b", None),
            ("", None),
        ] {
            assert_eq!(
                backend::split_host_port(text, 443),
                expected.map(|(h, p)| (h.to_string(), p)),
                "{text}"
            );
        }
    }

    #[test]
    fn empty_file_means_no_routes() {
        assert!(
            parse("r.yaml", "")
                .expect("empty is valid")
                .routes
                .is_empty()
        );
        // Every entry commented out.
        for text in ["services: []\n", "services:\n#  - address: 10.96.0.10:80\n"] {
            assert!(
                parse("r.yaml", text).expect(text).routes.is_empty(),
                "{text}"
            );
        }
    }

    /// Each bad file must name the line and the field, and say how to fix it.
    #[test]
    fn errors_name_line_and_field() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "percent out of range",
                "tunnel: {ipv4: 10.200.0.1:15001}\nservices:\n  - address: 10.96.0.10:80\n    offloadPercent: 150\n",
                &[
                    "services[0].offloadPercent",
                    "line 4, column 21",
                    "0 to 100",
                ],
            ),
            (
                "bad address",
                "tunnel: {ipv4: 10.200.0.1:15001}\nservices:\n  - address: 10.96.0:80\n    offloadPercent: 10\n",
                &[
                    "services[0].address: `10.96.0:80`",
                    "line 3, column 14",
                    "IP:PORT",
                ],
            ),
            (
                "typo in a field name",
                "services:\n  - address: 10.96.0.10:80\n    ofloadPercent: 10\n",
                &[
                    "services[0].ofloadPercent",
                    "unknown field",
                    "line 3, column 5",
                ],
            ),
            (
                "typo in a top-level key",
                "tunnel: {ipv4: 10.200.0.1:15001}\nservics: []\n",
                &[
                    "servics",
                    "unknown field",
                    "expected one of tunnel, services",
                    "line 2",
                ],
            ),
            (
                "typo in the tunnel section",
                "tunnel: {ipv4: 10.200.0.1:15001, ipv: 10.200.0.1:15002}\n",
                &["tunnel.ipv", "unknown field", "line 1"],
            ),
            (
                "typo in a remote section",
                "services:\n  - address: 10.96.0.10:80\n    offloadPercent: 1\n    remote:\n      host: h\n      hedersToAdd: {}\n",
                &[
                    "services[0].remote.hedersToAdd",
                    "unknown field",
                    "line 6, column 7",
                ],
            ),
            (
                "missing percent",
                "tunnel: {ipv4: 10.200.0.1:15001}\nservices:\n  - address: 10.96.0.10:80\n",
                &["services[0]: missing field `offloadPercent`", "line 3"],
            ),
            (
                "no tunnel for the family",
                "tunnel: {ipv4: 10.200.0.1:15001}\nservices:\n  - address: 10.96.0.10:80\n    offloadPercent: 1\n  - address: \"[fd00::1]:80\"\n    offloadPercent: 1\n",
                &["services[1].tunnel", "line 5, column 14", "tunnel.ipv6"],
            ),
            (
                "family mismatch",
                "services:\n  - address: 10.96.0.10:80\n    offloadPercent: 1\n    tunnel: \"[fd00::1]:1\"\n",
                // At the tunnel (line 4); before serde-saphyr, at the service's address (line 2).
                &[
                    "services[0].tunnel",
                    "line 4, column 13",
                    "different IP families",
                ],
            ),
            (
                "family mismatch in the default tunnel",
                "tunnel: {ipv4: \"[fd00::1]:1\"}\nservices:\n  - address: 10.96.0.10:80\n    offloadPercent: 1\n",
                &[
                    "tunnel.ipv4: tunnel [fd00::1]:1 and service 10.96.0.10:80 (services[0])",
                    "line 1, column 16",
                    "different IP families",
                ],
            ),
            (
                "duplicate",
                "tunnel: {ipv4: 10.200.0.1:15001}\nservices:\n  - address: 10.96.0.10:80\n    offloadPercent: 1\n  - address: 10.96.0.10:80\n    offloadPercent: 2\n",
                &["services[1].address", "line 5, column 14", "twice"],
            ),
            (
                "port 0",
                "services:\n  - address: 10.96.0.10:0\n    offloadPercent: 1\n",
                &[
                    "services[0].address: `10.96.0.10:0`",
                    "line 2, column 14",
                    "port 0",
                ],
            ),
            ("not YAML", "services: [\n", &["line 1, column 11"]),
        ];
        for (name, text, needles) in cases {
            let err = parse("r.yaml", text).expect_err(name).to_string();
            for needle in *needles {
                assert!(err.contains(needle), "{name}: `{err}` lacks `{needle}`");
            }
        }
    }
}
