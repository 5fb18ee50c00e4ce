//! Identify: which Service an accepted connection was meant for, from the `flows` map that
//! `sock_ops` fills when a redirected client connects. A connection with no flow was not
//! redirected by this node's eBPF (someone dialled the tunnel directly): it is refused, so the
//! tunnel is no open proxy and its credentials serve only clients that could reach the Service.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Mutex,
};

use aya::maps::{HashMap, Map, MapData};
use beamlit_common::{FAMILY_INET, FAMILY_INET6, FlowKey, OriginalDest, map_names};

use crate::model;

pub struct FlowTable {
    // aya's map handle needs &mut for remove; the syscalls themselves are cheap and thread-safe.
    map: Mutex<HashMap<MapData, FlowKey, OriginalDest>>,
}

impl FlowTable {
    pub fn open(bpffs_dir: &Path) -> anyhow::Result<Self> {
        let path = bpffs_dir.join(map_names::FLOWS);
        let data = MapData::from_pin(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        Self::from_data(data)
    }

    fn from_data(data: MapData) -> anyhow::Result<Self> {
        let map = HashMap::try_from(Map::from_map_data(data)?)?;
        Ok(Self {
            map: Mutex::new(map),
        })
    }

    /// The Service the client dialled, consuming the flow (each connection is identified once;
    /// a later connection reusing the 4-tuple gets a fresh flow from sock_ops).
    pub fn take(&self, client: SocketAddr, tunnel: SocketAddr) -> Option<SocketAddr> {
        let key = flow_key(client, tunnel);
        let mut map = self.map.lock().ok()?;
        let original = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        let ip = model::ip_from_bytes(original.family, &original.addr)?;
        Some(SocketAddr::new(normalize(ip), original.port))
    }
}

/// IPv4 inside IPv6 (dual-stack) is IPv4, as `sock_ops` stores it.
fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn flow_key(client: SocketAddr, tunnel: SocketAddr) -> FlowKey {
    let mut key = FlowKey {
        client_port: client.port(),
        tunnel_port: tunnel.port(),
        ..FlowKey::default()
    };
    match (normalize(client.ip()), normalize(tunnel.ip())) {
        (IpAddr::V4(c), IpAddr::V4(t)) => {
            key.family = FAMILY_INET;
            key.client_addr[..4].copy_from_slice(&c.octets());
            key.tunnel_addr[..4].copy_from_slice(&t.octets());
        }
        (c, t) => {
            key.family = FAMILY_INET6;
            key.client_addr = to_v6(c);
            key.tunnel_addr = to_v6(t);
        }
    }
    key
}

fn to_v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_plain_ipv4_give_the_same_key() {
        let plain = flow_key(
            "10.200.1.2:40000".parse().expect("addr"),
            "10.200.0.1:15001".parse().expect("addr"),
        );
        let mapped = flow_key(
            "[::ffff:10.200.1.2]:40000".parse().expect("addr"),
            "[::ffff:10.200.0.1]:15001".parse().expect("addr"),
        );
        assert_eq!(plain, mapped);
        assert_eq!(plain.family, FAMILY_INET);
        assert_eq!(&plain.client_addr[..4], &[10, 200, 1, 2]);
        assert_eq!((plain.client_port, plain.tunnel_port), (40000, 15001));
    }
}
