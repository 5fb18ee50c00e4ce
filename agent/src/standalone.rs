//! Standalone mode: the maps (and the tunnel) follow a routes file, re-read when it changes.
//! No Kubernetes.
use std::{path::PathBuf, time::Duration};

use tracing::{error, info, warn};

use crate::{apply::Applier, dataplane::Dataplane, routes};

pub struct Standalone {
    pub routes_path: PathBuf,
    /// How often the file is checked for changes (content, not mtime: ConfigMap mounts swap
    /// symlinks and can keep timestamps).
    pub reload_interval: Duration,
    applier: Applier,
}

impl Standalone {
    pub fn new(routes_path: PathBuf, reload_interval: Duration, applier: Applier) -> Self {
        Self {
            routes_path,
            reload_interval,
            applier,
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
        let set = routes::parse(&self.routes_path.display().to_string(), text)?;
        let applied = self.applier.apply(dataplane, set).await?;
        info!(
            services = applied.services,
            updated = applied.updated,
            removed = applied.removed,
            "routes applied"
        );
        Ok(())
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
        let mut retry_at: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    dataplane.flush_logs();
                    match std::fs::read_to_string(&self.routes_path) {
                        // An unreachable tunnel process is tried again with the same routes,
                        // at most once a second.
                        Ok(text)
                            if text == last_text
                                && self.applier.tunnel_unreachable()
                                && retry_at.is_none_or(|at| std::time::Instant::now() >= at) =>
                        {
                            retry_at = Some(std::time::Instant::now() + Duration::from_secs(1));
                            if let Err(e) = self.apply_text(dataplane, &text).await {
                                error!("{e:#}; keeping the last good routes");
                            }
                        }
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
        self.applier.stop_tunnel(dataplane).await;
        info!(
            "exiting; the programs stay attached and the maps pinned, so redirection continues \
             (`beamlit-agent cleanup` removes them)"
        );
        Ok(())
    }
}
