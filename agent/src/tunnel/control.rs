//! The tunnel in a process of its own (`beamlit-agent tunnel`: the agent pod's unprivileged
//! container), driven by the agent over a unix socket in a volume both containers share. The
//! part that parses what pods send then runs as non-root with no capability (and, under the
//! runtime's default seccomp profile, without the bpf() syscall at all), while the agent keeps
//! the eBPF work and has no listener a pod can reach.
//!
//! The tunnel listens on the socket and the agent connects (the privileged side accepts
//! nothing). Newline-delimited JSON both ways:
//! - agent → tunnel: `hello`, then `update`s (the routes as [`super::Tunnel::update`] takes
//!   them, credentials included), and `flowAnswer`s;
//! - tunnel → agent: `ready` (after `hello`); `accepting` (the answer to an update: the tunnel
//!   addresses that accept); `flow` for each accepted connection: the agent looks the 4-tuple
//!   up in the `flows` map (and consumes it) and answers with the Service it was redirected
//!   from, or none, so the tunnel still serves only connections this node's eBPF redirected;
//!   and `beat` every 100 ms from the tunnel's runtime, which the agent writes into the data
//!   plane's heartbeat. A tunnel that dies or hangs stops beating, so its services fail open
//!   within 500 ms (`FLAG_TUNNEL_HEARTBEAT`), as with the tunnel in the agent's process.
//!
//! The socket lives in the pod's own volume, reachable by the pod's two containers only.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{self, Write as _},
    net::SocketAddr,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

use super::{
    Flows, Tunnel, TunnelConfig,
    backend::{Auth, Mode, OAuthClient, RemoteBackend, Scheme, Secret},
    flows::FlowTable,
    metrics::Metrics,
};

