//! Connection tracking of the TC path: flows, their NAT index, their state
//! machine, and the move of a flow from the embryonic tier (LRU, which a
//! flood may churn) to the assured tier (hash, never evicted; userspace's
//! garbage collector expires it).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::TcContext;
use proxy_common::ct_state::*;
use proxy_common::*;

use super::packet::{Pkt, ETH_HLEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::NS_PER_SEC;

// Sizes are placeholders: userspace sets them from --bpf-ct-map-max.
#[map]
pub static CT: HashMap<Tuple, Flow> = HashMap::with_max_entries(1024, 0);
#[map]
pub static CT_NEW: LruHashMap<Tuple, Flow> = LruHashMap::with_max_entries(1024, 0);
#[map]
pub static NAT: HashMap<Tuple, NatValue> = HashMap::with_max_entries(1024, 0);
#[map]
pub static NAT_NEW: LruHashMap<Tuple, NatValue> = LruHashMap::with_max_entries(1024, 0);
#[map]
pub static DIRECT: LruHashMap<Tuple, u8> = LruHashMap::with_max_entries(1024, 0);
#[map]
pub static TIME_WAIT: LruHashMap<Tuple, u64> = LruHashMap::with_max_entries(1024, 0);
#[map]
pub static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::with_max_entries(1024, 0);
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The flow of `key`, assured tier first. The pointer is into the map value.
#[inline(always)]
pub fn flow_get(key: &Tuple) -> Option<*mut Flow> {
    if let Some(f) = CT.get_ptr_mut(key) {
        return Some(f);
    }
    CT_NEW.get_ptr_mut(key)
}

/// The NAT index entry of `key`, either tier.
#[inline(always)]
pub fn nat_get(key: &Tuple) -> Option<NatValue> {
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { NAT.get(key) } {
        return Some(*v);
    }
    unsafe { NAT_NEW.get(key) }.copied()
}

/// The NAT index entry of `key` in place (no copy on the stack).
#[inline(always)]
pub fn nat_ptr(key: &Tuple) -> Option<*const NatValue> {
    if let Some(v) = NAT.get_ptr(key) {
        return Some(v);
    }
    NAT_NEW.get_ptr(key)
}

/// The (backend, client, backend port, nat port) key of a flow.
#[inline(always)]
pub fn key_out(key: &Tuple, f: &Flow) -> Tuple {
    Tuple::nat_out(key.src, f.backend_ip, f.backend_port, f.nat_port, key.proto)
}

/// The (backend, 0, backend port, nat port) key of a SNAT flow.
#[inline(always)]
pub fn key_in(key: &Tuple, f: &Flow) -> Tuple {
    key_out(key, f).nat_in()
}

/// The 4-tuple of a flow as its backend sees it, in NAT key form: with
/// SNAT the client is left out (the node address stands for it).
#[inline(always)]
pub fn backend_side(key: &Tuple, f: &Flow) -> Tuple {
    if f.flags & FLOW_SNAT != 0 {
        key_in(key, f)
    } else {
        key_out(key, f)
    }
}

/// Removes a flow and the NAT entries that point at it.
#[inline(always)]
pub fn flow_remove(key: &Tuple, f: &Flow) {
    let out = key_out(key, f);
    remove_nat_of(&out, key);
    if f.flags & FLOW_SNAT != 0 {
        remove_nat_of(&key_in(key, f), key);
    }
    let _ = CT.remove(key);
    let _ = CT_NEW.remove(key);
}

#[inline(always)]
fn remove_nat_of(nat: &Tuple, flow: &Tuple) {
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { NAT.get(nat) } {
        if v.flow == *flow {
            let _ = NAT.remove(nat);
        }
    }
    if let Some(v) = unsafe { NAT_NEW.get(nat) } {
        if v.flow == *flow {
            let _ = NAT_NEW.remove(nat);
        }
    }
}

/// Advances the state of a flow with a packet from the client (`from_client`)
/// or from the backend; refreshes its time. Promotes it to the assured tier
/// when it becomes established (TCP) or a stream (UDP).
#[inline(always)]
pub fn track(ctx: &TcContext, key: &Tuple, f: *mut Flow, p: &Pkt, from_client: bool) {
    let t = now();
    // SAFETY: `f` points into a map value; concurrent writers only race on
    // these plain fields, which at worst delays a state change by a packet.
    let fl = unsafe { &mut *f };
    let old = fl.state;
    let mut state = old;
    if p.proto == PROTO_TCP {
        let fl_bits = p.tcp_flags;
        if fl_bits & TCP_RST != 0 {
            if from_client && old == TCP_SYN_SENT {
                // A reset of a SYN that the backend answered from TIME_WAIT
                // (with an ACK) ends that TIME_WAIT: the client's next SYN
                // may take this 4-tuple again.
                let _ = TIME_WAIT.remove(&backend_side(key, fl));
            }
            state = TCP_CLOSED;
        } else if fl_bits & TCP_FIN != 0 {
            if from_client {
                if fl.flags & FLOW_FIN_CLIENT == 0 {
                    fl.client_fin_end = fin_end(ctx, p);
                }
            } else if fl.flags & FLOW_FIN_BACKEND == 0 && !acks_client_fin(ctx, p, fl) {
                // The backend closes actively (first, or at the same time as
                // the client): its 4-tuple stays in TIME_WAIT there after
                // the flow is gone (see port::claim).
                let _ = TIME_WAIT.insert(&backend_side(key, fl), &t, 0);
            }
            fl.flags |= if from_client {
                FLOW_FIN_CLIENT
            } else {
                FLOW_FIN_BACKEND
            };
            state = if fl.flags & (FLOW_FIN_CLIENT | FLOW_FIN_BACKEND)
                == FLOW_FIN_CLIENT | FLOW_FIN_BACKEND
            {
                TCP_CLOSED
            } else {
                TCP_CLOSE_WAIT
            };
        } else if from_client {
            if old == TCP_SYN_RECV && fl_bits & (TCP_SYN | TCP_ACK) == TCP_ACK {
                state = TCP_ESTABLISHED;
            }
        } else if old == TCP_SYN_SENT && fl_bits & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            state = TCP_SYN_RECV;
        }
    } else if from_client {
        if old == UDP_REPLIED {
            state = UDP_STREAM;
        }
    } else if old == UDP_NEW {
        state = UDP_REPLIED;
    }
    if state != old {
        fl.state = state;
        fl.last_ns = t;
        if state == TCP_ESTABLISHED || state == UDP_STREAM {
            promote(key, fl, t);
        }
    } else if t.wrapping_sub(fl.last_ns) > NS_PER_SEC {
        // At most once a second: the expiry is counted in seconds, and
        // fewer writes keep the cache line quiet on busy flows.
        fl.last_ns = t;
    }
}

