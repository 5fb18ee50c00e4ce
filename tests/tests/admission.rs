//! The authorization boundary against a real kube-apiserver: a hostile tenant's ModelDeployments.
//! Malformed fields are refused by the CRD's CEL rules naming the field; references to other
//! namespaces by the chart's admission policy; what only the controller can judge (grants,
//! protected Services, allowed remote hosts, token URLs) becomes a condition and an Event, and
//! none of it ever reaches an agent's maps while the controller and the agent keep working.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::{
    TestCgroup,
    chart::{self, ChartValues},
    cluster::TestCluster,
    crds::install_model_deployment_crd,
    require_privileges,
    seed::{OffloadBed, condition, deploy_seed, events, scale, seed_model_deployment, status},
};

const WAIT: Duration = Duration::from_secs(60);

/// Each malformed field, applied by `kubectl`, is refused by the apiserver naming the field (and
/// saying why, in the words of `beamlit_api::validate`).
#[test]
fn malformed_fields_are_refused_by_the_apiserver_naming_the_field() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("celbad")?;
    let seed = seed_model_deployment(ns.name());
    let with_backend = |backend: &str| {
        seed.replace(
            "  offloadingConfig:\n",
            &format!("  offloadingConfig:\n    remoteBackend:\n{backend}"),
        )
    };
    let long_model = "m".repeat(5000);
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "host with scheme and path",
            with_backend("      host: https://attacker.example/x\n"),
            "spec.offloadingConfig.remoteBackend.host",
            "host[:port] only",
        ),
        (
            "host with a port out of range",
            with_backend("      host: fallback.internal:70000\n"),
            "spec.offloadingConfig.remoteBackend.host",
            "1 to 65535",
        ),
        (
            "header name with a space",
            with_backend("      host: h.example\n      headersToAdd: {\"X Bad\": v}\n"),
            "spec.offloadingConfig.remoteBackend.headersToAdd",
            "HTTP tokens",
        ),
        (
            "header value with a line break",
            with_backend(
                "      host: h.example\n      headersToAdd: {X-Ok: \"a\\r\\nInjected: 1\"}\n",
            ),
            "spec.offloadingConfig.remoteBackend.headersToAdd",
            "control characters",
        ),
        (
            "dot segments in the path prefix",
            with_backend("      host: h.example\n      pathPrefix: /v1/../../admin\n"),
            "spec.offloadingConfig.remoteBackend.pathPrefix",
            "`..` segments",
        ),
        (
            "a query in the path prefix",
            with_backend("      host: h.example\n      pathPrefix: /v1?x=1\n"),
            "spec.offloadingConfig.remoteBackend.pathPrefix",
            "no query",
        ),
        (
            "a 5000-character model name",
            seed.replace("model: \"php-apache\"", &format!("model: \"{long_model}\"")),
            "spec.model",
            "",
        ),
        (
            "a model name with a slash",
            seed.replace("model: \"php-apache\"", "model: \"a/../b\""),
            "spec.model",
            "letters, digits",
        ),
        (
            "a token URL that is no http(s) URL",
            with_backend(
                "      host: h.example\n      authConfig:\n        type: oauth\n        \
                 oauthConfig: {clientId: c, clientSecretRef: {name: s, key: k}, tokenUrl: 'ftp://h.example/t'}\n",
            ),
            "spec.offloadingConfig.remoteBackend.authConfig.oauthConfig.tokenUrl",
            "http(s) URL",
        ),
        (
            "a zero utilization target",
            seed.replace("averageUtilization: 90", "averageUtilization: 0"),
            "spec.offloadingConfig.metrics",
            "resource.target.averageUtilization must be positive",
        ),
        (
            "a quantity that does not parse",
            seed.replace(
                "          target:\n            type: Utilization\n            averageUtilization: 90\n",
                "          target:\n            type: AverageValue\n            averageValue: lots\n",
            ),
            "spec.offloadingConfig.metrics",
            "resource.target.averageValue must be a positive quantity",
        ),
        (
            "a negative quantity",
            seed.replace(
                "          target:\n            type: Utilization\n            averageUtilization: 90\n",
                "          target:\n            type: AverageValue\n            averageValue: \"-5\"\n",
            ),
            "spec.offloadingConfig.metrics",
            "positive quantity",
        ),
        (
            "a Service name that is no DNS label",
            seed.replace("  serviceRef:\n    name: php-apache", "  serviceRef:\n    name: Php_Apache"),
            "spec.serviceRef.name",
            "DNS label",
        ),
    ];
    for (name, yaml, field, why) in cases {
        assert!(yaml != seed, "{name}: the edit did not apply");
        let err = cluster
            .apply(ns.name(), &yaml)
            .err()
            .with_context(|| format!("{name}: the apiserver accepted it"))?;
        let message = format!("{err:#}");
        assert!(
            message.contains(field) && message.contains(why),
            "{name}: `{message}` does not name {field} ({why})"
        );
    }
    // Nothing was stored, and the seed as written still is accepted.
    let stored = cluster.kubectl(&["get", "modeldeployments", "-n", ns.name(), "-o", "name"])?;
    assert!(stored.trim().is_empty(), "stored: {stored}");
    cluster.apply(ns.name(), &seed)?;
    Ok(())
}

