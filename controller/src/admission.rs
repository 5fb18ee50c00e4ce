//! What a tenant's ModelDeployment may do, decided before anything is resolved or published: a
//! pure function of the spec, its namespace, the cluster admin's policy (the chart's values) and
//! the grants of the target namespaces. A refused ModelDeployment gets a condition and an Event
//! and nothing in `status.service` / `status.remoteBackend`, so no agent ever applies it.
//!
//! The rules, in order:
//! 1. every field follows [`beamlit_api::validate`] (the CRD's CEL rules refuse these at
//!    admission; this is the backstop for a CRD applied by hand or an older schema);
//! 2. `serviceRef` and `modelSourceRef` stay in the ModelDeployment's namespace, unless a
//!    `ModelDeploymentGrant` in the target namespace lets this namespace name the object;
//! 3. the Service is not one the cluster depends on (`default/kubernetes`, `kube-system/*`, the
//!    product's own, the admin's list);
//! 4. a remote backend of the spec names an allowed host, and its token URL too; its
//!    `clientSecretRef` is never the default backend's Secret (the operator's credentials go only
//!    to the default backend and its token URL).
use std::sync::Arc;

use beamlit_api::{
    ModelDeploymentSpec,
    grant::{self, GrantKind, ModelDeploymentGrant},
    validate::{self, FieldError},
};

use crate::backend::{DEFAULT_TOKEN_URL, DefaultRemoteBackend};

/// Services no ModelDeployment may offload, whatever the configuration says: the API server
/// (the agents and the controller need it to carry any fix) and the cluster's own Services
/// (DNS among them).
pub const BUILT_IN_PROTECTED: &[&str] = &["default/kubernetes", "kube-system/*"];

/// The cluster admin's decisions (the controller's configuration, from the chart's values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `namespace/name` or `namespace/*`, besides [`BUILT_IN_PROTECTED`].
    pub protected_services: Vec<String>,
    /// Hosts (no port; `*.example.com` for every name under example.com) a spec's remote
    /// backend and token URL may name. The default backend's own host and token URL host are
    /// always allowed.
    pub allowed_remote_hosts: Vec<String>,
    /// Token URLs may be plain http (test backends only).
    pub allow_insecure_token_urls: bool,
}

/// Why a ModelDeployment is refused; the message names the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    InvalidField(Vec<FieldError>),
    #[error(
        "{field}: {kind:?} {namespace}/{name} is in another namespace; references stay in the \
         ModelDeployment's namespace unless a ModelDeploymentGrant in {namespace} lets \
         namespace {from} name it"
    )]
    RefNotPermitted {
        field: &'static str,
        kind: GrantKind,
        namespace: String,
        name: String,
        from: String,
    },
    #[error(
        "spec.serviceRef: Service {namespace}/{name} is protected (the cluster or this product \
         depends on it) and is never offloaded"
    )]
    ProtectedService { namespace: String, name: String },
    #[error(
        "{field}: host `{host}` is not an allowed remote host ({allowed}); the cluster admin \
         lists them in the Helm value config.allowedRemoteHosts"
    )]
    RemoteHostNotAllowed {
        field: &'static str,
        host: String,
        allowed: String,
    },
    #[error(
        "spec.offloadingConfig.remoteBackend.authConfig.oauthConfig.clientSecretRef: Secret \
         {name} holds the default remote backend's credentials, which go only to the default \
         backend; leave out remoteBackend to use the default backend"
    )]
    DefaultCredentials { name: String },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::InvalidField(_) => "InvalidSpec",
            Refusal::RefNotPermitted { .. } => "RefNotPermitted",
            Refusal::ProtectedService { .. } => "ProtectedService",
            Refusal::RemoteHostNotAllowed { .. } => "RemoteHostNotAllowed",
            Refusal::DefaultCredentials { .. } => "DefaultCredentialsNotAllowed",
        }
    }
}

/// Accepted, with these deprecation warnings (condition `Deprecated`, a Warning Event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    InlineClientSecret,
}

impl Warning {
    pub fn reason(&self) -> &'static str {
        match self {
            Warning::InlineClientSecret => "InlineClientSecret",
        }
    }

    pub fn message(&self) -> &'static str {
        match self {
            Warning::InlineClientSecret => {
                "spec.offloadingConfig.remoteBackend.authConfig.oauthConfig.clientSecret is \
                 deprecated: everyone who can read this ModelDeployment can read it; put it in a \
                 Secret of this namespace and name it in clientSecretRef"
            }
        }
    }
}

