//! Forward layer, raw mode: bytes pass through to the backend's host:port unchanged.
use std::time::Duration;

use tokio::net::TcpStream;

use super::{dial::Dialer, limits::relay_until_idle, metrics::Metrics};

pub async fn forward(
    mut client: TcpStream,
    dialer: Dialer,
    target: &str,
    service: &str,
    metrics: &Metrics,
    idle_timeout: Duration,
) -> Result<(), String> {
    let mut upstream = dialer
        .dial(target)
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let (sent, received) = relay_until_idle(&mut client, &mut upstream, idle_timeout)
        .await
        .map_err(|e| format!("relaying to {target}: {e}"))?;
    metrics.bytes(service, "to_remote", sent);
    metrics.bytes(service, "from_remote", received);
    Ok(())
}
