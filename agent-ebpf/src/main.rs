//! eBPF programs of the Beamlit agent, attached to a cgroup v2 directory (the node's cgroup root
//! in production, a test-made child cgroup in tests).
//!
//! - `connect4` / `connect6`: for a connect to a known Service address, draw a random number and,
//!   below the entry's offload share, rewrite the destination to the tunnel. The decision is per
//!   connection and taken once, at connect time: existing connections are never touched, so a
//!   change of share drops nothing.
//! - `getpeername4` / `getpeername6`: a redirected socket reports the Service address it dialled.
//! - `sock_ops` (TCP_CONNECT_CB): for a redirected socket, publish its 4-tuple in `flows`, so the
//!   tunnel can tell which Service an accepted connection was meant for, and refuse any
//!   connection that this node's eBPF did not redirect.
//!
//! What a redirected socket dialled is kept in its socket-local storage (`socket_dest`), which
//! the kernel frees with the socket: no program runs when sockets close (an earlier version
//! kept it in a cookie-keyed map and ran `sock_release` on every socket close to delete it).
//!
//! Every miss or error returns 1 without rewriting: the connection proceeds as if the agent did
//! not exist (fail open). The programs never return 0 (which would make connect fail with EPERM).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock, bpf_sock_addr,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SkStorage},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_prandom_u32, bpf_ktime_get_ns,
        generated::bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use beamlit_common::{
    AgentConfig, FAMILY_INET, FAMILY_INET6, FLAG_TUNNEL_HEARTBEAT, FLAG_TUNNEL_READY, FlowKey,
    MAX_CGROUP_DEPTH, MAX_EXEMPT_CGROUPS, MAX_REDIRECTED_SOCKETS, MAX_SERVICES, OriginalDest,
    PROTO_TCP, SHARE_SCALE, ServiceCounters, ServiceEntry, ServiceKey, TUNNEL_HEARTBEAT_TIMEOUT_NS,
};

/// Return value that lets the syscall proceed (with whatever address the program left).
const PROCEED: i32 = 1;
const SOCK_STREAM: u32 = 1;

// Map names are lowercase because they are what users type after `bpftool map dump pinned`.
#[btf_map(name = "services", pin_by_name)]
static SERVICES: HashMap<ServiceKey, ServiceEntry, { MAX_SERVICES as usize }> = HashMap::new();

/// Indexed by `ServiceEntry::counter_slot`.
#[btf_map(name = "service_counters", pin_by_name)]
static SERVICE_COUNTERS: PerCpuArray<ServiceCounters, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

/// Per socket: the Service address it dialled. Created only for redirected sockets; freed by
/// the kernel with the socket.
#[btf_map(name = "socket_dest", pin_by_name)]
static SOCKET_DEST: SkStorage<OriginalDest> = SkStorage::new();

/// 4-tuple of a redirected connection -> the Service address it dialled. Consumed by the tunnel.
#[btf_map(name = "flows", pin_by_name)]
static FLOWS: LruHashMap<FlowKey, OriginalDest, { MAX_REDIRECTED_SOCKETS as usize }> =
    LruHashMap::new();

#[btf_map(name = "config", pin_by_name)]
static CONFIG: Array<AgentConfig, 1> = Array::new();

/// Cgroup v2 ids (of pods' directories) whose processes are never redirected, whatever
/// `services` says: the agent's own pod and the controller's pods on this node, so that no entry
/// can cut them off from the API server or Beamlit. Written by the agent only (value unused).
#[btf_map(name = "exempt_cgroups", pin_by_name)]
static EXEMPT_CGROUPS: HashMap<u64, u8, { MAX_EXEMPT_CGROUPS as usize }> = HashMap::new();

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, FAMILY_INET);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, FAMILY_INET6);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, FAMILY_INET);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, FAMILY_INET6);
    PROCEED
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        publish_flow(&ctx);
    }
    // sock_ops programs return 1 to let the operation proceed.
    1
}

