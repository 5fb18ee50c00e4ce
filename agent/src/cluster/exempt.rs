//! Pods never redirected, whatever a `services` entry says: this agent's own pod and the
//! controller's pods on this node (`--exempt-pods`, a label selector in the agent's namespace).
//! Their pod cgroup ids go into the `exempt_cgroups` map, which the programs check before they
//! redirect a connection, so no ModelDeployment (and no entry written by hand) can cut the
//! agent or the controller off from the API server or Beamlit. The agent's own sockets also
//! carry the bypass mark; the controller has no NET_ADMIN to mark its own, hence the cgroups.
//!
//! Being exempt only means "connections go where they were dialled" (kube-proxy's path), so a
//! pod that copies the controller's labels gains nothing but the local path.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;
use tracing::{info, warn};

use crate::{cgroup, maps::PinnedMaps};

/// A pod to exempt: its name (for the log) and UID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExemptPod {
    pub name: String,
    pub uid: String,
}

/// The pods of `pods` that may run processes (not Succeeded or Failed, with a UID), plus the
/// agent's own pod.
pub fn exempt_pods(own: Option<&ExemptPod>, pods: &[Arc<Pod>]) -> BTreeSet<ExemptPod> {
    let mut set: BTreeSet<ExemptPod> = pods
        .iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter_map(|p| {
            Some(ExemptPod {
                name: p.metadata.name.clone()?,
                uid: p.metadata.uid.clone()?,
            })
        })
        .collect();
    set.extend(own.cloned());
    set
}

/// What is in `exempt_cgroups`, kept in line with the pods found.
pub struct Exemptions {
    /// Where pod cgroups are looked for (the cgroup the programs are attached to).
    within: PathBuf,
    own: Option<ExemptPod>,
    /// UID -> (pod, cgroup id) of what was written.
    written: BTreeMap<String, (ExemptPod, u64)>,
}

impl Exemptions {
    pub fn new(within: PathBuf, own: Option<ExemptPod>) -> Self {
        Self {
            within,
            own,
            written: BTreeMap::new(),
        }
    }

    /// Writes the cgroup ids of `pods` (see [`exempt_pods`]) whose cgroups exist; a pod whose
    /// cgroup the kubelet has not made yet is looked for again at the next call.
    pub fn update(&mut self, maps: &mut PinnedMaps, pods: &[Arc<Pod>]) {
        let wanted = exempt_pods(self.own.as_ref(), pods);
        let mut next = BTreeMap::new();
        for pod in wanted {
            let found = match self.written.get(&pod.uid) {
                Some((_, id)) => Some(*id),
                None => cgroup::pod_cgroup(&self.within, &pod.uid).map(|(_, id)| id),
            };
            if let Some(id) = found {
                next.insert(pod.uid.clone(), (pod, id));
            }
        }
        if next == self.written {
            return;
        }
        let ids: BTreeSet<u64> = next.values().map(|(_, id)| *id).collect();
        match maps.set_exempt_cgroups(&ids) {
            Ok(()) => {
                self.written = next;
                info!(pods = %self.describe().join(", "), "never redirected: these pods' connections");
            }
            Err(e) => warn!("writing the exempt cgroups: {e}; retrying at the next change"),
        }
    }

    /// What is written, as `name (cgroup id)` (for the log and `inspect`).
    pub fn describe(&self) -> Vec<String> {
        self.written
            .values()
            .map(|(p, id)| format!("{} (cgroup {id})", p.name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, uid: Option<&str>, phase: Option<&str>) -> Arc<Pod> {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.uid = uid.map(Into::into);
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: phase.map(Into::into),
            ..Default::default()
        });
        Arc::new(p)
    }

    #[test]
    fn running_pods_and_the_agent_itself_are_exempt() {
        let own = ExemptPod {
            name: "beamlit-agent-x".into(),
            uid: "u-agent".into(),
        };
        type Case = (&'static str, Vec<Arc<Pod>>, &'static [&'static str]);
        let cases: &[Case] = &[
            ("nothing but the agent", vec![], &["u-agent"]),
            (
                "running and pending controllers",
                vec![
                    pod("c1", Some("u1"), Some("Running")),
                    pod("c2", Some("u2"), Some("Pending")),
                    pod("c3", Some("u3"), None),
                ],
                &["u-agent", "u1", "u2", "u3"],
            ),
            (
                "finished pods run nothing",
                vec![
                    pod("c1", Some("u1"), Some("Succeeded")),
                    pod("c2", Some("u2"), Some("Failed")),
                ],
                &["u-agent"],
            ),
            (
                "a pod without a UID cannot be found",
                vec![pod("c1", None, Some("Running"))],
                &["u-agent"],
            ),
        ];
        for (what, pods, want) in cases {
            let got: Vec<String> = exempt_pods(Some(&own), pods)
                .into_iter()
                .map(|p| p.uid)
                .collect();
            assert_eq!(&got, want, "{what}");
        }
        assert!(exempt_pods(None, &[]).is_empty());
    }
}
