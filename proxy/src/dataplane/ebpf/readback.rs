//! `kproxy status` in ebpf mode: the Service table as the kernel's maps hold
//! it (like `cilium service list`), read from the pinned maps.

use std::collections::HashMap;
use std::path::Path;

use proxy_common::maps as names;
use proxy_common::*;

use super::maps::{map_err, Maps};
use super::plan::{ip_from_key, port_from_key, svc_info_name};
use crate::dataplane::{DataplaneError, ProgrammedFrontend};

pub(crate) fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_CLUSTER_IP => "ClusterIP",
        KIND_NODE_PORT => "NodePort",
        KIND_EXTERNAL_IP => "ExternalIP",
        KIND_LOAD_BALANCER => "LoadBalancer",
        _ => "Unknown",
    }
}

pub(crate) fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_SCTP => "sctp",
        _ => "?",
    }
}

/// Frontends as reached from outside (external frontends' socket-side twins
/// are left out: they only differ in using the cluster endpoint list).
pub fn programmed(pin: &Path) -> Result<Vec<ProgrammedFrontend>, DataplaneError> {
    let maps = Maps::open(pin)?;
    let mut backends: HashMap<u32, Backend> = HashMap::new();
    for r in maps.backends.iter() {
        let (k, v) = r.map_err(|e| map_err(names::BACKENDS, e))?;
        backends.insert(k, v);
    }
    let mut slots: HashMap<SlotKey, u32> = HashMap::new();
    for r in maps.slots.iter() {
        let (k, v) = r.map_err(|e| map_err(names::SLOTS, e))?;
        slots.insert(k, v);
    }
    let mut svc: HashMap<u32, String> = HashMap::new();
    for r in maps.svc_info.iter() {
        let (k, v) = r.map_err(|e| map_err(names::SVC_INFO, e))?;
        svc.insert(k, svc_info_name(&v));
    }
    let mut out = Vec::new();
    for r in maps.frontends.iter() {
        let (k, v) = r.map_err(|e| map_err(names::FRONTENDS, e))?;
        if v.kind != KIND_CLUSTER_IP && k.scope == SCOPE_INTERNAL {
            continue;
        }
        let addr = if k.ip == 0 {
            "*".to_string()
        } else {
            ip_from_key(k.ip).to_string()
        };
        let backends = (0..v.count)
            .map(|slot| {
                match slots
                    .get(&SlotKey {
                        group: v.group,
                        slot,
                    })
                    .and_then(|id| backends.get(id))
                {
                    Some(b) => format!("{}:{}", ip_from_key(b.ip), port_from_key(b.port)),
                    None => "(missing)".to_string(),
                }
            })
            .collect();
        out.push(ProgrammedFrontend {
            service: svc
                .get(&v.svc_id)
                .cloned()
                .unwrap_or_else(|| format!("(unknown id {})", v.svc_id)),
            kind: kind_name(v.kind).to_string(),
            frontend: format!("{addr}:{}/{}", port_from_key(k.port), proto_name(k.proto)),
            backends,
        });
    }
    out.sort_by(|a, b| (&a.service, &a.kind, &a.frontend).cmp(&(&b.service, &b.kind, &b.frontend)));
    Ok(out)
}
