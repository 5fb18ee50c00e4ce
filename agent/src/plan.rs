//! What to write to the `services` map so that it holds exactly the desired routes: a pure
//! function of the map's current contents and the desired routes, so it is tested without a
//! kernel and so that an unchanged route is never rewritten (its generation stays put).
use std::collections::BTreeMap;

use beamlit_common::{ServiceEntry, ServiceKey};

use crate::model::{self, Route};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Insert or replace; the entry carries its new generation.
    Upsert(ServiceKey, ServiceEntry),
    Remove(ServiceKey),
}

/// `current`: the map's contents; `desired`: routes with distinct service addresses.
pub fn plan(current: &BTreeMap<ServiceKey, ServiceEntry>, desired: &[Route]) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut wanted = BTreeMap::new();
    for route in desired {
        let key = model::service_key(route.service);
        wanted.insert(key, ());
        let previous = current.get(&key);
        let generation = previous.map_or(1, |e| e.generation.wrapping_add(1).max(1));
        let entry = model::service_entry(route, generation);
        let unchanged = previous.is_some_and(|p| {
            ServiceEntry {
                generation: p.generation,
                ..entry
            } == *p
        });
        if !unchanged {
            changes.push(Change::Upsert(key, entry));
        }
    }
    for key in current.keys() {
        if !wanted.contains_key(key) {
            changes.push(Change::Remove(*key));
        }
    }
    changes
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
        }
    }

    fn map_of(routes: &[(Route, u32)]) -> BTreeMap<ServiceKey, ServiceEntry> {
        routes
            .iter()
            .map(|(r, g)| (model::service_key(r.service), model::service_entry(r, *g)))
            .collect()
    }

    #[test]
    fn table() {
        let a30 = route("10.96.0.10:80", 30.0);
        let a50 = route("10.96.0.10:80", 50.0);
        let b = route("[fd00:96::10]:80", 100.0);
        let key_a = model::service_key(a30.service);
        let key_b = model::service_key(b.service);
        struct Case {
            name: &'static str,
            current: Vec<(Route, u32)>,
            desired: Vec<Route>,
            expected: Vec<Change>,
        }
        let cases = [
            Case {
                name: "empty to one: generation starts at 1",
                current: vec![],
                desired: vec![a30],
                expected: vec![Change::Upsert(key_a, model::service_entry(&a30, 1))],
            },
            Case {
                name: "unchanged route is not rewritten",
                current: vec![(a30, 4)],
                desired: vec![a30],
                expected: vec![],
            },
            Case {
                name: "changed share bumps the generation",
                current: vec![(a30, 4)],
                desired: vec![a50],
                expected: vec![Change::Upsert(key_a, model::service_entry(&a50, 5))],
            },
            Case {
                name: "route gone from the desired set is removed",
                current: vec![(a30, 1), (b, 2)],
                desired: vec![b],
                expected: vec![Change::Remove(key_a)],
            },
            Case {
                name: "tunnel readiness is part of the entry",
                current: vec![(b, 2)],
                desired: vec![Route {
                    tunnel_ready: false,
                    ..b
                }],
                expected: vec![Change::Upsert(
                    key_b,
                    model::service_entry(
                        &Route {
                            tunnel_ready: false,
                            ..b
                        },
                        3,
                    ),
                )],
            },
            Case {
                name: "generation wraps without reaching 0",
                current: vec![(a30, u32::MAX)],
                desired: vec![a50],
                expected: vec![Change::Upsert(key_a, model::service_entry(&a50, 1))],
            },
        ];
        for case in cases {
            assert_eq!(
                plan(&map_of(&case.current), &case.desired),
                case.expected,
                "{}",
                case.name
            );
        }
    }
}
