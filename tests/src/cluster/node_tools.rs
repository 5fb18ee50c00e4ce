//! Pinned binaries of a real node and its add-ons, other than Kubernetes' own (kubelet,
//! kube-proxy and kube-scheduler come from the same module graph as the control plane, in
//! [`super::tools`]): containerd with its runc shim and `ctr`, runc, the CNI plugins, CoreDNS,
//! metrics-server, the registry (distribution) and the pause program.
//!
//! Each is built with `go install <package>@<version>`, i.e. from its own go.mod and go.sum,
//! exactly as upstream resolves it; pause is compiled from the C source in the pinned
//! `k8s.io/kubernetes` module. They land in `~/.cache/beamlit/bin/nodes-<recipe>/` (the root
//! follows `BEAMLIT_CACHE_DIR`), with a stamp written last, so a second call only checks files.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::tools::{FileLock, KUBERNETES_VERSION, go_command, run_build};

pub const CONTAINERD_VERSION: &str = "v2.4.2";
pub const RUNC_VERSION: &str = "v1.5.3";
pub const CNI_PLUGINS_VERSION: &str = "v1.10.0";
pub const COREDNS_VERSION: &str = "v1.15.0";
pub const METRICS_SERVER_VERSION: &str = "v0.8.0";
pub const DISTRIBUTION_VERSION: &str = "v3.1.2";
/// containerd 2.4's default sandbox image; the node pins it, the registry serves it.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.2";

/// Bump when the recipe changes (flags, targets, versions are in the stamp already).
const RECIPE: u32 = 1;
const STAMP: &str = ".complete";

/// One `go install` run: the binaries it produces, how to build them.
struct GoInstall {
    names: &'static [&'static str],
    packages: &'static [&'static str],
    version: &'static str,
    /// runc uses cgo for libseccomp (Debian's libseccomp-dev); everything else is static.
    cgo: bool,
    tags: &'static str,
}

const INSTALLS: &[GoInstall] = &[
    GoInstall {
        names: &["containerd", "containerd-shim-runc-v2", "ctr"],
        packages: &[
            "github.com/containerd/containerd/v2/cmd/containerd",
            "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
            "github.com/containerd/containerd/v2/cmd/ctr",
        ],
        version: CONTAINERD_VERSION,
        cgo: false,
        // btrfs needs cgo headers and is not used (the snapshotter is overlayfs).
        tags: "no_btrfs",
    },
    GoInstall {
        names: &["runc"],
        packages: &["github.com/opencontainers/runc"],
        version: RUNC_VERSION,
        cgo: true,
        tags: "seccomp",
    },
    GoInstall {
        names: &["bridge", "loopback", "host-local", "portmap"],
        packages: &[
            "github.com/containernetworking/plugins/plugins/main/bridge",
            "github.com/containernetworking/plugins/plugins/main/loopback",
            "github.com/containernetworking/plugins/plugins/ipam/host-local",
            "github.com/containernetworking/plugins/plugins/meta/portmap",
        ],
        version: CNI_PLUGINS_VERSION,
        cgo: false,
        tags: "",
    },
    GoInstall {
        names: &["registry"],
        packages: &["github.com/distribution/distribution/v3/cmd/registry"],
        version: DISTRIBUTION_VERSION,
        cgo: false,
        tags: "",
    },
    GoInstall {
        names: &["metrics-server"],
        packages: &["sigs.k8s.io/metrics-server/cmd/metrics-server"],
        version: METRICS_SERVER_VERSION,
        cgo: false,
        tags: "",
    },
    GoInstall {
        names: &["coredns"],
        packages: &["github.com/coredns/coredns"],
        version: COREDNS_VERSION,
        cgo: false,
        tags: "",
    },
];

/// The CNI plugins a node's `bin_dirs` needs.
pub const CNI_PLUGINS: [&str; 4] = ["bridge", "loopback", "host-local", "portmap"];

/// Paths of the node binaries in the cache.
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    dir: PathBuf,
}

impl NodeBinaries {
    pub fn cache_dir() -> Result<PathBuf> {
        Ok(super::tools::cache_root()?
            .join("bin")
            .join(format!("nodes-{RECIPE}")))
    }

