//! A full sync into empty maps (a fresh start: 222,000 entries at 10,000
//! Services) writes each map once, in large batches, instead of four
//! `bpf()` calls per Service port. While staged, a table's writes wait in
//! memory with the kernel's own rule for a full map (a new key past
//! `max_entries` fails, with the entries before it written), so the writer
//! sees per port exactly what the kernel would have answered; the flush
//! then writes the maps in the switch order (backends, slots, names,
//! frontends), so no frontend is in the kernel before what it points to.

use std::hash::Hash;

use proxy_common::*;

use super::tables::{PutError, RangeKey, Table, TableError, Tables};
use crate::hashing::HashMap;

/// A table whose writes can wait in memory until [`Staged::flush`].
pub struct Staged<K, V> {
    inner: Box<dyn Table<K, V>>,
    /// While staging: everything the (empty) map will hold.
    held: Option<HashMap<K, V>>,
}

impl<K: Copy + Eq + Hash + Send, V: Copy + Send> Staged<K, V> {
    pub fn new(inner: Box<dyn Table<K, V>>) -> Self {
        Staged { inner, held: None }
    }

    /// Writes wait in memory from now on. Only for a map that is empty.
    fn stage(&mut self) {
        self.held = Some(HashMap::default());
    }

    /// Writes what waits and stops staging; the count written.
    fn flush(&mut self) -> Result<usize, PutError> {
        let Some(held) = self.held.take() else {
            return Ok(0);
        };
        let entries: Vec<(K, V)> = held.into_iter().collect();
        self.inner.put(&entries).map(|()| entries.len())
    }
}

impl<K: Copy + Eq + Hash + Send, V: Copy + Send> Table<K, V> for Staged<K, V> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn dump(&self) -> Result<Vec<(K, V)>, TableError> {
        match &self.held {
            Some(held) => Ok(held.iter().map(|(k, v)| (*k, *v)).collect()),
            None => self.inner.dump(),
        }
    }

    fn put(&mut self, entries: &[(K, V)]) -> Result<(), PutError> {
        let Some(held) = &mut self.held else {
            return self.inner.put(entries);
        };
        let capacity = match self.inner.capacity() {
            0 => usize::MAX,
            c => c as usize,
        };
        let name = self.inner.name();
        for (i, (k, v)) in entries.iter().enumerate() {
            if held.len() >= capacity && !held.contains_key(k) {
                return Err(PutError {
                    written: i,
                    error: TableError::Full { map: name },
                });
            }
            held.insert(*k, *v);
        }
        Ok(())
    }

    fn delete(&mut self, keys: &[K]) -> Result<(), TableError> {
        match &mut self.held {
            Some(held) => {
                for k in keys {
                    held.remove(k);
                }
                Ok(())
            }
            None => self.inner.delete(keys),
        }
    }

    fn capacity(&self) -> u32 {
        self.inner.capacity()
    }
}

/// The writer's maps, those a fresh start fills able to stage.
pub struct StagedTables {
    pub frontends: Staged<FrontendKey, Frontend>,
    pub slots: Staged<SlotKey, u32>,
    pub backends: Staged<u32, Backend>,
    pub svc_info: Staged<u32, SvcInfo>,
    /// Rare and small (`loadBalancerSourceRanges`): written at once, so
    /// before any frontend that uses them.
    pub src_ranges: Box<dyn Table<RangeKey, u8>>,
}

impl StagedTables {
    pub fn new(t: Tables) -> Self {
        StagedTables {
            frontends: Staged::new(t.frontends),
            slots: Staged::new(t.slots),
            backends: Staged::new(t.backends),
            svc_info: Staged::new(t.svc_info),
            src_ranges: t.src_ranges,
        }
    }

    /// Writes to the staged maps wait in memory until [`Self::flush`].
    /// Only when they are empty (the writer's mirror of them is).
    pub fn stage(&mut self) {
        self.backends.stage();
        self.slots.stage();
        self.svc_info.stage();
        self.frontends.stage();
    }

    /// Writes every staged map in the switch order and stops staging (no-op
    /// when nothing is staged). After
    /// a failure the maps later in the order are not written (no frontend
    /// may point at what is missing): the caller's sync fails, and the next
    /// one re-reads the maps. The count written.
    pub fn flush(&mut self) -> Result<usize, TableError> {
        let written = self.flush_in_order().map_err(|e| e.error);
        // What a failure left unwritten is dropped.
        self.backends.held = None;
        self.slots.held = None;
        self.svc_info.held = None;
        self.frontends.held = None;
        written
    }

    fn flush_in_order(&mut self) -> Result<usize, PutError> {
        let written = self.backends.flush()?
            + self.slots.flush()?
            + self.svc_info.flush()?
            + self.frontends.flush()?;
        Ok(written)
    }
}
