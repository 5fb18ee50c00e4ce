//! This node's acknowledgement: the Lease `beamlit-agent-<node>` (see
//! [`beamlit_api::acknowledgement`]), renewed while the agent runs and annotated with the
//! decisions its maps hold. Written with server-side apply, so the agent owns exactly its fields.
use std::time::Duration;

use beamlit_api::acknowledgement::{
    AGENT_LEASE_LABEL_KEY, AGENT_LEASE_LABEL_VALUE, APPLIED_ANNOTATION, AppliedDecisions,
    NODE_LABEL, SHARD_LABEL, SHARDS_ANNOTATION, node_label_value, shard_lease_name, split,
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

pub const FIELD_MANAGER: &str = "beamlit-agent";
/// How long the Lease holds without renewal: an agent silent for this long no longer counts.
pub const LEASE_DURATION: Duration = Duration::from_secs(30);
/// Renewal period: a third of the duration, as Kubernetes does for node Leases.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);

pub struct LeaseWriter {
    api: Api<Lease>,
    node: String,
    /// The whole acknowledgement last written, so an unchanged one is only a renewal.
    last: Option<String>,
    /// Per shard, the annotation last written by this process (shards past the first are
    /// written only when they change).
    shards: Vec<Option<String>>,
}

impl LeaseWriter {
    pub fn new(client: Client, namespace: &str, node: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            node: node.to_string(),
            last: None,
            shards: Vec::new(),
        }
    }

    /// Whether `applied` differs from what the Leases say.
    pub fn is_news(&self, applied: &AppliedDecisions) -> bool {
        serde_json::to_string(applied).ok() != self.last
    }

    /// Renews the node's Lease with `applied` as the acknowledgement, split into shards when it
    /// is too large for one (see [`beamlit_api::acknowledgement`]). Shards beyond the new count
    /// are emptied if this process wrote them; the controller ignores them anyway (shard 0
    /// gives the count), so one left by an earlier process is only an idle object.
    pub async fn publish(&mut self, applied: &AppliedDecisions) -> Result<(), kube::Error> {
        let mut parts = split(applied);
        let count = parts.len();
        let stale = self.shards.len().saturating_sub(count);
        parts.extend(std::iter::repeat_n(AppliedDecisions::default(), stale));
        let now = jiff::Timestamp::now();
        for (shard, part) in parts.iter().enumerate() {
            let annotation = serde_json::to_string(part).unwrap_or_else(|_| "{}".into());
            if shard > 0
                && self
                    .shards
                    .get(shard)
                    .is_some_and(|w| w.as_ref() == Some(&annotation))
            {
                continue;
            }
            let name = shard_lease_name(&self.node, shard);
            let mut patch = serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": name,
                    "labels": {
                        AGENT_LEASE_LABEL_KEY: AGENT_LEASE_LABEL_VALUE,
                        NODE_LABEL: node_label_value(&self.node),
                        SHARD_LABEL: shard.to_string(),
                    },
                    "annotations": {APPLIED_ANNOTATION: annotation},
                },
                "spec": {"holderIdentity": self.node},
            });
            // Only the first shard is renewed: it alone says the node is alive, and how many
            // shards there are.
            if shard == 0 {
                patch["metadata"]["annotations"][SHARDS_ANNOTATION] = count.to_string().into();
                patch["spec"]["leaseDurationSeconds"] = LEASE_DURATION.as_secs().into();
                patch["spec"]["renewTime"] = serde_json::to_value(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
                )
                .unwrap_or_default();
            }
            self.api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await?;
            if self.shards.len() <= shard {
                self.shards.resize(shard + 1, None);
            }
            self.shards[shard] = Some(annotation);
        }
        self.shards.truncate(count);
        self.last = serde_json::to_string(applied).ok();
        Ok(())
    }
}
