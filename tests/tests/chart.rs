//! The Helm chart and the images: the seed README's `helm install` flags render and install;
//! every rendered object passes the real apiserver's server-side validation; the controller and
//! the agent accept what the chart renders (their --check-config modes, and real runs as the
//! chart's ServiceAccounts); the agent starts with exactly the chart's capabilities and with no
//! fewer; the image archives hold runnable binaries and agree with the Dockerfiles.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::{
    AgentFixture, Netns, TestCgroup, TestDir, Topology, agent_bin,
    chart::{self, ChartValues, HostEnv, RELEASE, Rendered},
    cluster::{TestCluster, workspace_root},
    controller_bin,
    crds::install_model_deployment_crd,
    oci, require_privileges,
    seed::seed_model_deployment,
    spawn,
};

const WAIT: Duration = Duration::from_secs(60);

/// Value sets that reach every branch of the templates.
fn variants() -> Vec<(&'static str, ChartValues)> {
    vec![
        ("defaults", ChartValues::new()),
        ("the seed's flags", ChartValues::seed()),
        (
            "one namespace, CA bundle, model Secrets, Prometheus, workspace",
            ChartValues::seed()
                .set_list("allowedNamespaces", &["models"])
                .set_string("agent.caBundle", TEST_PEM)
                .set_string("beamlitApiCaBundle", TEST_PEM)
                .set("agent.readSecretsInModelNamespaces", "true")
                .set("config.prometheusUrl", "http://prometheus.monitoring:9090")
                .set("config.workspace", "my-workspace")
                .set(
                    "config.defaultRemoteBackend.headersToAdd.X-Beamlit-Environment",
                    "production",
                ),
        ),
        (
            "two namespaces, model Secrets, existing Secret, metricInformer, no metrics-server",
            ChartValues::new()
                .set_list("allowedNamespaces", &["a", "b"])
                .set("agent.readSecretsInModelNamespaces", "true")
                .set("existingSecret", "my-credentials")
                .set(
                    "config.defaultRemoteBackend.authConfig.oauthConfig.clientId",
                    "id",
                )
                .set("config.metricInformer.type", "prometheus")
                .set("config.metricInformer.prometheus.address", "http://p:9090")
                .set("agent.priorityClassName", "system-node-critical"),
        ),
        (
            "one replica without leader election, no default backend, no agent, no API token",
            ChartValues::new()
                .set("existingSecret", "my-credentials")
                .set_string("existingSecretKeys.beamlitApiToken", "")
                .set("controllerManager.replicas", "1")
                .set("config.leaderElection.enabled", "false")
                .set("config.defaultRemoteBackend.enabled", "false")
                .set("agent.enabled", "false"),
        ),
    ]
}

const TEST_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUTEST\n-----END CERTIFICATE-----\n";

