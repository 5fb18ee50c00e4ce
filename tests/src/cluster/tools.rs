//! Pinned Kubernetes binaries, built from their Go modules into a cache outside
//! the repository (the node components other than Kubernetes' own are in
//! [`super::node_tools`]).
//!
//! The versions below are the only pins. `xtask/kube-tools/go.mod` (generated from
//! them, committed together with its `go.sum`) requires `k8s.io/kubernetes` and
//! pins every `k8s.io/*` staging module to the matching `v0.X.Y`; kube-apiserver,
//! kube-controller-manager, kubectl, kube-scheduler, kubelet, kube-proxy and etcd (the `go.etcd.io/etcd/server/v3`
//! version Kubernetes itself requires) are built from that one module graph.
//! helm is built with `go install helm.sh/helm/v3/cmd/helm@<version>`, i.e. from
//! helm's own go.mod/go.sum, exactly as upstream resolves it.
//!
//! Binaries land in `~/.cache/beamlit/bin/k8s-<v>-helm-<v>/` (override the root
//! with `BEAMLIT_CACHE_DIR`); a stamp file written last marks a complete build,
//! so a second call only checks that the files are there.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Kubernetes release: kube-apiserver, kube-controller-manager and kubectl.
pub const KUBERNETES_VERSION: &str = "v1.37.2";
/// Helm 3 release (its go.mod requires the same Kubernetes minor, 0.37).
pub const HELM_VERSION: &str = "v3.22.0";

const STAMP: &str = ".complete";
/// Bump when the build recipe (flags, targets) changes: a cache built by an
/// older recipe is rebuilt (cheaply, from Go's own build cache).
const RECIPE: u32 = 2;

/// Paths of the pinned binaries in the cache.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    dir: PathBuf,
}

/// One binary and the Go package it is built from.
struct Target {
    name: &'static str,
    package: &'static str,
}

const MODULE_TARGETS: [Target; 7] = [
    Target {
        name: "etcd",
        package: "go.etcd.io/etcd/server/v3",
    },
    Target {
        name: "kube-apiserver",
        package: "k8s.io/kubernetes/cmd/kube-apiserver",
    },
    Target {
        name: "kube-controller-manager",
        package: "k8s.io/kubernetes/cmd/kube-controller-manager",
    },
    Target {
        name: "kubectl",
        package: "k8s.io/kubernetes/cmd/kubectl",
    },
    // Real nodes (`cluster::real_nodes`): the same Kubernetes version as the control plane.
    Target {
        name: "kube-scheduler",
        package: "k8s.io/kubernetes/cmd/kube-scheduler",
    },
    Target {
        name: "kubelet",
        package: "k8s.io/kubernetes/cmd/kubelet",
    },
    Target {
        name: "kube-proxy",
        package: "k8s.io/kubernetes/cmd/kube-proxy",
    },
];

impl KubeBinaries {
    /// The cache directory for the pinned versions (whether or not it is built).
    pub fn cache_dir() -> Result<PathBuf> {
        Ok(cache_root()?
            .join("bin")
            .join(format!("k8s-{KUBERNETES_VERSION}-helm-{HELM_VERSION}")))
    }

    /// The cached binaries if a complete build is there.
    pub fn find() -> Result<Option<Self>> {
        let dir = Self::cache_dir()?;
        let bins = Self { dir };
        Ok(bins.complete().then_some(bins))
    }

    /// Builds what is missing (printing progress) and returns the binaries; with
    /// a warm cache this only checks files. Concurrent callers (parallel test
    /// binaries) serialize on a lock file, so the build runs once.
    pub fn ensure() -> Result<Self> {
        if let Some(bins) = Self::find()? {
            return Ok(bins);
        }
        let dir = Self::cache_dir()?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let _lock = FileLock::acquire(&dir.join(".lock"))?;
        let bins = Self { dir };
        if bins.complete() {
            return Ok(bins);
        }
        bins.build()?;
        Ok(bins)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn etcd(&self) -> PathBuf {
        self.dir.join("etcd")
    }

    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join("kube-apiserver")
    }

    pub fn kube_controller_manager(&self) -> PathBuf {
        self.dir.join("kube-controller-manager")
    }

    pub fn kubectl(&self) -> PathBuf {
        self.dir.join("kubectl")
    }

