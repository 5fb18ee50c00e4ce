//! A `beamlit-agent run` process for tests, benchmarks and the demo: its own bpffs directory,
//! attached to a test cgroup, following a routes file the caller edits. Drop stops it and runs
//! `beamlit-agent cleanup`, so no pin or attachment outlives the test.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    chart::{self, CommandLine, Rendered},
    naming,
    probe::agent_bin,
    process::{ChildGuard, spawn},
};

pub struct AgentFixture {
    child: Option<ChildGuard>,
    bpffs: PathBuf,
    cgroup: PathBuf,
    workdir: PathBuf,
    extra_args: Vec<String>,
    starts: u32,
    /// `Some(kubeconfig)`: cluster mode (no routes file).
    kubeconfig: Option<PathBuf>,
    /// The command line rendered from the Helm chart ([`Self::start_rendered`]), used as is.
    rendered: Option<CommandLine>,
    /// A directory made for the pins' parent (the chart's bpffs volume), removed on drop.
    bpffs_root: Option<PathBuf>,
    /// Run the agent itself inside the cgroup it attaches to, as on a node (its programs then
    /// see the agent's own sockets).
    inside_cgroup: bool,
    /// The chart's `tunnel` container, when the rendered agent drives one (`--tunnel-socket`).
    tunnel: Option<ChildGuard>,
}

impl AgentFixture {
    /// Starts an agent attached to `cgroup` (a test cgroup) with the given routes, and waits
    /// until its maps hold them.
    pub fn start(cgroup: &Path, routes_yaml: &str, extra_args: &[&str]) -> Result<Self> {
        Self::start_with(cgroup, routes_yaml, extra_args, false)
    }

    /// [`Self::start`], with the agent process itself inside `cgroup`, as an agent on a node
    /// sits in the root cgroup its programs are attached to.
    pub fn start_inside_cgroup(
        cgroup: &Path,
        routes_yaml: &str,
        extra_args: &[&str],
    ) -> Result<Self> {
        Self::start_with(cgroup, routes_yaml, extra_args, true)
    }