/// What the rules need to know besides the spec.
pub struct Inputs<'a> {
    pub namespace: &'a str,
    pub policy: &'a Policy,
    pub default_backend: Option<&'a DefaultRemoteBackend>,
    /// The grants the controller sees (any namespace; only the target's count).
    pub grants: &'a [Arc<ModelDeploymentGrant>],
}

pub fn check(spec: &ModelDeploymentSpec, inputs: &Inputs) -> Result<Vec<Warning>, Refusal> {
    let policy = inputs.policy;
    let errors = validate::spec(spec, policy.allow_insecure_token_urls);
    if !errors.is_empty() {
        return Err(Refusal::InvalidField(errors));
    }
    let own = inputs.namespace;
    let grants = || inputs.grants.iter().map(|g| &**g);
    let workload = &spec.model_source_ref;
    if let Some(ns) = workload.namespace.as_deref().filter(|ns| *ns != own) {
        let kind = GrantKind::from(workload.kind);
        if !grant::permits(grants(), own, ns, kind, &workload.name) {
            return Err(Refusal::RefNotPermitted {
                field: "spec.modelSourceRef.namespace",
                kind,
                namespace: ns.into(),
                name: workload.name.clone(),
                from: own.into(),
            });
        }
    }
    if let Some(service) = &spec.service_ref {
        let ns = service.namespace.as_deref().unwrap_or(own);
        if is_protected(policy, ns, &service.name) {
            return Err(Refusal::ProtectedService {
                namespace: ns.into(),
                name: service.name.clone(),
            });
        }
        if ns != own && !grant::permits(grants(), own, ns, GrantKind::Service, &service.name) {
            return Err(Refusal::RefNotPermitted {
                field: "spec.serviceRef.namespace",
                kind: GrantKind::Service,
                namespace: ns.into(),
                name: service.name.clone(),
                from: own.into(),
            });
        }
    }
    let mut warnings = Vec::new();
    let Some(remote) = spec
        .offloading_config
        .as_ref()
        .and_then(|o| o.remote_backend.as_ref())
    else {
        return Ok(warnings);
    };
    let allowed = allowed_hosts(policy, inputs.default_backend);
    let host = validate::host_without_port(&remote.host);
    if !host_allowed(&allowed, &host) {
        return Err(Refusal::RemoteHostNotAllowed {
            field: "spec.offloadingConfig.remoteBackend.host",
            host,
            allowed: describe(&allowed),
        });
    }
    if let Some(oauth) = remote
        .auth_config
        .as_ref()
        .and_then(|a| a.oauth_config.as_ref())
    {
        let token_url = oauth.token_url.as_deref().unwrap_or(DEFAULT_TOKEN_URL);
        let token_host = url_host(token_url);
        if !host_allowed(&allowed, &token_host) {
            return Err(Refusal::RemoteHostNotAllowed {
                field: "spec.offloadingConfig.remoteBackend.authConfig.oauthConfig.tokenUrl",
                host: token_host,
                allowed: describe(&allowed),
            });
        }
        if let (Some(r), Some(d)) = (
            &oauth.client_secret_ref,
            inputs
                .default_backend
                .and_then(|d| d.auth_config.as_ref())
                .map(|a| &a.oauth_config.client_secret_ref),
        ) && d.namespace == own
            && d.name == r.name
        {
            return Err(Refusal::DefaultCredentials {
                name: r.name.clone(),
            });
        }
        if oauth.client_secret_ref.is_none() && oauth.client_secret.is_some() {
            warnings.push(Warning::InlineClientSecret);
        }
    }
    Ok(warnings)
}

/// Whether `namespace/name` is protected: built in, or listed by the admin.
pub fn is_protected(policy: &Policy, namespace: &str, name: &str) -> bool {
    BUILT_IN_PROTECTED
        .iter()
        .copied()
        .chain(policy.protected_services.iter().map(String::as_str))
        .any(|entry| match entry.split_once('/') {
            Some((ns, "*")) => ns == namespace,
            Some((ns, n)) => ns == namespace && n == name,
            None => false,
        })
}

