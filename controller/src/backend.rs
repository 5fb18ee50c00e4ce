//! The remote backend in force for a ModelDeployment: its own `offloadingConfig.remoteBackend`,
//! else the controller's configured default (Beamlit). Written to `status.remoteBackend`, where
//! the agents read it, with `$workspace` and `$model` substituted and secrets only referenced.
use std::collections::BTreeMap;

use beamlit_api::{
    EffectiveOAuth, EffectiveRemoteBackend, ModelDeployment, NamespacedSecretKeyRef, Scheme,
};
use serde::Deserialize;

/// Beamlit's token endpoint, used when an OAuth configuration names none.
pub const DEFAULT_TOKEN_URL: &str = "https://api.beamlit.com/v0/oauth/token";
/// Beamlit's inference gateway.
pub const DEFAULT_HOST: &str = "run.beamlit.com";
pub const DEFAULT_PATH_PREFIX: &str = "/$workspace/models/$model";

/// `defaultRemoteBackend` of the configuration file. The client secret is never inline here: the
/// Helm chart writes it into a Secret and renders the reference.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DefaultRemoteBackend {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default)]
    pub scheme: Scheme,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    #[serde(default, deserialize_with = "beamlit_api::yaml::null_as_default")]
    pub headers_to_add: BTreeMap<String, String>,
    #[serde(default)]
    pub auth_config: Option<DefaultAuthConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DefaultAuthConfig {
    #[serde(default, rename = "type")]
    pub auth_type: Option<beamlit_api::AuthType>,
    pub oauth_config: DefaultOAuthConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DefaultOAuthConfig {
    pub client_id: String,
    #[serde(default)]
    pub token_url: Option<String>,
    pub client_secret_ref: NamespacedSecretKeyRef,
}

fn default_host() -> String {
    DEFAULT_HOST.into()
}

fn default_path_prefix() -> String {
    DEFAULT_PATH_PREFIX.into()
}

/// Why a ModelDeployment has no remote backend; the message says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error(
        "no remote backend: set spec.offloadingConfig.remoteBackend, or configure the \
         controller's defaultRemoteBackend (Helm value config.defaultRemoteBackend)"
    )]
    None,
    #[error(
        "{field} uses $workspace but the controller knows no workspace: set `workspace` in its \
         configuration (Helm value config.workspace) or write the path without it"
    )]
    NoWorkspace { field: &'static str },
    #[error(
        "spec.offloadingConfig.remoteBackend.authConfig.oauthConfig: give clientSecretRef (a \
         Secret in this namespace) or clientSecret"
    )]
    NoClientSecret,
}

impl BackendError {
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::None => "NoRemoteBackend",
            BackendError::NoWorkspace { .. } => "NoWorkspace",
            BackendError::NoClientSecret => "NoClientSecret",
        }
    }
}

/// The backend in force, or why there is none. `None` when the model is not offloaded at all
/// (no `offloadingConfig`): no backend is needed then.
pub fn effective(
    md: &ModelDeployment,
    namespace: &str,
    default: Option<&DefaultRemoteBackend>,
    workspace: Option<&str>,
) -> Option<Result<EffectiveRemoteBackend, BackendError>> {
    let offloading = md.spec.offloading_config.as_ref()?;
    let model = md.spec.model.as_str();
    Some(match (&offloading.remote_backend, default) {
        (Some(spec), _) => {
            let oauth = match spec
                .auth_config
                .as_ref()
                .and_then(|a| a.oauth_config.as_ref())
            {
                None => None,
                Some(o) => {
                    if o.client_secret_ref.is_none() && o.client_secret.is_none() {
                        return Some(Err(BackendError::NoClientSecret));
                    }
                    Some(EffectiveOAuth {
                        client_id: o.client_id.clone(),
                        token_url: o
                            .token_url
                            .clone()
                            .unwrap_or_else(|| DEFAULT_TOKEN_URL.into()),
                        client_secret_ref: o.client_secret_ref.as_ref().map(|r| {
                            NamespacedSecretKeyRef {
                                namespace: namespace.to_string(),
                                name: r.name.clone(),
                                key: r.key.clone(),
                            }
                        }),
                        client_secret_in_spec: o.client_secret_ref.is_none(),
                    })
                }
            };
            substitute(
                spec.path_prefix.as_deref().unwrap_or(""),
                "spec.offloadingConfig.remoteBackend.pathPrefix",
                workspace,
                model,
            )
            .map(|path_prefix| EffectiveRemoteBackend {
                host: spec.host.clone(),
                scheme: spec.scheme,
                path_prefix,
                headers_to_add: spec.headers_to_add.clone(),
                oauth,
                source: "spec".into(),
            })
        }
        (None, Some(d)) => substitute(
            &d.path_prefix,
            "defaultRemoteBackend.pathPrefix",
            workspace,
            model,
        )
        .map(|path_prefix| EffectiveRemoteBackend {
            host: d.host.clone(),
            scheme: d.scheme,
            path_prefix,
            headers_to_add: d.headers_to_add.clone(),
            oauth: d.auth_config.as_ref().map(|a| EffectiveOAuth {
                client_id: a.oauth_config.client_id.clone(),
                token_url: a
                    .oauth_config
                    .token_url
                    .clone()
                    .unwrap_or_else(|| DEFAULT_TOKEN_URL.into()),
                client_secret_ref: Some(a.oauth_config.client_secret_ref.clone()),
                client_secret_in_spec: false,
            }),
            source: "default".into(),
        }),
        (None, None) => Err(BackendError::None),
    })
}

