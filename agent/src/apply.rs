//! Applying a set of routes: the tunnel first (started on first need, its listeners opened),
//! then the maps, with each route of the agent's own tunnel marked ready only if its listener
//! accepts. Shared by standalone mode (a routes file) and cluster mode (ModelDeployments).
use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc};

use tracing::{debug, info, warn};

use crate::{
    dataplane::Dataplane,
    plan,
    routes::RouteSet,
    tunnel::{Tunnel, TunnelConfig, metrics::Metrics},
};

pub struct Applier {
    /// Where the tunnel's sockets live (see [`TunnelConfig::netns`]).
    pub tunnel_netns: Option<PathBuf>,
    pub bpffs_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    pub tunnel_workers: usize,
    tunnel: Option<Tunnel>,
    /// The routes last applied to the maps.
    applied: Option<RouteSet>,
}

/// What one apply changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: usize,
    pub updated: usize,
    pub removed: usize,
}

impl Applier {
    pub fn new(
        tunnel_netns: Option<PathBuf>,
        bpffs_dir: PathBuf,
        metrics: Arc<Metrics>,
        tunnel_workers: usize,
    ) -> Self {
        Self {
            tunnel_netns,
            bpffs_dir,
            metrics,
            tunnel_workers,
            tunnel: None,
            applied: None,
        }
    }

    /// Makes the maps (and the tunnel) hold exactly `set`; on error the maps keep what they had.
    pub async fn apply(
        &mut self,
        dataplane: &mut Dataplane,
        mut set: RouteSet,
    ) -> anyhow::Result<Applied> {
        let accepting = self.update_tunnel(&set).await?;
        mark_readiness(&mut set, &accepting);
        let current = dataplane.maps.services()?;
        let changes = plan::plan(&current, &set.routes)?;
        dataplane.maps.apply(&changes)?;
        let removed = changes
            .iter()
            .filter(|c| matches!(c, plan::Change::Remove(_)))
            .count();
        let applied = Applied {
            services: set.routes.len(),
            updated: changes.len() - removed,
            removed,
        };
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
        self.applied = Some(set);
        Ok(applied)
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

    /// Before the tunnel goes away, its services stop being redirected (fail open to the local
    /// path), so no new connection is sent to a closed port.
    pub async fn stop_tunnel(&mut self, dataplane: &mut Dataplane) {
        if self.tunnel.is_none() {
            return;
        }
        // The routes in force, not whatever was asked last (an invalid edit, say).
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
