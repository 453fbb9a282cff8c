//! Choosing the source port of a flow towards its backend (the "nat port")
//! and claiming it in the NAT index.
//!
//! The client's own port is kept when its 4-tuple at the backend is free
//! (with SNAT only when it lies in the NAT port range, which leaves out the
//! node's ephemeral ports: the node's own connections use those, and they
//! are not tracked here).
//! Otherwise the whole range is scanned from a random start with
//! `bpf_loop`, so a free port is found whenever one exists, at a cost
//! bounded by the range. A port whose flow has closed (or whose flow is
//! gone) counts as free: ports are reused as soon as their flow ends,
//! unless the backend closed that flow first. Then the backend holds the
//! 4-tuple in TIME_WAIT for a minute and would answer a new client's SYN
//! on it with an ACK (a reset and a retry, or a timeout, for the client),
//! so the search passes over it; only when the next [`TW_PROBES`] ports
//! are taken too is the first such port reused, which beats dropping the
//! connection (and bounds the search when backends hold most of the range
//! in TIME_WAIT).

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::cty::c_void;
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use proxy_common::ct_state::TCP_CLOSED;
use proxy_common::*;

use super::ct::{count, flow_get, flow_remove, now, NAT, NAT_NEW, TIME_WAIT};
use crate::CONFIG;

/// How many more ports are probed for one not in a backend's TIME_WAIT once
/// such a port was found: when a free port is rarer than 1 in 100, 256
/// probes still find one 92 % of the time, at a bounded cost per new flow.
const TW_PROBES: u16 = 256;

/// What a port must be free for; on `bpf_loop`'s stack.
#[repr(C)]
struct Claim {
    flow: Tuple,
    backend_ip: u32,
    backend_port: u16,
    snat: u8,
    /// Ports in the backend's TIME_WAIT may be taken (the last resort).
    reuse_tw: u8,
    lo: u16,
    /// Ports from `skip_min` on are shifted past the skipped range by `skip_len`.
    skip_min: u16,
    skip_len: u16,
    /// Ports probed since `tw_port` was found.
    tw_probes: u16,
    span: u32,
    start: u32,
    /// The port found (network order), 0 while none.
    got: u16,
    /// The first free port seen that the backend still holds in TIME_WAIT.
    tw_port: u16,
}

/// `key` is free in both NAT tiers, or held by a flow that closed or no
/// longer exists (whose entries are then removed).
#[inline(always)]
fn free(key: &Tuple) -> bool {
    // SAFETY: copied out at once.
    let v = match unsafe { NAT.get(key) } {
        Some(v) => *v,
        None => match unsafe { NAT_NEW.get(key) } {
            Some(v) => *v,
            None => return true,
        },
    };
    match flow_get(&v.flow) {
        None => {
            let _ = NAT.remove(key);
            let _ = NAT_NEW.remove(key);
            true
        }
        Some(f) => {
            // SAFETY: copied out at once.
            let f = unsafe { *f };
            if f.state == TCP_CLOSED {
                flow_remove(&v.flow, &f);
                true
            } else {
                false
            }
        }
    }
}

/// The backend closed a flow on `key` (its side of a NAT key) less than
/// [`BACKEND_TIME_WAIT_NS`] ago.
#[inline(always)]
pub fn in_time_wait(key: &Tuple) -> bool {
    // SAFETY: copied out at once.
    match unsafe { TIME_WAIT.get(key) } {
        Some(t) => now().wrapping_sub(*t) < BACKEND_TIME_WAIT_NS,
        None => false,
    }
}

/// A free `port` the backend still holds in TIME_WAIT: remembered as the
/// last resort, and passed over unless that is what is being tried.
#[inline(always)]
fn held_in_time_wait(c: &mut Claim, key: &Tuple, port: u16) -> bool {
    if c.reuse_tw != 0 || !in_time_wait(key) {
        return false;
    }
    if c.tw_port == 0 {
        c.tw_port = port;
    }
    true
}

/// Claims `port` (network order) for the flow: its NAT entries are written
/// with NOEXIST, so two CPUs never get one port.
#[inline(always)]
fn try_port(c: &mut Claim, port: u16) -> bool {
    let v = NatValue {
        flow: c.flow,
        created_ns: now(),
    };
    let out = Tuple::nat_out(c.flow.src, c.backend_ip, c.backend_port, port, c.flow.proto);
    if c.snat != 0 {
        let inn = out.nat_in();
        if !free(&inn) || !free(&out) || held_in_time_wait(c, &inn, port) {
            return false;
        }
        if NAT_NEW.insert(&inn, &v, BPF_NOEXIST as u64).is_err() {
            return false;
        }
        if NAT_NEW.insert(&out, &v, BPF_NOEXIST as u64).is_err() {
            let _ = NAT_NEW.remove(&inn);
            return false;
        }
        return true;
    }
    if !free(&out) || held_in_time_wait(c, &out, port) {
        return false;
    }
    // A recent direct connection on this 4-tuple may still be in TIME_WAIT
    // at the backend: a SYN reusing it would be answered with an ACK.
    let direct = Tuple {
        src: c.flow.src,
        dst: c.backend_ip,
        sport: port,
        dport: c.backend_port,
        proto: c.flow.proto,
        _pad: [0; 3],
    };
    // SAFETY: only presence is read.
    if unsafe { super::ct::DIRECT.get(&direct) }.is_some() {
        return false;
    }
    NAT_NEW.insert(&out, &v, BPF_NOEXIST as u64).is_ok()
}

