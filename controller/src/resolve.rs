//! What a ModelDeployment points at, resolved from the objects the controller watches: the
//! Service's addresses and port, and how many endpoints are ready. Pure functions, so the rules
//! (named ports, headless Services, several address families, the EndpointSlice ready
//! semantics) are tested without a cluster.

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::util::intstr::IntOrString};

use beamlit_api::{ResolvedService, ServiceRef};

/// Why a Service reference does not resolve; each says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("spec.serviceRef is not set; name the Service clients call")]
    NoServiceRef,
    #[error("Service {namespace}/{name} does not exist; create it or fix spec.serviceRef")]
    ServiceNotFound { namespace: String, name: String },
    #[error(
        "Service {namespace}/{name} is headless (clusterIP: None): there is no address to \
         offload; give it a ClusterIP"
    )]
    Headless { namespace: String, name: String },
    #[error(
        "Service {namespace}/{name} has no port {wanted}; spec.serviceRef.targetPort must be one \
         of its ports: {available}"
    )]
    PortNotFound {
        namespace: String,
        name: String,
        wanted: String,
        available: String,
    },
    #[error(
        "Service {namespace}/{name} has several ports ({available}); set \
         spec.serviceRef.targetPort to the one to offload"
    )]
    AmbiguousPort {
        namespace: String,
        name: String,
        available: String,
    },
}

impl ResolveError {
    /// The condition reason (PascalCase) for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::NoServiceRef => "NoServiceRef",
            ResolveError::ServiceNotFound { .. } => "ServiceNotFound",
            ResolveError::Headless { .. } => "HeadlessService",
            ResolveError::PortNotFound { .. } => "PortNotFound",
            ResolveError::AmbiguousPort { .. } => "AmbiguousPort",
        }
    }
}

