//! Objects -> DesiredState, with kube-proxy's endpoint semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::validate::{self, ParsedService, ParsedSlice, ServiceType};
use super::{ClusterObjects, ModelConfig};
use crate::model::types::{
    DesiredState, Endpoint, NodeInfo, Rejection, ServiceKey, ServicePort, ServicePortName,
    TrafficPolicy,
};

/// Node label carrying the node's zone, matched against topology hints.
pub(crate) const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

pub(crate) fn build(objects: &ClusterObjects, config: &ModelConfig) -> DesiredState {
    let mut rejected: Vec<Rejection> = Vec::new();

    // Our Node: addresses and zone. Every Node is checked so bad ones show up.
    let mut node = NodeInfo {
        name: config.node_name.clone(),
        ..NodeInfo::default()
    };
    let mut zone: Option<String> = None;
    let mut found_node = false;
    for n in &objects.nodes {
        let (parsed, errs) = validate::parse_node(n);
        rejected.extend(errs);
        if let Some(p) = parsed {
            // The first valid Node with our name wins.
            if p.name == config.node_name && !found_node {
                found_node = true;
                node.addresses = p.addresses;
                node.pod_cidrs = p.pod_cidrs;
                node.eligible = p.eligible;
                zone = p.labels.get(LABEL_ZONE).cloned();
            }
        }
    }

    // Slices grouped by Service, sorted by slice name so merging does not
    // depend on input order.
    let mut slices: BTreeMap<ServiceKey, Vec<ParsedSlice>> = BTreeMap::new();
    for s in &objects.endpoint_slices {
        let (parsed, errs) = validate::parse_slice(s);
        rejected.extend(errs);
        if let Some(p) = parsed {
            let key = ServiceKey::new(p.namespace.clone(), p.service_name.clone());
            slices.entry(key).or_default().push(p);
        }
    }
    for list in slices.values_mut() {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }

    let mut services = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut created = BTreeMap::new();
    for svc in &objects.services {
        let (parsed, errs) = validate::parse_service(svc);
        rejected.extend(errs);
        let Some(p) = parsed else { continue };
        if !seen.insert(p.key.clone()) {
            rejected.push(Rejection {
                kind: "Service".into(),
                namespace: p.key.namespace.clone(),
                name: p.key.name.clone(),
                field: "metadata.name".into(),
                reason: validate::REASON_INVALID_VALUE.into(),
                message: format!(
                    "Service {:?} in namespace {:?} is defined more than once; the first definition is used",
                    p.key.name, p.key.namespace
                ),
                origin: None,
            });
            continue;
        }
        created.insert(p.key.clone(), p.created);
        rejected.extend(ipv6_parts(&p));
        let svc_slices = slices.get(&p.key).map(Vec::as_slice).unwrap_or(&[]);
        for sp in service_ports(&p, svc_slices, config, zone.as_deref()) {
            services.insert(sp.name.clone(), sp);
        }
    }

    rejected.extend(super::conflicts::resolve(&mut services, &created));
    rejected.sort();
    rejected.dedup();
    let services = services
        .into_iter()
        .map(|(name, sp)| (name, Arc::new(sp)))
        .collect();
    DesiredState {
        node,
        services,
        rejected,
    }
}

/// IPv6 is not programmed yet; rather than dropping it silently, one
/// rejection per Service with IPv6 addresses (reason `ipv6_unsupported`)
/// says which are left out and whether the IPv4 part is served.
pub(crate) fn ipv6_parts(svc: &ParsedService) -> Option<Rejection> {
    if svc.foreign || svc.headless || svc.type_ == ServiceType::ExternalName {
        return None;
    }
    let lb: &[IpAddr] = if svc.type_ == ServiceType::LoadBalancer {
        &svc.load_balancer_ips
    } else {
        &[]
    };
    let mut parts = Vec::new();
    let mut field = None;
    for (what, f, ips) in [
        ("ClusterIP", "spec.clusterIPs", &svc.cluster_ips[..]),
        ("externalIP", "spec.externalIPs", &svc.external_ips[..]),
        ("load-balancer IP", "status.loadBalancer.ingress", lb),
    ] {
        for ip in ips.iter().filter(|ip| ip.is_ipv6()) {
            parts.push(format!("{what} {ip}"));
            field.get_or_insert(f);
        }
    }
    let field = field?;
    let served = if svc.cluster_ips.iter().any(IpAddr::is_ipv4) {
        "the IPv4 part of this dual-stack Service is programmed"
    } else {
        "this IPv6-only Service is not served on this node"
    };
    Some(Rejection {
        kind: "Service".into(),
        namespace: svc.key.namespace.clone(),
        name: svc.key.name.clone(),
        field: field.into(),
        reason: REASON_IPV6_UNSUPPORTED.into(),
        message: format!(
            "{} not programmed: kproxy supports IPv4 only for now; {served}",
            parts.join(", ")
        ),
        origin: None,
    })
}

/// Reason of [`ipv6_parts`] rejections.
pub(crate) const REASON_IPV6_UNSUPPORTED: &str = "ipv6_unsupported";

