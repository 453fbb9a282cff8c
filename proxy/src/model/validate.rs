//! Validation: turns raw Kubernetes objects into checked, normalized parts
//! plus the list of everything wrong with them.
//!
//! `build` and the public `validate_*` functions share these parsers, so what
//! a source reports as invalid is exactly what the model leaves out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::types::{Protocol, Rejection, ServiceKey};

/// Label naming the Service an EndpointSlice belongs to.
pub(crate) const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label handing a Service to another proxy; kube-proxy ignores such Services.
pub(crate) const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

const DEFAULT_AFFINITY_SECONDS: u32 = 10800;
const MAX_AFFINITY_SECONDS: i32 = 86400;

pub(crate) const REASON_INVALID_NAME: &str = "invalid_name";
pub(crate) const REASON_INVALID_IP: &str = "invalid_ip";
pub(crate) const REASON_INVALID_PORT: &str = "invalid_port";
pub(crate) const REASON_DUPLICATE_PORT_NAME: &str = "duplicate_port_name";
pub(crate) const REASON_UNKNOWN_PROTOCOL: &str = "unknown_protocol";
pub(crate) const REASON_MISSING_FIELD: &str = "missing_field";
pub(crate) const REASON_INVALID_VALUE: &str = "invalid_value";

const LABEL_RULE: &str = "must be a DNS-1123 label: at most 63 lowercase letters, digits or '-', \
     starting and ending with a letter or digit";
const SUBDOMAIN_RULE: &str = "must be a DNS-1123 subdomain: at most 253 characters, dot-separated \
     labels of lowercase letters, digits or '-', each starting and ending with a letter or digit";
const SVC_NAME_RULE: &str = "must be a number 1-65535 or an IANA service name: at most 15 \
     lowercase letters, digits or '-', with at least one letter, no leading, trailing or double '-'";

// ---------------------------------------------------------------- names

/// DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// IANA_SVC_NAME as Kubernetes checks it for named target ports.
pub(crate) fn is_iana_svc_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

/// Parses an IP the way Kubernetes accepts it (no surrounding spaces; Rust's
/// parser already refuses IPv4 octets with leading zeros).
pub(crate) fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

fn port_in_range(p: i32) -> Option<u16> {
    if (1..=65535).contains(&p) {
        Some(p as u16)
    } else {
        None
    }
}

// ---------------------------------------------------------------- reporter

/// Collects rejections for one object.
pub(crate) struct Reporter {
    kind: &'static str,
    namespace: String,
    name: String,
    pub(crate) rejections: Vec<Rejection>,
}

impl Reporter {
    fn new(kind: &'static str, namespace: &str, name: &str) -> Self {
        Reporter {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            rejections: Vec::new(),
        }
    }

    fn reject(&mut self, field: impl Into<String>, reason: &str, message: impl Into<String>) {
        self.rejections.push(Rejection {
            kind: self.kind.to_string(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            field: field.into(),
            reason: reason.to_string(),
            message: message.into(),
            origin: None,
        });
    }

    fn is_clean(&self) -> bool {
        self.rejections.is_empty()
    }
}

/// Namespace and name of an object, checked. Missing namespace means "default".
fn check_meta(
    kind: &'static str,
    meta: &ObjectMeta,
    namespaced: bool,
    name_is_label: bool,
) -> Reporter {
    let namespace = if namespaced {
        meta.namespace.as_deref().unwrap_or("default")
    } else {
        ""
    };
    let name = meta.name.as_deref().unwrap_or("");
    let mut r = Reporter::new(kind, namespace, name);
    match meta.name.as_deref() {
        None | Some("") => r.reject(
            "metadata.name",
            REASON_MISSING_FIELD,
            format!("{kind} has no name"),
        ),
        Some(n) => {
            let (ok, rule) = if name_is_label {
                (is_dns1123_label(n), LABEL_RULE)
            } else {
                (is_dns1123_subdomain(n), SUBDOMAIN_RULE)
            };
            if !ok {
                r.reject(
                    "metadata.name",
                    REASON_INVALID_NAME,
                    format!("invalid {kind} name {n:?}: {rule}"),
                );
            }
        }
    }
    if namespaced && !is_dns1123_label(namespace) {
        r.reject(
            "metadata.namespace",
            REASON_INVALID_NAME,
            format!("invalid namespace {namespace:?}: {LABEL_RULE}"),
        );
    }
    r
}

// ---------------------------------------------------------------- Service

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// One checked `spec.ports[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A checked Service, with every address parsed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedService {
    pub key: ServiceKey,
    pub type_: ServiceType,
    /// `true` when clusterIP is "None".
    pub headless: bool,
    /// Labelled for another proxy.
    pub foreign: bool,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// LB ingress IPs, without those with ipMode "Proxy".
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub etp_local: bool,
    pub itp_local: bool,
    pub session_affinity_seconds: Option<u32>,
    pub health_check_node_port: Option<u16>,
    pub ports: Vec<ParsedServicePort>,
    /// `metadata.creationTimestamp`: the older of two Services claiming one
    /// frontend keeps it.
    pub created: Option<jiff::Timestamp>,
}

