//! The product on real nodes as the seed README installs and uses it, for the real-node test
//! (`tests/tests/real_product.rs`) and `cargo xtask demo`: a real-node cluster with the
//! project's images in its registry, the fake Beamlit on the cluster network behind a Service
//! name, `helm install` from the registry with the README's flags, and the README's
//! `curl-check` client read back through `kubectl logs`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};

use crate::cluster::real_cluster::check_output;
use crate::cluster::{RealCluster, RealNodesOptions, workspace_root};
use crate::oci::{BuildInfo, project_images};
use crate::{FakeBeamlit, FakeBeamlitOptions, TestDir, agent_bin};

/// The fake Beamlit's address on the cluster network (beside the bridge's 10.250.0.1).
pub const FAKE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
pub const FAKE_PORT: u16 = 8443;
/// Its Service: a name the cluster resolves, in a namespace of its own.
pub const REMOTE_NS: &str = "beamlit-remote";
pub const REMOTE_HOST: &str = "beamlit.beamlit-remote.svc.cluster.local";
pub const CLIENT_ID: &str = "seed-client";
pub const CLIENT_SECRET: &str = "seed-s3cret";
pub const RELEASE: &str = "beamlit-controller";
pub const WAIT: Duration = Duration::from_secs(180);
/// The README's client loop, as `sh -c` receives it once the README's shell has removed its
/// escapes.
pub const SEED_CLIENT: &str = "while true; do response=$(curl -D - http://php-apache); echo \"$response\"; echo $response | grep -q 'Cf-Ray' && echo 'Route: beamlit' || echo 'Route: local'; sleep 0.1; done";

pub struct Product {
    pub cluster: RealCluster,
    pub fake: FakeBeamlit,
    pub dir: TestDir,
    /// The project's images, as pushed to the registry.
    pub images: Vec<crate::oci::ImageSpec>,
}

impl Product {
    pub fn start() -> Result<Self> {
        let dir = TestDir::new("product")?;
        // The images as `cargo xtask images` builds them, from the binaries under test.
        let bin_dir = agent_bin()
            .parent()
            .context("the agent binary's directory")?
            .to_path_buf();
        let images = project_images(&bin_dir, &BuildInfo::from_git(&workspace_root())?)?;
        let cluster = RealCluster::start(
            &RealNodesOptions {
                nodes: 2,
                // The chart installs its own (installMetricServer=true, as the README does).
                metrics_server: false,
            },
            &images,
        )?;
        let fake = cluster.with_nodes(|n| -> Result<FakeBeamlit> {
            let bridge = n.network().bridge();
            bridge.ip(&["addr", "add", &format!("{FAKE_ADDR}/24"), "dev", "br0"])?;
            FakeBeamlit::start(
                bridge,
                FakeBeamlitOptions {
                    https: vec![(FAKE_ADDR, FAKE_PORT).into()],
                    server_names: vec![REMOTE_HOST.to_string(), format!("beamlit.{REMOTE_NS}.svc")],
                    client_id: CLIENT_ID.into(),
                    client_secret: CLIENT_SECRET.into(),
                    require_token: true,
                    ..FakeBeamlitOptions::default()
                },
            )
        })??;
        cluster.kubectl(&["create", "namespace", REMOTE_NS])?;
        cluster.apply(REMOTE_NS, &remote_service())?;
        Ok(Self {
            cluster,
            fake,
            dir,
            images,
        })
    }

