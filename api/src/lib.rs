//! Kubernetes API types shared by the controller and the agents, so that both read and write
//! the same shapes and nothing drifts between them.
//!
//! - [`model_deployment`]: the `ModelDeployment` custom resource
//!   (`deployment.beamlit.com/v1alpha1`): what the user writes (spec) and what the controller
//!   decides (status), which the agents apply;
//! - [`endpoints`]: ready endpoints of a Service, as both count them;
//! - [`acknowledgement`]: what each agent reports back on its node's Lease: which decision of
//!   each ModelDeployment it has applied.
pub mod acknowledgement;
pub mod endpoints;
pub mod model_deployment;

pub use model_deployment::*;