/// Checks a Service; `Some` only when it has no problem at all.
/// Services kproxy never programs (ExternalName, or labelled for another
/// proxy) only get their metadata checked.
pub(crate) fn parse_service(svc: &Service) -> (Option<ParsedService>, Vec<Rejection>) {
    let mut r = check_meta("Service", &svc.metadata, true, true);
    let key = ServiceKey::new(r.namespace.clone(), r.name.clone());
    let foreign = svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME));
    let default_spec = Default::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);

    let type_ = match spec.type_.as_deref() {
        None | Some("") | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            r.reject(
                "spec.type",
                REASON_INVALID_VALUE,
                format!(
                    "unknown Service type {other:?}: must be ClusterIP, NodePort, LoadBalancer or ExternalName"
                ),
            );
            ServiceType::ClusterIp
        }
    };

    let mut parsed = ParsedService {
        key,
        type_,
        headless: false,
        foreign,
        cluster_ips: Vec::new(),
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        etp_local: false,
        itp_local: false,
        session_affinity_seconds: None,
        health_check_node_port: None,
        created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        ports: Vec::new(),
    };
    if foreign || type_ == ServiceType::ExternalName {
        return finish(parsed, r);
    }

    // Cluster IPs: clusterIPs wins; clusterIP is the old single-value field.
    let mut check_cluster_ip = |field: String, s: &str, r: &mut Reporter| -> Option<IpAddr> {
        match s {
            "" => None,
            "None" => {
                parsed.headless = true;
                None
            }
            _ => {
                match parse_ip(s) {
                    Some(ip) => Some(ip),
                    None => {
                        r.reject(
                        field,
                        REASON_INVALID_IP,
                        format!("invalid cluster IP {s:?}: must be an IP address, \"None\" or empty"),
                    );
                        None
                    }
                }
            }
        }
    };
    let single = spec
        .cluster_ip
        .as_deref()
        .and_then(|s| check_cluster_ip("spec.clusterIP".into(), s, &mut r));
    let mut cluster_ips = Vec::new();
    match spec.cluster_ips.as_deref() {
        Some(list) if !list.is_empty() => {
            for (i, s) in list.iter().enumerate() {
                if let Some(ip) = check_cluster_ip(format!("spec.clusterIPs[{i}]"), s, &mut r) {
                    cluster_ips.push(ip);
                }
            }
        }
        _ => cluster_ips.extend(single),
    }
    parsed.cluster_ips = cluster_ips;

    for (i, s) in spec.external_ips.iter().flatten().enumerate() {
        match parse_ip(s) {
            Some(ip) => parsed.external_ips.push(ip),
            None => r.reject(
                format!("spec.externalIPs[{i}]"),
                REASON_INVALID_IP,
                format!("invalid external IP {s:?}: must be an IP address"),
            ),
        }
    }

    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let Some(s) = ing.ip.as_deref() else { continue };
        match parse_ip(s) {
            // ipMode Proxy: the load balancer proxies, so traffic arrives
            // addressed to the node, not to the LB IP (kube-proxy skips it).
            Some(ip) if ing.ip_mode.as_deref() != Some("Proxy") => {
                parsed.load_balancer_ips.push(ip)
            }
            Some(_) => {}
            None => r.reject(
                format!("status.loadBalancer.ingress[{i}].ip"),
                REASON_INVALID_IP,
                format!("invalid load-balancer ingress IP {s:?}: must be an IP address"),
            ),
        }
    }

    for (i, s) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match s.trim().parse::<IpNet>() {
            Ok(net) => parsed.load_balancer_source_ranges.push(net.trunc()),
            Err(_) => r.reject(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                REASON_INVALID_IP,
                format!("invalid source range {s:?}: must be a CIDR such as 10.0.0.0/8"),
            ),
        }
    }

    parsed.etp_local = match spec.external_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") | Some("Global") => false,
        Some("Local") => true,
        Some(other) => {
            r.reject(
                "spec.externalTrafficPolicy",
                REASON_INVALID_VALUE,
                format!("unknown externalTrafficPolicy {other:?}: must be Cluster or Local"),
            );
            false
        }
    };
    parsed.itp_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            r.reject(
                "spec.internalTrafficPolicy",
                REASON_INVALID_VALUE,
                format!("unknown internalTrafficPolicy {other:?}: must be Cluster or Local"),
            );
            false
        }
    };

    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    let timeout = match timeout {
        None => DEFAULT_AFFINITY_SECONDS,
        Some(t) if (1..=MAX_AFFINITY_SECONDS).contains(&t) => t as u32,
        Some(t) => {
            r.reject(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                REASON_INVALID_VALUE,
                format!("session affinity timeout {t} out of range: must be 1-{MAX_AFFINITY_SECONDS} seconds"),
            );
            DEFAULT_AFFINITY_SECONDS
        }
    };
    parsed.session_affinity_seconds = match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => None,
        Some("ClientIP") => Some(timeout),
        Some(other) => {
            r.reject(
                "spec.sessionAffinity",
                REASON_INVALID_VALUE,
                format!("unknown sessionAffinity {other:?}: must be None or ClientIP"),
            );
            None
        }
    };

    if let Some(p) = spec.health_check_node_port {
        match port_in_range(p) {
            Some(p) => parsed.health_check_node_port = Some(p),
            None => r.reject(
                "spec.healthCheckNodePort",
                REASON_INVALID_PORT,
                format!("healthCheckNodePort {p} out of range: must be 1-65535"),
            ),
        }
    }

    parsed.ports = check_service_ports(spec.ports.as_deref().unwrap_or(&[]), &mut r);
    finish(parsed, r)
}

