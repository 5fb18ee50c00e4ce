//! `ModelDeployment` (`deployment.beamlit.com/v1alpha1`, namespaced): a model's workload and
//! Service, and when to offload its traffic to Beamlit (or any remote backend).
//!
//! Every field of the earlier product is here with its default. The earlier defects shape a few
//! choices: `enabled: false` and `percentage: 0` are always serialized (they were lost to
//! `omitempty`), secrets can come from a Secret (`clientSecretRef`) instead of the spec, and
//! ranges and enums are in the OpenAPI schema so the apiserver rejects bad input naming the field.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::autoscaling::v2::MetricSpec,
    apimachinery::pkg::{apis::meta::v1::Condition, util::intstr::IntOrString},
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "deployment.beamlit.com",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    singular = "modeldeployment",
    shortname = "md",
    namespaced,
    status = "ModelDeploymentStatus",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model"}"#,
    printcolumn = r#"{"name":"Env","type":"string","jsonPath":".spec.environment"}"#,
    printcolumn = r#"{"name":"Offload","type":"integer","description":"Percent of new connections offloaded","jsonPath":".status.offloadPercent"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","description":"Ready endpoints of the Service","jsonPath":".status.readyEndpoints"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Beamlit model name; `$model` in remote path prefixes.
    #[schemars(length(min = 1), transform = rules::name)]
    pub model: String,
    /// `false` disables offloading (and keeps it disabled across updates).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Beamlit environment.
    #[serde(default = "default_environment")]
    #[schemars(length(min = 1), transform = rules::name)]
    pub environment: String,
    /// The workload serving the model.
    pub model_source_ref: WorkloadRef,
    /// The Service clients call; its ClusterIP addresses are what gets offloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ref: Option<ServiceRef>,
    /// Where the model exposes metrics (its port is reported to Beamlit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_service_ref: Option<ServiceRef>,
    /// Beamlit policies attached to the model.
    #[serde(default)]
    pub policies: Vec<PolicyRef>,
    /// Beamlit serverless settings, passed to Beamlit as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serverless_config: Option<ServerlessConfig>,
    /// When and where to offload. Without it, the model is never offloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offloading_config: Option<OffloadingConfig>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// e.g. `apps/v1`.
    #[serde(default = "default_apps_v1")]
    pub api_version: String,
    pub kind: WorkloadKind,
    #[schemars(length(min = 1), transform = rules::dns_subdomain)]
    pub name: String,
    /// Must be the ModelDeployment's own namespace (the default), unless the target namespace
    /// grants the reference (a `ModelDeploymentGrant` there) and the cluster admin allows
    /// cross-namespace references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = rules::dns_label)]
    pub namespace: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    ReplicaSet,
    DaemonSet,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    #[schemars(length(min = 1), transform = rules::dns_label)]
    pub name: String,
    /// Must be the ModelDeployment's own namespace (the default), unless the target namespace
    /// grants the reference (a `ModelDeploymentGrant` there) and the cluster admin allows
    /// cross-namespace references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = rules::dns_label)]
    pub namespace: Option<String>,
    /// The Service **port** (number or name) whose traffic is offloaded, as the earlier product
    /// used it; defaults to the Service's only port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    pub ref_type: PolicyRefType,
    #[schemars(length(min = 1))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PolicyRefType {
    RemotePolicy,
    LocalPolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerlessConfig {
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub min_num_replicas: i32,
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1))]
    pub max_num_replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2))]
    pub scale_up_minimum: Option<i32>,
    /// Durations as Beamlit takes them, e.g. `30s`, `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pod_retention_period: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OffloadingConfig {
    /// Defaults to the controller's configured remote backend (Beamlit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_backend: Option<RemoteBackend>,
    /// autoscaling/v2 metrics; any one above its target (10% tolerance) triggers offloading.
    #[serde(default)]
    #[schemars(transform = rules::metrics)]
    pub metrics: Vec<MetricSpec>,
    #[serde(default)]
    pub behavior: Behavior,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Behavior {
    /// Percent of new connections offloaded while a metric is above target. 0 is valid.
    #[serde(default = "default_percentage")]
    #[schemars(range(min = 0, max = 100))]
    pub percentage: i32,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            percentage: default_percentage(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteBackend {
    /// `host[:port]` only; the cluster admin lists the hosts allowed (Helm value
    /// config.allowedRemoteHosts).
    #[schemars(length(min = 1), transform = rules::host)]
    pub host: String,
    #[serde(default)]
    pub scheme: Scheme,
    /// Prefix of every forwarded path; `$workspace` and `$model` are substituted. No `.`/`..`
    /// segments, query or fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = rules::path_prefix)]
    pub path_prefix: Option<String>,
    /// Header names are HTTP tokens; values have no control characters.
    #[serde(default)]
    #[schemars(transform = rules::headers)]
    pub headers_to_add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_config: Option<AuthConfig>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    #[default]
    Https,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthConfig {
    #[serde(rename = "type")]
    pub auth_type: AuthType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth_config: Option<OAuthConfig>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthType {
    Oauth,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuthConfig {
    #[schemars(length(min = 1), transform = rules::client_id)]
    pub client_id: String,
    /// Inline secret: deprecated (a Warning condition says so); use `clientSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub client_secret: Option<String>,
    /// The client secret in a Secret of the ModelDeployment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretKeyRef>,
    /// An https URL (plain http only where the cluster admin allows it, for test backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = rules::token_url)]
    pub token_url: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1), transform = rules::dns_subdomain)]
    pub name: String,
    #[schemars(length(min = 1), transform = rules::secret_key)]
    pub key: String,
}

/// Written by the controller with server-side apply; the decision lives here so that a
/// restarted controller continues where it was.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Percent of new connections offloaded now.
    #[serde(default)]
    pub offload_percent: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339 time the current percent and reason were decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// RFC 3339 time a metric was last above its target (the stabilization window counts from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_metric_above: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ResolvedService>,
    /// The workload serving the model, as found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<ResolvedWorkload>,
    #[serde(default)]
    pub ready_endpoints: i32,
    #[serde(default)]
    pub metrics: Vec<MetricValue>,
    /// How many agents applied the current decision, from their Leases (see
    /// [`crate::acknowledgement`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<AgentsApplied>,
    /// Increases each time what the agents apply changes (offload percent, Service addresses or
    /// port, remote backend); agents acknowledge the generation they applied.
    #[serde(default)]
    pub decision_generation: i64,
    /// The remote backend in force: the spec's, or the controller's default. `$workspace` and
    /// `$model` are substituted; secrets are never copied here, only referenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_backend: Option<EffectiveRemoteBackend>,
    /// The model on Beamlit (when the controller has Beamlit credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beamlit: Option<BeamlitSync>,
}

/// What the controller last pushed to Beamlit for this model, and how that went.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BeamlitSync {
    /// The `metadata.generation` whose spec Beamlit has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_generation: Option<i64>,
    /// The model's `offloading` label as last set on Beamlit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offloading_label: Option<bool>,
    /// Consecutive failed attempts (the retry backoff grows with them).
    #[serde(default)]
    pub failures: i32,
    /// RFC 3339 time before which no new attempt is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The remote backend the agents' tunnels forward offloaded connections to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveRemoteBackend {
    /// `host[:port]`.
    pub host: String,
    pub scheme: Scheme,
    /// Prefix of every forwarded path, with `$workspace` and `$model` substituted.
    #[serde(default)]
    pub path_prefix: String,
    #[serde(default)]
    pub headers_to_add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<EffectiveOAuth>,
    /// `spec` (the ModelDeployment's own) or `default` (the controller's configuration).
    pub source: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveOAuth {
    pub client_id: String,
    pub token_url: String,
    /// The Secret holding the client secret (the agents read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<NamespacedSecretKeyRef>,
    /// The client secret is written inline in the ModelDeployment's spec (discouraged).
    #[serde(default)]
    pub client_secret_in_spec: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedSecretKeyRef {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedService {
    pub name: String,
    pub namespace: String,
    /// ClusterIPs of every family.
    pub addresses: Vec<String>,
    pub port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedWorkload {
    pub kind: String,
    pub name: String,
    pub namespace: String,
    /// Ready replicas (ready pods for a DaemonSet) as the workload reports them.
    pub ready_replicas: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricValue {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default)]
    pub above: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the value is what it is when the HPA's rules set pods aside: which pods, the rule
    /// applied and what it led to (`as the HPA: php-c missing (no sample); with missing pods at
    /// 0 (a scale-up): 83%, within the tolerance: hold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentsApplied {
    pub applied: i32,
    pub total: i32,
}

/// The CEL rules and bounds of [`crate::validate`], put into the CRD's schema. Every string a
/// rule reads has a maximum length, so that the apiserver's cost estimate of the rules stays
/// within its budget.
mod rules {
    use schemars::Schema;
    use serde_json::{Value, json};

    use crate::validate::*;

    /// `self.matches(...)` with a raw CEL string (the patterns contain no `"`).
    fn matches(subject: &str, pattern: &str) -> String {
        format!("{subject}.matches(r\"{pattern}\")")
    }

    fn add(schema: &mut Schema, rules: &[(String, &str)]) {
        let list = schema
            .ensure_object()
            .entry("x-kubernetes-validations")
            .or_insert_with(|| json!([]));
        if let Value::Array(list) = list {
            for (rule, message) in rules {
                list.push(json!({"rule": rule, "message": message}));
            }
        }
    }

    fn max_length(schema: &mut Schema, n: usize) {
        schema.insert("maxLength".into(), json!(n));
    }

    pub fn name(s: &mut Schema) {
        max_length(s, NAME_MAX);
        add(s, &[(matches("self", NAME_PATTERN), NAME_MESSAGE)]);
    }

    pub fn dns_label(s: &mut Schema) {
        max_length(s, 63);
        add(
            s,
            &[(matches("self", DNS_LABEL_PATTERN), DNS_LABEL_MESSAGE)],
        );
    }

    pub fn dns_subdomain(s: &mut Schema) {
        max_length(s, DNS_SUBDOMAIN_MAX);
        add(
            s,
            &[(
                matches("self", DNS_SUBDOMAIN_PATTERN),
                DNS_SUBDOMAIN_MESSAGE,
            )],
        );
    }

    pub fn secret_key(s: &mut Schema) {
        max_length(s, DNS_SUBDOMAIN_MAX);
        add(
            s,
            &[(matches("self", SECRET_KEY_PATTERN), SECRET_KEY_MESSAGE)],
        );
    }

    pub fn client_id(s: &mut Schema) {
        max_length(s, CLIENT_ID_MAX);
        add(
            s,
            &[(
                format!("!{}", matches("self", CONTROL_PATTERN)),
                CLIENT_ID_MESSAGE,
            )],
        );
    }

    pub fn host(s: &mut Schema) {
        max_length(s, HOST_MAX);
        let port = "int(self.substring(self.lastIndexOf(':') + 1))";
        add(
            s,
            &[
                (matches("self", HOST_PATTERN), HOST_MESSAGE),
                (
                    format!(
                        "!{} || ({port} >= 1 && {port} <= 65535)",
                        matches("self", ":[0-9]{1,5}$")
                    ),
                    PORT_MESSAGE,
                ),
            ],
        );
    }

    pub fn path_prefix(s: &mut Schema) {
        max_length(s, PATH_MAX);
        add(
            s,
            &[
                (matches("self", PATH_PATTERN), PATH_MESSAGE),
                (
                    format!("!{}", matches("self", DOT_SEGMENT_PATTERN)),
                    DOT_SEGMENT_MESSAGE,
                ),
            ],
        );
    }

    pub fn token_url(s: &mut Schema) {
        max_length(s, URL_MAX);
        add(
            s,
            &[(matches("self", TOKEN_URL_PATTERN), TOKEN_URL_MESSAGE)],
        );
    }

    pub fn headers(s: &mut Schema) {
        s.insert("maxProperties".into(), json!(HEADERS_MAX));
        if let Some(Value::Object(values)) = s.get_mut("additionalProperties") {
            values.insert("maxLength".into(), json!(HEADER_VALUE_MAX));
        }
        add(
            s,
            &[
                (
                    format!(
                        "self.all(k, k.size() <= {HEADER_NAME_MAX} && {})",
                        matches("k", HEADER_NAME_PATTERN)
                    ),
                    HEADER_NAME_MESSAGE,
                ),
                (
                    format!("self.all(k, !{})", matches("self[k]", CONTROL_PATTERN)),
                    HEADER_VALUE_MESSAGE,
                ),
            ],
        );
    }

    /// Every target of every metric: utilizations positive, quantities parse and are positive.
    pub fn metrics(s: &mut Schema) {
        s.insert("maxItems".into(), json!(METRICS_MAX));
        // Quantities (int-or-string) get a length bound, or the cost estimate of the quantity
        // rules below assumes strings as long as a whole request.
        fn bound_quantities(v: &mut Value) {
            match v {
                Value::Object(o) => {
                    if o.get("x-kubernetes-int-or-string") == Some(&json!(true)) {
                        o.insert("maxLength".into(), json!(QUANTITY_MAX));
                    }
                    o.values_mut().for_each(bound_quantities);
                }
                Value::Array(a) => a.iter_mut().for_each(bound_quantities),
                _ => {}
            }
        }
        if let Some(items) = s.get_mut("items") {
            bound_quantities(items);
        }
        let mut rules = Vec::new();
        for kind in [
            "resource",
            "containerResource",
            "pods",
            "object",
            "external",
        ] {
            let t = format!("m.{kind}.target");
            rules.push((
                format!(
                    "self.all(m, !has(m.{kind}) || !has({t}.averageUtilization) || \
                     {t}.averageUtilization > 0)"
                ),
                format!("{kind}.target.averageUtilization {POSITIVE_MESSAGE}"),
            ));
            for field in ["averageValue", "value"] {
                let q = format!("string({t}.{field})");
                rules.push((
                    format!(
                        "self.all(m, !has(m.{kind}) || !has({t}.{field}) || \
                         (isQuantity({q}) && quantity({q}).isGreaterThan(quantity(\"0\"))))"
                    ),
                    format!("{kind}.target.{field} {QUANTITY_MESSAGE}"),
                ));
            }
        }
        let rules: Vec<(String, &str)> =
            rules.iter().map(|(r, m)| (r.clone(), m.as_str())).collect();
        add(s, &rules);
    }
}

fn default_true() -> bool {
    true
}

fn default_environment() -> String {
    "production".into()
}

fn default_apps_v1() -> String {
    "apps/v1".into()
}

fn default_max_replicas() -> i32 {
    10
}

fn default_percentage() -> i32 {
    100
}

/// Where `cargo xtask crds` writes the CRD, relative to the repository root.
pub const CRD_FILE: &str = "crds/modeldeployments.deployment.beamlit.com.yaml";

/// The CRD as YAML, as `cargo xtask crds` writes it into `crds/`.
pub fn crd_yaml() -> anyhow::Result<String> {
    use kube::CustomResourceExt as _;
    let crd = ModelDeployment::crd();
    Ok(format!(
        "# Generated from api/src/model_deployment.rs by `cargo xtask crds`; do not edit.\n{}",
        crate::yaml::to_string(&crd)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed README's ModelDeployment, verbatim (checked against the README in
    /// tests/tests/crd.rs).
    const SEED: &str = include_str!("../../tests/fixtures/model-deployment.yaml");

    #[test]
    fn the_seed_parses_with_its_values() {
        let md: ModelDeployment = serde_saphyr::from_str(SEED).expect("seed parses");
        let spec = &md.spec;
        assert_eq!(spec.model, "php-apache");
        assert!(spec.enabled, "enabled defaults to true");
        assert_eq!(spec.model_source_ref.kind, WorkloadKind::Deployment);
        let offloading = spec.offloading_config.as_ref().expect("offloadingConfig");
        assert_eq!(offloading.behavior.percentage, 50);
        assert_eq!(offloading.metrics.len(), 1);
        assert_eq!(
            spec.service_ref
                .as_ref()
                .and_then(|s| s.target_port.clone()),
            Some(IntOrString::Int(80))
        );
    }

    #[test]
    fn false_and_zero_survive_a_round_trip() {
        let mut md: ModelDeployment = serde_saphyr::from_str(SEED).expect("seed parses");
        md.spec.enabled = false;
        if let Some(o) = md.spec.offloading_config.as_mut() {
            o.behavior.percentage = 0;
        }
        let text = serde_json::to_string(&md).expect("serializes");
        assert!(text.contains(r#""enabled":false"#), "{text}");
        assert!(text.contains(r#""percentage":0"#), "{text}");
        let back: ModelDeployment = serde_json::from_str(&text).expect("parses back");
        assert_eq!(back.spec, md.spec);
    }

    #[test]
    fn defaults_follow_the_reference() {
        let md: ModelDeployment = serde_saphyr::from_str(
            "apiVersion: deployment.beamlit.com/v1alpha1\nkind: ModelDeployment\nmetadata: {name: m}\n\
             spec:\n  model: m\n  modelSourceRef: {kind: Deployment, name: m}\n  offloadingConfig: {}\n",
        )
        .expect("minimal spec parses");
        assert!(md.spec.enabled);
        assert_eq!(md.spec.environment, "production");
        assert_eq!(md.spec.model_source_ref.api_version, "apps/v1");
        let o = md.spec.offloading_config.expect("offloadingConfig");
        assert_eq!(o.behavior.percentage, 100);
        assert!(o.metrics.is_empty());
    }

    #[test]
    fn crds_directory_is_current() {
        for (file, yaml) in crate::all_crds().expect("crds render") {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(file);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == yaml,
                "{} is stale or missing: run `cargo xtask crds` and commit the result",
                path.display()
            );
        }
    }

    #[test]
    fn schema_carries_ranges_enums_and_printer_columns() {
        let yaml = crd_yaml().expect("crd renders");
        for needle in [
            "maximum: 100",
            "- Deployment",
            "- StatefulSet",
            "- https",
            "- remotePolicy",
            "name: Offload",
            "jsonPath: .status.offloadPercent",
            "shortNames:",
            "subresources:",
        ] {
            assert!(yaml.contains(needle), "CRD lacks `{needle}`");
        }
    }
}
