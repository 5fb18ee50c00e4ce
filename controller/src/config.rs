//! The controller's configuration file (`--config FILE`, what the Helm chart renders). Unknown
//! keys and bad values are refused with the key's path, line and column, so a chart and a binary
//! that disagree fail at start, not in production.
//!
//! ```yaml
//! stabilizationWindowSeconds: 60
//! resyncSeconds: 15
//! httpAddr: 0.0.0.0:8080
//! prometheusUrl: http://prometheus.monitoring:9090
//! namespaces: [models]
//! leaderElection: {enabled: true, namespace: beamlit-system, name: beamlit-controller, leaseDurationSeconds: 15}
//! workspace: my-workspace          # substituted for $workspace in remote backend paths
//! agentNamespace: beamlit-system   # where the agents' Leases (acknowledgements) live
//! beamlitApi:                      # optional: keep the models on Beamlit (finalizer, labels)
//!   baseUrl: https://api.beamlit.com/v0
//!   tokenFile: /etc/beamlit/api-token   # base64 of clientId:clientSecret
//! defaultRemoteBackend:            # for ModelDeployments without spec.offloadingConfig.remoteBackend
//!   host: run.beamlit.com
//!   scheme: https
//!   pathPrefix: /$workspace/models/$model
//!   authConfig:
//!     oauthConfig:
//!       clientId: ID
//!       tokenUrl: https://api.beamlit.com/v0/oauth/token
//!       clientSecretRef: {namespace: beamlit-system, name: beamlit-credentials, key: clientSecret}
//! # The cluster admin's boundary (see crate::admission):
//! protectedServices: [beamlit-system/beamlit-controller-metrics]  # besides default/kubernetes, kube-system/*
//! allowedRemoteHosts: [fallback.internal, "*.models.example"]     # besides the default backend's
//! allowInsecureTokenUrls: false    # true: http token URLs (test backends only)
//! ```
use std::{net::SocketAddr, path::Path};

use serde::Deserialize;

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    pub stabilization_window_seconds: Option<u64>,
    pub resync_seconds: Option<u64>,
    pub http_addr: Option<SocketAddr>,
    pub prometheus_url: Option<String>,
    #[serde(default, deserialize_with = "beamlit_api::yaml::null_as_default")]
    pub namespaces: Vec<String>,
    #[serde(default, deserialize_with = "beamlit_api::yaml::null_as_default")]
    pub leader_election: LeaderElectionConfig,
    pub workspace: Option<String>,
    pub agent_namespace: Option<String>,
    pub default_remote_backend: Option<crate::backend::DefaultRemoteBackend>,
    pub beamlit_api: Option<BeamlitApiFileConfig>,
    /// `namespace/name` or `namespace/*`: Services no ModelDeployment may offload, besides the
    /// built-in ones.
    #[serde(default, deserialize_with = "beamlit_api::yaml::null_as_default")]
    pub protected_services: Vec<String>,
    /// Hosts a ModelDeployment's own remote backend (and token URL) may name, besides the
    /// default backend's; `*.example.com` for every name under example.com.
    #[serde(default, deserialize_with = "beamlit_api::yaml::null_as_default")]
    pub allowed_remote_hosts: Vec<String>,
    /// Plain-http token URLs are accepted (test backends only).
    #[serde(default)]
    pub allow_insecure_token_urls: bool,
}

impl FileConfig {
    /// The admission policy these settings make.
    pub fn policy(&self) -> crate::admission::Policy {
        crate::admission::Policy {
            protected_services: self.protected_services.clone(),
            allowed_remote_hosts: self.allowed_remote_hosts.clone(),
            allow_insecure_token_urls: self.allow_insecure_token_urls,
        }
    }
}

/// `beamlitApi`: how the controller reaches the Beamlit API (models, the `offloading` label).
/// Without it, everything but the Beamlit model sync works ("offload to any backend").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BeamlitApiFileConfig {
    /// Default `https://api.beamlit.com/v0`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// A file holding the API token, base64 of `clientId:clientSecret` (the Helm value
    /// `beamlitApiToken`, mounted from a Secret).
    pub token_file: std::path::PathBuf,
    /// CA bundle trusted besides the system roots (private endpoints).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LeaderElectionConfig {
    pub enabled: Option<bool>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub lease_duration_seconds: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A value that did not deserialize: its key path, line and column. Not a `source`: the
    /// message holds it already, and `{:#}` would print it twice.
    #[error("invalid configuration file {path}: {error}")]
    Syntax {
        path: String,
        error: beamlit_api::yaml::YamlError,
    },
    #[error("invalid configuration file {path}: {message}")]
    Invalid { path: String, message: String },
}

pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: label.clone(),
        source,
    })?;
    parse(&label, &text)
}

pub fn parse(label: &str, text: &str) -> Result<FileConfig, ConfigError> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    let config: FileConfig =
        beamlit_api::yaml::from_str(text, &[]).map_err(|error| ConfigError::Syntax {
            path: label.to_string(),
            error,
        })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: label.to_string(),
        message,
    };
    if config.resync_seconds == Some(0) {
        return Err(invalid("resyncSeconds: must be at least 1".into()));
    }
    if config
        .leader_election
        .lease_duration_seconds
        .is_some_and(|s| s < 2)
    {
        return Err(invalid(
            "leaderElection.leaseDurationSeconds: must be at least 2".into(),
        ));
    }
    if let Some(url) = &config.prometheus_url {
        crate::metric_source::Prometheus::new(url)
            .map_err(|e| invalid(format!("prometheusUrl: {e}")))?;
    }
    if let Some(backend) = &config.default_remote_backend {
        use beamlit_api::validate;
        if backend.host.trim().is_empty() {
            return Err(invalid(
                "defaultRemoteBackend.host: must not be empty; write host[:port]".into(),
            ));
        }
        validate::host(&backend.host)
            .map_err(|e| invalid(format!("defaultRemoteBackend.host: {e}")))?;
        validate::path_prefix(&backend.path_prefix)
            .map_err(|e| invalid(format!("defaultRemoteBackend.pathPrefix: {e}")))?;
        for (name, value) in &backend.headers_to_add {
            validate::header_name(name)
                .and_then(|()| validate::header_value(value))
                .map_err(|e| invalid(format!("defaultRemoteBackend.headersToAdd.{name}: {e}")))?;
        }
        if let Some(url) = backend
            .auth_config
            .as_ref()
            .and_then(|a| a.oauth_config.token_url.as_deref())
        {
            validate::token_url(url, config.allow_insecure_token_urls).map_err(|e| {
                invalid(format!(
                    "defaultRemoteBackend.authConfig.oauthConfig.tokenUrl: {e}"
                ))
            })?;
        }
    }
    for entry in &config.protected_services {
        let valid = entry.split_once('/').is_some_and(|(ns, name)| {
            beamlit_api::validate::dns_label(ns).is_ok()
                && (name == "*" || beamlit_api::validate::dns_label(name).is_ok())
        });
        if !valid {
            return Err(invalid(format!(
                "protectedServices: `{entry}` is not namespace/name or namespace/*"
            )));
        }
    }
    for host in &config.allowed_remote_hosts {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        if (bare.contains(':') && !bare.starts_with('['))
            || beamlit_api::validate::host(bare).is_err()
        {
            return Err(invalid(format!(
                "allowedRemoteHosts: `{host}` is not a host name or address (no scheme, port or \
                 path; `*.example.com` for every name under example.com)"
            )));
        }
    }
    if config.beamlit_api.is_some() && config.workspace.is_none() {
        return Err(invalid(
            "beamlitApi: needs `workspace` (the Beamlit workspace the models belong to)".into(),
        ));
    }
    if let Some(bad) = config.namespaces.iter().find(|n| n.trim().is_empty()) {
        return Err(invalid(format!(
            "namespaces: `{bad}` is not a namespace name"
        )));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let c = parse(
            "c.yaml",
            "stabilizationWindowSeconds: 30\nresyncSeconds: 5\nhttpAddr: 127.0.0.1:9\n\
             prometheusUrl: http://p:9090\nnamespaces: [a, b]\n\
             leaderElection: {enabled: false, namespace: x, name: l, leaseDurationSeconds: 9}\n\
             workspace: ws\nagentNamespace: agents\n\
             defaultRemoteBackend:\n  authConfig:\n    oauthConfig:\n      clientId: c\n      \
             clientSecretRef: {namespace: n, name: s, key: k}\n",
        )
        .expect("valid");
        assert_eq!(c.stabilization_window_seconds, Some(30));
        assert_eq!(c.namespaces, vec!["a", "b"]);
        assert_eq!(c.leader_election.enabled, Some(false));
        assert_eq!(c.leader_election.lease_duration_seconds, Some(9));
        assert_eq!(c.workspace.as_deref(), Some("ws"));
        let backend = c.default_remote_backend.expect("default backend");
        assert_eq!(backend.host, crate::backend::DEFAULT_HOST);
        assert_eq!(backend.path_prefix, crate::backend::DEFAULT_PATH_PREFIX);
        for empty in [
            "",
            "namespaces:\nleaderElection:\nprotectedServices:\nallowedRemoteHosts:\n",
        ] {
            assert_eq!(
                parse("c.yaml", empty).expect("empty is valid"),
                FileConfig::default(),
                "{empty:?}"
            );
        }
        let c = parse(
            "c.yaml",
            "protectedServices: [ns/svc, infra/*]\nallowedRemoteHosts: [a.example, '*.b.example', '[fd00::9]']\n\
             allowInsecureTokenUrls: true\ndefaultRemoteBackend:\n  authConfig:\n    oauthConfig:\n      \
             clientId: c\n      tokenUrl: http://t/token\n      clientSecretRef: {namespace: n, name: s, key: k}\n",
        )
        .expect("valid");
        assert!(c.policy().allow_insecure_token_urls);
        assert_eq!(c.policy().protected_services, vec!["ns/svc", "infra/*"]);
    }

    /// Each bad file names the key (and, from the parser, the line).
    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &[&str])] = &[
            (
                "stabilisationWindowSeconds: 30\n",
                // serde-saphyr lists the expected keys without backticks.
                &[
                    "unknown field `stabilisationWindowSeconds`",
                    "expected one of stabilizationWindowSeconds",
                    "line 1, column 1",
                ],
            ),
            (
                "leaderElection:\n  leaseDuration: 5\n",
                &[
                    "leaderElection.leaseDuration",
                    "unknown field `leaseDuration`",
                    "line 2, column 3",
                ],
            ),
            ("resyncSeconds: -1\n", &["resyncSeconds", "line 1"]),
            ("resyncSeconds: 0\n", &["resyncSeconds: must be at least 1"]),
            ("httpAddr: localhost\n", &["httpAddr", "line 1"]),
            (
                "prometheusUrl: https://p\n",
                &["prometheusUrl", "http://host:port"],
            ),
            (
                "defaultRemoteBackend:\n  authConfig:\n    oauthConfig: {clientId: c, clientSecret: s}\n",
                &[
                    "defaultRemoteBackend.authConfig.oauthConfig",
                    "clientSecret",
                ],
            ),
            (
                "defaultRemoteBackend: {host: ''}\n",
                &["defaultRemoteBackend.host"],
            ),
            (
                "leaderElection: {leaseDurationSeconds: 1}\n",
                &["leaderElection.leaseDurationSeconds"],
            ),
            (
                "defaultRemoteBackend: {host: 'https://run.beamlit.com'}\n",
                &["defaultRemoteBackend.host", "host[:port]"],
            ),
            (
                "defaultRemoteBackend:\n  authConfig:\n    oauthConfig: {clientId: c, tokenUrl: 'http://t/x', \
                 clientSecretRef: {namespace: n, name: s, key: k}}\n",
                &[
                    "defaultRemoteBackend.authConfig.oauthConfig.tokenUrl",
                    "allowInsecureTokenUrls",
                ],
            ),
            (
                "protectedServices: [kubernetes]\n",
                &["protectedServices", "namespace/name"],
            ),
            (
                "allowedRemoteHosts: ['https://x']\n",
                &["allowedRemoteHosts"],
            ),
            ("allowedRemoteHosts: ['x:443']\n", &["allowedRemoteHosts"]),
        ];
        for (text, needles) in cases {
            let err = parse("c.yaml", text).expect_err(text).to_string();
            for needle in *needles {
                assert!(err.contains(needle), "{text:?}: `{err}` lacks `{needle}`");
            }
        }
    }
}
