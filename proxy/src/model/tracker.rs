//! The change tracker: the model kept up to date one object at a time.
//!
//! It holds every object a source reported (each checked once, its
//! rejections kept with it) and each Service's computed ports. An event
//! marks the Services it touches dirty; [`Tracker::take_changes`]
//! recomputes only those, plus the Services that share a frontend with
//! them (a conflict is decided between claimants), and hands out one
//! [`ChangeSet`] of (old, new) per Service port. The result always equals
//! [`super::build`] over the same objects (property-tested), at a cost
//! in proportion to what changed, not to the cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::hashing::{HashMap, HashSet};

use super::build::{ipv6_parts, service_ports, LABEL_ZONE};
use super::conflicts::{self, Claim, Frontend};
use super::objects::{Checked, Event, Kind, Object, ObjectKey, Parsed};
use super::types::{
    ChangeSet, DesiredState, NodeInfo, Rejection, ServiceKey, ServicePort, ServicePortName,
};
use super::validate::{ParsedService, ParsedSlice};
use super::{ClusterObjects, ModelConfig};

/// What the tracker knows about one Service.
#[derive(Debug, Default)]
struct ServiceEntry {
    /// The Service object, if there is one.
    object: Option<Checked>,
    /// The frontends its ports claim (before conflicts are decided). The
    /// ports themselves are not kept: recomputing a Service costs less than
    /// a second copy of every port.
    claimed: Vec<Frontend>,
    /// Its `ipv6_unsupported` rejection.
    ipv6: Option<Rejection>,
    /// Its frontend conflicts lost, as rejections.
    conflicts: Vec<Rejection>,
    /// The names of its ports in the desired state.
    ports: Vec<ServicePortName>,
    /// Its valid EndpointSlices, by slice name (the merge order).
    slices: BTreeMap<String, Arc<ParsedSlice>>,
}

impl ServiceEntry {
    fn parsed(&self) -> Option<&Arc<ParsedService>> {
        match self.object.as_ref()?.parsed() {
            Parsed::Service(p) => p.as_ref(),
            _ => None,
        }
    }

    fn is_empty(&self) -> bool {
        self.object.is_none() && self.slices.is_empty() && self.ports.is_empty()
    }
}

/// A Service's ports before conflicts, its IPv6 rejection, its creation
/// time ([`Tracker::raw_ports`]).
type RawPorts = (Vec<ServicePort>, Option<Rejection>, Option<jiff::Timestamp>);

/// From this many changed Services on (a first or full sync), their ports
/// are computed on every core; below it a thread costs more than it saves.
pub(super) const PARALLEL_RAW_PORTS_MIN: usize = 2048;

/// The model, kept incrementally. Feed it [`Event`]s; take a
/// [`ChangeSet`] and read the [`DesiredState`] at each sync.
#[derive(Debug)]
pub struct Tracker {
    config: ModelConfig,
    services: HashMap<ServiceKey, ServiceEntry>,
    /// Every EndpointSlice (the ones the model ignores too).
    slices: HashMap<ObjectKey, Checked>,
    nodes: BTreeMap<String, Checked>,
    /// Our Node's zone (topology hints).
    zone: Option<String>,
    /// Who claims each frontend, from the ports before conflicts.
    claims: HashMap<Frontend, Vec<Claim>>,
    /// Objects whose check found problems.
    with_rejections: BTreeSet<ObjectKey>,
    /// Services with a derived rejection (IPv6 parts, lost conflicts).
    with_derived: BTreeSet<ServiceKey>,
    /// The source's own problems.
    problems: Vec<Rejection>,
    state: DesiredState,
    /// Services to recompute at the next [`Tracker::take_changes`].
    dirty: HashSet<ServiceKey>,
    /// The rejections must be gathered again.
    rejections_dirty: bool,
    /// The version of each changed port before its first change since the
    /// last [`Tracker::take_changes`].
    before: BTreeMap<ServicePortName, Option<Arc<ServicePort>>>,
    synced: bool,
    /// Services recomputed by the last [`Tracker::take_changes`].
    recomputed: usize,
}

