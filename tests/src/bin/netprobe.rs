//! netprobe: a tiny TCP server and client for the privileged tests.
//!
//! `serve` answers every connection with its name, so a client can tell which
//! backend (the local pod or the egress tunnel) it actually reached. `connect`
//! makes many short connections and prints one JSON report.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage:
  netprobe serve --listen ADDR [--listen ADDR ...] (--name NAME | --name-env VAR)
                 [--http [--body TEXT] [--burn N]]
  netprobe connect --addr ADDR (--count N | --until-file PATH) [--interval-ms M]
                   [--mark MARK] [--check-peer] [--timeout-ms T] [--concurrency C] [--http]
                   [--each]
  netprobe h2c --addr ADDR --path-prefix PATH --streams N

ADDR is IP:PORT or [IPv6]:PORT. MARK is decimal or 0x-hex.
IPv6 listeners are v6-only; pass --listen twice to serve both families.
With --http, responses carry `X-Served-By: NAME` and `X-Saw-Authorization: yes|no` (whether
the request had an Authorization header); the body is TEXT (default NAME).
--name-env takes NAME from an environment variable (HOSTNAME: the pod's name).
--burn N computes N square roots before each HTTP answer, as php-apache's index.php does
(the image that stands in for registry.k8s.io/hpa-example: CPU metrics move under load).
With --each, every attempt prints a line as it ends: `EACH <ms since start> ok <name>` or
`EACH <ms since start> fail <error>` (the JSON report still comes last).
h2c opens ONE connection with HTTP/2 prior knowledge and sends N GET requests on it at once,
to PATH0 .. PATH<N-1>; it prints one line per stream: `STREAM <i> <status> <body>`.";

const MAX_ERRORS: usize = 10;
/// Bounds the headers of a request so a misbehaving client cannot grow memory.
const MAX_HEADER_LINE: u64 = 8192;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("serve") => match ServeOpts::parse(&args[1..]) {
            Ok(o) => serve(o),
            Err(e) => usage_error(&e),
        },
        Some("connect") => match ConnectOpts::parse(&args[1..]) {
            Ok(o) => connect_main(o),
            Err(e) => usage_error(&e),
        },
        Some("h2c") => h2c_main(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            0
        }
        Some(other) => usage_error(&format!("unknown subcommand {other:?}")),
        None => usage_error("missing subcommand"),
    };
    std::process::exit(code);
}

fn usage_error(msg: &str) -> i32 {
    eprintln!("netprobe: error: {msg}\n\n{USAGE}");
    2
}

/// `--key value` and `--key=value` pairs, plus bare flags.
struct ArgIter<'a> {
    args: &'a [String],
    pos: usize,
}

impl<'a> ArgIter<'a> {
    fn new(args: &'a [String]) -> Self {
        Self { args, pos: 0 }
    }

    /// Next (key, inline value) or None at the end.
    fn next_key(&mut self) -> Option<(&'a str, Option<&'a str>)> {
        let arg = self.args.get(self.pos)?;
        self.pos += 1;
        Some(match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v)),
            _ => (arg.as_str(), None),
        })
    }

    fn value(&mut self, key: &str, inline: Option<&'a str>) -> Result<&'a str, String> {
        if let Some(v) = inline {
            return Ok(v);
        }
        let v = self
            .args
            .get(self.pos)
            .ok_or_else(|| format!("{key} needs a value"))?;
        self.pos += 1;
        Ok(v)
    }
}

