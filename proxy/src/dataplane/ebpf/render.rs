//! The map entries a desired state produces, as text: the writer run over
//! in-memory tables from empty (`kproxy render --proxy-mode ebpf` and the
//! YAML → maps golden tests). Ids are the ones a fresh kproxy allocates.

use std::fmt::Write;

use proxy_common::*;

use super::plan::{ip_from_key, port_from_key, svc_info_name};
use super::readback::{kind_name, proto_name};
use super::tables::memory::MemoryMaps;
use super::writer::Writer;
use crate::dataplane::{DataplaneConfig, DataplaneError};
use crate::model::{ChangeSet, DesiredState};

/// Every entry of FRONTENDS, SLOTS, BACKENDS, SVC_INFO and SRC_RANGES after
/// a first sync of `desired`, one per line, sorted.
pub fn render_maps(
    desired: &DesiredState,
    config: &DataplaneConfig,
) -> Result<String, DataplaneError> {
    let maps = MemoryMaps::default();
    let mut writer = Writer::over(maps.tables(), None)?;
    let (_, errors) = writer.sync(desired, &ChangeSet::default(), &[], true, config)?;
    let mut out = String::new();
    for e in &errors {
        let _ = writeln!(out, "# error: {}", e.message);
    }
    let mut fes = maps.frontends();
    fes.sort_by_key(|(k, _)| (ip_from_key(k.ip), port_from_key(k.port), k.proto, k.scope));
    let _ = writeln!(
        out,
        "# FRONTENDS: address:port/proto scope -> svc group count flags kind affinity"
    );
    for (k, f) in fes {
        let addr = if k.ip == 0 {
            "*".to_string()
        } else {
            ip_from_key(k.ip).to_string()
        };
        let scope = if k.scope == SCOPE_EXTERNAL {
            "external"
        } else {
            "internal"
        };
        let _ = writeln!(
            out,
            "{addr}:{}/{} {scope} -> svc {} group {} count {} flags {} kind {} affinity {}",
            port_from_key(k.port),
            proto_name(k.proto),
            f.svc_id,
            f.group,
            f.count,
            flags(f.flags),
            kind_name(f.kind),
            f.affinity_secs,
        );
    }
    let mut slots = maps.slots();
    slots.sort_by_key(|(k, _)| (k.group, k.slot));
    let _ = writeln!(out, "# SLOTS: group/slot -> backend");
    for (k, id) in slots {
        let _ = writeln!(out, "{}/{} -> {id}", k.group, k.slot);
    }
    let mut backends = maps.backends();
    backends.sort_by_key(|(id, _)| *id);
    let _ = writeln!(out, "# BACKENDS: id -> address:port flags");
    for (id, b) in backends {
        let local = if b.flags & BE_LOCAL != 0 {
            "local"
        } else {
            "-"
        };
        let _ = writeln!(
            out,
            "{id} -> {}:{} {local}",
            ip_from_key(b.ip),
            port_from_key(b.port)
        );
    }
    let mut names = maps.svc_info();
    names.sort_by_key(|(id, _)| *id);
    let _ = writeln!(out, "# SVC_INFO: svc -> Service port");
    for (id, info) in names {
        let _ = writeln!(out, "{id} -> {}", svc_info_name(&info));
    }
    let mut ranges = maps.src_ranges();
    ranges.sort();
    let _ = writeln!(out, "# SRC_RANGES: svc source");
    for (id, net) in ranges {
        let _ = writeln!(out, "{id} {net}");
    }
    Ok(out)
}

fn flags(f: u8) -> String {
    let names: Vec<&str> = [
        (FE_LOCAL, "local"),
        (FE_SNAT, "snat"),
        (FE_SNAT_NONCLUSTER, "snat-noncluster"),
        (FE_SRC_RANGES, "src-ranges"),
        (FE_SNAT_NONLOCAL_IF, "snat-nonlocal-if"),
    ]
    .iter()
    .filter(|(bit, _)| f & bit != 0)
    .map(|(_, n)| *n)
    .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}
