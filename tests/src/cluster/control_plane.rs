//! etcd + kube-apiserver + kube-controller-manager on loopback, with a PKI and
//! kubeconfigs generated on the spot.
//!
//! Two lifetimes share this code: [`ControlPlane::start`] ties the processes to
//! the calling process (they are killed on drop, and by the kernel if the
//! process dies: `PR_SET_PDEATHSIG`), for tests; [`ControlPlane::detach`] leaves
//! them running in their own session and records their pids in
//! `<dir>/state.json`, for `cargo xtask cluster up`, and [`stop_detached`] ends
//! them (`cargo xtask cluster down`).

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::pki;
use super::tools::KubeBinaries;
use crate::process::ChildGuard;

/// The Service CIDR given to the apiserver (and routed to the node simulator's
/// node namespace by the kube-proxy replacement).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Controllers the simulated cluster needs: Deployments → ReplicaSets → Pods,
/// EndpointSlices from Services and Pods, per-namespace default service
/// accounts (pod admission needs them), and namespace/garbage collection so
/// deleting a test namespace removes what it held.
const CONTROLLERS: &str =
    "deployment,replicaset,endpointslice,serviceaccount,namespace,garbagecollector";
/// Real nodes also run DaemonSets (the agent), StatefulSets and Jobs; kubelets need the
/// not-ready taint lifted once a node is Ready (node lifecycle), `kube-root-ca.crt` in every
/// namespace (service-account volumes), and pods of deleted nodes collected.
const REAL_NODE_CONTROLLERS: &str =
    "daemonset,statefulset,job,podgc,ttl-after-finished,nodelifecycle,root-ca-cert-publisher";

/// Where and how to start.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// State directory: PKI, etcd data, logs, kubeconfigs. Must exist and be
    /// private to this control plane.
    pub dir: PathBuf,
    /// Start processes in their own session, not tied to this process (for
    /// `cargo xtask cluster up`). Call [`ControlPlane::detach`] afterwards.
    pub detached: bool,
    /// For real nodes: the API server advertises the cluster network's address (the
    /// `kubernetes` Service gets endpoints), reaches kubelets and aggregated API servers through
    /// the egress proxy, and authorizes nodes (Node authorizer, NodeRestriction).
    pub real_nodes: Option<super::real_nodes::ApiserverNetwork>,
}

/// What `cargo xtask cluster up` records for `down`/`status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    pub server: String,
    pub kubeconfig: PathBuf,
    pub binaries: PathBuf,
    /// (name, pid) in start order.
    pub processes: Vec<(String, u32)>,
}

#[derive(Debug)]
enum Proc {
    Tied(ChildGuard),
    Detached(Child),
}

/// A running control plane; stops its processes on drop unless detached.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    server: String,
    kubeconfig: PathBuf,
    binaries: KubeBinaries,
    procs: Vec<(String, Proc)>,
    detached: bool,
    /// kube-apiserver's arguments, to start it again after [`Self::stop_apiserver`].
    apiserver_args: Vec<std::ffi::OsString>,
}

impl ControlPlane {
    /// Generates the PKI, starts etcd and kube-apiserver, waits for `/readyz`,
    /// then starts kube-controller-manager. `binaries` must be complete.
    pub fn start(binaries: KubeBinaries, opts: ControlPlaneOptions) -> Result<Self> {
        let dir = opts.dir;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");

        let (pki, admin, kcm) = match &opts.real_nodes {
            // The cluster network signed its identities with this CA already.
            Some(_) => pki::load(&dir)?,
            None => pki::generate(&dir)?,
        };
        let ca_pem = std::fs::read_to_string(&pki.ca_cert)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            pki::kubeconfig(&server, &ca_pem, &admin, "admin"),
        )?;
        let kcm_kubeconfig = dir.join("controller-manager.kubeconfig");
        std::fs::write(
            &kcm_kubeconfig,
            pki::kubeconfig(&server, &ca_pem, &kcm, "kube-controller-manager"),
        )?;