/// The admin's list, plus the default backend's own host and token URL host.
fn allowed_hosts(policy: &Policy, default: Option<&DefaultRemoteBackend>) -> Vec<String> {
    let mut hosts: Vec<String> = policy
        .allowed_remote_hosts
        .iter()
        .map(|h| match h.strip_prefix("*.") {
            Some(suffix) => format!("*.{}", suffix.to_ascii_lowercase()),
            None => validate::host_without_port(h),
        })
        .collect();
    if let Some(d) = default {
        hosts.push(validate::host_without_port(&d.host));
        let token_url = d
            .auth_config
            .as_ref()
            .and_then(|a| a.oauth_config.token_url.as_deref())
            .unwrap_or(DEFAULT_TOKEN_URL);
        hosts.push(url_host(token_url));
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

fn host_allowed(allowed: &[String], host: &str) -> bool {
    allowed.iter().any(|a| match a.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|label| label.ends_with('.') && label.len() > 1),
        None => a == host,
    })
}

fn describe(allowed: &[String]) -> String {
    if allowed.is_empty() {
        "none is allowed".into()
    } else {
        format!("allowed: {}", allowed.join(", "))
    }
}

/// The host of an `http(s)://host[:port]/path` URL, as [`validate::host_without_port`] gives it.
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    validate::host_without_port(authority)
}

#[cfg(test)]
mod tests {
    use super::*;
    use beamlit_api::{
        ModelDeployment,
        grant::{GrantFrom, GrantTo, ModelDeploymentGrantSpec},
    };

    fn spec(yaml: &str) -> ModelDeploymentSpec {
        let workload = if yaml.contains("modelSourceRef") {
            ""
        } else {
            "  modelSourceRef: {kind: Deployment, name: llama}\n"
        };
        let md: ModelDeployment = serde_saphyr::from_str(&format!(
            "apiVersion: deployment.beamlit.com/v1alpha1\nkind: ModelDeployment\n\
             metadata: {{name: m, namespace: team-a}}\n\
             spec:\n  model: llama\n{workload}{yaml}"
        ))
        .expect("test spec parses");
        md.spec
    }

    fn default_backend() -> DefaultRemoteBackend {
        serde_saphyr::from_str(
            "host: run.beamlit.com\nauthConfig:\n  oauthConfig:\n    clientId: cid\n    \
             clientSecretRef: {namespace: team-a, name: beamlit-credentials, key: clientSecret}\n",
        )
        .expect("default parses")
    }

    fn grant(ns: &str, from: &str, kind: GrantKind, name: &str) -> Arc<ModelDeploymentGrant> {
        let mut g = ModelDeploymentGrant::new(
            "g",
            ModelDeploymentGrantSpec {
                from: vec![GrantFrom {
                    namespace: from.into(),
                }],
                to: vec![GrantTo {
                    kind,
                    name: Some(name.into()),
                }],
            },
        );
        g.metadata.namespace = Some(ns.into());
        Arc::new(g)
    }

