//! What this node's maps and tunnel should hold, as a pure function of the ModelDeployments
//! (the controller's decision in their status), the Services' ready endpoints, this node's tunnel
//! addresses and the client secrets read so far. Tested without a cluster or a kernel.
//!
//! One decision source: the share comes from `status.offloadPercent`, the addresses from
//! `status.service`, the backend from `status.remoteBackend`. The one thing the agent decides
//! by itself is node-local failover ([`super::failover`]).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use beamlit_api::{
    EffectiveRemoteBackend, ModelDeployment, NamespacedSecretKeyRef, Scheme as ApiScheme,
    acknowledgement::{Applied, AppliedDecisions, model_key},
    validate,
};
use http::{HeaderName, HeaderValue, Uri};
use serde::{Deserialize, Serialize};

pub use super::failover::ReadyEndpoints;
use super::failover::failover_share;
use crate::{
    model::{Route, Share},
    routes::RouteSet,
    tunnel::backend::{self, Auth, Mode, OAuthClient, RemoteBackend, Scheme, Secret},
};

/// Where redirected connections go on this node, per address family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelAddresses {
    pub ipv4: Option<SocketAddr>,
    pub ipv6: Option<SocketAddr>,
}

impl TunnelAddresses {
    fn for_service(&self, service: &IpAddr) -> Option<SocketAddr> {
        match service {
            IpAddr::V4(_) => self.ipv4,
            IpAddr::V6(_) => self.ipv6,
        }
    }
}

/// Client secrets read from Secrets, by reference.
pub type SecretValues = HashMap<NamespacedSecretKeyRef, Secret>;

/// Why one service address is redirected as it is: what `inspect` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Origin {
    pub service: SocketAddr,
    /// `namespace/name`.
    pub model_deployment: String,
    pub offload_percent: f64,
    pub reason: String,
    pub decision_generation: i64,
}

#[derive(Debug, Default)]
pub struct Desired {
    pub set: RouteSet,
    pub origins: Vec<Origin>,
    /// The decisions these routes carry out, acknowledged once they are in the maps.
    pub applied: AppliedDecisions,
    /// ModelDeployments not applied, and why (each names the fix).
    pub problems: Vec<String>,
}

pub fn desired(
    models: &[Arc<ModelDeployment>],
    ready: &ReadyEndpoints,
    tunnels: &TunnelAddresses,
    secrets: &SecretValues,
) -> Desired {
    let mut out = Desired::default();
    // Sorted, so that when two ModelDeployments claim one Service address, the same one wins
    // on every node and every run.
    let mut models: Vec<&ModelDeployment> = models.iter().map(AsRef::as_ref).collect();
    models.sort_by_key(|md| key_of(md));
    for md in models {
        let key = key_of(md);
        match routes_of(md, ready, tunnels, secrets) {
            Ok(None) => {}
            Ok(Some(model)) => {
                if let Some(taken) = model
                    .routes
                    .iter()
                    .find(|r| out.origins.iter().any(|o| o.service == r.service))
                {
                    out.problems.push(format!(
                        "ModelDeployment {key}: Service address {} is already offloaded by \
                         another ModelDeployment; give each Service one ModelDeployment",
                        taken.service
                    ));
                    continue;
                }
                for route in model.routes {
                    out.set
                        .backends
                        .insert(route.service, (route.tunnel, model.backend.clone()));
                    out.origins.push(Origin {
                        service: route.service,
                        model_deployment: key.clone(),
                        offload_percent: route.share.percent(),
                        reason: model.reason.clone(),
                        decision_generation: model.generation,
                    });
                    out.set.routes.push(route);
                }
            }
            Err(problem) => {
                out.problems
                    .push(format!("ModelDeployment {key}: {problem}"));
                continue;
            }
        }
        let status = md.status.as_ref();
        if let (Some(uid), Some(generation)) = (
            md.metadata.uid.clone(),
            status.map(|s| s.decision_generation).filter(|g| *g > 0),
        ) {
            out.applied.0.insert(
                key,
                Applied {
                    uid,
                    decision: generation,
                },
            );
        }
    }
    out
}

fn key_of(md: &ModelDeployment) -> String {
    model_key(
        md.metadata.namespace.as_deref().unwrap_or_default(),
        md.metadata.name.as_deref().unwrap_or_default(),
    )
}

