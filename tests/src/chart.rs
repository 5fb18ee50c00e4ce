//! The Helm chart (`charts/beamlit-controller`) as the binaries see it: [`render`] runs the
//! pinned `helm template` and parses what it prints, and [`Workload::command_line`] turns a
//! rendered container into the argument list and environment a process on this machine gets,
//! as a kubelet would (`$(VAR)` expanded from the container's environment, downward-API fields
//! filled in, ConfigMaps written out as files, container paths replaced by host paths).
//!
//! So configuration flows one way: tests and the e2e harness run the controller and the agents
//! from what the chart renders, never from a hand-written copy of it, and a chart/binary
//! mismatch fails where the binaries check their configuration.
//!
//! ```no_run
//! use beamlit_testbed::chart::{self, ChartValues, HostEnv};
//! # fn main() -> anyhow::Result<()> {
//! let rendered = chart::render("beamlit-system", &ChartValues::seed())?;
//! let dir = beamlit_testbed::TestDir::new("chart")?;
//! let controller = rendered.controller()?.command_line(&rendered, &HostEnv::new(dir.path()))?;
//! println!("beamlit-controller {}", controller.args.join(" "));
//! # Ok(())
//! # }
//! ```
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::cluster::{KubeBinaries, workspace_root};

/// The release name of the seed README's `helm install beamlit-controller ...`.
pub const RELEASE: &str = "beamlit-controller";

/// The seed README's placeholders, filled with test values: its command sets these flags and
/// no others.
pub const SEED_CLIENT_ID: &str = "seed-client-id";
pub const SEED_CLIENT_SECRET: &str = "seed-client-s3cret";
/// The seed's controller image flags, verbatim.
pub const SEED_IMAGE_REPOSITORY: &str = "sugate/operator";
pub const SEED_IMAGE_TAG: &str = "latest-mac";

/// The chart in this repository.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/beamlit-controller")
}

/// Flags for `helm template`/`helm install`, in order (later ones win, as in helm).
#[derive(Debug, Clone, Default)]
pub struct ChartValues {
    args: Vec<String>,
}

impl ChartValues {
    pub fn new() -> Self {
        Self::default()
    }

    /// The seed README's install flags, exactly as it writes them, with its `$API_KEY`
    /// (`echo -n $CLIENT_ID:$CLIENT_SECRET | base64`), `$CLIENT_ID` and `$CLIENT_SECRET` filled.
    pub fn seed() -> Self {
        Self::new()
            .set("installMetricServer", "true")
            .set("beamlitApiToken", &seed_api_key())
            .set(
                "controllerManager.manager.image.repository",
                SEED_IMAGE_REPOSITORY,
            )
            .set("controllerManager.manager.image.tag", SEED_IMAGE_TAG)
            .set(
                "config.defaultRemoteBackend.authConfig.oauthConfig.clientId",
                SEED_CLIENT_ID,
            )
            .set(
                "config.defaultRemoteBackend.authConfig.oauthConfig.clientSecret",
                SEED_CLIENT_SECRET,
            )
    }

    /// `--set key=value` (helm parses the value: `true` is a bool, `1` a number).
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.args.push("--set".into());
        self.args.push(format!("{key}={value}"));
        self
    }

    /// `--set-string key=value`.
    pub fn set_string(mut self, key: &str, value: &str) -> Self {
        self.args.push("--set-string".into());
        self.args.push(format!("{key}={value}"));
        self
    }

    /// `--set-file key=path` (the file's contents as a string, e.g. a PEM bundle).
    pub fn set_file(mut self, key: &str, path: &Path) -> Self {
        self.args.push("--set-file".into());
        self.args.push(format!("{key}={}", path.display()));
        self
    }

    /// `--set key={a,b}`: a list of strings.
    pub fn set_list(self, key: &str, items: &[&str]) -> Self {
        let value = format!("{{{}}}", items.join(","));
        self.set(key, &value)
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }
}

/// `$API_KEY` of the seed README for [`SEED_CLIENT_ID`] and [`SEED_CLIENT_SECRET`].
pub fn seed_api_key() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(format!("{SEED_CLIENT_ID}:{SEED_CLIENT_SECRET}"))
}