/// The Service's ClusterIPs (every family) and the chosen port. `service_ref.target_port` names
/// the Service **port** (by number or name), as the earlier product used it.
pub fn resolve_service(
    service: &Service,
    service_ref: &ServiceRef,
    namespace: &str,
) -> Result<ResolvedService, ResolveError> {
    let name = service_ref.name.clone();
    let namespace = namespace.to_string();
    let spec = service.spec.clone().unwrap_or_default();
    let mut addresses: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if addresses.is_empty()
        && let Some(ip) = spec.cluster_ip.clone()
    {
        addresses.push(ip);
    }
    addresses.retain(|a| !a.is_empty() && a != "None");
    if addresses.is_empty() {
        return Err(ResolveError::Headless { namespace, name });
    }
    let ports = spec.ports.unwrap_or_default();
    let describe = || {
        ports
            .iter()
            .map(|p| match &p.name {
                Some(n) if !n.is_empty() => format!("{} ({n})", p.port),
                _ => p.port.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let port = match &service_ref.target_port {
        None if ports.len() == 1 => ports.first(),
        None => {
            return Err(ResolveError::AmbiguousPort {
                namespace,
                name,
                available: describe(),
            });
        }
        Some(IntOrString::Int(number)) => ports.iter().find(|p| p.port == *number),
        Some(IntOrString::String(wanted)) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(wanted.as_str()))
            // A number written as a string ("80") is a number.
            .or_else(|| {
                wanted
                    .parse::<i32>()
                    .ok()
                    .and_then(|n| ports.iter().find(|p| p.port == n))
            }),
    };
    let Some(port) = port else {
        return Err(ResolveError::PortNotFound {
            namespace,
            name,
            wanted: match &service_ref.target_port {
                Some(IntOrString::Int(n)) => n.to_string(),
                Some(IntOrString::String(s)) => s.clone(),
                None => "(none)".into(),
            },
            available: describe(),
        });
    };
    Ok(ResolvedService {
        name,
        namespace,
        addresses,
        port: port.port,
        target_port: port.target_port.clone(),
    })
}

/// Shared with the agents, which fail over on their own when it reaches zero.
pub use beamlit_api::endpoints::ready_endpoints;

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        core::v1::{ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointSlice},
    };

    use super::*;

    fn service(ips: &[&str], ports: &[(i32, Option<&str>)]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().map(|s| s.to_string()),
                cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(port, name)| ServicePort {
                            port: *port,
                            name: name.map(String::from),
                            target_port: Some(IntOrString::Int(port + 8000)),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn svc_ref(target_port: Option<IntOrString>) -> ServiceRef {
        ServiceRef {
            name: "php-apache".into(),
            namespace: None,
            target_port,
        }
    }

    /// (name, service, serviceRef.targetPort, Ok((addresses, port)) or Err(reason))
    type Case<'a> = (
        &'static str,
        &'a Service,
        Option<IntOrString>,
        Result<(Vec<&'static str>, i32), &'static str>,
    );

    #[test]
    fn service_resolution_table() {
        let dual = service(
            &["10.96.0.10", "fd00:96::10"],
            &[(80, Some("http")), (9090, Some("metrics"))],
        );
        let single = service(&["10.96.0.10"], &[(80, None)]);
        let headless = service(&["None"], &[(80, None)]);
        let cases: Vec<Case> = vec![
            (
                "port number",
                &dual,
                Some(IntOrString::Int(80)),
                Ok((vec!["10.96.0.10", "fd00:96::10"], 80)),
            ),
            (
                "port name",
                &dual,
                Some(IntOrString::String("metrics".into())),
                Ok((vec!["10.96.0.10", "fd00:96::10"], 9090)),
            ),
            (
                "number as a string",
                &dual,
                Some(IntOrString::String("80".into())),
                Ok((vec!["10.96.0.10", "fd00:96::10"], 80)),
            ),
            (
                "only port, none named",
                &single,
                None,
                Ok((vec!["10.96.0.10"], 80)),
            ),
            (
                "several ports, none named",
                &dual,
                None,
                Err("AmbiguousPort"),
            ),
            (
                "no such number",
                &dual,
                Some(IntOrString::Int(81)),
                Err("PortNotFound"),
            ),
            (
                "no such name",
                &dual,
                Some(IntOrString::String("grpc".into())),
                Err("PortNotFound"),
            ),
            ("headless", &headless, None, Err("HeadlessService")),
        ];
        for (name, service, target_port, expected) in cases {
            let got = resolve_service(service, &svc_ref(target_port), "default");
            match (got, expected) {
                (Ok(r), Ok((addresses, port))) => {
                    assert_eq!(r.addresses, addresses, "{name}");
                    assert_eq!(r.port, port, "{name}");
                    assert_eq!(r.target_port, Some(IntOrString::Int(port + 8000)), "{name}");
                }
                (Err(e), Err(reason)) => {
                    assert_eq!(e.reason(), reason, "{name}");
                    assert!(e.to_string().contains("php-apache"), "{name}: {e}");
                }
                (got, expected) => panic!("{name}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn port_errors_list_what_exists() {
        let dual = service(
            &["10.96.0.10"],
            &[(80, Some("http")), (9090, Some("metrics"))],
        );
        let err = resolve_service(&dual, &svc_ref(Some(IntOrString::Int(81))), "default")
            .expect_err("no port 81");
        assert!(
            err.to_string().contains("80 (http), 9090 (metrics)"),
            "{err}"
        );
    }

    fn endpoint(address: &str, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![address.into()],
            conditions: Some(EndpointConditions {
                ready,
                terminating,
                serving: None,
            }),
            ..Endpoint::default()
        }
    }

    #[test]
    fn ready_endpoint_counting() {
        let slices = vec![
            EndpointSlice {
                endpoints: Some(vec![
                    endpoint("10.200.1.2", Some(true), None),
                    endpoint("10.200.2.2", None, None), // unset means ready
                    endpoint("10.200.3.2", Some(false), None),
                    endpoint("10.200.4.2", Some(true), Some(true)), // terminating
                ]),
                ..EndpointSlice::default()
            },
            // The same address in a second slice (during a slice update) counts once.
            EndpointSlice {
                endpoints: Some(vec![endpoint("10.200.1.2", Some(true), None)]),
                ..EndpointSlice::default()
            },
        ];
        assert_eq!(ready_endpoints(&slices), 2);
        assert_eq!(ready_endpoints(&[] as &[EndpointSlice]), 0);
    }
}