    /// Builds what is missing (printing progress; serialized between processes by a lock
    /// file) and returns the binaries.
    pub fn ensure() -> Result<Self> {
        let dir = Self::cache_dir()?;
        let bins = Self { dir: dir.clone() };
        if bins.complete() {
            return Ok(bins);
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let _lock = FileLock::acquire(&dir.join(".lock"))?;
        if !bins.complete() {
            bins.build()?;
        }
        Ok(bins)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn names() -> impl Iterator<Item = &'static str> {
        INSTALLS
            .iter()
            .flat_map(|i| i.names.iter().copied())
            .chain(["pause"])
    }

    fn complete(&self) -> bool {
        std::fs::read_to_string(self.dir.join(STAMP)).is_ok_and(|s| s == stamp())
            && Self::names().all(|n| self.dir.join(n).is_file())
    }

    fn build(&self) -> Result<()> {
        let started = Instant::now();
        if self.dir.join(STAMP).exists() {
            for n in Self::names().chain([STAMP]) {
                let _ = std::fs::remove_file(self.dir.join(n));
            }
        }
        println!(
            "[nodes] building containerd {CONTAINERD_VERSION}, runc {RUNC_VERSION}, CNI plugins \
             {CNI_PLUGINS_VERSION}, registry {DISTRIBUTION_VERSION}, metrics-server \
             {METRICS_SERVER_VERSION}, CoreDNS {COREDNS_VERSION} and pause into {}",
            self.dir.display()
        );
        println!("[nodes] (a cold build takes about 8 minutes on 2 cores; later calls reuse it)");
        let total = INSTALLS.len() + 1;
        for (i, install) in INSTALLS.iter().enumerate() {
            let n = i + 1;
            if install.names.iter().all(|b| self.dir.join(b).is_file()) {
                println!(
                    "[nodes] ({n}/{total}) {} already built",
                    install.names.join(", ")
                );
                continue;
            }
            let step = Instant::now();
            println!(
                "[nodes] ({n}/{total}) building {} {} ...",
                install.names.join(", "),
                install.version
            );
            let gobin = self.dir.join(format!(".gobin-{n}"));
            let _ = std::fs::remove_dir_all(&gobin);
            std::fs::create_dir_all(&gobin)?;
            let mut cmd = go_command();
            cmd.current_dir(&self.dir)
                .env("GOBIN", &gobin)
                .env("CGO_ENABLED", if install.cgo { "1" } else { "0" })
                .args(["install", "-p", "2", "-trimpath", "-ldflags=-s -w"]);
            if !install.tags.is_empty() {
                cmd.arg(format!("-tags={}", install.tags));
            }
            for p in install.packages {
                cmd.arg(format!("{p}@{}", install.version));
            }
            run_build(&mut cmd).with_context(|| {
                if install.cgo {
                    format!(
                        "building {} (needs Debian's libseccomp-dev: cargo xtask setup)",
                        install.names.join(", ")
                    )
                } else {
                    format!("building {}", install.names.join(", "))
                }
            })?;
            for b in install.names {
                std::fs::rename(gobin.join(b), self.dir.join(b))
                    .with_context(|| format!("moving {b} into place"))?;
            }
            let _ = std::fs::remove_dir_all(&gobin);
            println!(
                "[nodes] ({n}/{total}) {} built in {:.0?}",
                install.names.join(", "),
                step.elapsed()
            );
        }
        if !self.dir.join("pause").is_file() {
            println!("[nodes] ({total}/{total}) compiling pause ...");
            build_pause(&self.dir.join("pause"))?;
        }
        File::create(self.dir.join(STAMP))?.write_all(stamp().as_bytes())?;
        println!(
            "[nodes] binaries ready in {} (took {:.0?})",
            self.dir.display(),
            started.elapsed()
        );
        Ok(())
    }
}

fn stamp() -> String {
    let mut s = format!("recipe {RECIPE}\nkubernetes {KUBERNETES_VERSION}\n");
    for i in INSTALLS {
        s.push_str(&format!("{} {}\n", i.names.join(","), i.version));
    }
    s
}

/// pause from `build/pause/linux/pause.c` of the pinned Kubernetes module, static, so its
/// image is one file.
fn build_pause(out: &Path) -> Result<()> {
    let info = super::tools::kubernetes_module()?;
    let dir = info["Dir"]
        .as_str()
        .context("go mod download printed no Dir")?;
    let source = Path::new(dir).join("build/pause/linux/pause.c");
    let tmp = out.with_extension("tmp");
    let status = Command::new("gcc")
        .args(["-Os", "-Wall", "-static", "-DVERSION=3.10.2", "-o"])
        .arg(&tmp)
        .arg(&source)
        .status()
        .context("running gcc (Debian's gcc and libc6-dev: cargo xtask setup)")?;
    if !status.success() {
        bail!("gcc {} failed: {status}", source.display());
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}