fn no_value(key: &str, inline: Option<&str>) -> Result<(), String> {
    match inline {
        Some(_) => Err(format!("{key} takes no value")),
        None => Ok(()),
    }
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, String> {
    v.parse()
        .map_err(|_| format!("{key}: {v:?} is not IP:PORT or [IPv6]:PORT"))
}

fn parse_u64(key: &str, v: &str) -> Result<u64, String> {
    v.parse()
        .map_err(|_| format!("{key}: {v:?} is not a non-negative integer"))
}

fn parse_mark(v: &str) -> Result<u32, String> {
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.map_err(|_| format!("--mark: {v:?} is not a 32-bit decimal or 0x-hex number"))
}

struct ServeOpts {
    listen: Vec<SocketAddr>,
    name: String,
    http: bool,
    /// HTTP response body; the name (plus a newline) when absent.
    body: Option<String>,
}

impl ServeOpts {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut it = ArgIter::new(args);
        let (mut listen, mut name, mut http, mut body) = (Vec::new(), None, false, None);
        while let Some((key, inline)) = it.next_key() {
            match key {
                "--listen" => listen.push(parse_addr(key, it.value(key, inline)?)?),
                "--name" => name = Some(it.value(key, inline)?.to_string()),
                "--name-env" => {
                    let var = it.value(key, inline)?;
                    name = Some(
                        std::env::var(var)
                            .map_err(|_| format!("serve: --name-env: ${var} is not set"))?,
                    );
                }
                "--burn" => {
                    let v = it.value(key, inline)?;
                    let n: u64 = v
                        .parse()
                        .map_err(|_| format!("--burn: {v:?} is not a count"))?;
                    BURN.store(n, Ordering::Relaxed);
                }
                "--http" => {
                    no_value(key, inline)?;
                    http = true;
                }
                "--body" => body = Some(it.value(key, inline)?.to_string()),
                other => return Err(format!("serve: unknown argument {other:?}")),
            }
        }
        if listen.is_empty() {
            return Err("serve: --listen is required".into());
        }
        let name = name.ok_or("serve: --name is required")?;
        if name.is_empty() || name.contains(['\r', '\n']) {
            return Err("serve: --name must be non-empty and on one line".into());
        }
        if body.is_some() && !http {
            return Err("serve: --body needs --http".into());
        }
        Ok(Self {
            listen,
            name,
            http,
            body,
        })
    }
}

struct ConnectOpts {
    addr: SocketAddr,
    count: u64,
    interval: Duration,
    mark: Option<u32>,
    check_peer: bool,
    timeout: Duration,
    until_file: Option<PathBuf>,
    concurrency: u64,
    http: bool,
    each: bool,
}

impl ConnectOpts {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut it = ArgIter::new(args);
        let mut addr = None;
        let mut count = None;
        let mut opts = Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            count: 0,
            interval: Duration::ZERO,
            mark: None,
            check_peer: false,
            timeout: Duration::from_millis(2000),
            until_file: None,
            concurrency: 1,
            http: false,
            each: false,
        };
        while let Some((key, inline)) = it.next_key() {
            match key {
                "--addr" => addr = Some(parse_addr(key, it.value(key, inline)?)?),
                "--count" => count = Some(parse_u64(key, it.value(key, inline)?)?),
                "--interval-ms" => {
                    opts.interval = Duration::from_millis(parse_u64(key, it.value(key, inline)?)?)
                }
                "--mark" => opts.mark = Some(parse_mark(it.value(key, inline)?)?),
                "--check-peer" => {
                    no_value(key, inline)?;
                    opts.check_peer = true;
                }
                "--timeout-ms" => {
                    let ms = parse_u64(key, it.value(key, inline)?)?;
                    if ms == 0 {
                        return Err("--timeout-ms must be > 0".into());
                    }
                    opts.timeout = Duration::from_millis(ms);
                }
                "--until-file" => opts.until_file = Some(PathBuf::from(it.value(key, inline)?)),
                "--concurrency" => {
                    opts.concurrency = parse_u64(key, it.value(key, inline)?)?;
                    if !(1..=4096).contains(&opts.concurrency) {
                        return Err("--concurrency must be between 1 and 4096".into());
                    }
                }
                "--http" => {
                    no_value(key, inline)?;
                    opts.http = true;
                }
                "--each" => {
                    no_value(key, inline)?;
                    opts.each = true;
                }
                other => return Err(format!("connect: unknown argument {other:?}")),
            }
        }
        opts.addr = addr.ok_or("connect: --addr is required")?;
        opts.count = match (count, &opts.until_file) {
            (Some(n), _) => n,
            (None, Some(_)) => 0,
            (None, None) => return Err("connect: --count (or --until-file) is required".into()),
        };
        Ok(opts)
    }
}

// ---------------------------------------------------------------- serve

