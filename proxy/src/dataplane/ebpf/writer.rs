//! Writes Service ports into the maps, keeping an in-memory mirror of what
//! the kernel holds (reloaded from the kernel on every full sync, which is
//! how a restarted kproxy adopts the maps of the previous one and how drift
//! is repaired).
//!
//! Update order makes every change atomic for lookups: new backends first,
//! then a complete new slot group, then the frontend record is switched to
//! the group (one map update), and only then are the old group and the
//! backends nobody references any more deleted. A lookup sees the old set or
//! the new one, never a mix. Ids are never reused while the process lives,
//! and a restarted process starts above the highest id in the maps.

use std::collections::BTreeSet;
use std::path::Path;

use aya::maps::lpm_trie::Key as LpmKey;
use ipnet::Ipv4Net;
use proxy_common::maps as names;
use proxy_common::*;
use tracing::debug;

use super::maps::{map_err, Maps, NodeMaps};
use super::plan::{self, ip_key, PortPlan, Set};
use super::staged::StagedTables;
use super::tables::{PutError, Table, TableError, Tables};
use crate::dataplane::{DataplaneConfig, DataplaneError, FrontendKind, FrontendRef};
use crate::hashing::{HashMap, HashSet};
use crate::model::{ChangeSet, DesiredState, ServicePortName};

/// From this many Service ports on (a full sync), their plans are made on
/// every core.
const PARALLEL_PLANS_MIN: usize = 2048;

/// What the writer needs about the node.
#[derive(Debug, Clone, Default)]
pub struct NodeSettings {
    /// Addresses that accept node-port traffic.
    pub nodeport_ips: Vec<std::net::Ipv4Addr>,
    /// (ifindex, address) of each attached device: the SNAT source there.
    pub if_addrs: Vec<(u32, std::net::Ipv4Addr)>,
    /// NAT ports: (min, max, ports skipped inside them).
    pub snat_ports: (u16, u16, Option<(u16, u16)>),
    /// SNAT source on devices without an address.
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// Cookie of the network namespace whose sockets reach node ports on
    /// 127.0.0.1 (the node's); 0: none.
    pub localhost_netns: u64,
}

/// A Service port that could not be programmed, and why. What it had in
/// the maps before stays there (a lookup sees the old state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortError {
    pub port: ServicePortName,
    pub service: String,
    pub reason: &'static str,
    pub message: String,
    /// The frontends whose record could not be written; `None`: the
    /// port's backends, slots, name or source ranges failed, so all of them.
    pub frontends: Option<Vec<FrontendRef>>,
}

#[derive(Debug, Clone)]
struct PortState {
    svc_id: u32,
    frontends: Vec<FrontendKey>,
    ranges: Vec<Ipv4Net>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub written: usize,
    pub deleted: usize,
}

pub struct Writer {
    maps: StagedTables,
    /// Node-wide maps (absent over fake tables).
    node_maps: Option<NodeMaps>,
    frontends: HashMap<FrontendKey, Frontend>,
    groups: HashMap<u32, Vec<u32>>,
    group_refs: HashMap<u32, u32>,
    backends: HashMap<u32, Backend>,
    backend_ids: HashMap<Backend, u32>,
    backend_refs: HashMap<u32, u32>,
    svc_names: HashMap<u32, String>,
    ranges: HashSet<(u32, Ipv4Net)>,
    ports: HashMap<ServicePortName, PortState>,
    next_group: u32,
    next_backend: u32,
    next_svc: u32,
    counts: Counts,
}

/// The flag that sizes each map, for "map full" messages.
fn size_flag(map: &str) -> &'static str {
    match map {
        names::FRONTENDS | names::SVC_INFO => "--bpf-lb-map-max",
        names::SLOTS | names::BACKENDS => "--bpf-backend-map-max",
        names::SRC_RANGES => "--bpf-lb-map-max",
        _ => "the map size flags",
    }
}