fn kinds(rendered: &Rendered) -> BTreeSet<String> {
    rendered
        .objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn helm_lint_passes_with_the_defaults_and_the_seed_flags() -> Result<()> {
    let helm = chart::helm()?;
    for (name, values) in [
        ("defaults", ChartValues::new()),
        ("seed", ChartValues::seed()),
    ] {
        let out = Command::new(&helm)
            .args(["lint", "--strict"])
            .arg(chart::chart_dir())
            .args(values.args())
            .output()?;
        assert!(
            out.status.success(),
            "helm lint ({name}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The seed README's command, flag for flag: the controller image it names, its credentials
/// in a Secret (never in the controller's configuration), metrics-server, the reference's
/// defaults for the remote backend, the agents.
#[test]
fn the_seed_flags_render_what_they_say() -> Result<()> {
    let r = chart::render("default", &ChartValues::seed())?;
    let controller = r.controller()?;
    assert_eq!(controller.image(), Some("sugate/operator:latest-mac"));
    assert_eq!(
        r.agent()?.image(),
        Some(format!("{}:{}", oci::AGENT_IMAGE, env!("CARGO_PKG_VERSION")).as_str())
    );
    let deployment = r.component("Deployment", "controller")?;
    assert_eq!(deployment["spec"]["replicas"], 2);

    let config: serde_json::Value = serde_saphyr::from_str(&r.controller_config()?)?;
    let backend = &config["defaultRemoteBackend"];
    assert_eq!(backend["host"].as_str(), Some("run.beamlit.com"));
    assert_eq!(backend["scheme"].as_str(), Some("https"));
    assert_eq!(
        backend["pathPrefix"].as_str(),
        Some("/$workspace/models/$model")
    );
    let oauth = &backend["authConfig"]["oauthConfig"];
    assert_eq!(oauth["clientId"].as_str(), Some(chart::SEED_CLIENT_ID));
    assert_eq!(
        oauth["tokenUrl"].as_str(),
        Some("https://api.beamlit.com/v0/oauth/token")
    );
    assert_eq!(config["leaderElection"]["enabled"].as_bool(), Some(true));
    assert_eq!(config["agentNamespace"].as_str(), Some("default"));

    // The reference names a Secret that the chart renders, holding the seed's secret.
    let secret_ref = &oauth["clientSecretRef"];
    assert_eq!(secret_ref["namespace"].as_str(), Some("default"));
    let secret_name = secret_ref["name"].as_str().context("secret name")?;
    let data = r.secret_data(secret_name)?;
    let key = secret_ref["key"].as_str().context("secret key")?;
    assert_eq!(data[key], chart::SEED_CLIENT_SECRET);
    // The API token is what the controller's Beamlit client parses.
    let (id, secret) = beamlit_controller::beamlit_api::parse_api_token(&data["beamlitApiToken"])?;
    assert_eq!(id, chart::SEED_CLIENT_ID);
    assert_eq!(secret.expose(), chart::SEED_CLIENT_SECRET);
    // ... and reaches the controller as a file, alone; named by its configuration once the
    // workspace is known (the seed's flags do not give one; the controller needs it).
    assert!(config.get("beamlitApi").is_none());
    let with_workspace = chart::render(
        "default",
        &ChartValues::seed().set("config.workspace", "ws"),
    )?;
    let config_ws: serde_json::Value =
        serde_saphyr::from_str(&with_workspace.controller_config()?)?;
    assert_eq!(
        config_ws["beamlitApi"]["tokenFile"].as_str(),
        Some("/etc/beamlit/api/beamlitApiToken")
    );
    assert_eq!(
        config_ws["beamlitApi"]["baseUrl"].as_str(),
        Some("https://api.beamlit.com/v0")
    );
    let token_mount = controller
        .mounts()
        .into_iter()
        .find(|m| m.container_path == "/etc/beamlit/api")
        .context("API token mount")?;
    assert!(token_mount.read_only);
    let volume = &deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == token_mount.volume).cloned())
        .context("token volume")?;
    assert_eq!(volume["secret"]["items"].as_array().map(Vec::len), Some(1));

    // No secret outside Secrets.
    for o in r.objects.iter().filter(|o| o["kind"] != "Secret") {
        let text = o.to_string();
        assert!(
            !text.contains(chart::SEED_CLIENT_SECRET),
            "secret in {text}"
        );
        assert!(!text.contains(&chart::seed_api_key()), "token in {text}");
    }

    // installMetricServer=true: metrics-server and its API.
    let api = r.find("APIService", "v1beta1.metrics.k8s.io")?;
    let service = api["spec"]["service"]["name"].as_str().context("service")?;
    r.find("Service", service)?;
    r.component("Deployment", "metrics-server")?;
    let kinds = kinds(&r);
    for kind in [
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "DaemonSet",
        "PriorityClass",
        "APIService",
        "Pod",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {kinds:?}");
    }
    // Without the flag, no metrics-server (the earlier chart ignored the key).
    let plain = chart::render("default", &ChartValues::new())?;
    assert!(plain.of_kind("APIService").is_empty());
    Ok(())
}

/// The boundary's values reach the controller's configuration: the release's own Services are
/// protected, the admin's lists are passed on, http token URLs only with the opt-out, and the
/// same-namespace admission policy is there unless cross-namespace references are allowed.
#[test]
fn the_boundary_values_render_into_the_configuration() -> Result<()> {
    let seed = chart::render("beamlit-system", &ChartValues::seed())?;
    let config: serde_json::Value = serde_saphyr::from_str(&seed.controller_config()?)?;
    let protected: Vec<&str> = config["protectedServices"]
        .as_array()
        .context("protectedServices")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        protected,
        [
            "beamlit-system/beamlit-controller-metrics",
            "beamlit-system/beamlit-controller-metrics-server"
        ]
    );
    for name in [
        "beamlit-controller-metrics",
        "beamlit-controller-metrics-server",
    ] {
        seed.find("Service", name)?;
    }
    assert!(config.get("allowedRemoteHosts").is_none());
    assert!(config.get("allowInsecureTokenUrls").is_none());
    let policy = seed.find(
        "ValidatingAdmissionPolicy",
        "beamlit-controller-same-namespace-references",
    )?;
    assert!(policy.to_string().contains("spec.serviceRef.namespace"));
    seed.find(
        "ValidatingAdmissionPolicyBinding",
        "beamlit-controller-same-namespace-references",
    )?;

    let custom = chart::render(
        "beamlit-system",
        &ChartValues::new()
            .set_list(
                "config.allowedRemoteHosts",
                &["fallback.internal", "*.models.example"],
            )
            .set_list("config.protectedServices", &["openshift-dns/dns-default"])
            .set("config.allowInsecureTokenUrls", "true")
            .set_string(
                "config.defaultRemoteBackend.authConfig.oauthConfig.tokenUrl",
                "http://10.0.0.9/oauth/token",
            )
            .set("config.crossNamespaceReferences", "true"),
    )?;
    let config: serde_json::Value = serde_saphyr::from_str(&custom.controller_config()?)?;
    assert_eq!(
        config["allowedRemoteHosts"],
        serde_saphyr::from_str::<serde_json::Value>("[fallback.internal, '*.models.example']")?
    );
    assert_eq!(config["allowInsecureTokenUrls"].as_bool(), Some(true));
    assert!(config["protectedServices"].as_array().is_some_and(|p| {
        p.iter()
            .any(|v| v.as_str() == Some("openshift-dns/dns-default"))
    }));
    assert!(custom.of_kind("ValidatingAdmissionPolicy").is_empty());
    // The schema refuses what the controller would (a URL in the host list).
    assert!(
        chart::render(
            "beamlit-system",
            &ChartValues::new().set_list("config.allowedRemoteHosts", &["https://x/"]),
        )
        .is_err()
    );
    Ok(())
}

/// The agent DaemonSet: Linux nodes, every taint tolerated, host network, the node's bpffs and
/// cgroup v2 mounted, not privileged, a rolling update that never runs two agents on a node, a
/// priority class.
#[test]
fn the_agent_daemonset_is_shaped_for_every_node() -> Result<()> {
    let r = chart::render("beamlit-system", &ChartValues::seed())?;
    let ds = r.component("DaemonSet", "agent")?;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert!(pod["tolerations"][0].get("key").is_none());
    let class = pod["priorityClassName"]
        .as_str()
        .context("priority class")?;
    assert!(r.find("PriorityClass", class)?["value"].as_i64() >= Some(1_000_000));
    let update = &ds["spec"]["updateStrategy"];
    assert_eq!(update["type"], "RollingUpdate");
    assert_eq!(update["rollingUpdate"]["maxSurge"], 0);
    let agent = r.agent()?;
    let security = &agent.container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(agent.capabilities(), vec!["BPF", "NET_ADMIN", "PERFMON"]);
    let host_paths: BTreeMap<String, String> = agent
        .mounts()
        .into_iter()
        .filter_map(|m| match agent.volume(&m.volume).ok()? {
            chart::Volume::HostPath(p) => Some((m.volume, p.display().to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(host_paths["bpffs"], "/sys/fs/bpf");
    assert_eq!(host_paths["cgroup2"], "/sys/fs/cgroup");
    let mounts = agent.mounts();
    let bpffs = mounts
        .iter()
        .find(|m| m.volume == "bpffs")
        .context("bpffs")?;
    assert_eq!(
        agent.container["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "bpffs"))
            .map(|m| m["mountPropagation"].clone()),
        Some("HostToContainer".into())
    );
    assert!(!bpffs.read_only, "pins are written");
    let cgroup = mounts
        .iter()
        .find(|m| m.volume == "cgroup2")
        .context("cgroup")?;
    assert!(cgroup.read_only);
    // Probes on the agent's /healthz, on the node's loopback (exec), the tunnel's over HTTP;
    // the controller's on /healthz and /readyz.
    let probe = agent.container["livenessProbe"]["exec"]["command"].clone();
    assert_eq!(probe[0], "beamlit-agent", "{probe}");
    assert_eq!(probe[1], "healthz", "{probe}");
    assert!(
        agent
            .args()
            .iter()
            .any(|a| a.starts_with("--metrics-addr=127.0.0.1:")),
        "the privileged container listens beyond the loopback: {:?}",
        agent.args()
    );
    // What parses pods' bytes: its own container, non-root, no capability, no API token.
    let tunnel = r.agent_tunnel()?;
    assert_eq!(tunnel.args()[0], "tunnel");
    let security = &tunnel.container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 65532);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert!(security["capabilities"].get("add").is_none(), "{security}");
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        tunnel.container["livenessProbe"]["httpGet"]["path"],
        "/healthz"
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    let token_in = |w: &chart::Workload| w.mounts().iter().any(|m| m.volume == "api-token");
    assert!(token_in(&agent) && !token_in(&tunnel));
    let control = |w: &chart::Workload| {
        w.mounts()
            .into_iter()
            .find(|m| m.volume == "tunnel-control")
            .map(|m| m.container_path)
    };
    assert_eq!(control(&agent), control(&tunnel));
    assert!(control(&agent).is_some());
    let controller = r.controller()?;
    assert_eq!(
        controller.container["livenessProbe"]["httpGet"]["path"],
        "/healthz"
    );
    assert_eq!(
        controller.container["readinessProbe"]["httpGet"]["path"],
        "/readyz"
    );
    assert_eq!(
        controller.container["securityContext"]["readOnlyRootFilesystem"],
        true
    );
    assert_eq!(
        r.component("Deployment", "controller")?["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
        65532
    );
    Ok(())
}

#[test]
fn the_charts_crds_are_the_repositorys() -> Result<()> {
    let root = workspace_root();
    let names = |dir: &Path| -> Result<BTreeSet<String>> {
        Ok(std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    };
    let repo = root.join("crds");
    let chart = chart::chart_dir().join("crds");
    assert_eq!(names(&repo)?, names(&chart)?);
    for name in names(&repo)? {
        assert!(
            std::fs::read(repo.join(&name))? == std::fs::read(chart.join(&name))?,
            "charts/beamlit-controller/crds/{name} differs from crds/{name}: run `cargo xtask crds`"
        );
    }
    Ok(())
}

/// Every value in values.yaml has a comment right above it: every key the schema structures
/// (free-form values such as `resources` are documented as a whole). helm lint checks the values
/// against values.schema.json, which refuses keys it does not know.
#[test]
fn every_value_is_documented() -> Result<()> {
    let text = std::fs::read_to_string(chart::chart_dir().join("values.yaml"))?;
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        chart::chart_dir().join("values.schema.json"),
    )?)?;
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut previous = "";
    let mut undocumented = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let key = trimmed.split_once(':').map(|(k, _)| k).filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
        });
        if let (Some(key), false) = (key, trimmed.starts_with('#') || trimmed.starts_with('-')) {
            while stack.last().is_some_and(|(i, _)| *i >= indent) {
                stack.pop();
            }
            // The schema of the parent: structured (with `properties`) or free-form.
            let mut node = &schema;
            for (_, k) in &stack {
                node = &node["properties"][k];
            }
            if node.get("properties").is_some() && !previous.trim_start().starts_with('#') {
                undocumented.push(line.to_string());
            }
            stack.push((indent, key.to_string()));
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    assert!(
        undocumented.is_empty(),
        "values without a comment right above them: {undocumented:#?}"
    );
    Ok(())
}

/// All rendered objects, for every variant, pass the real apiserver's validation (server-side
/// dry run; the CRD installed first, as helm does with crds/).
#[test]
fn the_apiserver_accepts_every_rendered_object() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::shared()?;
    install_model_deployment_crd(cluster)?;
    let ns = cluster.namespace("chart")?;
    for (name, values) in variants() {
        let values = values.set_list("allowedNamespaces", &[ns.name()]);
        // Objects in other namespaces (allowedNamespaces) must exist for the dry run; the test
        // namespace stands in for them.
        let r = chart::render(ns.name(), &values).with_context(|| name.to_string())?;
        let out = cluster
            .kubectl_with_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&r.text))
            .with_context(|| format!("{name}: server-side dry run"))?;
        let applied = out
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        assert_eq!(applied, r.objects.len(), "{name}: {out}");
    }
    // And the variants as written (cluster-wide roles, several namespaces), where the
    // namespaces they name exist.
    for (name, values) in variants() {
        let r = chart::render(ns.name(), &values)?;
        let wanted: Vec<&serde_json::Value> = r
            .objects
            .iter()
            .filter(|o| {
                o["metadata"]["namespace"]
                    .as_str()
                    .is_none_or(|n| n == ns.name() || n == "kube-system")
            })
            .collect();
        let text = wanted
            .iter()
            .map(serde_saphyr::to_string)
            .collect::<Result<Vec<_>, _>>()?
            .join("---\n");
        let out = cluster
            .kubectl_with_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&text))
            .with_context(|| format!("{name}: server-side dry run"))?;
        assert_eq!(
            out.lines()
                .filter(|l| l.contains("(server dry run)"))
                .count(),
            wanted.len(),
            "{name}: {out}"
        );
    }
    Ok(())
}

