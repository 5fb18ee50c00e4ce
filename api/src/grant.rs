//! `ModelDeploymentGrant` (`deployment.beamlit.com/v1alpha1`, namespaced), modelled on Gateway
//! API's ReferenceGrant: it lives in the namespace of a Service or workload and lets
//! ModelDeployments of other namespaces name it. Whoever may write grants in a namespace (its
//! owners) decides who may offload its Services; nobody else can. Without a grant, references
//! stay in the ModelDeployment's own namespace.
//!
//! ```yaml
//! apiVersion: deployment.beamlit.com/v1alpha1
//! kind: ModelDeploymentGrant
//! metadata: {name: team-a-may-offload-llama, namespace: shared-models}
//! spec:
//!   from:
//!     - namespace: team-a          # ModelDeployments in team-a ...
//!   to:
//!     - kind: Service              # ... may name the Service llama of shared-models
//!       name: llama
//!     - kind: Deployment           # ... and any Deployment here (no name: every one)
//! ```
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "deployment.beamlit.com",
    version = "v1alpha1",
    kind = "ModelDeploymentGrant",
    plural = "modeldeploymentgrants",
    singular = "modeldeploymentgrant",
    shortname = "mdgrant",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentGrantSpec {
    /// The namespaces whose ModelDeployments may reference objects of this namespace.
    #[schemars(length(min = 1, max = 16))]
    pub from: Vec<GrantFrom>,
    /// What they may reference.
    #[schemars(length(min = 1, max = 16))]
    pub to: Vec<GrantTo>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantFrom {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantTo {
    pub kind: GrantKind,
    /// One object of that kind; absent: every object of that kind in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
}

/// What a ModelDeployment can reference: its Service (`serviceRef`) or its workload
/// (`modelSourceRef`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GrantKind {
    Service,
    Deployment,
    StatefulSet,
    ReplicaSet,
    DaemonSet,
}

impl From<crate::WorkloadKind> for GrantKind {
    fn from(kind: crate::WorkloadKind) -> Self {
        match kind {
            crate::WorkloadKind::Deployment => GrantKind::Deployment,
            crate::WorkloadKind::StatefulSet => GrantKind::StatefulSet,
            crate::WorkloadKind::ReplicaSet => GrantKind::ReplicaSet,
            crate::WorkloadKind::DaemonSet => GrantKind::DaemonSet,
        }
    }
}

/// Whether one of `grants` (read from `target_namespace`) lets a ModelDeployment of
/// `from_namespace` name the `kind` object `name` there. A grant of another namespace never
/// counts: only the target namespace's owners can grant.
pub fn permits<'a>(
    grants: impl IntoIterator<Item = &'a ModelDeploymentGrant>,
    from_namespace: &str,
    target_namespace: &str,
    kind: GrantKind,
    name: &str,
) -> bool {
    grants.into_iter().any(|g| {
        g.metadata.namespace.as_deref() == Some(target_namespace)
            && g.spec.from.iter().any(|f| f.namespace == from_namespace)
            && g.spec
                .to
                .iter()
                .any(|t| t.kind == kind && t.name.as_deref().is_none_or(|n| n == name))
    })
}

/// Where `cargo xtask crds` writes this CRD, relative to the repository root.
pub const GRANT_CRD_FILE: &str = "crds/modeldeploymentgrants.deployment.beamlit.com.yaml";

/// The grant CRD as YAML, as `cargo xtask crds` writes it into `crds/`.
pub fn grant_crd_yaml() -> anyhow::Result<String> {
    use kube::CustomResourceExt as _;
    Ok(format!(
        "# Generated from api/src/grant.rs by `cargo xtask crds`; do not edit.\n{}",
        crate::yaml::to_string(&ModelDeploymentGrant::crd())?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(ns: &str, from: &str, to: &[(GrantKind, Option<&str>)]) -> ModelDeploymentGrant {
        let mut g = ModelDeploymentGrant::new(
            "g",
            ModelDeploymentGrantSpec {
                from: vec![GrantFrom {
                    namespace: from.into(),
                }],
                to: to
                    .iter()
                    .map(|(kind, name)| GrantTo {
                        kind: *kind,
                        name: name.map(String::from),
                    })
                    .collect(),
            },
        );
        g.metadata.namespace = Some(ns.into());
        g
    }

    #[test]
    fn grants_table() {
        use GrantKind::*;
        let named = grant("shared", "team-a", &[(Service, Some("llama"))]);
        let any_deployment = grant("shared", "team-a", &[(Deployment, None)]);
        let elsewhere = grant("team-a", "team-a", &[(Service, None)]);
        let cases = [
            (
                "named Service",
                vec![&named],
                "team-a",
                Service,
                "llama",
                true,
            ),
            (
                "other name",
                vec![&named],
                "team-a",
                Service,
                "mistral",
                false,
            ),
            (
                "other namespace asks",
                vec![&named],
                "team-b",
                Service,
                "llama",
                false,
            ),
            (
                "other kind",
                vec![&named],
                "team-a",
                Deployment,
                "llama",
                false,
            ),
            (
                "every Deployment",
                vec![&any_deployment],
                "team-a",
                Deployment,
                "x",
                true,
            ),
            ("no grant", vec![], "team-a", Service, "llama", false),
            // A grant written in the requester's own namespace grants nothing elsewhere.
            (
                "grant in the wrong namespace",
                vec![&elsewhere],
                "team-a",
                Service,
                "llama",
                false,
            ),
        ];
        for (name, grants, from, kind, object, expected) in cases {
            assert_eq!(
                permits(grants, from, "shared", kind, object),
                expected,
                "{name}"
            );
        }
    }
}
