//! A fake Beamlit: the one test double of the test bed, standing in for the
//! remote SaaS the egress tunnel forwards to (which tests cannot reach).
//!
//! [`FakeBeamlit::start`] runs the `fakebeamlit` binary inside a network
//! namespace a test created, with a server certificate from a fresh
//! [`TestCa`]. It serves an OAuth2 client-credentials token endpoint, the
//! models API at `/v0/models` (in memory, always behind a bearer token; see
//! [`FakeStats::models`]), an HTTP echo, server-sent events, uploads,
//! `/status/<code>` and a raw TCP echo, over HTTPS (h2 and http/1.1 by ALPN)
//! and plain HTTP/1.1.
//!
//! Tests never talk to it from the host namespace: what it saw is read from
//! the stats file it rewrites atomically after every request
//! ([`FakeBeamlit::stats`]), and clients run inside test namespaces.
//!
//! ```no_run
//! use beamlit_testbed::fake_beamlit::{FakeBeamlit, FakeBeamlitOptions};
//! use beamlit_testbed::{Topology, require_privileges};
//! # fn main() -> anyhow::Result<()> {
//! if !require_privileges() {
//!     return Ok(());
//! }
//! let mut topo = Topology::new("fake")?;
//! let client = topo.add_pod("client")?;
//! let remote = topo.add_pod("remote")?;
//! let fake = FakeBeamlit::start(
//!     &remote.netns,
//!     FakeBeamlitOptions {
//!         https: vec![(remote.ipv4, 443).into()],
//!         require_token: true,
//!         ..Default::default()
//!     },
//! )?;
//! let out = client
//!     .netns
//!     .run(&["curl", "-sS", "--cacert", &fake.ca_pem().display().to_string(),
//!            "-u", "beamlit-test-client:beamlit-test-secret",
//!            "-d", "grant_type=client_credentials", &fake.https_url("/oauth/token")?])?;
//! assert!(out.contains("tok-1"));
//! assert_eq!(fake.stats()?.token_requests, 1);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::netns::Netns;
use crate::process::{ChildGuard, spawn};
use crate::tempdir::TestDir;
use crate::tls::TestCa;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STATS_FILE: &str = "stats.json";
const READY_FILE: &str = "ready.json";
const LOG_FILE: &str = "fakebeamlit.log";

/// What the fake saw, as written to its `--stats-file` (JSON). Counters survive
/// [`FakeBeamlit::restart`]: the restarted process resumes from the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FakeStats {
    /// Requests to a token endpoint (any path ending in `/oauth/token`),
    /// whatever their outcome.
    pub token_requests: u64,
    /// Every HTTP request (token requests included), counted on arrival.
    pub requests: u64,
    /// `requests` per path (without the query string).
    pub requests_by_path: BTreeMap<String, u64>,
    /// Accepted connections on the `--tcp-echo` listeners.
    pub tcp_connections: u64,
    /// Body bytes received by the `/upload` endpoints (completed uploads).
    pub bytes_uploaded: u64,
    /// Every token handed out, oldest first (`tok-1`, `tok-2`, ...).
    pub tokens_issued: Vec<String>,
    /// When each token expires (ms since the Unix epoch). Kept in the file so a
    /// restarted fake still honours tokens issued before, like a real SaaS whose
    /// tokens outlive a server restart.
    pub token_expiry_unix_ms: BTreeMap<String, u64>,
    /// The models API's store: each model by name, as last created or updated
    /// (the JSON body the client sent). Kept across restarts, like tokens.
    pub models: BTreeMap<String, serde_json::Value>,
    /// Requests to the models API (`/v0/models...`) per method (`GET`, `POST`,
    /// `PUT`, `DELETE`), whatever their outcome (401 and injected failures
    /// included).
    pub model_requests: BTreeMap<String, u64>,
}

impl FakeStats {
    /// Requests seen for `path` (without query).
    pub fn path_count(&self, path: &str) -> u64 {
        self.requests_by_path.get(path).copied().unwrap_or(0)
    }

