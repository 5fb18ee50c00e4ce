//! The egress tunnel: where redirected connections land on the node, and how they reach the
//! Service's remote backend. Built from small layers, each testable alone:
//!
//! accept ([`Tunnel`] listeners, [`limits`] per client) → identify ([`flows`]: the Service the
//! client dialled, or refuse) → route (the Service's [`backend::RemoteBackend`]) → auth ([`auth`]: static token or
//! cached OAuth token) → forward ([`http`] reverse proxy, or [`tcp`] pass-through).
//!
//! The tunnel runs on its own tokio runtime, on a thread that first joins the tunnel's network
//! namespace (`--tunnel-netns`; by default the agent's own): every socket it makes — listeners,
//! upstream connections, token requests — lives there, while the agent's eBPF work stays in the
//! host namespace where bpffs and cgroups are.
pub mod auth;
pub mod backend;
pub mod client;
pub mod control;
pub mod dial;
pub mod flows;
pub mod h1;
pub mod h2pool;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod tcp;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use self::{
    auth::TokenCache,
    backend::{Auth, Mode, RemoteBackend, Scheme},
    client::HttpClient,
    dial::Dialer,
    flows::FlowTable,
    limits::{ClientSlots, Limits},
    metrics::Metrics,
};

/// How often the tunnel tells the data plane it is alive; see `FLAG_TUNNEL_HEARTBEAT`.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// How long a removed route still serves connections that were redirected before its map
/// entry went: a client's connect() and the tunnel's accept are not one instant.
const RETIRED_ROUTE_GRACE: Duration = Duration::from_secs(2);

/// What the tunnel needs to forward one Service's connections.
pub struct Route {
    /// The Service address, as used in logs and metric labels.
    pub label: String,
    pub backend: RemoteBackend,
    /// `host:port` of the remote, to connect to.
    pub target: String,
    /// The remote's scheme and authority, parsed once; `None` if the host does not parse
    /// (requests then get a 400 naming it).
    pub origin: Option<(::http::uri::Scheme, ::http::uri::Authority)>,
    /// Connects out with the bypass mark and the backend's connect timeout.
    pub dialer: Dialer,
    pub tokens: Option<Arc<TokenCache>>,
    pub http: HttpClient,
    /// Plain-HTTP remotes: idle upstream connections kept between client connections, shared by
    /// every route to the same remote and kept across route updates.
    pub h1_pool: Arc<h1::Pool>,
    /// HTTPS remotes in HTTP mode: the remote's HTTP/2 connections, shared like `h1_pool`;
    /// `None` for other remotes (and a host that is no TLS server name: the legacy client
    /// then reports it).
    pub h2_pool: Option<Arc<h2pool::Pool>>,
    /// Rare outcomes (errors) by label; hot-path series through `stats`.
    pub metrics: Arc<Metrics>,
    pub stats: metrics::RouteMetrics,
    /// What one client may hold (timeouts; the connection cap is applied on accept).
    pub limits: Limits,
}

/// The tunnel's worker threads when not given: half the CPUs this process may use, at least 1,
/// at most 4. The tunnel shares the node with the pods it serves (and, in every benchmark, with
/// the client and the upstream): on 2 CPUs, `cargo xtask bench tunnel` measured one worker
/// faster than two on every path (plain HTTP 1.12 against 1.01 × the better of nginx and
/// HAProxy; HTTPS 1.17 against 0.84), the second thread only contending for the same cores.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 4))
}

pub struct TunnelConfig {
    /// A network namespace file (e.g. /var/run/netns/NAME) to create the tunnel's sockets in.
    pub netns: Option<PathBuf>,
    pub bpffs_dir: PathBuf,
    pub extra_ca_file: Option<PathBuf>,
    /// Worker threads of the tunnel's runtime.
    pub workers: usize,
    pub limits: Limits,
}

pub struct Tunnel {
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    shared: Arc<Shared>,
}

