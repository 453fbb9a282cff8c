//! The maps the writer owns (frontends, slots, backends, names, source
//! ranges), each behind the small [`Table`] trait: the aya implementation
//! writes through the bpf syscall, batched where the kernel can
//! (`BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH`, Linux 5.6; aya 0.14
//! has no wrapper), one entry at a time where it cannot; the in-memory
//! [`fake`] lets the writer's ids, refcounts, ordering and full maps be
//! tested without root.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, IterableMap, MapData, MapError};
use aya::Pod;
use ipnet::Ipv4Net;
use proxy_common::*;

use super::plan::{self, ip_key};

/// A source range of one Service id (the logical key of `SRC_RANGES`).
pub type RangeKey = (u32, Ipv4Net);

/// Why a map operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The map has no room (E2BIG / ENOSPC / ENOMEM from the kernel).
    #[error("map {map} is full")]
    Full { map: &'static str },
    #[error("map {map}: {message}")]
    Other { map: &'static str, message: String },
}

/// A failed [`Table::put`]: the first `written` entries are in the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutError {
    pub written: usize,
    pub error: TableError,
}

/// One BPF map as the writer uses it.
pub trait Table<K, V>: Send {
    fn name(&self) -> &'static str;
    /// Every entry.
    fn dump(&self) -> Result<Vec<(K, V)>, TableError>;
    /// Inserts or replaces `entries`, in order.
    fn put(&mut self, entries: &[(K, V)]) -> Result<(), PutError>;
    /// Deletes `keys`; keys already gone are no error.
    fn delete(&mut self, keys: &[K]) -> Result<(), TableError>;
    /// `max_entries`, for messages (0 when unknown).
    fn capacity(&self) -> u32;
}

/// The writer's maps.
pub struct Tables {
    pub frontends: Box<dyn Table<FrontendKey, Frontend>>,
    pub slots: Box<dyn Table<SlotKey, u32>>,
    pub backends: Box<dyn Table<u32, Backend>>,
    pub svc_info: Box<dyn Table<u32, SvcInfo>>,
    pub src_ranges: Box<dyn Table<RangeKey, u8>>,
}

// ---------------------------------------------------------------- kernel

fn is_full(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)
    )
}

fn from_map_error(map: &'static str, e: MapError) -> TableError {
    match &e {
        MapError::SyscallError(s) if is_full(s.io_error.raw_os_error()) => TableError::Full { map },
        _ => TableError::Other {
            map,
            message: e.to_string(),
        },
    }
}

