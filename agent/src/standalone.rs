//! Standalone mode: the maps (and the tunnel) follow a routes file, re-read when it changes.
//! No Kubernetes.
use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tracing::{debug, error, info, warn};

use crate::{
    dataplane::Dataplane,
    plan,
    routes::{self, RouteSet},
    tunnel::{Tunnel, TunnelConfig, metrics::Metrics},
};

pub struct Standalone {
    pub routes_path: PathBuf,
    /// How often the file is checked for changes (content, not mtime: ConfigMap mounts swap
    /// symlinks and can keep timestamps).
    pub reload_interval: Duration,
    /// Where the tunnel's sockets live (see [`TunnelConfig::netns`]).
    pub tunnel_netns: Option<PathBuf>,
    pub bpffs_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    pub tunnel_workers: usize,
    tunnel: Option<Tunnel>,
    /// The routes last applied to the maps (an invalid edit leaves them in force).
    applied: Option<RouteSet>,
}

impl Standalone {
    pub fn new(
        routes_path: PathBuf,
        reload_interval: Duration,
        tunnel_netns: Option<PathBuf>,
        bpffs_dir: PathBuf,
        metrics: Arc<Metrics>,
        tunnel_workers: usize,
    ) -> Self {
        Self {
            routes_path,
            reload_interval,
            tunnel_netns,
            bpffs_dir,
            metrics,
            tunnel_workers,
            tunnel: None,
            applied: None,
        }
    }

    /// Applies the routes file now; fails (leaving the maps as they were) if it is invalid.
    pub async fn apply_file(&mut self, dataplane: &mut Dataplane) -> anyhow::Result<String> {
        let text = std::fs::read_to_string(&self.routes_path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", self.routes_path.display()))?;
        self.apply_text(dataplane, &text).await?;
        Ok(text)
    }

    async fn apply_text(&mut self, dataplane: &mut Dataplane, text: &str) -> anyhow::Result<()> {
        let mut set = routes::parse(&self.routes_path.display().to_string(), text)?;
        let accepting = self.update_tunnel(&set).await?;
        mark_readiness(&mut set, &accepting);
        let current = dataplane.maps.services()?;
        let changes = plan::plan(&current, &set.routes)?;
        dataplane.maps.apply(&changes)?;
        self.applied = Some(set.clone());
        let removed = changes
            .iter()
            .filter(|c| matches!(c, plan::Change::Remove(_)))
            .count();
        info!(
            services = set.routes.len(),
            updated = changes.len() - removed,
            removed,
            "routes applied"
        );
        for route in &set.routes {
            let remote = set.backends.get(&route.service).map(|(_, b)| b.authority());
            // Per route at debug: a node can hold thousands.
            debug!(
                service = %route.service,
                offload_percent = route.share.percent(),
                tunnel = %route.tunnel,
                tunnel_ready = route.tunnel_ready,
                remote = remote.as_deref().unwrap_or("(external tunnel)"),
                "route"
            );
        }
        Ok(())
    }

    async fn update_tunnel(&mut self, set: &RouteSet) -> anyhow::Result<BTreeSet<SocketAddr>> {
        if set.backends.is_empty() && self.tunnel.is_none() {
            return Ok(BTreeSet::new());
        }
        if self.tunnel.is_none() {
            let config = TunnelConfig {
                netns: self.tunnel_netns.clone(),
                bpffs_dir: self.bpffs_dir.clone(),
                extra_ca_file: set.extra_ca_file.clone(),
                workers: self.tunnel_workers,
            };
            self.tunnel = Some(Tunnel::start(&config, self.metrics.clone())?);
            info!("egress tunnel started");
        }
        match &self.tunnel {
            Some(tunnel) => Ok(tunnel.update(&set.backends).await),
            None => Ok(BTreeSet::new()),
        }
    }

    /// Watches the file until SIGINT/SIGTERM. An invalid edit is reported and ignored: the last
    /// good routes stay in the maps.
    pub async fn run(
        &mut self,
        dataplane: &mut Dataplane,
        mut last_text: String,
    ) -> anyhow::Result<()> {
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(self.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    dataplane.flush_logs();
                    match std::fs::read_to_string(&self.routes_path) {
                        Ok(text) if text != last_text => {
                            if let Err(e) = self.apply_text(dataplane, &text).await {
                                error!("{e:#}; keeping the last good routes");
                            }
                            // Remember even a bad version, so it is reported once, not every tick.
                            last_text = text;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if !last_text.is_empty() {
                                warn!(
                                    "cannot read {}: {e}; keeping the last good routes",
                                    self.routes_path.display()
                                );
                                last_text.clear();
                            }
                        }
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
            }
        }
        self.stop_tunnel(dataplane).await;
        info!(
            "exiting; the programs stay attached and the maps pinned, so redirection continues \
             (`beamlit-agent cleanup` removes them)"
        );
        Ok(())
    }

    /// Before the tunnel goes away, its services stop being redirected (fail open to the local
    /// path), so no new connection is sent to a closed port.
    async fn stop_tunnel(&mut self, dataplane: &mut Dataplane) {
        if self.tunnel.is_none() {
            return;
        }
        // The routes in force, not the file's latest text, which may be an invalid edit.
        if let Some(mut set) = self.applied.clone() {
            mark_readiness(&mut set, &BTreeSet::new());
            let result = dataplane
                .maps
                .services()
                .map_err(anyhow::Error::from)
                .and_then(|current| Ok(plan::plan(&current, &set.routes)?))
                .and_then(|changes| Ok(dataplane.maps.apply(&changes)?));
            match result {
                Ok(()) => info!("tunnel stopping: its services now fail open to the local path"),
                Err(e) => warn!("could not mark the tunnel not ready: {e:#}"),
            }
        }
        self.tunnel = None;
    }
}

/// Routes served by the agent's own tunnel are ready only while their listener accepts.
fn mark_readiness(set: &mut RouteSet, accepting: &BTreeSet<SocketAddr>) {
    for route in &mut set.routes {
        if set.backends.contains_key(&route.service) {
            route.tunnel_ready = accepting.contains(&route.tunnel);
        }
    }
}

/// `/metrics` (Prometheus text) and `/healthz` on `addr`, in the agent's own namespace.
pub async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::{Response, StatusCode, body::Bytes};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics address {addr}: {e}"))?;
    info!(%addr, "serving /metrics");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/metrics" => (StatusCode::OK, metrics.encode()),
                            "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                            _ => (StatusCode::NOT_FOUND, "try /metrics\n".to_string()),
                        };
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
