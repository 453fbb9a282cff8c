//! TC packet path (clsact ingress/egress on the node's devices) for traffic
//! that no hooked socket made.
//!
//! A flow is keyed by the tuple the client sent (client -> frontend) and
//! carries its backend and the source port used towards it ("nat port",
//! the client's own unless its 4-tuple was taken). On ingress the
//! destination becomes the backend and the source port the nat port; a
//! flow that needs SNAT gets the node address as its source on egress,
//! where the device is known. Replies are restored in two halves: the
//! destination (SNAT address -> client) on ingress, the source (backend ->
//! frontend) and the client's port on egress, since a packet arriving with
//! one of this node's addresses as its source is dropped as martian.
//!
//! State lives in two tiers ([`ct`]): new flows in LRU maps that a flood
//! can only churn among themselves, assured flows (TCP established, UDP
//! answered and sent again) in hash maps that nothing evicts; userspace's
//! garbage collector expires both by state and idle time. Fragments
//! ([`packet`]) and ICMP errors ([`icmp`]) follow their flow.

mod ct;
mod icmp;
mod packet;
mod port;

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::macros::classifier;
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::programs::TcContext;
use proxy_common::ct_state::*;
use proxy_common::*;

use crate::{select, CLUSTER_CIDRS, CONFIG, FRONTENDS, IF_ADDRS, LOCAL_IFS, NODE_IPS, SRC_RANGES};
use ct::{count, flow_get, flow_remove, nat_get, nat_ptr, now, track, CT, CT_NEW, DIRECT};
use packet::{parse, rewrite, Pkt, PROTO_ICMP};

const OK: i32 = TC_ACT_OK as i32;
const SHOT: i32 = TC_ACT_SHOT as i32;

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

/// The client's packet on its way to the backend: destination and port.
#[inline(always)]
fn forward(ctx: &mut TcContext, p: &Pkt, f: &Flow) -> Result<i32, i64> {
    rewrite(ctx, p, true, f.backend_ip, f.backend_port)?;
    rewrite(ctx, p, false, p.src, f.nat_port)?;
    Ok(OK)
}

/// Records a new flow (a port claimed, an embryonic entry) and forwards.
/// `prefer`: the nat port to try first (0: the client's own port).
#[inline(always)]
fn new_flow(
    ctx: &mut TcContext,
    p: &Pkt,
    key: &Tuple,
    backend: (u32, u16),
    svc_id: u32,
    flags: u8,
    prefer: u16,
) -> Result<i32, i64> {
    let t = now();
    let snat = flags & FLOW_SNAT != 0;
    let Some(nat_port) = port::claim(key, backend.0, backend.1, snat, prefer) else {
        // No free port: better dropped than sent on a 4-tuple in use.
        return Ok(SHOT);
    };
    let state = if p.proto != PROTO_TCP {
        UDP_NEW
    } else if p.bare_syn() {
        TCP_SYN_SENT
    } else {
        // Mid-stream (state lost): the client's next ACK makes it assured.
        TCP_SYN_RECV
    };
    let f = Flow {
        backend_ip: backend.0,
        backend_port: backend.1,
        nat_port,
        snat_ip: 0,
        svc_id,
        last_ns: t,
        state,
        flags,
        _pad: [0; 2],
        client_fin_end: 0,
    };
    if CT_NEW.insert(key, &f, 0).is_err() {
        port::release(key, backend.0, backend.1, nat_port, snat);
        count(stats::CT_INSERT_FAILED);
        return Ok(SHOT);
    }
    forward(ctx, p, &f)
}

/// A packet to no frontend and of no flow. A bare SYN is remembered (a
/// Service flow must not reuse its 4-tuple at the backend while it may be
/// in TIME_WAIT there); if a Service flow already uses that 4-tuple, or
/// left it in TIME_WAIT at the backend, this connection gets another source
/// port instead, as netfilter's NAT does. Unless that flow is waiting for
/// its SYN-ACK: then this is its own SYN, translated at a hooked device it
/// crossed first (a bridge port, then the bridge).
#[inline(always)]
fn direct(ctx: &mut TcContext, p: &Pkt, key: &Tuple) -> Result<i32, i64> {
    if !p.bare_syn() {
        return Ok(OK);
    }
    // The backend side of a Service flow from this client is this SYN's
    // reversed tuple.
    let backend_side = p.reversed();
    let clash = match nat_ptr(&backend_side) {
        Some(v) => {
            // SAFETY: map values; the flow key is read in place.
            if let Some(f) = flow_get(unsafe { &(*v).flow }) {
                if unsafe { (*f).state } == TCP_SYN_SENT {
                    return Ok(OK);
                }
            }
            true
        }
        None => port::in_time_wait(&backend_side),
    };
    if clash {
        return new_flow(ctx, p, key, (p.dst, p.dport), 0, FLOW_PASSTHROUGH, 0);
    }
    let _ = DIRECT.insert(key, &0, 0);
    Ok(OK)
}