enum WriteError {
    Full(&'static str),
    Other(DataplaneError),
}

/// Why [`Writer::apply_port`] failed, and which frontend records it could
/// not write (empty: it failed before the frontends, so all of them).
struct PortFailure {
    error: WriteError,
    frontends: Vec<FrontendKey>,
}

impl<E: Into<WriteError>> From<E> for PortFailure {
    fn from(e: E) -> Self {
        PortFailure {
            error: e.into(),
            frontends: Vec::new(),
        }
    }
}

/// The status name of a frontend record.
fn frontend_ref(key: &FrontendKey, kind: u8) -> FrontendRef {
    FrontendRef {
        kind: match kind {
            KIND_NODE_PORT => FrontendKind::NodePort,
            KIND_EXTERNAL_IP => FrontendKind::ExternalIp,
            KIND_LOAD_BALANCER => FrontendKind::LoadBalancer,
            _ => FrontendKind::ClusterIp,
        },
        ip: (key.ip != 0).then(|| plan::ip_from_key(key.ip)),
        port: plan::port_from_key(key.port),
    }
}

impl From<TableError> for WriteError {
    fn from(e: TableError) -> Self {
        match e {
            TableError::Full { map } => WriteError::Full(map),
            e => WriteError::Other(table_err(e)),
        }
    }
}

impl From<PutError> for WriteError {
    fn from(e: PutError) -> Self {
        e.error.into()
    }
}

fn table_err(e: TableError) -> DataplaneError {
    DataplaneError::Other(e.to_string())
}

impl Writer {
    /// Over the pinned maps under `pin`.
    pub fn open(pin: &Path) -> Result<Writer, DataplaneError> {
        let (tables, node) = Maps::open(pin)?.split();
        Writer::over(tables, Some(node))
    }

    /// Over any tables (the fake ones in tests); reads what they hold.
    pub fn over(maps: Tables, node_maps: Option<NodeMaps>) -> Result<Writer, DataplaneError> {
        let mut w = Writer {
            maps: StagedTables::new(maps),
            node_maps,
            frontends: HashMap::default(),
            groups: HashMap::default(),
            group_refs: HashMap::default(),
            backends: HashMap::default(),
            backend_ids: HashMap::default(),
            backend_refs: HashMap::default(),
            svc_names: HashMap::default(),
            ranges: HashSet::default(),
            ports: HashMap::default(),
            next_group: 1,
            next_backend: 1,
            next_svc: 1,
            counts: Counts::default(),
        };
        w.reload()?;
        Ok(w)
    }

    /// Reads the kernel's maps into the mirror.
    fn reload(&mut self) -> Result<(), DataplaneError> {
        let m = &self.maps;
        self.frontends = m.frontends.dump().map_err(table_err)?.into_iter().collect();
        let mut slots: HashMap<u32, Vec<(u32, u32)>> = HashMap::default();
        for (k, v) in m.slots.dump().map_err(table_err)? {
            slots.entry(k.group).or_default().push((k.slot, v));
        }
        self.groups = slots
            .into_iter()
            .map(|(g, mut s)| {
                s.sort_unstable();
                (g, s.into_iter().map(|(_, id)| id).collect())
            })
            .collect();
        self.backends = m.backends.dump().map_err(table_err)?.into_iter().collect();
        self.backend_ids = self.backends.iter().map(|(id, b)| (*b, *id)).collect();
        self.svc_names = m
            .svc_info
            .dump()
            .map_err(table_err)?
            .into_iter()
            .map(|(k, v)| (k, plan::svc_info_name(&v)))
            .collect();
        self.ranges = m
            .src_ranges
            .dump()
            .map_err(table_err)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        self.recount();
        self.next_group = self
            .next_group
            .max(self.groups.keys().max().map_or(1, |m| m + 1));
        self.next_backend = self
            .next_backend
            .max(self.backends.keys().max().map_or(1, |m| m + 1));
        self.next_svc = self.next_svc.max(
            self.frontends
                .values()
                .map(|f| f.svc_id)
                .chain(self.svc_names.keys().copied())
                .max()
                .map_or(1, |m| m + 1),
        );
        self.ports.clear();
        Ok(())
    }