/// The controller's file and flags, and the agent's flags and environment, from the rendered
/// Deployment, DaemonSet and helm test pod, are accepted by the real binaries' check modes,
/// for every variant; a key the controller does not know is refused with its name, so a
/// chart/binary mismatch fails here.
#[test]
fn the_binaries_accept_the_rendered_configuration() -> Result<()> {
    let dir = TestDir::new("chart-check")?;
    for (i, (name, values)) in variants().into_iter().enumerate() {
        let r = chart::render("beamlit-system", &values).with_context(|| name.to_string())?;
        let host = HostEnv::new(&dir.join(format!("v{i}")))
            .pod("pod-1", "beamlit-system", "node-1", "10.0.0.5")
            // An existingSecret is not rendered: an empty directory stands in for it.
            .volume("beamlit-api", &dir.join("api-token"));
        let controller = r.controller()?.command_line(&r, &host)?;
        let out = controller
            .command(&controller_bin())
            .arg("--check-config")
            .output()?;
        assert!(out.status.success(), "{name}: controller: {out:?}");
        // The helm test pod's commands, as `helm test` runs them.
        let test = r.helm_test("controller")?.command_line(&r, &host)?;
        let out = test.command(&controller_bin()).output()?;
        assert!(
            out.status.success(),
            "{name}: helm test controller: {out:?}"
        );
        if r.of_kind("DaemonSet").is_empty() {
            continue;
        }
        let host = host
            .clone()
            .volume("bpffs", &dir.join("bpffs"))
            .volume("cgroup2", &dir.join("cgroup"));
        let agent = r.agent()?.command_line(&r, &host)?;
        assert_eq!(
            agent.flag("--tunnel-ipv4"),
            Some("10.0.0.5:15001"),
            "{name}"
        );
        let out = agent.command(&agent_bin()).arg("--check-config").output()?;
        assert!(out.status.success(), "{name}: agent: {out:?}");
        // The tunnel container's command line starts and listens where the agent's points.
        let mut tunnel = r.agent_tunnel()?.command_line(&r, &host)?;
        tunnel.replace_flag("--metrics-addr", "127.0.0.1:0")?;
        let socket = tunnel
            .flag("--control-socket")
            .map(std::path::PathBuf::from)
            .context("--control-socket")?;
        assert_eq!(
            agent.flag("--tunnel-socket").map(std::path::PathBuf::from),
            Some(socket.clone()),
            "{name}"
        );
        let _ = std::fs::remove_file(&socket);
        let mut cmd = tunnel.command(&agent_bin());
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = beamlit_testbed::spawn(cmd, None)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline && child.try_wait()?.is_none(),
                "{name}: the tunnel container's command did not listen on {}",
                socket.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child.kill()?;
        let test = r.helm_test("agent")?.command_line(&r, &host)?;
        assert!(test.args.contains(&"--check-config".to_string()));
        let out = test.command(&agent_bin()).output()?;
        assert!(out.status.success(), "{name}: helm test agent: {out:?}");
    }

    // A mismatch fails: the controller names a key it does not know.
    let r = chart::render("beamlit-system", &ChartValues::seed())?;
    let config = dir.join("bad.yaml");
    std::fs::write(
        &config,
        format!("{}\nleaseDuration: 15\n", r.controller_config()?),
    )?;
    let out = Command::new(controller_bin())
        .arg(format!("--config={}", config.display()))
        .arg("--check-config")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("leaseDuration"),
        "{stderr}"
    );
    // ... and the agent refuses an address that is not IPv4 where the chart puts the node's.
    let host = HostEnv::new(&dir.join("bad"))
        .pod("p", "beamlit-system", "node-1", "fd00::5")
        .volume("bpffs", &dir.join("bpffs"))
        .volume("cgroup2", &dir.join("cgroup"));
    let agent = r.agent()?.command_line(&r, &host)?;
    let out = agent.command(&agent_bin()).arg("--check-config").output()?;
    assert!(!out.status.success(), "{out:?}");
    Ok(())
}

