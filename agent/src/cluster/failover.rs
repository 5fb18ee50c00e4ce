//! Node-local failover: the one share the agent decides by itself. A Service whose
//! EndpointSlices show no ready endpoint is offloaded at 100% at once, without waiting for the
//! controller to notice; when its endpoints come back, the failover holds a while longer
//! (`--failover-hold-ms`, [`DEFAULT_FAILOVER_HOLD`]), because the node's proxy programs them at
//! its own pace and a connection sent back to the local path before that would be refused:
//! kube-proxy (iptables and nftables modes) waits at least its `minSyncPeriod`, 1 s by default,
//! between two syncs, and then takes the sync itself. A hold of exactly 1 s raced it (seen
//! once on real nodes: one connection refused at the ClusterIP right after a scale-up).
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::Share;

/// The reason shown for a share the agent chose itself.
pub const NODE_LOCAL_FAILOVER: &str = "NoReadyEndpoints (node-local failover)";

/// How long failover outlasts the outage once endpoints are ready again, by default: three
/// times kube-proxy's default minSyncPeriod.
pub const DEFAULT_FAILOVER_HOLD: Duration = Duration::from_secs(3);

/// (namespace, Service name) → ready endpoints; a Service absent here has no EndpointSlice
/// (yet), and then only the controller's decision counts.
pub type ReadyEndpoints = HashMap<(String, String), u32>;

/// Per Service (`namespace`, `name`), ready endpoints over its EndpointSlices.
pub fn ready_endpoints_by_service(slices: &[Arc<EndpointSlice>]) -> ReadyEndpoints {
    let mut grouped: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let (Some(namespace), Some(service)) = (
            slice.metadata.namespace.clone(),
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(beamlit_api::endpoints::SERVICE_NAME_LABEL))
                .cloned(),
        ) else {
            continue;
        };
        grouped
            .entry((namespace, service))
            .or_default()
            .push(slice.as_ref());
    }
    grouped
        .into_iter()
        .map(|(k, v)| (k, beamlit_api::endpoints::ready_endpoints(v)))
        .collect()
}

/// The share and reason of node-local failover, when the Service has no ready endpoint (as
/// [`Holds::apply`] left the counts); `None`: the controller's decision applies.
pub fn failover_share(ready_now: Option<u32>) -> Option<(Share, &'static str)> {
    (ready_now == Some(0)).then_some((Share::ALL, NODE_LOCAL_FAILOVER))
}

/// Where each Service that lost its ready endpoints stands, for the hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// Seen without a ready endpoint at the last pass.
    Down,
    /// Seen with ready endpoints again, first at this instant: the hold counts from here.
    Back(Instant),
}

/// The Services whose failover holds: down, or back for less than the hold.
#[derive(Debug)]
pub struct Holds {
    hold: Duration,
    outages: HashMap<(String, String), Outage>,
}

impl Holds {
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            outages: HashMap::new(),
        }
    }

    /// Records Services without ready endpoints, and reports those whose endpoints came back
    /// less than the hold ago as still without (their failover holds). Returns when the next
    /// hold ends, when the maps must be computed again.
    ///
    /// The hold counts from the first pass that sees the endpoints back, not from the last pass
    /// that saw them gone: passes run only when something changes, so an outage may have seen
    /// just one, long before the endpoints return.
    pub fn apply(&mut self, ready: &mut ReadyEndpoints, now: Instant) -> Option<Instant> {
        let hold = self.hold;
        // A Service without EndpointSlices any more has no outage to hold.
        self.outages
            .retain(|service, _| ready.contains_key(service));
        let mut next = None;
        for (service, count) in ready.iter_mut() {
            if *count == 0 {
                self.outages.insert(service.clone(), Outage::Down);
                continue;
            }
            let back_at = match self.outages.get(service) {
                None => continue,
                Some(Outage::Down) => now,
                Some(Outage::Back(at)) => *at,
            };
            let ends = back_at + hold;
            if now < ends {
                self.outages.insert(service.clone(), Outage::Back(back_at));
                *count = 0;
                next = Some(next.map_or(ends, |n: Instant| n.min(ends)));
            } else {
                self.outages.remove(service);
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_holds_after_endpoints_return_then_ends() {
        let svc = ("models".to_string(), "php".to_string());
        let t0 = Instant::now();
        let hold = Duration::from_secs(3);
        let mut holds = Holds::new(hold);
        let mut ready = ReadyEndpoints::from([(svc.clone(), 0)]);
        assert_eq!(holds.apply(&mut ready, t0), None, "down: no hold yet");
        let back = t0 + Duration::from_millis(100);
        let mut ready = ReadyEndpoints::from([(svc.clone(), 2)]);
        assert_eq!(holds.apply(&mut ready, back), Some(back + hold));
        assert_eq!(ready[&svc], 0, "held: still failed over");
        let almost = back + hold - Duration::from_millis(1);
        let mut ready = ReadyEndpoints::from([(svc.clone(), 2)]);
        assert_eq!(holds.apply(&mut ready, almost), Some(back + hold));
        assert_eq!(ready[&svc], 0, "held until the hold's last instant");
        let later = back + hold;
        let mut ready = ReadyEndpoints::from([(svc.clone(), 2)]);
        assert_eq!(holds.apply(&mut ready, later), None);
        assert_eq!(ready[&svc], 2, "the hold is over");
    }

    #[test]
    fn the_hold_counts_from_the_return_however_long_the_outage() {
        // One pass when the endpoints went (agents pass only on changes), the next one when
        // they come back 35 s later: the hold still applies, from the return.
        let svc = ("models".to_string(), "php".to_string());
        let t0 = Instant::now();
        let hold = Duration::from_secs(3);
        let mut holds = Holds::new(hold);
        let mut ready = ReadyEndpoints::from([(svc.clone(), 0)]);
        assert_eq!(holds.apply(&mut ready, t0), None);
        let back = t0 + Duration::from_secs(35);
        let mut ready = ReadyEndpoints::from([(svc.clone(), 1)]);
        assert_eq!(holds.apply(&mut ready, back), Some(back + hold));
        assert_eq!(ready[&svc], 0, "held after a long outage");
        let mut ready = ReadyEndpoints::from([(svc.clone(), 1)]);
        assert_eq!(holds.apply(&mut ready, back + hold), None);
        assert_eq!(ready[&svc], 1, "the hold is over");
        // Down again later: a new outage, a new hold.
        let t1 = back + Duration::from_secs(60);
        let mut ready = ReadyEndpoints::from([(svc.clone(), 0)]);
        assert_eq!(holds.apply(&mut ready, t1), None);
        let mut ready = ReadyEndpoints::from([(svc.clone(), 2)]);
        let back2 = t1 + Duration::from_secs(1);
        assert_eq!(holds.apply(&mut ready, back2), Some(back2 + hold));
        assert_eq!(ready[&svc], 0);
    }

    #[test]
    fn only_a_service_without_ready_endpoints_fails_over() {
        assert_eq!(
            failover_share(Some(0)),
            Some((Share::ALL, NODE_LOCAL_FAILOVER))
        );
        assert_eq!(failover_share(Some(1)), None);
        assert_eq!(failover_share(None), None, "no EndpointSlice yet");
    }
}
