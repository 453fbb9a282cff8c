//! The layout stamp of the pinned maps: a one-entry array pinned at
//! `maps/LAYOUT` holding a hash of every pinned map's type, key size, value
//! size and flags, read from the eBPF object this kproxy carries (so it is
//! always true to the programs), plus [`LAYOUT_EPOCH`] for changes of
//! meaning that keep the sizes.
//!
//! Pinned maps are reused by a restarted kproxy. Maps of another layout
//! (another kproxy version) cannot be: the new programs would read their
//! entries wrongly, or be rejected by the verifier over and over while the
//! old programs keep running with state nobody updates. So a kproxy that
//! finds another stamp (or pins without one, from a kproxy before stamps)
//! takes over with fresh maps: see `EbpfDataplane::start`.

use std::path::Path;

use aya::maps::{Array, MapData};
use proxy_common::maps as names;

use super::maps::maps_dir;
use crate::dataplane::DataplaneError;

/// Pin name of the stamp map (under `maps/`, removed by cleanup with the rest).
pub const STAMP_MAP: &str = "LAYOUT";

/// Raise when a map's meaning changes without its sizes changing.
pub const LAYOUT_EPOCH: u64 = 1;

/// What the pin path holds, compared with this kproxy's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// No pinned maps.
    Nothing,
    /// Maps of this layout.
    Same,
    /// Maps of another layout; `None`: pinned before stamps existed.
    Other(Option<u64>),
}

fn err(msg: String) -> DataplaneError {
    DataplaneError::Other(msg)
}

/// The stamp of `object`'s pinned maps.
pub fn stamp_of(object: &[u8]) -> Result<u64, DataplaneError> {
    let obj = aya_obj::Object::parse(object)
        .map_err(|e| err(format!("reading kproxy's eBPF object: {e}")))?;
    let mut fields = vec![LAYOUT_EPOCH];
    let mut all: Vec<&str> = names::ALL.to_vec();
    all.sort_unstable();
    for name in all {
        let map = obj
            .maps
            .get(name)
            .ok_or_else(|| err(format!("map {name} missing from kproxy's eBPF object")))?;
        fields.extend(name.bytes().map(u64::from));
        fields.extend([
            map.map_type() as u64,
            map.key_size() as u64,
            map.value_size() as u64,
            map.map_flags() as u64,
        ]);
    }
    Ok(fnv1a(&fields))
}

/// FNV-1a over the little-endian bytes of `fields`: stable across builds
/// and platforms, unlike std's hasher.
fn fnv1a(fields: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in fields.iter().flat_map(|f| f.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Compares the maps pinned under `pin` with the layout `ours`.
pub fn inspect(pin: &Path, ours: u64) -> Result<Pinned, DataplaneError> {
    let dir = maps_dir(pin);
    let any = std::fs::read_dir(&dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !any {
        return Ok(Pinned::Nothing);
    }
    let path = dir.join(STAMP_MAP);
    if !path.exists() {
        return Ok(Pinned::Other(None));
    }
    let stamp = read(&path)?;
    Ok(if stamp == ours {
        Pinned::Same
    } else {
        Pinned::Other(Some(stamp))
    })
}

fn open(path: &Path) -> Result<Array<MapData, u64>, DataplaneError> {
    let data =
        MapData::from_pin(path).map_err(|e| err(format!("opening {}: {e}", path.display())))?;
    Array::try_from(aya::maps::Map::Array(data))
        .map_err(|e| err(format!("{} is not kproxy's stamp map: {e}", path.display())))
}

fn read(path: &Path) -> Result<u64, DataplaneError> {
    open(path)?
        .get(&0, 0)
        .map_err(|e| err(format!("reading {}: {e}", path.display())))
}

/// Pins (or rewrites) the stamp `ours` under `pin`.
pub fn write(pin: &Path, ours: u64) -> Result<(), DataplaneError> {
    let path = maps_dir(pin).join(STAMP_MAP);
    if !path.exists() {
        Array::<MapData, u64>::create(1, 0)
            .map_err(|e| err(format!("creating the layout stamp map: {e}")))?
            .pin(&path)
            .map_err(|e| err(format!("pinning {}: {e}", path.display())))?;
    }
    open(&path)?
        .set(0, ours, 0)
        .map_err(|e| err(format!("writing {}: {e}", path.display())))
}

/// Where [`retire`] moves old pins (bpffs refuses names with a dot).
fn retired_dir(pin: &Path) -> std::path::PathBuf {
    pin.join("maps_retired")
}

/// Moves the pinned maps out of `maps/` (one rename), so the next load
/// creates fresh ones. The old programs keep their maps until their links
/// are replaced; [`remove_retired`] drops the pins afterwards.
pub fn retire(pin: &Path) -> Result<(), DataplaneError> {
    remove_retired(pin)?;
    let (from, to) = (maps_dir(pin), retired_dir(pin));
    std::fs::rename(&from, &to).map_err(|e| {
        err(format!(
            "moving {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })
}

/// Removes the pins [`retire`] moved away (also those of a take-over that
/// was interrupted).
pub fn remove_retired(pin: &Path) -> Result<(), DataplaneError> {
    let dir = retired_dir(pin);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        std::fs::remove_file(entry.path())
            .map_err(|e| err(format!("removing {}: {e}", entry.path().display())))?;
    }
    std::fs::remove_dir(&dir).map_err(|e| err(format!("removing {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_is_stable_and_covers_every_pinned_map() {
        let object = super::super::loader::object();
        let a = stamp_of(object).unwrap();
        assert_eq!(a, stamp_of(object).unwrap());
        assert_ne!(a, 0);
        // Any field changes it.
        assert_ne!(fnv1a(&[1, 2, 3]), fnv1a(&[1, 2, 4]));
        assert_ne!(fnv1a(&[1, 2, 3]), fnv1a(&[1, 3, 2]));
    }
}