struct Shared {
    routes: RwLock<HashMap<SocketAddr, Arc<Route>>>,
    /// Routes removed less than [`RETIRED_ROUTE_GRACE`] ago, with when.
    retired: Mutex<HashMap<SocketAddr, (Arc<Route>, std::time::Instant)>>,
    listeners: Mutex<BTreeMap<SocketAddr, tokio::task::AbortHandle>>,
    flows: Flows,
    tls: rustls::ClientConfig,
    /// `tls` with ALPN h2 and http/1.1, for the HTTP/2 pools; one `Arc` for all of them, and
    /// the same TLS session store as `tls` (see [`h2pool::tls_for_h2`]).
    h2_tls: Arc<rustls::ClientConfig>,
    bypass_mark: u32,
    /// hyper's pooled clients, one per connect timeout in use (the timeout is the dialer's).
    clients: Mutex<HashMap<Duration, HttpClient>>,
    metrics: Arc<Metrics>,
    /// Keyed by (token URL, client id): services sharing a client share its token.
    tokens: Mutex<HashMap<(String, String), Arc<TokenCache>>>,
    /// Plain-HTTP upstream pools by remote (`host:port` and connect timeout: with the one
    /// bypass mark of the tunnel, what makes connections interchangeable); a remote no route
    /// names any more loses its pool.
    h1_pools: Mutex<HashMap<(String, Duration), Arc<h1::Pool>>>,
    /// HTTPS remotes' HTTP/2 connection sets, kept as `h1_pools` are.
    h2_pools: Mutex<HashMap<(String, Duration), Arc<h2pool::Pool>>>,
    limits: Limits,
    /// Connections open per client address, for `limits.max_connections_per_client`.
    slots: Arc<ClientSlots>,
}

/// Where the tunnel learns which Service an accepted connection was redirected from.
pub enum Flows {
    /// The pinned `flows` map, read here (the tunnel in the agent's process).
    Map(FlowTable),
    /// Asked of the agent over the control socket (a tunnel process of its own, which has no
    /// bpf() under the runtime's default seccomp profile).
    Agent(Arc<control::AgentLink>),
}

impl Flows {
    async fn take(&self, client: SocketAddr, tunnel: SocketAddr) -> Option<SocketAddr> {
        match self {
            Flows::Map(table) => table.take(client, tunnel),
            Flows::Agent(link) => link.flow(client, tunnel).await,
        }
    }
}

/// Called on the tunnel's runtime every [`HEARTBEAT_INTERVAL`]: writes the data plane's
/// heartbeat (in the agent), or tells the agent (in a tunnel process of its own).
pub type Heartbeat = Box<dyn FnMut() -> Result<(), String> + Send>;

impl Tunnel {
    /// The tunnel in the agent's process: the flows and the heartbeat from the pinned maps.
    pub fn start(config: &TunnelConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let flows = FlowTable::open(&config.bpffs_dir)?;
        let mut maps = crate::maps::PinnedMaps::open(&config.bpffs_dir)?;
        // The data plane's own setting: the mark its programs let through.
        let bypass_mark = maps.config()?.bypass_mark;
        Self::start_with(
            config,
            metrics,
            Flows::Map(flows),
            bypass_mark,
            Box::new(move || maps.beat().map_err(|e| e.to_string())),
        )
    }