    /// `helm package` + `helm push` to the cluster's registry, then the README's `helm install`
    /// from there, with its flags; the rest points the remote at the fake. `extra` are more
    /// `--set` values.
    pub fn helm_install(&self, extra: &[&str]) -> Result<String> {
        let c = &self.cluster;
        let chart_dir = workspace_root().join("charts/beamlit-controller");
        let packaged = check_output(
            "helm package",
            &c.helm()
                .arg("package")
                .arg(&chart_dir)
                .arg("-d")
                .arg(self.dir.path())
                .output()?,
        )?;
        let tgz = packaged
            .split_whitespace()
            .last()
            .map(PathBuf::from)
            .context("helm package printed no path")?;
        let registry = c.registry_addr();
        check_output(
            "helm push",
            &c.helm_in_network()
                .arg("push")
                .arg(&tgz)
                .arg(format!("oci://{registry}/beamlit"))
                .arg("--plain-http")
                .output()?,
        )?;
        let api_key = base64(&format!("{CLIENT_ID}:{CLIENT_SECRET}"));
        let ca = self.fake.ca_pem().display().to_string();
        let images_tag = env!("CARGO_PKG_VERSION");
        let out = c
            .helm_in_network()
            .args(["install", RELEASE])
            .arg(format!("oci://{registry}/beamlit/beamlit-controller-chart"))
            .args(["--version", images_tag, "--plain-http"])
            // The README's flags.
            .args(["--set", "installMetricServer=true"])
            .args(["--set", &format!("beamlitApiToken={api_key}")])
            .args([
                "--set",
                "controllerManager.manager.image.repository=ghcr.io/beamlit/beamlit-controller",
            ])
            .args([
                "--set",
                &format!("controllerManager.manager.image.tag={images_tag}"),
            ])
            .args([
                "--set",
                &format!("config.defaultRemoteBackend.authConfig.oauthConfig.clientId={CLIENT_ID}"),
            ])
            .args([
                "--set",
                &format!(
                    "config.defaultRemoteBackend.authConfig.oauthConfig.clientSecret={CLIENT_SECRET}"
                ),
            ])
            // The remote: the fake Beamlit, its API, its CA; a workspace for the default path.
            .args([
                "--set",
                &format!("config.defaultRemoteBackend.host={REMOTE_HOST}"),
            ])
            .args([
                "--set",
                &format!(
                    "config.defaultRemoteBackend.authConfig.oauthConfig.tokenUrl=https://{REMOTE_HOST}/oauth/token"
                ),
            ])
            .args(["--set", &format!("beamlitBaseUrl=https://{REMOTE_HOST}/v0")])
            .args(["--set", "config.workspace=ws"])
            .args(["--set-file", &format!("agent.caBundle={ca}")])
            .args(["--set-file", &format!("beamlitApiCaBundle={ca}")])
            // The nodes' kubelets serve certificates of the test CA.
            .args(["--set", "metricsServer.extraArgs={--kubelet-insecure-tls}"])
            .args(extra.iter().flat_map(|v| ["--set", v]))
            .output()?;
        check_output("helm install", &out)
    }

    /// A failure's context: the release's pods, and the agents' and controllers' logs.
    pub fn report(&self) -> String {
        let c = &self.cluster;
        let mut s = c
            .kubectl(&["get", "pods", "-A", "-o", "wide"])
            .unwrap_or_default();
        for selector in [
            "app.kubernetes.io/component=agent",
            "app.kubernetes.io/component=controller",
        ] {
            s.push_str(
                &c.kubectl(&[
                    "logs",
                    "-n",
                    "default",
                    "-l",
                    selector,
                    "--tail=40",
                    "--prefix",
                ])
                .unwrap_or_default(),
            );
        }
        s.push_str(&c.kubectl(&["get", "events", "-A"]).unwrap_or_default());
        s
    }
}

/// The fake's Service: no selector, one EndpointSlice naming its address on the cluster network.
pub fn remote_service() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: beamlit\nspec:\n  ports:\n  - name: https\n    \
         port: 443\n    targetPort: {FAKE_PORT}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: beamlit-1\n  labels:\n    kubernetes.io/service-name: beamlit\naddressType: IPv4\n\
         ports:\n- name: https\n  port: {FAKE_PORT}\n  protocol: TCP\nendpoints:\n- addresses: [\"{FAKE_ADDR}\"]\n  \
         conditions:\n    ready: true\n"
    )
}

pub fn base64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// One pass of the README's client: what curl printed, and the route line.
#[derive(Debug)]
pub struct Answer {
    /// When the container runtime logged the route line.
    pub at: SystemTime,
    /// curl got a 200.
    pub ok: bool,
    /// The client printed `Route: beamlit` (the remote's `Cf-Ray` header was there).
    pub beamlit: bool,
    /// What curl printed for that request.
    pub text: String,
}