fn is_missing(e: &MapError) -> bool {
    match e {
        MapError::ElementNotFound | MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

use super::batch::BatchAttr;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per batch syscall (bounds the kernel's work per call).
const BATCH: usize = 4096;

/// One batch command; `Err((processed, errno))` on failure.
fn batch(
    cmd: libc::c_long,
    fd: i32,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> Result<(), (usize, i32)> {
    let mut attr = BatchAttr {
        keys: keys as u64,
        values: values as u64,
        count: count as u32,
        map_fd: fd as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for the batch commands; the
    // key and value arrays hold `count` entries of the map's sizes (the
    // typed Pod slices of the callers) and live across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        Err((attr.count as usize, errno))
    }
}

use super::batch::unsupported as batch_unsupported;

/// A pinned BPF hash map.
pub struct KernelHash<K: Pod, V: Pod> {
    name: &'static str,
    map: HashMap<MapData, K, V>,
    capacity: u32,
    /// Cleared the first time the kernel refuses a batch command.
    batch: AtomicBool,
}

impl<K: Pod, V: Pod> KernelHash<K, V> {
    pub fn new(name: &'static str, map: HashMap<MapData, K, V>) -> Self {
        let capacity = map.map().info().map_or(0, |i| i.max_entries());
        KernelHash {
            name,
            map,
            capacity,
            batch: AtomicBool::new(true),
        }
    }

    fn fd(&self) -> i32 {
        self.map.map().fd().as_fd().as_raw_fd()
    }

    fn put_one_by_one(&mut self, entries: &[(K, V)], done: usize) -> Result<(), PutError> {
        for (i, (k, v)) in entries.iter().enumerate() {
            self.map.insert(k, v, 0).map_err(|e| PutError {
                written: done + i,
                error: from_map_error(self.name, e),
            })?;
        }
        Ok(())
    }

    fn delete_one_by_one(&mut self, keys: &[K]) -> Result<(), TableError> {
        for k in keys {
            match self.map.remove(k) {
                Ok(()) => {}
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(from_map_error(self.name, e)),
            }
        }
        Ok(())
    }
}

impl<K: Pod + Send, V: Pod + Send> Table<K, V> for KernelHash<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn dump(&self) -> Result<Vec<(K, V)>, TableError> {
        if self.batch.load(Ordering::Relaxed) {
            match super::batch::dump_all(self.fd()) {
                Ok(entries) => return Ok(entries),
                Err(e) if e.raw_os_error().is_some_and(batch_unsupported) => {
                    self.batch.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    return Err(TableError::Other {
                        map: self.name,
                        message: e.to_string(),
                    })
                }
            }
        }
        self.map
            .iter()
            .map(|r| r.map_err(|e| from_map_error(self.name, e)))
            .collect()
    }

    fn put(&mut self, entries: &[(K, V)]) -> Result<(), PutError> {
        let mut done = 0;
        for chunk in entries.chunks(BATCH) {
            if !self.batch.load(Ordering::Relaxed) || chunk.len() == 1 {
                self.put_one_by_one(chunk, done)?;
                done += chunk.len();
                continue;
            }
            let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
            let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
            match batch(
                BPF_MAP_UPDATE_BATCH,
                self.fd(),
                keys.as_ptr().cast(),
                values.as_ptr().cast(),
                chunk.len(),
            ) {
                Ok(()) => {}
                Err((0, errno)) if batch_unsupported(errno) => {
                    self.batch.store(false, Ordering::Relaxed);
                    self.put_one_by_one(chunk, done)?;
                }
                Err((n, errno)) => {
                    return Err(PutError {
                        written: done + n,
                        error: if is_full(Some(errno)) {
                            TableError::Full { map: self.name }
                        } else {
                            TableError::Other {
                                map: self.name,
                                message: std::io::Error::from_raw_os_error(errno).to_string(),
                            }
                        },
                    })
                }
            }
            done += chunk.len();
        }
        Ok(())
    }

    fn delete(&mut self, keys: &[K]) -> Result<(), TableError> {
        let mut rest = keys;
        while !rest.is_empty() {
            if !self.batch.load(Ordering::Relaxed) || rest.len() == 1 {
                return self.delete_one_by_one(rest);
            }
            let n = rest.len().min(BATCH);
            match batch(
                BPF_MAP_DELETE_BATCH,
                self.fd(),
                rest.as_ptr().cast(),
                std::ptr::null(),
                n,
            ) {
                Ok(()) => rest = &rest[n..],
                // The key at `done` is gone already: skip it, go on.
                Err((done, libc::ENOENT)) => rest = &rest[(done + 1).min(rest.len())..],
                Err((0, errno)) if batch_unsupported(errno) => {
                    self.batch.store(false, Ordering::Relaxed);
                }
                Err((_, errno)) => {
                    return Err(TableError::Other {
                        map: self.name,
                        message: std::io::Error::from_raw_os_error(errno).to_string(),
                    })
                }
            }
        }
        Ok(())
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// `SRC_RANGES`, an LPM trie (no batch ops there): one entry at a time.
pub struct KernelRanges {
    pub map: LpmTrie<MapData, SrcRangeKey, u8>,
    capacity: u32,
}

impl KernelRanges {
    pub fn new(map: LpmTrie<MapData, SrcRangeKey, u8>) -> Self {
        let capacity = map.map().info().map_or(0, |i| i.max_entries());
        KernelRanges { map, capacity }
    }
}

/// The LPM key of a source range: prefix 32 + the range's, so the Service
/// id always matches in full.
pub fn range_key(svc_id: u32, net: Ipv4Net) -> LpmKey<SrcRangeKey> {
    LpmKey::new(
        32 + net.prefix_len() as u32,
        SrcRangeKey {
            svc_id_be: svc_id.to_be(),
            ip: ip_key(net.network()),
        },
    )
}

const SRC_RANGES: &str = proxy_common::maps::SRC_RANGES;

impl Table<RangeKey, u8> for KernelRanges {
    fn name(&self) -> &'static str {
        SRC_RANGES
    }

    fn dump(&self) -> Result<Vec<(RangeKey, u8)>, TableError> {
        let mut out = Vec::new();
        for r in self.map.iter() {
            let (k, v) = r.map_err(|e| from_map_error(SRC_RANGES, e))?;
            let data = k.data();
            let prefix = k.prefix_len().saturating_sub(32).min(32) as u8;
            if let Ok(net) = Ipv4Net::new(plan::ip_from_key(data.ip), prefix) {
                out.push(((u32::from_be(data.svc_id_be), net), v));
            }
        }
        Ok(out)
    }

    fn put(&mut self, entries: &[(RangeKey, u8)]) -> Result<(), PutError> {
        for (i, ((id, net), v)) in entries.iter().enumerate() {
            self.map
                .insert(&range_key(*id, *net), v, 0)
                .map_err(|e| PutError {
                    written: i,
                    error: from_map_error(SRC_RANGES, e),
                })?;
        }
        Ok(())
    }

    fn delete(&mut self, keys: &[RangeKey]) -> Result<(), TableError> {
        for (id, net) in keys {
            match self.map.remove(&range_key(*id, *net)) {
                Ok(()) => {}
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(from_map_error(SRC_RANGES, e)),
            }
        }
        Ok(())
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }
}

// ------------------------------------------------------------------ fake

/// In-memory tables with a log of every operation.
pub mod memory {
    use std::collections::{BTreeMap, BTreeSet};
    use std::fmt::Debug;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// One operation: (map, "put" | "delete", keys).
    pub type Op = (&'static str, &'static str, usize);

    /// Shared state of the in-memory maps: their capacities and the operations
    /// so far.
    #[derive(Default)]
    pub struct State {
        pub capacity: BTreeMap<&'static str, usize>,
        pub log: Vec<Op>,
        /// States a lookup could have seen with a frontend whose slots or
        /// backends were missing, checked after every operation.
        pub violations: Vec<String>,
        /// Entries the checks looked at: they look at what an operation
        /// could break, not at every entry (a render of 10,000 Services
        /// is tens of thousands of operations).
        pub checked: usize,
    }

    pub type Shared = Arc<Mutex<State>>;

    type Entries<K, V> = Arc<Mutex<BTreeMap<K, V>>>;

    /// What must hold after an operation on a table, given that it held
    /// before: (the maps, "put" | "delete", the keys) -> the violations
    /// and the entries looked at.
    type Check<K> = fn(&MemoryMaps, &'static str, &[K]) -> (Vec<String>, usize);

    pub struct MemoryTable<K, V> {
        name: &'static str,
        maps: MemoryMaps,
        check: Check<K>,
        entries: Entries<K, V>,
    }

    impl<K: Copy + Ord, V: Copy> MemoryTable<K, V> {
        fn put_inner(&mut self, entries: &[(K, V)]) -> Result<(), PutError> {
            let mut st = self.maps.state.lock().unwrap();
            st.log.push((self.name, "put", entries.len()));
            let cap = st.capacity.get(self.name).copied().unwrap_or(usize::MAX);
            let mut map = self.entries.lock().unwrap();
            for (i, (k, v)) in entries.iter().enumerate() {
                if !map.contains_key(k) && map.len() >= cap {
                    return Err(PutError {
                        written: i,
                        error: TableError::Full { map: self.name },
                    });
                }
                map.insert(*k, *v);
            }
            Ok(())
        }

        fn after(&self, op: &'static str, keys: &[K]) {
            let (violations, looked_at) = (self.check)(&self.maps, op, keys);
            let mut st = self.maps.state.lock().unwrap();
            st.checked += looked_at;
            st.violations.extend(violations);
        }
    }

    impl<K, V> Table<K, V> for MemoryTable<K, V>
    where
        K: Copy + Ord + Debug + Send + 'static,
        V: Copy + Debug + Send + 'static,
    {
        fn name(&self) -> &'static str {
            self.name
        }
        fn dump(&self) -> Result<Vec<(K, V)>, TableError> {
            Ok(self
                .entries
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect())
        }
        fn put(&mut self, entries: &[(K, V)]) -> Result<(), PutError> {
            let result = self.put_inner(entries);
            let written = result.as_ref().err().map_or(entries.len(), |e| e.written);
            let keys: Vec<K> = entries[..written].iter().map(|(k, _)| *k).collect();
            self.after("put", &keys);
            result
        }
        fn delete(&mut self, keys: &[K]) -> Result<(), TableError> {
            {
                self.maps
                    .state
                    .lock()
                    .unwrap()
                    .log
                    .push((self.name, "delete", keys.len()));
                let mut map = self.entries.lock().unwrap();
                for k in keys {
                    map.remove(k);
                }
            }
            self.after("delete", keys);
            Ok(())
        }
        fn capacity(&self) -> u32 {
            let st = self.maps.state.lock().unwrap();
            st.capacity
                .get(self.name)
                .map_or(u32::MAX, |c| (*c).min(u32::MAX as usize) as u32)
        }
    }

    /// In-memory maps that keep their contents across writers (a restart).
    #[derive(Clone, Default)]
    pub struct MemoryMaps {
        pub state: Shared,
        frontends: Entries<FrontendKey, Frontend>,
        slots: Entries<SlotKey, u32>,
        backends: Entries<u32, Backend>,
        svc_info: Entries<u32, SvcInfo>,
        src_ranges: Entries<RangeKey, u8>,
    }

    // What a lookup must never see: a frontend whose group lacks a slot,
    // or a slot whose backend is missing. Each check looks at what its
    // operation could break.

    /// Written frontends: their slots and those slots' backends exist.
    fn check_frontends(
        m: &MemoryMaps,
        op: &'static str,
        keys: &[FrontendKey],
    ) -> (Vec<String>, usize) {
        let mut out = Vec::new();
        let mut looked = 0;
        if op != "put" {
            return (out, looked);
        }
        let fes = m.frontends.lock().unwrap();
        let slots = m.slots.lock().unwrap();
        let backends = m.backends.lock().unwrap();
        for k in keys {
            let Some(f) = fes.get(k) else { continue };
            for slot in 0..f.count {
                looked += 1;
                match slots.get(&SlotKey {
                    group: f.group,
                    slot,
                }) {
                    None => out.push(format!("{k:?}: slot {slot} of group {} missing", f.group)),
                    Some(id) if !backends.contains_key(id) => {
                        out.push(format!("{k:?}: backend {id} missing"))
                    }
                    Some(_) => {}
                }
            }
        }
        (out, looked)
    }

    /// Written slots: their backends exist. Deleted slots: no frontend
    /// counts them.
    fn check_slots(m: &MemoryMaps, op: &'static str, keys: &[SlotKey]) -> (Vec<String>, usize) {
        let mut out = Vec::new();
        let mut looked = 0;
        if op == "put" {
            let slots = m.slots.lock().unwrap();
            let backends = m.backends.lock().unwrap();
            for k in keys {
                looked += 1;
                if let Some(id) = slots.get(k).filter(|id| !backends.contains_key(id)) {
                    out.push(format!("slot {}/{}: backend {id} missing", k.group, k.slot));
                }
            }
        } else if !keys.is_empty() {
            let gone: BTreeSet<(u32, u32)> = keys.iter().map(|k| (k.group, k.slot)).collect();
            let fes = m.frontends.lock().unwrap();
            for (k, f) in fes.iter() {
                looked += 1;
                if let Some((_, slot)) = gone.range((f.group, 0)..(f.group, f.count)).next() {
                    out.push(format!("{k:?}: slot {slot} of group {} missing", f.group));
                }
            }
        }
        (out, looked)
    }

    /// Deleted backends: no slot points at them.
    fn check_backends(m: &MemoryMaps, op: &'static str, keys: &[u32]) -> (Vec<String>, usize) {
        let mut out = Vec::new();
        let mut looked = 0;
        if op == "delete" && !keys.is_empty() {
            let gone: BTreeSet<u32> = keys.iter().copied().collect();
            for (k, id) in m.slots.lock().unwrap().iter() {
                looked += 1;
                if gone.contains(id) {
                    out.push(format!("slot {}/{}: backend {id} missing", k.group, k.slot));
                }
            }
        }
        (out, looked)
    }

    fn no_check<K>(_: &MemoryMaps, _: &'static str, _: &[K]) -> (Vec<String>, usize) {
        (Vec::new(), 0)
    }

    impl MemoryMaps {
        fn table<K, V>(
            &self,
            name: &'static str,
            entries: &Entries<K, V>,
            check: Check<K>,
        ) -> Box<MemoryTable<K, V>> {
            Box::new(MemoryTable {
                name,
                maps: self.clone(),
                check,
                entries: entries.clone(),
            })
        }

        pub fn tables(&self) -> Tables {
            use proxy_common::maps as n;
            Tables {
                frontends: self.table(n::FRONTENDS, &self.frontends, check_frontends),
                slots: self.table(n::SLOTS, &self.slots, check_slots),
                backends: self.table(n::BACKENDS, &self.backends, check_backends),
                svc_info: self.table(n::SVC_INFO, &self.svc_info, no_check),
                src_ranges: self.table(n::SRC_RANGES, &self.src_ranges, no_check),
            }
        }

        pub fn set_capacity(&self, map: &'static str, entries: usize) {
            self.state.lock().unwrap().capacity.insert(map, entries);
        }

        pub fn violations(&self) -> Vec<String> {
            self.state.lock().unwrap().violations.clone()
        }

        /// Entries the checks have looked at so far.
        pub fn checked(&self) -> usize {
            self.state.lock().unwrap().checked
        }

        /// Takes the operations logged so far.
        pub fn take_log(&self) -> Vec<Op> {
            std::mem::take(&mut self.state.lock().unwrap().log)
        }

        /// Entries of (frontends, slots, backends, names, source ranges).
        pub fn lens(&self) -> (usize, usize, usize, usize, usize) {
            (
                self.frontends.lock().unwrap().len(),
                self.slots.lock().unwrap().len(),
                self.backends.lock().unwrap().len(),
                self.svc_info.lock().unwrap().len(),
                self.src_ranges.lock().unwrap().len(),
            )
        }

        pub fn svc_info(&self) -> Vec<(u32, SvcInfo)> {
            pairs(&self.svc_info)
        }

        pub fn src_ranges(&self) -> Vec<RangeKey> {
            self.src_ranges.lock().unwrap().keys().copied().collect()
        }

        pub fn frontends(&self) -> Vec<(FrontendKey, Frontend)> {
            pairs(&self.frontends)
        }

        pub fn slots(&self) -> Vec<(SlotKey, u32)> {
            pairs(&self.slots)
        }

        pub fn backends(&self) -> Vec<(u32, Backend)> {
            pairs(&self.backends)
        }
    }

    fn pairs<K: Copy, V: Copy>(entries: &Entries<K, V>) -> Vec<(K, V)> {
        entries
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}

// --------------------------------------------------------------- discard

/// Tables that accept every operation and keep nothing: the writer's own
/// work and memory alone, without a kernel's or a fake's (the control-plane
/// cost example and benchmark).
pub mod discard {
    use super::*;

    struct Discard(&'static str);

    impl<K: Send, V: Send> Table<K, V> for Discard {
        fn name(&self) -> &'static str {
            self.0
        }
        fn dump(&self) -> Result<Vec<(K, V)>, TableError> {
            Ok(Vec::new())
        }
        fn put(&mut self, _: &[(K, V)]) -> Result<(), PutError> {
            Ok(())
        }
        fn delete(&mut self, _: &[K]) -> Result<(), TableError> {
            Ok(())
        }
        fn capacity(&self) -> u32 {
            u32::MAX
        }
    }

    /// The writer's maps, each keeping nothing.
    pub fn tables() -> Tables {
        Tables {
            frontends: Box::new(Discard("FRONTENDS")),
            slots: Box::new(Discard("SLOTS")),
            backends: Box::new(Discard("BACKENDS")),
            svc_info: Box::new(Discard("SVC_INFO")),
            src_ranges: Box::new(Discard("SRC_RANGES")),
        }
    }
}
