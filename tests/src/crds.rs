//! The project's CRDs in a test cluster: installed once per cluster (tests share a cluster and
//! would race to create them), from the committed `crds/` files.
use std::{
    collections::BTreeSet,
    sync::{Mutex, OnceLock},
};

use anyhow::Result;

use crate::cluster::TestCluster;

/// The committed ModelDeployment CRD.
pub const MODEL_DEPLOYMENT_CRD: &str =
    include_str!("../../crds/modeldeployments.deployment.beamlit.com.yaml");

pub fn install_model_deployment_crd(cluster: &TestCluster) -> Result<()> {
    // API servers (by URL) that have it; the lock serializes installs.
    static INSTALLED: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    let mut installed = INSTALLED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if installed.contains(cluster.server()) {
        return Ok(());
    }
    cluster.kubectl_with_stdin(&["apply", "-f", "-"], Some(MODEL_DEPLOYMENT_CRD))?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/modeldeployments.deployment.beamlit.com",
    ])?;
    installed.insert(cluster.server().to_string());
    Ok(())
}