/// Reads the client's log (`kubectl logs --timestamps`) line by line, cut at every `Route:`
/// line: what curl printed before it is that request's answer.
#[derive(Debug, Default)]
pub struct AnswerParser {
    chunk: String,
}

impl AnswerParser {
    /// One log line; the answer it completes, if it is a `Route:` line.
    pub fn line(&mut self, line: &str) -> Option<Answer> {
        let (stamp, text) = line.split_once(' ').unwrap_or(("", line));
        let Some(route) = text.strip_prefix("Route: ") else {
            self.chunk.push_str(text);
            self.chunk.push('\n');
            return None;
        };
        let at = stamp
            .parse::<jiff::Timestamp>()
            .map(SystemTime::from)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let ok = self.chunk.contains("HTTP/1.1 200") || self.chunk.contains("HTTP/2 200");
        Some(Answer {
            at,
            ok,
            beamlit: route.trim() == "beamlit",
            text: std::mem::take(&mut self.chunk),
        })
    }
}

/// Every answer of a whole log.
pub fn answers(log: &str) -> Vec<Answer> {
    let mut parser = AnswerParser::default();
    log.lines().filter_map(|l| parser.line(l)).collect()
}

pub fn client_log(c: &RealCluster, pod: &str) -> Result<String> {
    c.kubectl(&["logs", "-n", "default", pod, "--timestamps"])
}

pub fn failed(answers: &[Answer]) -> Vec<&Answer> {
    answers.iter().filter(|a| !a.ok).collect()
}

/// `kubectl run <name> --image=curlimages/curl -- sh -c <script>` on `node`, detached.
pub fn run_on_node(c: &RealCluster, name: &str, node: &str, script: &str) -> Result<()> {
    let overrides = format!("{{\"apiVersion\":\"v1\",\"spec\":{{\"nodeName\":\"{node}\"}}}}");
    c.kubectl(&[
        "run",
        name,
        "-n",
        "default",
        "--image=curlimages/curl",
        "--restart=Never",
        &format!("--overrides={overrides}"),
        "--",
        "sh",
        "-c",
        script,
    ])?;
    Ok(())
}

/// Whether no pod of `selector` is left in the default namespace.
pub fn pods_gone(c: &RealCluster, selector: &str) -> Result<bool> {
    Ok(
        c.kubectl(&["get", "pods", "-n", "default", "-l", selector, "-o", "name"])?
            .trim()
            .is_empty(),
    )
}

/// The agent's pod on `node`.
pub fn agent_pod(c: &RealCluster, node: &str) -> Result<String> {
    c.kubectl(&[
        "get",
        "pods",
        "-n",
        "default",
        "-l",
        AGENT_SELECTOR,
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])
}

/// The chart's label of the agent pods.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/component=agent";

/// Starts the README's client on `node` and waits until it has answers from the local pod.
pub fn start_client(c: &RealCluster, name: &str, node: &str) -> Result<()> {
    run_on_node(c, name, node, SEED_CLIENT)?;
    c.wait_for(&format!("{name} answered locally"), WAIT, || {
        let log = client_log(c, name).unwrap_or_default();
        Ok(answers(&log).iter().filter(|a| a.ok && !a.beamlit).count() >= 5)
    })
}

pub fn scale(c: &RealCluster, replicas: u32) -> Result<SystemTime> {
    c.kubectl(&[
        "scale",
        "deployment",
        "php-apache",
        &format!("--replicas={replicas}"),
        "-n",
        "default",
    ])?;
    Ok(SystemTime::now())
}

pub fn md_status(c: &RealCluster) -> Result<serde_json::Value> {
    let out = c.kubectl(&[
        "get",
        "modeldeployment",
        "php-apache",
        "-n",
        "default",
        "-o",
        "json",
    ])?;
    let md: serde_json::Value = serde_json::from_str(&out)?;
    Ok(md["status"].clone())
}
