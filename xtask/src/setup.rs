//! `cargo xtask setup`: everything the build and the tests need on a fresh Debian machine,
//! installed idempotently. Heavy artifacts live outside the repository (rustup's toolchains,
//! `~/.cargo/bin/bpf-linker`), so a second run finds them and does nothing.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{cmd, project_root};

/// Debian packages: LLVM 22 for bpf-linker (build and run time), and the tools the tests,
/// benchmarks and users' debugging rely on.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "nftables",
    "nginx",
    "wrk",
    // `cargo xtask bench tunnel`: the second reverse proxy beside nginx.
    "haproxy",
    "curl",
    "prometheus",
    // `cargo xtask images`: the CA bundle the images carry, and strip for their binaries.
    "ca-certificates",
    "binutils",
    // Real nodes: runc's seccomp support (cgo), the static pause binary, busybox for the
    // curl image's shell, unshare/nsenter for the node namespaces.
    "libseccomp-dev",
    "gcc",
    "libc6-dev",
    "busybox-static",
    "util-linux",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// One step of `setup`: what it is, what it costs when it has work to do, and the check-then-do
/// function. The costs were measured by a cold `cargo xtask setup` on a fresh 2-core Debian
/// machine (apt 20 s, the nightly 13 s, bpf-linker 47 s, Kubernetes 672 s, nodes 458 s); they are
/// printed before each step starts, so that a first run says what it is waiting for instead of
/// going quiet for minutes. A later run finds everything and only checks.
struct Step {
    name: &'static str,
    when_needed: &'static str,
    run: fn() -> anyhow::Result<String>,
}

const STEPS: &[Step] = &[
    Step {
        name: "apt packages",
        when_needed: "installing the missing ones takes about 20 s",
        run: apt_packages,
    },
    Step {
        name: "rust toolchains",
        when_needed: "installing a missing one takes about 15 s",
        run: rust_toolchains,
    },
    Step {
        name: "bpf-linker",
        when_needed: "building it takes about 1 min, once",
        run: bpf_linker,
    },
    Step {
        name: "bpffs",
        when_needed: "a mount, instant",
        run: bpffs,
    },
    Step {
        // The real control plane for the cluster tests.
        name: "kubernetes binaries",
        when_needed: "building them from source takes about 11 min, once",
        run: || crate::cluster::ensure_binaries().map(|dir| format!("in {}", dir.display())),
    },
    Step {
        // containerd, runc, CNI plugins, CoreDNS, metrics-server, registry, pause (real nodes).
        name: "node binaries",
        when_needed: "building them from source takes about 8 min, once",
        run: || {
            beamlit_testbed::cluster::node_tools::NodeBinaries::ensure()
                .map(|b| format!("in {}", b.dir().display()))
        },
    },
];

/// What the whole of `setup` costs on a fresh machine (the sum of the steps above, rounded).
const FIRST_RUN: &str = "about 20 min on a fresh 2-core machine, a few seconds once done";

pub fn setup() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    println!(
        "[setup] {} steps, each checked first and done only if needed ({FIRST_RUN})",
        STEPS.len()
    );
    for (i, step) in STEPS.iter().enumerate() {
        let n = format!("({}/{})", i + 1, STEPS.len());
        println!("[setup] {n} {}: checking ({})", step.name, step.when_needed);
        let step_started = std::time::Instant::now();
        let outcome = (step.run)().with_context(|| format!("setup step `{}` failed", step.name))?;
        println!(
            "[setup] {n} {}: {outcome} ({:.1}s)",
            step.name,
            step_started.elapsed().as_secs_f64()
        );
    }
    println!("[setup] done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn apt_packages() -> anyhow::Result<String> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(format!("all {} present", APT_PACKAGES.len()));
    }
    if !crate::is_root() {
        bail!(
            "missing {}; run as root, or install them: apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    println!("[setup] installing {} with apt-get", missing.join(" "));
    cmd("apt-get", &["update", "-q"]).run()?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    crate::run_status(&mut install)?;
    Ok(format!("installed {}", missing.join(" ")))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The two pinned toolchains: the workspace's stable (rust-toolchain.toml) and the eBPF
/// crate's nightly with rust-src (agent-ebpf/rust-toolchain.toml).
fn rust_toolchains() -> anyhow::Result<String> {
    let root = project_root();
    let mut done = Vec::new();
    for file in ["rust-toolchain.toml", "agent-ebpf/rust-toolchain.toml"] {
        let (channel, components) = read_toolchain(&root.join(file))?;
        let installed = Command::new("rustup")
            .args(["run", &channel, "rustc", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let have_components = installed && components_present(&channel, &components);
        if have_components {
            done.push(format!("{channel} present"));
            continue;
        }
        let mut args = vec!["toolchain", "install", &channel, "--profile", "minimal"];
        for c in &components {
            args.extend(["--component", c.as_str()]);
        }
        cmd("rustup", &args).run()?;
        done.push(format!("{channel} installed"));
    }
    Ok(done.join(", "))
}

fn components_present(channel: &str, components: &[String]) -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", channel])
        .output()
    else {
        return false;
    };
    let list = String::from_utf8_lossy(&out.stdout);
    components
        .iter()
        .all(|c| list.lines().any(|l| l.starts_with(c.as_str())))
}

/// `channel` and `components` of a rust-toolchain.toml (the subset of TOML those files use).
pub fn read_toolchain(path: &Path) -> anyhow::Result<(String, Vec<String>)> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value = |key: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(key))
            .filter_map(|r| r.trim().strip_prefix('='))
            .map(|v| v.trim().to_string())
            .next()
    };
    let channel = value("channel")
        .map(|v| v.trim_matches('"').to_string())
        .with_context(|| format!("no channel in {}", path.display()))?;
    let components = value("components")
        .map(|v| {
            v.trim_matches(['[', ']'])
                .split(',')
                .map(|c| c.trim().trim_matches('"').to_string())
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok((channel, components))
}

fn bpf_linker() -> anyhow::Result<String> {
    let home = std::env::var("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let linker = home.join("bin/bpf-linker");
    if let Ok(out) = Command::new(&linker).arg("--version").output()
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(format!("{BPF_LINKER_VERSION} present"));
    }
    println!("[setup] building bpf-linker {BPF_LINKER_VERSION} against {LLVM_PREFIX}");
    let stable = read_toolchain(&project_root().join("rust-toolchain.toml"))?.0;
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut install = Command::new("cargo");
    install
        .arg(format!("+{stable}"))
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // Without the llvm-22 bin dir first in PATH, llvm-sys looks in /usr and fails with
        // `unable to find library -lLLVM`.
        .env("PATH", path)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .current_dir(std::env::temp_dir());
    crate::run_status(&mut install)?;
    Ok(format!("{BPF_LINKER_VERSION} built"))
}

fn bpffs() -> anyhow::Result<String> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        return Ok("mounted".into());
    }
    if !crate::is_root() {
        return Ok("not mounted (needs root: mount -t bpf bpf /sys/fs/bpf)".into());
    }
    cmd("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).run()?;
    Ok("mounted /sys/fs/bpf".into())
}