/// The pinned helm (built on first use, like the test cluster's binaries).
pub fn helm() -> Result<PathBuf> {
    let bins = match KubeBinaries::find()? {
        Some(b) => b,
        None => KubeBinaries::ensure()?,
    };
    Ok(bins.helm())
}

/// `helm template beamlit-controller <chart> --namespace <namespace> <values>`.
pub fn render(namespace: &str, values: &ChartValues) -> Result<Rendered> {
    render_release(RELEASE, namespace, values)
}

pub fn render_release(release: &str, namespace: &str, values: &ChartValues) -> Result<Rendered> {
    let out = Command::new(helm()?)
        .args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", namespace])
        .args(values.args())
        .output()
        .context("running helm template")?;
    if !out.status.success() {
        bail!(
            "helm template {}: {}",
            values.args().join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8(out.stdout).context("helm template printed non-UTF-8")?;
    Rendered::parse(text)
}

/// What `helm template` printed: the manifests as text and as parsed objects.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: String,
    pub objects: Vec<Value>,
}

impl Rendered {
    pub fn parse(text: String) -> Result<Self> {
        let mut objects: Vec<Value> =
            serde_saphyr::from_multiple(&text).context("helm template printed invalid YAML")?;
        // A template that renders nothing leaves an empty document between two `---`.
        objects.retain(|o| !o.is_null());
        Ok(Self { text, objects })
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    pub fn find(&self, kind: &str, name: &str) -> Result<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("the chart rendered no {kind} {name}"))
    }

    /// The one object of `kind` whose `app.kubernetes.io/component` label is `component`.
    pub fn component(&self, kind: &str, component: &str) -> Result<&Value> {
        let mut found = self.objects.iter().filter(|o| {
            o["kind"] == kind && o["metadata"]["labels"]["app.kubernetes.io/component"] == component
        });
        let first = found
            .next()
            .ok_or_else(|| anyhow!("the chart rendered no {kind} for the {component}"))?;
        if found.next().is_some() {
            bail!("the chart rendered several {kind}s for the {component}");
        }
        Ok(first)
    }

    /// The controller Deployment's `manager` container.
    pub fn controller(&self) -> Result<Workload> {
        let deployment = self.component("Deployment", "controller")?;
        Workload::new(&deployment["spec"]["template"]["spec"], "manager")
    }

    /// The agent DaemonSet's `agent` container.
    pub fn agent(&self) -> Result<Workload> {
        let daemonset = self.component("DaemonSet", "agent")?;
        Workload::new(&daemonset["spec"]["template"]["spec"], "agent")
    }

    /// The agent pod's `tunnel` container (`beamlit-agent tunnel`).
    pub fn agent_tunnel(&self) -> Result<Workload> {
        let daemonset = self.component("DaemonSet", "agent")?;
        Workload::new(&daemonset["spec"]["template"]["spec"], "tunnel")
    }

    /// A container of the `helm test` pod (`controller` or `agent`).
    pub fn helm_test(&self, container: &str) -> Result<Workload> {
        let pod = self
            .of_kind("Pod")
            .into_iter()
            .find(|p| p["metadata"]["annotations"]["helm.sh/hook"] == "test")
            .ok_or_else(|| anyhow!("the chart rendered no helm test pod"))?;
        Workload::new(&pod["spec"], container)
    }

    /// The controller's configuration file, as the ConfigMap the Deployment mounts holds it.
    pub fn controller_config(&self) -> Result<String> {
        let controller = self.controller()?;
        let mount = controller
            .mounts()
            .into_iter()
            .find(|m| {
                controller
                    .args()
                    .iter()
                    .any(|a| a.contains(&format!("{}/", m.container_path)))
            })
            .ok_or_else(|| anyhow!("no controller argument names a mounted file"))?;
        let Volume::ConfigMap { name, .. } = controller.volume(&mount.volume)? else {
            bail!("the controller's configuration is not a ConfigMap volume");
        };
        let data = &self.find("ConfigMap", &name)?["data"];
        data["controller.yaml"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("ConfigMap {name} has no controller.yaml"))
    }

    /// `data` of a Secret, decoded.
    pub fn secret_data(&self, name: &str) -> Result<BTreeMap<String, String>> {
        use base64::Engine as _;
        let secret = self.find("Secret", name)?;
        let mut out = BTreeMap::new();
        if let Some(data) = secret["data"].as_object() {
            for (key, value) in data {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(value.as_str().unwrap_or_default())
                    .with_context(|| format!("Secret {name} key {key} is not base64"))?;
                out.insert(key.clone(), String::from_utf8(raw)?);
            }
        }
        Ok(out)
    }
}