    pub fn kube_scheduler(&self) -> PathBuf {
        self.dir.join("kube-scheduler")
    }

    pub fn kubelet(&self) -> PathBuf {
        self.dir.join("kubelet")
    }

    pub fn kube_proxy(&self) -> PathBuf {
        self.dir.join("kube-proxy")
    }

    pub fn helm(&self) -> PathBuf {
        self.dir.join("helm")
    }

    fn names() -> impl Iterator<Item = &'static str> {
        MODULE_TARGETS.iter().map(|t| t.name).chain(["helm"])
    }

    fn complete(&self) -> bool {
        std::fs::read_to_string(self.dir.join(STAMP)).is_ok_and(|s| s.starts_with(&stamp_head()))
            && Self::names().all(|n| self.dir.join(n).is_file())
    }

    fn build(&self) -> Result<()> {
        let started = Instant::now();
        // A stamp from another recipe: nothing in the directory can be trusted. (The same
        // recipe with targets added keeps what it built and builds the rest.)
        let stamp = std::fs::read_to_string(self.dir.join(STAMP)).unwrap_or_default();
        if !stamp.is_empty() && !stamp.starts_with(&stamp_head()) {
            for n in Self::names().chain([STAMP]) {
                let _ = std::fs::remove_file(self.dir.join(n));
            }
        }
        let go = go_version()?;
        let module = go_module_dir();
        println!(
            "[cluster] building Kubernetes {KUBERNETES_VERSION} and helm {HELM_VERSION} with {go} into {}",
            self.dir.display()
        );
        println!(
            "[cluster] (a cold build takes about 10 minutes on 2 cores; later calls reuse the cache)"
        );
        ensure_go_module(&module)?;
        let total = MODULE_TARGETS.len() + 1;
        for (i, t) in MODULE_TARGETS.iter().enumerate() {
            let out = self.dir.join(t.name);
            if out.is_file() {
                println!("[cluster] ({}/{total}) {} already built", i + 1, t.name);
                continue;
            }
            let ldflags = match t.name {
                "etcd" => "-s -w".to_string(),
                _ => kube_ldflags(),
            };
            let step = Instant::now();
            println!("[cluster] ({}/{total}) building {} ...", i + 1, t.name);
            let tmp = self.dir.join(format!(".{}.tmp", t.name));
            let mut cmd = go_command();
            cmd.current_dir(&module).args([
                "build",
                "-p",
                "2",
                "-trimpath",
                &format!("-ldflags={ldflags}"),
                "-o",
            ]);
            cmd.arg(&tmp).arg(t.package);
            run_build(&mut cmd).with_context(|| format!("building {}", t.package))?;
            std::fs::rename(&tmp, &out)
                .with_context(|| format!("moving {} into place", out.display()))?;
            println!(
                "[cluster] ({}/{total}) {} built in {:.0?}",
                i + 1,
                t.name,
                step.elapsed()
            );
        }
        if !self.helm().is_file() {
            let step = Instant::now();
            println!("[cluster] ({total}/{total}) building helm {HELM_VERSION} ...");
            // `go install pkg@version` builds in module-aware mode from helm's own
            // go.mod, ignoring any module in the working directory.
            let gobin = self.dir.join(".helm-gobin");
            std::fs::create_dir_all(&gobin)?;
            let mut cmd = go_command();
            cmd.current_dir(&self.dir).env("GOBIN", &gobin).args([
                "install",
                "-p",
                "2",
                "-trimpath",
                &format!("-ldflags={}", helm_ldflags()),
                &format!("helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"),
            ]);
            run_build(&mut cmd).context("building helm")?;
            std::fs::rename(gobin.join("helm"), self.helm()).context("moving helm into place")?;
            let _ = std::fs::remove_dir(&gobin);
            println!(
                "[cluster] ({total}/{total}) helm built in {:.0?}",
                step.elapsed()
            );
        }
        let mut stamp = File::create(self.dir.join(STAMP))?;
        writeln!(stamp, "{}{go}", stamp_head())?;
        println!(
            "[cluster] binaries ready in {} (took {:.0?})",
            self.dir.display(),
            started.elapsed()
        );
        Ok(())
    }
}