/// At TCP_CONNECT_CB the source port is assigned and the SYN not yet sent, so the flow is in the
/// map before the tunnel can possibly accept the connection.
#[inline(always)]
fn publish_flow(ctx: &SockOpsContext) {
    // SAFETY: the kernel passes a valid bpf_sock_ops; `sk` is a full socket at this callback
    // (or null, which the lookup refuses).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    let Some(original) = socket_dest(sk, None) else {
        return; // Not redirected: the common case.
    };
    let mut key = FlowKey {
        client_addr: [0; 16],
        tunnel_addr: [0; 16],
        client_port: ctx.local_port() as u16,
        // The remote port is a big-endian u16 in the upper half of the field.
        tunnel_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        family: FAMILY_INET,
        _pad: [0; 3],
    };
    const AF_INET: u32 = 2;
    if ctx.family() == AF_INET {
        key.client_addr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
        key.tunnel_addr[..4].copy_from_slice(&ctx.remote_ip4().to_ne_bytes());
    } else {
        let (local, remote) = (ctx.local_ip6(), ctx.remote_ip6());
        for i in 0..4 {
            key.client_addr[i * 4..i * 4 + 4].copy_from_slice(&local[i].to_ne_bytes());
            key.tunnel_addr[i * 4..i * 4 + 4].copy_from_slice(&remote[i].to_ne_bytes());
        }
        if is_v4_mapped(&key.tunnel_addr) {
            // A dual-stack socket sent to an IPv4 tunnel: the tunnel sees plain IPv4.
            key.client_addr.copy_within(12..16, 0);
            key.tunnel_addr.copy_within(12..16, 0);
            key.client_addr[4..].fill(0);
            key.tunnel_addr[4..].fill(0);
        } else {
            key.family = FAMILY_INET6;
        }
    }
    let _ = FLOWS.insert(&key, &original, u64::from(BPF_ANY));
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, family: u8) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr; reads are of whole u32 fields.
    let sock_type = unsafe { core::ptr::read_volatile(&(*sa).type_) };
    if sock_type != SOCK_STREAM {
        return; // UDP is out of scope.
    }
    let dialled = service_key(sa, family);
    // A dual-stack (AF_INET6) socket dialling an IPv4 Service passes through connect6 with the
    // v4-mapped address ::ffff:a.b.c.d; it is the IPv4 Service all the same.
    let key = if family == FAMILY_INET6 && is_v4_mapped(&dialled.addr) {
        let mut v4 = dialled;
        v4.addr = [0; 16];
        v4.addr[..4].copy_from_slice(&dialled.addr[12..]);
        v4.family = FAMILY_INET;
        v4
    } else {
        dialled
    };
    // SAFETY: the entry is only read, and copied out at once.
    let Some(entry) = (unsafe { SERVICES.get(&key) }).copied() else {
        return;
    };
    let outcome = decide(ctx, sa, &dialled, &entry, family);
    count(entry.counter_slot, outcome);
}

#[derive(Clone, Copy)]
enum Outcome {
    Local,
    Redirected,
    FailOpen,
    Bypassed,
}

#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    sa: *mut bpf_sock_addr,
    dialled: &ServiceKey,
    entry: &ServiceEntry,
    family: u8,
) -> Outcome {
    // Draw first: at share 0 (the common state) nothing else is needed.
    if entry.share_bp == 0 {
        return Outcome::Local;
    }
    if entry.share_bp < SHARE_SCALE {
        // SAFETY: the helper has no preconditions.
        let draw = unsafe { bpf_get_prandom_u32() } % u32::from(SHARE_SCALE);
        if draw >= u32::from(entry.share_bp) {
            return Outcome::Local;
        }
    }
    // Only connections that would be redirected need the exemption checks.
    if is_bypassed(sa) || in_exempt_cgroup() {
        return Outcome::Bypassed;
    }
    if entry.flags & FLAG_TUNNEL_READY == 0 {
        return Outcome::FailOpen;
    }
    if entry.flags & FLAG_TUNNEL_HEARTBEAT != 0 && !tunnel_alive() {
        return Outcome::FailOpen;
    }
    // The address written must be of the socket's family: an IPv4 tunnel is reachable from an
    // AF_INET6 socket as ::ffff:a.b.c.d, an IPv6 tunnel never from an AF_INET one.
    let mut tunnel = entry.tunnel_addr;
    if entry.tunnel_family != family {
        if family == FAMILY_INET6 && entry.tunnel_family == FAMILY_INET {
            tunnel = [0; 16];
            tunnel[10] = 0xff;
            tunnel[11] = 0xff;
            tunnel[12..].copy_from_slice(&entry.tunnel_addr[..4]);
        } else {
            return Outcome::FailOpen;
        }
    }
    // Record before rewriting: a redirected socket without its record could not tell the app
    // (or the tunnel) where it meant to go, so if the record cannot be written we do not redirect.
    // What the socket dialled (v4-mapped stays v4-mapped), so getpeername gives it back as is.
    let mut original = OriginalDest {
        addr: dialled.addr,
        port: dialled.port,
        family,
        proto: dialled.proto,
    };
    // SAFETY: the kernel passes a valid bpf_sock_addr whose `sk` is the connecting socket.
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    if socket_dest(sk, Some(&mut original)).is_none() {
        return Outcome::FailOpen;
    }
    write_addr(sa, family, &tunnel, entry.tunnel_port);
    debug!(
        ctx,
        "redirected a socket to port {} (share {})", entry.tunnel_port, entry.share_bp
    );
    Outcome::Redirected
}

/// The agent's tunnel beat within the timeout. Without a config entry, assume it is alive (the
/// flag is only set by an agent that also writes the config).
#[inline(always)]
fn tunnel_alive() -> bool {
    let Some(config) = CONFIG.get(0) else {
        return true;
    };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    now.saturating_sub(config.tunnel_heartbeat_ns) < TUNNEL_HEARTBEAT_TIMEOUT_NS
}

