//! What to write to the `services` map so that it holds exactly the desired routes: a pure
//! function of the map's current contents and the desired routes, so it is tested without a
//! kernel, an unchanged route is never rewritten (its generation stays put), and counter slots
//! need no state besides the map itself.
use std::collections::{BTreeMap, BTreeSet};

use beamlit_common::{MAX_SERVICES, ServiceEntry, ServiceKey};

use crate::model::{self, Route};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Insert or replace; the entry carries its generation and counter slot. `fresh_slot`: the
    /// slot is newly given to this service, so its counters must be zeroed first.
    Upsert {
        key: ServiceKey,
        entry: ServiceEntry,
        fresh_slot: bool,
    },
    Remove(ServiceKey),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} services requested; the data plane holds at most {MAX_SERVICES}")]
pub struct TooManyServices(pub usize);

/// `current`: the map's contents; `desired`: routes with distinct service addresses.
pub fn plan(
    current: &BTreeMap<ServiceKey, ServiceEntry>,
    desired: &[Route],
) -> Result<Vec<Change>, TooManyServices> {
    if desired.len() > MAX_SERVICES as usize {
        return Err(TooManyServices(desired.len()));
    }
    // Slots of every current entry stay reserved during this change, including those about to
    // be removed: a connect racing with the change never counts into another service's slot.
    let mut used: BTreeSet<u32> = current.values().map(|e| e.counter_slot).collect();
    let mut next_free = 0u32;
    let mut changes = Vec::new();
    let mut wanted = BTreeSet::new();
    for route in desired {
        let key = model::service_key(route.service);
        wanted.insert(key);
        let previous = current.get(&key);
        let (slot, fresh_slot) = match previous {
            Some(p) => (p.counter_slot, false),
            None => {
                while used.contains(&next_free) {
                    next_free += 1;
                }
                if next_free >= MAX_SERVICES {
                    return Err(TooManyServices(current.len() + desired.len()));
                }
                used.insert(next_free);
                (next_free, true)
            }
        };
        let generation = previous.map_or(1, |e| e.generation.wrapping_add(1).max(1));
        let entry = model::service_entry(route, generation, slot);
        let unchanged = previous.is_some_and(|p| {
            ServiceEntry {
                generation: p.generation,
                ..entry
            } == *p
        });
        if !unchanged {
            changes.push(Change::Upsert {
                key,
                entry,
                fresh_slot,
            });
        }
    }
    for key in current.keys() {
        if !wanted.contains(key) {
            changes.push(Change::Remove(*key));
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Share;

    fn route(service: &str, percent: f64) -> Route {
        Route {
            service: service.parse().expect("test address"),
            share: Share::from_percent(percent).expect("valid"),
            tunnel: if service.starts_with('[') {
                "[fd00:200::1]:15001"
            } else {
                "10.200.0.1:15001"
            }
            .parse()
            .expect("test address"),
            tunnel_ready: true,
            tunnel_heartbeat: false,
        }
    }

    /// (route, generation, slot)
    fn map_of(routes: &[(Route, u32, u32)]) -> BTreeMap<ServiceKey, ServiceEntry> {
        routes
            .iter()
            .map(|(r, g, s)| {
                (
                    model::service_key(r.service),
                    model::service_entry(r, *g, *s),
                )
            })
            .collect()
    }

    fn upsert(r: &Route, generation: u32, slot: u32, fresh_slot: bool) -> Change {
        Change::Upsert {
            key: model::service_key(r.service),
            entry: model::service_entry(r, generation, slot),
            fresh_slot,
        }
    }

    #[test]
    fn table() {
        let a30 = route("10.96.0.10:80", 30.0);
        let a50 = route("10.96.0.10:80", 50.0);
        let b = route("[fd00:96::10]:80", 100.0);
        let c = route("10.96.0.11:80", 10.0);
        let b_not_ready = Route {
            tunnel_ready: false,
            ..b
        };
        struct Case {
            name: &'static str,
            current: Vec<(Route, u32, u32)>,
            desired: Vec<Route>,
            expected: Vec<Change>,
        }
        let cases = [
            Case {
                name: "empty to one: generation 1, first slot, zeroed",
                current: vec![],
                desired: vec![a30],
                expected: vec![upsert(&a30, 1, 0, true)],
            },
            Case {
                name: "unchanged route is not rewritten",
                current: vec![(a30, 4, 9)],
                desired: vec![a30],
                expected: vec![],
            },
            Case {
                name: "changed share bumps the generation and keeps slot and counts",
                current: vec![(a30, 4, 9)],
                desired: vec![a50],
                expected: vec![upsert(&a50, 5, 9, false)],
            },
            Case {
                name: "route gone from the desired set is removed",
                current: vec![(a30, 1, 0), (b, 2, 1)],
                desired: vec![b],
                expected: vec![Change::Remove(model::service_key(a30.service))],
            },
            Case {
                name: "a removed service's slot is not reused in the same change",
                current: vec![(a30, 1, 0)],
                desired: vec![c],
                expected: vec![
                    upsert(&c, 1, 1, true),
                    Change::Remove(model::service_key(a30.service)),
                ],
            },
            Case {
                name: "new services take the lowest free slots",
                current: vec![(a30, 1, 1)],
                desired: vec![a30, b, c],
                expected: vec![upsert(&b, 1, 0, true), upsert(&c, 1, 2, true)],
            },
            Case {
                name: "tunnel readiness is part of the entry",
                current: vec![(b, 2, 0)],
                desired: vec![b_not_ready],
                expected: vec![upsert(&b_not_ready, 3, 0, false)],
            },
            Case {
                name: "generation wraps without reaching 0",
                current: vec![(a30, u32::MAX, 0)],
                desired: vec![a50],
                expected: vec![upsert(&a50, 1, 0, false)],
            },
        ];
        for case in cases {
            let mut got = plan(&map_of(&case.current), &case.desired).expect("within capacity");
            let mut expected = case.expected;
            // Order within upserts does not matter to the map; compare as sorted lists.
            got.sort_by_key(|c| format!("{c:?}"));
            expected.sort_by_key(|c| format!("{c:?}"));
            assert_eq!(got, expected, "{}", case.name);
        }
    }

    #[test]
    fn refuses_more_services_than_the_map_holds() {
        let routes: Vec<Route> = (0..=MAX_SERVICES)
            .map(|i| {
                route(
                    &format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 255, i & 255),
                    0.0,
                )
            })
            .collect();
        assert_eq!(
            plan(&BTreeMap::new(), &routes),
            Err(TooManyServices(routes.len()))
        );
    }
}
