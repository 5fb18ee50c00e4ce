//! Standalone mode: the maps follow a routes file, re-read when it changes. No Kubernetes.
use std::{path::PathBuf, time::Duration};

use tracing::{error, info, warn};

use crate::{dataplane::Dataplane, plan, routes};

pub struct Standalone {
    pub routes_path: PathBuf,
    /// How often the file is checked for changes (content, not mtime: ConfigMap mounts swap
    /// symlinks and can keep timestamps).
    pub reload_interval: Duration,
}

impl Standalone {
    /// Applies the routes file now; fails (leaving the maps as they were) if it is invalid.
    pub fn apply_file(&self, dataplane: &mut Dataplane) -> anyhow::Result<String> {
        let text = std::fs::read_to_string(&self.routes_path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", self.routes_path.display()))?;
        self.apply_text(dataplane, &text)?;
        Ok(text)
    }

    fn apply_text(&self, dataplane: &mut Dataplane, text: &str) -> anyhow::Result<()> {
        let desired = routes::parse(&self.routes_path.display().to_string(), text)?;
        let current = dataplane.maps.services()?;
        let changes = plan::plan(&current, &desired)?;
        dataplane.maps.apply(&changes)?;
        let removed = changes
            .iter()
            .filter(|c| matches!(c, plan::Change::Remove(_)))
            .count();
        info!(
            services = desired.len(),
            updated = changes.len() - removed,
            removed,
            "routes applied"
        );
        for route in &desired {
            info!(
                service = %route.service,
                offload_percent = route.share.percent(),
                tunnel = %route.tunnel,
                "route"
            );
        }
        Ok(())
    }

    /// Watches the file until SIGINT/SIGTERM. An invalid edit is reported and ignored: the last
    /// good routes stay in the maps.
    pub async fn run(
        &self,
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
                            if let Err(e) = self.apply_text(dataplane, &text) {
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
        info!(
            "exiting; the programs stay attached and the maps pinned, so redirection continues \
             (`beamlit-agent cleanup` removes them)"
        );
        Ok(())
    }
}