/// The sequence number just past a client's FIN segment (its data
/// included); 0 if the header cannot be read.
#[inline(always)]
fn fin_end(ctx: &TcContext, p: &Pkt) -> u32 {
    let (Ok(seq), Ok(total), Ok(doff)) = (
        ctx.load::<u32>(p.l4 + 4),
        ctx.load::<u16>(ETH_HLEN + 2),
        ctx.load::<u8>(p.l4 + 12),
    ) else {
        return 0;
    };
    let headers = (p.l4 - ETH_HLEN) as u32 + ((doff >> 4) as u32) * 4;
    let data = (u16::from_be(total) as u32).wrapping_sub(headers);
    u32::from_be(seq).wrapping_add(data).wrapping_add(1)
}

/// The backend's FIN acknowledges the client's FIN: the backend had it
/// before closing (a passive close, which leaves no TIME_WAIT there).
#[inline(always)]
fn acks_client_fin(ctx: &TcContext, p: &Pkt, fl: &Flow) -> bool {
    if fl.flags & FLOW_FIN_CLIENT == 0 || p.tcp_flags & TCP_ACK == 0 {
        return false;
    }
    match ctx.load::<u32>(p.l4 + 8) {
        Ok(ack) => u32::from_be(ack).wrapping_sub(fl.client_fin_end) as i32 >= 0,
        Err(_) => false,
    }
}

/// Copies an embryonic flow and its NAT entries to the assured tier. The
/// assured copies are written before the embryonic ones go, so a packet on
/// another CPU finds one or the other.
#[inline(always)]
fn promote(key: &Tuple, f: &Flow, t: u64) {
    // SAFETY: copied out at once.
    if unsafe { CT_NEW.get(key) }.is_none() {
        return;
    }
    let v = NatValue {
        flow: *key,
        created_ns: t,
    };
    let out = key_out(key, f);
    if NAT.insert(&out, &v, 0).is_err() {
        count(stats::CT_PROMOTE_FAILED);
        return;
    }
    if f.flags & FLOW_SNAT != 0 && NAT.insert(&key_in(key, f), &v, 0).is_err() {
        let _ = NAT.remove(&out);
        count(stats::CT_PROMOTE_FAILED);
        return;
    }
    if CT.insert(key, f, 0).is_err() {
        let _ = NAT.remove(&out);
        if f.flags & FLOW_SNAT != 0 {
            let _ = NAT.remove(&key_in(key, f));
        }
        count(stats::CT_PROMOTE_FAILED);
        return;
    }
    let _ = CT_NEW.remove(key);
    let _ = NAT_NEW.remove(&out);
    if f.flags & FLOW_SNAT != 0 {
        let _ = NAT_NEW.remove(&key_in(key, f));
    }
}
