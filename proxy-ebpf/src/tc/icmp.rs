//! ICMP errors (destination unreachable, including "fragmentation needed";
//! time exceeded; parameter problem) about a translated flow: the quoted
//! packet inside is translated like the flow's packets, so the sender's
//! stack finds its socket (path-MTU discovery, port unreachable).
//!
//! Checksums: changing a quoted address and the quoted IP checksum by the
//! same delta leaves the ICMP checksum as it was; a quoted port changes it.
//! The quoted L4 checksum is left alone (nobody checks it).

use aya_ebpf::bindings::TC_ACT_OK;
use aya_ebpf::programs::TcContext;
use proxy_common::*;

use super::ct::{count, flow_get, nat_get};
use super::packet::{Pkt, IP_CSUM_OFF, IP_DST_OFF};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// The packet an ICMP error quotes.
struct Quoted {
    ip: usize,
    l4: usize,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
}

#[inline(always)]
fn quoted(ctx: &TcContext, p: &Pkt) -> Option<Quoted> {
    let typ: u8 = ctx.load(p.l4).ok()?;
    if typ != ICMP_DEST_UNREACH && typ != ICMP_TIME_EXCEEDED && typ != ICMP_PARAMETERPROB {
        return None;
    }
    let ip = p.l4 + 8;
    let vihl: u8 = ctx.load(ip).ok()?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let proto: u8 = ctx.load(ip + 9).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = ip + ihl;
    Some(Quoted {
        ip,
        l4,
        src: ctx.load(ip + 12).ok()?,
        dst: ctx.load(ip + 16).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
        proto,
    })
}

fn tuple(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> Tuple {
    Tuple {
        src,
        dst,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

/// Rewrites the quoted source (`dst == false`) or destination.
#[inline(always)]
fn set_quoted(
    ctx: &mut TcContext,
    p: &Pkt,
    q: &Quoted,
    dst: bool,
    new_ip: u32,
    new_port: u16,
) -> Result<(), i64> {
    let (ip_off, port_off, old_ip, old_port) = if dst {
        (q.ip + 16, q.l4 + 2, q.dst, q.dport)
    } else {
        (q.ip + 12, q.l4, q.src, q.sport)
    };
    if old_ip != new_ip {
        ctx.l3_csum_replace(q.ip + 10, old_ip as u64, new_ip as u64, 4)?;
        ctx.store(ip_off, &new_ip, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(p.l4 + 2, old_port as u64, new_port as u64, 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

#[inline(always)]
fn set_outer_dst(ctx: &mut TcContext, p: &Pkt, new_ip: u32) -> Result<(), i64> {
    if p.dst != new_ip {
        ctx.l3_csum_replace(IP_CSUM_OFF, p.dst as u64, new_ip as u64, 4)?;
        ctx.store(IP_DST_OFF, &new_ip, 0)?;
    }
    Ok(())
}

/// A quoted packet from a client to a backend (C:x -> B:bp) becomes what
/// the client sent (C:cp -> F:fp); true when it was one.
#[inline(always)]
fn quoted_as_the_client_sent_it(ctx: &mut TcContext, p: &Pkt, q: &Quoted) -> Result<bool, i64> {
    let Some(v) = nat_get(&tuple(q.dst, q.src, q.dport, q.sport, q.proto)) else {
        return Ok(false);
    };
    if v.flow.src != q.src {
        return Ok(false);
    }
    set_quoted(ctx, p, q, false, q.src, v.flow.sport)?;
    set_quoted(ctx, p, q, true, v.flow.dst, v.flow.dport)?;
    count(stats::ICMP_TRANSLATED);
    Ok(true)
}

/// An error arriving at the node.
#[inline(always)]
pub fn ingress(ctx: &mut TcContext, p: &Pkt) -> Result<i32, i64> {
    let ok = Ok(TC_ACT_OK as i32);
    let Some(q) = quoted(ctx, p) else {
        return ok;
    };
    // About a packet the node sent to a backend with SNAT (S:x -> B:bp):
    // to the client, quoting what the client sent.
    if let Some(v) = nat_get(&tuple(q.dst, 0, q.dport, q.sport, q.proto)) {
        if let Some(f) = flow_get(&v.flow) {
            // SAFETY: copied out at once.
            let f = unsafe { *f };
            if f.snat_ip != 0 && f.snat_ip == q.src {
                set_quoted(ctx, p, &q, false, v.flow.src, v.flow.sport)?;
                set_quoted(ctx, p, &q, true, v.flow.dst, v.flow.dport)?;
                set_outer_dst(ctx, p, v.flow.src)?;
                count(stats::ICMP_TRANSLATED);
                return ok;
            }
        }
    }
    // About a packet sent to a backend without SNAT (C:x -> B:bp).
    if quoted_as_the_client_sent_it(ctx, p, &q)? {
        return ok;
    }
    // About a reply as the client got it (F:fp -> C:cp): to the backend,
    // quoting what the backend sent.
    let key = tuple(q.dst, q.src, q.dport, q.sport, q.proto);
    if let Some(f) = flow_get(&key) {
        // SAFETY: copied out at once.
        let f = unsafe { *f };
        let to = if f.snat_ip != 0 { f.snat_ip } else { q.dst };
        set_quoted(ctx, p, &q, false, f.backend_ip, f.backend_port)?;
        set_quoted(ctx, p, &q, true, to, f.nat_port)?;
        set_outer_dst(ctx, p, f.backend_ip)?;
        count(stats::ICMP_TRANSLATED);
    }
    ok
}

/// An error the node itself sends (it forwards the flows' packets).
#[inline(always)]
pub fn egress(ctx: &mut TcContext, p: &Pkt) -> Result<i32, i64> {
    let ok = Ok(TC_ACT_OK as i32);
    let Some(q) = quoted(ctx, p) else {
        return ok;
    };
    // About a reply from a backend (B:bp -> C:x after the SNAT address was
    // restored): the backend sent it to the SNAT address.
    if let Some(v) = nat_get(&tuple(q.src, q.dst, q.sport, q.dport, q.proto)) {
        if let Some(f) = flow_get(&v.flow) {
            // SAFETY: copied out at once.
            let f = unsafe { *f };
            if f.backend_ip == q.src && f.snat_ip != 0 {
                set_quoted(ctx, p, &q, true, f.snat_ip, q.dport)?;
                count(stats::ICMP_TRANSLATED);
            }
            return ok;
        }
    }
    // About a packet towards a backend (C:x -> B:bp).
    quoted_as_the_client_sent_it(ctx, p, &q)?;
    ok
}
