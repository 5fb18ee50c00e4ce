//! Driving the `netprobe` binary (and locating the agent binary) from tests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use crate::netns::Netns;
use crate::process::{ChildGuard, spawn};

const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds probes with `--until-file`, whose run time the harness cannot predict.
const UNTIL_FILE_DEADLINE: Duration = Duration::from_secs(600);

/// `netprobe connect` output.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ProbeReport {
    pub attempts: u64,
    pub ok: u64,
    pub failed: u64,
    /// Successful attempts per server name.
    pub by_name: BTreeMap<String, u64>,
    /// Connections whose `getpeername` differed from the address connected to
    /// (only counted with `check_peer`).
    pub peer_mismatch: u64,
    /// The first few error messages.
    pub errors: Vec<String>,
    pub connect_us: LatencyStats,
}

/// Connect latency in microseconds over the successful connects.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct LatencyStats {
    pub avg: f64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl ProbeReport {
    /// Successful attempts answered by server `name`.
    pub fn count(&self, name: &str) -> u64 {
        self.by_name.get(name).copied().unwrap_or(0)
    }

    /// Parses the JSON `netprobe connect` prints, failing (with stderr) if the
    /// probe itself failed.
    pub fn from_output(out: &Output) -> Result<Self> {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "netprobe connect failed ({}): {}",
                out.status,
                stderr.trim()
            );
        }
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| {
                anyhow!("netprobe printed no report; stdout: {stdout:?}, stderr: {stderr:?}")
            })?;
        serde_json::from_str(line).with_context(|| format!("parsing netprobe report {line:?}"))
    }
}

/// Options of `netprobe connect`; `None` leaves netprobe's default.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub addr: SocketAddr,
    pub count: u64,
    pub interval_ms: Option<u64>,
    /// SO_MARK, set before connect.
    pub mark: Option<u32>,
    pub check_peer: bool,
    pub timeout_ms: Option<u64>,
    /// Loop (ignoring `count`) until this file exists.
    pub until_file: Option<PathBuf>,
    pub concurrency: Option<u32>,
    /// Speak HTTP (for servers started with `http`).
    pub http: bool,
    /// Print an `EACH <ms> ok <name>` / `EACH <ms> fail <error>` line per attempt as it ends.
    pub each: bool,
    /// How long [`run_probe`] waits before killing the probe; derived from the
    /// other options when `None`.
    pub deadline: Option<Duration>,
}

impl ProbeOptions {
    pub fn new(addr: SocketAddr, count: u64) -> Self {
        Self {
            addr,
            count,
            interval_ms: None,
            mark: None,
            check_peer: false,
            timeout_ms: None,
            until_file: None,
            concurrency: None,
            http: false,
            each: false,
            deadline: None,
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "connect".to_string(),
            "--addr".into(),
            self.addr.to_string(),
            "--count".into(),
            self.count.to_string(),
        ];
        if let Some(v) = self.interval_ms {
            a.extend(["--interval-ms".into(), v.to_string()]);
        }
        if let Some(v) = self.mark {
            a.extend(["--mark".into(), format!("{v:#x}")]);
        }
        if self.check_peer {
            a.push("--check-peer".into());
        }
        if let Some(v) = self.timeout_ms {
            a.extend(["--timeout-ms".into(), v.to_string()]);
        }
        if let Some(p) = &self.until_file {
            a.extend(["--until-file".into(), p.display().to_string()]);
        }
        if let Some(v) = self.concurrency {
            a.extend(["--concurrency".into(), v.to_string()]);
        }
        if self.http {
            a.push("--http".into());
        }
        if self.each {
            a.push("--each".into());
        }
        a
    }

    fn effective_deadline(&self) -> Duration {
        if let Some(d) = self.deadline {
            return d;
        }
        if self.until_file.is_some() {
            return UNTIL_FILE_DEADLINE;
        }
        let per_attempt = 2 * self.timeout_ms.unwrap_or(2000) + self.interval_ms.unwrap_or(0);
        let per_thread = self
            .count
            .div_ceil(u64::from(self.concurrency.unwrap_or(1).max(1)));
        Duration::from_millis(per_thread.saturating_mul(per_attempt)) + Duration::from_secs(30)
    }
}

