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
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub leader_election: LeaderElectionConfig,
    pub workspace: Option<String>,
    pub agent_namespace: Option<String>,
    pub default_remote_backend: Option<crate::backend::DefaultRemoteBackend>,
    pub beamlit_api: Option<BeamlitApiFileConfig>,
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
    /// serde_yaml names the key path, line and column.
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
    let config: FileConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Invalid {
        path: label.to_string(),
        message: e.to_string(),
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
    if let Some(backend) = &config.default_remote_backend
        && backend.host.trim().is_empty()
    {
        return Err(invalid(
            "defaultRemoteBackend.host: must not be empty; write host[:port]".into(),
        ));
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
        assert_eq!(
            parse("c.yaml", "").expect("empty is valid"),
            FileConfig::default()
        );
    }

    /// Each bad file names the key (and, from serde_yaml, the line).
    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &[&str])] = &[
            (
                "stabilisationWindowSeconds: 30\n",
                &[
                    "unknown field `stabilisationWindowSeconds`",
                    "`stabilizationWindowSeconds`",
                ],
            ),
            (
                "leaderElection:\n  leaseDuration: 5\n",
                &["leaderElection", "unknown field `leaseDuration`", "line 2"],
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
        ];
        for (text, needles) in cases {
            let err = parse("c.yaml", text).expect_err(text).to_string();
            for needle in *needles {
                assert!(err.contains(needle), "{text:?}: `{err}` lacks `{needle}`");
            }
        }
    }
}
