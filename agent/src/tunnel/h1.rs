//! Forward layer, plain-HTTP remotes: each client connection drives its own upstream HTTP/1.1
//! connection, one request at a time, and keeps it while both ends allow keep-alive. When the
//! client connection ends, its idle upstream connections go to the remote's [`Pool`], where the
//! next client connection takes one instead of dialling: clients that open a connection per
//! request (curl in a loop, many load balancers' health checks) would otherwise cost an
//! upstream connect and, since the tunnel closed first, a TIME_WAIT per request. At a few
//! hundred new connections per second those exhaust the ephemeral ports toward the remote
//! (28 232 ports / 60 s ≈ 470 per second), which is where `cargo xtask bench tunnel` measured
//! the tunnel at 0.06× nginx before the pool.
//!
//! HTTPS remotes go through the remote's HTTP/2 connections instead ([`super::h2pool`], or
//! hyper's pooled client [`super::client`] when ALPN picks HTTP/1.1), where many client
//! connections share a few upstream ones. Without TLS there is no
//! ALPN, so every request in flight needs an HTTP/1.1 connection of its own anyway. Driving it
//! from the client connection's own task leaves out what the shared pool costs: per request a
//! lock, a channel to the connection's task and a wake-up of that task; per upstream connection
//! two 8 KiB buffers and a ~16 KiB channel. With a thousand busy client connections that is
//! about 25 MB. Messages are parsed with httparse, as hyper does.
use std::{
    collections::VecDeque,
    fmt,
    io::{self, Write as _},
    ops::Range,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    client::{Body, BoxError},
    dial::Dialer,
};

/// A response head larger than this is refused (hyper's default limit is ~400 KiB of buffer;
/// no model API sends heads near this).
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Buffer space reserved for reading a response head; most fit in one read.
const HEAD_READ: usize = 4 * 1024;
/// Buffer space reserved while a body streams: fewer, larger reads.
const BODY_READ: usize = 16 * 1024;
/// Idle upstream connections kept per client connection. HTTP/1.1 clients send one request at a
/// time, so one is enough for them; an h2c client's concurrent streams may leave a few.
const IDLE_PER_CLIENT: usize = 4;

/// Idle upstream connections a remote keeps between client connections, as many as nginx's
/// `keepalive` in the benchmark's reverse proxy: enough for the requests a node has in flight
/// toward one remote, few enough that the remote's per-connection cost stays small.
pub const POOL_IDLE_MAX: usize = 64;
/// How long a pooled connection may stay unused. Shorter than common server keep-alive timeouts
/// (nginx 75 s, Go 90 s), so the tunnel, not the remote, usually closes; a remote that closes
/// earlier is noticed before reuse ([`Conn::is_open_and_quiet`]), and a request that loses that
/// race is sent again when that is safe.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The upstream connections of one client connection.
pub struct Upstreams {
    idle: Mutex<Vec<Conn>>,
    /// Where they go when the client connection ends, and where a new one looks first.
    pool: Arc<Pool>,
}

impl Upstreams {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            pool,
        }
    }

    /// An idle connection the remote has not closed meanwhile: this client connection's own,
    /// else one from the remote's pool.
    fn take_open(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.is_open_and_quiet() {
                return Some(conn);
            }
        }
        drop(idle);
        self.pool.take_open()
    }

    fn put(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_PER_CLIENT {
            idle.push(conn);
        } else {
            drop(idle);
            self.pool.put(conn);
        }
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(PoisonError::into_inner));
        for conn in idle {
            self.pool.put(conn);
        }
    }
}

/// Idle connections to one remote (`host:port` and dialer), shared by the client connections
/// of every Service routed there. Most recently used first out, so a quiet period lets the
/// oldest ones expire; nothing runs in the background: expired and closed connections are
/// dropped when met, and at most [`POOL_IDLE_MAX`] are held.
pub struct Pool {
    idle: Mutex<VecDeque<(Conn, Instant)>>,
    max: usize,
    timeout: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(POOL_IDLE_MAX, POOL_IDLE_TIMEOUT)
    }
}