/// `bpf_loop` callback: probes the `i`th port of the range after `start`.
unsafe extern "C" fn probe(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Claim` on claim()'s stack.
    let c = unsafe { &mut *(ctx as *mut Claim) };
    // checked_rem: no division-by-zero panic path for the verifier to see.
    let Some(off) = c.start.wrapping_add(i as u32).checked_rem(c.span) else {
        return 1;
    };
    let mut port = c.lo as u32 + off;
    if c.skip_len != 0 && port >= c.skip_min as u32 {
        port += c.skip_len as u32;
    }
    let port = port as u16;
    if try_port(c, port.to_be()) {
        c.got = port.to_be();
        return 1;
    }
    if c.tw_port != 0 {
        // Backends hold most of the range in TIME_WAIT: settle for one of
        // those ports rather than scan on (each probe costs map lookups,
        // on every new flow).
        c.tw_probes += 1;
        if c.tw_probes >= TW_PROBES {
            return 1;
        }
    }
    0
}

/// Picks and claims the nat port of the new flow `flow` towards the
/// backend, trying `prefer` (network order; 0: the client's own port)
/// first; `None` when every port of the range is in use by live flows.
#[inline(always)]
pub fn claim(
    flow: &Tuple,
    backend_ip: u32,
    backend_port: u16,
    snat: bool,
    prefer: u16,
) -> Option<u16> {
    let cfg = CONFIG.get(0).copied()?;
    let mut c = Claim {
        flow: *flow,
        backend_ip,
        backend_port,
        snat: snat as u8,
        reuse_tw: 0,
        lo: cfg.snat_port_min,
        skip_min: cfg.skip_min,
        skip_len: 0,
        tw_probes: 0,
        span: 0,
        start: 0,
        got: 0,
        tw_port: 0,
    };
    let first = if prefer != 0 { prefer } else { flow.sport };
    let own = u16::from_be(first);
    let skipped = cfg.skip_min != 0 && own >= cfg.skip_min && own <= cfg.skip_max;
    let in_range = own >= cfg.snat_port_min && own <= cfg.snat_port_max && !skipped;
    if (!snat || in_range) && try_port(&mut c, first) {
        return chosen(flow, first);
    }
    if cfg.snat_port_min != 0 && cfg.snat_port_max >= cfg.snat_port_min {
        c.span = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
        if cfg.skip_min > cfg.snat_port_min
            && cfg.skip_max >= cfg.skip_min
            && cfg.skip_max < cfg.snat_port_max
        {
            c.skip_len = cfg.skip_max - cfg.skip_min + 1;
            c.span -= c.skip_len as u32;
        }
        // SAFETY: helper without arguments.
        c.start = unsafe { bpf_get_prandom_u32() }
            .checked_rem(c.span)
            .unwrap_or(0);
        // SAFETY: `probe` only touches `c`, which outlives the call.
        unsafe {
            bpf_loop(
                c.span,
                probe as *mut c_void,
                &mut c as *mut Claim as *mut c_void,
                0,
            )
        };
    }
    if c.got == 0 && c.tw_port != 0 {
        c.reuse_tw = 1;
        let port = c.tw_port;
        if try_port(&mut c, port) {
            c.got = port;
            count(stats::TIME_WAIT_REUSED);
        }
    }
    if c.got == 0 {
        count(stats::NAT_PORT_EXHAUSTED);
        return None;
    }
    chosen(flow, c.got)
}

/// `port` (network order) is the flow's nat port: counted as translated
/// when it is not the client's own (a reopened flow may go back to its old,
/// translated one).
#[inline(always)]
fn chosen(flow: &Tuple, port: u16) -> Option<u16> {
    if port != flow.sport {
        count(stats::PORT_TRANSLATED);
    }
    Some(port)
}

/// Gives back a claimed port (the flow could not be recorded).
#[inline(always)]
pub fn release(flow: &Tuple, backend_ip: u32, backend_port: u16, port: u16, snat: bool) {
    let out = Tuple::nat_out(flow.src, backend_ip, backend_port, port, flow.proto);
    let _ = NAT_NEW.remove(&out);
    if snat {
        let _ = NAT_NEW.remove(&out.nat_in());
    }
}