/// The agent marks its own sockets (the tunnel's fallback connections to the real Service) with
/// SO_MARK = `config.bypass_mark`; those are never redirected.
#[inline(always)]
fn is_bypassed(sa: *mut bpf_sock_addr) -> bool {
    let Some(config) = CONFIG.get(0) else {
        return false;
    };
    if config.bypass_mark == 0 {
        return false;
    }
    // SAFETY: `sk` is always set for sock_addr programs (the verifier types it PTR_TO_SOCKET);
    // the null check keeps the read safe regardless.
    unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        !sk.is_null() && core::ptr::read_volatile(&(*sk).mark) == config.bypass_mark
    }
}

/// Whether the connecting task's cgroup, or one of its ancestors, is in `exempt_cgroups`. Walks
/// from the root down and stops below the task's own cgroup (the helper returns 0 there).
#[inline(always)]
fn in_exempt_cgroup() -> bool {
    for level in 1..MAX_CGROUP_DEPTH {
        // SAFETY: the helper has no preconditions; an out-of-range level gives 0.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        // SAFETY: only presence is read.
        if unsafe { EXEMPT_CGROUPS.get(&id) }.is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn count(slot: u32, outcome: Outcome) {
    // Userspace zeroes a slot before it gives it to a service, so the counts start at 0.
    let Some(counters) = SERVICE_COUNTERS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: per-CPU value, and these programs run with migration disabled, so nothing else
    // writes this slot concurrently.
    unsafe {
        match outcome {
            Outcome::Local => (*counters).local += 1,
            Outcome::Redirected => (*counters).redirected += 1,
            Outcome::FailOpen => (*counters).fail_open += 1,
            Outcome::Bypassed => (*counters).bypassed += 1,
        }
    }
}

#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, family: u8) {
    // SAFETY: the kernel passes a valid bpf_sock_addr whose `sk` is the socket asked about.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let Some(original) = socket_dest(sk, None) else {
        return;
    };
    if original.family == family {
        write_addr(ctx.sock_addr, family, &original.addr, original.port);
    }
}

/// The socket's `socket_dest` record, copied out; with `create`, written first (and returned)
/// when the socket has none. The helper is called directly rather than through aya's
/// `SkStorage` methods, which take only a sock_addr context: `sock_ops` needs it too.
#[inline(always)]
fn socket_dest(sk: *mut bpf_sock, create: Option<&mut OriginalDest>) -> Option<OriginalDest> {
    if sk.is_null() {
        return None;
    }
    let map = core::ptr::from_ref(&SOCKET_DEST).cast_mut().cast();
    let (value, flags) = match create {
        Some(v) => (
            core::ptr::from_mut(v),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        ),
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: `map` is the SK_STORAGE map above (the loader relocates its address), `sk` a
    // socket the kernel handed this program; the value pointer is null or a stack value.
    let found = unsafe { bpf_sk_storage_get(map, sk.cast(), value.cast(), flags) };
    let found = found.cast::<OriginalDest>();
    if found.is_null() {
        return None;
    }
    // SAFETY: non-null: a valid OriginalDest in the socket's storage; copied out at once.
    Some(unsafe { core::ptr::read(found) })
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

#[inline(always)]
fn service_key(sa: *mut bpf_sock_addr, family: u8) -> ServiceKey {
    let mut key = ServiceKey {
        addr: [0; 16],
        port: 0,
        proto: PROTO_TCP,
        family,
    };
    // SAFETY: whole-u32 reads of context fields, as the verifier requires.
    unsafe {
        if family == FAMILY_INET {
            let ip = core::ptr::read_volatile(&(*sa).user_ip4);
            key.addr[..4].copy_from_slice(&ip.to_ne_bytes());
        } else {
            for i in 0..4 {
                let word = core::ptr::read_volatile(&(*sa).user_ip6[i]);
                key.addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
        }
        // user_port holds the port in network order in its first two bytes.
        let port = core::ptr::read_volatile(&(*sa).user_port);
        key.port = u16::from_be(port as u16);
    }
    key
}

/// Writes an address and port into the context. The kernel accepts only 4-byte stores to
/// `user_ip4`, `user_ip6[i]` and `user_port`, hence the volatile u32 writes.
#[inline(always)]
fn write_addr(sa: *mut bpf_sock_addr, family: u8, addr: &[u8; 16], port: u16) {
    // SAFETY: whole-u32 writes of writable context fields.
    unsafe {
        if family == FAMILY_INET {
            let ip = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
            core::ptr::write_volatile(&mut (*sa).user_ip4, ip);
        } else {
            for i in 0..4 {
                let word = u32::from_ne_bytes([
                    addr[i * 4],
                    addr[i * 4 + 1],
                    addr[i * 4 + 2],
                    addr[i * 4 + 3],
                ]);
                core::ptr::write_volatile(&mut (*sa).user_ip6[i], word);
            }
        }
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(port.to_be()));
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