/// `BEAMLIT_CACHE_DIR`, default `~/.cache/beamlit`: every built binary lives below it.
pub fn cache_root() -> Result<PathBuf> {
    Ok(match std::env::var_os("BEAMLIT_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            PathBuf::from(home).join(".cache/beamlit")
        }
    })
}

/// `xtask/kube-tools` in this repository.
pub fn go_module_dir() -> PathBuf {
    crate::cluster::workspace_root().join("xtask/kube-tools")
}

fn stamp_head() -> String {
    format!("recipe {RECIPE}\nkubernetes {KUBERNETES_VERSION}\nhelm {HELM_VERSION}\n")
}

/// ("1", "37") from `v1.37.2`.
fn kube_major_minor() -> (&'static str, &'static str) {
    KUBERNETES_VERSION
        .trim_start_matches('v')
        .split_once('.')
        .map(|(maj, rest)| (maj, rest.split('.').next().unwrap_or("0")))
        .unwrap_or(("1", "0"))
}

/// What helm's Makefile sets: its version, and the Kubernetes version it
/// assumes offline (`helm template`, `helm lint`), which upstream derives from
/// the client-go it is built with (0.37 → 1.37, the same minor as ours).
fn helm_ldflags() -> String {
    let (major, minor) = kube_major_minor();
    let mut f = format!(
        "-s -w -X helm.sh/helm/v3/internal/version.version={HELM_VERSION} \
         -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    );
    for pkg in [
        "helm.sh/helm/v3/pkg/lint/rules",
        "helm.sh/helm/v3/pkg/chartutil",
    ] {
        f.push_str(&format!(
            " -X {pkg}.k8sVersionMajor={major} -X {pkg}.k8sVersionMinor={minor}"
        ));
    }
    f
}

/// Version stamps kube-* binaries report (`kubectl version`, `/version`); the
/// Makefile of Kubernetes sets the same variables.
fn kube_ldflags() -> String {
    let pkg = "k8s.io/component-base/version";
    let (major, minor) = kube_major_minor();
    format!(
        "-s -w -X {pkg}.gitVersion={KUBERNETES_VERSION} -X {pkg}.gitMajor={major} \
         -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
    )
}

/// `nice -n 19 go ...`: the build must not disturb timing-sensitive tests.
pub(crate) fn go_command() -> Command {
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "19", "go"])
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-buildvcs=false")
        // Never fetch another Go toolchain: the machine's go is the one we use.
        .env("GOTOOLCHAIN", "local")
        .stdin(Stdio::null());
    cmd
}

pub(crate) fn run_build(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {cmd:?} (is Go installed?)"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn go_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?} (is Go installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn go_version() -> Result<String> {
    let mut cmd = Command::new("go");
    cmd.arg("version").env("GOTOOLCHAIN", "local");
    go_output(&mut cmd)
        .context("Go is needed to build the pinned Kubernetes binaries")
        .map(|v| v.trim_start_matches("go version ").to_string())
}

/// Regenerates `go.mod` (and, through `go mod tidy`, `go.sum`) when it does not
/// pin [`KUBERNETES_VERSION`] yet; otherwise the committed files are used as they are.
fn ensure_go_module(dir: &Path) -> Result<()> {
    let go_mod = dir.join("go.mod");
    let pin = format!("k8s.io/kubernetes {KUBERNETES_VERSION}");
    let current = std::fs::read_to_string(&go_mod).unwrap_or_default();
    if pins(&current, &pin) && dir.join("go.sum").is_file() {
        return Ok(());
    }
    println!(
        "[cluster] generating {} for {KUBERNETES_VERSION}",
        go_mod.display()
    );
    std::fs::create_dir_all(dir)?;
    let staging = staging_modules()?;
    std::fs::write(&go_mod, render_go_mod(&staging))?;
    let _ = std::fs::remove_file(dir.join("go.sum"));
    let mut tidy = go_command();
    tidy.current_dir(dir).args(["mod", "tidy"]);
    run_build(&mut tidy).context("go mod tidy in xtask/kube-tools")
}

/// Whether go.mod text requires `pin` ("module version"), alone or in a block,
/// with or without a `// indirect` comment (tidy marks tool-only requirements so).
fn pins(go_mod: &str, pin: &str) -> bool {
    go_mod.lines().any(|l| {
        let l = l.split("//").next().unwrap_or("").trim();
        l.strip_prefix("require ").unwrap_or(l).trim() == pin
    })
}