impl Pool {
    pub fn new(max: usize, timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(VecDeque::new()),
            max,
            timeout,
        }
    }

    /// Idle connections held now (open or not: a closed one is only found when met).
    pub fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn take_open(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= self.timeout)
        {
            idle.pop_front();
        }
        while let Some((conn, _)) = idle.pop_back() {
            if conn.is_open_and_quiet() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        if self.max == 0 || !conn.is_open_and_quiet() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= self.max {
            idle.pop_front();
        }
        idle.push_back((conn, Instant::now()));
    }
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn connect(target: &str, dialer: Dialer) -> Result<Self, SendError> {
        let stream = dialer
            .dial(target)
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        Ok(Self {
            stream,
            buf: BytesMut::new(),
        })
    }

    /// An idle keep-alive connection is usable if nothing arrived on it: no EOF (the remote's
    /// idle timeout closed it) and no stray bytes. Costs no system call when the socket has not
    /// been readable since the last read.
    fn is_open_and_quiet(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut peek = tokio::io::ReadBuf::new(&mut byte);
        self.buf.is_empty() && self.stream.poll_peek(&mut cx, &mut peek).is_pending()
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, reserve: usize) -> Poll<io::Result<usize>> {
        reserve_for_read(&mut self.buf, reserve);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }
}

#[derive(Debug)]
pub enum SendError {
    /// No connection to the remote.
    Connect(String),
    /// The connection failed while the request was sent or the response head read.
    Io(io::Error),
    /// The remote's answer is not HTTP/1.1 as we can read it.
    Protocol(String),
    /// The client's request body failed (the client went away mid-upload).
    ClientBody(BoxError),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(cause) => write!(f, "{cause}"),
            SendError::Io(e) => write!(f, "{e}"),
            SendError::Protocol(what) => write!(f, "{what}"),
            SendError::ClientBody(e) => write!(f, "client request body: {e}"),
        }
    }
}

impl From<io::Error> for SendError {
    fn from(e: io::Error) -> Self {
        SendError::Io(e)
    }
}

/// What the remote answered.
pub enum Reply {
    Response(Response<Body>),
    /// `101 Switching Protocols`: the head to pass on, and the connection from then on.
    Upgraded(Response<Body>, Upgraded),
}

/// An upstream connection after `101`: bytes the remote sent right after its head, then the
/// socket.
pub struct Upgraded {
    pub early: Bytes,
    pub stream: TcpStream,
}

/// Sends `req` (absolute URI: its authority is the Host, `target` is where to connect) on one of
/// the client connection's upstream connections, or a new one.
pub async fn send(
    upstreams: &Arc<Upstreams>,
    target: &str,
    dialer: Dialer,
    req: Request<Body>,
) -> Result<Reply, SendError> {
    let (parts, mut body) = req.into_parts();
    let framing = RequestFraming::of(&parts.method, &parts.headers, &body);
    let head = encode_request_head(&parts, framing);
    // A request the remote may have received before a reused connection failed is sent again
    // only if that is safe: idempotent and without a body (RFC 9110 §9.2.2).
    let may_retry = framing == RequestFraming::None && parts.method.is_idempotent();
    let (mut conn, mut reused) = match upstreams.take_open() {
        Some(conn) => (conn, true),
        None => (Conn::connect(target, dialer).await?, false),
    };
    let (response_head, body_sent) = loop {
        match exchange(&mut conn, &head, &mut body, framing).await {
            Ok(answer) => break answer,
            Err(SendError::Io(e)) if reused && may_retry && conn.buf.is_empty() => {
                tracing::debug!("reused upstream connection failed ({e}); sending again");
                conn = Conn::connect(target, dialer).await?;
                reused = false;
            }
            Err(e) => return Err(e),
        }
    };
    let ResponseHead {
        status,
        headers,
        keep_alive,
    } = response_head;
    let mut response = Response::new(http_body_util::Empty::new().map_err(|n| match n {}).boxed());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let early = conn.buf.split().freeze();
        return Ok(Reply::Upgraded(
            response,
            Upgraded {
                early,
                stream: conn.stream,
            },
        ));
    }
    let framing = ResponseFraming::of(&parts.method, status, response.headers())?;
    // A remote that answered before the whole request body was sent expects the rest, or
    // closes: either way the connection cannot carry another request.
    let reusable = keep_alive && body_sent && !matches!(framing, ResponseFraming::UntilClose);
    if matches!(framing, ResponseFraming::Length(0) | ResponseFraming::Empty) {
        // No body: the connection is free for the client's next request at once.
        if reusable && conn.buf.is_empty() {
            upstreams.put(conn);
        }
        return Ok(Reply::Response(response));
    }
    *response.body_mut() = ResponseBody {
        conn: Some(conn),
        framing,
        reusable,
        upstreams: upstreams.clone(),
    }
    .boxed();
    Ok(Reply::Response(response))
}