/// Where a container's volume comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    HostPath(PathBuf),
    ConfigMap {
        name: String,
        /// `items` (key, path), when the volume projects only some keys.
        items: Vec<(String, String)>,
    },
    Secret {
        name: String,
        items: Vec<(String, String)>,
        optional: bool,
    },
    EmptyDir,
    /// A projected volume (the agent's API token).
    Projected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub container_path: String,
    pub read_only: bool,
}

/// A value of the container's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSource {
    Literal(String),
    /// `valueFrom.fieldRef.fieldPath` (the downward API).
    Field(String),
}

/// One container of a rendered pod template.
#[derive(Debug, Clone)]
pub struct Workload {
    pub pod_spec: Value,
    pub container: Value,
}

/// What a process on this machine stands in for: the downward API's fields and where each
/// volume is (hostPath and Secret volumes must be given; ConfigMap volumes are written from the
/// rendered ConfigMaps, emptyDirs are made, both under `dir`).
#[derive(Debug, Clone)]
pub struct HostEnv {
    pub dir: PathBuf,
    pub fields: BTreeMap<String, String>,
    pub volumes: BTreeMap<String, PathBuf>,
}

impl HostEnv {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            fields: BTreeMap::new(),
            volumes: BTreeMap::new(),
        }
    }

    /// The fields a pod of `namespace` on `node` (address `host_ip`) sees, named `name`; its
    /// UID is derived from those, as stable as a pod's for one run.
    pub fn pod(mut self, name: &str, namespace: &str, node: &str, host_ip: &str) -> Self {
        let digest = crate::oci::sha256(format!("{namespace}/{name}@{node}").as_bytes());
        let digest = digest.trim_start_matches("sha256:");
        let uid = format!(
            "{}-{}-{}-{}-{}",
            &digest[0..8],
            &digest[8..12],
            &digest[12..16],
            &digest[16..20],
            &digest[20..32]
        );
        for (path, value) in [
            ("metadata.name", name),
            ("metadata.namespace", namespace),
            ("metadata.uid", uid.as_str()),
            ("spec.nodeName", node),
            ("status.hostIP", host_ip),
        ] {
            self.fields.insert(path.into(), value.into());
        }
        self
    }

    /// The host directory standing in for volume `name`.
    pub fn volume(mut self, name: &str, host_path: &Path) -> Self {
        self.volumes.insert(name.into(), host_path.to_path_buf());
        self
    }
}

/// A container turned into a command line on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl CommandLine {
    /// The value of `--flag=value` or `--flag value`, if present.
    pub fn flag(&self, flag: &str) -> Option<&str> {
        flag_value(&self.args, flag)
    }

    /// Replaces the value of `--flag` (written `--flag=value` or `--flag value`); for what a test
    /// must change on a shared machine, like a bind address. Fails if the chart has no such flag,
    /// so an override can never silently stop applying.
    pub fn replace_flag(&mut self, flag: &str, value: &str) -> Result<()> {
        let prefix = format!("{flag}=");
        for i in 0..self.args.len() {
            if self.args[i].starts_with(&prefix) {
                self.args[i] = format!("{flag}={value}");
                return Ok(());
            }
            if self.args[i] == flag && i + 1 < self.args.len() {
                self.args[i + 1] = value.to_string();
                return Ok(());
            }
        }
        bail!("the rendered command has no {flag}: {:?}", self.args)
    }

    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A `Command` for `program` with these arguments and this environment (added to the
    /// caller's, as a test process needs PATH and the like).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&prefix) {
            Some(v)
        } else if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

