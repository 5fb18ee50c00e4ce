//! Kubernetes' own HPA controller as the oracle for the controller's metric decision.
//!
//! Both watch the same three pods (written by the test: the node simulator leaves pods of another
//! scheduler alone, so their phase, readiness and start times are the test's), with the same
//! PodMetrics (metrics.k8s.io as a CRD at metrics-server's URL) and the same metric, CPU
//! `Utilization` 90: an HPA with `minReplicas = maxReplicas = 3` on a StatefulSet that nothing
//! scales (the test cluster runs no StatefulSet controller, so the pods stay the test's), and a
//! ModelDeployment whose `modelSourceRef` is that StatefulSet. Through a series of samples (even,
//! uneven, at and around the tolerance boundary, a pod without a sample, young pods whose sample
//! predates a full window of readiness, unready pods), at every step "the HPA would scale up"
//! (its unclamped proposal, from its log, is above 3) must equal "the controller says
//! MetricAboveTarget", and the utilization in both statuses must be equal. The same for a
//! `ContainerResource` metric of one container beside a busy sidecar, and for a `Pods`
//! metric (`AverageValue` 10) through custom.metrics.k8s.io, served by the test's metrics adapter
//! on a cluster of its own (APIServices are cluster-wide): even, at the boundary, a pod without a
//! value, a pending pod, a value for a pod that is not the workload's.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use beamlit_controller::metric_math::parse_quantity_milli;
use beamlit_testbed::{
    cluster::TestCluster,
    crds::{install_model_deployment_crd, install_pod_metrics_crd},
    hpa_oracle::{HpaOracle, HpaSync},
    metrics_adapter::MetricsAdapter,
    require_privileges,
    seed::{ControllerProcess, PHP_APACHE, seed_model_deployment, status},
};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

const PODS: [&str; 3] = ["oracle-a", "oracle-b", "oracle-c"];
/// Another scheduler's name: the node simulator binds and runs only default-scheduler pods.
const SCHEDULER: &str = "beamlit-test-unscheduled";

/// The CPU metric of both, in the HPA's spec.
const CPU_METRIC: &str = "- type: Resource\n    resource: {name: cpu, target: {type: Utilization, averageUtilization: 90}}";
/// The `ContainerResource` metric of both: the `model` container only.
const CONTAINER_METRIC: &str = "- type: ContainerResource\n    containerResource: {name: cpu, container: model, target: {type: Utilization, averageUtilization: 90}}";
/// The `Pods` metric of both.
const PODS_METRIC: &str = "- type: Pods\n    pods: {metric: {name: requests_per_second}, target: {type: AverageValue, averageValue: \"10\"}}";

/// The pinned StatefulSet and its HPA with `metric` (one item of `spec.metrics`).
fn workload(metric: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: oracle}}\nspec:\n  replicas: 3\n  \
         serviceName: oracle\n  selector: {{matchLabels: {{app: hpa-oracle}}}}\n  template:\n    \
         metadata: {{labels: {{app: hpa-oracle}}}}\n    spec:\n      schedulerName: {SCHEDULER}\n      \
         containers: [{{name: model, image: example.invalid/model:1, resources: {{requests: {{cpu: 200m}}}}}}]\n\
         ---\napiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {{name: oracle}}\nspec:\n  \
         scaleTargetRef: {{apiVersion: apps/v1, kind: StatefulSet, name: oracle}}\n  minReplicas: 3\n  \
         maxReplicas: 3\n  metrics:\n  {metric}\n"
    )
}

/// A pod of the workload: the `model` container requests 200m; with `sidecar`, a `proxy`
/// container requests 100m more.
fn pod_yaml(name: &str, sidecar: bool) -> String {
    let proxy = if sidecar {
        ", {name: proxy, image: example.invalid/proxy:1, resources: {requests: {cpu: 100m}}}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: hpa-oracle}}}}\nspec:\n  \
         schedulerName: {SCHEDULER}\n  containers: [{{name: model, image: example.invalid/model:1, \
         resources: {{requests: {{cpu: 200m}}}}}}{proxy}]\n"
    )
}

