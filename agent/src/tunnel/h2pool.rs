//! Forward layer, HTTPS remotes that speak HTTP/2: the set of HTTP/2 connections to one remote
//! ([`Pool`]), shared by every client connection and every Service routed there.
//!
//! hyper-util's legacy pooled client, used before, put every request on a single HTTP/2
//! connection (at 256 concurrent clients the remote's `SETTINGS_MAX_CONCURRENT_STREAMS`, 128 for
//! nginx, then capped what was in flight, and one connection is served by one of the remote's
//! workers), and at start opened one connection per concurrent request during the first
//! handshake, then kept one. Here:
//!
//! - a request goes on the open connection with the fewest streams in flight;
//! - another connection is opened only when every one has at least [`Conn::threshold`] streams
//!   in flight, up to [`MAX_CONNECTIONS`];
//! - one connection is opened at a time: requests that need it wait for it rather than dialling
//!   their own, and a failed open is reported to them all, once, as the error the forwarder
//!   turns into a 502 (no retry loop);
//! - a connection unused for [`IDLE_TIMEOUT`] is closed by its own driver task, and one the
//!   remote closed (GOAWAY, reset, EOF) leaves the set when its driver ends.
//!
//! A remote whose ALPN answer is not h2 is remembered for [`HTTP1_RECHECK`]; meanwhile
//! [`Pool::send`] hands the request back ([`Sent::Http1`]) for the legacy client, which keeps
//! serving HTTP/1.1 remotes, upgrades (HTTP/1.1 only) and token requests as before.
use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};
use http::{Request, Response};
use http_body_util::BodyExt as _;
use hyper::{
    body::{Frame, Incoming, SizeHint},
    client::conn::http2,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tracing::debug;

use super::{
    client::{self, Body, BoxError},
    dial::Dialer,
};

/// Connections per remote at most. Each costs the remote a TLS session and, in nginx or
/// Envoy, pins its streams to one worker; 8 spreads a node's requests over as many of the
/// remote's workers (HAProxy opened 10-32 at 256 concurrent clients) without the remote paying
/// for a connection per client.
pub const MAX_CONNECTIONS: usize = 8;

/// Streams in flight on every connection before another one is opened, when the remote's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` does not ask for fewer (see [`Conn::threshold`]): half of
/// nginx's 128. Streams beyond a remote's limit wait in the client, so opening before a
/// connection reaches the limit keeps requests from queueing; a remote that allows thousands
/// of streams still serves one connection on one worker, hence the cap.
pub const DEFAULT_THRESHOLD: usize = 64;

/// How long a connection may stay without a stream in flight, as the legacy client's
/// `pool_idle_timeout` ([`super::client::http_client`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a remote that chose HTTP/1.1 in ALPN is sent to the legacy client before the next
/// request probes its ALPN again (one TLS handshake, whose connection is then dropped).
pub const HTTP1_RECHECK: Duration = Duration::from_secs(600);

/// After a failed open, while other connections are open, how long requests keep to those
/// instead of dialling again: a remote refusing new connections is not hammered.
const OPEN_BACKOFF: Duration = Duration::from_secs(1);

/// Flow-control windows we grant the remote. Explicit sizes rather than `adaptive_window`
/// (which starts at 64 KiB and grows by BDP pings): what the remote may send ahead bounds what
/// the tunnel buffers for a slow client, so it should be a known figure. 1 MiB per stream is
/// 160 Mbit/s at 50 ms of RTT, more than a model's answer streams; 8 MiB per connection lets
/// eight such streams run at full speed, and bounds a remote's unread data at
/// 8 × [`MAX_CONNECTIONS`] = 64 MiB.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

/// PINGs on every connection, idle ones included: a remote that vanished without a FIN (a NAT
/// or load balancer that dropped the flow) is noticed within interval + timeout, instead of
/// the next request waiting out its header timeout on it. One 17-byte frame each way per 30 s
/// per connection.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends of one request: a connection that turns out closed when the request reaches it
/// gives the request back untouched, and it goes to another (or a new) connection.
const MAX_ATTEMPTS: usize = 4;

/// How often a new connection looks for the remote's first SETTINGS (see [`drive`]).
const SETTINGS_POLL: Duration = Duration::from_millis(1);

/// What [`Pool::send`] did with a request.
pub enum Sent {
    /// Forwarded over HTTP/2; the body is counted in its connection's streams until it ends or
    /// is dropped.
    Response(Response<Body>),
    /// The remote speaks HTTP/1.1 (ALPN): the request, untouched, for the legacy client.
    Http1(Request<Body>),
}

/// The HTTP/2 connections to one remote (`host:port`, TLS server name and dialer).
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port`, to dial.
    target: String,
    server_name: ServerName<'static>,
    dialer: Dialer,
    tls: TlsConnector,
    h2: http2::Builder<TokioExecutor>,
    max_connections: usize,
    idle_timeout: Duration,
    /// Open connections to this remote (the tunnel's metric; shared by pools to the same
    /// `host:port`, hence increments rather than a value set).
    open: Gauge,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    conns: Vec<Arc<Conn>>,
    /// The connection being opened, awaited by the requests that need it.
    opening: Option<Opening>,
    /// The remote answered ALPN with something else than h2: until then, the legacy client.
    http1_until: Option<Instant>,
    failed_at: Option<Instant>,
    next_id: u64,
}

/// The outcome of an open, as every waiting request sees it.
type Opening = Shared<BoxFuture<'static, Result<(), String>>>;

/// One HTTP/2 connection; its driver task holds the other half.
struct Conn {
    id: u64,
    send: http2::SendRequest<Body>,
    /// Streams sent and not yet done (response body ended or dropped).
    in_flight: AtomicUsize,
    /// The remote's `SETTINGS_MAX_CONCURRENT_STREAMS` as hyper last read it (`usize::MAX` when
    /// the remote sets none).
    max_streams: AtomicUsize,
    /// Milliseconds after `opened_at` that the last stream ended or began.
    last_used: AtomicU64,
    opened_at: Instant,
    dead: AtomicBool,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.dead.load(Ordering::Relaxed) && !self.send.is_closed()
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn max_streams(&self) -> usize {
        self.max_streams.load(Ordering::Relaxed)
    }

    /// Streams in flight from which this connection counts as busy: half of what the remote
    /// allows (so a new connection is ready before streams queue), at most
    /// [`DEFAULT_THRESHOLD`], at least 1.
    fn threshold(&self) -> usize {
        (self.max_streams() / 2).clamp(1, DEFAULT_THRESHOLD)
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.opened_at
            .elapsed()
            .saturating_sub(Duration::from_millis(
                self.last_used.load(Ordering::Relaxed),
            ))
    }

    /// Counts a stream; called with the pool's lock held, so the idle check cannot close the
    /// connection between its choice and this.
    fn take(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }
}

/// One stream counted on its connection until dropped.
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a request does next, decided under the pool's lock.
enum Step {
    Use(Arc<Conn>, InFlight),
    Wait(Opening),
    Http1,
    /// No connection, and this request may not open one (its open just failed).
    Unavailable,
}

impl Pool {
    /// A pool for `target` (`host:port`), verified as `host`. `tls` is the tunnel's client
    /// configuration with ALPN h2 and http/1.1 ([`tls_for_h2`]), shared by every pool.
    pub fn new(
        target: String,
        host: &str,
        dialer: Dialer,
        tls: Arc<rustls::ClientConfig>,
        open: Gauge,
    ) -> Result<Self, String> {
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("invalid TLS server name {host}: {e}"))?;
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            // No stream before the remote's SETTINGS: its limit is not known yet, and streams
            // beyond it would be refused (REFUSED_STREAM) by strict servers. Opening waits for
            // the SETTINGS, which this makes observable (see [`drive`]). A remote whose first
            // SETTINGS allow 0 streams is taken for one that never sent them.
            .initial_max_send_streams(0)
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                server_name,
                dialer,
                tls: TlsConnector::from(tls),
                h2,
                max_connections: MAX_CONNECTIONS,
                idle_timeout: IDLE_TIMEOUT,
                open,
                state: Mutex::new(State::default()),
            }),
        })
    }

    #[cfg(test)]
    fn with_limits(mut self, max_connections: usize, idle_timeout: Duration) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("a new pool");
        inner.max_connections = max_connections;
        inner.idle_timeout = idle_timeout;
        self
    }

    /// Open connections now.
    pub fn connections(&self) -> usize {
        self.inner.lock().conns.len()
    }

    /// Sends `req` (absolute URI) over one of the remote's HTTP/2 connections, opening one if
    /// needed; `Err` is the cause of the failure, for [`super::http`]'s 502 "unreachable".
    pub async fn send(&self, mut req: Request<Body>) -> Result<Sent, String> {
        let mut may_open = true;
        let mut last_error = None;
        // Waits end with a connection more (or an error), at most `max_connections` in a row
        // while the set grows; the bound only stops connections that die as they open.
        let (mut sends, mut waits) = (0, 0);
        while sends < MAX_ATTEMPTS && waits <= 2 * self.inner.max_connections {
            match self.inner.step(may_open) {
                Step::Http1 => return Ok(Sent::Http1(req)),
                Step::Unavailable => break,
                Step::Wait(opening) => {
                    waits += 1;
                    if let Err(e) = opening.await {
                        // Reported to every waiter; another connection may still serve it.
                        may_open = false;
                        last_error = Some(e);
                    }
                }
                Step::Use(conn, in_flight) => {
                    sends += 1;
                    let mut send = conn.send.clone();
                    match send.try_send_request(req).await {
                        Ok(response) => {
                            return Ok(Sent::Response(response.map(|body| {
                                Tracked {
                                    body,
                                    in_flight: Some(in_flight),
                                }
                                .boxed()
                            })));
                        }
                        Err(mut e) => {
                            let Some(unsent) = e.take_message() else {
                                return Err(client::root_cause(&e.into_error()));
                            };
                            // Closed before the request went out: another connection.
                            conn.dead.store(true, Ordering::Relaxed);
                            last_error = Some(client::root_cause(&e.into_error()));
                            req = unsent;
                        }
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| "no usable HTTP/2 connection".to_string()))
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn step(self: &Arc<Self>, may_open: bool) -> Step {
        let now = Instant::now();
        let mut state = self.lock();
        match state.http1_until {
            Some(until) if now < until => return Step::Http1,
            Some(_) => state.http1_until = None,
            None => {}
        }
        let before = state.conns.len();
        state.conns.retain(|c| c.usable());
        self.open.dec_by((before - state.conns.len()) as i64);

        let best = state.conns.iter().min_by_key(|c| c.in_flight()).cloned();
        let busy = best.as_ref().is_none_or(|c| c.in_flight() >= c.threshold());
        let backing_off = !state.conns.is_empty()
            && state
                .failed_at
                .is_some_and(|at| now.duration_since(at) < OPEN_BACKOFF);
        if busy
            && may_open
            && state.opening.is_none()
            && state.conns.len() < self.max_connections
            && !backing_off
        {
            state.opening = Some(self.start_open());
        }
        match (best, &state.opening) {
            (Some(c), _) if !busy => Step::Use(c.clone(), c.take()),
            // All busy and one opening: below the remote's limit a stream goes out now; at it,
            // it would only queue here, so it waits for the new connection.
            (Some(c), Some(opening)) => {
                if c.in_flight() < c.max_streams() {
                    Step::Use(c.clone(), c.take())
                } else {
                    Step::Wait(opening.clone())
                }
            }
            // At the most connections (or backing off): the least loaded one; hyper queues the
            // stream until the remote allows it.
            (Some(c), None) => Step::Use(c.clone(), c.take()),
            (None, Some(opening)) => Step::Wait(opening.clone()),
            (None, None) => Step::Unavailable,
        }
    }

    /// Opens a connection on a task of its own (a request that gives up waiting does not
    /// abandon it), which adds it to the set, or records the failure, before the waiters wake.
    fn start_open(self: &Arc<Self>) -> Opening {
        let inner = self.clone();
        let task = tokio::spawn(async move {
            let opened = inner.open().await;
            let mut state = inner.lock();
            state.opening = None;
            match opened {
                Ok(Some(conn)) => {
                    debug!(remote = %inner.target, id = conn.id, max_streams = conn.max_streams(), "HTTP/2 connection opened");
                    state.conns.push(conn);
                    state.failed_at = None;
                    inner.open.inc();
                    Ok(())
                }
                Ok(None) => {
                    debug!(remote = %inner.target, "remote chose HTTP/1.1 in ALPN");
                    state.http1_until = Some(Instant::now() + HTTP1_RECHECK);
                    state.failed_at = None;
                    Ok(())
                }
                Err(e) => {
                    state.failed_at = Some(Instant::now());
                    Err(e)
                }
            }
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(format!("opening an HTTP/2 connection: {e}")))
        }
        .boxed()
        .shared()
    }

    /// Dial, TLS, and, if ALPN gives h2, the HTTP/2 handshake up to the remote's SETTINGS.
    /// `None`: the remote chose HTTP/1.1 (the connection is dropped).
    async fn open(self: &Arc<Self>) -> Result<Option<Arc<Conn>>, String> {
        let timeout = self.dialer.timeout;
        let tcp = self
            .dialer
            .dial(&self.target)
            .await
            .map_err(|e| client::root_cause(&e))?;
        let tls = tokio::time::timeout(timeout, self.tls.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| format!("no TLS handshake within {timeout:?}"))?
            .map_err(|e| client::root_cause(&e))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok(None);
        }
        let (send, connection) = self
            .h2
            .handshake::<_, Body>(TokioIo::new(tls))
            .await
            .map_err(|e| client::root_cause(&e))?;
        let id = {
            let mut state = self.lock();
            state.next_id += 1;
            state.next_id
        };
        let conn = Arc::new(Conn {
            id,
            send,
            in_flight: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
            opened_at: Instant::now(),
            dead: AtomicBool::new(false),
        });
        let (settings_tx, settings_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(drive(
            connection,
            conn.clone(),
            Arc::downgrade(self),
            settings_tx,
        ));
        match tokio::time::timeout(timeout, settings_rx).await {
            Ok(Ok(())) => Ok(Some(conn)),
            Ok(Err(_)) => {
                Err("the remote closed the connection during the HTTP/2 handshake".into())
            }
            Err(_) => {
                conn.dead.store(true, Ordering::Relaxed);
                Err(format!(
                    "no HTTP/2 SETTINGS from the remote within {timeout:?}"
                ))
            }
        }
    }

    /// Takes `conn` out of the set if it is still there.
    fn remove(&self, conn: &Conn) {
        let mut state = self.lock();
        if let Some(i) = state.conns.iter().position(|c| c.id == conn.id) {
            state.conns.swap_remove(i);
            self.open.dec();
        }
    }

    /// The idle check of `conn`'s driver: `None` when the connection was idle long enough and
    /// left the set (under the lock, so no request takes it meanwhile), else when to look again.
    fn close_if_idle(&self, conn: &Conn) -> Option<Duration> {
        let mut state = self.lock();
        let idle = conn.idle_for();
        if conn.in_flight() > 0 {
            return Some(self.idle_timeout);
        }
        if idle < self.idle_timeout {
            return Some(self.idle_timeout - idle);
        }
        conn.dead.store(true, Ordering::Relaxed);
        if let Some(i) = state.conns.iter().position(|c| c.id == conn.id) {
            state.conns.swap_remove(i);
            self.open.dec();
        }
        None
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Each connection's driver holds only a weak reference to the pool: it ends the
        // connection at its next idle check with no stream in flight.
        let conns = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.open.dec_by(conns.conns.len() as i64);
    }
}

type Connection = http2::Connection<TokioIo<TlsStream<TcpStream>>, Body, TokioExecutor>;

/// Drives one connection until the remote closes it, it fails, or it is idle beyond the
/// timeout; records the remote's stream limit after every poll, and says when the first
/// SETTINGS arrived (the limit leaves its initial 0). hyper runs the HTTP/2 connection itself
/// on a task of its own; what is driven here is the request dispatch, polled when a request
/// comes, so until the SETTINGS are seen a timer polls it every [`SETTINGS_POLL`] too.
async fn drive(
    connection: Connection,
    conn: Arc<Conn>,
    pool: Weak<Inner>,
    settings: tokio::sync::oneshot::Sender<()>,
) {
    let mut connection = Box::pin(connection);
    let mut settings = Some(settings);
    let mut tick = tokio::time::interval(SETTINGS_POLL);
    let driven = std::future::poll_fn(|cx| {
        let polled = connection.as_mut().poll(cx);
        if settings.is_some() {
            while tick.poll_tick(cx).is_ready() {}
        }
        let max = connection.current_max_send_streams();
        conn.max_streams.store(max, Ordering::Relaxed);
        if max > 0
            && let Some(tx) = settings.take()
        {
            let _ = tx.send(());
        }
        polled
    });
    tokio::pin!(driven);
    let idle_timeout = pool.upgrade().map_or(IDLE_TIMEOUT, |p| p.idle_timeout);
    let mut check_in = idle_timeout;
    loop {
        tokio::select! {
            ended = &mut driven => {
                if let Err(e) = ended {
                    debug!(id = conn.id, "HTTP/2 connection ended: {e}");
                }
                break;
            }
            () = tokio::time::sleep(check_in) => {
                let Some(pool) = pool.upgrade() else {
                    // The pool is gone: end once no stream is left.
                    if conn.in_flight() == 0 {
                        break;
                    }
                    check_in = idle_timeout;
                    continue;
                };
                match pool.close_if_idle(&conn) {
                    Some(next) => check_in = next,
                    None => {
                        debug!(remote = %pool.target, id = conn.id, "HTTP/2 connection idle, closed");
                        break;
                    }
                }
            }
        }
    }
    conn.dead.store(true, Ordering::Relaxed);
    if let Some(pool) = pool.upgrade() {
        pool.remove(&conn);
    }
}

/// A response body that counts its stream on its connection until it ends or is dropped.
struct Tracked {
    body: Incoming,
    in_flight: Option<InFlight>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) || this.body.is_end_stream() {
            this.in_flight = None;
        }
        Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The tunnel's TLS configuration for the pools: ALPN h2 then http/1.1. A clone of the
/// `ClientConfig` shares its session store (an `Arc` in `resumption`), so this one, its
/// connections and the legacy client's all resume TLS sessions from one in-memory store.
pub fn tls_for_h2(tls: &rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(tls)
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, net::SocketAddr};

    use futures::future::join_all;
    use hyper::server::conn::http1;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::{net::TcpListener, sync::watch};

    use super::*;

    /// What the test server's connections do when told: serve on, GOAWAY, or drop the socket.
    #[derive(Clone, Copy, PartialEq)]
    enum Close {
        No,
        GoAway,
        Drop,
    }

    /// An in-process TLS server (self-signed for `localhost`) answering after `delay`, over
    /// HTTP/2 with `max_streams`, or HTTP/1.1 when that is all its ALPN offers. HTTP/2 through
    /// hyper-util's `auto` server, as the fake Beamlit serves: it sends its SETTINGS only once
    /// it has read the client's preface.
    struct Server {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        /// The most streams one connection had in flight at once.
        most_per_connection: Arc<AtomicUsize>,
        close: watch::Sender<Close>,
        client_tls: Arc<rustls::ClientConfig>,
    }

    async fn server(h2: bool, max_streams: u32, delay: Duration) -> Server {
        let cert =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let cert_der: CertificateDer<'static> = cert.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key)
            .expect("server config");
        server_tls.alpn_protocols = if h2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).expect("root");
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let most_per_connection = Arc::new(AtomicUsize::new(0));
        let (close, close_rx) = watch::channel(Close::No);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
        let (count, most) = (accepted.clone(), most_per_connection.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let (acceptor, most, mut close) =
                    (acceptor.clone(), most.clone(), close_rx.clone());
                close.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let in_flight = Arc::new(AtomicUsize::new(0));
                    let service = hyper::service::service_fn(move |_req| {
                        let (in_flight, most) = (in_flight.clone(), most.clone());
                        async move {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(Response::new(client::full("ok")))
                        }
                    });
                    let io = TokioIo::new(tls);
                    if !h2 {
                        let _ = http1::Builder::new().serve_connection(io, service).await;
                        return;
                    }
                    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    b.http2().max_concurrent_streams(max_streams);
                    let conn = b.serve_connection(io, service);
                    tokio::pin!(conn);
                    loop {
                        tokio::select! {
                            _ = conn.as_mut() => return,
                            changed = close.changed() => {
                                if changed.is_err() {
                                    return;
                                }
                                match *close.borrow_and_update() {
                                    Close::No => {}
                                    Close::GoAway => conn.as_mut().graceful_shutdown(),
                                    Close::Drop => return,
                                }
                            }
                        }
                    }
                });
            }
        });
        Server {
            addr,
            accepted,
            most_per_connection,
            close,
            client_tls: tls_for_h2(&client_tls),
        }
    }

    impl Server {
        fn pool(&self, gauge: Gauge) -> Pool {
            self.pool_to(self.addr, gauge)
        }

        fn pool_to(&self, addr: SocketAddr, gauge: Gauge) -> Pool {
            let dialer = Dialer {
                mark: 0,
                timeout: Duration::from_millis(500),
            };
            Pool::new(
                addr.to_string(),
                "localhost",
                dialer,
                self.client_tls.clone(),
                gauge,
            )
            .expect("pool")
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    fn request(addr: SocketAddr) -> Request<Body> {
        Request::builder()
            .uri(format!("https://localhost:{}/", addr.port()))
            .body(client::full(Bytes::new()))
            .expect("request")
    }

    /// One request's outcome: the response body, or the error.
    async fn get(pool: &Pool, addr: SocketAddr) -> Result<String, String> {
        let sent = tokio::time::timeout(Duration::from_secs(10), pool.send(request(addr)))
            .await
            .map_err(|_| "no answer within 10 s".to_string())??;
        let Sent::Response(response) = sent else {
            return Err("handed back for HTTP/1.1".into());
        };
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_spread_over_connections_within_the_remote_s_limit() {
        let server = server(true, 16, Duration::from_millis(100)).await;
        let metrics = super::super::metrics::Metrics::new();
        let remote = server.addr.to_string();
        let gauge = metrics.upstream_h2_connections(&remote);
        let pool = server.pool(gauge.clone());
        let replies = join_all((0..200).map(|_| get(&pool, server.addr))).await;
        for reply in &replies {
            assert_eq!(reply.as_deref(), Ok("ok"));
        }
        let accepted = server.accepted();
        assert!(
            (2..=MAX_CONNECTIONS).contains(&accepted),
            "{accepted} connections"
        );
        let most = server.most_per_connection.load(Ordering::SeqCst);
        assert!(most <= 16, "{most} streams at once on one connection");
        assert_eq!(pool.connections(), accepted);
        assert_eq!(gauge.get(), accepted as i64);
        let exposed =
            format!("beamlit_tunnel_upstream_h2_connections{{remote=\"{remote}\"}} {accepted}");
        assert!(
            metrics.encode().contains(&exposed),
            "{exposed} in\n{}",
            metrics.encode()
        );
        // Every stream was counted out when its body ended.
        let inner = pool.inner.lock();
        assert!(inner.conns.iter().all(|c| c.in_flight() == 0));
        assert!(inner.conns.iter().all(|c| c.max_streams() == 16));
    }

    // On the current-thread runtime the tunnel uses on small nodes.
    #[tokio::test]
    async fn concurrent_first_requests_open_one_connection() {
        let server = server(true, 128, Duration::from_millis(50)).await;
        let pool = server.pool(Gauge::default());
        let replies = join_all((0..50).map(|_| get(&pool, server.addr))).await;
        for reply in &replies {
            assert_eq!(reply.as_deref(), Ok("ok"));
        }
        assert_eq!(server.accepted(), 1);
        assert_eq!(pool.connections(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_the_remote_closes_is_replaced() {
        let server = server(true, 128, Duration::ZERO).await;
        let gauge = Gauge::default();
        let pool = server.pool(gauge.clone());
        assert_eq!(get(&pool, server.addr).await.as_deref(), Ok("ok"));
        for (close, accepted) in [(Close::GoAway, 2), (Close::Drop, 3)] {
            server.close.send_replace(close);
            wait_for("the closed connection leaves the set", || {
                pool.connections() == 0
            })
            .await;
            assert_eq!(gauge.get(), 0);
            server.close.send_replace(Close::No);
            let replies = join_all((0..10).map(|_| get(&pool, server.addr))).await;
            for reply in &replies {
                assert_eq!(reply.as_deref(), Ok("ok"));
            }
            assert_eq!(server.accepted(), accepted);
            assert_eq!(gauge.get(), 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_remote_is_an_error_not_a_hang() {
        let server = server(true, 128, Duration::ZERO).await;
        // Refused: a port nothing listens on any more.
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let refused = closed.local_addr().expect("addr");
        drop(closed);
        let pool = server.pool_to(refused, Gauge::default());
        let replies = join_all((0..20).map(|_| get(&pool, refused))).await;
        for reply in &replies {
            let e = reply.as_ref().expect_err("refused");
            assert!(e.contains("refused"), "{e}");
        }
        assert_eq!(pool.connections(), 0);
        assert!(pool.inner.lock().opening.is_none());

        // Silent: accepts TCP, never answers TLS; cut at the connect timeout (500 ms).
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let silent_addr = silent.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = silent.accept().await {
                held.push(tcp);
            }
        });
        let pool = server.pool_to(silent_addr, Gauge::default());
        let started = Instant::now();
        let e = get(&pool, silent_addr).await.expect_err("silent");
        assert!(e.contains("TLS"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        held.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http1_remote_is_handed_back_to_the_legacy_client() {
        let server = server(false, 0, Duration::ZERO).await;
        let pool = server.pool(Gauge::default());
        for _ in 0..3 {
            let sent = pool.send(request(server.addr)).await.expect("sent");
            assert!(matches!(sent, Sent::Http1(_)));
        }
        // One TLS handshake learnt it; the next requests did not dial.
        assert_eq!(server.accepted(), 1);
        assert_eq!(pool.connections(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_connection_is_closed() {
        let server = server(true, 128, Duration::ZERO).await;
        let gauge = Gauge::default();
        let pool = server
            .pool(gauge.clone())
            .with_limits(MAX_CONNECTIONS, Duration::from_millis(200));
        assert_eq!(get(&pool, server.addr).await.as_deref(), Ok("ok"));
        assert_eq!(pool.connections(), 1);
        wait_for("the idle connection closes", || pool.connections() == 0).await;
        assert_eq!(gauge.get(), 0);
        assert_eq!(get(&pool, server.addr).await.as_deref(), Ok("ok"));
        assert_eq!(server.accepted(), 2);
    }
}