    fn recount(&mut self) {
        self.group_refs = self.groups.keys().map(|g| (*g, 0)).collect();
        for f in self.frontends.values() {
            *self.group_refs.entry(f.group).or_insert(0) += 1;
        }
        self.backend_refs = self.backends.keys().map(|b| (*b, 0)).collect();
        for ids in self.groups.values() {
            for id in unique(ids) {
                *self.backend_refs.entry(id).or_insert(0) += 1;
            }
        }
    }

    /// Node-wide settings: node-port addresses, device addresses, cluster
    /// CIDRs, SNAT port range.
    pub fn sync_node(
        &mut self,
        node: &NodeSettings,
        config: &DataplaneConfig,
    ) -> Result<(), DataplaneError> {
        let Some(m) = self.node_maps.as_mut() else {
            return Ok(());
        };
        let want: HashSet<u32> = node.nodeport_ips.iter().map(|ip| ip_key(*ip)).collect();
        let have: Vec<u32> = m.node_ips.keys().filter_map(Result::ok).collect();
        for k in have.iter().filter(|k| !want.contains(k)) {
            let _ = m.node_ips.remove(k);
        }
        for k in &want {
            m.node_ips
                .insert(k, 1, 0)
                .map_err(|e| map_err(names::NODE_IPS, e))?;
        }
        let want: HashMap<u32, u32> = node
            .if_addrs
            .iter()
            .map(|(i, ip)| (*i, ip_key(*ip)))
            .collect();
        let have: Vec<u32> = m.if_addrs.keys().filter_map(Result::ok).collect();
        for k in have.iter().filter(|k| !want.contains_key(k)) {
            let _ = m.if_addrs.remove(k);
        }
        for (k, v) in &want {
            m.if_addrs
                .insert(k, v, 0)
                .map_err(|e| map_err(names::IF_ADDRS, e))?;
        }
        let want: Vec<LpmKey<u32>> = config
            .cluster_cidrs
            .iter()
            .filter_map(|n| match n {
                ipnet::IpNet::V4(n) => Some(LpmKey::new(
                    n.prefix_len() as u32,
                    ip_key(n.trunc().network()),
                )),
                ipnet::IpNet::V6(_) => None,
            })
            .collect();
        let have: Vec<LpmKey<u32>> = m.cluster_cidrs.keys().filter_map(Result::ok).collect();
        for k in &have {
            if !want
                .iter()
                .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            {
                let _ = m.cluster_cidrs.remove(k);
            }
        }
        for k in &want {
            m.cluster_cidrs
                .insert(k, 1, 0)
                .map_err(|e| map_err(names::CLUSTER_CIDRS, e))?;
        }
        m.config
            .set(
                0,
                Config {
                    snat_port_min: node.snat_ports.0,
                    snat_port_max: node.snat_ports.1,
                    node_ip: node.node_ip.map_or(0, ip_key),
                    skip_min: node.snat_ports.2.map_or(0, |s| s.0),
                    skip_max: node.snat_ports.2.map_or(0, |s| s.1),
                    _pad: 0,
                    localhost_netns: node.localhost_netns,
                },
                0,
            )
            .map_err(|e| map_err(names::CONFIG, e))?;
        Ok(())
    }

    /// Programs `desired`: everything (after re-reading the kernel) when
    /// `full`, else the changed ports and `retry` (ports that failed
    /// before, whose retry the sync loop decided). A port that fails is
    /// reported and leaves the others alone; only a failure to read the
    /// maps or to remove a port fails the whole sync.
    pub fn sync(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        retry: &[ServicePortName],
        full: bool,
        config: &DataplaneConfig,
    ) -> Result<(Counts, Vec<PortError>), DataplaneError> {
        self.counts = Counts::default();
        let mut errors = Vec::new();
        if full {
            self.reload()?;
            // Empty maps (a fresh start): every write waits in memory and
            // each map is then written in large batches, in switch order.
            let fresh = self.frontends.is_empty()
                && self.backends.is_empty()
                && self.groups.is_empty()
                && self.svc_names.is_empty();
            if fresh {
                self.maps.stage();
            }
            let result = self.full_sync(desired, config, &mut errors);
            // Ends the staging whatever happened (nothing to do unstaged).
            let flushed = self.maps.flush().map_err(table_err);
            result?;
            flushed?;
        } else {
            for name in changes.removed() {
                self.remove_port(name)?;
            }
            let todo: BTreeSet<&ServicePortName> = changes
                .iter()
                .filter(|(_, c)| c.new.is_some())
                .map(|(name, _)| name)
                .chain(retry.iter())
                .collect();
            for name in todo {
                let Some(sp) = desired.services.get(name) else {
                    continue;
                };
                let p = plan::plan(sp, config);
                let id = match self.ports.get(name) {
                    Some(s) => s.svc_id,
                    None => {
                        let id = self.next_svc;
                        self.next_svc += 1;
                        id
                    }
                };
                if let Err(e) = self.apply_port(name, &p, id) {
                    errors.push(self.port_error(name, &p, e));
                }
            }
        }
        Ok((self.counts, errors))
    }

