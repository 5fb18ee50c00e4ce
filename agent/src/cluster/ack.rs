//! This node's acknowledgement: the Lease `beamlit-agent-<node>` (see
//! [`beamlit_api::acknowledgement`]), renewed while the agent runs and annotated with the
//! decisions its maps hold. Written with server-side apply, so the agent owns exactly its fields.
use std::time::Duration;

use beamlit_api::acknowledgement::{
    AGENT_LEASE_LABEL_KEY, AGENT_LEASE_LABEL_VALUE, APPLIED_ANNOTATION, AppliedDecisions,
    lease_name,
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
    name: String,
    node: String,
    /// The annotation last written, so an unchanged acknowledgement is only a renewal.
    last: Option<String>,
}

impl LeaseWriter {
    pub fn new(client: Client, namespace: &str, node: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: lease_name(node),
            node: node.to_string(),
            last: None,
        }
    }

    /// Whether `applied` differs from what the Lease says.
    pub fn is_news(&self, applied: &AppliedDecisions) -> bool {
        serde_json::to_string(applied).ok() != self.last
    }

    /// Renews the Lease with `applied` as the acknowledgement.
    pub async fn publish(&mut self, applied: &AppliedDecisions) -> Result<(), kube::Error> {
        let annotation = serde_json::to_string(applied).unwrap_or_else(|_| "{}".into());
        let now = jiff::Timestamp::now();
        let patch = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "labels": {AGENT_LEASE_LABEL_KEY: AGENT_LEASE_LABEL_VALUE},
                "annotations": {APPLIED_ANNOTATION: annotation},
            },
            "spec": {
                "holderIdentity": self.node,
                "leaseDurationSeconds": LEASE_DURATION.as_secs(),
                "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
            },
        });
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        self.last = Some(annotation);
        Ok(())
    }
}