/// The chart's ValidatingAdmissionPolicy, rendered for a release of this test only (bound to
/// the test's namespace), removed on drop.
struct AdmissionPolicy<'c> {
    cluster: &'c TestCluster,
    yaml: String,
}

impl<'c> AdmissionPolicy<'c> {
    fn install(cluster: &'c TestCluster, namespace: &str) -> Result<Self> {
        let release = format!("adm-{}", std::process::id());
        let rendered = chart::render_release(
            &release,
            namespace,
            &ChartValues::new().set_list("allowedNamespaces", &[namespace]),
        )?;
        let objects: Vec<&serde_json::Value> = rendered
            .objects
            .iter()
            .filter(|o| {
                o["kind"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"))
            })
            .collect();
        if objects.len() != 2 {
            bail!("the chart rendered {} admission objects", objects.len());
        }
        let yaml = objects
            .iter()
            .map(serde_saphyr::to_string)
            .collect::<Result<Vec<_>, _>>()?
            .join("---\n");
        cluster.kubectl_with_stdin(&["apply", "-f", "-"], Some(&yaml))?;
        Ok(Self { cluster, yaml })
    }
}

impl Drop for AdmissionPolicy<'_> {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl_with_stdin(
            &["delete", "--ignore-not-found", "-f", "-"],
            Some(&self.yaml),
        );
    }
}

/// With the chart's defaults, a reference to another namespace is refused at admission with
/// the field named; the seed (its own namespace written out) is accepted.
#[test]
fn references_to_other_namespaces_are_refused_at_admission() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("vap")?;
    let _policy = AdmissionPolicy::install(cluster, ns.name())?;
    let seed = seed_model_deployment(ns.name());
    let cross_service = seed.replacen(
        &format!(
            "    name: php-apache\n    namespace: {}\n    targetPort",
            ns.name()
        ),
        "    name: kubernetes\n    namespace: default\n    targetPort",
        1,
    );
    let cross_workload = seed.replacen(
        &format!(
            "    kind: Deployment\n    name: php-apache\n    namespace: {}",
            ns.name()
        ),
        "    kind: Deployment\n    name: coredns\n    namespace: kube-system",
        1,
    );
    for (name, yaml, field) in [
        ("serviceRef", &cross_service, "spec.serviceRef.namespace"),
        (
            "modelSourceRef",
            &cross_workload,
            "spec.modelSourceRef.namespace",
        ),
    ] {
        assert!(*yaml != seed, "{name}: the edit did not apply");
        // A new policy takes effect within a second or two of being created.
        let started = Instant::now();
        let message = loop {
            match cluster.apply(ns.name(), yaml) {
                Err(e) => break format!("{e:#}"),
                Ok(_) if started.elapsed() < Duration::from_secs(20) => {
                    cluster.kubectl(&["delete", "md", "php-apache", "-n", ns.name()])?;
                    std::thread::sleep(Duration::from_millis(250));
                }
                Ok(_) => bail!("{name}: a reference to another namespace was admitted"),
            }
        };
        assert!(
            message.contains(field),
            "{name}: `{message}` does not name {field}"
        );
    }
    cluster.apply(ns.name(), &seed)?;
    Ok(())
}