    /// A full sync's port work after the maps were re-read: every desired
    /// port applied (each keeps its id), then whatever none claims removed.
    fn full_sync(
        &mut self,
        desired: &DesiredState,
        config: &DataplaneConfig,
        errors: &mut Vec<PortError>,
    ) -> Result<(), DataplaneError> {
        // Claim ids of ports already in the kernel first, so a restart
        // keeps every svc_id (affinity and conntrack stay valid).
        let ports: Vec<_> = desired.services.iter().collect();
        let plans: Vec<(&ServicePortName, PortPlan)> =
            crate::parallel::map(&ports, PARALLEL_PLANS_MIN, |(n, sp)| {
                (*n, plan::plan(sp, config))
            });
        let mut claimed = HashSet::default();
        let mut hints = Vec::with_capacity(plans.len());
        for (_, p) in &plans {
            let hint = p.frontends.iter().find_map(|f| {
                let v = self.frontends.get(&f.key)?;
                (self.svc_names.get(&v.svc_id) == Some(&p.display) && claimed.insert(v.svc_id))
                    .then_some(v.svc_id)
            });
            hints.push(hint);
        }
        let mut wanted: HashSet<FrontendKey> = HashSet::default();
        for ((name, p), hint) in plans.iter().zip(hints) {
            wanted.extend(p.frontends.iter().map(|f| f.key));
            let id = hint.unwrap_or_else(|| self.alloc_svc(&claimed));
            claimed.insert(id);
            if let Err(e) = self.apply_port(name, p, id) {
                errors.push(self.port_error(name, p, e));
            }
        }
        // Whatever no desired port claims is stale.
        let stale: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for k in stale {
            self.delete_frontend(&k)?;
        }
        let live: HashSet<u32> = self.ports.values().map(|p| p.svc_id).collect();
        let dead_ranges: Vec<(u32, Ipv4Net)> = self
            .ranges
            .iter()
            .filter(|(id, net)| {
                !self
                    .ports
                    .values()
                    .any(|p| p.svc_id == *id && p.ranges.contains(net))
            })
            .copied()
            .collect();
        for (id, net) in dead_ranges {
            self.delete_range(id, net)?;
        }
        let dead_names: Vec<u32> = self
            .svc_names
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in dead_names {
            self.delete_name(id)?;
        }
        let groups: Vec<u32> = self.groups.keys().copied().collect();
        self.gc_groups(&groups)?;
        let backends: Vec<u32> = self.backends.keys().copied().collect();
        self.gc_backends(&backends)?;
        Ok(())
    }

    fn port_error(&self, name: &ServicePortName, p: &PortPlan, e: PortFailure) -> PortError {
        let frontends = (!e.frontends.is_empty()).then(|| {
            let mut refs: Vec<FrontendRef> = p
                .frontends
                .iter()
                .filter(|f| e.frontends.contains(&f.key))
                .map(|f| frontend_ref(&f.key, f.kind))
                .collect();
            refs.sort_unstable();
            refs.dedup();
            refs
        });
        let (reason, why) = match e.error {
            WriteError::Full(map) => (
                "map_full",
                format!(
                    "BPF map {map} is full ({} entries); raise {}",
                    self.capacity(map),
                    size_flag(map)
                ),
            ),
            WriteError::Other(e) => ("map_error", e.to_string()),
        };
        PortError {
            port: name.clone(),
            service: p.display.clone(),
            reason,
            message: format!(
                "Service {} ({}) not fully programmed: {why}",
                p.display,
                name.protocol.as_str()
            ),
            frontends,
        }
    }