        let mut cp = Self {
            dir: dir.clone(),
            server: server.clone(),
            kubeconfig,
            binaries,
            procs: Vec::new(),
            detached: opts.detached,
            apiserver_args: Vec::new(),
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut etcd = Command::new(cp.binaries.etcd());
        etcd.arg("--name=beamlit")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=beamlit={peer_url}"))
            // Throwaway data: durability buys nothing and costs start-up time.
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        cp.launch("etcd", etcd, &logs)?;

        let mut api = Command::new(cp.binaries.kube_apiserver());
        let issuer = "https://kubernetes.default.svc.cluster.local";
        api.arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--cert-dir={}", dir.join("pki").display()))
            .arg(format!("--tls-cert-file={}", pki.apiserver_cert.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                pki.apiserver_key.display()
            ))
            .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
            .arg(format!(
                "--service-account-key-file={}",
                pki.service_account_pub.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key.display()
            ))
            .arg(format!("--service-account-issuer={issuer}"))
            .arg(format!("--api-audiences={issuer}"))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--allow-privileged=true")
            .arg("--profiling=false");
        match &opts.real_nodes {
            None => {
                api.arg("--authorization-mode=RBAC")
                    // The `kubernetes` Service would point at 127.0.0.1, which
                    // EndpointSlices reject; nothing in the simulated cluster needs it.
                    .arg("--endpoint-reconciler-type=none");
            }
            Some(net) => {
                let addr = super::real_nodes::APISERVER_ADDR;
                api.arg("--authorization-mode=Node,RBAC")
                    .arg("--enable-admission-plugins=NodeRestriction")
                    // Pods reach it as `kubernetes.default` through kube-proxy: the endpoint
                    // is the relay in the cluster network.
                    .arg(format!("--advertise-address={addr}"))
                    .arg(format!(
                        "--egress-selector-config-file={}",
                        net.egress_config.display()
                    ))
                    // By address, never by name: a name would be resolved through the
                    // machine's resolver.
                    .arg("--kubelet-preferred-address-types=InternalIP")
                    .arg(format!(
                        "--kubelet-client-certificate={}",
                        net.kubelet_client.0.display()
                    ))
                    .arg(format!(
                        "--kubelet-client-key={}",
                        net.kubelet_client.1.display()
                    ))
                    // Aggregated API servers (metrics-server) are dialled at their pods.
                    .arg("--enable-aggregator-routing=true")
                    .arg(format!(
                        "--requestheader-client-ca-file={}",
                        pki.ca_cert.display()
                    ))
                    .arg("--requestheader-allowed-names=front-proxy-client")
                    .arg("--requestheader-username-headers=X-Remote-User")
                    .arg("--requestheader-group-headers=X-Remote-Group")
                    .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
                    .arg(format!(
                        "--proxy-client-cert-file={}",
                        net.proxy_client.0.display()
                    ))
                    .arg(format!(
                        "--proxy-client-key-file={}",
                        net.proxy_client.1.display()
                    ));
            }
        }
        cp.apiserver_args = api.get_args().map(ToOwned::to_owned).collect();
        cp.launch("kube-apiserver", api, &logs)?;
        cp.wait_ready("kube-apiserver", READY_TIMEOUT)?;

        let mut kcm_cmd = Command::new(cp.binaries.kube_controller_manager());
        kcm_cmd
            .arg(format!("--kubeconfig={}", kcm_kubeconfig.display()))
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg(format!(
                "--controllers={}",
                if opts.real_nodes.is_some() {
                    format!("{CONTROLLERS},{REAL_NODE_CONTROLLERS}")
                } else {
                    CONTROLLERS.to_string()
                }
            ))
            .arg("--use-service-account-credentials=true")
            .arg(format!(
                "--service-account-private-key-file={}",
                pki.service_account_key.display()
            ))
            .arg(format!("--root-ca-file={}", pki.ca_cert.display()))
            .arg("--leader-elect=false")
            .arg("--cluster-name=beamlit-test");
        cp.launch("kube-controller-manager", kcm_cmd, &logs)?;
        Ok(cp)
    }