/// One pod at one step: its usage (`None`: no PodMetrics), how old its sample is, when it
/// started and whether (since when) it is ready; times in seconds before the step.
#[derive(Clone, Copy)]
struct PodAt {
    phase: &'static str,
    usage: Option<&'static str>,
    sample_age: i64,
    started: i64,
    ready: bool,
    ready_since: i64,
}

/// Started an hour ago, ready since: every rule lets its sample count.
const fn settled(usage: &'static str) -> PodAt {
    PodAt {
        phase: "Running",
        usage: Some(usage),
        sample_age: 0,
        started: 3600,
        ready: true,
        ready_since: 3590,
    }
}

const fn no_sample() -> PodAt {
    PodAt {
        usage: None,
        ..settled("0")
    }
}

struct Step {
    what: &'static str,
    pods: [PodAt; 3],
    /// A value for a pod that is not the workload's (`Pods` metrics only).
    stranger: Option<&'static str>,
    /// What the HPA is expected to do, so that each step is known to exercise what it says.
    hpa_up: bool,
    /// Words the controller's metric message must contain (the pod and the rule), if any.
    message: &'static [&'static str],
}

fn cpu_steps() -> Vec<Step> {
    // Started 60 s ago and ready for 40 s: within the CPU initialization period (5 min).
    let young = |usage, sample_age| PodAt {
        phase: "Running",
        usage: Some(usage),
        sample_age,
        started: 60,
        ready: true,
        ready_since: 40,
    };
    let unready_starting = |usage| PodAt {
        phase: "Running",
        usage: Some(usage),
        sample_age: 0,
        started: 60,
        ready: false,
        ready_since: 50,
    };
    // Ready once, unready for the last ten minutes: the HPA keeps its CPU sample.
    let became_unready = |usage| PodAt {
        phase: "Running",
        usage: Some(usage),
        sample_age: 0,
        started: 3600,
        ready: false,
        ready_since: 600,
    };
    vec![
        Step {
            what: "even, below: 50%",
            pods: [settled("100m"), settled("100m"), settled("100m")],
            stranger: None,
            hpa_up: false,
            message: &[],
        },
        Step {
            what: "even, above: 150%",
            pods: [settled("300m"), settled("300m"), settled("300m")],
            stranger: None,
            hpa_up: true,
            message: &[],
        },
        Step {
            what: "uneven, above: 700m of 600m is 116%",
            pods: [settled("100m"), settled("200m"), settled("400m")],
            stranger: None,
            hpa_up: true,
            message: &[],
        },
        Step {
            what: "at the tolerance boundary: 99% of 90% is a ratio of exactly 1.1, within",
            pods: [settled("198m"), settled("198m"), settled("198m")],
            stranger: None,
            hpa_up: false,
            message: &[],
        },
        Step {
            what: "just past the boundary: 100%",
            pods: [settled("200m"), settled("200m"), settled("200m")],
            stranger: None,
            hpa_up: true,
            message: &[],
        },
        Step {
            what: "uneven, within: 593m of 600m truncates to 98%",
            pods: [settled("100m"), settled("200m"), settled("293m")],
            stranger: None,
            hpa_up: false,
            message: &[],
        },
        Step {
            what: "a pod without a sample: 125% over two, 83% with it at 0: hold",
            pods: [settled("250m"), settled("250m"), no_sample()],
            stranger: None,
            hpa_up: false,
            message: &["oracle-c", "no sample", "within the tolerance: hold"],
        },
        Step {
            what: "a pod without a sample and the others well above: 133% with it at 0",
            pods: [settled("400m"), settled("400m"), no_sample()],
            stranger: None,
            hpa_up: true,
            message: &["oracle-c", "no sample", "above the target"],
        },
        Step {
            what: "a young pod's sample from before one window of readiness is set aside",
            pods: [settled("100m"), settled("100m"), young("600m", 20)],
            stranger: None,
            hpa_up: false,
            message: &["oracle-c", "sample older than one window"],
        },
        Step {
            what: "a young pod with a fresh sample counts: 133%",
            pods: [settled("100m"), settled("100m"), young("600m", 0)],
            stranger: None,
            hpa_up: true,
            message: &[],
        },
        Step {
            what: "an unready young pod: 125% over two, 83% with it at 0: hold",
            pods: [settled("250m"), settled("250m"), unready_starting("600m")],
            stranger: None,
            hpa_up: false,
            message: &[
                "oracle-c",
                "not ready, within the CPU initialization period",
            ],
        },
        Step {
            what: "an unready young pod and the others well above: 116% with it at 0",
            pods: [settled("350m"), settled("350m"), unready_starting("600m")],
            stranger: None,
            hpa_up: true,
            message: &["oracle-c", "unready pods at 0", "above the target"],
        },
        Step {
            what: "a pod that became unready after being ready keeps its sample: 133%",
            pods: [settled("100m"), settled("100m"), became_unready("600m")],
            stranger: None,
            hpa_up: true,
            message: &[],
        },
        Step {
            what: "back to even, below",
            pods: [settled("100m"), settled("100m"), settled("100m")],
            stranger: None,
            hpa_up: false,
            message: &[],
        },
    ]
}