impl Tracker {
    pub fn new(config: ModelConfig) -> Tracker {
        let state = DesiredState {
            node: NodeInfo {
                name: config.node_name.clone(),
                ..NodeInfo::default()
            },
            ..DesiredState::default()
        };
        Tracker {
            config,
            services: HashMap::default(),
            slices: HashMap::default(),
            nodes: BTreeMap::new(),
            zone: None,
            claims: HashMap::default(),
            with_rejections: BTreeSet::new(),
            with_derived: BTreeSet::new(),
            problems: Vec::new(),
            state,
            dirty: HashSet::default(),
            rejections_dirty: false,
            before: BTreeMap::new(),
            synced: false,
            recomputed: 0,
        }
    }

    /// A tracker holding `objects` (for one-off callers and tests).
    pub fn with_objects(config: ModelConfig, objects: &ClusterObjects) -> Tracker {
        let mut t = Tracker::new(config);
        let all = objects
            .services
            .iter()
            .map(|s| Object::Service(s.clone()))
            .chain(
                objects
                    .endpoint_slices
                    .iter()
                    .map(|s| Object::EndpointSlice(s.clone())),
            )
            .chain(objects.nodes.iter().map(|n| Object::Node(n.clone())));
        for o in all {
            t.apply(Event::upsert(o));
        }
        t.apply(Event::Synced);
        t
    }

