//! kproxy's eBPF programs.
//!
//! - Socket load balancing (cgroup `connect4`, `sendmsg4`, `recvmsg4`,
//!   `getpeername4`, and `connect6`, `recvmsg6`, `getpeername6` for
//!   v4-mapped destinations; in [`sock`]).
//! - TC packet path (clsact ingress/egress on the node's devices) for traffic
//!   that no hooked socket made: frontend lookup, backend selection, DNAT
//!   with checksum updates, conntrack (LRU) so a flow keeps its backend,
//!   reverse NAT of replies, and SNAT to the node address (on egress, where
//!   the device is known) for externalTrafficPolicy Cluster towards a backend
//!   on another node.
//!
//! Maps are described in `proxy-common`; userspace fills the frontend, slot
//! and backend maps, the programs fill conntrack, NAT and affinity state.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
};
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap};
use aya_ebpf::programs::TcContext;
use proxy_common::*;

mod sock;

// Sizes here are placeholders: userspace sets every size from its flags.
#[map]
static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::with_max_entries(1024, 0);
#[map]
static SLOTS: HashMap<SlotKey, u32> = HashMap::with_max_entries(1024, 0);
#[map]
static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(1024, 0);
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::with_max_entries(1024, 0);
#[map]
static SRC_RANGES: LpmTrie<SrcRangeKey, u8> = LpmTrie::with_max_entries(1024, 0);
#[map]
static CLUSTER_CIDRS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(64, 0);
#[map]
static NODE_IPS: HashMap<u32, u8> = HashMap::with_max_entries(256, 0);
#[map]
static IF_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);
#[map]
static CT: LruHashMap<Tuple, CtValue> = LruHashMap::with_max_entries(1024, 0);
#[map]
static REVNAT: LruHashMap<Tuple, RevNat> = LruHashMap::with_max_entries(1024, 0);
#[map]
static SNAT: LruHashMap<Tuple, SnatValue> = LruHashMap::with_max_entries(1024, 0);
#[map]
static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::with_max_entries(1024, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Only read by userspace (`kproxy status`); not preallocated.
#[map]
static SVC_INFO: HashMap<u32, SvcInfo> = HashMap::with_max_entries(1024, 1);

const NS_PER_SEC: u64 = 1_000_000_000;

/// Picks a backend for a new connection: the affinity entry when it is
/// fresh and its backend still exists, else a random slot.
#[inline(always)]
fn select(fe: &Frontend, client: u64, now: u64) -> Option<(u32, Backend)> {
    let akey = AffinityKey {
        svc_id: fe.svc_id,
        _pad: 0,
        client,
    };
    if fe.affinity_secs != 0 {
        // SAFETY: the value is copied out at once.
        if let Some(a) = unsafe { AFFINITY.get(&akey) } {
            let a = *a;
            if now.wrapping_sub(a.last_ns) < fe.affinity_secs as u64 * NS_PER_SEC {
                if let Some(b) = unsafe { BACKENDS.get(&a.backend_id) } {
                    let b = *b;
                    let _ = AFFINITY.insert(
                        &akey,
                        &AffinityValue {
                            backend_id: a.backend_id,
                            _pad: 0,
                            last_ns: now,
                        },
                        0,
                    );
                    return Some((a.backend_id, b));
                }
            }
        }
    }
    if fe.count == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % fe.count;
    let id = *unsafe {
        SLOTS.get(&SlotKey {
            group: fe.group,
            slot,
        })
    }?;
    let b = *unsafe { BACKENDS.get(&id) }?;
    if fe.affinity_secs != 0 {
        let _ = AFFINITY.insert(
            &akey,
            &AffinityValue {
                backend_id: id,
                _pad: 0,
                last_ns: now,
            },
            0,
        );
    }
    Some((id, b))
}

// ---------------------------------------------------------------- TC path

const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

struct Pkt {
    l4: usize,
    proto: u8,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

impl Pkt {
    fn tuple(&self) -> Tuple {
        Tuple {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }

    /// UDP may carry no checksum (0); keep it that way.
    fn l4_flags(&self) -> u64 {
        if self.proto == PROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        }
    }
}

/// IPv4 TCP/UDP, not a fragment; `None` means "not ours, pass".
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Pkt> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if ethertype != ETH_P_IP_BE {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let frag: u16 = ctx.load(ETH_HLEN + 6).ok()?;
    // More-fragments bit or a fragment offset: no ports to look at.
    if u16::from_be(frag) & 0x3fff != 0 {
        return None;
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4 + 13).ok()?
    } else {
        0
    };
    Some(Pkt {
        l4,
        proto,
        src: ctx.load(IP_SRC_OFF).ok()?,
        dst: ctx.load(IP_DST_OFF).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
        tcp_flags,
    })
}

/// Rewrites the source (`dst == false`) or destination address and port,
/// fixing the IP and L4 checksums incrementally.
#[inline(always)]
fn rewrite(
    ctx: &mut TcContext,
    p: &Pkt,
    dst: bool,
    old_ip: u32,
    new_ip: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let csum = p.csum_off();
    let l4f = p.l4_flags();
    let (ip_off, port_off) = if dst {
        (IP_DST_OFF, p.l4 + 2)
    } else {
        (IP_SRC_OFF, p.l4)
    };
    if old_ip != new_ip {
        ctx.l4_csum_replace(
            csum,
            old_ip as u64,
            new_ip as u64,
            BPF_F_PSEUDO_HDR as u64 | l4f | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_ip as u64, new_ip as u64, 4)?;
        ctx.store(ip_off, &new_ip, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, l4f | 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// Reverse NAT of a reply; true when the packet was one. On ingress only
/// destinations are restored (back to the client), on egress only sources
/// (back to the frontend): a packet arriving with one of this node's
/// addresses as its source would be dropped as martian, so the source is
/// restored on the way out, as conntrack's reverse DNAT does in POSTROUTING.
#[inline(always)]
fn reverse(ctx: &mut TcContext, p: &Pkt, ingress: bool) -> Result<bool, i64> {
    // SAFETY: copied out at once.
    let Some(r) = (unsafe { REVNAT.get(&p.tuple()) }).copied() else {
        return Ok(false);
    };
    if ingress && r.dst != 0 {
        rewrite(ctx, p, true, p.dst, r.dst, p.dport, r.dport)?;
        return Ok(true);
    }
    if !ingress && r.src != 0 {
        rewrite(ctx, p, false, p.src, r.src, p.sport, r.sport)?;
        return Ok(true);
    }
    Ok(false)
}

/// Takes a SNAT port on `addr` for the DNATed flow `post` (client ->
/// backend) and records both reverse entries: replies to addr:port get the
/// client as destination (ingress), replies to the client get the frontend
/// as source (egress).
#[inline(always)]
fn snat_allocate(post: &Tuple, addr: u32, orig_dst: u32, orig_dport: u16) -> Option<SnatValue> {
    let cfg = CONFIG.get(0).copied()?;
    if cfg.snat_port_max < cfg.snat_port_min || cfg.snat_port_min == 0 {
        return None;
    }
    let span = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    let mut i = 0;
    let mut got = 0u16;
    while i < 16 {
        i += 1;
        // SAFETY: helper without arguments.
        let port = cfg.snat_port_min + (unsafe { bpf_get_prandom_u32() } % span) as u16;
        let port_be = port.to_be();
        let reply = Tuple {
            src: post.dst,
            dst: addr,
            sport: post.dport,
            dport: port_be,
            proto: post.proto,
            _pad: [0; 3],
        };
        let rev = RevNat {
            src: 0,
            dst: post.src,
            sport: 0,
            dport: post.sport,
        };
        // NOEXIST: a port in use towards this backend is never shared.
        if REVNAT.insert(&reply, &rev, BPF_NOEXIST as u64).is_ok() {
            got = port_be;
            break;
        }
    }
    if got == 0 {
        return None;
    }
    let out = Tuple {
        src: post.dst,
        dst: post.src,
        sport: post.dport,
        dport: post.sport,
        proto: post.proto,
        _pad: [0; 3],
    };
    let _ = REVNAT.insert(
        &out,
        &RevNat {
            src: orig_dst,
            dst: 0,
            sport: orig_dport,
            dport: 0,
        },
        0,
    );
    let s = SnatValue {
        ip: addr,
        port: got,
        orig_dport,
        orig_dst,
    };
    let _ = SNAT.insert(post, &s, 0);
    Some(s)
}

#[inline(always)]
fn tc_frontend(p: &Pkt) -> Option<Frontend> {
    let mut key = FrontendKey {
        ip: p.dst,
        port: p.dport,
        proto: p.proto,
        scope: SCOPE_EXTERNAL,
    };
    // SAFETY: values are copied out at once.
    if let Some(fe) = unsafe { FRONTENDS.get(&key) } {
        return Some(*fe);
    }
    key.scope = SCOPE_INTERNAL;
    if let Some(fe) = unsafe { FRONTENDS.get(&key) } {
        if fe.kind == KIND_CLUSTER_IP {
            return Some(*fe);
        }
    }
    unsafe { NODE_IPS.get(&p.dst) }?;
    key.ip = 0;
    key.scope = SCOPE_EXTERNAL;
    unsafe { FRONTENDS.get(&key) }.copied()
}

/// A bare SYN to no frontend opens a direct connection. A reverse-NAT entry
/// for its reply tuple is left over from an earlier Service flow that used
/// the same ports (clients reuse a local port towards another destination):
/// it would disguise this connection's replies as the frontend's, and the
/// client would reset them. The old flow cannot be alive: the backend would
/// see both as one 4-tuple.
#[inline(always)]
fn forget_stale_reply(p: &Pkt) {
    if p.proto != PROTO_TCP || p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let reply = Tuple {
        src: p.dst,
        dst: p.src,
        sport: p.dport,
        dport: p.sport,
        proto: p.proto,
        _pad: [0; 3],
    };
    let _ = REVNAT.remove(&reply);
}

#[inline(always)]
fn tc_ingress(ctx: &mut TcContext) -> Result<i32, i64> {
    let Some(p) = parse(ctx) else {
        return Ok(TC_ACT_OK as i32);
    };
    if reverse(ctx, &p, true)? {
        return Ok(TC_ACT_OK as i32);
    }
    let Some(fe) = tc_frontend(&p) else {
        forget_stale_reply(&p);
        return Ok(TC_ACT_OK as i32);
    };
    if fe.flags & FE_SRC_RANGES != 0 {
        let key = Key::new(
            64,
            SrcRangeKey {
                svc_id_be: fe.svc_id.to_be(),
                ip: p.src,
            },
        );
        if SRC_RANGES.get(&key).is_none() {
            return Ok(TC_ACT_SHOT as i32);
        }
    }
    let orig = p.tuple();
    // A bare SYN starts a new connection: never reuse an old entry for it
    // (the client port may be reused after the backend set changed).
    let syn = p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut chosen: Option<(u32, Backend)> = None;
    if !syn {
        // SAFETY: copied out at once.
        if let Some(ct) = unsafe { CT.get(&orig) } {
            let id = ct.backend_id;
            if let Some(b) = unsafe { BACKENDS.get(&id) } {
                chosen = Some((id, *b));
            }
        }
    }
    let new_flow = chosen.is_none();
    let (id, b) = match chosen {
        Some(c) => c,
        None => {
            // SAFETY: helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            match select(&fe, p.src as u64, now) {
                Some(c) => c,
                None => {
                    // Policy Local without a local endpoint drops; otherwise
                    // let the stack answer (RST / port unreachable), as
                    // iptables mode's REJECT does.
                    return Ok(if fe.flags & FE_LOCAL != 0 {
                        TC_ACT_SHOT as i32
                    } else {
                        TC_ACT_OK as i32
                    });
                }
            }
        }
    };
    if new_flow {
        let _ = CT.insert(
            &orig,
            &CtValue {
                backend_id: id,
                svc_id: fe.svc_id,
            },
            0,
        );
    }
    let snat = fe.flags & FE_SNAT != 0
        || (fe.flags & FE_SNAT_NONCLUSTER != 0
            && CLUSTER_CIDRS.get(&Key::new(32, p.src)).is_none());
    rewrite(ctx, &p, true, p.dst, b.ip, p.dport, b.port)?;
    let post = Tuple {
        dst: b.ip,
        dport: b.port,
        ..orig
    };
    if !snat {
        if new_flow {
            // Replies get the frontend back as their source on egress.
            let reply = Tuple {
                src: b.ip,
                dst: p.src,
                sport: b.port,
                dport: p.sport,
                proto: p.proto,
                _pad: [0; 3],
            };
            let _ = REVNAT.insert(
                &reply,
                &RevNat {
                    src: p.dst,
                    dst: 0,
                    sport: p.dport,
                    dport: 0,
                },
                0,
            );
        }
        return Ok(TC_ACT_OK as i32);
    }
    // SNAT on egress, where the device (and so the address the backend can
    // answer) is known; doing it here would give the packet one of this
    // node's addresses as its source on ingress, which the stack drops.
    if new_flow {
        let _ = SNAT.insert(
            &post,
            &SnatValue {
                ip: 0,
                port: 0,
                orig_dport: p.dport,
                orig_dst: p.dst,
            },
            BPF_NOEXIST as u64,
        );
    }
    Ok(TC_ACT_OK as i32)
}

#[inline(always)]
fn tc_egress(ctx: &mut TcContext) -> Result<i32, i64> {
    let Some(p) = parse(ctx) else {
        return Ok(TC_ACT_OK as i32);
    };
    if reverse(ctx, &p, false)? {
        return Ok(TC_ACT_OK as i32);
    }
    let post = p.tuple();
    // SAFETY: copied out at once.
    let Some(mut s) = (unsafe { SNAT.get(&post) }).copied() else {
        return Ok(TC_ACT_OK as i32);
    };
    if s.ip == 0 {
        // First packet of the flow on its way out: this device's address
        // (as MASQUERADE picks it), or for a device without one (a pod's)
        // the node address the client reached, else the node's first
        // address; and a free SNAT port.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let addr = match unsafe { IF_ADDRS.get(&ifindex) } {
            Some(a) => *a,
            None if unsafe { NODE_IPS.get(&s.orig_dst) }.is_some() => s.orig_dst,
            None => match CONFIG.get(0) {
                Some(c) if c.node_ip != 0 => c.node_ip,
                _ => return Ok(TC_ACT_OK as i32),
            },
        };
        s = match snat_allocate(&post, addr, s.orig_dst, s.orig_dport) {
            Some(s) => s,
            // No free port: better dropped than sent with a colliding one.
            None => return Ok(TC_ACT_SHOT as i32),
        };
    }
    rewrite(ctx, &p, false, p.src, s.ip, p.sport, s.port)?;
    Ok(TC_ACT_OK as i32)
}

#[classifier]
pub fn kproxy_tc_ingress(mut ctx: TcContext) -> i32 {
    tc_ingress(&mut ctx).unwrap_or(TC_ACT_OK as i32)
}

#[classifier]
pub fn kproxy_tc_egress(mut ctx: TcContext) -> i32 {
    tc_egress(&mut ctx).unwrap_or(TC_ACT_OK as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