fn substitute(
    template: &str,
    field: &'static str,
    workspace: Option<&str>,
    model: &str,
) -> Result<String, BackendError> {
    let with_model = template.replace("$model", model);
    match workspace {
        Some(w) => Ok(with_model.replace("$workspace", w)),
        None if with_model.contains("$workspace") => Err(BackendError::NoWorkspace { field }),
        None => Ok(with_model),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(offloading: &str) -> ModelDeployment {
        serde_saphyr::from_str(&format!(
            "apiVersion: deployment.beamlit.com/v1alpha1\nkind: ModelDeployment\n\
             metadata: {{name: m, namespace: models}}\n\
             spec:\n  model: llama\n  modelSourceRef: {{kind: Deployment, name: m}}\n{offloading}"
        ))
        .expect("test spec parses")
    }

    fn default_backend() -> DefaultRemoteBackend {
        serde_saphyr::from_str(
            "authConfig:\n  oauthConfig:\n    clientId: cid\n    \
             clientSecretRef: {namespace: beamlit-system, name: creds, key: clientSecret}\n",
        )
        .expect("default parses")
    }

    #[test]
    fn table() {
        let d = default_backend();
        type Check = fn(&Option<Result<EffectiveRemoteBackend, BackendError>>) -> bool;
        type Case<'a> = (
            &'a str,
            &'a str,
            Option<&'a DefaultRemoteBackend>,
            Option<&'a str>,
            Check,
        );
        let cases: Vec<Case> = vec![
            ("no offloading config", "", Some(&d), Some("ws"), |r| {
                r.is_none()
            }),
            (
                "the default, substituted, secret referenced in its namespace",
                "  offloadingConfig: {}\n",
                Some(&d),
                Some("ws"),
                |r| {
                    matches!(r, Some(Ok(b)) if b.host == "run.beamlit.com"
                        && b.path_prefix == "/ws/models/llama"
                        && b.scheme == Scheme::Https
                        && b.source == "default"
                        && b.oauth.as_ref().is_some_and(|o| o.token_url == DEFAULT_TOKEN_URL
                            && o.client_secret_ref.as_ref().is_some_and(|s| s.namespace == "beamlit-system")))
                },
            ),
            (
                "no default and none in spec",
                "  offloadingConfig: {}\n",
                None,
                Some("ws"),
                |r| matches!(r, Some(Err(BackendError::None))),
            ),
            (
                "default needs a workspace",
                "  offloadingConfig: {}\n",
                Some(&d),
                None,
                |r| matches!(r, Some(Err(BackendError::NoWorkspace { .. }))),
            ),
            (
                "any backend, no auth, no workspace needed",
                "  offloadingConfig:\n    remoteBackend: {host: 'api.example.com:8443', scheme: http, pathPrefix: /v1/$model}\n",
                None,
                None,
                |r| {
                    matches!(r, Some(Ok(b)) if b.host == "api.example.com:8443"
                        && b.path_prefix == "/v1/llama" && b.oauth.is_none() && b.source == "spec")
                },
            ),
            (
                "spec secret reference lives in the model's namespace",
                "  offloadingConfig:\n    remoteBackend:\n      host: h\n      authConfig:\n        type: oauth\n        oauthConfig: {clientId: c, clientSecretRef: {name: s, key: k}}\n",
                Some(&d),
                Some("ws"),
                |r| {
                    matches!(r, Some(Ok(b)) if b.oauth.as_ref().is_some_and(|o|
                        o.client_secret_ref == Some(NamespacedSecretKeyRef {
                            namespace: "models".into(), name: "s".into(), key: "k".into() })
                        && !o.client_secret_in_spec))
                },
            ),
            (
                "inline secret is flagged, never copied",
                "  offloadingConfig:\n    remoteBackend:\n      host: h\n      authConfig:\n        type: oauth\n        oauthConfig: {clientId: c, clientSecret: hunter2}\n",
                None,
                None,
                |r| {
                    matches!(r, Some(Ok(b)) if b.oauth.as_ref().is_some_and(|o| o.client_secret_in_spec)
                        && !serde_json::to_string(b).unwrap_or_default().contains("hunter2"))
                },
            ),
            (
                "oauth without any secret",
                "  offloadingConfig:\n    remoteBackend:\n      host: h\n      authConfig:\n        type: oauth\n        oauthConfig: {clientId: c}\n",
                None,
                None,
                |r| matches!(r, Some(Err(BackendError::NoClientSecret))),
            ),
        ];
        for (name, offloading, default, workspace, check) in cases {
            let result = effective(&md(offloading), "models", default, workspace);
            assert!(check(&result), "{name}: {result:?}");
        }
    }

    #[test]
    fn default_rejects_an_inline_secret_naming_the_key() {
        let err = serde_saphyr::from_str::<DefaultRemoteBackend>(
            "authConfig:\n  oauthConfig:\n    clientId: c\n    clientSecret: s\n",
        )
        .expect_err("inline secret refused");
        assert!(err.to_string().contains("clientSecret"), "{err}");
    }
}
