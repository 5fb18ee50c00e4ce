//! `Pods`, `Object` and `External` metrics through the aggregated metrics APIs
//! (custom.metrics.k8s.io, external.metrics.k8s.io) of a real kube-apiserver, served by a
//! metrics adapter the test controls. A cluster of its own: APIServices are cluster-wide.
use std::time::Duration;

use anyhow::Result;
use beamlit_testbed::{
    cluster::TestCluster,
    crds::install_model_deployment_crd,
    metrics_adapter::MetricsAdapter,
    require_privileges,
    seed::{ControllerProcess, PHP_APACHE, php_apache_pod, seed_model_deployment},
};

const METRICS: &str = "      - type: Pods\n        pods:\n          metric: {name: requests_per_second}\n          \
target: {type: AverageValue, averageValue: \"10\"}\n      - type: Object\n        object:\n          \
describedObject: {apiVersion: v1, kind: Service, name: php-apache}\n          metric: {name: queue_length}\n          \
target: {type: Value, value: \"100\"}\n      - type: External\n        external:\n          \
metric: {name: beamlit_backlog, selector: {matchLabels: {queue: models}}}\n          \
target: {type: AverageValue, averageValue: \"20\"}\n";

#[test]
fn pods_object_and_external_metrics_through_the_aggregated_apis() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::start_with_nodes(1)?;
    install_model_deployment_crd(&cluster)?;
    let adapter = MetricsAdapter::start(&cluster)?;
    let ns = cluster.namespace("custom")?;
    cluster.apply(ns.name(), PHP_APACHE)?;
    cluster.wait_deployment_ready(ns.name(), "php-apache", 1, Duration::from_secs(60))?;
    let pod = php_apache_pod(&cluster, ns.name())?;
    adapter.set_pods(ns.name(), "requests_per_second", &[(&pod, "5")]);
    adapter.set_object(ns.name(), "services", "php-apache", "queue_length", "50");
    adapter.set_external(ns.name(), "beamlit_backlog", &["10"]);
    let md = seed_model_deployment(ns.name()).replace(
        "      - type: Resource\n        resource:\n          name: cpu\n          target:\n            type: Utilization\n            averageUtilization: 90\n",
        METRICS,
    );
    assert!(
        md.contains("beamlit_backlog"),
        "the seed's metric block moved: {md}"
    );
    cluster.apply(ns.name(), &md)?;
    let controller = ControllerProcess::start(&cluster, ns.name())?;
    let wait = |what: &str, check: &dyn Fn(&serde_json::Value) -> bool| {
        controller.wait_seed_status(&cluster, ns.name(), Duration::from_secs(30), what, check)
    };
    wait("all three read, all below: healthy", &|s| {
        s["metrics"][0]["current"] == "5"
            && s["metrics"][1]["current"] == "50"
            // External AverageValue: the sum (10) over 1 ready replica.
            && s["metrics"][2]["current"] == "10"
            && s["offloadPercent"] == 0
            && s["reason"] == "Healthy"
    })?;
    let pods_query = adapter
        .last_query("/requests_per_second")
        .unwrap_or_default();
    assert!(
        pods_query.contains("labelSelector=run%3Dphp-apache"),
        "{pods_query}"
    );
    let external_query = adapter.last_query("/beamlit_backlog").unwrap_or_default();
    assert!(
        external_query.contains("labelSelector=queue%3Dmodels"),
        "{external_query}"
    );

    adapter.set_pods(ns.name(), "requests_per_second", &[(&pod, "25")]);
    wait("pods metric above: offload the seed's 50%", &|s| {
        s["metrics"][0]["above"] == true
            && s["offloadPercent"] == 50
            && s["reason"] == "MetricAboveTarget"
    })?;
    adapter.set_pods(ns.name(), "requests_per_second", &[(&pod, "5")]);
    adapter.set_object(ns.name(), "services", "php-apache", "queue_length", "500");
    wait("object metric above", &|s| {
        s["metrics"][0]["above"] == false && s["metrics"][1]["above"] == true
    })?;
    adapter.set_object(ns.name(), "services", "php-apache", "queue_length", "50");
    adapter.set_external(ns.name(), "beamlit_backlog", &["30", "20"]);
    wait(
        "external metric above (50 over 1 replica against 20)",
        &|s| {
            s["metrics"][1]["above"] == false
                && s["metrics"][2]["current"] == "50"
                && s["metrics"][2]["above"] == true
        },
    )?;
    Ok(())
}