/// `ContainerResource` of the `model` container (200m), beside a `proxy` sidecar at 500m of its
/// 100m: a `Resource` metric over both containers would be far above throughout.
fn container_steps() -> Vec<Step> {
    let young = |usage, sample_age| PodAt {
        usage: Some(usage),
        sample_age,
        started: 60,
        ready: true,
        ready_since: 40,
        ..settled("0")
    };
    let step = |what: &'static str,
                pods: [PodAt; 3],
                hpa_up: bool,
                message: &'static [&'static str]| Step {
        what,
        pods,
        stranger: None,
        hpa_up,
        message,
    };
    vec![
        step(
            "the container below: 50%, the sidecar aside",
            [settled("100m"), settled("100m"), settled("100m")],
            false,
            &[],
        ),
        step(
            "the container above: 150%",
            [settled("300m"), settled("300m"), settled("300m")],
            true,
            &[],
        ),
        step(
            "a pod whose PodMetrics lack the container: 125% over two, 83% with it at 0: hold",
            [settled("250m"), settled("250m"), no_sample()],
            false,
            &["oracle-c", "no sample", "within the tolerance: hold"],
        ),
        step(
            "a young pod's container sample from before one window of readiness is set aside",
            [settled("100m"), settled("100m"), young("600m", 20)],
            false,
            &["oracle-c", "sample older than one window"],
        ),
        step(
            "back to even, below",
            [settled("100m"), settled("100m"), settled("100m")],
            false,
            &[],
        ),
    ]
}

fn pods_steps() -> Vec<Step> {
    let pending = |usage: &'static str| PodAt {
        phase: "Pending",
        ..settled(usage)
    };
    let step = |what: &'static str,
                pods: [PodAt; 3],
                stranger: Option<&'static str>,
                hpa_up: bool,
                message: &'static [&'static str]| Step {
        what,
        pods,
        stranger,
        hpa_up,
        message,
    };
    vec![
        step(
            "even, below: 5",
            [settled("5"), settled("5"), settled("5")],
            None,
            false,
            &[],
        ),
        step(
            "even, above: 20",
            [settled("20"), settled("20"), settled("20")],
            None,
            true,
            &[],
        ),
        step(
            "at the tolerance boundary: 11 of 10, within",
            [settled("11"), settled("11"), settled("11")],
            None,
            false,
            &[],
        ),
        step(
            "just past the boundary: 11100m",
            [settled("11100m"), settled("11100m"), settled("11100m")],
            None,
            true,
            &[],
        ),
        step(
            "a pod without a value: 12 over two, 8 with it at 0: reverses, hold",
            [settled("12"), settled("12"), no_sample()],
            None,
            false,
            &["oracle-c", "no sample", "reverses the direction: hold"],
        ),
        step(
            "a pod without a value and the others well above: 20 with it at 0",
            [settled("30"), settled("30"), no_sample()],
            None,
            true,
            &["oracle-c", "no sample", "above the target"],
        ),
        step(
            "a pending pod's value is set aside: 14 over two, 9333m with it at 0: hold",
            [settled("14"), settled("14"), pending("100")],
            None,
            false,
            &["oracle-c", "pending", "within the tolerance: hold"],
        ),
        step(
            "a value for a pod that is not the workload's counts, as the HPA counts it: 12500m",
            [settled("10"), settled("10"), settled("10")],
            Some("20"),
            true,
            &[],
        ),
        step(
            "back to even, below",
            [settled("5"), settled("5"), settled("5")],
            None,
            false,
            &[],
        ),
    ]
}

