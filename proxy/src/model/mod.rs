//! The pure core: Kubernetes objects in, a normalized [`DesiredState`] out:
//! from scratch ([`build`]) or one object at a time ([`Tracker`], with the
//! [`ChangeSet`] of each step). No I/O here.

mod build;
mod conflicts;
mod objects;
mod tracker;
mod types;
mod validate;

pub use objects::{Checked, Event, Kind, Object, ObjectKey, TRIGGER_TIME};
pub use tracker::Tracker;
pub use types::*;

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The objects a source has gathered: the model's whole input. Shared
/// (`Arc`) with the source's stores: a snapshot copies pointers, not objects.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
}

impl ClusterObjects {
    /// From owned objects (tests and one-off callers; sources share theirs).
    pub fn from_owned(
        services: Vec<Service>,
        endpoint_slices: Vec<EndpointSlice>,
        nodes: Vec<Node>,
    ) -> ClusterObjects {
        ClusterObjects {
            services: services.into_iter().map(Arc::new).collect(),
            endpoint_slices: endpoint_slices.into_iter().map(Arc::new).collect(),
            nodes: nodes.into_iter().map(Arc::new).collect(),
        }
    }
}

/// Settings that change how objects map to the desired state.
#[derive(Debug, Clone, Default)]
pub struct ModelConfig {
    /// This node's name: decides which endpoints are local and which Node
    /// object is ours.
    pub node_name: String,
}

/// Builds the desired state from objects. Invalid objects are left out and
/// listed in [`DesiredState::rejected`] (sorted); they never affect other
/// Services.
///
/// Follows kube-proxy: headless, ExternalName and Services labelled
/// `service.kubernetes.io/service-proxy-name` are skipped silently, as are
/// Services without an IPv4 cluster IP. A Service's EndpointSlices (label
/// `kubernetes.io/service-name`, same namespace) are merged; each Service
/// port takes the slice port with its name and protocol. Eligible endpoints
/// are the ready ones, or the serving+terminating ones when none is ready,
/// restricted to local ones where the traffic policy is Local. The result
/// does not depend on the order of the slices. If one Service appears twice,
/// the first copy is used and the second is rejected. When two Services
/// claim one frontend (address, port, protocol; or a node port), one keeps
/// it (see `conflicts`) and the other is reported with reason
/// `frontend_conflict`.
pub fn build(objects: &ClusterObjects, config: &ModelConfig) -> DesiredState {
    build::build(objects, config)
}

/// Validates one Service as the model would; an empty list means valid.
/// Any problem makes [`build`] leave the whole Service out. Services kproxy
/// never programs (ExternalName, or labelled for another proxy) only get
/// their name and namespace checked.
pub fn validate_service(svc: &Service) -> Vec<Rejection> {
    validate::parse_service(svc).1
}

/// Validates one EndpointSlice as the model would; an empty list means valid.
///
/// Slices kproxy ignores (no `kubernetes.io/service-name` label, IPv6 or FQDN
/// address type) are valid. A non-empty list does not always drop the whole
/// slice: a bad endpoint or port is left out and the rest is used.
pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Vec<Rejection> {
    validate::parse_slice(slice).1
}

/// Validates one Node as the model would; an empty list means valid.
/// A bad name drops the Node; a bad address is left out.
pub fn validate_node(node: &Node) -> Vec<Rejection> {
    validate::parse_node(node).1
}

/// How many Services of `objects` have an IPv4 ClusterIP and how many have
/// only IPv6 ones (headless and ExternalName Services are not counted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceFamilies {
    pub ipv4: usize,
    pub ipv6_only: usize,
    /// `namespace/name` of one IPv6-only Service, for messages.
    pub example: Option<String>,
}

pub(crate) fn service_families<'a>(
    services: impl Iterator<Item = &'a validate::ParsedService>,
) -> ServiceFamilies {
    let mut f = ServiceFamilies::default();
    for svc in services {
        if svc.type_ == validate::ServiceType::ExternalName {
            continue;
        }
        if svc.cluster_ips.iter().any(std::net::IpAddr::is_ipv4) {
            f.ipv4 += 1;
        } else if !svc.cluster_ips.is_empty() {
            f.ipv6_only += 1;
            if f.example.is_none() {
                f.example = Some(svc.key.to_string());
            }
        }
    }
    f
}

/// A Node's primary IPs, as kube-proxy picks them for `--nodeport-addresses
/// primary`: the first InternalIP of each family, else the first ExternalIP.
pub fn primary_node_ips(node: &Node) -> Vec<std::net::IpAddr> {
    let addrs: Vec<(String, std::net::IpAddr)> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| Some((a.type_.clone(), a.address.parse().ok()?)))
        .collect();
    let mut out = Vec::new();
    for v4 in [true, false] {
        let pick = |kind: &str| {
            addrs
                .iter()
                .find(|(t, ip)| t == kind && ip.is_ipv4() == v4)
                .map(|(_, ip)| *ip)
        };
        if let Some(ip) = pick("InternalIP").or_else(|| pick("ExternalIP")) {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
mod golden;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tracker_tests;