/// How the request body is delimited on the upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    None,
    Length(u64),
    Chunked,
}

impl RequestFraming {
    fn of(method: &Method, headers: &HeaderMap, body: &Body) -> Self {
        if body.is_end_stream() {
            // Methods that define a body say "empty" explicitly, as clients do.
            let declares = headers.contains_key(header::CONTENT_LENGTH)
                || [Method::POST, Method::PUT, Method::PATCH].contains(method);
            return if declares {
                RequestFraming::Length(0)
            } else {
                RequestFraming::None
            };
        }
        match body.size_hint().exact() {
            Some(n) => RequestFraming::Length(n),
            None => RequestFraming::Chunked,
        }
    }
}

/// Sends the request head and body while reading the response head, as a proxy must: a remote
/// may answer (a `413`, say) before it has read the whole body, and stop reading. Returns the
/// head and whether the body was sent completely.
async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    body: &mut Body,
    framing: RequestFraming,
) -> Result<(ResponseHead, bool), SendError> {
    let (mut reader, mut writer) = conn.stream.split();
    let send = async {
        writer.write_all(head).await?;
        if framing != RequestFraming::None {
            write_body(&mut writer, body, framing).await?;
        }
        Ok::<_, SendError>(())
    };
    let receive = read_response_head(&mut reader, &mut conn.buf);
    tokio::pin!(send, receive);
    let mut sent = false;
    let mut send_error = None;
    loop {
        tokio::select! {
            // Sending first: a response head cannot come before the request head is out.
            biased;
            result = &mut send, if !sent && send_error.is_none() => match result {
                Ok(()) => sent = true,
                // The remote may have answered and closed (a 413 and a reset, say): the
                // answer, if any, is what the client should see; else this error.
                Err(e) => send_error = Some(e),
            },
            answer = &mut receive => {
                return match (answer, send_error) {
                    (Ok(head), _) => Ok((head, sent)),
                    (Err(_), Some(e)) => Err(e),
                    (Err(e), None) => Err(e),
                };
            }
        }
    }
}

