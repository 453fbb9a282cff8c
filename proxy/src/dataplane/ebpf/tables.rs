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
/// The kernel's ENOTSUPP (not in libc): a map type without batch ops.
const ENOTSUPP: i32 = 524;
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

/// Errors meaning "this kernel or map type has no batch ops".
fn batch_unsupported(errno: i32) -> bool {
    matches!(errno, libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
}

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
    use std::collections::BTreeMap;
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
    }

    type Check = Arc<dyn Fn() -> Option<String> + Send + Sync>;

    pub type Shared = Arc<Mutex<State>>;

    pub struct MemoryTable<K, V> {
        name: &'static str,
        state: Shared,
        check: Check,
        /// The entries, keyed by their printed key (keys need no Ord).
        typed: Arc<Mutex<BTreeMap<String, (K, V)>>>,
    }

    fn key_of<K: Debug>(k: &K) -> String {
        format!("{k:?}")
    }

    impl<K: Copy + Debug, V: Copy> MemoryTable<K, V> {
        fn put_inner(&mut self, entries: &[(K, V)]) -> Result<(), PutError> {
            let mut st = self.state.lock().unwrap();
            st.log.push((self.name, "put", entries.len()));
            let cap = st.capacity.get(self.name).copied().unwrap_or(usize::MAX);
            let mut typed = self.typed.lock().unwrap();
            for (i, (k, v)) in entries.iter().enumerate() {
                let key = key_of(k);
                if !typed.contains_key(&key) && typed.len() >= cap {
                    return Err(PutError {
                        written: i,
                        error: TableError::Full { map: self.name },
                    });
                }
                typed.insert(key, (*k, *v));
            }
            Ok(())
        }

        fn after(&self) {
            if let Some(v) = (self.check)() {
                self.state.lock().unwrap().violations.push(v);
            }
        }
    }

    impl<K: Copy + Debug + Send + 'static, V: Copy + Debug + Send + 'static> Table<K, V>
        for MemoryTable<K, V>
    {
        fn name(&self) -> &'static str {
            self.name
        }
        fn dump(&self) -> Result<Vec<(K, V)>, TableError> {
            Ok(self.typed.lock().unwrap().values().copied().collect())
        }
        fn put(&mut self, entries: &[(K, V)]) -> Result<(), PutError> {
            let result = self.put_inner(entries);
            self.after();
            result
        }
        fn delete(&mut self, keys: &[K]) -> Result<(), TableError> {
            {
                self.state
                    .lock()
                    .unwrap()
                    .log
                    .push((self.name, "delete", keys.len()));
                let mut typed = self.typed.lock().unwrap();
                for k in keys {
                    typed.remove(&key_of(k));
                }
            }
            self.after();
            Ok(())
        }
        fn capacity(&self) -> u32 {
            let st = self.state.lock().unwrap();
            st.capacity
                .get(self.name)
                .map_or(u32::MAX, |c| (*c).min(u32::MAX as usize) as u32)
        }
    }

    /// In-memory maps that keep their contents across writers (a restart).
    #[derive(Clone, Default)]
    pub struct MemoryMaps {
        pub state: Shared,
        frontends: Arc<Mutex<BTreeMap<String, (FrontendKey, Frontend)>>>,
        slots: Arc<Mutex<BTreeMap<String, (SlotKey, u32)>>>,
        backends: Arc<Mutex<BTreeMap<String, (u32, Backend)>>>,
        svc_info: Arc<Mutex<BTreeMap<String, (u32, SvcInfo)>>>,
        src_ranges: Arc<Mutex<BTreeMap<String, (RangeKey, u8)>>>,
    }

    impl MemoryMaps {
        /// A frontend whose group lacks a slot, or a slot whose backend is
        /// missing: what a lookup must never see.
        fn check(&self) -> Check {
            let (fes, slots, backends) = (
                self.frontends.clone(),
                self.slots.clone(),
                self.backends.clone(),
            );
            Arc::new(move || {
                let slots = slots.lock().unwrap();
                let backends = backends.lock().unwrap();
                let slot_of: BTreeMap<(u32, u32), u32> = slots
                    .values()
                    .map(|(k, v)| ((k.group, k.slot), *v))
                    .collect();
                let ids: std::collections::BTreeSet<u32> =
                    backends.values().map(|(id, _)| *id).collect();
                for (k, f) in fes.lock().unwrap().values() {
                    for slot in 0..f.count {
                        match slot_of.get(&(f.group, slot)) {
                            None => {
                                return Some(format!(
                                    "{k:?}: slot {slot} of group {} missing",
                                    f.group
                                ))
                            }
                            Some(id) if !ids.contains(id) => {
                                return Some(format!("{k:?}: backend {id} missing"))
                            }
                            Some(_) => {}
                        }
                    }
                }
                None
            })
        }

        fn table<K, V>(
            &self,
            name: &'static str,
            typed: &Arc<Mutex<BTreeMap<String, (K, V)>>>,
        ) -> Box<MemoryTable<K, V>> {
            Box::new(MemoryTable {
                name,
                state: self.state.clone(),
                check: self.check(),
                typed: typed.clone(),
            })
        }

        pub fn tables(&self) -> Tables {
            use proxy_common::maps as n;
            Tables {
                frontends: self.table(n::FRONTENDS, &self.frontends),
                slots: self.table(n::SLOTS, &self.slots),
                backends: self.table(n::BACKENDS, &self.backends),
                svc_info: self.table(n::SVC_INFO, &self.svc_info),
                src_ranges: self.table(n::SRC_RANGES, &self.src_ranges),
            }
        }

        pub fn set_capacity(&self, map: &'static str, entries: usize) {
            self.state.lock().unwrap().capacity.insert(map, entries);
        }

        pub fn violations(&self) -> Vec<String> {
            self.state.lock().unwrap().violations.clone()
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
            self.svc_info.lock().unwrap().values().copied().collect()
        }

        pub fn src_ranges(&self) -> Vec<RangeKey> {
            self.src_ranges
                .lock()
                .unwrap()
                .values()
                .map(|(k, _)| *k)
                .collect()
        }

        pub fn frontends(&self) -> Vec<(FrontendKey, Frontend)> {
            self.frontends.lock().unwrap().values().copied().collect()
        }

        pub fn slots(&self) -> Vec<(SlotKey, u32)> {
            self.slots.lock().unwrap().values().copied().collect()
        }

        pub fn backends(&self) -> Vec<(u32, Backend)> {
            self.backends.lock().unwrap().values().copied().collect()
        }
    }
}