    /// Requests to the models API with `method` (`"PUT"`, ...).
    pub fn model_requests(&self, method: &str) -> u64 {
        self.model_requests.get(method).copied().unwrap_or(0)
    }
}

/// The addresses the fake actually listens on (port 0 resolved), as written to
/// its `--ready-file`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FakeAddresses {
    pub https: Vec<SocketAddr>,
    pub http: Vec<SocketAddr>,
    pub tcp_echo: Vec<SocketAddr>,
}

/// How to run the fake. At least one listener is required; `Default` has none,
/// the test OAuth client `beamlit-test-client` / `beamlit-test-secret`, a one
/// hour token lifetime and server name `beamlit.test`.
#[derive(Debug, Clone)]
pub struct FakeBeamlitOptions {
    /// TLS listeners (ALPN `h2` and `http/1.1`).
    pub https: Vec<SocketAddr>,
    /// Plain HTTP/1.1 listeners.
    pub http: Vec<SocketAddr>,
    /// Raw TCP echo listeners.
    pub tcp_echo: Vec<SocketAddr>,
    /// DNS names of the server certificate.
    pub server_names: Vec<String>,
    /// Extra IP addresses of the server certificate; the specified (non-
    /// wildcard) IPs of `https` are always included.
    pub server_ips: Vec<IpAddr>,
    pub client_id: String,
    pub client_secret: String,
    /// Whole seconds (the token endpoint's `expires_in` is in seconds).
    pub token_ttl: Duration,
    /// Every endpoint but the token endpoint demands a valid bearer token (the
    /// models API always does).
    pub require_token: bool,
    /// The models API answers this status (after checking the token) instead
    /// of doing anything, to test error handling. 200..=599.
    pub models_fail_status: Option<u16>,
}

impl Default for FakeBeamlitOptions {
    fn default() -> Self {
        Self {
            https: Vec::new(),
            http: Vec::new(),
            tcp_echo: Vec::new(),
            server_names: vec!["beamlit.test".to_string()],
            server_ips: Vec::new(),
            client_id: "beamlit-test-client".to_string(),
            client_secret: "beamlit-test-secret".to_string(),
            token_ttl: Duration::from_secs(3600),
            require_token: false,
            models_fail_status: None,
        }
    }
}

impl FakeBeamlitOptions {
    fn validate(&self) -> Result<()> {
        if self.https.is_empty() && self.http.is_empty() && self.tcp_echo.is_empty() {
            bail!("FakeBeamlitOptions: no listener (https, http or tcp_echo)");
        }
        if self.token_ttl.subsec_nanos() != 0 {
            bail!(
                "FakeBeamlitOptions: token_ttl {:?} is not whole seconds (OAuth expires_in is in seconds)",
                self.token_ttl
            );
        }
        if let Some(code) = self.models_fail_status
            && !(200..=599).contains(&code)
        {
            bail!("FakeBeamlitOptions: models_fail_status {code} is not in 200..=599");
        }
        Ok(())
    }

    fn cert_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .https
            .iter()
            .map(SocketAddr::ip)
            .filter(|ip| !ip.is_unspecified())
            .chain(self.server_ips.iter().copied())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

/// A running fake Beamlit; killed (and its files removed) on drop.
#[derive(Debug)]
pub struct FakeBeamlit {
    /// `None` while stopped.
    child: Option<ChildGuard>,
    /// Namespace name, so [`Self::restart`] needs no borrow of the [`Netns`].
    netns: String,
    /// Arguments after the binary, with the addresses actually bound.
    args: Vec<OsString>,
    bin: PathBuf,
    addresses: FakeAddresses,
    ca_pem: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    opts: FakeBeamlitOptions,
    /// Last: removed after the child is dead (fields drop in order).
    dir: TestDir,
}

impl FakeBeamlit {
    /// Starts the fake in `ns` with a server certificate from a new [`TestCa`]
    /// (see [`Self::ca_pem`]), and returns once every listener is bound.
    pub fn start(ns: &Netns, opts: FakeBeamlitOptions) -> Result<Self> {
        opts.validate()?;
        let dir = TestDir::new("fakebeamlit")?;
        let ca = TestCa::new(dir.path())?;
        // Only its certificate file is needed from here on; the CA key is dropped.
        Self::start_in(ns, opts, dir, &ca)
    }

