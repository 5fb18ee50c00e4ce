//! Leader election on a `coordination.k8s.io` Lease, so that of several controller replicas only
//! one writes decisions. Every write carries the Lease's resourceVersion: two candidates that read
//! the same expired Lease cannot both take it.
//!
//! Time is only ever compared on one clock, as client-go does: a candidate never compares the
//! holder's `renewTime` (the holder's clock) with its own. It notes when *it* last saw the Lease
//! record change, and takes the Lease only once it has seen no change for the Lease's duration.
//! The holder gives up when it could not renew within the renew deadline, which is shorter than
//! the duration: it has stopped before anyone else may take over.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal; shorter than
    /// `lease_duration`, so that it stops before a candidate may take over.
    pub renew_deadline: Duration,
    /// How often the holder renews and candidates retry (well below the deadline).
    pub renew_every: Duration,
}

impl LeaderConfig {
    /// client-go's proportions (15 s / 10 s / 2 s by default there): renew deadline two thirds
    /// of the duration, a try every fifth.
    pub fn timings(lease_duration: Duration) -> (Duration, Duration) {
        (lease_duration * 2 / 3, lease_duration / 5)
    }
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Leading,
    /// Another live holder.
    Following(String),
}

/// The parts of a Lease that change when its holder renews or changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: String,
    renew_time: Option<jiff::Timestamp>,
    acquire_time: Option<jiff::Timestamp>,
    transitions: i32,
    duration_secs: i32,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Self {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
            duration_secs: spec.lease_duration_seconds.unwrap_or(15),
        }
    }
}

/// A Lease record and when this process (by its own monotonic clock) first saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observation {
    record: Record,
    seen_at: Instant,
}

/// Keeps the previous observation while the record is unchanged; a new record is seen now.
fn observe(previous: Option<Observation>, record: Record, now: Instant) -> Observation {
    match previous {
        Some(p) if p.record == record => p,
        _ => Observation {
            record,
            seen_at: now,
        },
    }
}

/// Whether `identity` may write the Lease (take or renew it) at `now`: it is ours, free, or
/// nobody has seen it change for its whole duration. Otherwise the live holder.
fn may_write(observed: &Observation, identity: &str, now: Instant) -> Result<(), String> {
    let holder = &observed.record.holder;
    if holder.is_empty() || holder == identity {
        return Ok(());
    }
    let held =
        Duration::from_secs(u64::try_from(observed.record.duration_secs.max(1)).unwrap_or(15));
    if now.saturating_duration_since(observed.seen_at) >= held {
        Ok(())
    } else {
        Err(holder.clone())
    }
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    observed: Mutex<Option<Observation>>,
}