    fn capacity(&self, map: &str) -> u32 {
        let m = &self.maps;
        match map {
            names::FRONTENDS => m.frontends.capacity(),
            names::SLOTS => m.slots.capacity(),
            names::BACKENDS => m.backends.capacity(),
            names::SVC_INFO => m.svc_info.capacity(),
            names::SRC_RANGES => m.src_ranges.capacity(),
            _ => 0,
        }
    }

    fn alloc_svc(&mut self, claimed: &HashSet<u32>) -> u32 {
        while claimed.contains(&self.next_svc) || self.svc_names.contains_key(&self.next_svc) {
            self.next_svc += 1;
        }
        let id = self.next_svc;
        self.next_svc += 1;
        id
    }

    /// The ids of `list`, writing the backends not in the map yet (one
    /// batch); on failure nothing new is left behind.
    fn ensure_backends(&mut self, list: &[Backend]) -> Result<Vec<u32>, WriteError> {
        let mut new: Vec<(u32, Backend)> = Vec::new();
        let mut ids = Vec::with_capacity(list.len());
        for b in list {
            let id = match self.backend_ids.get(b) {
                Some(id) => *id,
                None => match new.iter().find(|(_, n)| n == b) {
                    Some((id, _)) => *id,
                    None => {
                        let id = self.next_backend;
                        self.next_backend += 1;
                        new.push((id, *b));
                        id
                    }
                },
            };
            ids.push(id);
        }
        if new.is_empty() {
            return Ok(ids);
        }
        if let Err(e) = self.maps.backends.put(&new) {
            let written: Vec<u32> = new[..e.written].iter().map(|(id, _)| *id).collect();
            let _ = self.maps.backends.delete(&written);
            return Err(e.into());
        }
        self.counts.written += new.len();
        for (id, b) in new {
            self.backends.insert(id, b);
            self.backend_ids.insert(b, id);
            self.backend_refs.insert(id, 0);
        }
        Ok(ids)
    }