    /// The tunnel with its flows and heartbeat given: what a tunnel process of its own
    /// (`beamlit-agent tunnel`) gets from the agent. `bypass_mark` 0 sets no mark (no
    /// CAP_NET_ADMIN there; the agent's pod cgroup is exempt instead).
    pub fn start_with(
        config: &TunnelConfig,
        metrics: Arc<Metrics>,
        flows: Flows,
        bypass_mark: u32,
        mut beat: Heartbeat,
    ) -> anyhow::Result<Self> {
        let tls = client::tls_config(config.extra_ca_file.as_deref())?;
        let (handle, stop) = runtime_in_netns(config.netns.as_deref(), config.workers.max(1))?;
        // The heartbeat runs on the tunnel's own runtime: it proves that runtime is alive, not
        // merely the agent's main loop.
        handle.spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
            loop {
                tick.tick().await;
                if let Err(e) = beat() {
                    warn!("tunnel heartbeat: {e}");
                }
            }
        });
        Ok(Self {
            runtime: handle,
            stop: Some(stop),
            shared: Arc::new(Shared {
                routes: RwLock::new(HashMap::new()),
                retired: Mutex::new(HashMap::new()),
                listeners: Mutex::new(BTreeMap::new()),
                flows,
                h2_tls: h2pool::tls_for_h2(&tls),
                tls,
                bypass_mark,
                clients: Mutex::new(HashMap::new()),
                metrics,
                tokens: Mutex::new(HashMap::new()),
                h1_pools: Mutex::new(HashMap::new()),
                h2_pools: Mutex::new(HashMap::new()),
                limits: config.limits,
                slots: ClientSlots::new(config.limits.max_connections_per_client),
            }),
        })
    }

    /// Client connections being served now.
    pub fn open_connections(&self) -> usize {
        self.shared.slots.total()
    }

    /// Installs the routes (service address → (tunnel address, backend)) and makes sure a
    /// listener accepts on each tunnel address, and on each of `also_listen` (addresses the
    /// maps still send connections to); every other listener closes. Returns the tunnel
    /// addresses that accept connections: only those may be marked ready in the data plane.
    pub async fn update(
        &self,
        backends: &BTreeMap<SocketAddr, (SocketAddr, RemoteBackend)>,
        also_listen: &BTreeSet<SocketAddr>,
    ) -> BTreeSet<SocketAddr> {
        let mut routes = HashMap::new();
        // The bypass mark is the same for every route, so (target, timeout) names a remote.
        let mut kept = std::mem::take(
            &mut *self
                .shared
                .h1_pools
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let mut pools = HashMap::new();
        let mut kept_h2 = std::mem::take(
            &mut *self
                .shared
                .h2_pools
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let mut h2_pools = HashMap::new();
        for (service, (_, backend)) in backends {
            let dialer = Dialer {
                mark: self.shared.bypass_mark,
                timeout: backend.connect_timeout,
            };
            let http = self.http_client(dialer);
            let target = backend.host_port();
            let remote = (target.clone(), dialer.timeout);
            let h1_pool = pools
                .entry(remote.clone())
                .or_insert_with(|| kept.remove(&remote).unwrap_or_default())
                .clone();
            let h2_pool = (backend.mode == Mode::Http && backend.scheme == Scheme::Https)
                .then(|| {
                    if let Some(pool) = h2_pools.get(&remote) {
                        return Some(Arc::clone(pool));
                    }
                    let pool = match kept_h2.remove(&remote) {
                        Some(pool) => pool,
                        None => Arc::new(
                            h2pool::Pool::new(
                                target.clone(),
                                &backend.host,
                                dialer,
                                self.shared.h2_tls.clone(),
                                self.shared.metrics.upstream_h2_connections(&target),
                            )
                            .inspect_err(|e| warn!(remote = %target, "{e}"))
                            .ok()?,
                        ),
                    };
                    h2_pools.insert(remote.clone(), pool.clone());
                    Some(pool)
                })
                .flatten();
            let tokens = match &backend.auth {
                Auth::OAuth(oauth) => Some(self.token_cache(oauth, &http, backend.connect_timeout)),
                _ => None,
            };
            routes.insert(
                *service,
                Arc::new(Route {
                    label: service.to_string(),
                    target,
                    origin: backend.origin(),
                    dialer,
                    backend: backend.clone(),
                    tokens,
                    http,
                    h1_pool,
                    h2_pool,
                    metrics: self.shared.metrics.clone(),
                    stats: self.shared.metrics.for_route(&service.to_string()),
                    limits: self.shared.limits,
                }),
            );
        }
        *self
            .shared
            .h1_pools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = pools;
        *self
            .shared
            .h2_pools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = h2_pools;
        if let Ok(mut current) = self.shared.routes.write() {
            let now = std::time::Instant::now();
            let mut retired = self
                .shared
                .retired
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            retired.retain(|service, (_, at)| {
                !routes.contains_key(service) && now.duration_since(*at) < RETIRED_ROUTE_GRACE
            });
            for (service, route) in current.drain() {
                if !routes.contains_key(&service) {
                    retired.insert(service, (route, now));
                }
            }
            *current = routes;
        }
        let wanted: BTreeSet<SocketAddr> = backends
            .values()
            .map(|(t, _)| *t)
            .chain(also_listen.iter().copied())
            .collect();
        let mut accepting = BTreeSet::new();
        for addr in &wanted {
            let running = self
                .shared
                .listeners
                .lock()
                .map(|l| l.get(addr).is_some_and(|h| !h.is_finished()))
                .unwrap_or(false);
            if running {
                accepting.insert(*addr);
                continue;
            }
            let shared = self.shared.clone();
            let addr = *addr;
            let bound = self
                .runtime
                .spawn(async move { TcpListener::bind(addr).await })
                .await;
            match bound {
                Ok(Ok(listener)) => {
                    info!(%addr, "tunnel listening");
                    let task = self.runtime.spawn(accept_loop(listener, shared));
                    if let Ok(mut l) = self.shared.listeners.lock() {
                        l.insert(addr, task.abort_handle());
                    }
                    accepting.insert(addr);
                }
                Ok(Err(e)) => warn!(%addr, "tunnel cannot listen: {e}; its services fail open"),
                Err(e) => warn!(%addr, "tunnel runtime gone: {e}"),
            }
        }
        // Listeners no route needs any more.
        if let Ok(mut l) = self.shared.listeners.lock() {
            l.retain(|addr, handle| {
                let keep = wanted.contains(addr);
                if !keep {
                    handle.abort();
                    info!(%addr, "tunnel listener closed");
                }
                keep
            });
        }
        accepting
    }

    fn http_client(&self, dialer: Dialer) -> HttpClient {
        let mut clients = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        clients
            .entry(dialer.timeout)
            .or_insert_with(|| client::http_client(self.shared.tls.clone(), dialer))
            .clone()
    }

    fn token_cache(
        &self,
        oauth: &backend::OAuthClient,
        http: &HttpClient,
        timeout: Duration,
    ) -> Arc<TokenCache> {
        let key = (oauth.token_url.to_string(), oauth.client_id.clone());
        let mut caches = self
            .shared
            .tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match caches.get(&key) {
            // A changed secret for the same client starts a fresh cache.
            Some(cache) if cache.client() == oauth => cache.clone(),
            _ => {
                let cache = Arc::new(TokenCache::new(
                    oauth.clone(),
                    http.clone(),
                    timeout,
                    self.shared.metrics.clone(),
                ));
                caches.insert(key, cache.clone());
                cache
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Shared {
    /// A route removed within the grace period, for a connection redirected just before.
    fn retired_route(&self, service: SocketAddr) -> Option<Arc<Route>> {
        let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired
            .get(&service)
            .filter(|(_, at)| at.elapsed() < RETIRED_ROUTE_GRACE)
            .map(|(route, _)| route.clone())
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(async move { handle_connection(stream, peer, &shared).await });
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!("tunnel accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_connection(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let Some(service) = shared.flows.take(peer, local).await else {
        // Not redirected by this node's eBPF: refuse with a reset, so the client sees it at once.
        shared.metrics.refused();
        warn!(client = %peer, tunnel = %local, "refused a connection this node did not redirect");
        reset_on_close(&stream);
        return;
    };
    let route = shared
        .routes
        .read()
        .ok()
        .and_then(|r| r.get(&service).cloned())
        .or_else(|| shared.retired_route(service));
    let Some(route) = route else {
        shared
            .metrics
            .connection(&service.to_string(), "no_remote_backend");
        warn!(%service, "redirected connection for a service without a remote backend");
        reset_on_close(&stream);
        return;
    };
    // The cap counts after the flow is consumed, so a refused connection leaves nothing behind.
    let Some(_slot) = shared.slots.take(peer.ip()) else {
        route.metrics.connection(&route.label, "client_limit");
        warn!(
            client = %peer.ip(),
            service = %route.label,
            max = shared.limits.max_connections_per_client,
            "refused a connection: the client holds the most connections allowed per client"
        );
        reset_on_close(&stream);
        return;
    };
    let _ = stream.set_nodelay(true);
    route.stats.accepted.inc();
    match route.backend.mode {
        Mode::Http => http::serve(stream, peer, route).await,
        Mode::Tcp => {
            if let Err(e) = tcp::forward(
                stream,
                route.dialer,
                &route.target,
                &route.label,
                &route.metrics,
                route.limits.idle_timeout,
            )
            .await
            {
                route.metrics.connection(&route.label, "tcp_error");
                warn!(service = %route.label, "{e}");
            }
        }
    }
}

/// SO_LINGER 0: closing sends a reset, so a refused client fails at once instead of seeing an
/// orderly close it could mistake for an empty answer. A zero linger never blocks on close.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, option struct of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A multi-threaded runtime whose threads live in `netns`. Worker threads are created by the
/// thread that built the runtime and inherit its network namespace.
fn runtime_in_netns(
    netns: Option<&Path>,
    workers: usize,
) -> anyhow::Result<(tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>)> {
    let netns = netns.map(Path::to_path_buf);
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("tunnel".into())
        .spawn(move || {
            let setup = || -> anyhow::Result<tokio::runtime::Runtime> {
                if let Some(path) = &netns {
                    let file = std::fs::File::open(path)
                        .with_context(|| format!("opening network namespace {}", path.display()))?;
                    // SAFETY: setns on this thread only, with a valid namespace fd.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        anyhow::bail!(
                            "entering network namespace {}: {}",
                            path.display(),
                            std::io::Error::last_os_error()
                        );
                    }
                }
                // One worker: a current-thread runtime, with no work-stealing synchronization.
                let mut builder = if workers == 1 {
                    tokio::runtime::Builder::new_current_thread()
                } else {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(workers);
                    b
                };
                Ok(builder.thread_name("tunnel-worker").enable_all().build()?)
            };
            match setup() {
                Ok(runtime) => {
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                }
                Err(e) => {
                    let _ = handle_tx.send(Err(e));
                }
            }
        })?;
    let handle = handle_rx
        .recv()
        .context("tunnel thread ended before starting")??;
    Ok((handle, stop_tx))
}