impl Elector {
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: Mutex::new(None),
        }
    }

    /// Blocks until this process holds the Lease.
    pub async fn acquire(&self) -> kube::Result<()> {
        let mut announced = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => {
                    info!(lease = %self.config.name, identity = %self.config.identity, "became the leader");
                    return Ok(());
                }
                Ok(Attempt::Following(holder)) => {
                    if announced.as_ref() != Some(&holder) {
                        info!(lease = %self.config.name, %holder, "waiting for the lease held by another controller");
                        announced = Some(holder);
                    }
                }
                Err(e) => warn!("lease {}: {e}", self.config.name),
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Renews the Lease until it is lost or could not be renewed within the renew deadline
    /// (returns then). The caller stops working at that point.
    pub async fn keep(&self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            // A request hanging past the deadline must not keep us leading.
            let left = self.config.renew_deadline.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Leading)) => renewed = Instant::now(),
                Ok(Ok(Attempt::Following(holder))) => {
                    warn!(%holder, "lost the lease to another controller");
                    return;
                }
                Ok(Err(e)) => warn!("renewing the lease: {e}"),
                Err(_) => warn!("renewing the lease: no answer in time"),
            }
            if renewed.elapsed() >= self.config.renew_deadline {
                warn!(
                    "could not renew the lease within the renew deadline ({:?})",
                    self.config.renew_deadline
                );
                return;
            }
        }
    }

    fn note(&self, record: Record, now: Instant) -> Observation {
        let mut observed = self
            .observed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = observe(observed.take(), record, now);
        *observed = Some(next.clone());
        next
    }

    async fn try_acquire_or_renew(&self) -> kube::Result<Attempt> {
        // Wall time only goes into the Lease for humans and other tools; decisions use `seen`.
        let now = jiff::Timestamp::now();
        let duration_secs =
            i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let spec = LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            };
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec.clone()),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.note(Record::of(&spec), Instant::now());
                    Ok(Attempt::Leading)
                }
                // Someone created it first: they lead.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Ok(Attempt::Following("(new holder)".into()))
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let observed = self.note(Record::of(&spec), Instant::now());
        if let Err(holder) = may_write(&observed, &self.config.identity, Instant::now()) {
            return Ok(Attempt::Following(holder));
        }
        let ours = observed.record.holder == self.config.identity;
        let mut next = spec;
        if !ours {
            next.acquire_time = Some(MicroTime(now));
            next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
            next.holder_identity = Some(self.config.identity.clone());
        }
        next.renew_time = Some(MicroTime(now));
        next.lease_duration_seconds = Some(duration_secs);
        lease.spec = Some(next.clone());
        // replace() sends the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.note(Record::of(&next), Instant::now());
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok(Attempt::Following("(concurrent update)".into()))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: &str, renew_secs: i64) -> Record {
        Record {
            holder: holder.into(),
            renew_time: Some(jiff::Timestamp::from_second(renew_secs).expect("timestamp")),
            acquire_time: None,
            transitions: 1,
            duration_secs: 15,
        }
    }

    #[test]
    fn another_holder_is_live_until_its_record_has_not_changed_for_the_duration() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // The holder's renewTime is an hour behind our clock (skew): it says nothing to us.
        let hour_ago = jiff::Timestamp::now().as_second() - 3600;
        let first = observe(None, record("other", hour_ago), t0);
        assert_eq!(may_write(&first, "me", t0), Err("other".into()));
        // (observation, now, verdict)
        let renewed = observe(
            Some(first.clone()),
            record("other", hour_ago + 2),
            t0 + s(14),
        );
        assert_eq!(renewed.seen_at, t0 + s(14), "a renewal is a change");
        let unchanged = observe(Some(first.clone()), record("other", hour_ago), t0 + s(14));
        assert_eq!(
            unchanged.seen_at, t0,
            "an unchanged record keeps its first sighting"
        );
        let cases = [
            (&first, t0 + s(14), Err("other".to_string())),
            (&first, t0 + s(15), Ok(())),
            (&renewed, t0 + s(15), Err("other".to_string())),
            (&renewed, t0 + s(29), Ok(())),
        ];
        for (i, (observed, now, verdict)) in cases.into_iter().enumerate() {
            assert_eq!(may_write(observed, "me", now), verdict, "case {i}");
        }
    }

    #[test]
    fn our_own_or_a_free_lease_may_always_be_written() {
        let t0 = Instant::now();
        // Our renewTime far in the future by our clock: still ours.
        let future = jiff::Timestamp::now().as_second() + 3600;
        assert_eq!(
            may_write(&observe(None, record("me", future), t0), "me", t0),
            Ok(())
        );
        assert_eq!(
            may_write(&observe(None, record("", future), t0), "me", t0),
            Ok(())
        );
    }

    #[test]
    fn the_renew_deadline_ends_before_the_lease_does() {
        for secs in [2, 3, 15, 60] {
            let duration = Duration::from_secs(secs);
            let (deadline, every) = LeaderConfig::timings(duration);
            assert!(deadline < duration && every < deadline, "{secs}");
            assert!(
                deadline >= every * 3,
                "{secs}: several tries before giving up"
            );
        }
    }
}
