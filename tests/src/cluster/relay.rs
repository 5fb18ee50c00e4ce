//! A TCP relay from a test network namespace to the API server, for a process that must live in
//! that namespace (to reach a remote there, such as the fake Beamlit) and still talk to the
//! control plane on the machine's loopback. The listener is made inside the namespace (a thread
//! that joined it); connections to the API server are made from a thread that never did, so each
//! socket lives in the namespace it belongs to and nothing is routed between them.
use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::Netns;

pub struct ApiRelay {
    ip: std::net::IpAddr,
    port: u16,
    stop: Arc<AtomicBool>,
}

impl ApiRelay {
    /// Listens on 127.0.0.1 (a free port) inside `netns` and forwards to `upstream`.
    pub fn start(netns: &Netns, upstream: SocketAddr) -> Result<Self> {
        Self::start_on(netns, SocketAddr::from(([127, 0, 0, 1], 0)), upstream)
    }

    /// Listens on `listen` inside `netns` (an address of that namespace) and forwards to
    /// `upstream`.
    pub fn start_on(netns: &Netns, listen: SocketAddr, upstream: SocketAddr) -> Result<Self> {
        netns.ip(&["link", "set", "lo", "up"])?;
        let listener = netns
            .enter(move || TcpListener::bind(listen))?
            .with_context(|| format!("listening on {listen} inside the namespace"))?;
        listener.set_nonblocking(true)?;
        let (ip, port) = (listener.local_addr()?.ip(), listener.local_addr()?.port());
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        std::thread::spawn(move || {
                            let _ = relay(inside, upstream);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self { ip, port, stop })
    }

    /// The address to use inside the namespace.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// A copy of `kubeconfig` whose server is this relay (same CA and credentials: the API
    /// server's certificate names 127.0.0.1, whatever the port).
    pub fn kubeconfig(&self, kubeconfig: &str, server: &str) -> String {
        kubeconfig.replace(server, &format!("https://{}", self.addr()))
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn relay(inside: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    inside.set_nonblocking(false)?;
    let outside = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    let (mut a_read, mut a_write) = (inside.try_clone()?, inside);
    let (mut b_read, mut b_write) = (outside.try_clone()?, outside);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut a_read, &mut b_write);
        let _ = b_write.shutdown(Shutdown::Write);
    });
    let _ = io::copy(&mut b_read, &mut a_write);
    let _ = a_write.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}