fn check_service_ports(
    ports: &[k8s_openapi::api::core::v1::ServicePort],
    r: &mut Reporter,
) -> Vec<ParsedServicePort> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    let mut frontends = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let f = |what: &str| format!("spec.ports[{i}].{what}");
        let name = p.name.clone().unwrap_or_default();
        if name.is_empty() {
            if ports.len() > 1 {
                r.reject(
                    f("name"),
                    REASON_MISSING_FIELD,
                    "port has no name: a Service with more than one port must name every port",
                );
            }
        } else if !is_dns1123_label(&name) {
            r.reject(
                f("name"),
                REASON_INVALID_NAME,
                format!("invalid port name {name:?}: {LABEL_RULE}"),
            );
        } else if !names.insert(name.clone()) {
            r.reject(
                f("name"),
                REASON_DUPLICATE_PORT_NAME,
                format!("port name {name:?} is used by more than one port"),
            );
        }
        let protocol = match p.protocol.as_deref() {
            None | Some("") => Some(Protocol::Tcp),
            Some(s) => {
                let proto = Protocol::from_k8s(s);
                if proto.is_none() {
                    r.reject(
                        f("protocol"),
                        REASON_UNKNOWN_PROTOCOL,
                        format!("unknown protocol {s:?}: must be TCP, UDP or SCTP"),
                    );
                }
                proto
            }
        };
        let port = port_in_range(p.port);
        if port.is_none() {
            r.reject(
                f("port"),
                REASON_INVALID_PORT,
                format!("port {} out of range: must be 1-65535", p.port),
            );
        }
        let mut node_port = None;
        if let Some(np) = p.node_port {
            node_port = port_in_range(np);
            if node_port.is_none() {
                r.reject(
                    f("nodePort"),
                    REASON_INVALID_PORT,
                    format!("nodePort {np} out of range: must be 1-65535"),
                );
            }
        }
        // The API server defaults targetPort 0 and "" to the port, so they
        // are accepted; kube-proxy takes endpoint ports from the slices anyway.
        match &p.target_port {
            Some(IntOrString::Int(0)) => {}
            Some(IntOrString::String(s)) if s.is_empty() => {}
            Some(IntOrString::Int(t)) if port_in_range(*t).is_none() => r.reject(
                f("targetPort"),
                REASON_INVALID_PORT,
                format!("targetPort {t} out of range: must be 1-65535"),
            ),
            Some(IntOrString::String(s)) if !is_iana_svc_name(s) => r.reject(
                f("targetPort"),
                REASON_INVALID_PORT,
                format!("invalid targetPort {s:?}: {SVC_NAME_RULE}"),
            ),
            _ => {}
        }
        if let (Some(port), Some(protocol)) = (port, protocol) {
            // Two entries with one port and protocol would program one frontend twice.
            if !frontends.insert((port, protocol)) {
                r.reject(
                    f("port"),
                    REASON_INVALID_VALUE,
                    format!(
                        "port {port}/{} is listed more than once",
                        protocol.as_str().to_uppercase()
                    ),
                );
            }
            out.push(ParsedServicePort {
                name,
                protocol,
                port,
                node_port,
            });
        }
    }
    out
}

