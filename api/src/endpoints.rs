//! Readiness of a Service's endpoints, counted the same way by the controller (for its decision)
//! and by each agent (for its node-local failover).
use std::collections::BTreeSet;

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Ready endpoints of the Service across its EndpointSlices (every family), counted once per
/// address. Per the EndpointSlice API, a missing `ready` condition means ready; terminating
/// endpoints are not ready for new connections.
pub fn ready_endpoints<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> u32 {
    let mut ready = BTreeSet::new();
    for slice in slices {
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            if conditions.ready.unwrap_or(true) && !conditions.terminating.unwrap_or(false) {
                for address in &endpoint.addresses {
                    ready.insert(address.clone());
                }
            }
        }
    }
    u32::try_from(ready.len()).unwrap_or(u32::MAX)
}