fn seconds_before(now: Timestamp, seconds: i64) -> Result<String> {
    Ok(Timestamp::from_second(now.as_second() - seconds)?.to_string())
}

/// Where a step's values go: PodMetrics objects, or the metrics adapter.
enum Values<'a> {
    /// PodMetrics with the `model` container's usage; none for a pod without a sample.
    PodMetrics,
    /// PodMetrics with the `model` container's usage and the `proxy` sidecar at 500m; a pod
    /// without a sample has PodMetrics with the sidecar only.
    WithSidecar,
    Adapter(&'a MetricsAdapter),
}

/// Writes one step: each pod's status, and its value (or none).
fn write_step(cluster: &TestCluster, ns: &str, step: &Step, values: &Values<'_>) -> Result<()> {
    let now = Timestamp::now();
    let api: Api<Pod> = Api::namespaced(cluster.client(), ns);
    let mut adapter_values = Vec::new();
    for (name, at) in PODS.iter().zip(step.pods) {
        let status = json!({"status": {
            "phase": at.phase,
            "startTime": seconds_before(now, at.started)?,
            "conditions": [{
                "type": "Ready",
                "status": if at.ready { "True" } else { "False" },
                "lastTransitionTime": seconds_before(now, at.ready_since)?,
            }],
        }});
        cluster
            .block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)))
            .with_context(|| format!("status of {name}"))?;
        let pod_metrics = |containers: &str| -> Result<()> {
            cluster.apply(
                ns,
                &format!(
                    "apiVersion: metrics.k8s.io/v1beta1\nkind: PodMetrics\nmetadata:\n  name: {name}\n  \
                     labels: {{app: hpa-oracle}}\ntimestamp: \"{}\"\nwindow: 30s\ncontainers:\n{containers}",
                    seconds_before(now, at.sample_age)?
                ),
            )?;
            Ok(())
        };
        let container = |c: &str, cpu: &str| {
            format!("  - name: {c}\n    usage: {{cpu: \"{cpu}\", memory: 10Mi}}\n")
        };
        match (values, at.usage) {
            (Values::PodMetrics, Some(cpu)) => pod_metrics(&container("model", cpu))?,
            (Values::WithSidecar, Some(cpu)) => pod_metrics(&format!(
                "{}{}",
                container("model", cpu),
                container("proxy", "500m")
            ))?,
            (Values::WithSidecar, None) => pod_metrics(&container("proxy", "500m"))?,
            (Values::PodMetrics, None) => {
                cluster.kubectl(&[
                    "delete",
                    "pods.metrics.k8s.io",
                    name,
                    "-n",
                    ns,
                    "--ignore-not-found",
                ])?;
            }
            (Values::Adapter(_), Some(v)) => adapter_values.push((*name, v)),
            (Values::Adapter(_), None) => {}
        }
    }
    if let Values::Adapter(adapter) = values {
        if let Some(v) = step.stranger {
            adapter_values.push(("stranger", v));
        }
        adapter.set_pods(ns, "requests_per_second", &adapter_values);
    }
    Ok(())
}

