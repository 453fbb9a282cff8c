//! The TC path's connection-tracking garbage collector.
//!
//! The eBPF programs create flows and move them from the embryonic tier
//! (`CT_NEW`/`NAT_NEW`, LRU) to the assured one (`CT`/`NAT`, hash) but never
//! expire them: this does, from userspace, by state and idle time in the
//! spirit of netfilter's timeouts. Each sweep walks a bounded number of
//! entries per map with batch lookups (continuing where the last one
//! stopped), re-reads a flow before deleting it (a packet may have
//! refreshed it meanwhile), and deletes a flow's NAT entries with it, which
//! frees its port. It also removes NAT entries whose flow is gone (the LRU
//! tier evicts silently) and, after a sync, UDP flows whose backend left
//! (as kube-proxy clears stale UDP conntrack entries).

use std::collections::HashSet;
use std::io;
use std::time::Duration;

use proxy_common::ct_state::*;
use proxy_common::*;

use super::batch::Cursor;

/// How long a flow may stay idle in each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP before the handshake completes.
    pub syn: Duration,
    pub established: Duration,
    /// One side sent a FIN.
    pub close_wait: Duration,
    /// Both sent a FIN, or one a RST.
    pub closed: Duration,
    /// UDP not answered, or answered once.
    pub udp: Duration,
    /// UDP answered and sent again.
    pub udp_stream: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        CtTimeouts {
            syn: Duration::from_secs(60),
            established: Duration::from_secs(24 * 3600),
            close_wait: Duration::from_secs(3600),
            closed: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

impl CtTimeouts {
    pub fn of(&self, state: u8) -> Duration {
        match state {
            TCP_SYN_SENT | TCP_SYN_RECV => self.syn,
            TCP_ESTABLISHED => self.established,
            TCP_CLOSE_WAIT => self.close_wait,
            TCP_CLOSED => self.closed,
            UDP_STREAM => self.udp_stream,
            _ => self.udp,
        }
    }

    pub fn expired(&self, flow: &Flow, now_ns: u64) -> bool {
        now_ns.saturating_sub(flow.last_ns) > self.of(flow.state).as_nanos() as u64
    }

    /// The shortest timeout: a sweep interval longer than it lets flows
    /// outlive their timeout by that much.
    pub fn shortest(&self) -> Duration {
        [
            self.syn,
            self.established,
            self.close_wait,
            self.closed,
            self.udp,
            self.udp_stream,
        ]
        .into_iter()
        .min()
        .unwrap_or(self.closed)
    }
}

/// The two tiers of flows and NAT entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Assured,
    New,
}

pub const TIERS: [Tier; 2] = [Tier::Assured, Tier::New];

/// The maps the collector works on (the pinned ones, or a fake in tests).
pub trait CtStore {
    /// Up to `chunk` flows from `cursor` on; true at the end of the map.
    fn flows(
        &mut self,
        tier: Tier,
        cursor: &mut Cursor,
        chunk: usize,
        out: &mut Vec<(Tuple, Flow)>,
    ) -> io::Result<bool>;
    fn nats(
        &mut self,
        tier: Tier,
        cursor: &mut Cursor,
        chunk: usize,
        out: &mut Vec<(Tuple, NatValue)>,
    ) -> io::Result<bool>;
    fn flow(&self, tier: Tier, key: &Tuple) -> Option<Flow>;
    fn nat(&self, tier: Tier, key: &Tuple) -> Option<NatValue>;
    fn remove_flow(&mut self, tier: Tier, key: &Tuple);
    fn remove_nat(&mut self, tier: Tier, key: &Tuple);
    /// Every (address, port) some Service still sends to.
    fn backends(&self) -> io::Result<HashSet<(u32, u16)>>;
}

/// The NAT keys of a flow (as the eBPF programs make them).
pub fn nat_keys(key: &Tuple, f: &Flow) -> Vec<Tuple> {
    let out = Tuple::nat_out(key.src, f.backend_ip, f.backend_port, f.nat_port, key.proto);
    let mut keys = vec![out];
    if f.flags & FLOW_SNAT != 0 {
        keys.push(out.nat_in());
    }
    keys
}

/// Why entries were removed (a metric label).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub expired: u64,
    pub stale_udp: u64,
    pub orphan_nat: u64,
}

/// What one sweep saw and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub removed: Removed,
    /// Entries per map, for the maps whose walk completed in this sweep.
    pub counted: Vec<(&'static str, u64)>,
}

/// NAT entries younger than this may belong to a flow being created (the
/// programs write NAT entries before the flow).
const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// Flows per batch syscall.
const CHUNK: usize = 4096;

/// The collector's position in each map between sweeps.
#[derive(Debug, Default)]
pub struct Collector {
    pub timeouts: CtTimeouts,
    /// Entries looked at per map per sweep (the bounded cost).
    pub budget: usize,
    flow_cursor: [Cursor; 2],
    flow_seen: [u64; 2],
    nat_cursor: [Cursor; 2],
    nat_seen: [u64; 2],
}

/// The slot of `t` in per-tier arrays (the collector's cursors, the pinned store's maps).
pub(super) fn idx(t: Tier) -> usize {
    match t {
        Tier::Assured => 0,
        Tier::New => 1,
    }
}