struct ModelRoutes {
    routes: Vec<Route>,
    backend: RemoteBackend,
    reason: String,
    generation: i64,
}

/// `Ok(None)`: nothing to redirect for this model (disabled, not offloadable, not resolved yet).
fn routes_of(
    md: &ModelDeployment,
    ready: &ReadyEndpoints,
    tunnels: &TunnelAddresses,
    secrets: &SecretValues,
) -> Result<Option<ModelRoutes>, String> {
    let Some(status) = &md.status else {
        return Ok(None);
    };
    if !md.spec.enabled || md.spec.offloading_config.is_none() {
        return Ok(None);
    }
    let (Some(service), Some(remote)) = (&status.service, &status.remote_backend) else {
        return Ok(None);
    };
    let ready_now = ready
        .get(&(service.namespace.clone(), service.name.clone()))
        .copied();
    let (share, reason) = if let Some((share, reason)) = failover_share(ready_now) {
        (share, reason.to_string())
    } else {
        let percent = f64::from(status.offload_percent.clamp(0, 100));
        (
            Share::from_percent(percent).unwrap_or(Share::NONE),
            status.reason.clone().unwrap_or_default(),
        )
    };
    let backend = remote_backend(md, remote, secrets)?;
    let port = u16::try_from(service.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("status.service.port {} is not a port", service.port))?;
    let mut routes = Vec::new();
    for address in &service.addresses {
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("status.service.addresses: `{address}` is not an IP address"))?;
        let Some(tunnel) = tunnels.for_service(&ip) else {
            return Err(format!(
                "Service address {ip} has no tunnel address of its family on this node; start \
                 the agent with --tunnel-{} ",
                if ip.is_ipv4() { "ipv4" } else { "ipv6" }
            ));
        };
        routes.push(Route {
            service: SocketAddr::new(ip, port),
            share,
            tunnel,
            // Set by the applier once the tunnel's listener accepts.
            tunnel_ready: false,
            tunnel_heartbeat: true,
        });
    }
    Ok(Some(ModelRoutes {
        routes,
        backend,
        reason,
        generation: status.decision_generation,
    }))
}

/// The tunnel's view of `status.remoteBackend`, with the client secret filled in.
fn remote_backend(
    md: &ModelDeployment,
    remote: &EffectiveRemoteBackend,
    secrets: &SecretValues,
) -> Result<RemoteBackend, String> {
    let scheme = match remote.scheme {
        ApiScheme::Http => Scheme::Http,
        ApiScheme::Https => Scheme::Https,
    };
    // The controller checked these with the same rules (beamlit_api::validate) before writing
    // the status; refusing here too, with the same words, keeps a bad status off the maps.
    let (host, port) = validate::host(&remote.host)
        .ok()
        .and_then(|()| backend::split_host_port(&remote.host, scheme.default_port()))
        .ok_or_else(|| {
            format!(
                "status.remoteBackend.host `{}`: {}",
                remote.host,
                validate::HOST_MESSAGE
            )
        })?;
    validate::path_prefix(&remote.path_prefix)
        .map_err(|e| format!("status.remoteBackend.pathPrefix: {e}"))?;
    let mut headers_to_add = Vec::new();
    for (name, value) in &remote.headers_to_add {
        let header = validate::header_name(name)
            .ok()
            .and_then(|()| HeaderName::try_from(name.as_str()).ok())
            .ok_or_else(|| {
                format!(
                    "status.remoteBackend.headersToAdd: `{name}`: {}",
                    validate::HEADER_NAME_MESSAGE
                )
            })?;
        let value = validate::header_value(value)
            .ok()
            .and_then(|()| HeaderValue::try_from(value.as_str()).ok())
            .ok_or_else(|| {
                format!(
                    "status.remoteBackend.headersToAdd[{name}]: {}",
                    validate::HEADER_VALUE_MESSAGE
                )
            })?;
        headers_to_add.push((header, value));
    }
    let auth = match &remote.oauth {
        None => Auth::None,
        Some(oauth) => {
            // Whether plain http is allowed is the controller's decision (the admin's opt-out).
            let token_url: Uri = validate::token_url(&oauth.token_url, true)
                .ok()
                .and_then(|()| oauth.token_url.parse().ok())
                .ok_or_else(|| {
                    format!(
                        "status.remoteBackend.oauth.tokenUrl `{}`: {}",
                        oauth.token_url,
                        validate::TOKEN_URL_MESSAGE
                    )
                })?;
            if let Some(r) = &oauth.client_secret_ref
                && !secret_allowed(md, remote, r)
            {
                return Err(format!(
                    "status.remoteBackend.oauth.clientSecretRef: Secret {}/{} is not in the \
                     ModelDeployment's namespace; the agents read only Secrets a ModelDeployment \
                     names in its own namespace",
                    r.namespace, r.name
                ));
            }
            let client_secret = match &oauth.client_secret_ref {
                Some(reference) => secrets.get(reference).cloned().ok_or_else(|| {
                    format!(
                        "the client secret (Secret {}/{}, key {}) could not be read; create it \
                         or let the agent's service account read it",
                        reference.namespace, reference.name, reference.key
                    )
                })?,
                None if oauth.client_secret_in_spec => md
                    .spec
                    .offloading_config
                    .as_ref()
                    .and_then(|o| o.remote_backend.as_ref())
                    .and_then(|b| b.auth_config.as_ref())
                    .and_then(|a| a.oauth_config.as_ref())
                    .and_then(|o| o.client_secret.clone())
                    .map(Secret::new)
                    .ok_or("the spec's inline clientSecret is gone; the status is stale")?,
                None => return Err("status.remoteBackend.oauth names no client secret".into()),
            };
            Auth::OAuth(OAuthClient {
                token_url,
                client_id: oauth.client_id.clone(),
                client_secret,
            })
        }
    };
    Ok(RemoteBackend {
        mode: Mode::Http,
        scheme,
        host,
        port,
        path_prefix: backend::normalize_path_prefix(&remote.path_prefix),
        headers_to_add,
        auth,
        connect_timeout: backend::DEFAULT_CONNECT_TIMEOUT,
        header_timeout: backend::DEFAULT_HEADER_TIMEOUT,
    })
}

