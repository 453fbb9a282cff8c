//! What changed between two desired states, by Service port.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use super::types::{Changes, DesiredState};

/// Added, updated and removed Service ports, each list sorted. A port is
/// updated when anything the dataplane programs for it differs.
pub(crate) fn diff(old: &DesiredState, new: &DesiredState) -> Changes {
    let mut changes = Changes::default();
    let mut old_left: BTreeMap<_, _> = old.services.iter().collect();
    for (name, port) in &new.services {
        match old_left.entry(name) {
            Entry::Vacant(_) => changes.added.push(name.clone()),
            Entry::Occupied(o) => {
                if *o.get() != port {
                    changes.updated.push(name.clone());
                }
                o.remove();
            }
        }
    }
    changes.removed = old_left.into_keys().cloned().collect();
    changes
}