fn flow_map(t: Tier) -> &'static str {
    match t {
        Tier::Assured => maps::CT,
        Tier::New => maps::CT_NEW,
    }
}

fn nat_map(t: Tier) -> &'static str {
    match t {
        Tier::Assured => maps::NAT,
        Tier::New => maps::NAT_NEW,
    }
}

impl Collector {
    pub fn new(timeouts: CtTimeouts, budget: usize) -> Collector {
        Collector {
            timeouts,
            budget: budget.max(1),
            ..Default::default()
        }
    }

    /// One sweep at `now_ns` (the programs' clock, CLOCK_MONOTONIC). With
    /// `backends`, UDP flows to any other backend are removed too, across
    /// the whole map (a sync just removed backends).
    pub fn sweep<S: CtStore>(
        &mut self,
        store: &mut S,
        now_ns: u64,
        backends: Option<&HashSet<(u32, u16)>>,
    ) -> io::Result<SweepReport> {
        let mut report = SweepReport::default();
        for tier in TIERS {
            self.sweep_flows(store, tier, now_ns, backends, &mut report)?;
        }
        for tier in TIERS {
            self.sweep_nats(store, tier, now_ns, &mut report)?;
        }
        Ok(report)
    }

    fn sweep_flows<S: CtStore>(
        &mut self,
        store: &mut S,
        tier: Tier,
        now_ns: u64,
        backends: Option<&HashSet<(u32, u16)>>,
        report: &mut SweepReport,
    ) -> io::Result<()> {
        let i = idx(tier);
        // A stale-UDP pass walks everything, from the start.
        let mut cursor = if backends.is_some() {
            Cursor::default()
        } else {
            self.flow_cursor[i]
        };
        let budget = if backends.is_some() {
            usize::MAX
        } else {
            self.budget
        };
        let mut looked = 0usize;
        let mut batch = Vec::with_capacity(CHUNK);
        loop {
            batch.clear();
            let done = store.flows(tier, &mut cursor, CHUNK, &mut batch)?;
            looked += batch.len();
            if backends.is_none() {
                self.flow_seen[i] += batch.len() as u64;
            }
            for (key, flow) in &batch {
                let stale = backends.is_some_and(|b| {
                    key.proto == PROTO_UDP
                        && flow.flags & FLOW_PASSTHROUGH == 0
                        && !b.contains(&(flow.backend_ip, flow.backend_port))
                });
                if !stale && !self.timeouts.expired(flow, now_ns) {
                    continue;
                }
                // Re-read: a packet may have refreshed the flow meanwhile.
                let Some(now_flow) = store.flow(tier, key) else {
                    continue;
                };
                if !stale && !self.timeouts.expired(&now_flow, now_ns) {
                    continue;
                }
                remove_flow(store, tier, key, &now_flow);
                if stale {
                    report.removed.stale_udp += 1;
                } else {
                    report.removed.expired += 1;
                }
            }
            if done {
                // A stale-UDP pass is a whole walk of its own: its count is
                // the map's fill too (otherwise a node whose syncs come
                // faster than the sweep interval would never report one).
                let seen = if backends.is_none() {
                    std::mem::take(&mut self.flow_seen[i])
                } else {
                    looked as u64
                };
                report.counted.push((flow_map(tier), seen));
                break;
            }
            if looked >= budget {
                break;
            }
        }
        if backends.is_none() {
            self.flow_cursor[i] = cursor;
        }
        Ok(())
    }

    fn sweep_nats<S: CtStore>(
        &mut self,
        store: &mut S,
        tier: Tier,
        now_ns: u64,
        report: &mut SweepReport,
    ) -> io::Result<()> {
        let i = idx(tier);
        let mut cursor = self.nat_cursor[i];
        let mut looked = 0usize;
        let mut batch = Vec::with_capacity(CHUNK);
        let grace = ORPHAN_GRACE.as_nanos() as u64;
        loop {
            batch.clear();
            let done = store.nats(tier, &mut cursor, CHUNK, &mut batch)?;
            looked += batch.len();
            self.nat_seen[i] += batch.len() as u64;
            for (key, v) in &batch {
                if now_ns.saturating_sub(v.created_ns) < grace {
                    continue;
                }
                if TIERS.iter().any(|t| store.flow(*t, &v.flow).is_some()) {
                    continue;
                }
                if store.nat(tier, key).is_some_and(|now| now.flow == v.flow) {
                    store.remove_nat(tier, key);
                    report.removed.orphan_nat += 1;
                }
            }
            if done {
                report.counted.push((nat_map(tier), self.nat_seen[i]));
                self.nat_seen[i] = 0;
                break;
            }
            if looked >= self.budget {
                break;
            }
        }
        self.nat_cursor[i] = cursor;
        Ok(())
    }
}

/// Removes a flow's NAT entries (those still pointing at it), then the flow.
fn remove_flow<S: CtStore>(store: &mut S, tier: Tier, key: &Tuple, f: &Flow) {
    for nk in nat_keys(key, f) {
        for t in TIERS {
            if store.nat(t, &nk).is_some_and(|v| v.flow == *key) {
                store.remove_nat(t, &nk);
            }
        }
    }
    store.remove_flow(tier, key);
}

#[cfg(test)]
mod tests;
