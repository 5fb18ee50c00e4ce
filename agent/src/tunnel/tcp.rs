//! Forward layer, raw mode: bytes pass through to the backend's host:port unchanged.
use tokio::net::TcpStream;

use super::{backend::RemoteBackend, metrics::Metrics};

pub async fn forward(
    mut client: TcpStream,
    backend: &RemoteBackend,
    service: &str,
    metrics: &Metrics,
) -> Result<(), String> {
    let target = backend.host_port();
    let mut upstream = tokio::time::timeout(backend.connect_timeout, TcpStream::connect(&target))
        .await
        .map_err(|_| {
            format!(
                "connecting to {target}: no answer within {:?}",
                backend.connect_timeout
            )
        })?
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let _ = upstream.set_nodelay(true);
    let (sent, received) = tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map_err(|e| format!("relaying to {target}: {e}"))?;
    metrics.bytes(service, "to_remote", sent);
    metrics.bytes(service, "from_remote", received);
    Ok(())
}