    /// The source has told everything it had at start.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The desired state as of the last [`Tracker::take_changes`].
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// Records one event; the work happens in [`Tracker::take_changes`].
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Upsert(c) => self.upsert(c),
            Event::Delete(key) => self.delete(&key),
            Event::Problems(p) => {
                if p != self.problems {
                    self.problems = p;
                    self.rejections_dirty = true;
                }
            }
            Event::Synced => self.synced = true,
        }
    }

    fn upsert(&mut self, c: Checked) {
        let key = c.key().clone();
        self.note_rejections(&key, !c.rejections().is_empty());
        match key.kind {
            Kind::Service => {
                let skey = ServiceKey::new(key.namespace, key.name);
                let entry = self.services.entry(skey.clone()).or_default();
                if entry.object.as_ref() == Some(&c) {
                    return;
                }
                entry.object = Some(c);
                self.dirty.insert(skey);
            }
            Kind::EndpointSlice => {
                if self.slices.get(&key) == Some(&c) {
                    return;
                }
                let old = self.slices.insert(key.clone(), c.clone());
                if let Some(old) = old {
                    self.unlink_slice(&old);
                }
                if let Parsed::Slice(Some(p)) = c.parsed() {
                    let skey = ServiceKey::new(p.namespace.clone(), p.service_name.clone());
                    let entry = self.services.entry(skey.clone()).or_default();
                    entry.slices.insert(p.name.clone(), p.clone());
                    self.dirty.insert(skey);
                }
            }
            Kind::Node => {
                self.nodes.insert(key.name, c);
                self.node_changed();
            }
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        self.note_rejections(key, false);
        match key.kind {
            Kind::Service => {
                let skey = ServiceKey::new(key.namespace.clone(), key.name.clone());
                if let Some(entry) = self.services.get_mut(&skey) {
                    if entry.object.take().is_some() {
                        self.dirty.insert(skey);
                    }
                }
            }
            Kind::EndpointSlice => {
                if let Some(old) = self.slices.remove(key) {
                    self.unlink_slice(&old);
                }
            }
            Kind::Node => {
                if self.nodes.remove(&key.name).is_some() {
                    self.node_changed();
                }
            }
        }
    }

    fn note_rejections(&mut self, key: &ObjectKey, has: bool) {
        let changed = if has {
            self.with_rejections.insert(key.clone())
        } else {
            self.with_rejections.remove(key)
        };
        // A changed object may carry other rejections than before.
        self.rejections_dirty |= changed || has;
    }

    /// Takes a slice's endpoints away from its Service.
    fn unlink_slice(&mut self, old: &Checked) {
        let Parsed::Slice(Some(p)) = old.parsed() else {
            return;
        };
        let skey = ServiceKey::new(p.namespace.clone(), p.service_name.clone());
        if let Some(entry) = self.services.get_mut(&skey) {
            entry.slices.remove(&p.name);
        }
        self.dirty.insert(skey);
    }

    /// Our Node decides the node facts and the zone; the zone changes
    /// every Service's endpoint choice (topology hints).
    fn node_changed(&mut self) {
        let ours = self
            .nodes
            .get(&self.config.node_name)
            .and_then(|c| match c.parsed() {
                Parsed::Node(Some(p)) => Some(p.clone()),
                _ => None,
            });
        let mut node = NodeInfo {
            name: self.config.node_name.clone(),
            ..NodeInfo::default()
        };
        let mut zone = None;
        if let Some(p) = ours {
            node.addresses = p.addresses.clone();
            node.pod_cidrs = p.pod_cidrs.clone();
            node.eligible = p.eligible;
            zone = p.labels.get(LABEL_ZONE).cloned();
        }
        self.state.node = node;
        if zone != self.zone {
            self.zone = zone;
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// Recomputes the dirty Services and returns what changed since the
    /// last call. The state ([`Tracker::state`]) is then up to date.
    pub fn take_changes(&mut self) -> ChangeSet {
        let dirty: Vec<ServiceKey> = self.dirty.drain().collect();
        let computed = self.raw_ports_of(&dirty);
        let mut touched: HashSet<Frontend> = HashSet::default();
        let mut raws: HashMap<ServiceKey, Vec<ServicePort>> = HashMap::default();
        for (key, computed) in dirty.iter().zip(computed) {
            if let Some(raw) = self.recompute_raw(key, computed, &mut touched) {
                raws.insert(key.clone(), raw);
            }
        }
        // The Services sharing a frontend with a changed one may win or
        // lose it now.
        let mut affected: HashSet<ServiceKey> = dirty.into_iter().collect();
        for fe in &touched {
            for c in self.claims.get(fe).into_iter().flatten() {
                affected.insert(c.port.service.clone());
            }
        }
        for key in &affected {
            let raw = match raws.remove(key) {
                Some(raw) => raw,
                None => self.raw_ports(key).0,
            };
            self.resolve(key, raw);
        }
        self.recomputed = affected.len();
        if self.rejections_dirty {
            self.gather_rejections();
        }
        let mut out = ChangeSet::default();
        for (name, old) in std::mem::take(&mut self.before) {
            let new = self.state.services.get(&name).cloned();
            out.insert(name, old, new);
        }
        out
    }

    /// [`Self::raw_ports`] of each key, in order. Each Service's ports
    /// depend only on its own objects, so a large batch (a first or full
    /// sync) is split over the cores.
    fn raw_ports_of(&self, keys: &[ServiceKey]) -> Vec<RawPorts> {
        crate::parallel::map(keys, PARALLEL_RAW_PORTS_MIN, |k| self.raw_ports(k))
    }

    /// A Service's ports before conflicts are decided, its IPv6
    /// rejection, its creation time.
    fn raw_ports(&self, key: &ServiceKey) -> RawPorts {
        let Some(entry) = self.services.get(key) else {
            return (Vec::new(), None, None);
        };
        match entry.parsed() {
            Some(p) => {
                let slices: Vec<&ParsedSlice> = entry.slices.values().map(|s| &**s).collect();
                (
                    service_ports(p, &slices, &self.config, self.zone.as_deref()),
                    ipv6_parts(p),
                    p.created,
                )
            }
            None => (Vec::new(), None, None),
        }
    }

    /// Recomputes a changed Service's ports before conflicts and its
    /// claims on frontends (`touched`: the frontends claimed before or
    /// now). `None` when the tracker knows nothing of the Service.
    fn recompute_raw(
        &mut self,
        key: &ServiceKey,
        (raw, ipv6, created): RawPorts,
        touched: &mut HashSet<Frontend>,
    ) -> Option<Vec<ServicePort>> {
        let entry = self.services.get_mut(key)?;
        if ipv6 != entry.ipv6 {
            entry.ipv6 = ipv6;
            self.rejections_dirty = true;
        }
        for fe in std::mem::take(&mut entry.claimed) {
            if let Some(list) = self.claims.get_mut(&fe) {
                list.retain(|c| &c.port.service != key);
                if list.is_empty() {
                    self.claims.remove(&fe);
                }
            }
            touched.insert(fe);
        }
        for sp in &raw {
            for (fe, claim) in conflicts::claims_of(sp, created) {
                self.claims.entry(fe).or_default().push(claim);
                entry.claimed.push(fe);
                touched.insert(fe);
            }
        }
        Some(raw)
    }

    /// A Service's final ports (after its lost frontends), written into
    /// the state.
    fn resolve(&mut self, key: &ServiceKey, raw: Vec<ServicePort>) {
        let Some(entry) = self.services.get_mut(key) else {
            return;
        };
        let created = entry.parsed().and_then(|p| p.created);
        let mut lost = Vec::new();
        let mut ports = Vec::with_capacity(raw.len());
        for mut sp in raw {
            let claims = conflicts::claims_of(&sp, created);
            for (fe, loser) in claims {
                let list = self.claims.get(&fe).map(Vec::as_slice).unwrap_or(&[]);
                let Some(winner) = conflicts::winner(list) else {
                    continue;
                };
                if winner.port == sp.name {
                    continue;
                }
                conflicts::take_away(&mut sp, fe, loser.kind);
                lost.push(conflicts::rejection(fe, &loser, winner));
            }
            ports.extend(conflicts::after_losses(sp));
        }
        if lost != entry.conflicts {
            entry.conflicts = lost;
            self.rejections_dirty = true;
        }
        if entry.ipv6.is_some() || !entry.conflicts.is_empty() {
            self.with_derived.insert(key.clone());
        } else {
            self.with_derived.remove(key);
        }
        let new_names: Vec<ServicePortName> = ports.iter().map(|p| p.name.clone()).collect();
        for name in std::mem::take(&mut entry.ports) {
            if !new_names.contains(&name) {
                let old = self.state.services.remove(&name);
                self.before.entry(name).or_insert(old);
            }
        }
        for sp in ports {
            let name = sp.name.clone();
            let old = self.state.services.insert(name.clone(), Arc::new(sp));
            self.before.entry(name).or_insert(old);
        }
        entry.ports = new_names;
        if entry.is_empty() {
            self.services.remove(key);
        }
    }

    fn gather_rejections(&mut self) {
        self.rejections_dirty = false;
        let mut all: Vec<Rejection> = self.problems.clone();
        for key in &self.with_rejections {
            let c = match key.kind {
                Kind::Service => self
                    .services
                    .get(&ServiceKey::new(key.namespace.clone(), key.name.clone()))
                    .and_then(|e| e.object.as_ref()),
                Kind::EndpointSlice => self.slices.get(key),
                Kind::Node => self.nodes.get(&key.name),
            };
            all.extend(c.into_iter().flat_map(|c| c.rejections().iter().cloned()));
        }
        for key in &self.with_derived {
            if let Some(e) = self.services.get(key) {
                all.extend(e.ipv6.iter().cloned());
                all.extend(e.conflicts.iter().cloned());
            }
        }
        all.sort();
        all.dedup();
        self.state.rejected = all;
    }

    /// How many Services the last [`Tracker::take_changes`] recomputed.
    pub fn recomputed(&self) -> usize {
        self.recomputed
    }

    /// How many Services have an IPv4 ClusterIP and how many only IPv6
    /// ones (from their checked parts).
    pub fn service_families(&self) -> super::ServiceFamilies {
        super::service_families(
            self.services
                .values()
                .filter_map(|e| e.parsed().map(|p| &**p)),
        )
    }

    /// Every object held, by kind (in key order; objects dropped after
    /// their check are left out).
    pub fn objects(&self) -> ClusterObjects {
        let mut services: Vec<(&ServiceKey, &Checked)> = self
            .services
            .iter()
            .filter_map(|(k, e)| Some((k, e.object.as_ref()?)))
            .collect();
        services.sort_by(|a, b| a.0.cmp(b.0));
        let mut slices: Vec<(&ObjectKey, &Checked)> = self.slices.iter().collect();
        slices.sort_by(|a, b| a.0.cmp(b.0));
        let pick = |c: &Checked| c.object().cloned();
        let mut out = ClusterObjects::default();
        for o in services
            .into_iter()
            .filter_map(|(_, c)| pick(c))
            .chain(slices.into_iter().filter_map(|(_, c)| pick(c)))
            .chain(self.nodes.values().filter_map(pick))
        {
            match o {
                Object::Service(s) => out.services.push(s),
                Object::EndpointSlice(s) => out.endpoint_slices.push(s),
                Object::Node(n) => out.nodes.push(n),
            }
        }
        out
    }
}
