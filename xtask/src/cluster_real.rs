//! `cargo xtask cluster up --real-nodes N`: a control plane with N real nodes
//! (`beamlit_testbed::cluster::RealCluster`), owned by a daemon process in its own session that
//! lives until `cargo xtask cluster down` sends it SIGTERM. Everything the cluster makes is tied
//! to that daemon (the kernel kills the components if it dies) and named after its pid, so
//! `down` can sweep what a killed daemon left.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::cluster::node_tools::NodeBinaries;
use beamlit_testbed::cluster::{KubeBinaries, RealCluster, RealNodesOptions};
use beamlit_testbed::oci;
use serde_json::json;

const STATE: &str = "real-nodes.json";

/// Whether `dir` holds a real-node cluster's state.
pub(crate) fn is_real(dir: &Path) -> bool {
    dir.join(STATE).exists()
}

pub(crate) fn up(dir: &Path, nodes: usize) -> Result<()> {
    if !crate::is_root() {
        bail!("real nodes need root (namespaces, cgroups, mounts)");
    }
    if !(1..=9).contains(&nodes) {
        bail!("--real-nodes takes 1 to 9 nodes, not {nodes}");
    }
    if is_real(dir) {
        if daemon_pid(dir).is_some() {
            println!("[cluster] already up");
            return status(dir);
        }
        println!("[cluster] cleaning up a real-node cluster that is no longer running");
        down(dir)?;
    } else if dir.exists() {
        bail!(
            "{} is in use (a simulated cluster?): `cargo xtask cluster down`, or set \
             BEAMLIT_CLUSTER_DIR",
            dir.display()
        );
    }
    let started = Instant::now();
    // Cold builds print their progress here, before the daemon starts.
    println!("[cluster] checking the Kubernetes and node binaries (built once, then cached)");
    KubeBinaries::ensure()?;
    NodeBinaries::ensure()?;
    println!("[cluster] building netprobe (the php-apache stand-in) and the project's images");
    crate::cluster::build_netprobe()?;
    crate::images::build_release_binaries()?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let log_path = dir.join("logs/real-nodes.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "cluster",
        "real-nodes-daemon",
        "--nodes",
        &nodes.to_string(),
        "--dir",
    ])
    .arg(dir)
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    println!(
        "[cluster] starting the control plane, registry and {nodes} real node(s) (log: {})",
        log_path.display()
    );
    let mut child =
        crate::cluster::spawn_detached(&mut cmd).context("starting the real-node daemon")?;
    std::fs::write(dir.join("daemon.pid"), child.id().to_string())?;
    let ready = dir.join(STATE);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ready.exists() {
        if let Some(status) = child.try_wait()? {
            let _ = std::fs::remove_dir_all(dir);
            bail!(
                "the real-node cluster failed to start ({status}); end of its log:\n{}",
                tail(&std::fs::read_to_string(&log_path).unwrap_or_default(), 30)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the real-node cluster was not up within 300 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("[cluster] up in {:.1?}", started.elapsed());
    status(dir)?;
    println!("stop it with: cargo xtask cluster down");
    Ok(())
}

/// Runs the cluster until SIGTERM or SIGINT, then tears it down.
pub(crate) fn daemon(dir: &Path, nodes: usize) -> Result<()> {
    // Block the signals in every thread (they inherit the mask) and take them with sigwait.
    // SAFETY: plain libc signal-set calls on a local set, before any thread exists.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let root = crate::project_root();
    let info = oci::BuildInfo::from_git(&root)?;
    let images = oci::project_images(&root.join("target/release"), &info)?;
    let cluster = RealCluster::start(
        &RealNodesOptions {
            nodes,
            metrics_server: true,
        },
        &images,
    )?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::copy(cluster.kubeconfig(), &kubeconfig)?;
    let registry = cluster.with_nodes(|n| n.registry_addr())?;
    let images: Vec<String> = images.iter().map(|i| i.reference()).collect();
    std::fs::write(
        dir.join(STATE),
        serde_json::to_vec_pretty(&json!({
            "pid": std::process::id(),
            "kubeconfig": kubeconfig,
            "server": cluster.server(),
            "nodes": cluster.node_names(),
            "registry": registry.to_string(),
            "project_images": images,
        }))?,
    )?;
    println!("[daemon] cluster up; waiting for SIGTERM");
    let mut sig = 0;
    // SAFETY: sigwait on the set blocked above.
    unsafe { libc::sigwait(&set, &mut sig) };
    println!("[daemon] signal {sig}: tearing the cluster down");
    cluster.shutdown();
    println!("[daemon] done");
    Ok(())
}

fn daemon_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("daemon.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|a| a == b"real-nodes-daemon".as_slice());
    ours.then_some(pid)
}

pub(crate) fn status(dir: &Path) -> Result<()> {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(STATE)).with_context(|| format!("reading {}", dir.display()))?,
    )?;
    match daemon_pid(dir) {
        Some(pid) => println!("real-node cluster: running (daemon pid {pid})"),
        None => println!("real-node cluster: NOT running (the daemon is gone; run `down`)"),
    }
    println!("server:     {}", state["server"].as_str().unwrap_or("?"));
    println!(
        "registry:   {} (in the cluster network)",
        state["registry"].as_str().unwrap_or("?")
    );
    let kubeconfig = PathBuf::from(state["kubeconfig"].as_str().unwrap_or_default());
    println!("kubeconfig: {}", kubeconfig.display());
    println!("  export KUBECONFIG={}", kubeconfig.display());
    if daemon_pid(dir).is_some() {
        let kubectl = KubeBinaries::cache_dir()?.join("kubectl");
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"][..],
        ] {
            let out = Command::new(&kubectl)
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args(args)
                .stdin(Stdio::null())
                .output()?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
        println!("kubectl and helm: {}", KubeBinaries::cache_dir()?.display());
    }
    Ok(())
}

pub(crate) fn down(dir: &Path) -> Result<()> {
    if let Some(pid) = daemon_pid(dir) {
        println!("[cluster] stopping the real-node cluster (daemon {pid})");
        // SAFETY: kill has no memory-safety preconditions; the pid was checked above.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(90);
        while daemon_pid(dir) == Some(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if daemon_pid(dir) == Some(pid) {
            eprintln!("[cluster] the daemon did not stop in 90 s; killing it");
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // What a killed daemon left is named after its pid: namespaces, cgroups, directories.
    let swept = beamlit_testbed::cleanup_stale();
    if !swept.is_empty() {
        println!("[cluster] removed leftovers: {swept:?}");
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("[cluster] down; removed {}", dir.display());
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
