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

/// The flow a port is claimed for, packed into scalars: the port search
/// runs in global BPF functions (see [`kproxy_claim_port`]), whose
/// arguments are scalars so the kernel needs no BTF pointer types for them.
#[derive(Clone, Copy)]
struct Packed {
    /// Client, frontend.
    addrs: u64,
    /// Client port, frontend port, protocol, SNAT flag.
    ports: u64,
    /// Backend address and port.
    backend: u64,
}

/// What [`Packed`] carries, unpacked.
struct Want {
    flow: Tuple,
    backend_ip: u32,
    backend_port: u16,
    snat: bool,
}

impl Want {
    #[inline(always)]
    fn pack(&self) -> Packed {
        let f = &self.flow;
        Packed {
            addrs: f.src as u64 | (f.dst as u64) << 32,
            ports: f.sport as u64
                | (f.dport as u64) << 16
                | (f.proto as u64) << 32
                | (self.snat as u64) << 40,
            backend: self.backend_ip as u64 | (self.backend_port as u64) << 32,
        }
    }

    #[inline(always)]
    fn unpack(p: Packed) -> Want {
        Want {
            flow: Tuple {
                src: p.addrs as u32,
                dst: (p.addrs >> 32) as u32,
                sport: p.ports as u16,
                dport: (p.ports >> 16) as u16,
                proto: (p.ports >> 32) as u8,
                _pad: [0; 3],
            },
            backend_ip: p.backend as u32,
            backend_port: (p.backend >> 32) as u16,
            snat: (p.ports >> 40) & 1 != 0,
        }
    }
}

/// The state of one port search; on `bpf_loop`'s stack.
#[repr(C)]
struct Claim {
    want: Packed,
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
    // Read in place, not copied: this runs in the port search's deepest
    // frame, where the kernel's 512-byte stack bound is tight.
    let Some(v) = super::ct::nat_ptr(key) else {
        return true;
    };
    // SAFETY: a map value; the flow key is copied out at once.
    let owner = unsafe { (*v).flow };
    match flow_get(&owner) {
        None => {
            let _ = NAT.remove(key);
            let _ = NAT_NEW.remove(key);
            true
        }
        Some(f) => {
            // SAFETY: a map value, read in place.
            let f = unsafe { &*f };
            if f.state == TCP_CLOSED {
                flow_remove(&owner, f);
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

/// What [`kproxy_try_port`] found.
const TAKEN: u32 = 0;
const CLAIMED: u32 = 1;
/// Free, but the backend still holds the port in TIME_WAIT: passed over
/// unless that is what is being tried.
const HELD_IN_TIME_WAIT: u32 = 2;

/// Claims `port` (network order) for the flow: its NAT entries are written
/// with NOEXIST, so two CPUs never get one port. A free port the backend
/// still holds in TIME_WAIT is remembered as the last resort.
#[inline(always)]
fn try_port(c: &mut Claim, port: u16) -> bool {
    let w = c.want;
    match kproxy_try_port(
        w.addrs,
        w.ports,
        w.backend,
        port as u64 | (c.reuse_tw as u64) << 16,
    ) {
        CLAIMED => true,
        HELD_IN_TIME_WAIT => {
            if c.tw_port == 0 {
                c.tw_port = port;
            }
            false
        }
        _ => false,
    }
}

/// [`try_port`]'s map work, as a global BPF function (verified once, on its
/// own; see [`kproxy_claim_port`]). `port_reuse`: the port (network order)
/// and, at bit 16, whether a port in the backend's TIME_WAIT may be taken.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn kproxy_try_port(addrs: u64, ports: u64, backend: u64, port_reuse: u64) -> u32 {
    let w = Want::unpack(Packed {
        addrs,
        ports,
        backend,
    });
    let port = port_reuse as u16;
    let reuse_tw = (port_reuse >> 16) & 1 != 0;
    let held = |key: &Tuple| !reuse_tw && in_time_wait(key);
    let v = NatValue {
        flow: w.flow,
        created_ns: now(),
    };
    let out = Tuple::nat_out(w.flow.src, w.backend_ip, w.backend_port, port, w.flow.proto);
    if w.snat {
        let inn = out.nat_in();
        if !free(&inn) || !free(&out) {
            return TAKEN;
        }
        if held(&inn) {
            return HELD_IN_TIME_WAIT;
        }
        if NAT_NEW.insert(&inn, &v, BPF_NOEXIST as u64).is_err() {
            return TAKEN;
        }
        if NAT_NEW.insert(&out, &v, BPF_NOEXIST as u64).is_err() {
            let _ = NAT_NEW.remove(&inn);
            return TAKEN;
        }
        return CLAIMED;
    }
    if !free(&out) {
        return TAKEN;
    }
    if held(&out) {
        return HELD_IN_TIME_WAIT;
    }
    // A recent direct connection on this 4-tuple may still be in TIME_WAIT
    // at the backend: a SYN reusing it would be answered with an ACK.
    let direct = Tuple {
        src: w.flow.src,
        dst: w.backend_ip,
        sport: port,
        dport: w.backend_port,
        proto: w.flow.proto,
        _pad: [0; 3],
    };
    // SAFETY: only presence is read.
    if unsafe { super::ct::DIRECT.get(&direct) }.is_some() {
        return TAKEN;
    }
    if NAT_NEW.insert(&out, &v, BPF_NOEXIST as u64).is_ok() {
        CLAIMED
    } else {
        TAKEN
    }
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
    let w = Want {
        flow: *flow,
        backend_ip,
        backend_port,
        snat,
    }
    .pack();
    match kproxy_claim_port(w.addrs, w.ports, w.backend, prefer as u64) {
        0 => None,
        port => Some(port as u16),
    }
}

/// [`claim`] as a global BPF function: the kernel verifies it once, on its
/// own, with every argument unknown, instead of once per distinct state of
/// its callers (the port search's `bpf_loop` callback, verified again for
/// each, was 70 % of the TC ingress program's verification: 395k
/// instructions for an 8k-instruction program). Returns the port (network
/// order), 0 for none.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn kproxy_claim_port(addrs: u64, ports: u64, backend: u64, prefer: u64) -> u32 {
    let want = Packed {
        addrs,
        ports,
        backend,
    };
    let Want { flow, snat, .. } = Want::unpack(want);
    let prefer = prefer as u16;
    let Some(cfg) = CONFIG.get(0) else {
        return 0;
    };
    let cfg = *cfg;
    let mut c = Claim {
        want,
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
        return chosen(&flow, first);
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
        return 0;
    }
    chosen(&flow, c.got)
}

/// `port` (network order) is the flow's nat port: counted as translated
/// when it is not the client's own (a reopened flow may go back to its old,
/// translated one).
#[inline(always)]
fn chosen(flow: &Tuple, port: u16) -> u32 {
    if port != flow.sport {
        count(stats::PORT_TRANSLATED);
    }
    port as u32
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