fn serve(o: ServeOpts) -> i32 {
    let mut listeners = Vec::new();
    for addr in &o.listen {
        match bind_listener(*addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("netprobe: cannot listen on {addr}: {e}");
                return 1;
            }
        }
    }
    {
        let mut out = io::stdout().lock();
        for l in &listeners {
            let addr = l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("? ({e})"));
            // Callers wait for this line; a lost stdout is not worth dying for.
            let _ = writeln!(out, "listening on {addr}");
        }
        let _ = out.flush();
    }
    // SIGTERM is taken by this thread (sigwait), not by the default action: every thread
    // spawned below inherits the blocked mask.
    let term = block_sigterm();
    let listener_fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    let name: Arc<str> = Arc::from(o.name.as_str());
    let body: Arc<str> = match &o.body {
        Some(b) => Arc::from(b.as_str()),
        None => Arc::from(format!("{}\n", o.name).as_str()),
    };
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let name = Arc::clone(&name);
            let body = Arc::clone(&body);
            std::thread::spawn(move || accept_loop(l, name, body, o.http))
        })
        .collect();
    let Some(term) = term else {
        for t in threads {
            let _ = t.join();
        }
        return 0;
    };
    wait_for_sigterm(&term);
    graceful_stop(&listener_fds, &name, &body, o.http);
    0
}

/// Connections accepted whose request is not answered yet (idle keep-alive ones not counted).
static BUSY: AtomicUsize = AtomicUsize::new(0);
/// Set on SIGTERM: accept loops stop.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// How long a stopping server waits for the requests it accepted.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// One connection or request being served, counted in [`BUSY`] while it lives.
struct Busy;

impl Busy {
    fn new() -> Self {
        BUSY.fetch_add(1, Ordering::SeqCst);
        Busy
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Blocks SIGTERM in this thread (and so in those it spawns), for [`wait_for_sigterm`].
fn block_sigterm() -> Option<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { zeroed() };
    // SAFETY: set is a valid sigset_t; the null old mask is allowed.
    let ok = unsafe {
        libc::sigemptyset(&mut set) == 0
            && libc::sigaddset(&mut set, libc::SIGTERM) == 0
            && libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) == 0
    };
    ok.then_some(set)
}

fn wait_for_sigterm(set: &libc::sigset_t) {
    let mut sig = 0;
    // SAFETY: set is a valid sigset_t with SIGTERM blocked in this thread.
    while unsafe { libc::sigwait(set, &mut sig) } != 0 || sig != libc::SIGTERM {}
}

