//! Project tasks: `cargo xtask <setup|test|demo|bench>`.
mod bench;
mod bench_controller;
mod bench_failover;
mod bench_scale;
mod bench_tunnel;
mod cluster;
mod cluster_real;
mod demo;
mod images;
mod setup;

use std::{
    path::PathBuf,
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// Tasks of the Beamlit offloading agent's repository.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (apt packages, pinned toolchains, bpf-linker,
    /// bpffs, the Kubernetes and node binaries), printing each step and its expected time first.
    /// Idempotent: a second run only checks.
    Setup,
    /// Run every check: rustfmt, clippy, unit tests and the privileged tests (root, real kernel,
    /// test-made cgroups and network namespaces). Runs `setup` first.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Write the CRDs (ModelDeployment, ModelDeploymentGrant), generated from the Rust types,
    /// into crds/ and into the Helm chart's crds/.
    Crds,
    /// The seed README's walkthrough, live: a control plane with a simulated node, the
    /// controller and the agent, the fake Beamlit; php-apache scaled to 0 and back while a client
    /// requests it every 100 ms. Needs root and cgroup v2.
    Demo(demo::DemoArgs),
    /// OCI image archives of the controller and the agent from release binaries, without a
    /// container engine (target/images/*.tar).
    Images(images::ImagesArgs),
    /// Benchmarks, measured side by side in one run against a baseline.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// A real Kubernetes control plane on loopback with simulated nodes (pods as network
    /// namespaces), and the pinned binaries it runs.
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Cost of the agent on connections it does not redirect: wrk and connect latency with and
    /// without the agent (10 000 services at share 0), and connect4's run time from kernel stats.
    Dataplane(bench::DataplaneArgs),
    /// The egress tunnel vs a direct connection vs nginx as a reverse proxy (requests/s,
    /// latency), and the agent's memory with 1000 open client connections.
    Tunnel(bench_tunnel::TunnelArgs),
    /// 1000 ModelDeployments against a real apiserver: time to reconcile all after start, the
    /// controller's memory, API requests per minute at steady state.
    Controller(bench_controller::ControllerArgs),
    /// Agents' failover in a test cluster: EndpointSlice → map latency over trials, requests
    /// lost under a steady connection rate, resync time with many ModelDeployments.
    Failover(bench_failover::FailoverArgs),
    /// How the cluster side grows with nodes: 1, 10 and 50 cluster-mode agents against 1000
    /// ModelDeployments; per agent count, the API requests and watch events of one decision
    /// change, the time until all agents applied it, steady-state API requests, memory.
    Scale(bench_scale::ScaleArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Test { args } => test(&args),
        Task::Demo(args) => demo::demo(&args),
        Task::Crds => {
            for (crd_file, yaml) in beamlit_api::all_crds()? {
                // The chart installs the same file (helm applies its crds/ before the templates).
                let chart = PathBuf::from("charts/beamlit-controller").join(crd_file);
                for file in [PathBuf::from(crd_file), chart] {
                    let path = project_root().join(file);
                    std::fs::write(&path, &yaml)
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!("wrote {}", path.display());
                }
            }
            Ok(())
        }
        Task::Bench { which } => match which {
            Bench::Dataplane(args) => bench::dataplane(&args),
            Bench::Tunnel(args) => bench_tunnel::tunnel(&args),
            Bench::Controller(args) => bench_controller::controller(&args),
            Bench::Failover(args) => bench_failover::failover(&args),
            Bench::Scale(args) => bench_scale::scale(&args),
        },
        Task::Cluster { action } => cluster::run(action),
        Task::Images(args) => images::images(&args),
    }
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        let hint = "the privileged tests load eBPF programs and create network namespaces";
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            bail!("`cargo xtask test` must run as root in CI: {hint}");
        }
        eprintln!("warning: not root; {hint}, so they will be skipped");
    }
    setup::setup()?;
    let root = project_root();
    println!("[test] cargo fmt --check");
    cargo(&["fmt", "--all", "--check"])?;
    println!("[test] cargo clippy");
    // Default members: agent-ebpf is built for the BPF target by agent/build.rs, not for the host.
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    println!("[test] building binaries");
    cargo(&["build", "--bins"])?;
    println!("[test] cargo test");
    let target = root.join("target/debug");
    let mut test = Command::new("cargo");
    test.arg("test")
        .args(extra)
        .env("BEAMLIT_AGENT_BIN", target.join("beamlit-agent"))
        .env("BEAMLIT_NETPROBE_BIN", target.join("netprobe"))
        .current_dir(&root);
    run_status(&mut test)
}

pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let mut c = Command::new("cargo");
    c.args(args).current_dir(project_root());
    run_status(&mut c)
}

/// Builds the agent and the test bed's programs (release or debug), and points the test bed at
/// them. For the tasks that run the agent outside `cargo test` (bench, demo).
pub(crate) fn build_agent_and_testbed(what: &str, release: bool) -> anyhow::Result<()> {
    if !beamlit_testbed::require_privileges() {
        bail!("the {what} loads eBPF programs and creates network namespaces: run it as root");
    }
    let mut args = vec![
        "build",
        "-p",
        "beamlit-agent",
        "-p",
        "beamlit-testbed",
        "--bins",
    ];
    if release {
        args.push("--release");
    }
    cargo(&args)?;
    let dir = project_root()
        .join("target")
        .join(if release { "release" } else { "debug" });
    // SAFETY: called before any thread is started; the test bed reads these when it starts
    // processes.
    unsafe {
        std::env::set_var("BEAMLIT_AGENT_BIN", dir.join("beamlit-agent"));
        std::env::set_var("BEAMLIT_NETPROBE_BIN", dir.join("netprobe"));
        std::env::set_var("BEAMLIT_FAKEBEAMLIT_BIN", dir.join("fakebeamlit"));
    }
    Ok(())
}

pub(crate) struct Cmd(Command);

pub(crate) fn cmd(program: &str, args: &[&str]) -> Cmd {
    let mut c = Command::new(program);
    c.args(args);
    Cmd(c)
}

impl Cmd {
    pub(crate) fn run(mut self) -> anyhow::Result<()> {
        run_status(&mut self.0)
    }
}

pub(crate) fn run_status(c: &mut Command) -> anyhow::Result<()> {
    let status: ExitStatus = c.status().with_context(|| format!("starting {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