/// The longest message accepted (an update with every service of a full map fits).
const MAX_MESSAGE: usize = 64 << 20;
/// How long the agent waits for the tunnel's answer to a message.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the tunnel waits for the agent's answer about a connection's flow before refusing
/// the connection.
const FLOW_TIMEOUT: Duration = Duration::from_secs(2);
/// On SIGTERM: how long the tunnel process waits for the agent (stopping too) to take its
/// services off it, then how long open connections get to finish.
const STOP_AGENT_WAIT: Duration = Duration::from_secs(2);
const STOP_DRAIN: Duration = Duration::from_secs(5);
const PROTOCOL: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum ToTunnel {
    Hello {
        protocol: u32,
    },
    Update {
        id: u64,
        routes: Vec<WireRoute>,
        also_listen: Vec<SocketAddr>,
    },
    FlowAnswer {
        id: u64,
        service: Option<SocketAddr>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum FromTunnel {
    Ready,
    Accepting {
        id: u64,
        addresses: Vec<SocketAddr>,
    },
    Flow {
        id: u64,
        client: SocketAddr,
        tunnel: SocketAddr,
    },
    Beat,
    Error {
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireRoute {
    service: SocketAddr,
    tunnel: SocketAddr,
    backend: WireBackend,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireBackend {
    tcp: bool,
    https: bool,
    host: String,
    port: u16,
    path_prefix: String,
    headers: Vec<(String, String)>,
    auth: WireAuth,
    connect_timeout_ms: u64,
    header_timeout_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum WireAuth {
    None,
    Bearer {
        token: String,
    },
    #[serde(rename_all = "camelCase")]
    Oauth {
        token_url: String,
        client_id: String,
        client_secret: String,
    },
}

impl From<&RemoteBackend> for WireBackend {
    fn from(b: &RemoteBackend) -> Self {
        WireBackend {
            tcp: b.mode == Mode::Tcp,
            https: b.scheme == Scheme::Https,
            host: b.host.clone(),
            port: b.port,
            path_prefix: b.path_prefix.clone(),
            headers: b
                .headers_to_add
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            auth: match &b.auth {
                Auth::None => WireAuth::None,
                Auth::Bearer(token) => WireAuth::Bearer {
                    token: token.expose().to_string(),
                },
                Auth::OAuth(o) => WireAuth::Oauth {
                    token_url: o.token_url.to_string(),
                    client_id: o.client_id.clone(),
                    client_secret: o.client_secret.expose().to_string(),
                },
            },
            connect_timeout_ms: b.connect_timeout.as_millis() as u64,
            header_timeout_ms: b.header_timeout.as_millis() as u64,
        }
    }
}

impl TryFrom<WireBackend> for RemoteBackend {
    type Error = String;

    fn try_from(w: WireBackend) -> Result<Self, String> {
        let headers_to_add = w
            .headers
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    HeaderName::try_from(k.as_str()).map_err(|e| format!("header {k}: {e}"))?,
                    HeaderValue::try_from(v.as_str()).map_err(|e| format!("header {k}: {e}"))?,
                ))
            })
            .collect::<Result<_, String>>()?;
        Ok(RemoteBackend {
            mode: if w.tcp { Mode::Tcp } else { Mode::Http },
            scheme: if w.https { Scheme::Https } else { Scheme::Http },
            host: w.host,
            port: w.port,
            path_prefix: w.path_prefix,
            headers_to_add,
            auth: match w.auth {
                WireAuth::None => Auth::None,
                WireAuth::Bearer { token } => Auth::Bearer(Secret::new(token)),
                WireAuth::Oauth {
                    token_url,
                    client_id,
                    client_secret,
                } => Auth::OAuth(OAuthClient {
                    token_url: token_url
                        .parse()
                        .map_err(|e| format!("token URL {token_url}: {e}"))?,
                    client_id,
                    client_secret: Secret::new(client_secret),
                }),
            },
            connect_timeout: Duration::from_millis(w.connect_timeout_ms),
            header_timeout: Duration::from_millis(w.header_timeout_ms),
        })
    }
}

fn line<T: Serialize>(message: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(message).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

// ------------------------------------------------------------------ the agent's side

/// The agent's handle on a tunnel process: connects (again) when needed; every failure leaves
/// the tunnel's services not ready, so they fail open.
pub struct TunnelProcess {
    socket: PathBuf,
    bpffs_dir: PathBuf,
    conn: Option<Connection>,
    next_id: u64,
}

/// One connection to the tunnel process. Its reading and writing run on a thread of their own,
/// so that beats and flow answers never wait for the agent's main loop (a sync, a blocking
/// read of the cgroup tree): a tunnel whose beats are late by 500 ms fails open.
struct Connection {
    /// Lines to the tunnel (updates, flow answers).
    writer: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    answers: tokio::sync::mpsc::UnboundedReceiver<(u64, Vec<SocketAddr>)>,
    alive: Arc<std::sync::atomic::AtomicBool>,
    /// To end the thread: shutting the socket down ends its reader.
    socket: UnixStream,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

impl TunnelProcess {
    pub fn new(socket: PathBuf, bpffs_dir: PathBuf) -> Self {
        Self {
            socket,
            bpffs_dir,
            conn: None,
            next_id: 1,
        }
    }

    /// Whether the tunnel process is connected (the reader still runs). A `false` after an
    /// update means its services fail open until the next update reaches it.
    pub fn connected(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.alive.load(Ordering::Relaxed))
    }

    /// [`super::Tunnel::update`] in the tunnel process: the tunnel addresses that accept, or
    /// none if the process cannot be reached (its services then fail open).
    pub async fn update(
        &mut self,
        backends: &BTreeMap<SocketAddr, (SocketAddr, RemoteBackend)>,
        also_listen: &BTreeSet<SocketAddr>,
    ) -> BTreeSet<SocketAddr> {
        match self.try_update(backends, also_listen).await {
            Ok(accepting) => accepting,
            Err(e) => {
                warn!(
                    socket = %self.socket.display(),
                    "the tunnel process: {e}; its services fail open until it answers"
                );
                self.conn = None;
                BTreeSet::new()
            }
        }
    }

    async fn try_update(
        &mut self,
        backends: &BTreeMap<SocketAddr, (SocketAddr, RemoteBackend)>,
        also_listen: &BTreeSet<SocketAddr>,
    ) -> anyhow::Result<BTreeSet<SocketAddr>> {
        if !self.connected() {
            self.conn = Some(self.connect().await?);
            info!(socket = %self.socket.display(), "connected to the tunnel process");
        }
        let id = self.next_id;
        self.next_id += 1;
        let message = ToTunnel::Update {
            id,
            routes: backends
                .iter()
                .map(|(service, (tunnel, backend))| WireRoute {
                    service: *service,
                    tunnel: *tunnel,
                    backend: backend.into(),
                })
                .collect(),
            also_listen: also_listen.iter().copied().collect(),
        };
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("not connected"))?;
        conn.writer
            .send(line(&message))
            .map_err(|_| anyhow::anyhow!("the connection closed"))?;
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
            while let Some((answer_id, addresses)) = conn.answers.recv().await {
                if answer_id == id {
                    return Some(addresses);
                }
            }
            None
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {ANSWER_TIMEOUT:?}"))?
        .ok_or_else(|| anyhow::anyhow!("the connection closed"))?;
        Ok(answer.into_iter().collect())
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        let flows = FlowTable::open(&self.bpffs_dir)?;
        let maps = crate::maps::PinnedMaps::open(&self.bpffs_dir)?;
        let socket = self.socket.clone();
        // Blocking connect and hello: a local socket, answered at once (bounded by the timeout).
        let stream = (|| -> anyhow::Result<UnixStream> {
            let mut stream = UnixStream::connect(&socket)
                .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", socket.display()))?;
            stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
            stream.write_all(&line(&ToTunnel::Hello { protocol: PROTOCOL }))?;
            let bytes = read_first_line(&stream)?;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            match serde_json::from_str::<FromTunnel>(&text) {
                Ok(FromTunnel::Ready) => {}
                Ok(FromTunnel::Error { message }) => anyhow::bail!("refused: {message}"),
                other => anyhow::bail!("unexpected answer to hello: {other:?} ({text:?})"),
            }
            stream.set_read_timeout(None)?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        })()?;
        let control = stream.try_clone()?;
        let (writer, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
        let flow_answers = writer.clone();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let still = alive.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("tunnel-control".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else {
                        still.store(false, Ordering::Relaxed);
                        return;
                    };
                    let (read, mut write) = stream.into_split();
                    let writing = tokio::spawn(async move {
                        while let Some(bytes) = outgoing.recv().await {
                            if write.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    });
                    read_from_tunnel(read, maps, flows, tx, flow_answers).await;
                    writing.abort();
                    still.store(false, Ordering::Relaxed);
                });
            })?;
        Ok(Connection {
            writer,
            answers,
            alive,
            socket: control,
        })
    }
}

/// The agent's side of the connection: beats into the heartbeat, flow questions answered from
/// the `flows` map, update answers to the waiting [`TunnelProcess::update`].
async fn read_from_tunnel(
    read: tokio::net::unix::OwnedReadHalf,
    mut maps: crate::maps::PinnedMaps,
    flows: FlowTable,
    answers: tokio::sync::mpsc::UnboundedSender<(u64, Vec<SocketAddr>)>,
    to_tunnel: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
) {
    let mut lines = tokio::io::BufReader::new(read).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(text)) => match serde_json::from_str::<FromTunnel>(&text) {
                Ok(FromTunnel::Beat) => {
                    if let Err(e) = maps.beat() {
                        warn!("tunnel heartbeat: {e}");
                    }
                }
                Ok(FromTunnel::Flow { id, client, tunnel }) => {
                    let service = flows.take(client, tunnel);
                    let _ = to_tunnel.send(line(&ToTunnel::FlowAnswer { id, service }));
                }
                Ok(FromTunnel::Accepting { id, addresses }) => {
                    let _ = answers.send((id, addresses));
                }
                Ok(FromTunnel::Error { message }) => warn!("the tunnel process: {message}"),
                Ok(FromTunnel::Ready) => {}
                Err(e) => warn!("the tunnel process sent {text:?}: {e}"),
            },
            Ok(None) => {
                warn!(
                    "the tunnel process closed its control connection; its services fail open \
                     once its heartbeat is stale (500 ms)"
                );
                return;
            }
            Err(e) => {
                warn!("reading from the tunnel process: {e}");
                return;
            }
        }
    }
}