/// On SIGTERM the server stops as web servers do when told to (Apache's graceful-stop, nginx's
/// SIGQUIT): it takes the connections the kernel already accepted for it, stops listening,
/// answers the requests under way, then exits. Without this, a pod's server died with
/// requests in flight, which no routing can save.
fn graceful_stop(listeners: &[RawFd], name: &Arc<str>, body: &Arc<str>, http: bool) {
    STOPPING.store(true, Ordering::SeqCst);
    for &fd in listeners {
        // SAFETY: fcntl on a listener this process owns and keeps open until it exits.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
            )
        };
        loop {
            // SAFETY: accept4 on an owned listener; null address pointers are allowed.
            let conn = unsafe {
                libc::accept4(
                    fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if conn < 0 {
                break;
            }
            // SAFETY: accept4 returned a new fd that nothing else owns.
            let stream = unsafe { TcpStream::from_raw_fd(conn) };
            handle(stream, Arc::clone(name), Arc::clone(body), http);
        }
        // Wakes the accept loop blocked on it (it sees STOPPING and returns).
        // SAFETY: shutdown on an owned fd.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while BUSY.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Serves one accepted connection on its own thread.
fn handle(stream: TcpStream, name: Arc<str>, body: Arc<str>, http: bool) {
    let busy = Busy::new();
    let spawned = std::thread::Builder::new().spawn(move || {
        let result = if http {
            serve_http(stream, &name, &body, busy)
        } else {
            let result = serve_plain(stream, &name);
            drop(busy);
            result
        };
        // Clients hanging up early are normal under load tests.
        drop(result);
    });
    if let Err(e) = spawned {
        eprintln!("netprobe: cannot spawn connection thread: {e}");
    }
}

fn accept_loop(listener: TcpListener, name: Arc<str>, body: Arc<str>, http: bool) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => handle(stream, Arc::clone(&name), Arc::clone(&body), http),
            Err(_) if STOPPING.load(Ordering::SeqCst) => return,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("netprobe: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_plain(mut stream: TcpStream, name: &str) -> io::Result<()> {
    stream.write_all(format!("{name}\n").as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

/// `busy` counts the connection until its first answer; later requests on it count from
/// their first line, so a stopping server does not wait on idle keep-alive connections.
fn serve_http(stream: TcpStream, name: &str, body: &str, busy: Busy) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut busy = Some(busy);
    loop {
        line.clear();
        if read_line_bounded(&mut reader, &mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            // Tolerate stray CRLFs between pipelined requests (RFC 9112 §2.2).
            continue;
        }
        let _request = busy.take().unwrap_or_else(Busy::new);
        let version = line
            .split_whitespace()
            .nth(2)
            .unwrap_or("HTTP/1.0")
            .to_string();
        let mut keep_alive = version == "HTTP/1.1";
        let mut content_length: u64 = 0;
        let mut authorization = false;
        loop {
            line.clear();
            if read_line_bounded(&mut reader, &mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                let v = v.trim();
                authorization |= k.eq_ignore_ascii_case("authorization");
                if k.eq_ignore_ascii_case("connection") {
                    if v.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if v.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                } else if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().unwrap_or(0);
                }
            }
        }
        io::copy(&mut (&mut reader).take(content_length), &mut io::sink())?;
        burn_cpu();
        // Whether credentials reached the model (tests of a remote that must get none).
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Served-By: {name}\r\nX-Saw-Authorization: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if authorization { "yes" } else { "no" },
            if keep_alive { "keep-alive" } else { "close" },
        );
        writer.write_all(response.as_bytes())?;
        if !keep_alive {
            return writer.shutdown(Shutdown::Write);
        }
    }
}

/// Square roots computed per HTTP answer (`serve --burn`).
static BURN: AtomicU64 = AtomicU64::new(0);

/// php-apache's index.php: `$x = 0.0001; for ($i = 0; $i <= 1000000; $i++) { $x += sqrt($x); }`.
fn burn_cpu() {
    let n = BURN.load(Ordering::Relaxed);
    let mut x = 0.0001_f64;
    for _ in 0..n {
        x += std::hint::black_box(x).sqrt();
    }
    std::hint::black_box(x);
}

fn read_line_bounded<R: BufRead>(reader: &mut R, line: &mut String) -> io::Result<usize> {
    let n = reader.take(MAX_HEADER_LINE).read_line(line)?;
    if n as u64 == MAX_HEADER_LINE && !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "header line too long",
        ));
    }
    Ok(n)
}

// ---------------------------------------------------------------- sockets

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn new_socket(addr: SocketAddr, extra_flags: libc::c_int) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | extra_flags,
            0,
        )
    })?;
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value outlives the call and the length matches its type.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// std's TcpListener::bind cannot set IPV6_V6ONLY before bind; we want v6
/// listeners to never claim the v4 port so both families can be served separately.
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = new_socket(addr, 0)?;
    set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        set_int_opt(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    let (sa, len) = to_sockaddr(addr);
    // SAFETY: sa is a valid sockaddr of length len.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    })?;
    // SAFETY: plain syscall on an owned fd.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 4096) })?;
    Ok(TcpListener::from(fd))
}

