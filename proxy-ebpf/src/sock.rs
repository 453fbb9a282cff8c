//! Socket load balancing (cgroup `sock_addr` programs): a socket that dials
//! a Service frontend is pointed at a backend once, at connect/send time;
//! replies and `getpeername` show the address the application dialled.
//!
//! AF_INET sockets use `connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`.
//! AF_INET6 sockets dialling an IPv4 Service as a v4-mapped address
//! (`::ffff:10.96.0.10`, Java's default) use `connect6`, `recvmsg6` and
//! `getpeername6`, with the same maps and the same selection: only the
//! place of the IPv4 address in the context differs. There is no
//! `sendmsg6`: the kernel hands an unconnected send to a v4-mapped address
//! to the IPv4 UDP path (`udpv6_sendmsg` calls `udp_sendmsg`) before its
//! `sendmsg6` hook, so `sendmsg4` sees those datagrams, with an AF_INET
//! address. Other IPv6 destinations pass untouched.

use aya_ebpf::helpers::{
    bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use aya_ebpf::EbpfContext;
use proxy_common::*;

use crate::{select, CONFIG, FRONTENDS, NODE_IPS, SOCK_REV};

const ECONNREFUSED: i32 = 111;
/// `::ffff:0:0/96`, word 2 of the address as the context holds it.
const V4_MAPPED_WORD: u32 = 0xffffu32.to_be();

#[inline(always)]
fn frontend(ctx: &SockAddrContext, ip: u32, port: u16, proto: u8) -> Option<Frontend> {
    let mut key = FrontendKey {
        ip,
        port,
        proto,
        scope: SCOPE_INTERNAL,
    };
    // SAFETY: values are copied out at once.
    if let Some(fe) = unsafe { FRONTENDS.get(&key) } {
        return Some(*fe);
    }
    if unsafe { NODE_IPS.get(&ip) }.is_none() && !localhost_nodeport(ctx, ip) {
        return None;
    }
    key.ip = 0;
    unsafe { FRONTENDS.get(&key) }.copied()
}

/// 127.0.0.1 in network order, as `user_ip4` holds it.
const LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// 127.0.0.1 is a node-port address for the sockets of the node's own
/// network namespace (localhost node ports). It is not in `NODE_IPS`: the
/// TC path must never take a packet to 127.0.0.1 from outside for a node
/// port.
#[inline(always)]
fn localhost_nodeport(ctx: &SockAddrContext, ip: u32) -> bool {
    if ip != LOCALHOST {
        return false;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    cfg.localhost_netns != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.localhost_netns
}

/// What a forward hook does with the destination it was given.
enum Verdict {
    /// Not a frontend: leave it.
    Pass,
    /// A frontend without a usable backend.
    Refuse,
    /// Dial this backend instead.
    To(Backend),
}

/// The backend for a socket dialling the IPv4 `ip:port` (network order),
/// with the reverse entry that `recvmsg`/`getpeername` need recorded.
#[inline(always)]
fn balance(ctx: &SockAddrContext, ip: u32, port: u16, proto: u8) -> Verdict {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Verdict::Pass;
    }
    let Some(fe) = frontend(ctx, ip, port, proto) else {
        return Verdict::Pass;
    };
    // SAFETY: helpers valid for cgroup sock_addr programs.
    let client = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } | (1u64 << 63);
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((_, b)) = select(&fe, client, now) else {
        return Verdict::Refuse;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCK_REV.insert(
        &SockRevKey {
            cookie,
            ip: b.ip,
            port: b.port,
            _pad: 0,
        },
        &SockRevValue { ip, port, _pad: 0 },
        0,
    );
    Verdict::To(b)
}

/// The frontend a socket dialled, for a reply from the IPv4 `ip:port`.
#[inline(always)]
fn dialled(ctx: &SockAddrContext, ip: u32, port: u16) -> Option<SockRevValue> {
    // SAFETY: helper valid for cgroup sock_addr programs; copied out at once.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        ip,
        port,
        _pad: 0,
    };
    unsafe { SOCK_REV.get(&key) }.copied()
}

/// No usable backend: refuse, like iptables mode's REJECT.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: helper valid for cgroup sock_addr programs.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    0
}

/// connect4 and sendmsg4.
#[inline(always)]
fn forward4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr to this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    // Network order in the low 16 bits.
    match balance(ctx, sa.user_ip4, sa.user_port as u16, sa.protocol as u8) {
        Verdict::Pass => 1,
        Verdict::Refuse => refuse(),
        Verdict::To(b) => {
            sa.user_ip4 = b.ip;
            sa.user_port = b.port as u32;
            1
        }
    }
}

/// recvmsg4 and getpeername4.
#[inline(always)]
fn reverse4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in forward4.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(v) = dialled(ctx, sa.user_ip4, sa.user_port as u16) {
        sa.user_ip4 = v.ip;
        sa.user_port = v.port as u32;
    }
    1
}

/// The IPv4 address inside a v4-mapped IPv6 one (`::ffff:a.b.c.d`).
#[inline(always)]
fn v4_mapped(ip6: &[u32; 4]) -> Option<u32> {
    (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD).then_some(ip6[3])
}

/// connect6: a v4-mapped frontend gets a v4-mapped backend.
#[inline(always)]
fn forward6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in forward4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(ip) = v4_mapped(&sa.user_ip6) else {
        return 1;
    };
    match balance(ctx, ip, sa.user_port as u16, sa.protocol as u8) {
        Verdict::Pass => 1,
        Verdict::Refuse => refuse(),
        Verdict::To(b) => {
            sa.user_ip6[3] = b.ip;
            sa.user_port = b.port as u32;
            1
        }
    }
}

/// recvmsg6 and getpeername6: a v4-mapped backend shows as the frontend.
#[inline(always)]
fn reverse6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in forward4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(ip) = v4_mapped(&sa.user_ip6) else {
        return 1;
    };
    if let Some(v) = dialled(ctx, ip, sa.user_port as u16) {
        sa.user_ip6[3] = v.ip;
        sa.user_port = v.port as u32;
    }
    1
}

#[cgroup_sock_addr(connect4)]
pub fn kproxy_connect4(ctx: SockAddrContext) -> i32 {
    forward4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kproxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kproxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn kproxy_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn kproxy_connect6(ctx: SockAddrContext) -> i32 {
    forward6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kproxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn kproxy_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx)
}