    fn start_with(
        cgroup: &Path,
        routes_yaml: &str,
        extra_args: &[&str],
        inside_cgroup: bool,
    ) -> Result<Self> {
        let name = naming::unique_name("beamlit-test-", "agent");
        let workdir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
        let mut agent = Self {
            child: None,
            bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
            cgroup: cgroup.to_path_buf(),
            workdir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            starts: 0,
            kubeconfig: None,
            rendered: None,
            bpffs_root: None,
            inside_cgroup,
            tunnel: None,
        };
        agent.write_routes(routes_yaml)?;
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts a cluster-mode agent for node `node` (attached to `cgroup`, the node's pods),
    /// talking to the API server of `kubeconfig`, and waits until it has listed the cluster.
    /// `extra_args` carry at least the tunnel address (`--tunnel-ipv4 ...`).
    pub fn start_cluster(
        cgroup: &Path,
        kubeconfig: &Path,
        node: &str,
        extra_args: &[&str],
    ) -> Result<Self> {
        let name = naming::unique_name("beamlit-test-", "agent");
        let workdir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
        let mut args = vec!["--node-name".to_string(), node.to_string()];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut agent = Self {
            child: None,
            bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
            cgroup: cgroup.to_path_buf(),
            workdir,
            extra_args: args,
            starts: 0,
            kubeconfig: Some(kubeconfig.to_path_buf()),
            rendered: None,
            bpffs_root: None,
            inside_cgroup: false,
            tunnel: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts a cluster-mode agent with the arguments and environment of the chart's rendered
    /// DaemonSet (see [`crate::chart::agent_command_line`]), as the pod on `node` in `namespace`
    /// with node address `host_ip`: its bpffs volume is a fresh directory under /sys/fs/bpf, its
    /// cgroup volume is `cgroup`. Three things differ from a pod, because tests share this
    /// machine: `--metrics-addr` binds a free loopback port, `--cgroup` names `cgroup` (no
    /// kubelet made a pods cgroup here), and `extra_args` (e.g. `--tunnel-netns`) are appended. Waits until the agent has listed the cluster.
    pub fn start_rendered(
        rendered: &Rendered,
        kubeconfig: &Path,
        cgroup: &Path,
        namespace: &str,
        node: &str,
        host_ip: &str,
        extra_args: &[&str],
    ) -> Result<Self> {
        let name = naming::unique_name("beamlit-test-", "agent");
        let workdir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
        let bpffs_root = PathBuf::from("/sys/fs/bpf").join(&name);
        fs::create_dir_all(&bpffs_root)
            .with_context(|| format!("creating {}", bpffs_root.display()))?;
        let mut agent = Self {
            child: None,
            bpffs: bpffs_root.clone(),
            cgroup: cgroup.to_path_buf(),
            workdir: workdir.clone(),
            extra_args: Vec::new(),
            starts: 0,
            kubeconfig: Some(kubeconfig.to_path_buf()),
            rendered: None,
            bpffs_root: Some(bpffs_root.clone()),
            inside_cgroup: false,
            tunnel: None,
        };
        let mut command = chart::agent_command_line(
            rendered,
            namespace,
            node,
            host_ip,
            &bpffs_root,
            cgroup,
            &workdir,
        )?;
        command.replace_flag("--metrics-addr", "127.0.0.1:0")?;
        // A simulated node has no kubelet pods cgroup for `--attach-to pods` to find: the test
        // cgroup stands for it, named outright.
        command.args.push(format!("--cgroup={}", cgroup.display()));
        command
            .args
            .extend(extra_args.iter().map(|a| a.to_string()));
        agent.bpffs = command
            .env_value("BEAMLIT_BPFFS_DIR")
            .map(PathBuf::from)
            .context("the rendered agent has no BEAMLIT_BPFFS_DIR")?;
        // The chart's tunnel container beside it, as the pod runs it: uid 65532, no capability,
        // in the network namespace the tunnel's sockets belong in (`--tunnel-netns`, else ours).
        if command.flag("--tunnel-socket").is_some() {
            let mut tunnel =
                chart::tunnel_command_line(rendered, namespace, node, host_ip, &workdir)?;
            tunnel.replace_flag("--metrics-addr", "127.0.0.1:0")?;
            let socket = PathBuf::from(
                tunnel
                    .flag("--control-socket")
                    .context("the tunnel container has no --control-socket")?,
            );
            if let Some(dir) = socket.parent() {
                fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            }
            let netns = extra_args
                .iter()
                .position(|a| *a == "--tunnel-netns")
                .and_then(|i| extra_args.get(i + 1))
                .and_then(|p| Path::new(p).file_name())
                .map(|n| n.to_string_lossy().into_owned());
            agent.tunnel = Some(spawn_tunnel(
                netns.as_deref(),
                &tunnel,
                &socket,
                &workdir.join("tunnel.log"),
            )?);
        }
        agent.rendered = Some(command);
        agent.spawn()?;
        Ok(agent)
    }

    /// Where a cluster-mode agent writes what `inspect` shows beside the maps.
    pub fn state_dir(&self) -> PathBuf {
        self.workdir.join("state")
    }

    pub fn routes_path(&self) -> PathBuf {
        self.workdir.join("routes.yaml")
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The cgroup the agent's programs are attached to (where its clients must run).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The log of the current run (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.workdir.join(format!("agent-{}.log", self.starts))
    }

    /// Replaces the routes file atomically (write + rename), as a ConfigMap update would.
    pub fn write_routes(&self, yaml: &str) -> Result<()> {
        let tmp = self.workdir.join("routes.yaml.tmp");
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.routes_path())?;
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = fs::File::create(self.log_path())?;
        let mut cmd = match &self.rendered {
            // The chart's command line carries the pins, state, cgroup and mode itself.
            Some(rendered) => rendered.command(&agent_bin()),
            None => {
                let mut cmd = Command::new(agent_bin());
                cmd.arg("--bpffs")
                    .arg(&self.bpffs)
                    .arg("--state-dir")
                    .arg(self.state_dir())
                    .arg("run");
                if self.kubeconfig.is_none() {
                    cmd.arg("--routes").arg(self.routes_path());
                }
                cmd.arg("--cgroup").arg(&self.cgroup).args(&self.extra_args);
                cmd
            }
        };
        if let Some(kubeconfig) = &self.kubeconfig {
            cmd.env("KUBECONFIG", kubeconfig);
        }
        cmd.env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("BEAMLIT_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Usually the agent stays outside the test cgroup: it only loads programs.
        let cgroup = self.inside_cgroup.then_some(self.cgroup.as_path());
        self.child = Some(spawn(cmd, cgroup)?);
        let ready = if self.kubeconfig.is_some() {
            "listed; applying"
        } else {
            "routes applied"
        };
        self.wait_log(ready, Duration::from_secs(20))
    }

    /// Waits until the current run's log contains `needle`; fails early if the agent exits.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "agent exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not log {needle:?} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash or an OOM kill would: nothing runs on the agent's side.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
        }
        Ok(())
    }

    /// The running agent's pid, if any.
    pub fn pid(&mut self) -> Option<u32> {
        self.child.as_mut().map(|c| c.pid())
    }

    /// Peak resident memory of the running agent (VmHWM), in KiB.
    pub fn peak_rss_kib(&mut self) -> Result<u64> {
        let pid = self.pid().ok_or_else(|| anyhow!("agent not running"))?;
        vm_hwm_kib(pid)
    }

    /// SIGTERM, and waits for the agent to exit (a rolling update or `kubectl delete pod`).
    pub fn terminate(&mut self, timeout: Duration) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.signal(libc::SIGTERM)?;
            if child.wait_timeout(timeout)?.is_none() {
                bail!(
                    "agent did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
        }
        Ok(())
    }

    /// Whether the next (re)start puts the agent itself inside its cgroup, where its programs
    /// see the agent's own sockets, as on a node.
    pub fn set_inside_cgroup(&mut self, inside: bool) {
        self.inside_cgroup = inside;
    }

    /// Writes a `services` entry with `bpftool`, as an operator (or a bug) could, bypassing the
    /// agent: `service` redirected at `share_bp` to `tunnel`, marked ready (no heartbeat
    /// required), counters in slot `counter_slot`.
    pub fn write_entry_by_hand(
        &self,
        service: std::net::SocketAddrV4,
        tunnel: std::net::SocketAddrV4,
        share_bp: u16,
        counter_slot: u32,
    ) -> Result<()> {
        write_service_entry(
            &self.bpffs.join("services"),
            service,
            tunnel,
            share_bp,
            counter_slot,
        )
    }

    /// Starts the agent again (after [`Self::kill9`]); it adopts the pinned state.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        self.spawn()
    }

    /// `beamlit-agent inspect --json` on this agent's pins.
    pub fn inspect(&self) -> Result<serde_json::Value> {
        let out = Command::new(agent_bin())
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["inspect", "--json"])
            .output()?;
        if !out.status.success() {
            bail!("inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).context("parsing inspect --json")
    }

    /// The inspect row of one service address (as the agent prints it, e.g. `10.96.0.10:80`).
    pub fn service(&self, address: &str) -> Result<serde_json::Value> {
        let report = self.inspect()?;
        report["services"]
            .as_array()
            .and_then(|s| s.iter().find(|row| row["address"] == address).cloned())
            .ok_or_else(|| anyhow!("{address} not in the agent's maps: {report}"))
    }

    /// Waits until the service's share in the map is `share_bp` basis points.
    pub fn wait_share(&self, address: &str, share_bp: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let current = self.service(address).ok().map(|s| s["share_bp"].clone());
            if current.as_ref().and_then(|v| v.as_u64()) == Some(share_bp) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{address} share is {current:?}, not {share_bp} bp:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentFixture {
    fn drop(&mut self) {
        self.child.take();
        self.tunnel.take();
        let cleanup = Command::new(agent_bin())
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("cleanup")
            .stdout(Stdio::null())
            .status();
        if !cleanup.is_ok_and(|s| s.success()) {
            eprintln!(
                "agent cleanup failed for {}; removing pins",
                self.bpffs.display()
            );
        }
        // Backstop: unlinking pins on bpffs detaches links and frees maps.
        let _ = fs::remove_dir_all(&self.bpffs);
        if let Some(root) = &self.bpffs_root {
            let _ = fs::remove_dir_all(root);
        }
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// The `services` key of an IPv4 TCP Service address, as bytes (`ServiceKey`'s layout).
pub fn service_key(service: std::net::SocketAddrV4) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..4].copy_from_slice(&service.ip().octets());
    key[16..18].copy_from_slice(&service.port().to_le_bytes());
    key[18] = 6; // PROTO_TCP
    key[19] = 4; // FAMILY_INET
    key
}

/// Bytes as bpftool's `hex` arguments.
pub fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the pinned `services` map `map` has an entry for `service`.
pub fn has_service_entry(map: &Path, service: std::net::SocketAddrV4) -> Result<bool> {
    let out = Command::new("bpftool")
        .args(["map", "lookup", "pinned"])
        .arg(map)
        .args(["key", "hex"])
        .args(hex(&service_key(service)))
        .output()
        .context("running bpftool")?;
    Ok(out.status.success())
}

/// Writes a `services` entry with bpftool into the pinned map `map`, as an operator (or an
/// attacker with root) could: connects to `service` from the attached cgroup go to `tunnel`
/// for `share_bp` basis points, tunnel marked ready, no heartbeat required.
pub fn write_service_entry(
    map: &Path,
    service: std::net::SocketAddrV4,
    tunnel: std::net::SocketAddrV4,
    share_bp: u16,
    counter_slot: u32,
) -> Result<()> {
    let key = service_key(service);
    let mut value = [0u8; 32];
    value[..4].copy_from_slice(&tunnel.ip().octets());
    value[16..20].copy_from_slice(&1u32.to_le_bytes()); // generation
    value[20..22].copy_from_slice(&share_bp.to_le_bytes());
    value[22..24].copy_from_slice(&tunnel.port().to_le_bytes());
    value[24..26].copy_from_slice(&1u16.to_le_bytes()); // FLAG_TUNNEL_READY
    value[26] = 4; // tunnel family
    value[28..32].copy_from_slice(&counter_slot.to_le_bytes());
    let out = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(map)
        .arg("key")
        .arg("hex")
        .args(hex(&key))
        .arg("value")
        .arg("hex")
        .args(hex(&value))
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map update: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The uid and gid the chart's tunnel container runs as.
pub const TUNNEL_UID: u32 = 65532;

/// Starts `beamlit-agent tunnel --control-socket <socket> <args>` in the network namespace
/// `netns` as the chart's tunnel container runs: uid/gid [`TUNNEL_UID`], every capability set
/// emptied, no_new_privs (`setpriv`). Waits until it listens; its output goes to `log`.
pub fn start_tunnel_process(
    netns: &str,
    socket: &Path,
    args: &[&str],
    log: &Path,
) -> Result<ChildGuard> {
    let mut line = vec![
        "tunnel".to_string(),
        "--control-socket".to_string(),
        socket.display().to_string(),
    ];
    line.extend(args.iter().map(|a| a.to_string()));
    let command = CommandLine {
        args: line,
        env: Vec::new(),
    };
    spawn_tunnel(Some(netns), &command, socket, log)
}

/// `command` (a `beamlit-agent tunnel` command line) as the chart's tunnel container, in
/// `netns` (or this process's namespace), until `socket` exists.
fn spawn_tunnel(
    netns: Option<&str>,
    command: &CommandLine,
    socket: &Path,
    log: &Path,
) -> Result<ChildGuard> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "setpriv"]);
            c
        }
        None => Command::new("setpriv"),
    };
    cmd.arg(format!("--reuid={TUNNEL_UID}"))
        .arg(format!("--regid={TUNNEL_UID}"))
        .args([
            "--clear-groups",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(agent_bin())
        .args(&command.args)
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(fs::File::create(log)?);
    let _ = fs::remove_file(socket);
    let child = spawn(cmd, None)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!(
                "the tunnel process did not listen on {}: {}",
                socket.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// The peak resident set (VmHWM) of `pid`, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM for pid {pid}"))
}
