//! Map types shared by the eBPF programs (`agent-ebpf`) and the agent's userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so that keys hash the same on both
//! sides (implicit padding would be hashed as garbage) and so that `bpftool map dump` can print
//! them with field names from BTF. Addresses are byte arrays in network order and ports are in
//! host order: that is what makes `bpftool` output readable (`"addr": [10,96,0,10,...]`,
//! `"port": 80`) instead of byte-swapped integers.
#![cfg_attr(not(feature = "user"), no_std)]

/// Names of the maps, as pinned under the agent's bpffs directory (`/sys/fs/bpf/beamlit/`).
pub mod map_names {
    pub const SERVICES: &str = "services";
    pub const SERVICE_COUNTERS: &str = "service_counters";
    /// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`): freed with its socket, no key to list.
    pub const SOCKET_DEST: &str = "socket_dest";
    pub const FLOWS: &str = "flows";
    pub const CONFIG: &str = "config";
    pub const EXEMPT_CGROUPS: &str = "exempt_cgroups";
    /// Pinned by agents before socket-local storage replaced it (a cookie-keyed LRU map, with a
    /// `sock_release` program deleting its entries): removed by a newer agent's start and by
    /// `cleanup`.
    pub const RETIRED_SOCKETS: &str = "sockets";
}

/// Capacities. Userspace validates against these before it writes.
pub const MAX_SERVICES: u32 = 65_536;
/// Redirected connections awaiting the tunnel's accept (`flows`, an LRU: the tunnel consumes
/// its entries, eviction only matters for connections it never accepted).
pub const MAX_REDIRECTED_SOCKETS: u32 = 262_144;

/// Cgroups whose processes are never redirected (`exempt_cgroups`): the agent's own pod and the
/// controller's pods on the node, a few per node.
pub const MAX_EXEMPT_CGROUPS: u32 = 256;
/// How many ancestor levels of a connecting task's cgroup v2 the programs look up in
/// `exempt_cgroups` (a pod's directory is a few levels below the pods cgroup; deeper levels are
/// not looked at).
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Offload share unit: basis points, 0..=10000.
pub const SHARE_SCALE: u16 = 10_000;

pub const FAMILY_INET: u8 = 4;
pub const FAMILY_INET6: u8 = 6;
/// IPPROTO_TCP. Model traffic is TCP; UDP is deliberately out of scope.
pub const PROTO_TCP: u8 = 6;

/// `ServiceEntry::flags`: redirection is allowed only while this bit is set. The agent clears it
/// when the tunnel for the entry is not accepting connections, so new connections fail open
/// to the local path.
pub const FLAG_TUNNEL_READY: u16 = 1 << 0;
/// `ServiceEntry::flags`: the tunnel is the agent's own, so redirection also requires its
/// heartbeat (`AgentConfig::tunnel_heartbeat_ns`) to be fresh. A killed agent cannot clear
/// `FLAG_TUNNEL_READY`; a stale heartbeat makes new connections fail open all the same.
pub const FLAG_TUNNEL_HEARTBEAT: u16 = 1 << 1;
/// How stale the heartbeat may be (the agent beats every 100 ms).
pub const TUNNEL_HEARTBEAT_TIMEOUT_NS: u64 = 500_000_000;

/// Key of the `services` map: the address a client dials.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceKey {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6; network byte order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// `PROTO_TCP`.
    pub proto: u8,
    /// `FAMILY_INET` or `FAMILY_INET6`.
    pub family: u8,
}

/// Value of the `services` map: where, and how often, to redirect new connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceEntry {
    /// Tunnel address, same family as the key (connect6 can only write an IPv6 address).
    pub tunnel_addr: [u8; 16],
    /// Bumped by the agent on every change of the entry; shown by `inspect`, acknowledged to the
    /// controller in cluster mode.
    pub generation: u32,
    /// Share of new connections redirected, in basis points (0..=10000).
    pub share_bp: u16,
    /// Host byte order.
    pub tunnel_port: u16,
    pub flags: u16,
    pub tunnel_family: u8,
    pub _pad: u8,
    /// Index of this service's counters in the per-CPU `service_counters` array. An array index
    /// instead of a second hash lookup keeps connect4 cheap; userspace allocates slots.
    pub counter_slot: u32,
}

/// Value of the per-CPU `service_counters` array, at `ServiceEntry::counter_slot`. Summed over
/// CPUs by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCounters {
    /// Connects that went the local way (the random draw said so, or share 0).
    pub local: u64,
    /// Connects rewritten to the tunnel.
    pub redirected: u64,
    /// Connects that would have been redirected but failed open (tunnel not ready, family
    /// mismatch, or the rewrite failed).
    pub fail_open: u64,
    /// Connects that the draw would have redirected but that came from the agent's own sockets
    /// (marked with the bypass mark) or from an exempt pod (`exempt_cgroups`), so went the local
    /// way.
    pub bypassed: u64,
}

/// The destination a redirected socket asked for: its socket-local storage (`socket_dest`), so
/// that getpeername can report it, and the value of `flows`, so that the tunnel can.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OriginalDest {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub family: u8,
    pub proto: u8,
}

/// Key of the `flows` LRU map: the 4-tuple of a redirected connection as the tunnel sees it on
/// accept (peer = client, local = tunnel). Written by `sock_ops` when the client's SYN is about to
/// leave (its source port is known by then), consumed by the tunnel on accept. A connection the
/// tunnel finds no flow for was not redirected by this node's eBPF, and is refused.
///
/// IPv4 addresses (including v4-mapped ones of dual-stack sockets) are stored as family 4 in the
/// first 4 bytes, as the tunnel's IPv4 listener reports them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub tunnel_addr: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    /// Host byte order.
    pub tunnel_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The single value of the `config` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AgentConfig {
    /// Sockets whose SO_MARK equals this value are never redirected (the agent's own tunnel
    /// sockets, which must be able to reach the real Service). 0 disables the check.
    pub bypass_mark: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC (the clock of `bpf_ktime_get_ns`) when the tunnel last proved alive.
    pub tunnel_heartbeat_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, made only of integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::ServiceCounters {}
    unsafe impl aya::Pod for super::OriginalDest {}
    unsafe impl aya::Pod for super::AgentConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        // Sum of field sizes == struct size: nothing the compiler inserted gets hashed.
        assert_eq!(size_of::<ServiceKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<ServiceEntry>(), 16 + 4 + 2 + 2 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<ServiceCounters>(), 4 * 8);
        assert_eq!(size_of::<OriginalDest>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<AgentConfig>(), 16);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 3);
    }
}
