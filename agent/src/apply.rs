//! Applying a set of routes in three steps, so that no connection meets a tunnel that cannot
//! serve it: the tunnel gains what the new routes need (started on first need, its listeners
//! opened) while keeping what the maps still redirect to it; then the maps, with each route of
//! the agent's own tunnel marked ready only if its listener accepts; then the tunnel drops what
//! the maps no longer send it. Shared by standalone mode (a routes file) and cluster mode
//! (ModelDeployments).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
};

use tracing::{debug, info, warn};

use crate::{
    dataplane::Dataplane,
    plan,
    routes::RouteSet,
    tunnel::{
        Tunnel, TunnelConfig, backend::RemoteBackend, control::TunnelProcess, limits::Limits,
        metrics::Metrics,
    },
};

/// Service → (tunnel address, remote backend): what the agent's tunnel serves.
type Backends = BTreeMap<SocketAddr, (SocketAddr, RemoteBackend)>;

pub struct Applier {
    /// Where the tunnel's sockets live (see [`TunnelConfig::netns`]).
    pub tunnel_netns: Option<PathBuf>,
    pub bpffs_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    pub tunnel_workers: usize,
    pub tunnel_limits: Limits,
    /// The tunnel runs in a process of its own (`beamlit-agent tunnel`), reached on this unix
    /// socket; `None`: in this process.
    pub tunnel_socket: Option<PathBuf>,
    tunnel: Option<TunnelHandle>,
    /// The routes last applied to the maps.
    applied: Option<RouteSet>,
}