/// The `k8s.io/*` modules that `k8s.io/kubernetes` requires as `v0.0.0` (its
/// staging directory, replaced by a path upstream): each needs a `replace` to
/// the published `v0.<minor>.<patch>`.
fn staging_modules() -> Result<Vec<String>> {
    let info = kubernetes_module()?;
    let gomod = info["GoMod"]
        .as_str()
        .context("go mod download printed no GoMod path")?;
    let text = std::fs::read_to_string(gomod).with_context(|| format!("reading {gomod}"))?;
    let mods: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (m, v) = (f.next()?, f.next()?);
            (m.starts_with("k8s.io/") && v == "v0.0.0").then(|| m.to_string())
        })
        .collect();
    if mods.is_empty() {
        bail!("found no staging modules in k8s.io/kubernetes {KUBERNETES_VERSION}'s go.mod");
    }
    Ok(mods)
}

/// `go mod download -json k8s.io/kubernetes@<pinned>`: where the module's source (`Dir`) and
/// its go.mod (`GoMod`) are in Go's module cache.
pub(crate) fn kubernetes_module() -> Result<serde_json::Value> {
    let mut cmd = Command::new("go");
    cmd.args([
        "mod",
        "download",
        "-json",
        &format!("k8s.io/kubernetes@{KUBERNETES_VERSION}"),
    ])
    .env("GOTOOLCHAIN", "local")
    .env("GOFLAGS", "-mod=mod")
    .current_dir(std::env::temp_dir());
    let json = go_output(&mut cmd)?;
    serde_json::from_str(&json).context("parsing go mod download")
}

fn render_go_mod(staging: &[String]) -> String {
    let staging_version = KUBERNETES_VERSION.replacen("v1.", "v0.", 1);
    let mut s = String::from(
        "// Generated by `cargo xtask cluster build` from the versions pinned in\n\
         // tests/src/cluster/tools.rs; edit those, not this file. go.sum is written by\n\
         // `go mod tidy` and committed, so every build verifies the same checksums.\n\
         module beamlit.dev/kube-tools\n\ngo 1.26.0\n\ntool (\n",
    );
    for t in &MODULE_TARGETS {
        s.push_str(&format!("\t{}\n", t.package));
    }
    s.push_str(&format!(
        ")\n\nrequire k8s.io/kubernetes {KUBERNETES_VERSION}\n\nreplace (\n"
    ));
    for m in staging {
        s.push_str(&format!("\t{m} => {m} {staging_version}\n"));
    }
    s.push_str(")\n");
    s
}

/// An exclusive `flock` held until drop.
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> Result<Self> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_mod_pins_staging_to_matching_minor() {
        let s = render_go_mod(&["k8s.io/api".into(), "k8s.io/client-go".into()]);
        assert!(s.contains("require k8s.io/kubernetes v1.37.2\n"));
        assert!(s.contains("\tk8s.io/api => k8s.io/api v0.37.2\n"));
        assert!(s.contains("\tk8s.io/kubernetes/cmd/kube-apiserver\n"));
    }

    #[test]
    fn ldflags_carry_version() {
        let f = kube_ldflags();
        assert!(f.contains("gitVersion=v1.37.2"));
        assert!(f.contains("gitMajor=1 "));
        assert!(f.contains("gitMinor=37 "));
    }

    #[test]
    fn pin_detection() {
        let pin = "k8s.io/kubernetes v1.37.2";
        assert!(pins("require k8s.io/kubernetes v1.37.2\n", pin));
        assert!(pins(
            "require (\n\tk8s.io/kubernetes v1.37.2 // indirect\n)\n",
            pin
        ));
        assert!(!pins("\tk8s.io/kubernetes v1.37.1 // indirect\n", pin));
        assert!(!pins("// k8s.io/kubernetes v1.37.2\n", pin));
    }

    #[test]
    fn committed_go_mod_matches_pin() {
        let text = std::fs::read_to_string(go_module_dir().join("go.mod")).unwrap_or_default();
        assert!(
            pins(&text, &format!("k8s.io/kubernetes {KUBERNETES_VERSION}")),
            "xtask/kube-tools/go.mod is stale: run `cargo xtask cluster build`"
        );
    }
}