/// The ServicePorts of one valid Service; empty for Services kube-proxy
/// does not program.
pub(crate) fn service_ports<S: std::borrow::Borrow<ParsedSlice>>(
    svc: &ParsedService,
    slices: &[S],
    config: &ModelConfig,
    zone: Option<&str>,
) -> Vec<ServicePort> {
    if svc.foreign || svc.headless || svc.type_ == ServiceType::ExternalName {
        return Vec::new();
    }
    let cluster_ips: Vec<IpAddr> = svc
        .cluster_ips
        .iter()
        .copied()
        .filter(IpAddr::is_ipv4)
        .collect();
    if cluster_ips.is_empty() {
        return Vec::new();
    }
    let external_ips: Vec<IpAddr> = v4_sorted(&svc.external_ips);
    let is_lb = svc.type_ == ServiceType::LoadBalancer;
    let load_balancer_ips = if is_lb {
        v4_sorted(&svc.load_balancer_ips)
    } else {
        Vec::new()
    };
    // Every family is kept: dropping IPv6 ranges could turn a restricted
    // list into an empty one, which means "allow all".
    let load_balancer_source_ranges = if is_lb {
        let mut r = svc.load_balancer_source_ranges.clone();
        r.sort();
        r.dedup();
        r
    } else {
        Vec::new()
    };

    let mut out = Vec::new();
    for port in &svc.ports {
        let node_port = match svc.type_ {
            ServiceType::NodePort | ServiceType::LoadBalancer => port.node_port,
            _ => None,
        };
        let name = ServicePortName {
            service: svc.key.clone(),
            port: port.name.clone(),
            protocol: port.protocol,
        };
        let has_external =
            node_port.is_some() || !external_ips.is_empty() || !load_balancer_ips.is_empty();
        let external_policy = if svc.etp_local && has_external {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        };
        let internal_policy = if svc.itp_local {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        };
        let all = merge_endpoints(slices, port, config);
        let cluster_wide = usable(&all, zone, false);
        let cluster_endpoints = match internal_policy {
            TrafficPolicy::Cluster => cluster_wide.clone(),
            TrafficPolicy::Local => usable(&all, None, true),
        };
        let external_endpoints = match external_policy {
            TrafficPolicy::Cluster => cluster_wide,
            TrafficPolicy::Local => usable(&all, None, true),
        };
        let local_endpoint_count = all.iter().filter(|(e, _)| e.is_local && e.ready).count();
        out.push(ServicePort {
            name,
            cluster_ips: cluster_ips.clone(),
            port: port.port,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            external_policy,
            internal_policy,
            session_affinity_seconds: svc.session_affinity_seconds,
            health_check_node_port: match external_policy {
                TrafficPolicy::Local => svc.health_check_node_port,
                TrafficPolicy::Cluster => None,
            },
            all_endpoints: all.into_iter().map(|(e, _)| e).collect(),
            cluster_endpoints,
            external_endpoints,
            local_endpoint_count,
        });
    }
    out
}

fn v4_sorted(ips: &[IpAddr]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = ips.iter().copied().filter(IpAddr::is_ipv4).collect();
    v.sort();
    v.dedup();
    v
}

/// An endpoint with its zone hints (`None`: no hints).
type Hinted = (Endpoint, Option<Vec<String>>);

/// Every endpoint of one Service port across all its slices, deduplicated
/// by (ip, port) and sorted. The slice port serving a Service port is the
/// one with the same name and protocol.
fn merge_endpoints<S: std::borrow::Borrow<ParsedSlice>>(
    slices: &[S],
    port: &validate::ParsedServicePort,
    config: &ModelConfig,
) -> Vec<Hinted> {
    let mut by_addr: BTreeMap<(IpAddr, u16), Hinted> = BTreeMap::new();
    for slice in slices {
        let slice = slice.borrow();
        let Some(sp) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let cand = Endpoint {
                ip: ep.ip,
                port: sp.port,
                node_name: ep.node_name.clone(),
                is_local: !config.node_name.is_empty()
                    && ep.node_name.as_deref() == Some(config.node_name.as_str()),
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
            };
            let mut hints = ep.zone_hints.clone();
            if let Some(h) = hints.as_mut() {
                h.sort();
                h.dedup();
            }
            let cand = (cand, hints);
            match by_addr.entry((ep.ip, sp.port)) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(cand);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    if preference(&cand) > preference(o.get()) {
                        o.insert(cand);
                    }
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// Which copy of a duplicated endpoint wins: ready, then serving, then not
/// terminating; the rest only makes the choice independent of input order.
fn preference(h: &Hinted) -> impl Ord + '_ {
    let e = &h.0;
    (
        e.ready,
        e.serving,
        !e.terminating,
        std::cmp::Reverse((&e.node_name, e.is_local, &h.1)),
    )
}

/// kube-proxy's endpoint choice: ready endpoints, or when none is ready the
/// serving and terminating ones; among `local_only` ones if asked. With a
/// zone, topology hints narrow the choice when every chosen endpoint has
/// hints and at least one is for our zone.
fn usable(all: &[Hinted], zone: Option<&str>, local_only: bool) -> Vec<Endpoint> {
    let candidates: Vec<&Hinted> = all
        .iter()
        .filter(|(e, _)| !local_only || e.is_local)
        .collect();
    let ready: Vec<&Hinted> = candidates
        .iter()
        .copied()
        .filter(|(e, _)| e.ready)
        .collect();
    let chosen = if !ready.is_empty() {
        ready
    } else {
        candidates
            .into_iter()
            .filter(|(e, _)| e.serving && e.terminating)
            .collect()
    };
    let chosen = match zone {
        Some(zone) if !chosen.is_empty() && chosen.iter().all(|(_, h)| h.is_some()) => {
            let in_zone: Vec<&Hinted> = chosen
                .iter()
                .copied()
                .filter(|(_, h)| h.as_ref().is_some_and(|h| h.iter().any(|z| z == zone)))
                .collect();
            if in_zone.is_empty() {
                chosen
            } else {
                in_zone
            }
        }
        _ => chosen,
    };
    // `all` is sorted by (ip, port) and unique, so `chosen` is sorted too;
    // sort by the full Endpoint order anyway, as the types promise.
    let mut v: Vec<Endpoint> = chosen.into_iter().map(|(e, _)| e.clone()).collect();
    v.sort();
    v
}
