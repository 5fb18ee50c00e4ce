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

/// A stand-in for metrics-server: PodMetrics (metrics.k8s.io/v1beta1) served as a CRD.
pub const POD_METRICS_CRD: &str = include_str!("../fixtures/pod-metrics-crd.yaml");

/// The committed ModelDeploymentGrant CRD.
pub const GRANT_CRD: &str =
    include_str!("../../crds/modeldeploymentgrants.deployment.beamlit.com.yaml");

/// The ModelDeployment CRD and the grant CRD the controller watches with it (a controller
/// without the grant CRD would wait for its caches forever).
pub fn install_model_deployment_crd(cluster: &TestCluster) -> Result<()> {
    install_once(
        cluster,
        MODEL_DEPLOYMENT_CRD,
        "modeldeployments.deployment.beamlit.com",
    )?;
    install_once(
        cluster,
        GRANT_CRD,
        "modeldeploymentgrants.deployment.beamlit.com",
    )
}

/// metrics.k8s.io's PodMetrics at metrics-server's URL, written by the test.
pub fn install_pod_metrics_crd(cluster: &TestCluster) -> Result<()> {
    install_once(cluster, POD_METRICS_CRD, "pods.metrics.k8s.io")
}

fn install_once(cluster: &TestCluster, yaml: &str, name: &str) -> Result<()> {
    // (API server URL, CRD) pairs installed; the lock serializes installs.
    static INSTALLED: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    let mut installed = INSTALLED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let key = format!("{} {name}", cluster.server());
    if installed.contains(&key) {
        return Ok(());
    }
    cluster.kubectl_with_stdin(&["apply", "-f", "-"], Some(yaml))?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        &format!("crd/{name}"),
    ])?;
    installed.insert(key);
    Ok(())
}