/// The three pods (their status is the test's), the Service with one ready endpoint (so
/// readiness never decides), the pinned StatefulSet and its HPA with `metric`, and the
/// ModelDeployment on the same pods with the same metric (`md_metric`, the seed's block replaced).
fn set_up(
    cluster: &TestCluster,
    ns: &str,
    metric: &str,
    md_metric: Option<&str>,
    sidecar: bool,
) -> Result<()> {
    cluster.apply(ns, PHP_APACHE)?;
    cluster.wait_deployment_ready(ns, "php-apache", 1, Duration::from_secs(60))?;
    for pod in PODS {
        cluster.apply(ns, &pod_yaml(pod, sidecar))?;
    }
    cluster.apply(ns, &workload(metric))?;
    let mut md = seed_model_deployment(ns).replace(
        "    kind: Deployment\n    name: php-apache\n",
        "    kind: StatefulSet\n    name: oracle\n",
    );
    assert!(
        md.contains("name: oracle"),
        "the seed's modelSourceRef moved: {md}"
    );
    if let Some(m) = md_metric {
        let seed_metric = "      - type: Resource\n        resource:\n          name: cpu\n          target:\n            type: Utilization\n            averageUtilization: 90\n";
        assert!(
            md.contains(seed_metric),
            "the seed's metric block moved: {md}"
        );
        md = md.replace(seed_metric, m);
    }
    cluster.apply(ns, &md)?;
    Ok(())
}

/// Drives `steps` through both and compares at each: "the HPA would scale up" (its unclamped
/// proposal above 3) with `MetricAboveTarget`, and the HPA's current value (`hpa_current`, from
/// its status, in milli-units or percent) with the controller's.
fn compare(
    cluster: &TestCluster,
    oracle: &HpaOracle,
    ns: &str,
    steps: &[Step],
    values: &Values<'_>,
    hpa_current: &dyn Fn(&serde_json::Value) -> Option<i128>,
    controller_current: &dyn Fn(&str) -> Option<i128>,
) -> Result<()> {
    write_step(cluster, ns, &steps[0], values)?;
    let controller = ControllerProcess::start(cluster, ns)?;
    let target = format!("StatefulSet/{ns}/oracle");
    let mut table = Vec::new();
    for step in steps {
        write_step(cluster, ns, step, values)?;
        let (written, written_at) = (Instant::now(), Timestamp::now());
        // Three syncs after the write: the second read only this step's inputs, and its status
        // is written.
        let sync = oracle
            .wait_syncs(&target, written_at, 3, Duration::from_secs(60))
            .with_context(|| step.what)?;
        let proposal = match sync {
            HpaSync::Proposal(n) => n,
            HpaSync::Failed(why) => bail!("{}: the HPA failed: {why}", step.what),
        };
        let hpa: serde_json::Value = serde_json::from_str(
            &cluster.kubectl(&["get", "hpa", "oracle", "-n", ns, "-o", "json"])?,
        )?;
        let hpa_value = hpa_current(&hpa["status"]["currentMetrics"][0]).with_context(|| {
            format!("{}: no current value in the HPA's status: {hpa}", step.what)
        })?;
        // The controller resyncs every second: three seconds after the write it has evaluated
        // this step's inputs at least twice. On a loaded machine it may take longer, so wait (up
        // to 15 s) for its verdict and value to be the HPA's; a controller that computes
        // something else from these (unchanging) inputs never gets there, and the assertions
        // below say how it differs. Then it must hold still.
        if let Some(rest) = Duration::from_secs(3).checked_sub(written.elapsed()) {
            std::thread::sleep(rest);
        }
        let hpa_up = proposal > 3;
        let agrees = |s: &serde_json::Value| {
            (s["reason"] == "MetricAboveTarget") == hpa_up
                && s["metrics"][0]["current"]
                    .as_str()
                    .and_then(controller_current)
                    == Some(hpa_value)
        };
        let mut s = status(cluster, ns, "php-apache")?;
        let waiting = Instant::now();
        while !agrees(&s) && waiting.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(200));
            s = status(cluster, ns, "php-apache")?;
        }
        std::thread::sleep(Duration::from_millis(1100));
        let again = status(cluster, ns, "php-apache")?;
        // (The reason may move on its own: `Stabilizing` ends when its window does.)
        if again["metrics"] != s["metrics"] {
            bail!(
                "{}: the controller's status still moved: {s} then {again}\n{}",
                step.what,
                controller.log()
            );
        }
        let above = s["reason"] == "MetricAboveTarget";
        let metric = &s["metrics"][0];
        table.push(format!(
            "{:<82} HPA: proposes {proposal}, current {hpa_value} | controller: {}, {} ({})",
            step.what,
            metric["current"],
            s["reason"],
            metric["message"].as_str().unwrap_or("-"),
        ));
        assert_eq!(
            hpa_up,
            step.hpa_up,
            "{}: the HPA did not do what the step is about (proposal {proposal}); {hpa}\n{}",
            step.what,
            oracle.log_tail(30)
        );
        assert_eq!(
            above,
            hpa_up,
            "{}: the HPA proposes {proposal} replicas of 3, the controller says {}: {s}\n{}",
            step.what,
            s["reason"],
            controller.log()
        );
        assert_eq!(metric["above"], hpa_up, "{}: {s}", step.what);
        assert_eq!(
            metric["current"].as_str().and_then(controller_current),
            Some(hpa_value),
            "{}: the current value differs from the HPA's ({hpa_value}): {s}",
            step.what
        );
        let message = metric["message"].as_str().unwrap_or_default();
        for needle in step.message {
            assert!(
                message.contains(needle),
                "{}: the metric's message lacks {needle:?}: {s}",
                step.what
            );
        }
        if step.message.is_empty() {
            assert!(message.is_empty(), "{}: unexpected message: {s}", step.what);
        }
    }
    println!("{}", table.join("\n"));
    Ok(())
}