impl Workload {
    fn new(pod_spec: &Value, container: &str) -> Result<Self> {
        let c = pod_spec["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == container))
            .ok_or_else(|| anyhow!("no container {container} in {pod_spec}"))?;
        Ok(Self {
            pod_spec: pod_spec.clone(),
            container: c.clone(),
        })
    }

    pub fn image(&self) -> Option<&str> {
        self.container["image"].as_str()
    }

    /// `args`, before any expansion.
    pub fn args(&self) -> Vec<String> {
        strings(&self.container["args"])
    }

    pub fn env(&self) -> Result<Vec<(String, EnvSource)>> {
        let mut out = Vec::new();
        for e in self.container["env"].as_array().into_iter().flatten() {
            let name = e["name"]
                .as_str()
                .ok_or_else(|| anyhow!("env without a name: {e}"))?
                .to_string();
            let source = if let Some(v) = e.get("value") {
                EnvSource::Literal(v.as_str().unwrap_or_default().to_string())
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                EnvSource::Field(path.to_string())
            } else {
                bail!("env {name}: only value and fieldRef are understood here: {e}");
            };
            out.push((name, source));
        }
        Ok(out)
    }

    /// `securityContext.capabilities.add`.
    pub fn capabilities(&self) -> Vec<String> {
        strings(&self.container["securityContext"]["capabilities"]["add"])
    }

    pub fn mounts(&self) -> Vec<Mount> {
        self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| Mount {
                volume: m["name"].as_str().unwrap_or_default().to_string(),
                container_path: m["mountPath"].as_str().unwrap_or_default().to_string(),
                read_only: m["readOnly"].as_bool().unwrap_or(false),
            })
            .collect()
    }

    pub fn volume(&self, name: &str) -> Result<Volume> {
        let v = self.pod_spec["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == name))
            .ok_or_else(|| anyhow!("no volume {name} in the pod spec"))?;
        if let Some(path) = v["hostPath"]["path"].as_str() {
            Ok(Volume::HostPath(path.into()))
        } else if let Some(cm) = v["configMap"]["name"].as_str() {
            Ok(Volume::ConfigMap {
                name: cm.to_string(),
                items: items(&v["configMap"]["items"]),
            })
        } else if let Some(secret) = v["secret"]["secretName"].as_str() {
            Ok(Volume::Secret {
                name: secret.to_string(),
                items: items(&v["secret"]["items"]),
                optional: v["secret"]["optional"].as_bool().unwrap_or(false),
            })
        } else if v.get("emptyDir").is_some() {
            Ok(Volume::EmptyDir)
        } else if v.get("projected").is_some() {
            Ok(Volume::Projected)
        } else {
            bail!("volume {name}: unknown source {v}")
        }
    }

    /// The argument list and environment of this container as a process here, the way the
    /// kubelet builds them: downward-API fields from `host.fields`, `$(VAR)` expanded from the
    /// environment, and every mounted container path replaced by its host directory.
    pub fn command_line(&self, rendered: &Rendered, host: &HostEnv) -> Result<CommandLine> {
        // Host directories of the mounts, longest container path first so that nested mounts
        // win over their parents.
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for mount in self.mounts() {
            let dir = match (host.volumes.get(&mount.volume), self.volume(&mount.volume)?) {
                (Some(dir), _) => dir.clone(),
                (None, Volume::ConfigMap { name, items }) => {
                    let data = rendered.find("ConfigMap", &name)?["data"].clone();
                    materialize(&data, &name, &items, &host.dir.join(&mount.volume))?
                }
                // The chart's own Secrets are written out like ConfigMaps; a missing optional one
                // (an existingSecret) is an empty directory, as the kubelet mounts it.
                (
                    None,
                    Volume::Secret {
                        name,
                        items,
                        optional,
                    },
                ) => {
                    let dir = host.dir.join(&mount.volume);
                    match rendered.secret_data(&name) {
                        Ok(data) => materialize(&serde_json::to_value(data)?, &name, &items, &dir)?,
                        Err(_) if optional => {
                            std::fs::create_dir_all(&dir)
                                .with_context(|| format!("creating {}", dir.display()))?;
                            dir
                        }
                        Err(e) => bail!(
                            "volume {}: {e:#}; say which host directory stands in for it",
                            mount.volume
                        ),
                    }
                }
                // A projected volume (the agent's API token) is empty here: tests give the
                // agent a KUBECONFIG.
                (None, Volume::EmptyDir | Volume::Projected) => {
                    let dir = host.dir.join(&mount.volume);
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    dir
                }
                (None, other) => bail!(
                    "volume {} ({other:?}) mounted at {}: say which host directory stands in for it",
                    mount.volume,
                    mount.container_path
                ),
            };
            mounts.push((mount.container_path, dir));
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));

        let mut env: Vec<(String, String)> = Vec::new();
        for (name, source) in self.env()? {
            let value =
                match source {
                    EnvSource::Literal(v) => expand(&v, &env),
                    EnvSource::Field(path) => host.fields.get(&path).cloned().ok_or_else(|| {
                        anyhow!("env {name} reads field {path}: give it in HostEnv")
                    })?,
                };
            env.push((name, map_paths(&value, &mounts)));
        }
        let args = self
            .args()
            .iter()
            .map(|a| map_paths(&expand(a, &env), &mounts))
            .collect();
        Ok(CommandLine { args, env })
    }
}