/// Whether the agents may read the Secret `reference` for this ModelDeployment: one in its own
/// namespace, or the controller's default backend's (the chart's Secret, readable by name).
fn secret_allowed(
    md: &ModelDeployment,
    remote: &EffectiveRemoteBackend,
    reference: &NamespacedSecretKeyRef,
) -> bool {
    remote.source == "default" || md.metadata.namespace.as_deref() == Some(&reference.namespace)
}

/// The Secrets the models' backends reference (each read once however many models share it):
/// only those an accepted ModelDeployment (one whose status names a remote backend) names in
/// its own namespace, and the default backend's.
pub fn secret_refs(models: &[Arc<ModelDeployment>]) -> Vec<NamespacedSecretKeyRef> {
    let mut refs: Vec<NamespacedSecretKeyRef> = models
        .iter()
        .filter_map(|md| {
            let remote = md.status.as_ref()?.remote_backend.as_ref()?;
            let reference = remote.oauth.as_ref()?.client_secret_ref.as_ref()?;
            secret_allowed(md, remote, reference).then(|| reference.clone())
        })
        .collect();
    refs.sort_by(|a, b| (&a.namespace, &a.name, &a.key).cmp(&(&b.namespace, &b.name, &b.key)));
    refs.dedup();
    refs
}

/// What of a ModelDeployment the agent applies, as one number: [`desired`] reads its identity,
/// spec, and the controller's decision and resolution in status. Everything else the controller
/// writes (`status.agents` after every acknowledgement, conditions, metric readings, messages)
/// cannot change a map, so a change there must not wake every agent of the cluster: with N
/// agents, each acknowledgement would otherwise cost N syncs.
pub fn fingerprint(md: &ModelDeployment) -> u64 {
    use std::hash::{Hash, Hasher};
    let status = md.status.as_ref();
    let applied = serde_json::json!({
        "uid": md.metadata.uid,
        "namespace": md.metadata.namespace,
        "name": md.metadata.name,
        "deleting": md.metadata.deletion_timestamp.is_some(),
        "spec": md.spec,
        "service": status.map(|s| &s.service),
        "remoteBackend": status.map(|s| &s.remote_backend),
        "offloadPercent": status.map(|s| s.offload_percent),
        "reason": status.map(|s| &s.reason),
        "decisionGeneration": status.map(|s| s.decision_generation),
    });
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    applied.to_string().hash(&mut hasher);
    hasher.finish()
}