#[test]
fn the_cpu_decision_agrees_with_the_real_hpa_controller() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    install_pod_metrics_crd(cluster)?;
    // One HPA controller for the cluster (two would both write every HPA's status); each
    // metric in a namespace of its own (two HPAs on the same pods are refused as ambiguous).
    let oracle = HpaOracle::start(cluster)?;
    let utilization =
        |m: &serde_json::Value| m["current"]["averageUtilization"].as_i64().map(i128::from);
    let percent = |c: &str| c.strip_suffix('%')?.parse().ok();

    let ns = cluster.namespace("hpaoracle")?;
    set_up(cluster, ns.name(), CPU_METRIC, None, false)?;
    compare(
        cluster,
        &oracle,
        ns.name(),
        &cpu_steps(),
        &Values::PodMetrics,
        &|m| utilization(&m["resource"]),
        &percent,
    )?;

    let ns = cluster.namespace("hpaoraclectr")?;
    set_up(
        cluster,
        ns.name(),
        CONTAINER_METRIC,
        Some(
            "      - type: ContainerResource\n        containerResource:\n          name: cpu\n          \
             container: model\n          target: {type: Utilization, averageUtilization: 90}\n",
        ),
        true,
    )?;
    compare(
        cluster,
        &oracle,
        ns.name(),
        &container_steps(),
        &Values::WithSidecar,
        &|m| utilization(&m["containerResource"]),
        &percent,
    )
}

#[test]
fn the_pods_metric_decision_agrees_with_the_real_hpa_controller() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    // A cluster of its own: the adapter's APIServices are cluster-wide.
    let cluster = TestCluster::start_with_nodes(1)?;
    install_model_deployment_crd(&cluster)?;
    let adapter = MetricsAdapter::start(&cluster)?;
    let ns = cluster.namespace("hpaoraclepods")?;
    set_up(
        &cluster,
        ns.name(),
        PODS_METRIC,
        Some(
            "      - type: Pods\n        pods:\n          metric: {name: requests_per_second}\n          \
             target: {type: AverageValue, averageValue: \"10\"}\n",
        ),
        false,
    )?;
    let oracle = HpaOracle::start(&cluster)?;
    compare(
        &cluster,
        &oracle,
        ns.name(),
        &pods_steps(),
        &Values::Adapter(&adapter),
        &|m| parse_quantity_milli(m["pods"]["current"]["averageValue"].as_str()?).ok(),
        &|c| parse_quantity_milli(c).ok(),
    )
}
