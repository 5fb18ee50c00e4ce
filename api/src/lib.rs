//! Kubernetes API types shared by the controller and the agents, so that both read and write
//! the same shapes and nothing drifts between them.
//!
//! - [`model_deployment`]: the `ModelDeployment` custom resource
//!   (`deployment.beamlit.com/v1alpha1`): what the user writes (spec) and what the controller
//!   decides (status), which the agents apply;
//! - [`endpoints`]: ready endpoints of a Service, as both count them;
//! - [`acknowledgement`]: what each agent reports back on its node's Lease: which decision of
//!   each ModelDeployment it has applied;
//! - [`grant`]: the `ModelDeploymentGrant` a namespace writes to let ModelDeployments of other
//!   namespaces name its Services and workloads;
//! - [`validate`]: the field rules, shared by the CRD's CEL rules, the controller and the agents;
//! - [`yaml`]: reading the hand-written YAML files with the key path, line and column of an error.
pub mod acknowledgement;
pub mod endpoints;
pub mod grant;
pub mod model_deployment;
pub mod validate;
pub mod yaml;

pub use model_deployment::*;

/// Every CRD of the project: (file under the repository root, YAML), as `cargo xtask crds`
/// writes them into `crds/` and the chart's `crds/`.
pub fn all_crds() -> anyhow::Result<Vec<(&'static str, String)>> {
    Ok(vec![
        (model_deployment::CRD_FILE, model_deployment::crd_yaml()?),
        (grant::GRANT_CRD_FILE, grant::grant_crd_yaml()?),
    ])
}