#[inline(always)]
fn tc_ingress(ctx: &mut TcContext) -> Result<i32, i64> {
    let Some(p) = parse(ctx) else {
        return Ok(OK);
    };
    if p.proto == PROTO_ICMP {
        return icmp::ingress(ctx, &p);
    }
    // A reply to a SNAT address: back to the client (its source and port
    // are restored on egress).
    let reply = Tuple {
        src: p.src,
        dst: 0,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    };
    if let Some(v) = nat_get(&reply) {
        if let Some(f) = flow_get(&v.flow) {
            // SAFETY: copied out at once.
            let snat_ip = unsafe { (*f).snat_ip };
            if snat_ip != 0 && snat_ip == p.dst {
                track(ctx, &v.flow, f, &p, false);
                rewrite(ctx, &p, true, v.flow.src, p.dport)?;
                return Ok(OK);
            }
        }
    }
    let key = p.tuple();
    let mut prefer = 0;
    if let Some(f) = flow_get(&key) {
        // SAFETY: copied out at once.
        let fl = unsafe { *f };
        if p.bare_syn() && fl.state == TCP_CLOSED {
            // The client reuses its port for a new connection: the old nat
            // port first (free again unless the backend holds it in
            // TIME_WAIT; free again too once the client reset a SYN that
            // met that TIME_WAIT).
            flow_remove(&key, &fl);
            prefer = fl.nat_port;
        } else {
            // A retransmitted SYN lands here too: it keeps its backend.
            track(ctx, &key, f, &p, true);
            return forward(ctx, &p, &fl);
        }
    }
    let Some(fe) = tc_frontend(&p) else {
        return direct(ctx, &p, &key);
    };
    if fe.flags & FE_SRC_RANGES != 0 {
        let k = Key::new(
            64,
            SrcRangeKey {
                svc_id_be: fe.svc_id.to_be(),
                ip: p.src,
            },
        );
        if SRC_RANGES.get(&k).is_none() {
            return Ok(SHOT);
        }
    }
    // A flow promoted by another CPU between the two lookups above.
    if let Some(f) = CT.get_ptr_mut(&key) {
        // SAFETY: copied out at once.
        let fl = unsafe { *f };
        track(ctx, &key, f, &p, true);
        return forward(ctx, &p, &fl);
    }
    let Some((_, b)) = select(&fe, p.src as u64, now()) else {
        // Policy Local without a local endpoint drops; otherwise let the
        // stack answer (RST / port unreachable), as iptables mode's REJECT.
        return Ok(if fe.flags & FE_LOCAL != 0 { SHOT } else { OK });
    };
    // A client that reaches itself through the Service must see the reply
    // come from elsewhere: hairpin traffic is always SNATed.
    let snat = fe.flags & FE_SNAT != 0
        || (fe.flags & FE_SNAT_NONCLUSTER != 0
            && CLUSTER_CIDRS.get(&Key::new(32, p.src)).is_none())
        || (fe.flags & FE_SNAT_NONLOCAL_IF != 0 && !from_local_if(ctx))
        || p.src == b.ip;
    let flags = if snat { FLOW_SNAT } else { 0 };
    new_flow(ctx, &p, &key, (b.ip, b.port), fe.svc_id, flags, prefer)
}

/// The packet arrived on a device of this node's pods (`LOCAL_IFS`).
#[inline(always)]
fn from_local_if(ctx: &TcContext) -> bool {
    // SAFETY: reading the skb's arrival device (this is the ingress hook).
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: only presence is read.
    unsafe { LOCAL_IFS.get(&ifindex) }.is_some()
}

/// The SNAT source for a flow leaving through this device: the device's
/// address (as MASQUERADE picks it); for a device without one (a pod's),
/// the node address the client dialled, else the node's address.
#[inline(always)]
fn snat_address(ctx: &TcContext, orig_dst: u32) -> Option<u32> {
    // SAFETY: reading the skb's ifindex.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: copied out at once.
    if let Some(a) = unsafe { IF_ADDRS.get(&ifindex) } {
        return Some(*a);
    }
    if unsafe { NODE_IPS.get(&orig_dst) }.is_some() {
        return Some(orig_dst);
    }
    match CONFIG.get(0) {
        Some(c) if c.node_ip != 0 => Some(c.node_ip),
        _ => None,
    }
}

#[inline(always)]
fn tc_egress(ctx: &mut TcContext) -> Result<i32, i64> {
    let Some(p) = parse(ctx) else {
        return Ok(OK);
    };
    if p.proto == PROTO_ICMP {
        return icmp::egress(ctx, &p);
    }
    // A reply on its way to the client: from the frontend, to its port.
    if let Some(v) = nat_get(&p.tuple()) {
        if let Some(f) = flow_get(&v.flow) {
            // SAFETY: copied out at once.
            let fl = unsafe { *f };
            if v.flow.src == p.dst && fl.backend_ip == p.src && fl.backend_port == p.sport {
                if fl.flags & FLOW_SNAT == 0 {
                    // (SNAT flows were tracked at ingress.)
                    track(ctx, &v.flow, f, &p, false);
                }
                rewrite(ctx, &p, false, v.flow.dst, v.flow.dport)?;
                rewrite(ctx, &p, true, p.dst, v.flow.sport)?;
                return Ok(OK);
            }
        }
    }
    // The client's packet, already sent to the backend: SNAT if wanted.
    let Some(v) = nat_get(&p.reversed()) else {
        return Ok(OK);
    };
    let Some(f) = flow_get(&v.flow) else {
        return Ok(OK);
    };
    // SAFETY: `f` points into a map value; the address is set once.
    let fl = unsafe { &mut *f };
    if fl.flags & FLOW_SNAT == 0 || v.flow.src != p.src {
        return Ok(OK);
    }
    if fl.snat_ip == 0 {
        match snat_address(ctx, v.flow.dst) {
            Some(a) => fl.snat_ip = a,
            None => return Ok(OK),
        }
    }
    let snat_ip = fl.snat_ip;
    rewrite(ctx, &p, false, snat_ip, p.sport)?;
    Ok(OK)
}

#[classifier]
pub fn kproxy_tc_ingress(mut ctx: TcContext) -> i32 {
    tc_ingress(&mut ctx).unwrap_or(OK)
}

#[classifier]
pub fn kproxy_tc_egress(mut ctx: TcContext) -> i32 {
    tc_egress(&mut ctx).unwrap_or(OK)
}