fn inspect_models(agent: &beamlit_testbed::AgentFixture) -> Result<Vec<String>> {
    let report = agent.inspect()?;
    let mut models: Vec<String> = report["services"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r["model_deployment"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    models.sort();
    models.dedup();
    Ok(models)
}

/// A hostile tenant's ModelDeployments, next to a good one, with the controller and an agent
/// from the chart: each hostile one gets `Accepted=False` naming the field and a Warning Event,
/// and the agent's maps only ever hold the good one; a grant from the target namespace lets the
/// cross-namespace one through, and withdrawing it takes it out again; the good model still
/// fails over afterwards.
#[test]
fn hostile_model_deployments_are_refused_and_never_reach_an_agent() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    let bed = OffloadBed::new(cluster, "hostile")?;
    let victim = cluster.namespace("victim")?;
    cluster.apply(
        victim.name(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: victim}\nspec:\n  ports: [{port: 80}]\n",
    )?;
    deploy_seed(cluster, bed.ns())?;
    // Two namespaces: the controller watches all and handles these (the victim's Service must
    // be visible for the grant to make a difference).
    let namespaces = format!("{},{}", bed.ns(), victim.name());
    let controller = bed.controller_with(&["--namespaces", &namespaces])?;
    let node = TestCgroup::new("hostile")?;
    let agent = bed.agent("beamlit-node-1", &node)?;
    bed.wait_applied("the good model applied", |s| {
        s["agents"]["applied"] == 1 && condition(s, "Accepted")["status"] == "True"
    })
    .with_context(|| format!("{}\n{}", controller.log(), agent.log()))?;

    let remote = format!("{}:8443", bed.fake_pod.ipv4);
    let md = |name: &str, service: &str, backend: &str| {
        format!(
            "apiVersion: deployment.beamlit.com/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}}}\n\
             spec:\n  model: {name}\n  modelSourceRef: {{kind: Deployment, name: php-apache}}\n  \
             serviceRef: {service}\n  offloadingConfig:\n{backend}    behavior: {{percentage: 100}}\n"
        )
    };
    let oauth = |token_url: &str| {
        format!(
            "    remoteBackend:\n      host: '{remote}'\n      authConfig:\n        type: oauth\n        \
             oauthConfig: {{clientId: c, clientSecretRef: {{name: s, key: k}}, tokenUrl: '{token_url}'}}\n"
        )
    };
    let hostile = [
        (
            "cross-ns",
            md(
                "cross-ns",
                &format!("{{name: victim, namespace: {}}}", victim.name()),
                "",
            ),
            "RefNotPermitted",
            "spec.serviceRef.namespace",
        ),
        (
            "apiserver",
            md("apiserver", "{name: kubernetes, namespace: default}", ""),
            "ProtectedService",
            "spec.serviceRef",
        ),
        (
            "product",
            md(
                "product",
                &format!(
                    "{{name: beamlit-controller-metrics, namespace: {}}}",
                    bed.agents.name()
                ),
                "",
            ),
            "ProtectedService",
            "spec.serviceRef",
        ),
        (
            "foreign-host",
            md(
                "foreign-host",
                "{name: php-apache}",
                "    remoteBackend: {host: 'attacker.example:443'}\n",
            ),
            "RemoteHostNotAllowed",
            "spec.offloadingConfig.remoteBackend.host",
        ),
        (
            "foreign-token-url",
            md(
                "foreign-token-url",
                "{name: php-apache}",
                &oauth("https://attacker.example/oauth/token"),
            ),
            "RemoteHostNotAllowed",
            "tokenUrl",
        ),
        (
            "http-token-url",
            md(
                "http-token-url",
                "{name: php-apache}",
                &oauth(&format!("http://{remote}/oauth/token")),
            ),
            "InvalidSpec",
            "spec.offloadingConfig.remoteBackend.authConfig.oauthConfig.tokenUrl",
        ),
    ];
    for (_, yaml, _, _) in &hostile {
        cluster.apply(bed.ns(), yaml)?;
    }
    for (name, _, reason, field) in &hostile {
        let took = beamlit_testbed::seed::wait_status(cluster, bed.ns(), name, WAIT, reason, |s| {
            let c = condition(s, "Accepted");
            c["status"] == "False"
                && c["reason"] == *reason
                && c["message"].as_str().is_some_and(|m| m.contains(field))
        })
        .with_context(|| controller.log())?;
        let s = status(cluster, bed.ns(), name)?;
        assert!(
            s["service"].is_null() && s["remoteBackend"].is_null() && s["offloadPercent"] == 0,
            "{name}: a refused model published something to apply: {s}"
        );
        println!("{name}: refused ({reason}) in {took:?}");
    }
    let seen = events(cluster, bed.ns())?;
    for reason in [
        "RefNotPermitted",
        "ProtectedService",
        "RemoteHostNotAllowed",
        "InvalidSpec",
    ] {
        assert!(seen.contains(reason), "no {reason} Event: {seen}");
    }
    // Several resyncs later the agent still holds the good model only.
    std::thread::sleep(Duration::from_secs(3));
    let good = format!("{}/php-apache", bed.ns());
    assert_eq!(
        inspect_models(&agent)?,
        vec![good.clone()],
        "{}",
        agent.log()
    );

    // The victim namespace grants the reference: accepted, applied; withdrawn: removed.
    let grant = format!(
        "apiVersion: deployment.beamlit.com/v1alpha1\nkind: ModelDeploymentGrant\n\
         metadata: {{name: let-{ns}}}\nspec:\n  from: [{{namespace: {ns}}}]\n  to: [{{kind: Service, name: victim}}]\n",
        ns = bed.ns()
    );
    cluster.apply(victim.name(), &grant)?;
    beamlit_testbed::seed::wait_status(cluster, bed.ns(), "cross-ns", WAIT, "granted", |s| {
        condition(s, "Accepted")["status"] == "True" && s["service"]["namespace"] == victim.name()
    })
    .with_context(|| controller.log())?;
    let cross = format!("{}/cross-ns", bed.ns());
    let started = Instant::now();
    while !inspect_models(&agent)?.contains(&cross) {
        if started.elapsed() > WAIT {
            bail!(
                "the granted model never reached the agent:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.kubectl(&[
        "delete",
        "modeldeploymentgrant",
        "--all",
        "-n",
        victim.name(),
    ])?;
    let started = Instant::now();
    while inspect_models(&agent)?.contains(&cross) {
        if started.elapsed() > WAIT {
            bail!(
                "the model stayed in the maps after its grant went:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        condition(&status(cluster, bed.ns(), "cross-ns")?, "Accepted")["reason"],
        "RefNotPermitted"
    );

    // An inline client secret is accepted, but marked deprecated (condition and Event).
    cluster.apply(
        bed.ns(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: inline}\nspec:\n  ports: [{port: 80}]\n",
    )?;
    cluster.apply(
        bed.ns(),
        &md(
            "inline",
            "{name: inline}",
            &format!(
                "    remoteBackend:\n      host: '{remote}'\n      authConfig:\n        type: oauth\n        \
                 oauthConfig: {{clientId: c, clientSecret: inline-s3cret, tokenUrl: 'https://{remote}/oauth/token'}}\n"
            ),
        ),
    )?;
    beamlit_testbed::seed::wait_status(cluster, bed.ns(), "inline", WAIT, "deprecated", |s| {
        let d = condition(s, "Deprecated");
        condition(s, "Accepted")["status"] == "True"
            && d["reason"] == "InlineClientSecret"
            && d["message"]
                .as_str()
                .is_some_and(|m| m.contains("clientSecretRef"))
    })
    .with_context(|| controller.log())?;
    let s = status(cluster, bed.ns(), "inline")?;
    assert!(
        !s.to_string().contains("inline-s3cret"),
        "the secret in status: {s}"
    );
    assert!(events(cluster, bed.ns())?.contains("InlineClientSecret"));
    cluster.kubectl(&["delete", "md", "inline", "-n", bed.ns()])?;
    let inline = format!("{}/inline", bed.ns());
    let started = Instant::now();
    while inspect_models(&agent)?.contains(&inline) {
        if started.elapsed() > WAIT {
            bail!("the deleted model stayed in the maps:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Both processes kept working: the good model still fails over on the node.
    let svc = bed.service_address()?;
    scale(cluster, bed.ns(), 0)?;
    agent.wait_share(&svc, 10_000, WAIT)?;
    bed.wait_applied("100% for the good model", |s| s["offloadPercent"] == 100)
        .with_context(|| controller.log())?;
    assert_eq!(inspect_models(&agent)?, vec![good], "{}", agent.log());
    Ok(())
}