fn finish<T>(parsed: T, r: Reporter) -> (Option<T>, Vec<Rejection>) {
    if r.is_clean() {
        (Some(parsed), r.rejections)
    } else {
        (None, r.rejections)
    }
}

// ---------------------------------------------------------------- EndpointSlice

/// One usable endpoint of a slice (conditions already defaulted).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedEndpoint {
    pub ip: IpAddr,
    /// Shared by the endpoints of a slice on one node, and by every copy
    /// of the endpoint in the desired state.
    pub node_name: Option<Arc<str>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `hints.forZones[].name`; `None` when the endpoint has no hints.
    pub zone_hints: Option<Vec<String>>,
}

/// One usable port of a slice.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedSlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// The usable part of an IPv4 EndpointSlice of a Service.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedSlice {
    pub namespace: String,
    pub name: String,
    pub service_name: String,
    pub endpoints: Vec<ParsedEndpoint>,
    pub ports: Vec<ParsedSlicePort>,
}

/// Checks an EndpointSlice. Bad endpoints and ports are reported and left
/// out; a bad name, service label or address type drops the whole slice.
/// Slices we ignore (no service label, IPv6, FQDN) give `None` and no
/// rejection.
pub(crate) fn parse_slice(slice: &EndpointSlice) -> (Option<ParsedSlice>, Vec<Rejection>) {
    let Some(service_name) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
    else {
        return (None, Vec::new());
    };
    let mut r = check_meta("EndpointSlice", &slice.metadata, true, false);
    if !is_dns1123_label(service_name) {
        r.reject(
            format!("metadata.labels[{LABEL_SERVICE_NAME:?}]"),
            REASON_INVALID_NAME,
            format!(
                "invalid Service name {service_name:?} in label {LABEL_SERVICE_NAME}: {LABEL_RULE}"
            ),
        );
    }
    match slice.address_type.as_str() {
        "IPv4" => {}
        // Only IPv4 is programmed today; other families are not errors.
        "IPv6" | "FQDN" => return (None, Vec::new()),
        other => r.reject(
            "addressType",
            REASON_INVALID_VALUE,
            format!("unknown addressType {other:?}: must be IPv4, IPv6 or FQDN"),
        ),
    }
    if !r.is_clean() {
        return (None, r.rejections);
    }

    let mut parsed = ParsedSlice {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        service_name: service_name.clone(),
        endpoints: Vec::new(),
        ports: Vec::new(),
    };

    let mut last_node: Option<Arc<str>> = None;
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let mut ok = true;
        if ep.addresses.is_empty() {
            r.reject(
                format!("endpoints[{i}].addresses"),
                REASON_MISSING_FIELD,
                "endpoint has no address",
            );
            ok = false;
        }
        for (j, a) in ep.addresses.iter().enumerate() {
            if !matches!(parse_ip(a), Some(IpAddr::V4(_))) {
                r.reject(
                    format!("endpoints[{i}].addresses[{j}]"),
                    REASON_INVALID_IP,
                    format!(
                        "invalid endpoint address {a:?}: must be an IPv4 address in an IPv4 slice"
                    ),
                );
                ok = false;
            }
        }
        if let Some(n) = ep.node_name.as_deref() {
            if !is_dns1123_subdomain(n) {
                r.reject(
                    format!("endpoints[{i}].nodeName"),
                    REASON_INVALID_NAME,
                    format!("invalid node name {n:?}: {SUBDOMAIN_RULE}"),
                );
                ok = false;
            }
        }
        if !ok {
            continue;
        }
        // Consumers use the first address only (the API allows exactly one).
        let Some(ip) = parse_ip(&ep.addresses[0]) else {
            continue;
        };
        let c = ep.conditions.clone().unwrap_or_default();
        let ready = c.ready.unwrap_or(true);
        let node_name = ep.node_name.as_deref().map(|n| match &last_node {
            Some(last) if **last == *n => last.clone(),
            _ => Arc::<str>::from(n),
        });
        last_node.clone_from(&node_name);
        parsed.endpoints.push(ParsedEndpoint {
            ip,
            node_name,
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
            zone_hints: ep
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect()),
        });
    }

    let mut names = BTreeSet::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let f = |what: &str| format!("ports[{i}].{what}");
        let name = p.name.clone().unwrap_or_default();
        let mut ok = true;
        if !name.is_empty() && !is_dns1123_label(&name) {
            r.reject(
                f("name"),
                REASON_INVALID_NAME,
                format!("invalid port name {name:?}: {LABEL_RULE}"),
            );
            ok = false;
        } else if !names.insert(name.clone()) {
            r.reject(
                f("name"),
                REASON_DUPLICATE_PORT_NAME,
                format!("port name {name:?} is used by more than one port"),
            );
            ok = false;
        }
        let protocol = match p.protocol.as_deref() {
            None | Some("") => Some(Protocol::Tcp),
            Some(s) => {
                let proto = Protocol::from_k8s(s);
                if proto.is_none() {
                    r.reject(
                        f("protocol"),
                        REASON_UNKNOWN_PROTOCOL,
                        format!("unknown protocol {s:?}: must be TCP, UDP or SCTP"),
                    );
                }
                proto
            }
        };
        // An absent port means "all ports" and is unusable for a proxy.
        let port = match p.port {
            None => None,
            Some(n) => {
                let port = port_in_range(n);
                if port.is_none() {
                    r.reject(
                        f("port"),
                        REASON_INVALID_PORT,
                        format!("port {n} out of range: must be 1-65535"),
                    );
                }
                port
            }
        };
        if let (true, Some(protocol), Some(port)) = (ok, protocol, port) {
            parsed.ports.push(ParsedSlicePort {
                name,
                protocol,
                port,
            });
        }
    }
    (Some(parsed), r.rejections)
}

