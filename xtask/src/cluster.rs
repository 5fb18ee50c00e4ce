//! `cargo xtask cluster <build|up|down|status>`: the pinned Kubernetes binaries
//! and a persistent cluster for people and the demo: simulated nodes (pods as
//! network namespaces) by default, or real nodes (`--real-nodes N`: kubelet,
//! containerd, kube-proxy, CoreDNS, metrics-server, a registry).
//! Tests start their own clusters with `beamlit_testbed::cluster::TestCluster`;
//! both use the same code in the testbed crate.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::cluster::{
    ControlPlane, ControlPlaneOptions, KubeBinaries, control_plane, run_nodes_daemon,
};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum Action {
    /// Build the pinned Kubernetes binaries (etcd, kube-apiserver, kube-controller-manager,
    /// kube-scheduler, kubelet, kube-proxy, kubectl, helm) and the node binaries (containerd,
    /// runc, CNI plugins, CoreDNS, metrics-server, registry, pause) into ~/.cache/beamlit/bin/
    /// (a cold build takes about 20 minutes on 2 cores; a second call does nothing).
    Build,
    /// Start etcd, kube-apiserver and kube-controller-manager on 127.0.0.1 and simulated nodes
    /// (pods as network namespaces, Service routing); prints the kubeconfig path.
    Up {
        /// How many Node objects to register.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Control plane only: no nodes, pods stay Pending.
        #[arg(long, conflicts_with = "real_nodes")]
        no_nodes: bool,
        /// Real nodes instead of simulated ones: each node a network, mount and PID namespace
        /// running containerd, kubelet and kube-proxy (nftables), with CoreDNS, metrics-server
        /// and a registry holding the project's images (built with `cargo xtask images`).
        #[arg(long, value_name = "N", conflicts_with = "nodes")]
        real_nodes: Option<usize>,
    },
    /// Stop everything `up` started and remove its state directory.
    Down,
    /// Show whether the cluster from `up` is running.
    Status,
    /// Internal: the node simulator process that `up` starts in the background.
    #[command(hide = true)]
    Nodes {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        nodes: usize,
    },
    /// Internal: the process that owns a real-node cluster until `down` (SIGTERM).
    #[command(hide = true)]
    RealNodesDaemon {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        nodes: usize,
    },
}

/// The persistent cluster's state directory (`BEAMLIT_CLUSTER_DIR`, default
/// `/tmp/beamlit-cluster`).
fn state_dir() -> PathBuf {
    std::env::var_os("BEAMLIT_CLUSTER_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/beamlit-cluster"))
}

pub(crate) fn run(action: Action) -> Result<()> {
    match action {
        Action::Build => {
            let dir = ensure_binaries()?;
            let nodes = beamlit_testbed::cluster::node_tools::NodeBinaries::ensure()?;
            println!("{}\n{}", dir.display(), nodes.dir().display());
            Ok(())
        }
        Action::Up {
            real_nodes: Some(n),
            ..
        } => crate::cluster_real::up(&state_dir(), n),
        Action::Up {
            nodes, no_nodes, ..
        } => up(if no_nodes { 0 } else { nodes }),
        Action::RealNodesDaemon { dir, nodes } => crate::cluster_real::daemon(&dir, nodes),
        Action::Down => down(),
        Action::Status => status(),
        Action::Nodes { dir, nodes } => {
            run_nodes_daemon(&dir.join("kubeconfig"), nodes, &dir.join("nodes.ready"))
        }
    }
}

/// Builds the pinned binaries if the cache lacks them; returns their directory.
/// For `cargo xtask setup` and anything else that needs kubectl or helm.
pub fn ensure_binaries() -> Result<PathBuf> {
    let started = Instant::now();
    let bins = KubeBinaries::ensure()?;
    println!(
        "[cluster] binaries in {} ({:.1?})",
        bins.dir().display(),
        started.elapsed()
    );
    Ok(bins.dir().to_path_buf())
}