/// `items` of a ConfigMap or Secret volume: (key, path).
fn items(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["key"].as_str().unwrap_or_default().to_string(),
                i["path"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// Writes a ConfigMap's or Secret's keys (or the projected `items`) as files in `dir`, as the
/// kubelet does.
fn materialize(
    data: &Value,
    name: &str,
    items: &[(String, String)],
    dir: &Path,
) -> Result<PathBuf> {
    let data = data
        .as_object()
        .ok_or_else(|| anyhow!("{name} has no data"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files: Vec<(String, String)> = if items.is_empty() {
        data.keys().map(|k| (k.clone(), k.clone())).collect()
    } else {
        items.to_vec()
    };
    for (key, path) in files {
        let text = data[&key]
            .as_str()
            .ok_or_else(|| anyhow!("{name} has no key {key}"))?;
        std::fs::write(dir.join(&path), text)
            .with_context(|| format!("writing {}", dir.join(&path).display()))?;
    }
    Ok(dir.to_path_buf())
}

/// Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`,
/// anything else stays as written.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, value)) = env.iter().rev().find(|(n, _)| *n == inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Replaces a container path that starts at a path boundary (`/run/x` in `--a=/run/x/y`, not in
/// `/run/xy`) with its host directory.
fn map_paths(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (container, host) in mounts {
        if let Some(i) = value.find(container.as_str()) {
            let before_ok = i == 0 || value[..i].ends_with(['=', ':', ',', ' ']);
            let next = value[i + container.len()..].chars().next();
            let after_ok = next.is_none_or(|c| c == '/' || c == ',' || c == ':');
            if before_ok && after_ok {
                return format!(
                    "{}{}{}",
                    &value[..i],
                    host.display(),
                    &value[i + container.len()..]
                );
            }
        }
    }
    value.to_string()
}

/// The values an e2e test (such as `seed::OffloadBed`) installs the chart with: the controller
/// and agents of one test, its fake Beamlit as the default remote backend, credentials in the
/// Secret the test made, everything scoped to the test's namespaces.
#[derive(Debug, Clone)]
pub struct TestReleaseValues<'a> {
    /// The model namespace (`allowedNamespaces`).
    pub models_namespace: &'a str,
    /// `host:port` of the remote backend.
    pub remote: &'a str,
    pub workspace: &'a str,
    pub client_id: &'a str,
    pub token_url: &'a str,
    /// A Secret in the release namespace with the client secret under key `clientSecret`.
    pub secret_name: &'a str,
    /// PEM file of the CA the tunnel trusts (the fake Beamlit's).
    pub ca_file: Option<&'a Path>,
    /// The tunnel's port on the node.
    pub tunnel_port: u16,
}

impl TestReleaseValues<'_> {
    /// Leader election off with one replica (tests run several controllers at once, each for
    /// its own namespace), a 1 s resync and a 5 s stabilization window (the tests' pace).
    pub fn values(&self) -> ChartValues {
        let mut v = ChartValues::new()
            .set_list("allowedNamespaces", &[self.models_namespace])
            .set("controllerManager.replicas", "1")
            .set("config.leaderElection.enabled", "false")
            .set("config.resyncSeconds", "1")
            .set("config.stabilizationWindowSeconds", "5")
            .set_string("config.workspace", self.workspace)
            .set_string("config.defaultRemoteBackend.host", self.remote)
            .set_string(
                "config.defaultRemoteBackend.authConfig.oauthConfig.clientId",
                self.client_id,
            )
            .set_string(
                "config.defaultRemoteBackend.authConfig.oauthConfig.tokenUrl",
                self.token_url,
            )
            .set_string("existingSecret", self.secret_name)
            // The test's Secret holds the client secret only: no Beamlit API (which would need
            // the API token in that Secret, and the controller in the fake Beamlit's network).
            .set_string("existingSecretKeys.beamlitApiToken", "")
            .set("agent.tunnelPort", &self.tunnel_port.to_string());
        if let Some(ca) = self.ca_file {
            v = v.set_file("agent.caBundle", ca);
        }
        v
    }
}

/// The agent's command line for one simulated node, from the rendered DaemonSet: the pod's
/// fields (node name, namespace, node address), the node's bpffs directory (pins land in
/// `<bpffs>/beamlit`), its cgroup, and a directory for the rest (state, the CA ConfigMap).
/// The agent pod's `tunnel` container as a command line here, with the same host directories
/// as [`agent_command_line`] for the same `dir` (so both see one control socket).
pub fn tunnel_command_line(
    rendered: &Rendered,
    namespace: &str,
    node: &str,
    host_ip: &str,
    dir: &Path,
) -> Result<CommandLine> {
    let host = HostEnv::new(dir).pod(&format!("agent-{node}"), namespace, node, host_ip);
    rendered.agent_tunnel()?.command_line(rendered, &host)
}

pub fn agent_command_line(
    rendered: &Rendered,
    namespace: &str,
    node: &str,
    host_ip: &str,
    bpffs: &Path,
    cgroup: &Path,
    dir: &Path,
) -> Result<CommandLine> {
    let host = HostEnv::new(dir)
        .pod(&format!("agent-{node}"), namespace, node, host_ip)
        .volume("bpffs", bpffs)
        .volume("cgroup2", cgroup);
    rendered.agent()?.command_line(rendered, &host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes() {
        let env = vec![("HOST_IP".to_string(), "10.0.0.5".to_string())];
        assert_eq!(expand("$(HOST_IP):15001", &env), "10.0.0.5:15001");
        assert_eq!(expand("$(NOPE):1", &env), "$(NOPE):1");
        assert_eq!(expand("$$(HOST_IP)", &env), "$(HOST_IP)");
        assert_eq!(expand("a$b", &env), "a$b");
        assert_eq!(expand("$(HOST_IP", &env), "$(HOST_IP");
    }

    #[test]
    fn paths_map_at_boundaries_only() {
        let mounts = vec![
            (
                "/run/beamlit/cgroup2".to_string(),
                PathBuf::from("/sys/fs/cgroup/t"),
            ),
            ("/run/beamlit".to_string(), PathBuf::from("/tmp/x")),
        ];
        assert_eq!(
            map_paths("--cgroup=/run/beamlit/cgroup2", &mounts),
            "--cgroup=/sys/fs/cgroup/t"
        );
        assert_eq!(map_paths("/run/beamlit/bpffs/a", &mounts), "/tmp/x/bpffs/a");
        assert_eq!(map_paths("/run/beamlitx", &mounts), "/run/beamlitx");
        assert_eq!(map_paths("x/run/beamlit", &mounts), "x/run/beamlit");
    }

    #[test]
    fn flags_are_found_and_replaced_in_both_spellings() {
        let mut c = CommandLine {
            args: vec!["run".into(), "--a=1".into(), "--b".into(), "2".into()],
            env: vec![],
        };
        assert_eq!(c.flag("--a"), Some("1"));
        assert_eq!(c.flag("--b"), Some("2"));
        c.replace_flag("--a", "x").expect("--a");
        c.replace_flag("--b", "y").expect("--b");
        assert_eq!(c.args, vec!["run", "--a=x", "--b", "y"]);
        assert!(c.replace_flag("--c", "z").is_err());
    }
}
