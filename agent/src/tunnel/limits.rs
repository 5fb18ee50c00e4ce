//! Per-client limits. The tunnel faces every pod on the node, so no one client may hold it: a
//! cap on the connections open per client address, a deadline for each request head (which also
//! closes idle keep-alive connections), and an idle timeout for byte streams (raw TCP mode,
//! upgraded connections) that moved nothing either way.
use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

// The runtime's clock (as the sleeps use it), so the timeout is testable with paused time.
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From accepting a connection (or finishing a response on it) to a complete request head.
    pub header_timeout: Duration,
    /// A raw TCP or upgraded connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once from one client address; more are reset.
    pub max_connections_per_client: usize,
}

pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        }
    }
}

/// Connections open per client address.
#[derive(Debug)]
pub struct ClientSlots {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One client connection's place; given back on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ClientSlots>,
    client: IpAddr,
}

impl ClientSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `client`, or `None` when it already holds the maximum.
    pub fn take(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        // A v4-mapped client address counts as the IPv4 client it is.
        let client = client.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(client).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: self.clone(),
            client,
        })
    }

    /// Connections open now, over every client.
    pub fn total(&self) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.values().sum()
    }

    /// Connections `client` holds now.
    pub fn held(&self, client: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&client.to_canonical()).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.client);
            }
        }
    }
}

/// When a relayed byte last moved, in milliseconds since `base`.
struct IdleClock {
    base: Instant,
    last_ms: AtomicU64,
}

impl IdleClock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        )
    }
}

/// A stream that notes on `clock` every read or write that moved bytes.
struct Touched<'a, T> {
    inner: &'a mut T,
    clock: &'a IdleClock,
}

impl<T: AsyncRead + Unpin> AsyncRead for Touched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// `tokio::io::copy_bidirectional`, ended with a `TimedOut` error once no byte moved either way
/// for `idle`. Returns the bytes copied a → b and b → a.
pub async fn relay_until_idle<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = IdleClock::new();
    let mut a = Touched {
        inner: a,
        clock: &clock,
    };
    let mut b = Touched {
        inner: b,
        clock: &clock,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let wait = idle.saturating_sub(clock.idle_for());
        tokio::select! {
            copied = &mut copy => return copied,
            () = tokio::time::sleep(wait) => {
                if clock.idle_for() >= idle {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing moved either way for {idle:?}"),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn each_client_address_gets_at_most_its_slots_back_on_drop() {
        let slots = ClientSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = slots.take(a).expect("first");
        let second = slots
            .take(mapped)
            .expect("second: the same client, v4-mapped");
        assert!(slots.take(a).is_none(), "a third one from the same client");
        let other = slots.take(b).expect("another client is not affected");
        drop(first);
        assert_eq!(slots.held(a), 1);
        let again = slots.take(a).expect("a slot given back is usable");
        drop((second, again, other));
        assert_eq!((slots.held(a), slots.held(b)), (0, 0));
        assert!(
            slots.held.lock().expect("lock").is_empty(),
            "no entry left behind"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_ends_when_nothing_moves_for_the_idle_timeout() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut remote, mut remote_far) = tokio::io::duplex(64);
        let relay = tokio::spawn(async move {
            relay_until_idle(&mut client_far, &mut remote_far, Duration::from_secs(10)).await
        });
        // Traffic every 6 s keeps it alive past the timeout.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"x").await.expect("write");
            let mut byte = [0u8; 1];
            remote.read_exact(&mut byte).await.expect("relayed");
        }
        let started = tokio::time::Instant::now();
        let ended = relay.await.expect("task");
        let err = ended.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(9) && waited <= Duration::from_secs(11),
            "{waited:?}"
        );
    }
}
