//! The project's CRDs in a test cluster: installed once per test process (tests share the
//! cluster and would race to create them), from the committed `crds/` files.
use std::sync::OnceLock;

use anyhow::Result;

use crate::cluster::TestCluster;

/// The committed ModelDeployment CRD.
pub const MODEL_DEPLOYMENT_CRD: &str =
    include_str!("../../crds/modeldeployments.deployment.beamlit.com.yaml");

pub fn install_model_deployment_crd(cluster: &TestCluster) -> Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            cluster
                .kubectl_with_stdin(&["apply", "-f", "-"], Some(MODEL_DEPLOYMENT_CRD))
                .and_then(|_| {
                    cluster.kubectl(&[
                        "wait",
                        "--for=condition=Established",
                        "--timeout=30s",
                        "crd/modeldeployments.deployment.beamlit.com",
                    ])
                })
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}