/// Connects with SO_MARK applied before connect() (so the cgroup connect hooks
/// and routing see it) and a bounded wait.
fn connect(addr: SocketAddr, mark: Option<u32>, timeout: Duration) -> io::Result<TcpStream> {
    let fd = new_socket(addr, libc::SOCK_NONBLOCK)?;
    let raw = fd.as_raw_fd();
    if let Some(mark) = mark {
        set_int_opt(raw, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
            .map_err(|e| io::Error::new(e.kind(), format!("SO_MARK: {e}")))?;
    }
    let (sa, len) = to_sockaddr(addr);
    // SAFETY: sa is a valid sockaddr of length len.
    let rc = unsafe { libc::connect(raw, (&sa as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
        wait_connected(raw, timeout)?;
    }
    // SAFETY: fcntl on an owned fd.
    let flags = cvt(unsafe { libc::fcntl(raw, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(raw, libc::F_SETFL, flags & !libc::O_NONBLOCK) })?;
    Ok(TcpStream::from(fd))
}

fn wait_connected(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: pfd is a valid pollfd array of length 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if rc == 0 {
            continue;
        }
        let mut so_error: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: so_error and len are valid for writes of the given size.
        cvt(unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut so_error as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        return if so_error == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(so_error))
        };
    }
}

// ---------------------------------------------------------------- connect

#[derive(Default)]
struct Stats {
    attempts: u64,
    ok: u64,
    by_name: BTreeMap<String, u64>,
    peer_mismatch: u64,
    errors: Vec<String>,
    connect_us: Vec<u64>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.attempts += other.attempts;
        self.ok += other.ok;
        for (k, v) in other.by_name {
            *self.by_name.entry(k).or_default() += v;
        }
        self.peer_mismatch += other.peer_mismatch;
        for e in other.errors {
            if self.errors.len() < MAX_ERRORS {
                self.errors.push(e);
            }
        }
        self.connect_us.extend(other.connect_us);
    }

    fn error(&mut self, e: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }
}

fn connect_main(o: ConnectOpts) -> i32 {
    let o = Arc::new(o);
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..o.concurrency)
        .map(|_| {
            let (o, next) = (Arc::clone(&o), Arc::clone(&next));
            std::thread::spawn(move || worker(&o, &next))
        })
        .collect();
    let mut total = Stats::default();
    for w in workers {
        match w.join() {
            Ok(s) => total.merge(s),
            Err(_) => total.error("worker thread panicked".into()),
        }
    }
    print_report(&total);
    0
}

fn worker(o: &ConnectOpts, next: &AtomicU64) -> Stats {
    let mut stats = Stats::default();
    let started = Instant::now();
    loop {
        match &o.until_file {
            Some(path) => {
                if path.exists() {
                    break;
                }
            }
            None => {
                if next.fetch_add(1, Ordering::Relaxed) >= o.count {
                    break;
                }
            }
        }
        stats.attempts += 1;
        let began = started.elapsed().as_millis();
        let outcome = attempt(o, &mut stats);
        let ms = started.elapsed().as_millis();
        if o.each {
            let line = match &outcome {
                Ok(name) => format!("EACH {ms} ok {name}\n"),
                Err(e) => format!("EACH {ms} fail {}\n", e.replace('\n', " ")),
            };
            let mut out = io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
        match outcome {
            Ok(name) => {
                stats.ok += 1;
                *stats.by_name.entry(name).or_default() += 1;
            }
            // When it failed, since the probe started: to line it up with the logs.
            Err(e) => stats.error(format!("at {began}..{ms} ms: {e}")),
        }
        if !o.interval.is_zero() {
            std::thread::sleep(o.interval);
        }
    }
    stats
}

/// One connection; returns the server's name.
fn attempt(o: &ConnectOpts, stats: &mut Stats) -> Result<String, String> {
    let start = Instant::now();
    let stream =
        connect(o.addr, o.mark, o.timeout).map_err(|e| format!("connect {}: {e}", o.addr))?;
    stats
        .connect_us
        .push(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
    if o.check_peer {
        match stream.peer_addr() {
            Ok(peer) if peer == o.addr => {}
            Ok(peer) => {
                stats.peer_mismatch += 1;
                stats.error(format!("getpeername: {peer}, expected {}", o.addr));
            }
            Err(e) => {
                stats.peer_mismatch += 1;
                stats.error(format!("getpeername: {e}"));
            }
        }
    }
    stream
        .set_read_timeout(Some(o.timeout))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    stream
        .set_write_timeout(Some(o.timeout))
        .map_err(|e| format!("set_write_timeout: {e}"))?;
    if o.http {
        http_get(stream, o.addr)
    } else {
        read_name(stream)
    }
}

fn read_name(stream: TcpStream) -> Result<String, String> {
    let mut line = String::new();
    BufReader::new(stream)
        .take(4096)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    let name = line.trim();
    if name.is_empty() {
        return Err("read: connection closed without a name".into());
    }
    Ok(name.to_string())
}

fn http_get(mut stream: TcpStream, addr: SocketAddr) -> Result<String, String> {
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut reader = BufReader::new(stream).take(64 * 1024);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    let status = line.trim_end().to_string();
    if !status.starts_with("HTTP/1.") || status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("http: unexpected status line {status:?}"));
    }
    let mut served_by = None;
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            return Err("http: connection closed inside headers".into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':')
            && k.eq_ignore_ascii_case("x-served-by")
        {
            served_by = Some(v.trim().to_string());
        }
    }
    match served_by {
        Some(name) if !name.is_empty() => Ok(name),
        _ => {
            let mut body = String::new();
            reader
                .read_to_string(&mut body)
                .map_err(|e| format!("read: {e}"))?;
            let body = body.trim();
            if body.is_empty() {
                Err("http: no X-Served-By header and empty body".into())
            } else {
                Ok(body.to_string())
            }
        }
    }
}

