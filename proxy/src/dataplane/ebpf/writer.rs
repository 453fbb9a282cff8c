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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::MapError;
use ipnet::Ipv4Net;
use proxy_common::maps as names;
use proxy_common::*;
use tracing::{debug, warn};

use super::maps::{map_err, Maps};
use super::plan::{self, ip_key, PortPlan, Set};
use crate::dataplane::{DataplaneConfig, DataplaneError};
use crate::model::{Changes, DesiredState, ServicePortName};

/// What the writer needs about the node.
#[derive(Debug, Clone, Default)]
pub struct NodeSettings {
    /// Addresses that accept node-port traffic.
    pub nodeport_ips: Vec<std::net::Ipv4Addr>,
    /// (ifindex, address) of each attached device: the SNAT source there.
    pub if_addrs: Vec<(u32, std::net::Ipv4Addr)>,
    pub snat_ports: (u16, u16),
    /// SNAT source on devices without an address.
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// Cookie of the network namespace whose sockets reach node ports on
    /// 127.0.0.1 (the node's); 0: none.
    pub localhost_netns: u64,
}

/// A Service port that could not be programmed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortError {
    pub service: String,
    pub reason: &'static str,
    pub message: String,
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
    pin: PathBuf,
    maps: Maps,
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
    /// Ports that failed last time: retried on every sync.
    failed: BTreeSet<ServicePortName>,
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

fn is_full(e: &MapError) -> bool {
    match e {
        MapError::SyscallError(s) => matches!(
            s.io_error.raw_os_error(),
            Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)
        ),
        _ => false,
    }
}

enum WriteError {
    Full(&'static str),
    Other(DataplaneError),
}

impl Writer {
    pub fn open(pin: &Path) -> Result<Writer, DataplaneError> {
        let maps = Maps::open(pin)?;
        let mut w = Writer {
            pin: pin.to_path_buf(),
            maps,
            frontends: HashMap::new(),
            groups: HashMap::new(),
            group_refs: HashMap::new(),
            backends: HashMap::new(),
            backend_ids: HashMap::new(),
            backend_refs: HashMap::new(),
            svc_names: HashMap::new(),
            ranges: HashSet::new(),
            ports: HashMap::new(),
            next_group: 1,
            next_backend: 1,
            next_svc: 1,
            counts: Counts::default(),
            failed: BTreeSet::new(),
        };
        w.reload()?;
        Ok(w)
    }