fn up(nodes: usize) -> Result<()> {
    let dir = state_dir();
    if crate::cluster_real::is_real(&dir) {
        bail!(
            "a real-node cluster is running from {}; `cargo xtask cluster down` first",
            dir.display()
        );
    }
    if let Some(state) = control_plane::read_state(&dir)? {
        let alive = state
            .processes
            .iter()
            .all(|(n, pid)| control_plane::is_our_process(&state, n, *pid));
        if alive {
            println!("[cluster] already up: {}", state.server);
            print_usage(&state.kubeconfig);
            return Ok(());
        }
        println!("[cluster] cleaning up a cluster that is no longer running");
        down()?;
    } else if dir.exists() {
        bail!(
            "{} exists but holds no cluster state; remove it or set BEAMLIT_CLUSTER_DIR",
            dir.display()
        );
    }
    let bins = KubeBinaries::ensure()?;
    if nodes > 0 {
        if !crate::is_root() {
            bail!("simulated nodes need root (network namespaces, nftables); use --no-nodes");
        }
        // The pods' HTTP server; found next to this binary.
        build_netprobe()?;
    }
    let started = Instant::now();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("[cluster] starting etcd, kube-apiserver, kube-controller-manager");
    let cp = match ControlPlane::start(
        bins,
        ControlPlaneOptions {
            dir: dir.clone(),
            detached: true,
            real_nodes: None,
        },
    ) {
        Ok(cp) => cp,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    println!(
        "[cluster] apiserver ready at {} after {:.1?}",
        cp.server(),
        started.elapsed()
    );
    let state = cp.detach()?;
    if nodes > 0 {
        if let Err(e) = start_nodes(&dir, nodes) {
            let _ = down();
            return Err(e);
        }
        println!(
            "[cluster] {nodes} simulated node(s) ready after {:.1?}",
            started.elapsed()
        );
    }
    println!("[cluster] up in {:.1?}", started.elapsed());
    print_usage(&state.kubeconfig);
    Ok(())
}

fn print_usage(kubeconfig: &Path) {
    println!("kubeconfig: {}", kubeconfig.display());
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!(
        "  kubectl get nodes      # kubectl and helm: {}",
        bin_hint()
    );
    println!("stop it with: cargo xtask cluster down");
}

fn bin_hint() -> String {
    KubeBinaries::cache_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|e| format!("({e:#})"))
}

/// Starts `xtask cluster nodes` in its own session and waits for its ready file.
fn start_nodes(dir: &Path, nodes: usize) -> Result<()> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let log = std::fs::File::create(dir.join("logs/nodes.log"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["cluster", "nodes", "--nodes", &nodes.to_string(), "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut child = spawn_detached(&mut cmd).context("starting the node simulator")?;
    std::fs::write(dir.join("nodes.pid"), child.id().to_string())?;
    let ready = dir.join("nodes.ready");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the node simulator exited ({status}); see {}",
                dir.join("logs/nodes.log").display()
            );
        }
        if Instant::now() >= deadline {
            bail!("the node simulator was not ready within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// netprobe, the pods' HTTP server (simulated pods, and the php-apache stand-in image); the
/// test bed finds it next to the xtask binary.
pub(crate) fn build_netprobe() -> Result<()> {
    crate::cargo(&[
        "build",
        "--quiet",
        "-p",
        "beamlit-testbed",
        "--bin",
        "netprobe",
    ])
}

/// Spawns `cmd` in a session of its own (`setsid`), so it outlives this command and the
/// terminal's signals: the daemons of `cluster up`.
pub(crate) fn spawn_detached(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our session.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// The node simulator's pid if it is still the process `up` started.
fn nodes_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("nodes.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours =
        args.contains(&b"nodes".as_slice()) && args.contains(&dir.as_os_str().as_encoded_bytes());
    ours.then_some(pid)
}

fn down() -> Result<()> {
    let dir = state_dir();
    if crate::cluster_real::is_real(&dir) {
        return crate::cluster_real::down(&dir);
    }
    if !dir.exists() {
        println!(
            "[cluster] nothing to stop ({} does not exist)",
            dir.display()
        );
        return Ok(());
    }
    if let Some(pid) = nodes_pid(&dir) {
        println!("[cluster] stopping the node simulator ({pid})");
        // SAFETY: kill has no memory-safety preconditions; the pid was checked above.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if nodes_pid(&dir) == Some(pid) {
            eprintln!("[cluster] node simulator still running; killing it");
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let stopped = control_plane::stop_detached(&dir)?;
    if !stopped.is_empty() {
        println!("[cluster] stopped {}", stopped.join(", "));
    }
    // Namespaces of a node simulator that did not clean up (killed) are named
    // after its dead pid, so the testbed's sweep finds them.
    let swept = beamlit_testbed::cleanup_stale();
    if !swept.is_empty() {
        println!("[cluster] removed leftovers: {swept:?}");
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("[cluster] down; removed {}", dir.display());
    Ok(())
}

fn status() -> Result<()> {
    let dir = state_dir();
    if crate::cluster_real::is_real(&dir) {
        return crate::cluster_real::status(&dir);
    }
    let Some(state) = control_plane::read_state(&dir)? else {
        println!("[cluster] not running (no state in {})", dir.display());
        return Ok(());
    };
    println!("server:     {}", state.server);
    println!("kubeconfig: {}", state.kubeconfig.display());
    for (name, pid) in &state.processes {
        let alive = control_plane::is_our_process(&state, name, *pid);
        println!(
            "  {name:<24} pid {pid:<8} {}",
            if alive { "running" } else { "NOT running" }
        );
    }
    match nodes_pid(&dir) {
        Some(pid) => println!("  {:<24} pid {pid:<8} running", "node simulator"),
        None => println!("  {:<24} not running", "node simulator"),
    }
    Ok(())
}
