//! The committed ModelDeployment CRD (`crds/`) against a real kube-apiserver: the seed README's
//! YAML is accepted as written, defaults are applied by the server, and bad values are rejected
//! with a message that names the field.
use anyhow::{Context as _, Result};
use beamlit_testbed::{
    cluster::{TestCluster, workspace_root},
    crds::install_model_deployment_crd as install_crd,
    require_privileges,
};

/// The seed README's ModelDeployment, verbatim (its namespace lines point at `default`).
const SEED: &str = include_str!("../fixtures/model-deployment.yaml");

/// The fixture is the seed README's ModelDeployment as written.
#[test]
fn fixture_matches_seed() {
    let seed = workspace_root().join("../shared/seed/beamlit-controller-README.md");
    let Ok(text) = std::fs::read_to_string(&seed) else {
        eprintln!("{} not present; skipping", seed.display());
        return;
    };
    let marker = "kubectl apply -f - <<EOF\n";
    let start = text
        .find(&format!(
            "{marker}apiVersion: deployment.beamlit.com/v1alpha1"
        ))
        .expect("ModelDeployment block in the seed");
    let body = &text[start + marker.len()..];
    let end = body.find("\nEOF\n").expect("end of the block");
    assert_eq!(&body[..=end], SEED);
}

#[test]
fn the_seed_is_accepted_and_defaults_are_applied_by_the_server() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_crd(cluster)?;
    let ns = cluster.namespace("crdseed")?;
    cluster.apply(ns.name(), SEED)?;
    let stored: serde_json::Value = serde_json::from_str(&cluster.kubectl(&[
        "get",
        "modeldeployment",
        "php-apache",
        "-n",
        ns.name(),
        "-o",
        "json",
    ])?)?;
    let spec = &stored["spec"];
    assert_eq!(
        spec["offloadingConfig"]["behavior"]["percentage"], 50,
        "{stored}"
    );
    // Defaults come from the schema, applied by the apiserver itself.
    assert_eq!(spec["enabled"], true, "{stored}");
    assert_eq!(spec["policies"], serde_json::json!([]), "{stored}");

    // `enabled: false` and `percentage: 0` are stored as written (they were lost before).
    let off = SEED
        .replace(
            "  model: \"php-apache\"",
            "  model: \"php-apache\"\n  enabled: false",
        )
        .replace("percentage: 50", "percentage: 0");
    cluster.apply(ns.name(), &off)?;
    let stored: serde_json::Value = serde_json::from_str(&cluster.kubectl(&[
        "get",
        "md",
        "php-apache",
        "-n",
        ns.name(),
        "-o",
        "json",
    ])?)?;
    assert_eq!(stored["spec"]["enabled"], false, "{stored}");
    assert_eq!(
        stored["spec"]["offloadingConfig"]["behavior"]["percentage"],
        0
    );

    // The printer columns a person sees.
    let table = cluster.kubectl(&["get", "modeldeployment", "-n", ns.name()])?;
    let header = table.lines().next().context("kubectl printed nothing")?;
    for column in ["NAME", "MODEL", "ENV", "OFFLOAD", "REASON", "READY", "AGE"] {
        assert!(header.contains(column), "no {column} in `{header}`");
    }
    Ok(())
}

#[test]
fn bad_values_are_rejected_naming_the_field() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_crd(cluster)?;
    let ns = cluster.namespace("crdbad")?;
    let cases = [
        (
            "percentage 150",
            SEED.replace("percentage: 50", "percentage: 150"),
            "spec.offloadingConfig.behavior.percentage",
        ),
        (
            "unknown scheme",
            SEED.replace(
                "  offloadingConfig:\n",
                "  offloadingConfig:\n    remoteBackend:\n      host: run.beamlit.com\n      scheme: ftp\n",
            ),
            "spec.offloadingConfig.remoteBackend.scheme",
        ),
        (
            "missing model",
            SEED.replace("  model: \"php-apache\"\n", ""),
            "spec.model",
        ),
        (
            "unknown workload kind",
            SEED.replace("    kind: Deployment", "    kind: CronJob"),
            "spec.modelSourceRef.kind",
        ),
    ];
    for (name, yaml, field) in cases {
        let err = cluster
            .apply(ns.name(), &yaml)
            .err()
            .with_context(|| format!("{name}: the apiserver accepted it"))?;
        let message = format!("{err:#}");
        assert!(
            message.contains(field),
            "{name}: `{message}` does not name {field}"
        );
    }
    Ok(())
}