/// Capabilities by name, as in Kubernetes, to their numbers (linux/capability.h).
fn cap_number(name: &str) -> Option<u32> {
    Some(match name {
        "CHOWN" => 0,
        "DAC_OVERRIDE" => 1,
        "NET_BIND_SERVICE" => 10,
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        _ => return None,
    })
}

/// Removes a test bpffs directory (after `beamlit-agent cleanup` detached what it pinned).
struct Pins(PathBuf);

impl Pins {
    fn cleanup(&self) {
        let _ = Command::new(agent_bin())
            .arg("--bpffs")
            .arg(self.0.join("beamlit"))
            .arg("cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(self.0.join("beamlit"));
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        self.cleanup();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent starts with exactly the capabilities the chart grants (all others dropped from
/// the bounding set, as a container runtime does for `drop: [ALL]` + `add`), and not with any
/// one of them missing. Standalone mode (`--routes`), in a network namespace of its own,
/// attached to a test cgroup, pins in a test directory; otherwise the chart's own arguments.
#[test]
fn the_agent_needs_exactly_the_charts_capabilities() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let r = chart::render("beamlit-system", &ChartValues::seed())?;
    let caps = r.agent()?.capabilities();
    assert!(!caps.is_empty());
    let netns = Netns::new("caps")?;
    netns.ip(&["addr", "add", "10.250.0.1/32", "dev", "lo"])?;
    let cgroup = TestCgroup::new("caps")?;
    let dir = TestDir::new("caps")?;
    let pins =
        Pins(PathBuf::from("/sys/fs/bpf").join(dir.path().file_name().context("test dir name")?));
    std::fs::create_dir_all(&pins.0)?;
    let secret = dir.join("client-secret");
    std::fs::write(&secret, "s3cret")?;
    let routes = dir.join("routes.yaml");
    // One service the agent's own tunnel serves (so the tunnel starts too), one external; share
    // 0, and nothing connects: nothing leaves the namespace.
    std::fs::write(
        &routes,
        format!(
            "tunnel: {{ipv4: \"10.250.0.1:15001\"}}\nservices:\n  - address: 10.96.250.10:80\n    offloadPercent: 0\n  \
             - address: 10.96.250.11:80\n    offloadPercent: 0\n    remote:\n      host: \"10.250.0.2:8443\"\n      \
             pathPrefix: /ws/models/m\n      auth:\n        oauth:\n          tokenUrl: https://10.250.0.2:8443/oauth/token\n          \
             clientId: id\n          clientSecretFile: {}\n",
            secret.display()
        ),
    )?;
    let host = HostEnv::new(dir.path())
        .pod("agent-caps", "beamlit-system", "node-1", "10.250.0.1")
        .volume("bpffs", &pins.0)
        .volume("cgroup2", cgroup.path());
    let mut command = r.agent()?.command_line(&r, &host)?;
    // No kubelet pods cgroup here: the test cgroup, named outright.
    command
        .args
        .push(format!("--cgroup={}", cgroup.path().display()));
    command.args.push("--routes".into());
    command.args.push(routes.display().to_string());

    // Runs the agent with `granted` as its only capabilities; Ok(CapEff) once it applied the
    // routes, Err(log) if it exited first.
    let run = |granted: &[String]| -> Result<std::result::Result<u64, String>> {
        pins.cleanup();
        let bounding: String = granted
            .iter()
            .map(|c| format!(",+{}", c.to_ascii_lowercase()))
            .collect();
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", netns.name()))
            .args([
                "setpriv",
                "--no-new-privs",
                "--inh-caps=-all",
                "--ambient-caps=-all",
            ])
            .arg(format!("--bounding-set=-all{bounding}"))
            .arg("--")
            .arg(agent_bin())
            .args(&command.args)
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = spawn(cmd, None)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("routes applied") {
                let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid()))?;
                let eff = status
                    .lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                    .context("CapEff")?;
                child.signal(libc::SIGTERM)?;
                child.wait_timeout(Duration::from_secs(10))?;
                return Ok(Ok(eff));
            }
            if child.try_wait()?.is_some() {
                return Ok(Err(text));
            }
            if Instant::now() > deadline {
                bail!("the agent neither started nor exited:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let expected: u64 = caps
        .iter()
        .map(|c| cap_number(c).map(|n| 1u64 << n).context(c.clone()))
        .sum::<Result<u64>>()?;
    match run(&caps)? {
        Ok(eff) => assert_eq!(
            eff, expected,
            "CapEff {eff:#x}, the chart's set {expected:#x}"
        ),
        Err(log) => panic!("the agent does not start with {caps:?}:\n{log}"),
    }
    println!("starts with {caps:?} (CapEff {expected:#x})");
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        match run(&fewer)? {
            Ok(_) => panic!("the agent starts without {missing}: the chart grants too much"),
            Err(log) => {
                // The error and its first cause.
                let lines: Vec<&str> = log.lines().collect();
                let why = lines
                    .iter()
                    .skip_while(|l| !l.starts_with("Error"))
                    .filter(|l| !l.trim().is_empty() && !l.starts_with("Caused by"))
                    .take(2)
                    .map(|l| l.trim())
                    .collect::<Vec<_>>()
                    .join(" / ");
                println!("without {missing}: {why}");
                // A refused start leaves nothing half attached: no link pinned, no program on
                // the cgroup (the kernel's own view, through bpftool).
                let links: Vec<_> = std::fs::read_dir(pins.0.join("beamlit/links"))
                    .map(|d| d.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default();
                assert!(
                    links.is_empty(),
                    "without {missing}: links left pinned {links:?}\n{log}"
                );
                let attached = Command::new("bpftool")
                    .args(["cgroup", "show"])
                    .arg(cgroup.path())
                    .output()?;
                assert!(attached.status.success(), "bpftool: {attached:?}");
                let attached = String::from_utf8_lossy(&attached.stdout);
                assert!(
                    attached.lines().filter(|l| !l.trim().is_empty()).count() <= 1,
                    "without {missing}: programs left attached:\n{attached}"
                );
                assert!(
                    log.matches("Verifier output").count() <= 1,
                    "the verifier's log appears more than once:\n{log}"
                );
            }
        }
    }
    Ok(())
}

/// A kubeconfig that acts as `user` (impersonation by the cluster admin), so that a binary runs
/// with exactly that ServiceAccount's permissions.
fn impersonating(cluster: &TestCluster, user: &str, path: &Path) -> Result<()> {
    let mut config: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(cluster.kubeconfig())?)?;
    let users = config["users"].as_array_mut().context("kubeconfig users")?;
    for u in users {
        u["user"]["as"] = user.into();
    }
    std::fs::write(path, serde_saphyr::to_string(&config)?)?;
    Ok(())
}

fn can_i(cluster: &TestCluster, sa: &str, args: &[&str]) -> Result<bool> {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    let as_sa = format!("--as={sa}");
    all.push(&as_sa);
    let out = Command::new(cluster.binaries().kubectl())
        .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
        .args(&all)
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match answer.as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => bail!(
            "kubectl {all:?}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Whether `user` may `verb` `group`/`resource` in `namespace`, from a SubjectAccessReview.
fn subject_access_review(
    cluster: &TestCluster,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
) -> Result<bool> {
    let review = serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "resourceAttributes": {
                "verb": verb, "group": group, "resource": resource, "namespace": namespace,
            },
        },
    });
    let out = cluster.kubectl_with_stdin(
        &["create", "-f", "-", "-o", "json"],
        Some(&review.to_string()),
    )?;
    let answer: serde_json::Value = serde_json::from_str(&out)?;
    Ok(answer["status"]["allowed"] == true)
}

/// `helm install` with the seed README's command as written (release `beamlit-controller`,
/// the current namespace, its six flags) into a private cluster; the ServiceAccounts get
/// what the binaries use and no more (`kubectl auth can-i`); then the real controller and a
/// real agent run as those ServiceAccounts from the rendered configuration, without a single
/// forbidden request: the controller leads, decides and records Events; the agent lists,
/// reads the credentials Secret, applies and acknowledges on its Lease.
#[test]
fn the_seed_install_works_and_its_service_accounts_suffice() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cluster = TestCluster::start_with_nodes(1)?;
    let out = cluster
        .helm()
        .args(["install", RELEASE])
        .arg(chart::chart_dir())
        .args(ChartValues::seed().args())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helm install: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("STATUS: deployed"), "{stdout}");
    assert!(
        stdout.contains("config.workspace is empty"),
        "NOTES warn: {stdout}"
    );
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/modeldeployments.deployment.beamlit.com",
    ])?;
    let controller_sa = "system:serviceaccount:default:beamlit-controller";
    let agent_sa = "system:serviceaccount:default:beamlit-controller-agent";
    cluster.kubectl(&["create", "namespace", "models"])?;
    let md = "modeldeployments.deployment.beamlit.com";
    let expectations: &[(&str, &[&str], bool)] = &[
        (controller_sa, &["list", md, "-A"], true),
        (controller_sa, &["watch", md, "-A"], true),
        (controller_sa, &["patch", md, "-n", "models"], true),
        (
            controller_sa,
            &["patch", md, "--subresource=status", "-n", "models"],
            true,
        ),
        (
            controller_sa,
            &["update", md, "--subresource=status", "-n", "models"],
            false,
        ),
        (controller_sa, &["delete", md, "-n", "models"], false),
        (controller_sa, &["list", "services", "-A"], true),
        (
            controller_sa,
            &["watch", "endpointslices.discovery.k8s.io", "-A"],
            true,
        ),
        (controller_sa, &["list", "deployments.apps", "-A"], true),
        (controller_sa, &["list", "statefulsets.apps", "-A"], true),
        (controller_sa, &["list", "replicasets.apps", "-A"], true),
        (controller_sa, &["watch", "daemonsets.apps", "-A"], true),
        (controller_sa, &["list", "pods", "-n", "models"], true),
        (controller_sa, &["get", "pods", "-n", "models"], false),
        (
            controller_sa,
            &["create", "events.events.k8s.io", "-n", "models"],
            true,
        ),
        (
            controller_sa,
            &["patch", "events.events.k8s.io", "-n", "models"],
            true,
        ),
        (
            controller_sa,
            &["update", "leases.coordination.k8s.io", "-n", "default"],
            true,
        ),
        (
            controller_sa,
            &["create", "leases.coordination.k8s.io", "-n", "default"],
            true,
        ),
        (
            controller_sa,
            &["watch", "leases.coordination.k8s.io", "-n", "default"],
            true,
        ),
        (
            controller_sa,
            &["create", "leases.coordination.k8s.io", "-n", "models"],
            false,
        ),
        (controller_sa, &["get", "secrets", "-n", "default"], false),
        (controller_sa, &["create", "pods", "-n", "models"], false),
        (
            controller_sa,
            &["update", "deployments.apps", "-n", "models"],
            false,
        ),
        (agent_sa, &["list", md, "-A"], true),
        (agent_sa, &["watch", md, "-A"], true),
        (agent_sa, &["patch", md, "-n", "models"], false),
        (
            agent_sa,
            &["watch", "endpointslices.discovery.k8s.io", "-A"],
            true,
        ),
        (
            agent_sa,
            &["create", "leases.coordination.k8s.io", "-n", "default"],
            true,
        ),
        (
            agent_sa,
            &["patch", "leases.coordination.k8s.io", "-n", "default"],
            true,
        ),
        (
            agent_sa,
            &["delete", "leases.coordination.k8s.io", "-n", "default"],
            false,
        ),
        (
            agent_sa,
            &[
                "get",
                "secrets/beamlit-controller-credentials",
                "-n",
                "default",
            ],
            true,
        ),
        (agent_sa, &["get", "secrets/other", "-n", "default"], false),
        (agent_sa, &["list", "secrets", "-n", "default"], false),
        (agent_sa, &["get", "secrets/any", "-n", "models"], false),
        (agent_sa, &["list", "services", "-A"], false),
        // The release's pods (the controller's are exempt from redirection), nothing else.
        (agent_sa, &["watch", "pods", "-n", "default"], true),
        (agent_sa, &["list", "pods", "-n", "models"], false),
        (agent_sa, &["get", "pods", "-n", "default"], false),
    ];
    let mut wrong = Vec::new();
    for (sa, args, expected) in expectations {
        if can_i(&cluster, sa, args)? != *expected {
            wrong.push(format!("{sa} {args:?}: expected {expected}"));
        }
    }
    assert!(wrong.is_empty(), "RBAC differs:\n{}", wrong.join("\n"));
    // metrics.k8s.io is not served here (metrics-server has no kubelet to scrape), so kubectl
    // cannot map the resource: ask the authorizer directly.
    assert!(subject_access_review(
        &cluster,
        controller_sa,
        "list",
        "metrics.k8s.io",
        "pods",
        "models"
    )?);
    assert!(!subject_access_review(
        &cluster,
        agent_sa,
        "list",
        "metrics.k8s.io",
        "pods",
        "models"
    )?);

    // metrics-server cannot serve here (no kubelet to scrape): its APIService answers 503, and
    // the controller gives each metrics call 3 s before reporting the metric unavailable.
    // Without the APIService the metric is unavailable at once, which keeps this test quick.
    cluster.kubectl(&["delete", "apiservice", "v1beta1.metrics.k8s.io"])?;

    // The binaries, as those ServiceAccounts, from the installed release's configuration.
    let dir = TestDir::new("seed-install")?;
    // With a workspace, so that the agent gets a remote backend and reads the Secret; without
    // the API token, so that nothing calls the real Beamlit API from here (the finalizer's
    // `patch` is checked with can-i above).
    let r = chart::render(
        "default",
        &ChartValues::seed()
            .set("config.workspace", "ws")
            .set("beamlitApiToken", ""),
    )?;
    assert!(!r.controller_config()?.contains("beamlitApi"));
    cluster.apply(
        "models",
        &std::fs::read_to_string(workspace_root().join("tests/fixtures/php-apache.yaml"))?,
    )?;
    cluster.wait_deployment_ready("models", "php-apache", 1, WAIT)?;
    cluster.apply("models", &seed_model_deployment("models"))?;
    let controller_kubeconfig = dir.join("controller.kubeconfig");
    impersonating(&cluster, controller_sa, &controller_kubeconfig)?;
    let host =
        HostEnv::new(&dir.join("controller")).pod("controller-0", "default", "node", "10.0.0.1");
    let command = r.controller()?.command_line(&r, &host)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log_path = dir.join("controller.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = command.command(&controller_bin());
    cmd.arg(format!("--http-addr=127.0.0.1:{port}"))
        .env("KUBECONFIG", &controller_kubeconfig)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let _controller = spawn(cmd, None)?;
    let controller_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    cluster
        .wait_for("the controller decides as its ServiceAccount", WAIT, || {
            let out = cluster.kubectl(&["get", md, "php-apache", "-n", "models", "-o", "json"])?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            Ok(
                v["status"]["remoteBackend"]["oauth"]["clientSecretRef"]["name"]
                    == "beamlit-controller-credentials",
            )
        })
        .with_context(|| {
            let status = cluster
                .kubectl(&["get", md, "php-apache", "-n", "models", "-o", "yaml"])
                .unwrap_or_default();
            format!("{}\n{status}", controller_log())
        })?;
    assert!(
        controller_log().contains("became the leader"),
        "{}",
        controller_log()
    );
    let lease = cluster.kubectl(&[
        "get",
        "lease",
        "beamlit-controller",
        "-n",
        "default",
        "-o",
        "json",
    ])?;
    assert!(lease.contains("controller-0"), "{lease}");
    cluster
        .wait_for("an Event about the model", WAIT, || {
            Ok(cluster
                .kubectl(&["get", "events.events.k8s.io", "-n", "models", "-o", "name"])?
                .lines()
                .count()
                > 0)
        })
        .with_context(controller_log)?;

    let agent_kubeconfig = dir.join("agent.kubeconfig");
    impersonating(&cluster, agent_sa, &agent_kubeconfig)?;
    let node = TestCgroup::new("seed-install")?;
    let netns = format!("/var/run/netns/{}", cluster.node_netns());
    let host_ip = Topology::NODE_V4.to_string();
    let mut agent = AgentFixture::start_rendered(
        &r,
        &agent_kubeconfig,
        node.path(),
        "default",
        "beamlit-node-1",
        &host_ip,
        &["--tunnel-netns", &netns],
    )?;
    cluster
        .wait_for("the agent acknowledges on its Lease", WAIT, || {
            let out = cluster.kubectl(&[
                "get",
                "lease",
                "beamlit-agent-beamlit-node-1",
                "-n",
                "default",
                "-o",
                "json",
            ]);
            Ok(out.is_ok_and(|l| l.contains("models/php-apache")))
        })
        .with_context(|| agent.log())?;
    agent.wait_log("in sync with the cluster", Duration::from_secs(5))?;
    let state = std::fs::read_to_string(agent.state_dir().join("services.json"))?;
    let state: serde_json::Value = serde_json::from_str(&state)?;
    assert_eq!(state["problems"], serde_json::json!([]), "{state}");
    for (who, text) in [("controller", controller_log()), ("agent", agent.log())] {
        assert!(
            !text.to_lowercase().contains("forbidden"),
            "the {who} was refused something:\n{text}"
        );
    }

    // One namespace and model Secrets: namespaced roles where the binaries allow them.
    let out = cluster
        .helm()
        .args(["upgrade", RELEASE])
        .arg(chart::chart_dir())
        .args([
            "--reuse-values",
            "--set",
            "allowedNamespaces={models}",
            "--set",
            "agent.readSecretsInModelNamespaces=true",
        ])
        .output()?;
    assert!(out.status.success(), "helm upgrade: {out:?}");
    for (sa, args, expected) in [
        (controller_sa, &["list", md, "-n", "models"][..], true),
        (controller_sa, &["list", md, "-A"][..], false),
        (
            controller_sa,
            &["list", "services", "-n", "models"][..],
            true,
        ),
        (
            controller_sa,
            &["list", "services", "-n", "default"][..],
            false,
        ),
        (agent_sa, &["watch", md, "-n", "models"][..], true),
        (agent_sa, &["watch", md, "-A"][..], false),
        (agent_sa, &["get", "secrets/any", "-n", "models"][..], true),
        (
            agent_sa,
            &["get", "secrets/any", "-n", "kube-system"][..],
            false,
        ),
        (
            agent_sa,
            &["watch", "endpointslices.discovery.k8s.io", "-A"][..],
            true,
        ),
    ] {
        assert_eq!(can_i(&cluster, sa, args)?, expected, "{sa} {args:?}");
    }
    drop(agent);
    let out = cluster.helm().args(["uninstall", RELEASE]).output()?;
    assert!(out.status.success(), "helm uninstall: {out:?}");
    Ok(())
}