// ------------------------------------------------------------------ the tunnel's side

/// The tunnel process's line to the agent: where to send (the connected agent, if any) and the
/// flow questions waiting for an answer.
#[derive(Default)]
pub struct AgentLink {
    sender: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>>,
    pending: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Option<SocketAddr>>>>,
    next_id: AtomicU64,
}

impl AgentLink {
    fn send(&self, bytes: Vec<u8>) -> bool {
        self.sender
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|tx| tx.send(bytes).is_ok()))
            .unwrap_or(false)
    }

    /// The Service the connection `client` → `tunnel` was redirected from, as the agent reads
    /// (and consumes) it in the `flows` map; `None` when it was not redirected, or the agent
    /// does not answer within [`FLOW_TIMEOUT`]: the connection is then refused.
    pub async fn flow(&self, client: SocketAddr, tunnel: SocketAddr) -> Option<SocketAddr> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending.lock().ok()?.insert(id, tx);
        let answer = if self.send(line(&FromTunnel::Flow { id, client, tunnel })) {
            tokio::time::timeout(FLOW_TIMEOUT, rx)
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        } else {
            None
        };
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&id);
        }
        answer
    }

    fn answer(&self, id: u64, service: Option<SocketAddr>) {
        let waiting = self.pending.lock().ok().and_then(|mut p| p.remove(&id));
        if let Some(tx) = waiting {
            let _ = tx.send(service);
        }
    }

    /// Whether an agent is connected.
    fn connected(&self) -> bool {
        self.sender.lock().is_ok_and(|s| s.is_some())
    }

    fn connect(&self, tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) {
        if let Ok(mut s) = self.sender.lock() {
            *s = Some(tx);
        }
    }

    /// The agent is gone: no beats to send, and every waiting question is answered "no".
    fn disconnect(&self) {
        if let Ok(mut s) = self.sender.lock() {
            *s = None;
        }
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
    }
}

