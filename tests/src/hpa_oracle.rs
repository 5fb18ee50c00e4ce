//! Kubernetes' own HPA controller as a test oracle: a second kube-controller-manager, built from
//! the same pinned sources as the test cluster's, running only the `horizontalpodautoscaling`
//! controller against the test API server. It syncs every second and logs at `-v=4`, where each
//! sync prints the HPA's unclamped proposal (`"Proposing desired replicas" desiredReplicas=N ...
//! scaleTarget="StatefulSet/ns/name"`), so a test can read what the HPA would do even when
//! `minReplicas = maxReplicas` pins the workload. The tolerance, CPU initialization period and
//! initial readiness delay are kube-controller-manager's defaults, on purpose: the controller
//! claims to apply those.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use k8s_openapi::jiff::{self, Timestamp, tz::TimeZone};

use crate::{ChildGuard, TestDir, cluster::TestCluster, spawn};

pub struct HpaOracle {
    _child: ChildGuard,
    dir: TestDir,
}

/// What the HPA made of one sync, from its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HpaSync {
    /// `desiredReplicas` before min/max and behavior clamp it.
    Proposal(i32),
    /// The HPA could not compute a proposal (its error, as logged).
    Failed(String),
}

impl HpaOracle {
    /// Starts the HPA controller (stopped on drop). Only one should run per cluster: two would
    /// both write every HPA's status.
    pub fn start(cluster: &TestCluster) -> Result<Self> {
        let dir = TestDir::new("hpa-oracle")?;
        let log = std::fs::File::create(dir.join("kube-controller-manager.log"))?;
        let mut cmd = Command::new(cluster.binaries().kube_controller_manager());
        cmd.arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
            .arg("--controllers=horizontalpodautoscaling")
            .arg("--horizontal-pod-autoscaler-sync-period=1s")
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            // The test cluster's own kube-controller-manager runs without election too; this one
            // runs a controller that one does not, so both may run.
            .arg("--leader-elect=false")
            .arg("-v=4")
            // Proposals are read back from the log, and timed by its lines' times.
            .arg("--log-flush-frequency=200ms")
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn(cmd, None)?;
        Ok(Self { _child: child, dir })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kube-controller-manager.log")).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let mut tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.reverse();
        tail.join("\n")
    }

    /// The syncs logged for `scale_target` (`Kind/namespace/name`), in order, with the time
    /// each was logged.
    pub fn syncs(&self, scale_target: &str) -> Vec<(Timestamp, HpaSync)> {
        let target = format!("scaleTarget=\"{scale_target}\"");
        let failed = format!(
            "failed to compute desired number of replicas based on listed metrics for {scale_target}"
        );
        let year = Timestamp::now().to_zoned(TimeZone::UTC).year();
        self.log()
            .lines()
            .filter_map(|line| {
                let sync =
                    if line.contains("\"Proposing desired replicas\"") && line.contains(&target) {
                        HpaSync::Proposal(
                            line.split("desiredReplicas=")
                                .nth(1)?
                                .split(|c: char| !c.is_ascii_digit() && c != '-')
                                .next()?
                                .parse()
                                .ok()?,
                        )
                    } else if line.contains(&failed) {
                        HpaSync::Failed(line.to_string())
                    } else {
                        return None;
                    };
                Some((klog_time(line, year)?, sync))
            })
            .collect()
    }

    /// Waits until `more` syncs for `scale_target` were logged after `after`, and returns the
    /// last. klog buffers its output, so it is the time in each line that counts, not when the
    /// line shows up. With `more = 3`, the second was computed wholly from inputs written before
    /// `after` (it started once the first, logged after `after`, had finished), and the status it
    /// wrote is in place (a sync writes status after it logs; syncs of one HPA run one after
    /// another).
    pub fn wait_syncs(
        &self,
        scale_target: &str,
        after: Timestamp,
        more: usize,
        timeout: Duration,
    ) -> Result<HpaSync> {
        let started = Instant::now();
        loop {
            let syncs: Vec<HpaSync> = self
                .syncs(scale_target)
                .into_iter()
                .filter(|(at, _)| *at > after)
                .map(|(_, sync)| sync)
                .collect();
            if syncs.len() >= more
                && let Some(last) = syncs.last()
            {
                return Ok(last.clone());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the HPA controller synced {} times for {scale_target} after {after} (waiting \
                     for {more}) within {timeout:?}; end of its log:\n{}",
                    syncs.len(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The time of a klog line (`I1201 23:05:11.580838   123 file.go:1] ...`, UTC: the process runs
/// with `TZ=UTC`) in `year`.
fn klog_time(line: &str, year: i16) -> Option<Timestamp> {
    let mut fields = line.split_whitespace();
    let date = fields.next()?.get(1..)?;
    let time = fields.next()?;
    let (month, day): (u8, u8) = (date.get(..2)?.parse().ok()?, date.get(2..4)?.parse().ok()?);
    let civil = jiff::civil::DateTime::strptime(
        "%Y-%m-%d %H:%M:%S%.f",
        format!("{year}-{month:02}-{day:02} {time}"),
    )
    .ok()?;
    civil.to_zoned(TimeZone::UTC).ok().map(|z| z.timestamp())
}