fn print_report(s: &Stats) {
    let mut lat = s.connect_us.clone();
    lat.sort_unstable();
    let pct = |p: u64| -> u64 {
        if lat.is_empty() {
            return 0;
        }
        // Nearest-rank percentile.
        let rank = (p * lat.len() as u64).div_ceil(100).max(1);
        lat[(rank - 1) as usize]
    };
    let avg = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<u64>() as f64 / lat.len() as f64
    };
    let report = serde_json::json!({
        "attempts": s.attempts,
        "ok": s.ok,
        "failed": s.attempts - s.ok,
        "by_name": s.by_name,
        "peer_mismatch": s.peer_mismatch,
        "errors": s.errors,
        "connect_us": {
            "avg": (avg * 10.0).round() / 10.0,
            "p50": pct(50),
            "p99": pct(99),
            "max": lat.last().copied().unwrap_or(0),
        },
    });
    println!("{report}");
}

/// `netprobe h2c`: concurrent streams on one h2c connection, as gRPC clients open them.
fn h2c_main(args: &[String]) -> i32 {
    let (mut addr, mut prefix, mut streams) = (None, None, 4usize);
    let mut it = ArgIter::new(args);
    while let Some((key, inline)) = it.next_key() {
        let parsed = match key {
            "--addr" => it
                .value(key, inline)
                .and_then(|v| parse_addr(key, v))
                .map(|a| addr = Some(a)),
            "--path-prefix" => it.value(key, inline).map(|v| prefix = Some(v.to_string())),
            "--streams" => it.value(key, inline).and_then(|v| {
                v.parse()
                    .map(|n| streams = n)
                    .map_err(|e| format!("--streams {v}: {e}"))
            }),
            other => Err(format!("unknown option {other}")),
        };
        if let Err(e) = parsed {
            return usage_error(&e);
        }
    }
    let (Some(addr), Some(prefix)) = (addr, prefix) else {
        return usage_error("h2c needs --addr and --path-prefix");
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netprobe: runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(h2c_streams(addr, &prefix, streams)) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            0
        }
        Err(e) => {
            eprintln!("netprobe: h2c: {e}");
            1
        }
    }
}

async fn h2c_streams(
    addr: SocketAddr,
    prefix: &str,
    streams: usize,
) -> Result<Vec<String>, String> {
    use http_body_util::{BodyExt, Empty};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("h2c handshake: {e}"))?;
    tokio::spawn(connection);
    let requests = (0..streams).map(|i| {
        let mut sender = sender.clone();
        let uri = format!("http://{addr}{prefix}{i}");
        async move {
            let request = hyper::Request::get(&uri)
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(format!(
                "STREAM {i} {status} {}",
                String::from_utf8_lossy(&body).trim()
            ))
        }
    });
    futures::future::join_all(requests)
        .await
        .into_iter()
        .collect()
}
