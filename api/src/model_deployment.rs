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
    #[schemars(length(min = 1))]
    pub model: String,
    /// `false` disables offloading (and keeps it disabled across updates).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Beamlit environment.
    #[serde(default = "default_environment")]
    #[schemars(length(min = 1))]
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
    #[schemars(length(min = 1))]
    pub name: String,
    /// Defaults to the ModelDeployment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    #[schemars(length(min = 1))]
    pub name: String,
    /// Defaults to the ModelDeployment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// `host[:port]`.
    #[schemars(length(min = 1))]
    pub host: String,
    #[serde(default)]
    pub scheme: Scheme,
    /// Prefix of every forwarded path; `$workspace` and `$model` are substituted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default)]
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
    #[schemars(length(min = 1))]
    pub client_id: String,
    /// Inline secret (accepted for compatibility; prefer `clientSecretRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// The client secret in a Secret of the ModelDeployment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1))]
    pub name: String,
    #[schemars(length(min = 1))]
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
        serde_yaml::to_string(&crd)?
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
        let md: ModelDeployment = serde_yaml::from_str(SEED).expect("seed parses");
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
        let mut md: ModelDeployment = serde_yaml::from_str(SEED).expect("seed parses");
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
        let md: ModelDeployment = serde_yaml::from_str(
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
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CRD_FILE);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == crd_yaml().expect("crd renders"),
            "{} is stale or missing: run `cargo xtask crds` and commit the result",
            path.display()
        );
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