/// `beamlit-agent tunnel`: listens on `socket` for the agent and runs the tunnel it drives.
/// Serves one agent at a time (a restarted agent connects again and takes over); the tunnel,
/// its listeners and its connections outlive an agent's reconnection.
pub fn serve(socket: &Path, config: TunnelConfig, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", socket.display()))?;
    // The agent connects as root without CAP_DAC_OVERRIDE: the socket must be writable by
    // others. It lives in the pod's own volume, which only the pod's containers see.
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let link = Arc::new(AgentLink::default());
    let beats = link.clone();
    let beat = Box::new(move || {
        // No agent connected: nothing to tell (its services fail open meanwhile).
        let _ = beats.send(line(&FromTunnel::Beat));
        Ok(())
    });
    let tunnel = Tunnel::start_with(&config, metrics, Flows::Agent(link.clone()), 0, beat)?;
    let tunnel = Arc::new(tunnel);
    stop_on_sigterm(link.clone(), tunnel.clone())?;
    info!(socket = %socket.display(), "tunnel process: waiting for the agent");
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!("accepting the agent's connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Err(e) = hello(&stream) {
            warn!("the agent's hello: {e}");
            let _ = stream.write_all(&line(&FromTunnel::Error {
                message: e.to_string(),
            }));
            continue;
        }
        if let Err(e) = stream.write_all(&line(&FromTunnel::Ready)) {
            warn!("answering the agent: {e}");
            continue;
        }
        info!("the agent connected");
        let result = runtime.block_on(drive(stream, &tunnel, &link));
        link.disconnect();
        match result {
            Ok(()) => info!("the agent disconnected; the tunnel keeps its routes until it is back"),
            Err(e) => warn!("the agent's connection: {e}"),
        }
    }
    Ok(())
}

/// SIGTERM (the pod stopping): as PID 1 of its container the process would ignore it until the
/// grace period's SIGKILL. The agent, stopping too, takes this tunnel's services off it first
/// (they fail open to the local path); once it has disconnected (or after [`STOP_AGENT_WAIT`]),
/// open connections get [`STOP_DRAIN`] to finish, then the process exits.
fn stop_on_sigterm(link: Arc<AgentLink>, tunnel: Arc<Tunnel>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    warn!("cannot watch SIGTERM; the process stops at SIGKILL");
                    return;
                };
                term.recv().await;
                info!("SIGTERM: waiting for the agent to take the services off this tunnel");
                let started = std::time::Instant::now();
                while link.connected() && started.elapsed() < STOP_AGENT_WAIT {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let draining = std::time::Instant::now();
                while tunnel.open_connections() > 0 && draining.elapsed() < STOP_DRAIN {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                info!(
                    open_connections = tunnel.open_connections(),
                    "tunnel process stopping"
                );
                std::process::exit(0);
            });
        })?;
    Ok(())
}

/// The first line of a connection (`hello`, `ready`), read byte by byte so that nothing after
/// it is consumed here (what follows is read by the connection's buffered reader).
fn read_first_line(stream: &UnixStream) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while bytes.len() < 4096 {
        match io::Read::read(&mut &*stream, &mut byte)? {
            0 => anyhow::bail!("closed before its first line"),
            _ if byte[0] == b'\n' => return Ok(bytes),
            _ => bytes.push(byte[0]),
        }
    }
    anyhow::bail!("a first line over 4096 bytes")
}

/// The agent's `hello`.
fn hello(stream: &UnixStream) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let bytes = read_first_line(stream)?;
    stream.set_read_timeout(None)?;
    match serde_json::from_slice::<ToTunnel>(&bytes)? {
        ToTunnel::Hello { protocol } if protocol == PROTOCOL => Ok(()),
        ToTunnel::Hello { protocol } => {
            anyhow::bail!("protocol {protocol}, this tunnel speaks {PROTOCOL}")
        }
        other => anyhow::bail!("expected hello, got {other:?}"),
    }
}

