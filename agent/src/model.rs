//! The agent's view of a redirection rule, and its one translation to and from the map types
//! of `beamlit-common`.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use beamlit_common::{
    FAMILY_INET, FAMILY_INET6, FLAG_TUNNEL_HEARTBEAT, FLAG_TUNNEL_READY, PROTO_TCP, SHARE_SCALE,
    ServiceEntry, ServiceKey,
};

/// Offload share in basis points (0..=10000): 1 bp = 0.01% of new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Share(u16);

impl Share {
    pub const NONE: Share = Share(0);
    pub const ALL: Share = Share(SHARE_SCALE);

    pub fn from_basis_points(bp: u16) -> Option<Share> {
        (bp <= SHARE_SCALE).then_some(Share(bp))
    }

    /// Percent with up to two decimals (30, 12.5, 0.01). `None` outside 0..=100 or NaN.
    pub fn from_percent(percent: f64) -> Option<Share> {
        if !(0.0..=100.0).contains(&percent) {
            return None;
        }
        Some(Share((percent * 100.0).round() as u16))
    }

    pub fn basis_points(self) -> u16 {
        self.0
    }

    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

/// One Service address and what to do with new connections to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub service: SocketAddr,
    pub share: Share,
    /// Where redirected connections go; same address family as `service`.
    pub tunnel: SocketAddr,
    /// Cleared while the tunnel does not accept connections: new connections then fail open.
    pub tunnel_ready: bool,
    /// The tunnel is the agent's own: redirection also requires its heartbeat to be fresh.
    pub tunnel_heartbeat: bool,
}

pub fn service_key(addr: SocketAddr) -> ServiceKey {
    let (family, bytes) = ip_bytes(addr.ip());
    ServiceKey {
        addr: bytes,
        port: addr.port(),
        proto: PROTO_TCP,
        family,
    }
}

pub fn service_entry(route: &Route, generation: u32, counter_slot: u32) -> ServiceEntry {
    let (tunnel_family, tunnel_addr) = ip_bytes(route.tunnel.ip());
    ServiceEntry {
        tunnel_addr,
        generation,
        share_bp: route.share.basis_points(),
        tunnel_port: route.tunnel.port(),
        flags: (if route.tunnel_ready {
            FLAG_TUNNEL_READY
        } else {
            0
        }) | (if route.tunnel_heartbeat {
            FLAG_TUNNEL_HEARTBEAT
        } else {
            0
        }),
        tunnel_family,
        _pad: 0,
        counter_slot,
    }
}

/// The address a key describes; `None` for a key no agent would write (unknown family).
pub fn key_addr(key: &ServiceKey) -> Option<SocketAddr> {
    Some(SocketAddr::new(
        ip_from_bytes(key.family, &key.addr)?,
        key.port,
    ))
}

pub fn entry_route(key: &ServiceKey, entry: &ServiceEntry) -> Option<Route> {
    Some(Route {
        service: key_addr(key)?,
        share: Share::from_basis_points(entry.share_bp)?,
        tunnel: SocketAddr::new(
            ip_from_bytes(entry.tunnel_family, &entry.tunnel_addr)?,
            entry.tunnel_port,
        ),
        tunnel_ready: entry.flags & FLAG_TUNNEL_READY != 0,
        tunnel_heartbeat: entry.flags & FLAG_TUNNEL_HEARTBEAT != 0,
    })
}

pub fn ip_from_bytes(family: u8, addr: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_INET => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        FAMILY_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

fn ip_bytes(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (FAMILY_INET, bytes)
        }
        IpAddr::V6(v6) => (FAMILY_INET6, v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_from_percent() {
        let cases = [
            (0.0, Some(0)),
            (30.0, Some(3000)),
            (12.5, Some(1250)),
            (0.01, Some(1)),
            (100.0, Some(10_000)),
            (100.01, None),
            (-1.0, None),
            (f64::NAN, None),
        ];
        for (percent, bp) in cases {
            assert_eq!(
                Share::from_percent(percent).map(Share::basis_points),
                bp,
                "{percent}"
            );
        }
    }

    #[test]
    fn route_round_trips_through_map_types() {
        for (service, tunnel) in [
            ("10.96.0.10:80", "10.200.0.1:15001"),
            ("[fd00:96::10]:8080", "[fd00:200::1]:15001"),
        ] {
            let route = Route {
                service: service.parse().expect("test address"),
                share: Share::from_percent(30.0).expect("valid"),
                tunnel: tunnel.parse().expect("test address"),
                tunnel_ready: true,
                tunnel_heartbeat: true,
            };
            let key = service_key(route.service);
            let entry = service_entry(&route, 7, 3);
            assert_eq!((entry.generation, entry.counter_slot), (7, 3));
            assert_eq!(entry_route(&key, &entry), Some(route));
        }
    }

    #[test]
    fn ipv4_key_is_readable_in_bpftool() {
        // bpftool prints the array bytes: the address must be in network order, port in host.
        let key = service_key("10.96.0.10:80".parse().expect("test address"));
        assert_eq!(&key.addr[..4], &[10, 96, 0, 10]);
        assert_eq!(&key.addr[4..], &[0; 12]);
        assert_eq!(key.port, 80);
    }
}