    #[test]
    fn table() {
        let policy = Policy {
            protected_services: vec!["beamlit-system/beamlit-controller-metrics".into()],
            allowed_remote_hosts: vec!["fallback.internal".into(), "*.models.example".into()],
            allow_insecure_token_urls: false,
        };
        let default = default_backend();
        let grants = vec![grant("shared", "team-a", GrantKind::Service, "llama")];
        let backend = |rest: &str| {
            format!(
                "  serviceRef: {{name: llama}}\n  offloadingConfig:\n    remoteBackend:\n{rest}"
            )
        };
        // (name, spec lines, accepted with these warnings or refused with this reason)
        type Case = (&'static str, String, Result<Vec<Warning>, &'static str>);
        let cases: Vec<Case> = vec![
            ("own namespace", "  serviceRef: {name: llama}\n".into(), Ok(vec![])),
            (
                "own namespace written out",
                "  serviceRef: {name: llama, namespace: team-a}\n".into(),
                Ok(vec![]),
            ),
            (
                "granted Service elsewhere",
                "  serviceRef: {name: llama, namespace: shared}\n".into(),
                Ok(vec![]),
            ),
            (
                "ungranted Service elsewhere",
                "  serviceRef: {name: mistral, namespace: shared}\n".into(),
                Err("RefNotPermitted"),
            ),
            (
                "ungranted workload elsewhere",
                "  serviceRef: {name: llama}\n  modelSourceRef: {kind: Deployment, name: llama, namespace: shared}\n".into(),
                Err("RefNotPermitted"),
            ),
            (
                "the API server, even granted",
                "  serviceRef: {name: kubernetes, namespace: default}\n".into(),
                Err("ProtectedService"),
            ),
            (
                "the cluster DNS",
                "  serviceRef: {name: kube-dns, namespace: kube-system}\n".into(),
                Err("ProtectedService"),
            ),
            (
                "the product's own",
                "  serviceRef: {name: beamlit-controller-metrics, namespace: beamlit-system}\n".into(),
                Err("ProtectedService"),
            ),
            ("allowed host", backend("      host: fallback.internal:8080\n      scheme: http\n"), Ok(vec![])),
            ("wildcard host", backend("      host: eu.models.example\n"), Ok(vec![])),
            ("wildcard is not the apex", backend("      host: models.example\n"), Err("RemoteHostNotAllowed")),
            ("the default's host", backend("      host: Run.Beamlit.com:443\n"), Ok(vec![])),
            ("foreign host", backend("      host: attacker.example\n"), Err("RemoteHostNotAllowed")),
            (
                "foreign token URL",
                backend("      host: fallback.internal\n      authConfig:\n        type: oauth\n        oauthConfig: {clientId: c, clientSecretRef: {name: s, key: k}, tokenUrl: 'https://attacker.example/token'}\n"),
                Err("RemoteHostNotAllowed"),
            ),
            (
                "http token URL",
                backend("      host: fallback.internal\n      authConfig:\n        type: oauth\n        oauthConfig: {clientId: c, clientSecretRef: {name: s, key: k}, tokenUrl: 'http://fallback.internal/token'}\n"),
                Err("InvalidSpec"),
            ),
            (
                "the default's Secret with another backend",
                backend("      host: fallback.internal\n      authConfig:\n        type: oauth\n        oauthConfig: {clientId: c, clientSecretRef: {name: beamlit-credentials, key: clientSecret}}\n"),
                Err("DefaultCredentialsNotAllowed"),
            ),
            (
                "inline secret: accepted, deprecated",
                backend("      host: fallback.internal\n      authConfig:\n        type: oauth\n        oauthConfig: {clientId: c, clientSecret: s}\n"),
                Ok(vec![Warning::InlineClientSecret]),
            ),
            (
                "malformed host",
                backend("      host: 'https://fallback.internal/x'\n"),
                Err("InvalidSpec"),
            ),
        ];
        for (name, yaml, expected) in cases {
            let got = check(
                &spec(&yaml),
                &Inputs {
                    namespace: "team-a",
                    policy: &policy,
                    default_backend: Some(&default),
                    grants: &grants,
                },
            );
            match (&got, &expected) {
                (Ok(w), Ok(e)) => assert_eq!(w, e, "{name}"),
                (Err(r), Err(reason)) => {
                    assert_eq!(r.reason(), *reason, "{name}: {r}");
                    assert!(
                        r.to_string().contains("spec."),
                        "{name}: names no field: {r}"
                    );
                }
                _ => panic!("{name}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn http_token_urls_with_the_opt_out() {
        let policy = Policy {
            allowed_remote_hosts: vec!["fallback.internal".into()],
            allow_insecure_token_urls: true,
            ..Policy::default()
        };
        let s = spec(
            "  offloadingConfig:\n    remoteBackend:\n      host: fallback.internal\n      authConfig:\n        type: oauth\n        oauthConfig: {clientId: c, clientSecretRef: {name: s, key: k}, tokenUrl: 'http://fallback.internal/token'}\n",
        );
        let inputs = Inputs {
            namespace: "team-a",
            policy: &policy,
            default_backend: None,
            grants: &[],
        };
        assert_eq!(check(&s, &inputs), Ok(vec![]));
    }

    #[test]
    fn without_a_list_or_default_no_spec_host_is_allowed() {
        let s = spec("  offloadingConfig:\n    remoteBackend: {host: fallback.internal}\n");
        let inputs = Inputs {
            namespace: "team-a",
            policy: &Policy::default(),
            default_backend: None,
            grants: &[],
        };
        let err = check(&s, &inputs).expect_err("refused");
        assert!(err.to_string().contains("none is allowed"), "{err}");
        assert!(
            err.to_string().contains("config.allowedRemoteHosts"),
            "{err}"
        );
    }
}