    /// The admin kubeconfig (client certificate in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn binaries(&self) -> &KubeBinaries {
        &self.binaries
    }

    /// `kubectl --kubeconfig <ours>`; add arguments.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.binaries.kubectl());
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        cmd
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL), as an outage would; etcd keeps the state.
    pub fn stop_apiserver(&mut self) {
        if let Some(i) = self.procs.iter().position(|(n, _)| n == "kube-apiserver") {
            let (name, p) = self.procs.remove(i);
            match p {
                Proc::Tied(mut g) => terminate_guard(&mut g, &name),
                Proc::Detached(mut c) => {
                    terminate_pid(c.id(), &name);
                    let _ = c.wait();
                }
            }
        }
    }

    /// Starts kube-apiserver again with its first arguments (same port, PKI and etcd) and
    /// waits until it is ready.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self.procs.iter().any(|(n, _)| n == "kube-apiserver") {
            bail!("kube-apiserver is already running");
        }
        let mut api = Command::new(self.binaries.kube_apiserver());
        api.args(&self.apiserver_args);
        let logs = self.dir.join("logs");
        // Its log starts over (the outage is visible in the clients, not here).
        self.launch("kube-apiserver", api, &logs)?;
        self.wait_ready("kube-apiserver", READY_TIMEOUT)
    }

    /// The last lines of a component's log, for error messages.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        log_tail(
            &self.dir.join("logs").join(format!("{component}.log")),
            lines,
        )
    }

    /// Fails if a component exited (with the end of its log).
    pub fn check_alive(&mut self) -> Result<()> {
        let mut dead = None;
        for (name, p) in &mut self.procs {
            let exited = match p {
                Proc::Tied(g) => g.try_wait().ok().flatten().map(|s| s.to_string()),
                Proc::Detached(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            };
            if let Some(status) = exited {
                dead = Some((name.clone(), status));
                break;
            }
        }
        if let Some((name, status)) = dead {
            bail!(
                "{name} exited ({status}); end of its log:\n{}",
                self.log_tail(&name, 30)
            );
        }
        Ok(())
    }

    /// Polls `/readyz` until it answers `ok`.
    fn wait_ready(&mut self, component: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let out = self
                .kubectl()
                .args(["get", "--raw=/readyz", "--request-timeout=2s"])
                .stdin(Stdio::null())
                .output()
                .context("running kubectl")?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return Ok(());
            }
            let last = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if Instant::now() >= deadline {
                bail!(
                    "{component} not ready after {timeout:?} (last: {last}); end of its log:\n{}",
                    self.log_tail(component, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn launch(&mut self, name: &str, mut cmd: Command, logs: &Path) -> Result<()> {
        let log = File::create(logs.join(format!("{name}.log")))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let proc = if self.detached {
            // SAFETY: setsid is async-signal-safe; it detaches the child from
            // our session so it outlives `cargo xtask cluster up`.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Proc::Detached(cmd.spawn().with_context(|| format!("starting {name}"))?)
        } else {
            Proc::Tied(spawn_tied(cmd, name)?)
        };
        self.procs.push((name.to_string(), proc));
        Ok(())
    }

    /// Leaves the processes running after this value (and this process) is
    /// gone; writes `<dir>/state.json` for [`stop_detached`].
    pub fn detach(mut self) -> Result<ClusterState> {
        if !self.detached {
            bail!("detach() needs a control plane started with `detached: true`");
        }
        let state = ClusterState {
            server: self.server.clone(),
            kubeconfig: self.kubeconfig.clone(),
            binaries: self.binaries.dir().to_path_buf(),
            processes: self
                .procs
                .iter()
                .map(|(n, p)| {
                    let pid = match p {
                        Proc::Tied(g) => g.pid(),
                        Proc::Detached(c) => c.id(),
                    };
                    (n.clone(), pid)
                })
                .collect(),
        };
        std::fs::write(
            self.dir.join("state.json"),
            serde_json::to_vec_pretty(&state)?,
        )?;
        // Forget the children: the caller exits and init adopts them.
        self.procs.clear();
        Ok(state)
    }

    /// Stops every process (reverse start order): SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        while let Some((name, p)) = self.procs.pop() {
            match p {
                Proc::Tied(mut g) => terminate_guard(&mut g, &name),
                Proc::Detached(mut c) => {
                    terminate_pid(c.id(), &name);
                    let _ = c.wait();
                }
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

fn terminate_guard(g: &mut ChildGuard, name: &str) {
    if g.signal(libc::SIGTERM).is_ok()
        && g.wait_timeout(Duration::from_secs(5))
            .ok()
            .flatten()
            .is_none()
    {
        eprintln!("beamlit-testbed: {name} ignored SIGTERM; killing it");
    }
    let _ = g.kill();
}

/// SIGTERM, wait up to 5 s, SIGKILL. Only for pids we started (callers check).
fn terminate_pid(pid: u32, name: &str) {
    let pid = pid as i32;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !process_running(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{name} ({pid}) ignored SIGTERM; killing it");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Alive and not a zombie.
fn process_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Reads `<dir>/state.json`, if a detached cluster was started there.
pub fn read_state(dir: &Path) -> Result<Option<ClusterState>> {
    let path = dir.join("state.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Whether `pid` is still the process `state` recorded: its executable must be
/// the binary in the cache dir, so a reused pid is never signalled.
pub fn is_our_process(state: &ClusterState, name: &str, pid: u32) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    exe == state.binaries.join(name) && process_running(pid as i32)
}

/// Stops the processes `state.json` in `dir` lists (reverse order). Returns the
/// names it stopped.
pub fn stop_detached(dir: &Path) -> Result<Vec<String>> {
    let Some(state) = read_state(dir)? else {
        return Ok(Vec::new());
    };
    let mut stopped = Vec::new();
    for (name, pid) in state.processes.iter().rev() {
        if is_our_process(&state, name, *pid) {
            terminate_pid(*pid, name);
            stopped.push(name.clone());
        }
    }
    Ok(stopped)
}

/// A free TCP port on 127.0.0.1 (bound then released; the window is small and
/// the components fail loudly if they lose the race).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as this process, with
/// `PR_SET_PDEATHSIG=SIGKILL`: the kernel kills the child if the test process
/// dies without running destructors (SIGKILL, abort). The death signal fires
/// when the *spawning thread* exits, hence the one long-lived keeper thread
/// rather than the caller's (short-lived test or tokio) thread.
pub(crate) fn spawn_tied(mut cmd: Command, name: &str) -> Result<ChildGuard> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("beamlit-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("beamlit-testbed: cannot start keeper thread: {e}"));
        Mutex::new(tx)
    });
    // SAFETY: prctl and getppid are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, tx))
        .map_err(|_| anyhow!("keeper thread is gone"))?;
    let child = rx
        .recv()
        .map_err(|_| anyhow!("keeper thread is gone"))?
        .with_context(|| format!("starting {name}"))?;
    Ok(ChildGuard::from_child(child, name.to_string()))
}