async fn drive(stream: UnixStream, tunnel: &Tunnel, link: &AgentLink) -> anyhow::Result<()> {
    stream.set_nonblocking(true)?;
    let (read, mut write) = tokio::net::UnixStream::from_std(stream)?.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    link.connect(tx.clone());
    let writer = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if write.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut reader = tokio::io::BufReader::new(read);
    let mut text = String::new();
    let result = loop {
        text.clear();
        // Bounded: a message longer than MAX_MESSAGE ends the connection.
        let n = match (&mut reader)
            .take(MAX_MESSAGE as u64)
            .read_line(&mut text)
            .await
        {
            Ok(n) => n,
            Err(e) => break Err(e.into()),
        };
        if n == 0 {
            break Ok(());
        }
        if !text.ends_with('\n') {
            break Err(anyhow::anyhow!("a message over {MAX_MESSAGE} bytes"));
        }
        let answer = match serde_json::from_str::<ToTunnel>(&text) {
            Ok(ToTunnel::FlowAnswer { id, service }) => {
                link.answer(id, service);
                continue;
            }
            Ok(ToTunnel::Update {
                id,
                routes,
                also_listen,
            }) => match to_backends(routes) {
                Ok(backends) => {
                    let also: BTreeSet<SocketAddr> = also_listen.into_iter().collect();
                    let accepting = tunnel.update(&backends, &also).await;
                    FromTunnel::Accepting {
                        id,
                        addresses: accepting.into_iter().collect(),
                    }
                }
                Err(message) => FromTunnel::Error { message },
            },
            Ok(other) => FromTunnel::Error {
                message: format!("unexpected {other:?}"),
            },
            Err(e) => FromTunnel::Error {
                message: format!("unreadable message: {e}"),
            },
        };
        let _ = tx.send(line(&answer));
    };
    drop(tx);
    writer.abort();
    result
}

fn to_backends(
    routes: Vec<WireRoute>,
) -> Result<BTreeMap<SocketAddr, (SocketAddr, RemoteBackend)>, String> {
    routes
        .into_iter()
        .map(|r| {
            let backend = RemoteBackend::try_from(r.backend)
                .map_err(|e| format!("service {}: {e}", r.service))?;
            Ok((r.service, (r.tunnel, backend)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::backend::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEADER_TIMEOUT};

    #[test]
    fn a_backend_survives_the_wire() {
        let backends = [
            RemoteBackend {
                mode: Mode::Http,
                scheme: Scheme::Https,
                host: "run.beamlit.com".into(),
                port: 443,
                path_prefix: "/ws/models/m".into(),
                headers_to_add: vec![(
                    HeaderName::from_static("x-beamlit-environment"),
                    HeaderValue::from_static("production"),
                )],
                auth: Auth::OAuth(OAuthClient {
                    token_url: "https://api.beamlit.com/v0/oauth/token"
                        .parse()
                        .expect("uri"),
                    client_id: "id".into(),
                    client_secret: Secret::new("s3cret".into()),
                }),
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                header_timeout: DEFAULT_HEADER_TIMEOUT,
            },
            RemoteBackend {
                mode: Mode::Tcp,
                scheme: Scheme::Http,
                host: "fd00::9".into(),
                port: 8080,
                path_prefix: String::new(),
                headers_to_add: vec![],
                auth: Auth::Bearer(Secret::new("t".into())),
                connect_timeout: Duration::from_millis(1500),
                header_timeout: Duration::from_secs(7),
            },
        ];
        for b in backends {
            let text = serde_json::to_string(&WireBackend::from(&b)).expect("json");
            let back: WireBackend = serde_json::from_str(&text).expect("parse");
            assert_eq!(RemoteBackend::try_from(back).expect("valid"), b);
        }
    }

    #[test]
    fn a_bad_header_from_the_wire_is_an_error_naming_it() {
        let wire = WireBackend {
            tcp: false,
            https: true,
            host: "h".into(),
            port: 443,
            path_prefix: String::new(),
            headers: vec![("bad name".into(), "v".into())],
            auth: WireAuth::None,
            connect_timeout_ms: 1,
            header_timeout_ms: 1,
        };
        let err = RemoteBackend::try_from(wire).expect_err("refused");
        assert!(err.contains("bad name"), "{err}");
    }
}