// ---------------------------------------------------------------- Node

/// A checked Node: its name and the usable InternalIP/ExternalIP addresses.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedNode {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// `spec.podCIDRs` (or the older `spec.podCIDR`), valid ones.
    pub pod_cidrs: Vec<IpNet>,
    /// Not being deleted nor drained by the cluster autoscaler (KEP-3836).
    pub eligible: bool,
}

/// The taint the cluster autoscaler puts on a Node it is about to delete.
pub(crate) const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Checks a Node. A bad address is reported and left out; a bad name drops
/// the Node.
pub(crate) fn parse_node(node: &Node) -> (Option<ParsedNode>, Vec<Rejection>) {
    let mut r = check_meta("Node", &node.metadata, false, false);
    let name_ok = r.is_clean();
    let mut addresses = Vec::new();
    let list = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in list.into_iter().flatten().enumerate() {
        if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
            continue; // Hostname and DNS entries are not addresses.
        }
        match parse_ip(&a.address) {
            Some(ip) => {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
            None => r.reject(
                format!("status.addresses[{i}].address"),
                REASON_INVALID_IP,
                format!("invalid {} {:?}: must be an IP address", a.type_, a.address),
            ),
        }
    }
    let spec = node.spec.as_ref();
    let mut pod_cidrs = Vec::new();
    let listed: Vec<(String, &String)> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c))
            .collect(),
        _ => spec
            .and_then(|s| s.pod_cidr.as_ref())
            .map(|c| vec![("spec.podCIDR".to_string(), c)])
            .unwrap_or_default(),
    };
    for (field, c) in listed {
        match c.parse::<IpNet>() {
            Ok(net) => pod_cidrs.push(net),
            Err(_) => r.reject(
                field,
                REASON_INVALID_IP,
                format!("invalid pod CIDR {c:?}: must be a CIDR"),
            ),
        }
    }
    let draining = spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    let eligible = node.metadata.deletion_timestamp.is_none() && !draining;
    let parsed = name_ok.then(|| ParsedNode {
        name: r.name.clone(),
        addresses,
        labels: node.metadata.labels.clone().unwrap_or_default(),
        pod_cidrs,
        eligible,
    });
    (parsed, r.rejections)
}