/// `ip netns exec <ns> netprobe connect ...` with stdout/stderr piped.
pub fn probe_command(ns: &Netns, opts: &ProbeOptions) -> Result<Command> {
    let mut cmd = ns.cmd(try_netprobe_bin()?);
    cmd.args(opts.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// Runs a probe to completion in `ns` (and `cgroup`, where the eBPF programs
/// under test are attached) and returns its report.
pub fn run_probe(ns: &Netns, cgroup: Option<&Path>, opts: &ProbeOptions) -> Result<ProbeReport> {
    finish_probe(spawn_probe(ns, cgroup, opts)?, opts.effective_deadline())
}

/// Starts a probe in the background (e.g. with `until_file`, while the agent
/// is started or stopped); collect it with [`finish_probe`].
pub fn spawn_probe(ns: &Netns, cgroup: Option<&Path>, opts: &ProbeOptions) -> Result<ChildGuard> {
    spawn(probe_command(ns, opts)?, cgroup)
}

pub fn finish_probe(probe: ChildGuard, timeout: Duration) -> Result<ProbeReport> {
    ProbeReport::from_output(&probe.wait_with_output_timeout(timeout)?)
}

/// Starts `netprobe serve` in `ns` (and `cgroup`) answering with `name`, and
/// returns once it listens.
pub fn start_server(
    ns: &Netns,
    cgroup: Option<&Path>,
    listen: SocketAddr,
    name: &str,
    http: bool,
) -> Result<ChildGuard> {
    start_server_multi(ns, cgroup, &[listen], name, http)
}

/// Like [`start_server`] with several listen addresses in one process. IPv6
/// listeners are v6-only, so `0.0.0.0:P` and `[::]:P` can be combined.
pub fn start_server_multi(
    ns: &Netns,
    cgroup: Option<&Path>,
    listen: &[SocketAddr],
    name: &str,
    http: bool,
) -> Result<ChildGuard> {
    if listen.is_empty() {
        bail!("start_server_multi: no listen address");
    }
    let mut cmd = ns.cmd(try_netprobe_bin()?);
    cmd.arg("serve");
    for addr in listen {
        cmd.args(["--listen", &addr.to_string()]);
    }
    cmd.args(["--name", name]);
    if http {
        cmd.arg("--http");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = spawn(cmd, cgroup)?;
    guard.capture_stderr();
    let stdout = guard.take_stdout().context("server stdout not piped")?;

    // The reader keeps draining stdout after readiness so the server can never
    // block on a full pipe.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                // Nobody listens any more; keep draining.
                continue;
            }
        }
    });

    let deadline = Instant::now() + SERVER_READY_TIMEOUT;
    let mut ready = 0;
    while ready < listen.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("listening on ") => ready += 1,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "netprobe server {name} in {} not ready after {SERVER_READY_TIMEOUT:?}; stderr: {}",
                ns.name(),
                guard.stderr_text().trim()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = guard.wait_timeout(Duration::from_secs(2))?;
                bail!(
                    "netprobe server {name} in {} exited ({status:?}); stderr: {}",
                    ns.name(),
                    guard.stderr_text().trim()
                );
            }
        }
    }
    Ok(guard)
}

/// Path of the `netprobe` binary; panics with instructions if it is not built.
pub fn netprobe_bin() -> PathBuf {
    try_netprobe_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn try_netprobe_bin() -> Result<PathBuf> {
    locate(
        "netprobe",
        "BEAMLIT_NETPROBE_BIN",
        "cargo build -p beamlit-testbed --bins",
    )
}

/// Path of the `beamlit-agent` binary; panics with instructions if it is not built.
pub fn agent_bin() -> PathBuf {
    try_agent_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn try_agent_bin() -> Result<PathBuf> {
    locate(
        "beamlit-agent",
        "BEAMLIT_AGENT_BIN",
        "cargo build -p beamlit-agent --bins",
    )
}

pub fn controller_bin() -> PathBuf {
    locate(
        "beamlit-controller",
        "BEAMLIT_CONTROLLER_BIN",
        "cargo build -p beamlit-controller --bins",
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The `xtask` binary (for tests that run `cargo xtask demo` as a user would).
pub fn try_xtask_bin() -> Result<PathBuf> {
    locate("xtask", "BEAMLIT_XTASK_BIN", "cargo build -p xtask")
}

/// `CARGO_BIN_EXE_*` only exists for this package's own integration tests, so
/// other crates' tests find binaries next to their own executable: test
/// binaries live in `target/<profile>/deps/`, binaries in `target/<profile>/`.
fn locate(bin: &str, env: &str, build_hint: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{env}={} does not name a file", p.display());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut searched = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(bin);
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(candidate);
    }
    bail!("`{bin}` not found (looked at {searched:?}); run `{build_hint}` first or set {env}")
}