/// `program` run inside `rootfs` (chroot) as the nonroot user (65532), with an empty
/// environment: what a runtime does with the image and the helm test pod's securityContext.
fn in_image(rootfs: &Path, program: &str) -> Command {
    use std::os::unix::process::CommandExt as _;
    let root = std::ffi::CString::new(rootfs.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let mut cmd = Command::new(program);
    cmd.env_clear();
    // SAFETY: only async-signal-safe calls between fork and exec; the program path is resolved
    // by execve after the chroot.
    unsafe {
        cmd.pre_exec(move || {
            let fail = |ok: bool| {
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            fail(libc::chroot(root.as_ptr()) == 0)?;
            fail(libc::chdir(c"/".as_ptr()) == 0)?;
            fail(libc::setgroups(0, std::ptr::null()) == 0)?;
            fail(libc::setgid(65532) == 0)?;
            fail(libc::setuid(65532) == 0)
        });
    }
    cmd
}

/// The image archives (built by the code `cargo xtask images` runs, here from the binaries the
/// tests use): valid OCI layouts whose digests check out, holding the binaries and their
/// libraries, runnable (in a chroot of the unpacked layer, as the non-root user for the
/// controller, with the chart's configuration), with the entrypoint, user and labels of the
/// Dockerfiles.
#[test]
fn the_images_hold_runnable_binaries_and_match_the_dockerfiles() -> Result<()> {
    let root = workspace_root();
    let dir = TestDir::new("images")?;
    let info = oci::BuildInfo::from_git(&root)?;
    let bin_dir = controller_bin()
        .parent()
        .map(Path::to_path_buf)
        .context("binary dir")?;
    let specs = oci::project_images(&bin_dir, &info)?;
    let r = chart::render("beamlit-system", &ChartValues::seed())?;
    for spec in &specs {
        let binary = spec.entrypoint[0]
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let path = dir.join(format!("{binary}.tar"));
        let written = oci::write_archive(spec, &path)?;
        println!(
            "{}: archive {} bytes, layer {} bytes",
            written.reference, written.archive_bytes, written.layer_bytes
        );
        let image = oci::read_archive(&path)?;
        assert_eq!(image.entrypoint(), vec![format!("/usr/local/bin/{binary}")]);
        let labels = image.labels();
        assert_eq!(
            labels["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(
            labels["org.opencontainers.image.source"],
            "https://github.com/beamlit/beamlit-controller"
        );
        assert!(labels["org.opencontainers.image.revision"].starts_with(&info.revision[..40]));
        assert_eq!(
            image.index["manifests"][0]["annotations"]["io.containerd.image.name"],
            written.reference
        );
        assert_eq!(image.docker_manifest[0]["RepoTags"][0], written.reference);
        let data = image
            .file(&image.entrypoint()[0])
            .context("binary in the layer")?;
        assert_eq!(&data[..4], b"\x7fELF");
        for lib in oci::shared_libraries(&bin_dir.join(&binary))? {
            assert!(
                image.file(&lib.display().to_string()).is_some(),
                "{} missing",
                lib.display()
            );
        }
        assert!(image.file(oci::CA_BUNDLE).is_some());

        // The Dockerfile builds the same image.
        let dockerfile_path = root.join(format!(
            "images/{}.Dockerfile",
            binary.trim_start_matches("beamlit-")
        ));
        let dockerfile = oci::Dockerfile::parse(
            &std::fs::read_to_string(&dockerfile_path)
                .with_context(|| format!("reading {}", dockerfile_path.display()))?,
        )?;
        assert_eq!(dockerfile.entrypoint, image.entrypoint(), "{binary}");
        assert_eq!(dockerfile.user, image.user(), "{binary}");
        assert_eq!(
            dockerfile.copies,
            vec![(
                format!("target/release/{binary}"),
                image.entrypoint()[0].clone()
            )]
        );
        assert_eq!(
            dockerfile.env.get("SSL_CERT_FILE").map(String::as_str),
            Some(oci::CA_BUNDLE)
        );
        let mut expected = labels.clone();
        let revision = dockerfile
            .labels
            .get("org.opencontainers.image.revision")
            .cloned();
        assert_eq!(
            revision.as_deref(),
            Some("unknown"),
            "REVISION is a build argument"
        );
        expected.insert("org.opencontainers.image.revision".into(), "unknown".into());
        assert_eq!(dockerfile.labels, expected, "{binary}: labels");

        // Where skopeo is installed, it reads the archive the same way.
        if let Ok(out) = Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci-archive:{}", path.display()))
            .output()
            && out.status.success()
        {
            let config: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            assert_eq!(
                config["config"]["Entrypoint"],
                image.config["config"]["Entrypoint"]
            );
            assert_eq!(config["config"]["Labels"], image.config["config"]["Labels"]);
        }

        if !require_privileges() {
            continue;
        }
        // Runs from the unpacked layer alone, as the image's user, with the chart's config.
        let rootfs = dir.join(format!("{binary}-rootfs"));
        image.unpack(&rootfs)?;
        let chroot = |args: &[&str]| -> Result<std::process::Output> {
            Ok(in_image(&rootfs, &image.entrypoint()[0])
                .args(args)
                .output()?)
        };
        let version = chroot(&["--version"]).context("chroot")?;
        assert!(
            String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")),
            "{version:?}"
        );
        // The helm test pod's command, inside the image.
        let test = r.helm_test(if binary == "beamlit-agent" {
            "agent"
        } else {
            "controller"
        })?;
        let mut host =
            HostEnv::new(&rootfs.join("pod")).pod("t", "beamlit-system", "n", "10.0.0.5");
        host.dir = rootfs.join("pod");
        let command = test.command_line(&r, &host)?;
        let in_image_args: Vec<String> = command
            .args
            .iter()
            .map(|a| a.replace(&rootfs.display().to_string(), ""))
            .collect();
        let mut cmd = in_image(&rootfs, &image.entrypoint()[0]);
        cmd.args(&in_image_args)
            .envs(command.env.iter().map(|(k, v)| (k, v)));
        let out = cmd.output().context("chroot")?;
        assert!(out.status.success(), "{binary} in its image: {out:?}");
    }
    Ok(())
}