/// How long a Secret's value is used before it is read again (rotations reach the tunnel).
pub const SECRET_REFRESH: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use beamlit_api::{EffectiveOAuth, ModelDeploymentStatus, ResolvedService};

    use std::collections::BTreeMap;

    use super::*;

    const SEED: &str = include_str!("../../../tests/fixtures/model-deployment.yaml");

    fn tunnels() -> TunnelAddresses {
        TunnelAddresses {
            ipv4: Some("10.200.0.1:15001".parse().expect("addr")),
            ipv6: Some("[fd00:200::1]:15001".parse().expect("addr")),
        }
    }

    /// The seed's ModelDeployment as the controller leaves it: `percent`, `reason`, the Service
    /// resolved, and a remote backend with a Secret reference.
    fn model(name: &str, percent: i32, reason: &str, addresses: &[&str]) -> ModelDeployment {
        let mut md: ModelDeployment = serde_saphyr::from_str(SEED).expect("seed parses");
        md.metadata.name = Some(name.into());
        md.metadata.namespace = Some("models".into());
        md.metadata.uid = Some(format!("uid-{name}"));
        md.status = Some(ModelDeploymentStatus {
            offload_percent: percent,
            reason: Some(reason.into()),
            decision_generation: 3,
            service: Some(ResolvedService {
                name: format!("{name}-svc"),
                namespace: "models".into(),
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                port: 80,
                target_port: None,
            }),
            remote_backend: Some(EffectiveRemoteBackend {
                host: "run.beamlit.com".into(),
                scheme: ApiScheme::Https,
                path_prefix: "/ws/models/php-apache".into(),
                headers_to_add: BTreeMap::from([("X-Env".into(), "production".into())]),
                oauth: Some(EffectiveOAuth {
                    client_id: "cid".into(),
                    token_url: "https://api.beamlit.com/v0/oauth/token".into(),
                    client_secret_ref: Some(secret_ref()),
                    client_secret_in_spec: false,
                }),
                source: "default".into(),
            }),
            ..ModelDeploymentStatus::default()
        });
        md
    }

    #[test]
    fn only_what_the_agent_applies_changes_the_fingerprint() {
        let base = model("m", 40, "Metrics", &["10.96.0.10"]);
        let before = fingerprint(&base);
        type Edit = fn(&mut ModelDeployment);
        let ignored: [(&str, Edit); 4] = [
            ("status.agents", |m| {
                m.status.as_mut().expect("status").agents = Some(Default::default())
            }),
            ("status.conditions", |m| {
                m.status.as_mut().expect("status").conditions =
                    vec![serde_json::from_value(
                    serde_json::json!({"type": "Ready", "status": "True", "reason": "Applied",
                        "message": "", "lastTransitionTime": "2026-12-02T00:00:00Z"}),
                )
                .expect("condition")]
            }),
            ("status.message", |m| {
                m.status.as_mut().expect("status").message = Some("x".into())
            }),
            ("status.readyEndpoints", |m| {
                m.status.as_mut().expect("status").ready_endpoints = 7
            }),
        ];
        for (what, edit) in ignored {
            let mut md = base.clone();
            edit(&mut md);
            assert_eq!(fingerprint(&md), before, "{what} must not wake the agent");
        }
        let applied: [(&str, Edit); 8] = [
            ("status.offloadPercent", |m| {
                m.status.as_mut().expect("status").offload_percent = 41
            }),
            ("status.reason", |m| {
                m.status.as_mut().expect("status").reason = Some("NoReadyEndpoints".into())
            }),
            ("status.decisionGeneration", |m| {
                m.status.as_mut().expect("status").decision_generation = 4
            }),
            ("status.service", |m| {
                m.status.as_mut().expect("status").service = None
            }),
            ("status.remoteBackend", |m| {
                if let Some(r) = m.status.as_mut().and_then(|s| s.remote_backend.as_mut()) {
                    r.host = "other.example".into();
                }
            }),
            ("spec.enabled", |m| m.spec.enabled = !m.spec.enabled),
            ("metadata.uid", |m| m.metadata.uid = Some("uid-new".into())),
            ("metadata.deletionTimestamp", |m| {
                m.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
                )
            }),
        ];
        for (what, edit) in applied {
            let mut md = base.clone();
            edit(&mut md);
            assert_ne!(fingerprint(&md), before, "{what} must wake the agent");
        }
    }

    fn secret_ref() -> NamespacedSecretKeyRef {
        NamespacedSecretKeyRef {
            namespace: "beamlit-system".into(),
            name: "creds".into(),
            key: "clientSecret".into(),
        }
    }

    fn secrets() -> SecretValues {
        HashMap::from([(secret_ref(), Secret::new("s3cret".into()))])
    }

    fn ready(name: &str, n: u32) -> ReadyEndpoints {
        HashMap::from([(("models".to_string(), format!("{name}-svc")), n)])
    }

    #[test]
    fn the_controllers_decision_is_applied_on_every_family() {
        let md = model("a", 50, "MetricAboveTarget", &["10.96.0.10", "fd00:96::10"]);
        let d = desired(&[Arc::new(md)], &ready("a", 2), &tunnels(), &secrets());
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(d.set.routes.len(), 2);
        for route in &d.set.routes {
            assert_eq!(route.share.percent(), 50.0);
            assert_eq!(route.tunnel.is_ipv4(), route.service.is_ipv4());
            assert!(route.tunnel_heartbeat);
        }
        let (_, backend) = &d.set.backends[&"10.96.0.10:80".parse().expect("addr")];
        assert_eq!(backend.authority(), "run.beamlit.com");
        assert_eq!(backend.path_prefix, "/ws/models/php-apache");
        assert!(matches!(&backend.auth, Auth::OAuth(o) if o.client_secret.expose() == "s3cret"));
        assert_eq!(d.origins[0].reason, "MetricAboveTarget");
        assert_eq!(d.origins[0].model_deployment, "models/a");
        assert!(d.applied.has_applied("models/a", "uid-a", 3));
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            models: Vec<ModelDeployment>,
            ready: ReadyEndpoints,
            secrets: SecretValues,
            /// Expected (service, percent) routes, and problem count.
            routes: Vec<(&'static str, f64)>,
            problems: usize,
        }
        let disabled = {
            let mut m = model("a", 100, "NoReadyEndpoints", &["10.96.0.10"]);
            m.spec.enabled = false;
            m
        };
        let no_offloading = {
            let mut m = model("a", 100, "NoReadyEndpoints", &["10.96.0.10"]);
            m.spec.offloading_config = None;
            m
        };
        let unresolved = {
            let mut m = model("a", 0, "Healthy", &["10.96.0.10"]);
            if let Some(s) = m.status.as_mut() {
                s.service = None;
            }
            m
        };
        let no_status = {
            let mut m = model("a", 0, "Healthy", &["10.96.0.10"]);
            m.status = None;
            m
        };
        let cases = vec![
            Case {
                name: "healthy: a route at 0% (so the counters and inspect show it)",
                models: vec![model("a", 0, "Healthy", &["10.96.0.10"])],
                ready: ready("a", 1),
                secrets: secrets(),
                routes: vec![("10.96.0.10:80", 0.0)],
                problems: 0,
            },
            Case {
                name: "no ready endpoints: 100% on the node's own, whatever the controller said",
                models: vec![model("a", 0, "Healthy", &["10.96.0.10"])],
                ready: ready("a", 0),
                secrets: secrets(),
                routes: vec![("10.96.0.10:80", 100.0)],
                problems: 0,
            },
            Case {
                name: "no EndpointSlice known: the controller's decision stands",
                models: vec![model("a", 30, "MetricAboveTarget", &["10.96.0.10"])],
                ready: ReadyEndpoints::new(),
                secrets: secrets(),
                routes: vec![("10.96.0.10:80", 30.0)],
                problems: 0,
            },
            Case {
                name: "disabled",
                models: vec![disabled],
                ready: ready("a", 0),
                secrets: secrets(),
                routes: vec![],
                problems: 0,
            },
            Case {
                name: "no offloadingConfig: never offloaded, even without endpoints",
                models: vec![no_offloading],
                ready: ready("a", 0),
                secrets: secrets(),
                routes: vec![],
                problems: 0,
            },
            Case {
                name: "Service not resolved yet",
                models: vec![unresolved],
                ready: ready("a", 0),
                secrets: secrets(),
                routes: vec![],
                problems: 0,
            },
            Case {
                name: "no status yet",
                models: vec![no_status],
                ready: ready("a", 0),
                secrets: secrets(),
                routes: vec![],
                problems: 0,
            },
            Case {
                name: "secret unreadable: not redirected (fails open), reported",
                models: vec![model("a", 100, "NoReadyEndpoints", &["10.96.0.10"])],
                ready: ready("a", 0),
                secrets: SecretValues::new(),
                routes: vec![],
                problems: 1,
            },
            Case {
                name: "two models, one address: the first by name wins, the other is reported",
                models: vec![
                    model("b", 100, "NoReadyEndpoints", &["10.96.0.10"]),
                    model("a", 20, "MetricAboveTarget", &["10.96.0.10"]),
                ],
                ready: HashMap::new(),
                secrets: secrets(),
                routes: vec![("10.96.0.10:80", 20.0)],
                problems: 1,
            },
        ];
        for case in cases {
            let models: Vec<Arc<ModelDeployment>> = case.models.into_iter().map(Arc::new).collect();
            let d = desired(&models, &case.ready, &tunnels(), &case.secrets);
            let got: Vec<(String, f64)> = d
                .set
                .routes
                .iter()
                .map(|r| (r.service.to_string(), r.share.percent()))
                .collect();
            let want: Vec<(String, f64)> = case
                .routes
                .iter()
                .map(|(s, p)| (s.to_string(), *p))
                .collect();
            assert_eq!(got, want, "{}", case.name);
            assert_eq!(
                d.problems.len(),
                case.problems,
                "{}: {:?}",
                case.name,
                d.problems
            );
        }
    }

    #[test]
    fn a_missing_tunnel_family_is_reported_not_guessed() {
        let md = model("a", 50, "MetricAboveTarget", &["fd00:96::10"]);
        let only_v4 = TunnelAddresses {
            ipv6: None,
            ..tunnels()
        };
        let d = desired(&[Arc::new(md)], &ready("a", 1), &only_v4, &secrets());
        assert!(d.set.routes.is_empty());
        assert!(d.problems[0].contains("--tunnel-ipv6"), "{:?}", d.problems);
    }

    #[test]
    fn secret_refs_are_deduplicated() {
        let models = vec![
            Arc::new(model("a", 0, "Healthy", &["10.96.0.10"])),
            Arc::new(model("b", 0, "Healthy", &["10.96.0.11"])),
        ];
        assert_eq!(secret_refs(&models), vec![secret_ref()]);
    }

    /// A status naming a Secret outside the ModelDeployment's namespace (for its own backend)
    /// is neither read nor applied; bad remote fields are refused with the validator's words.
    #[test]
    fn foreign_secrets_and_bad_remote_fields_are_refused() {
        let mut foreign = model("a", 100, "NoReadyEndpoints", &["10.96.0.10"]);
        if let Some(remote) = foreign
            .status
            .as_mut()
            .and_then(|s| s.remote_backend.as_mut())
        {
            remote.source = "spec".into();
        }
        let models = vec![Arc::new(foreign)];
        assert!(secret_refs(&models).is_empty(), "a foreign Secret was read");
        let d = desired(&models, &ready("a", 1), &tunnels(), &secrets());
        assert!(d.set.routes.is_empty());
        assert!(d.problems[0].contains("own namespace"), "{:?}", d.problems);

        type Edit = fn(&mut EffectiveRemoteBackend);
        let edits: [(Edit, &str); 4] = [
            (
                |r| r.host = "https://run.beamlit.com/x".into(),
                validate::HOST_MESSAGE,
            ),
            (
                |r| r.path_prefix = "/a/../b".into(),
                validate::DOT_SEGMENT_MESSAGE,
            ),
            (
                |r| {
                    r.headers_to_add.insert("X-Bad".into(), "a\r\nb".into());
                },
                validate::HEADER_VALUE_MESSAGE,
            ),
            (
                |r| {
                    r.headers_to_add.insert("X Bad".into(), "v".into());
                },
                validate::HEADER_NAME_MESSAGE,
            ),
        ];
        for (edit, message) in edits {
            let mut md = model("a", 100, "NoReadyEndpoints", &["10.96.0.10"]);
            if let Some(remote) = md.status.as_mut().and_then(|s| s.remote_backend.as_mut()) {
                edit(remote);
            }
            let d = desired(&[Arc::new(md)], &ready("a", 1), &tunnels(), &secrets());
            assert!(d.set.routes.is_empty(), "{message}");
            assert!(d.problems[0].contains(message), "{:?}", d.problems);
        }
    }
}
