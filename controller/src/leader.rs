//! Leader election on a `coordination.k8s.io` Lease, so that of several controller replicas only
//! one writes decisions. Every write carries the Lease's resourceVersion: two candidates that read
//! the same expired Lease cannot both take it.
use std::time::Duration;

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
    /// How often the holder renews (well below the duration).
    pub renew_every: Duration,
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Leading,
    /// Another live holder.
    Following(String),
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
}

impl Elector {
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
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

    /// Renews the Lease until it is lost (returns then). The caller stops working at that point.
    pub async fn keep(&self) {
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => failing_since = None,
                Ok(Attempt::Following(holder)) => {
                    warn!(%holder, "lost the lease to another controller");
                    return;
                }
                Err(e) => {
                    // The API may be briefly unreachable; stop only once the Lease may have expired.
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    warn!("renewing the lease: {e}");
                    if since.elapsed() >= self.config.lease_duration {
                        warn!("could not renew the lease within its duration");
                        return;
                    }
                }
            }
        }
    }

    async fn try_acquire_or_renew(&self) -> kube::Result<Attempt> {
        let now = jiff::Timestamp::now();
        let duration_secs =
            i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                // Someone created it first: they lead.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Ok(Attempt::Following("(new holder)".into()))
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.config.identity;
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let held = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
            );
            now.duration_since(t.0).unsigned_abs() > held
        });
        if !ours && !holder.is_empty() && !expired {
            return Ok(Attempt::Following(holder));
        }
        let mut next = spec;
        if !ours {
            next.acquire_time = Some(MicroTime(now));
            next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
            next.holder_identity = Some(self.config.identity.clone());
        }
        next.renew_time = Some(MicroTime(now));
        next.lease_duration_seconds = Some(duration_secs);
        lease.spec = Some(next);
        // replace() sends the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok(Attempt::Following("(concurrent update)".into()))
            }
            Err(e) => Err(e),
        }
    }
}
