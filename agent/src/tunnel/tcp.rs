//! Forward layer, raw mode: bytes pass through to the backend's host:port unchanged.
use tokio::net::TcpStream;

use super::{dial::Dialer, metrics::Metrics};

pub async fn forward(
    mut client: TcpStream,
    dialer: Dialer,
    target: &str,
    service: &str,
    metrics: &Metrics,
) -> Result<(), String> {
    let mut upstream = dialer
        .dial(target)
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let (sent, received) = tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map_err(|e| format!("relaying to {target}: {e}"))?;
    metrics.bytes(service, "to_remote", sent);
    metrics.bytes(service, "from_remote", received);
    Ok(())
}