    /// Writes a complete new slot group (one batch); on failure removes
    /// what it wrote.
    fn new_group(&mut self, ids: &[u32]) -> Result<u32, WriteError> {
        let g = self.next_group;
        self.next_group += 1;
        let entries: Vec<(SlotKey, u32)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    SlotKey {
                        group: g,
                        slot: i as u32,
                    },
                    *id,
                )
            })
            .collect();
        if let Err(e) = self.maps.slots.put(&entries) {
            let written: Vec<SlotKey> = entries[..e.written].iter().map(|(k, _)| *k).collect();
            let _ = self.maps.slots.delete(&written);
            return Err(e.into());
        }
        self.counts.written += ids.len();
        for id in unique(ids) {
            *self.backend_refs.entry(id).or_insert(0) += 1;
        }
        self.groups.insert(g, ids.to_vec());
        self.group_refs.insert(g, 0);
        Ok(g)
    }

    /// Programs one port. Whatever happens, nothing it no longer needs is
    /// left behind and nothing another port uses is touched.
    fn apply_port(
        &mut self,
        name: &ServicePortName,
        p: &PortPlan,
        svc_id: u32,
    ) -> Result<(), PortFailure> {
        let mut touched_groups = Vec::new();
        let backends_before = self.next_backend;
        let result = self.apply_port_inner(name, p, svc_id, &mut touched_groups);
        let gc = self.gc_groups(&touched_groups).map_err(WriteError::Other);
        // Backends this call wrote that no group took (a later step failed).
        let fresh: Vec<u32> = (backends_before..self.next_backend).collect();
        let gc_backends = self.gc_backends(&fresh).map_err(WriteError::Other);
        result
            .and(gc.map_err(PortFailure::from))
            .and(gc_backends.map_err(PortFailure::from))
    }

    fn apply_port_inner(
        &mut self,
        name: &ServicePortName,
        p: &PortPlan,
        svc_id: u32,
        touched: &mut Vec<u32>,
    ) -> Result<(), PortFailure> {
        // 1. Backends and complete slot groups, one per distinct set.
        let mut group_of: HashMap<Set, (u32, u32)> = HashMap::default();
        for set in [Set::Cluster, Set::External] {
            if !p.frontends.iter().any(|f| f.set == set) {
                continue;
            }
            let list = p.backends(set);
            if set == Set::External && p.external.is_none() {
                if let Some(g) = group_of.get(&Set::Cluster).copied() {
                    group_of.insert(set, g);
                    continue;
                }
            }
            let ids = self.ensure_backends(list)?;
            // Keep the group a frontend of this port already uses when it
            // holds exactly these backends (a restart or a no-op rewrite).
            let existing = p
                .frontends
                .iter()
                .filter(|f| f.set == set)
                .filter_map(|f| self.frontends.get(&f.key))
                .map(|v| v.group)
                .find(|g| self.groups.get(g) == Some(&ids));
            let g = match existing {
                Some(g) => g,
                None => {
                    let g = self.new_group(&ids)?;
                    touched.push(g);
                    g
                }
            };
            group_of.insert(set, (g, ids.len() as u32));
        }
        // 2. Status name and source ranges.
        if self.svc_names.get(&svc_id) != Some(&p.display) {
            self.maps
                .svc_info
                .put(&[(svc_id, plan::svc_info(&p.display))])?;
            self.counts.written += 1;
            self.svc_names.insert(svc_id, p.display.clone());
        }
        let ranges: Vec<((u32, Ipv4Net), u8)> = p
            .src_ranges
            .iter()
            .filter(|net| !self.ranges.contains(&(svc_id, **net)))
            .map(|net| ((svc_id, *net), 1))
            .collect();
        if !ranges.is_empty() {
            let put = self.maps.src_ranges.put(&ranges);
            let written = put.as_ref().err().map_or(ranges.len(), |e| e.written);
            self.counts.written += written;
            self.ranges
                .extend(ranges[..written].iter().map(|(k, _)| *k));
            put?;
        }
        // 3. Switch the frontends: one update each, in one batch.
        let old = self.ports.remove(name);
        let mut keys = Vec::with_capacity(p.frontends.len());
        let mut changed: Vec<(FrontendKey, Frontend)> = Vec::new();
        for f in &p.frontends {
            let (group, count) = group_of[&f.set];
            let value = Frontend {
                group,
                count,
                svc_id,
                affinity_secs: p.affinity_secs,
                flags: f.flags,
                kind: f.kind,
                _pad: [0; 2],
            };
            if self.frontends.get(&f.key) == Some(&value) {
                keys.push(f.key);
            } else {
                changed.push((f.key, value));
            }
        }
        let mut failure: Option<PortFailure> = None;
        let mut rest = &changed[..];
        while !rest.is_empty() {
            let (written, failed) = match self.maps.frontends.put(rest) {
                Ok(()) => (rest.len(), None),
                Err(e) => (e.written, Some(e.error)),
            };
            for (k, value) in &rest[..written] {
                self.counts.written += 1;
                keys.push(*k);
                let prev = self.frontends.insert(*k, *value);
                *self.group_refs.entry(value.group).or_insert(0) += 1;
                if let Some(prev) = prev {
                    if let Some(r) = self.group_refs.get_mut(&prev.group) {
                        *r = r.saturating_sub(1);
                    }
                    touched.push(prev.group);
                }
            }
            // The one that failed is left out; the others are still tried.
            if let Some(e) = failed {
                let (key, _) = rest[written];
                // A record it replaces stays in place (and this port's).
                if self.frontends.contains_key(&key) {
                    keys.push(key);
                }
                let f = failure.get_or_insert_with(|| PortFailure::from(e));
                f.frontends.push(key);
            }
            rest = &rest[(written + 1).min(rest.len())..];
        }
        // 4. Old frontends and ranges of this port that are gone.
        if let Some(old) = &old {
            for k in old.frontends.iter().filter(|k| !keys.contains(k)) {
                if let Some(g) = self.frontends.get(k).map(|v| v.group) {
                    touched.push(g);
                }
                self.delete_frontend(k).map_err(WriteError::Other)?;
            }
            for net in old.ranges.iter().filter(|n| !p.src_ranges.contains(n)) {
                self.delete_range(old.svc_id, *net)
                    .map_err(WriteError::Other)?;
            }
        }
        self.ports.insert(
            name.clone(),
            PortState {
                svc_id,
                frontends: keys,
                ranges: p.src_ranges.clone(),
            },
        );
        failure.map_or(Ok(()), Err)
    }

    fn remove_port(&mut self, name: &ServicePortName) -> Result<(), DataplaneError> {
        let Some(old) = self.ports.remove(name) else {
            return Ok(());
        };
        let mut touched = Vec::new();
        for k in &old.frontends {
            if let Some(g) = self.frontends.get(k).map(|v| v.group) {
                touched.push(g);
            }
            self.delete_frontend(k)?;
        }
        for net in &old.ranges {
            self.delete_range(old.svc_id, *net)?;
        }
        self.delete_name(old.svc_id)?;
        self.gc_groups(&touched)
    }

    fn delete_frontend(&mut self, k: &FrontendKey) -> Result<(), DataplaneError> {
        let Some(v) = self.frontends.remove(k) else {
            return Ok(());
        };
        self.maps.frontends.delete(&[*k]).map_err(table_err)?;
        self.counts.deleted += 1;
        if let Some(r) = self.group_refs.get_mut(&v.group) {
            *r = r.saturating_sub(1);
        }
        Ok(())
    }

    fn delete_range(&mut self, svc_id: u32, net: Ipv4Net) -> Result<(), DataplaneError> {
        if self.ranges.remove(&(svc_id, net)) {
            self.maps
                .src_ranges
                .delete(&[(svc_id, net)])
                .map_err(table_err)?;
            self.counts.deleted += 1;
        }
        Ok(())
    }

    fn delete_name(&mut self, svc_id: u32) -> Result<(), DataplaneError> {
        if self.svc_names.remove(&svc_id).is_some() {
            self.maps.svc_info.delete(&[svc_id]).map_err(table_err)?;
            self.counts.deleted += 1;
        }
        Ok(())
    }

    /// Deletes the given groups if no frontend uses them (one batch), then
    /// the backends only they used.
    fn gc_groups(&mut self, groups: &[u32]) -> Result<(), DataplaneError> {
        let mut freed = Vec::new();
        let mut slots = Vec::new();
        for g in groups {
            if self.group_refs.get(g).copied().unwrap_or(0) > 0 {
                continue;
            }
            let Some(ids) = self.groups.remove(g) else {
                continue;
            };
            self.group_refs.remove(g);
            slots.extend((0..ids.len()).map(|i| SlotKey {
                group: *g,
                slot: i as u32,
            }));
            for id in unique(&ids) {
                if let Some(r) = self.backend_refs.get_mut(&id) {
                    *r = r.saturating_sub(1);
                }
                freed.push(id);
            }
        }
        if !slots.is_empty() {
            self.maps.slots.delete(&slots).map_err(table_err)?;
            self.counts.deleted += slots.len();
        }
        self.gc_backends(&freed)
    }

    /// Deletes the given backends if no group uses them (one batch).
    fn gc_backends(&mut self, ids: &[u32]) -> Result<(), DataplaneError> {
        let mut gone = Vec::new();
        for id in ids {
            if self.backend_refs.get(id).copied().unwrap_or(0) > 0 {
                continue;
            }
            if let Some(b) = self.backends.remove(id) {
                self.backend_ids.remove(&b);
                self.backend_refs.remove(id);
                gone.push(*id);
                debug!(id, "backend removed");
            }
        }
        if !gone.is_empty() {
            self.maps.backends.delete(&gone).map_err(table_err)?;
            self.counts.deleted += gone.len();
        }
        Ok(())
    }

    /// Entries of each map as the mirror has them (tests and status).
    pub fn entry_counts(&self) -> (usize, usize, usize) {
        (
            self.frontends.len(),
            self.groups.values().map(Vec::len).sum(),
            self.backends.len(),
        )
    }
}

fn unique(ids: &[u32]) -> impl Iterator<Item = u32> {
    let set: BTreeSet<u32> = ids.iter().copied().collect();
    set.into_iter()
}