    /// Like [`Self::start`], with a certificate issued by `ca` (e.g. one the
    /// agent under test is already configured to trust). The certificate files
    /// are written in `ca`'s directory, which must outlive the fake
    /// ([`Self::restart`] reads them again).
    pub fn start_with_ca(ns: &Netns, opts: FakeBeamlitOptions, ca: &TestCa) -> Result<Self> {
        opts.validate()?;
        let dir = TestDir::new("fakebeamlit")?;
        Self::start_in(ns, opts, dir, ca)
    }

    fn start_in(ns: &Netns, opts: FakeBeamlitOptions, dir: TestDir, ca: &TestCa) -> Result<Self> {
        let names: Vec<&str> = opts.server_names.iter().map(String::as_str).collect();
        let (cert, key) = ca
            .issue_server_cert(&names, &opts.cert_ips())
            .context("issuing the fake Beamlit's server certificate")?;
        let requested = FakeAddresses {
            https: opts.https.clone(),
            http: opts.http.clone(),
            tcp_echo: opts.tcp_echo.clone(),
        };
        let mut fake = Self {
            child: None,
            netns: ns.name().to_string(),
            args: Vec::new(),
            bin: try_fakebeamlit_bin()?,
            addresses: requested,
            ca_pem: ca.ca_pem_path().to_path_buf(),
            cert,
            key,
            opts,
            dir,
        };
        fake.args = fake.build_args();
        let child = fake.spawn_and_wait(ns.cmd(&fake.bin))?;
        fake.child = Some(child);
        // Port 0 resolved: a restart must rebind exactly these.
        fake.args = fake.build_args();
        Ok(fake)
    }

