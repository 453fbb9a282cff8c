//! Parsing an IPv4 packet and rewriting its addresses and ports with
//! incremental checksum updates.

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use aya_ebpf::programs::TcContext;
use proxy_common::*;

use super::ct::{count, FRAGS};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
pub const PROTO_ICMP: u8 = 1;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Which part of a datagram a packet is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// A whole datagram.
    None,
    /// The first fragment: it has the L4 header.
    First,
    /// A later fragment: no L4 header; its ports come from `FRAGS`.
    Later,
}

pub struct Pkt {
    pub l4: usize,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub frag: Frag,
}

impl Pkt {
    pub fn tuple(&self) -> Tuple {
        Tuple {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The tuple of the other direction.
    pub fn reversed(&self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// A TCP SYN without ACK: a new connection.
    pub fn bare_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
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

/// IPv4 TCP, UDP (whole, or any fragment whose first fragment was seen) or
/// ICMP; `None` means "not ours, pass". For ICMP, `l4` is the ICMP header
/// and the ports are 0.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Pkt> {
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
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        return None;
    }
    let src: u32 = ctx.load(IP_SRC_OFF).ok()?;
    let dst: u32 = ctx.load(IP_DST_OFF).ok()?;
    let l4 = ETH_HLEN + ihl;
    let frag_field = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    let more = frag_field & 0x2000 != 0;
    let offset = frag_field & 0x1fff;
    if proto == PROTO_ICMP {
        if more || offset != 0 {
            return None;
        }
        return Some(Pkt {
            l4,
            proto,
            src,
            dst,
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            frag: Frag::None,
        });
    }
    let fkey = FragKey {
        src,
        dst,
        id: ctx.load(ETH_HLEN + 4).ok()?,
        proto,
        _pad: 0,
    };
    if offset != 0 {
        // SAFETY: copied out at once.
        let Some(ports) = (unsafe { FRAGS.get(&fkey) }).copied() else {
            count(stats::FRAG_UNKNOWN);
            return None;
        };
        return Some(Pkt {
            l4,
            proto,
            src,
            dst,
            sport: ports.sport,
            dport: ports.dport,
            tcp_flags: 0,
            frag: Frag::Later,
        });
    }
    let sport: u16 = ctx.load(l4).ok()?;
    let dport: u16 = ctx.load(l4 + 2).ok()?;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4 + 13).ok()?
    } else {
        0
    };
    let frag = if more {
        // Later fragments carry no ports: remember them by IP id. The key is
        // the tuple as this hook sees it, so each hook records its own.
        let _ = FRAGS.insert(&fkey, &FragPorts { sport, dport }, 0);
        Frag::First
    } else {
        Frag::None
    };
    Some(Pkt {
        l4,
        proto,
        src,
        dst,
        sport,
        dport,
        tcp_flags,
        frag,
    })
}

/// Rewrites the source (`dst == false`) or destination address and port,
/// fixing the IP and L4 checksums incrementally. A later fragment has only
/// its IP header rewritten (the first one carried the L4 checksum, which
/// covers the whole datagram).
#[inline(always)]
pub fn rewrite(
    ctx: &mut TcContext,
    p: &Pkt,
    dst: bool,
    new_ip: u32,
    new_port: u16,
) -> Result<(), i64> {
    let (ip_off, port_off, old_ip, old_port) = if dst {
        (IP_DST_OFF, p.l4 + 2, p.dst, p.dport)
    } else {
        (IP_SRC_OFF, p.l4, p.src, p.sport)
    };
    let l4 = p.frag != Frag::Later;
    let csum = p.csum_off();
    let l4f = p.l4_flags();
    if old_ip != new_ip {
        if l4 {
            ctx.l4_csum_replace(
                csum,
                old_ip as u64,
                new_ip as u64,
                BPF_F_PSEUDO_HDR as u64 | l4f | 4,
            )?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, old_ip as u64, new_ip as u64, 4)?;
        ctx.store(ip_off, &new_ip, 0)?;
    }
    if l4 && old_port != new_port {
        ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, l4f | 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}