    /// Reads the kernel's maps into the mirror.
    fn reload(&mut self) -> Result<(), DataplaneError> {
        let m = &self.maps;
        self.frontends.clear();
        for r in m.frontends.iter() {
            let (k, v) = r.map_err(|e| map_err(names::FRONTENDS, e))?;
            self.frontends.insert(k, v);
        }
        let mut slots: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
        for r in m.slots.iter() {
            let (k, v) = r.map_err(|e| map_err(names::SLOTS, e))?;
            slots.entry(k.group).or_default().push((k.slot, v));
        }
        self.groups = slots
            .into_iter()
            .map(|(g, mut s)| {
                s.sort_unstable();
                (g, s.into_iter().map(|(_, id)| id).collect())
            })
            .collect();
        self.backends.clear();
        for r in m.backends.iter() {
            let (k, v) = r.map_err(|e| map_err(names::BACKENDS, e))?;
            self.backends.insert(k, v);
        }
        self.backend_ids = self.backends.iter().map(|(id, b)| (*b, *id)).collect();
        self.svc_names.clear();
        for r in m.svc_info.iter() {
            let (k, v) = r.map_err(|e| map_err(names::SVC_INFO, e))?;
            self.svc_names.insert(k, plan::svc_info_name(&v));
        }
        self.ranges.clear();
        for r in m.src_ranges.iter() {
            let (k, _) = r.map_err(|e| map_err(names::SRC_RANGES, e))?;
            let data = k.data();
            let prefix = k.prefix_len().saturating_sub(32).min(32) as u8;
            if let Ok(net) = Ipv4Net::new(plan::ip_from_key(data.ip), prefix) {
                self.ranges.insert((u32::from_be(data.svc_id_be), net));
            }
        }
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
        let m = &mut self.maps;
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
                    localhost_netns: node.localhost_netns,
                },
                0,
            )
            .map_err(|e| map_err(names::CONFIG, e))?;
        Ok(())
    }

    /// Programs `desired`: everything (after re-reading the kernel) when
    /// `full`, else the changed ports and the ones that failed before.
    pub fn sync(
        &mut self,
        desired: &DesiredState,
        changes: &Changes,
        full: bool,
        config: &DataplaneConfig,
    ) -> Result<(Counts, Vec<PortError>), DataplaneError> {
        self.counts = Counts::default();
        let mut errors = Vec::new();
        if full {
            self.reload()?;
            self.failed.clear();
            // Claim ids of ports already in the kernel first, so a restart
            // keeps every svc_id (affinity and conntrack stay valid).
            let plans: Vec<(&ServicePortName, PortPlan)> = desired
                .services
                .iter()
                .map(|(n, sp)| (n, plan::plan(sp, config)))
                .collect();
            let mut claimed = HashSet::new();
            let mut hints = Vec::with_capacity(plans.len());
            for (_, p) in &plans {
                let hint = p.frontends.iter().find_map(|f| {
                    let v = self.frontends.get(&f.key)?;
                    (self.svc_names.get(&v.svc_id) == Some(&p.display) && claimed.insert(v.svc_id))
                        .then_some(v.svc_id)
                });
                hints.push(hint);
            }
            let mut wanted: HashSet<FrontendKey> = HashSet::new();
            for ((name, p), hint) in plans.iter().zip(hints) {
                wanted.extend(p.frontends.iter().map(|f| f.key));
                let id = hint.unwrap_or_else(|| self.alloc_svc(&claimed));
                claimed.insert(id);
                if let Err(e) = self.apply_port(name, p, id) {
                    errors.push(self.port_error(name, p, e)?);
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
        } else {
            for name in &changes.removed {
                self.remove_port(name)?;
            }
            let retry: Vec<ServicePortName> =
                std::mem::take(&mut self.failed).into_iter().collect();
            let todo: BTreeSet<&ServicePortName> = changes
                .added
                .iter()
                .chain(&changes.updated)
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
                    errors.push(self.port_error(name, &p, e)?);
                }
            }
        }
        Ok((self.counts, errors))
    }

    fn port_error(
        &mut self,
        name: &ServicePortName,
        p: &PortPlan,
        e: WriteError,
    ) -> Result<PortError, DataplaneError> {
        self.failed.insert(name.clone());
        match e {
            WriteError::Full(map) => {
                let cap = Maps::capacity(&self.pin, map).unwrap_or(0);
                Ok(PortError {
                    service: p.display.clone(),
                    reason: "map_full",
                    message: format!(
                        "Service {} ({}) not fully programmed: BPF map {map} is full ({cap} entries); raise {}",
                        p.display,
                        name.protocol,
                        size_flag(map)
                    ),
                })
            }
            WriteError::Other(e) => Err(e),
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

    fn ensure_backend(&mut self, b: Backend) -> Result<u32, WriteError> {
        if let Some(id) = self.backend_ids.get(&b) {
            return Ok(*id);
        }
        let id = self.next_backend;
        self.next_backend += 1;
        match self.maps.backends.insert(id, b, 0) {
            Ok(()) => {}
            Err(e) if is_full(&e) => return Err(WriteError::Full(names::BACKENDS)),
            Err(e) => return Err(WriteError::Other(map_err(names::BACKENDS, e))),
        }
        self.counts.written += 1;
        self.backends.insert(id, b);
        self.backend_ids.insert(b, id);
        self.backend_refs.insert(id, 0);
        Ok(id)
    }

    /// Writes a complete new slot group; on failure removes what it wrote.
    fn new_group(&mut self, ids: &[u32]) -> Result<u32, WriteError> {
        let g = self.next_group;
        self.next_group += 1;
        for (i, id) in ids.iter().enumerate() {
            let key = SlotKey {
                group: g,
                slot: i as u32,
            };
            if let Err(e) = self.maps.slots.insert(key, id, 0) {
                for j in 0..i {
                    let _ = self.maps.slots.remove(&SlotKey {
                        group: g,
                        slot: j as u32,
                    });
                }
                return Err(if is_full(&e) {
                    WriteError::Full(names::SLOTS)
                } else {
                    WriteError::Other(map_err(names::SLOTS, e))
                });
            }
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
    ) -> Result<(), WriteError> {
        let mut touched_groups = Vec::new();
        let result = self.apply_port_inner(name, p, svc_id, &mut touched_groups);
        let gc = self.gc_groups(&touched_groups).map_err(WriteError::Other);
        result.and(gc)
    }

    fn apply_port_inner(
        &mut self,
        name: &ServicePortName,
        p: &PortPlan,
        svc_id: u32,
        touched: &mut Vec<u32>,
    ) -> Result<(), WriteError> {
        // 1. Backends and complete slot groups, one per distinct set.
        let mut group_of: HashMap<Set, (u32, u32)> = HashMap::new();
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
            let mut ids = Vec::with_capacity(list.len());
            for b in list {
                ids.push(self.ensure_backend(*b)?);
            }
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
            match self
                .maps
                .svc_info
                .insert(svc_id, plan::svc_info(&p.display), 0)
            {
                Ok(()) => {}
                Err(e) if is_full(&e) => return Err(WriteError::Full(names::SVC_INFO)),
                Err(e) => return Err(WriteError::Other(map_err(names::SVC_INFO, e))),
            }
            self.counts.written += 1;
            self.svc_names.insert(svc_id, p.display.clone());
        }
        for net in &p.src_ranges {
            if self.ranges.contains(&(svc_id, *net)) {
                continue;
            }
            match self.maps.src_ranges.insert(&range_key(svc_id, *net), 1, 0) {
                Ok(()) => {}
                Err(e) if is_full(&e) => return Err(WriteError::Full(names::SRC_RANGES)),
                Err(e) => return Err(WriteError::Other(map_err(names::SRC_RANGES, e))),
            }
            self.counts.written += 1;
            self.ranges.insert((svc_id, *net));
        }
        // 3. Switch the frontends: one update each.
        let old = self.ports.remove(name);
        let mut keys = Vec::with_capacity(p.frontends.len());
        let mut result = Ok(());
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
            let prev = self.frontends.get(&f.key).copied();
            if prev == Some(value) {
                keys.push(f.key);
                continue;
            }
            match self.maps.frontends.insert(f.key, value, 0) {
                Ok(()) => {}
                Err(e) => {
                    result = Err(if is_full(&e) {
                        WriteError::Full(names::FRONTENDS)
                    } else {
                        WriteError::Other(map_err(names::FRONTENDS, e))
                    });
                    continue;
                }
            }
            self.counts.written += 1;
            keys.push(f.key);
            self.frontends.insert(f.key, value);
            *self.group_refs.entry(group).or_insert(0) += 1;
            if let Some(prev) = prev {
                if let Some(r) = self.group_refs.get_mut(&prev.group) {
                    *r = r.saturating_sub(1);
                }
                touched.push(prev.group);
            }
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
        result
    }

    fn remove_port(&mut self, name: &ServicePortName) -> Result<(), DataplaneError> {
        self.failed.remove(name);
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
        ignore_missing(self.maps.frontends.remove(k), names::FRONTENDS)?;
        self.counts.deleted += 1;
        if let Some(r) = self.group_refs.get_mut(&v.group) {
            *r = r.saturating_sub(1);
        }
        Ok(())
    }

    fn delete_range(&mut self, svc_id: u32, net: Ipv4Net) -> Result<(), DataplaneError> {
        if self.ranges.remove(&(svc_id, net)) {
            ignore_missing(
                self.maps.src_ranges.remove(&range_key(svc_id, net)),
                names::SRC_RANGES,
            )?;
            self.counts.deleted += 1;
        }
        Ok(())
    }

    fn delete_name(&mut self, svc_id: u32) -> Result<(), DataplaneError> {
        if self.svc_names.remove(&svc_id).is_some() {
            ignore_missing(self.maps.svc_info.remove(&svc_id), names::SVC_INFO)?;
            self.counts.deleted += 1;
        }
        Ok(())
    }

    /// Deletes the given groups if no frontend uses them, then the backends
    /// only they used.
    fn gc_groups(&mut self, groups: &[u32]) -> Result<(), DataplaneError> {
        let mut freed = Vec::new();
        for g in groups {
            if self.group_refs.get(g).copied().unwrap_or(0) > 0 {
                continue;
            }
            let Some(ids) = self.groups.remove(g) else {
                continue;
            };
            self.group_refs.remove(g);
            for i in 0..ids.len() {
                ignore_missing(
                    self.maps.slots.remove(&SlotKey {
                        group: *g,
                        slot: i as u32,
                    }),
                    names::SLOTS,
                )?;
            }
            self.counts.deleted += ids.len();
            for id in unique(&ids) {
                if let Some(r) = self.backend_refs.get_mut(&id) {
                    *r = r.saturating_sub(1);
                }
                freed.push(id);
            }
        }
        self.gc_backends(&freed)
    }

    fn gc_backends(&mut self, ids: &[u32]) -> Result<(), DataplaneError> {
        for id in ids {
            if self.backend_refs.get(id).copied().unwrap_or(0) > 0 {
                continue;
            }
            if let Some(b) = self.backends.remove(id) {
                self.backend_ids.remove(&b);
                self.backend_refs.remove(id);
                ignore_missing(self.maps.backends.remove(id), names::BACKENDS)?;
                self.counts.deleted += 1;
                debug!(id, "backend removed");
            }
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

fn range_key(svc_id: u32, net: Ipv4Net) -> LpmKey<SrcRangeKey> {
    LpmKey::new(
        32 + net.prefix_len() as u32,
        SrcRangeKey {
            svc_id_be: svc_id.to_be(),
            ip: ip_key(net.network()),
        },
    )
}

fn unique(ids: &[u32]) -> impl Iterator<Item = u32> {
    let set: BTreeSet<u32> = ids.iter().copied().collect();
    set.into_iter()
}

fn ignore_missing(r: Result<(), MapError>, map: &str) -> Result<(), DataplaneError> {
    match r {
        Ok(()) => Ok(()),
        Err(MapError::ElementNotFound) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
            warn!(map, "entry already gone");
            Ok(())
        }
        Err(e) => Err(map_err(map, e)),
    }
}