fn encode_request_head(parts: &http::request::Parts, framing: RequestFraming) -> Vec<u8> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let host = parts.uri.authority().map_or("", |a| a.as_str());
    let mut head = Vec::with_capacity(256 + parts.headers.len() * 48);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(host.as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // Framing is ours to set; Expect is answered by our own server side (the client's body
        // is streamed to the remote without waiting for its 100 Continue).
        if [
            header::HOST,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONNECTION,
            header::EXPECT,
        ]
        .contains(name)
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // Connection is ours too, but an upgrade needs it: servers (RFC 6455 §4.2.1 for WebSocket)
    // refuse an Upgrade header that `Connection: upgrade` does not name.
    if parts.headers.contains_key(header::UPGRADE) {
        head.extend_from_slice(b"connection: upgrade\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            let _ = write!(head, "content-length: {n}\r\n");
        }
        RequestFraming::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Streams the client's body to the remote as it arrives; trailers are not forwarded.
async fn write_body(
    stream: &mut (impl AsyncWrite + Unpin),
    body: &mut Body,
    framing: RequestFraming,
) -> Result<(), SendError> {
    let chunked = framing == RequestFraming::Chunked;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(SendError::ClientBody)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            // One write per chunk: size line, data and CRLF copied together.
            let mut chunk = Vec::with_capacity(data.len() + 20);
            let _ = write!(chunk, "{:x}\r\n", data.len());
            chunk.extend_from_slice(&data);
            chunk.extend_from_slice(b"\r\n");
            stream.write_all(&chunk).await?;
        } else {
            stream.write_all(&data).await?;
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

struct ResponseHead {
    status: StatusCode,
    headers: HeaderMap,
    keep_alive: bool,
}

/// Reads up to the end of a final response head (interim 1xx heads other than 101 are skipped),
/// leaving what follows it in the buffer.
async fn read_response_head(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<ResponseHead, SendError> {
    loop {
        if !buf.is_empty()
            && let Some(head) = parse_response_head(buf)?
        {
            let code = head.status.as_u16();
            if (100..200).contains(&code) && code != 101 {
                continue;
            }
            return Ok(head);
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(SendError::Protocol(format!(
                "remote response head larger than {} KiB",
                MAX_HEAD_BYTES / 1024
            )));
        }
        reserve_for_read(buf, HEAD_READ);
        if reader.read_buf(buf).await? == 0 {
            return Err(if buf.is_empty() {
                SendError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "remote closed the connection before answering",
                ))
            } else {
                SendError::Protocol("remote closed the connection inside its response head".into())
            });
        }
    }
}

/// Room for at least a quarter of `size` more bytes, growing by `size` when needed.
fn reserve_for_read(buf: &mut BytesMut, size: usize) {
    if buf.capacity() - buf.len() < size / 4 {
        buf.reserve(size);
    }
}

/// A complete head at the start of `buf`, taken out of it; `None` if more bytes are needed.
/// Header values are slices of the received bytes, not copies.
fn parse_response_head(buf: &mut BytesMut) -> Result<Option<ResponseHead>, SendError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(SendError::Protocol(format!(
                "remote sent an invalid HTTP/1 response head: {e}"
            )));
        }
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| SendError::Protocol("remote response has no valid status".into()))?;
    let http10 = parsed.version == Some(0);
    let base = buf.as_ptr() as usize;
    let mut fields: Vec<(HeaderName, Range<usize>)> = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            SendError::Protocol(format!("remote sent an invalid header name {:?}", h.name))
        })?;
        let start = h.value.as_ptr() as usize - base;
        fields.push((name, start..start + h.value.len()));
    }
    let raw = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, range) in fields {
        let value = HeaderValue::from_maybe_shared(raw.slice(range)).map_err(|_| {
            SendError::Protocol(format!("remote sent an invalid value for header {name}"))
        })?;
        headers.append(name, value);
    }
    let keep_alive = if http10 {
        connection_has(&headers, "keep-alive")
    } else {
        !connection_has(&headers, "close")
    };
    Ok(Some(ResponseHead {
        status,
        headers,
        keep_alive,
    }))
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, PartialEq, Eq)]
enum ResponseFraming {
    Empty,
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl ResponseFraming {
    fn of(method: &Method, status: StatusCode, headers: &HeaderMap) -> Result<Self, SendError> {
        let code = status.as_u16();
        if method == Method::HEAD || code == 204 || code == 304 || (100..200).contains(&code) {
            return Ok(ResponseFraming::Empty);
        }
        if let Some(last) = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty())
        {
            return Ok(if last.eq_ignore_ascii_case("chunked") {
                ResponseFraming::Chunked(ChunkedDecoder::default())
            } else {
                ResponseFraming::UntilClose
            });
        }
        let mut length = None;
        for value in headers.get_all(header::CONTENT_LENGTH) {
            let n = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    SendError::Protocol("remote sent an invalid Content-Length".into())
                })?;
            if length.is_some_and(|l| l != n) {
                return Err(SendError::Protocol(
                    "remote sent conflicting Content-Length values".into(),
                ));
            }
            length = Some(n);
        }
        Ok(length.map_or(ResponseFraming::UntilClose, ResponseFraming::Length))
    }

    /// The next piece of body in `buf`.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BoxError> {
        match self {
            ResponseFraming::Empty | ResponseFraming::Length(0) => Ok(Decoded::End),
            ResponseFraming::Length(remaining) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*remaining).min(buf.len() as u64);
                *remaining -= n;
                Ok(Decoded::Data(buf.split_to(n as usize).freeze()))
            }
            ResponseFraming::Chunked(decoder) => decoder.decode(buf),
            ResponseFraming::UntilClose => {
                if buf.is_empty() {
                    Ok(Decoded::NeedMore)
                } else {
                    Ok(Decoded::Data(buf.split().freeze()))
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    NeedMore,
    End,
}

/// Decodes `Transfer-Encoding: chunked`; chunk extensions and trailers are read and dropped.
#[derive(Debug, Default, PartialEq, Eq)]
struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// A chunk-size line or trailer line longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;

impl ChunkedDecoder {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BoxError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = line_end(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let line = std::str::from_utf8(&buf[..end])
                        .map_err(|_| "remote sent a chunk size that is not text")?;
                    let digits = line.split(';').next().unwrap_or_default().trim();
                    let size = u64::from_str_radix(digits, 16)
                        .map_err(|_| format!("remote sent an invalid chunk size {digits:?}"))?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = remaining.min(buf.len() as u64);
                    self.state = if n == remaining {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(remaining - n)
                    };
                    return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("remote sent a chunk without its closing CRLF".into());
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(end) = line_end(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    buf.advance(end + 2);
                    if end == 0 {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// Index of the CRLF ending the first line of `buf`, if it is complete.
fn line_end(buf: &[u8]) -> Result<Option<usize>, BoxError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(i)),
        None if buf.len() > MAX_CHUNK_LINE => Err("remote sent an overlong chunk line".into()),
        None => Ok(None),
    }
}

/// A response body read from the upstream connection as the client's side asks for it; at its
/// end the connection goes back to the client connection's idle list. Dropped early (the client
/// went away), it closes the connection, which could not be reused mid-body.
struct ResponseBody {
    conn: Option<Conn>,
    framing: ResponseFraming,
    reusable: bool,
    upstreams: Arc<Upstreams>,
}

impl ResponseBody {
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.upstreams.put(conn);
        }
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    // hyper stops polling a body once its declared length is sent: give the
                    // connection back now, not on a poll that may never come.
                    if this.framing == ResponseFraming::Length(0) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(conn.poll_fill(cx, BODY_READ)) {
                Ok(0) if this.framing == ResponseFraming::UntilClose => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(
                        "remote closed the connection inside the response body".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.framing == ResponseFraming::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            ResponseFraming::Length(remaining) => SizeHint::with_exact(remaining),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(framing: &mut ResponseFraming, input: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input {
            buf.extend_from_slice(piece);
            loop {
                match framing.decode(&mut buf).expect("valid") {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::End => return (out, true),
                }
            }
        }
        (out, false)
    }

    /// A keep-alive HTTP/1.1 server on loopback that answers every request with `hi` and counts
    /// the connections it accepted; `close_after_first` makes it close each connection after
    /// one answer (as a remote's idle timeout would).
    async fn counting_server(
        close_after_first: bool,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
                        if stream.write_all(answer).await.is_err() || close_after_first {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(upstreams: &Arc<Upstreams>, target: &str) -> Vec<u8> {
        let dialer = Dialer {
            mark: 0,
            timeout: Duration::from_secs(5),
        };
        let req = Request::get(format!("http://{target}/"))
            .body(http_body_util::Empty::new().map_err(|n| match n {}).boxed())
            .expect("request");
        let Ok(Reply::Response(response)) = send(upstreams, target, dialer, req).await else {
            panic!("no response from {target}");
        };
        let body = response.into_body().collect().await.expect("body");
        body.to_bytes().to_vec()
    }

    #[tokio::test]
    async fn connections_outlive_their_client_connection_in_the_pool() {
        let (target, accepted) = counting_server(false).await;
        let pool = Arc::new(Pool::default());
        // Three client connections one after the other, one request each (a client that opens
        // a connection per request): one upstream connection carries all three.
        for _ in 0..3 {
            let upstreams = Arc::new(Upstreams::new(pool.clone()));
            assert_eq!(get(&upstreams, &target).await, b"hi");
            drop(upstreams);
            assert_eq!(pool.idle(), 1);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_pool_drops_closed_expired_and_surplus_connections() {
        // The remote closes after each answer: nothing closed is pooled or reused.
        let (target, accepted) = counting_server(true).await;
        let pool = Arc::new(Pool::default());
        for round in 1..=2 {
            let upstreams = Arc::new(Upstreams::new(pool.clone()));
            assert_eq!(get(&upstreams, &target).await, b"hi");
            // Let the remote's FIN arrive before the connection is handed back.
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(upstreams);
            assert_eq!(pool.idle(), 0, "round {round}");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);

        // Expired connections are not reused: a new one is dialled.
        let (target, accepted) = counting_server(false).await;
        let pool = Arc::new(Pool::new(POOL_IDLE_MAX, Duration::from_millis(20)));
        let upstreams = Arc::new(Upstreams::new(pool.clone()));
        get(&upstreams, &target).await;
        drop(upstreams);
        tokio::time::sleep(Duration::from_millis(40)).await;
        let upstreams = Arc::new(Upstreams::new(pool.clone()));
        get(&upstreams, &target).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        drop(upstreams);

        // At most `max` are held; the oldest go first.
        let (target, _) = counting_server(false).await;
        let pool = Arc::new(Pool::new(2, POOL_IDLE_TIMEOUT));
        let clients: Vec<_> = (0..3)
            .map(|_| Arc::new(Upstreams::new(pool.clone())))
            .collect();
        for upstreams in &clients {
            get(upstreams, &target).await;
        }
        drop(clients);
        assert_eq!(pool.idle(), 2);
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in 0..wire.len() {
            let (a, b) = wire.split_at(split);
            let mut framing = ResponseFraming::Chunked(ChunkedDecoder::default());
            let (body, ended) = decode_all(&mut framing, &[a, b]);
            assert_eq!(body, b"hello, world", "split at {split}");
            assert!(ended, "split at {split}");
        }
    }

    #[test]
    fn chunked_errors_are_reported() {
        for bad in [&b"zz\r\n"[..], b"3\r\nabcXY", &[b'1'; 5000]] {
            let mut framing = ResponseFraming::Chunked(ChunkedDecoder::default());
            let mut buf = BytesMut::from(bad);
            let mut failed = false;
            for _ in 0..4 {
                match framing.decode(&mut buf) {
                    Err(_) => {
                        failed = true;
                        break;
                    }
                    Ok(Decoded::NeedMore | Decoded::End) => break,
                    Ok(Decoded::Data(_)) => {}
                }
            }
            assert!(
                failed,
                "{:?}",
                String::from_utf8_lossy(&bad[..bad.len().min(20)])
            );
        }
    }

    #[test]
    fn content_length_bodies_end_exactly() {
        let mut framing = ResponseFraming::Length(5);
        let (body, ended) = decode_all(&mut framing, &[b"hel", b"lo"]);
        assert_eq!(body, b"hello");
        assert!(ended);
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let ok = StatusCode::OK;
        type Case<'a> = (Method, u16, &'a [(&'a str, &'a str)], ResponseFraming);
        let cases: &[Case] = &[
            (
                Method::HEAD,
                200,
                &[("content-length", "10")],
                ResponseFraming::Empty,
            ),
            (Method::GET, 204, &[], ResponseFraming::Empty),
            (
                Method::GET,
                304,
                &[("content-length", "10")],
                ResponseFraming::Empty,
            ),
            (
                Method::GET,
                200,
                &[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3"),
                ],
                ResponseFraming::Chunked(ChunkedDecoder::default()),
            ),
            (
                Method::GET,
                200,
                &[("transfer-encoding", "gzip")],
                ResponseFraming::UntilClose,
            ),
            (
                Method::GET,
                200,
                &[("content-length", "3")],
                ResponseFraming::Length(3),
            ),
            (Method::GET, 200, &[], ResponseFraming::UntilClose),
        ];
        for (method, code, pairs, expected) in cases {
            let status = StatusCode::from_u16(*code).unwrap_or(ok);
            let framing = ResponseFraming::of(method, status, &headers(pairs)).expect("valid");
            assert_eq!(&framing, expected, "{method} {code} {pairs:?}");
        }
        for bad in [
            &[("content-length", "x")][..],
            &[("content-length", "3"), ("content-length", "4")],
        ] {
            assert!(
                ResponseFraming::of(&Method::GET, ok, &headers(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn response_heads_parse_with_interim_and_keep_alive() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nX-A: b\r\n\r\nhi"[..],
        );
        let head = parse_response_head(&mut buf)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["x-a"], "b");
        assert!(!head.keep_alive);
        assert_eq!(&buf[..], b"hi", "the body stays in the buffer");

        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"[..]);
        assert!(
            parse_response_head(&mut buf)
                .expect("valid")
                .expect("complete")
                .keep_alive
        );
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_response_head(&mut buf).expect("valid").is_none());
        let mut buf = BytesMut::from(&b"SMTP ready\r\n\r\n"[..]);
        assert!(parse_response_head(&mut buf).is_err());
    }

    #[test]
    fn request_heads_carry_our_framing_and_the_remote_host() {
        let req = Request::builder()
            .method(Method::POST)
            .uri("http://remote.example:8080/v1/models/x?stream=1")
            .header("host", "10.96.0.10")
            .header("content-length", "99")
            .header("expect", "100-continue")
            .header("x-kept", "yes")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let head = encode_request_head(&parts, RequestFraming::Chunked);
        let text = String::from_utf8(head).expect("utf8");
        assert_eq!(
            text,
            "POST /v1/models/x?stream=1 HTTP/1.1\r\nhost: remote.example:8080\r\nx-kept: yes\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn upgrade_requests_keep_connection_upgrade() {
        let req = Request::builder()
            .uri("http://remote.example/ws")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let text =
            String::from_utf8(encode_request_head(&parts, RequestFraming::None)).expect("utf8");
        assert_eq!(
            text,
            "GET /ws HTTP/1.1\r\nhost: remote.example\r\nupgrade: websocket\r\n\
             connection: upgrade\r\n\r\n"
        );
    }
}