/// The tunnel in this process, or a tunnel process driven over its control socket.
enum TunnelHandle {
    Local(Tunnel),
    Process(TunnelProcess),
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
        tunnel_limits: Limits,
    ) -> Self {
        Self {
            tunnel_netns,
            bpffs_dir,
            metrics,
            tunnel_workers,
            tunnel_limits,
            tunnel_socket: None,
            tunnel: None,
            applied: None,
        }
    }

    /// Drives a tunnel process listening on `socket` instead of running the tunnel here.
    pub fn with_tunnel_socket(mut self, socket: Option<PathBuf>) -> Self {
        self.tunnel_socket = socket;
        self
    }

    /// Makes the maps (and the tunnel) hold exactly `set`; on error the maps keep what they had.
    pub async fn apply(
        &mut self,
        dataplane: &mut Dataplane,
        mut set: RouteSet,
    ) -> anyhow::Result<Applied> {
        let old = self.applied.as_ref().map(|a| &a.backends);
        let staged = Staged::new(old, &set.backends);
        let accepting = self
            .update_tunnel(&staged.backends, &staged.listeners, &set)
            .await?;
        mark_readiness(&mut set, &accepting);
        let current = dataplane.maps.services()?;
        let changes = plan::plan(&current, &set.routes)?;
        // On error the maps keep what they had, and the tunnel still serves all of it.
        dataplane.maps.apply(&changes)?;
        if staged.shrinks(&set.backends) {
            self.update_tunnel(&set.backends, &BTreeSet::new(), &set)
                .await?;
        }
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

    async fn update_tunnel(
        &mut self,
        backends: &Backends,
        also_listen: &BTreeSet<SocketAddr>,
        set: &RouteSet,
    ) -> anyhow::Result<BTreeSet<SocketAddr>> {
        if backends.is_empty() && self.tunnel.is_none() {
            return Ok(BTreeSet::new());
        }
        if self.tunnel.is_none() {
            self.tunnel = Some(match &self.tunnel_socket {
                Some(socket) => TunnelHandle::Process(TunnelProcess::new(
                    socket.clone(),
                    self.bpffs_dir.clone(),
                )),
                None => {
                    let config = TunnelConfig {
                        netns: self.tunnel_netns.clone(),
                        bpffs_dir: self.bpffs_dir.clone(),
                        extra_ca_file: set.extra_ca_file.clone(),
                        workers: self.tunnel_workers,
                        limits: self.tunnel_limits,
                    };
                    let tunnel = Tunnel::start(&config, self.metrics.clone())?;
                    info!("egress tunnel started");
                    TunnelHandle::Local(tunnel)
                }
            });
        }
        match &mut self.tunnel {
            Some(TunnelHandle::Local(tunnel)) => Ok(tunnel.update(backends, also_listen).await),
            Some(TunnelHandle::Process(process)) => Ok(process.update(backends, also_listen).await),
            None => Ok(BTreeSet::new()),
        }
    }

    /// Whether the last apply could not reach the tunnel process (its services fail open):
    /// the caller should apply again soon, not only at the next change.
    pub fn tunnel_unreachable(&self) -> bool {
        matches!(&self.tunnel, Some(TunnelHandle::Process(p)) if !p.connected())
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

/// What the tunnel serves while the maps change from `old` to `new`: every backend of `new`,
/// plus the services only `old` has (the maps redirect them until they are rewritten), and a
/// listener on every tunnel address of either (a service moved to another address is still
/// sent to the old one until then).
#[derive(Debug, PartialEq, Eq)]
struct Staged {
    backends: Backends,
    listeners: BTreeSet<SocketAddr>,
}

impl Staged {
    fn new(old: Option<&Backends>, new: &Backends) -> Self {
        let mut backends = new.clone();
        let mut listeners = BTreeSet::new();
        for (service, (tunnel, backend)) in old.into_iter().flatten() {
            listeners.insert(*tunnel);
            backends
                .entry(*service)
                .or_insert_with(|| (*tunnel, backend.clone()));
        }
        Self {
            backends,
            listeners,
        }
    }

    /// Whether serving exactly `new` drops a route or a listener the staged tunnel has.
    fn shrinks(&self, new: &Backends) -> bool {
        let new_listeners: BTreeSet<SocketAddr> = new.values().map(|(t, _)| *t).collect();
        self.backends.len() != new.len() || !self.listeners.is_subset(&new_listeners)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::backend::{
        Auth, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEADER_TIMEOUT, Mode, Scheme,
    };

    fn backend(host: &str) -> RemoteBackend {
        RemoteBackend {
            mode: Mode::Http,
            scheme: Scheme::Https,
            host: host.into(),
            port: 443,
            path_prefix: String::new(),
            headers_to_add: Vec::new(),
            auth: Auth::None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn backends(rows: &[(&str, &str, &str)]) -> Backends {
        rows.iter()
            .map(|(svc, tunnel, host)| (addr(svc), (addr(tunnel), backend(host))))
            .collect()
    }

    #[test]
    fn the_tunnel_keeps_what_the_maps_still_redirect_until_they_are_rewritten() {
        const A: &str = "10.96.0.10:80";
        const B: &str = "10.96.0.11:80";
        const T1: &str = "10.0.0.1:15001";
        const T2: &str = "10.0.0.1:15002";
        // (old, new, staged backends, staged extra listeners, shrinks afterwards)
        type Case = (
            Option<Backends>,
            Backends,
            Backends,
            Vec<&'static str>,
            bool,
        );
        let cases: Vec<Case> = vec![
            // First apply: nothing to keep.
            (
                None,
                backends(&[(A, T1, "r1")]),
                backends(&[(A, T1, "r1")]),
                vec![],
                false,
            ),
            // A service added: served before the maps send it anything.
            (
                Some(backends(&[(A, T1, "r1")])),
                backends(&[(A, T1, "r1"), (B, T1, "r2")]),
                backends(&[(A, T1, "r1"), (B, T1, "r2")]),
                vec![T1],
                false,
            ),
            // A service removed: still served while the maps redirect it, dropped after.
            (
                Some(backends(&[(A, T1, "r1"), (B, T1, "r2")])),
                backends(&[(B, T1, "r2")]),
                backends(&[(A, T1, "r1"), (B, T1, "r2")]),
                vec![T1],
                true,
            ),
            // A changed backend applies at once (the new one serves both old and new entries).
            (
                Some(backends(&[(A, T1, "r1")])),
                backends(&[(A, T1, "r9")]),
                backends(&[(A, T1, "r9")]),
                vec![T1],
                false,
            ),
            // A service moved to another tunnel address: the old listener stays until the map
            // points at the new one.
            (
                Some(backends(&[(A, T1, "r1")])),
                backends(&[(A, T2, "r1")]),
                backends(&[(A, T2, "r1")]),
                vec![T1],
                true,
            ),
            // Everything removed.
            (
                Some(backends(&[(A, T1, "r1")])),
                Backends::new(),
                backends(&[(A, T1, "r1")]),
                vec![T1],
                true,
            ),
        ];
        for (i, (old, new, want_backends, want_listeners, shrinks)) in cases.iter().enumerate() {
            let staged = Staged::new(old.as_ref(), new);
            assert_eq!(&staged.backends, want_backends, "case {i}");
            let listeners: BTreeSet<SocketAddr> = want_listeners.iter().map(|s| addr(s)).collect();
            assert_eq!(staged.listeners, listeners, "case {i}");
            assert_eq!(staged.shrinks(new), *shrinks, "case {i}");
        }
    }
}
