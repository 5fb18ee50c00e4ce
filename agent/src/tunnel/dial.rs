//! Every outbound socket of the tunnel (remote backends, token endpoints, raw TCP) carries the
//! bypass mark, so this node's eBPF never redirects it: a remote backend whose address is itself
//! an offloaded Service is reached for real instead of looping back into the tunnel.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// How the tunnel connects out.
#[derive(Debug, Clone, Copy)]
pub struct Dialer {
    /// SO_MARK of every socket; 0 for none.
    pub mark: u32,
    pub timeout: Duration,
}

impl Dialer {
    /// Connects to `target` (`host:port`, `[v6]:port`), trying each resolved address in turn,
    /// all within the connect timeout.
    pub async fn dial(&self, target: &str) -> io::Result<TcpStream> {
        let attempt = async {
            let mut last = None;
            for addr in tokio::net::lookup_host(target).await? {
                match self.connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{target} resolves to no address"),
                )
            }))
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.timeout),
                )
            })?
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if self.mark != 0 {
            set_mark(&socket, self.mark)?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// SO_MARK before connect(): the connect4/6 programs see it. Needs CAP_NET_ADMIN.
fn set_mark(socket: &TcpSocket, mark: u32) -> io::Result<()> {
    // SAFETY: a valid socket fd and an option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("setting the bypass mark {mark:#x} (SO_MARK needs CAP_NET_ADMIN): {e}"),
        ))
    }
}

/// The dialer as hyper's pooled client connects (HTTPS remotes, token endpoints); TLS is layered
/// on top by hyper-rustls.
impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = *self;
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}"))
            })?;
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            // `Uri::host` keeps an IPv6 literal's brackets, as lookup_host wants them.
            let stream = dialer.dial(&format!("{host}:{port}")).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