    fn build_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            a.push(k.into());
            a.push(v);
        };
        for addr in &self.addresses.https {
            push("--https", addr.to_string().into());
        }
        for addr in &self.addresses.http {
            push("--http", addr.to_string().into());
        }
        for addr in &self.addresses.tcp_echo {
            push("--tcp-echo", addr.to_string().into());
        }
        push("--cert", self.cert.clone().into());
        push("--key", self.key.clone().into());
        push("--client-id", self.opts.client_id.clone().into());
        push("--client-secret", self.opts.client_secret.clone().into());
        push(
            "--token-ttl-secs",
            self.opts.token_ttl.as_secs().to_string().into(),
        );
        push("--stats-file", self.dir.join(STATS_FILE).into());
        push("--ready-file", self.dir.join(READY_FILE).into());
        if self.opts.require_token {
            a.push("--require-token".into());
        }
        if let Some(code) = self.opts.models_fail_status {
            a.push("--models-fail-status".into());
            a.push(code.to_string().into());
        }
        a
    }

    /// Spawns `cmd` (the binary wrapped in `ip netns exec`) with our arguments,
    /// output appended to the log file, and waits for the ready file.
    fn spawn_and_wait(&mut self, mut cmd: Command) -> Result<ChildGuard> {
        let ready = self.dir.join(READY_FILE);
        match std::fs::remove_file(&ready) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", ready.display())),
        }
        let log_path = self.dir.join(LOG_FILE);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        // A file rather than pipes: nothing has to drain it, and it survives
        // for post-mortems (`log()`) after the process died.
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = spawn(cmd, None)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match std::fs::read(&ready) {
                Ok(bytes) => {
                    self.addresses = serde_json::from_slice(&bytes)
                        .with_context(|| format!("parsing {}", ready.display()))?;
                    return Ok(child);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", ready.display())),
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "fakebeamlit in netns {} exited ({status}) before it was ready; log:\n{}",
                    self.netns,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                // ChildGuard's Drop kills it.
                bail!(
                    "fakebeamlit in netns {} not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.netns,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The current counters (the stats file, replaced atomically by the fake).
    pub fn stats(&self) -> Result<FakeStats> {
        let path = self.dir.join(STATS_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// The CA certificate clients must trust.
    pub fn ca_pem(&self) -> &Path {
        &self.ca_pem
    }

    /// The server certificate (leaf) and key files.
    pub fn server_cert(&self) -> (&Path, &Path) {
        (&self.cert, &self.key)
    }

    /// The bound addresses (ports resolved if 0 was asked for).
    pub fn addresses(&self) -> &FakeAddresses {
        &self.addresses
    }

    /// `https://<first https address><path>`; valid for TLS because the
    /// certificate carries the listen IPs.
    pub fn https_url(&self, path: &str) -> Result<String> {
        let addr = self
            .addresses
            .https
            .first()
            .context("the fake Beamlit has no https listener")?;
        Ok(format!("https://{addr}{path}"))
    }

    /// `http://<first http address><path>`.
    pub fn http_url(&self, path: &str) -> Result<String> {
        let addr = self
            .addresses
            .http
            .first()
            .context("the fake Beamlit has no http listener")?;
        Ok(format!("http://{addr}{path}"))
    }

    pub fn options(&self) -> &FakeBeamlitOptions {
        &self.opts
    }

    /// The directory holding the stats, ready and log files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the fake printed (stdout and stderr, one line per request),
    /// across restarts.
    pub fn log(&self) -> String {
        std::fs::read(self.dir.join(LOG_FILE))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the fake ("remote down"). Once this returns the process is reaped,
    /// so the kernel has closed its listeners: new connections are refused and
    /// the ports are free. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("stopping fakebeamlit")?;
        }
        Ok(())
    }

    /// Stops the fake if running and starts it again on the same addresses,
    /// with the same certificate, counters and tokens ("remote back").
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        // The same command `Netns::cmd` builds; rebuilt here so the guard does
        // not have to borrow the namespace for its whole life.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(&self.bin);
        let child = self.spawn_and_wait(cmd)?;
        self.child = Some(child);
        Ok(())
    }

    /// Restarts the fake with every token it issued forgotten, as if revoked:
    /// a client still holding one gets a 401 and must fetch a new one. Other
    /// counters and the models are kept.
    pub fn revoke_tokens(&mut self) -> Result<()> {
        self.stop()?;
        let mut stats = self.stats()?;
        stats.token_expiry_unix_ms.clear();
        let path = self.dir.join(STATS_FILE);
        std::fs::write(&path, serde_json::to_vec(&stats)?)
            .with_context(|| format!("writing {}", path.display()))?;
        self.restart()
    }
}

impl Drop for FakeBeamlit {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("beamlit-testbed: {e:#}");
        }
    }
}

/// Path of the `fakebeamlit` binary; panics with instructions if it is not built.
pub fn fakebeamlit_bin() -> PathBuf {
    try_fakebeamlit_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// `BEAMLIT_FAKEBEAMLIT_BIN`, else next to the test executable, the way
/// [`crate::try_netprobe_bin`] finds netprobe: `CARGO_BIN_EXE_*` only exists
/// for this package's own integration tests, and test binaries live in
/// `target/<profile>/deps/` while binaries are in `target/<profile>/`.
pub fn try_fakebeamlit_bin() -> Result<PathBuf> {
    const ENV: &str = "BEAMLIT_FAKEBEAMLIT_BIN";
    if let Some(p) = std::env::var_os(ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{ENV}={} does not name a file", p.display());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut searched = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("fakebeamlit");
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(candidate);
    }
    bail!(
        "`fakebeamlit` not found (looked at {searched:?}); run `cargo build -p beamlit-testbed --bins` first or set {ENV}"
    )
}
