//! The normalized desired state: what every dataplane programs.
//!
//! Both dataplanes read the same `DesiredState`, so they cannot disagree about
//! semantics (which endpoints are eligible for which traffic). Types are
//! address-family neutral (`IpAddr`) so IPv6 can come later without a redesign.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Lower-case name as iptables spells it (`-p tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`); `None` for anything else.
    pub fn from_k8s(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one Service: the unit every dataplane programs
/// (kube-proxy's `ServicePortName`). `port` is the Service port's name,
/// empty for a single unnamed port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePortName {
    pub service: ServiceKey,
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// `ns/name:port` (kube-proxy's spelling), `ns/name` for an unnamed port.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// One backend of a Service port, after named target ports are resolved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// `nodeName` of the endpoint, when the EndpointSlice says (shared:
    /// a Service port holds each endpoint up to three times).
    #[serde(default, with = "shared_str")]
    pub node_name: Option<Arc<str>>,
    /// Runs on this node (node name equals ours).
    pub is_local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// Traffic policy for one direction of traffic (internal or external).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// Everything a dataplane needs to program one Service port, with the
/// backend decisions already made by the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    /// ClusterIPs (`spec.clusterIPs`, IPv4 ones used today).
    pub cluster_ips: Vec<IpAddr>,
    /// The Service port (`spec.ports[].port`).
    pub port: u16,
    /// `spec.ports[].nodePort` for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`; empty means every source is allowed.
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    /// `Some(timeout seconds)` for sessionAffinity ClientIP.
    pub session_affinity_seconds: Option<u32>,
    /// `spec.healthCheckNodePort` (only for externalTrafficPolicy Local LoadBalancers).
    pub health_check_node_port: Option<u16>,
    /// Every endpoint of the port (after merging slices and resolving ports),
    /// whatever its conditions, sorted. For status and metrics.
    pub all_endpoints: Vec<Endpoint>,
    /// Endpoints that receive traffic sent to the ClusterIP: ready ones (or
    /// serving+terminating ones when none is ready), restricted to local ones
    /// when internalTrafficPolicy is Local. Sorted.
    pub cluster_endpoints: Vec<Endpoint>,
    /// Endpoints that receive traffic sent to node ports, externalIPs and
    /// load-balancer IPs: the same choice, restricted to local ones when
    /// externalTrafficPolicy is Local. Sorted.
    pub external_endpoints: Vec<Endpoint>,
    /// Number of local endpoints that would receive external traffic; what the
    /// healthCheckNodePort reports.
    pub local_endpoint_count: usize,
}

impl ServicePort {
    /// The Service has external frontends (node port, externalIPs, LB IPs).
    pub fn has_external_frontends(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// What was wrong with an object: enough for a user to find and fix it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rejection {
    /// `Service`, `EndpointSlice` or `Node`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// JSON-path-like field, e.g. `spec.ports[1].port`.
    pub field: String,
    /// A short machine-friendly reason, used as a metrics label:
    /// `invalid_ip`, `invalid_port`, `duplicate_port_name`, `unknown_protocol`,
    /// `invalid_name`, `missing_field`, `invalid_value`.
    pub reason: String,
    /// Human-readable explanation.
    pub message: String,
    /// Where the object came from, when the source knows: for manifests
    /// `path/to/file.yaml, document 2`. Filled by sources, not by the model.
    pub origin: Option<String>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug-quote names: a rejected name may contain newlines or quotes.
        if let Some(origin) = &self.origin {
            write!(f, "{origin}: ")?;
        }
        write!(
            f,
            "{} {:?}/{:?}: {}: {}",
            self.kind, self.namespace, self.name, self.field, self.message
        )
    }
}

/// Node facts the model needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// This node's name (`--hostname-override` or hostname).
    pub name: String,
    /// Addresses from the Node object's status (InternalIP/ExternalIP), if known.
    pub addresses: Vec<IpAddr>,
    /// The Node's `spec.podCIDRs` (for `--detect-local-mode NodeCIDR`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<IpNet>,
    /// `false` when the Node is being deleted or carries the cluster
    /// autoscaler's `ToBeDeletedByClusterAutoscaler` taint: `/healthz` then
    /// answers 503 so load balancers drain the node (KEP-3836).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub eligible: bool,
}

impl Default for NodeInfo {
    fn default() -> Self {
        NodeInfo {
            name: String::new(),
            addresses: Vec::new(),
            pod_cidrs: Vec::new(),
            eligible: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The whole desired state of the dataplane, derived from objects by
/// [`crate::model::build`]. Ordered maps so rendering is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DesiredState {
    pub node: NodeInfo,
    /// Serialized as a list of `ServicePort`s (each carries its own name):
    /// JSON maps need string keys.
    /// Shared: a change set holds the same ports, not copies.
    #[serde(with = "services_as_list")]
    pub services: BTreeMap<ServicePortName, Arc<ServicePort>>,
    /// Objects the model refused, with why. Never blocks other Services.
    pub rejected: Vec<Rejection>,
}

/// What changed between two desired states: the old and the new version of
/// every Service port whose programmed state differs (`None`: absent). The
/// [`Tracker`](super::Tracker) yields one per sync; it is the only place
/// that decides what changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangeSet {
    ports: BTreeMap<ServicePortName, PortChange>,
}

/// One Service port's change; `old != new` always.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortChange {
    pub old: Option<Arc<ServicePort>>,
    pub new: Option<Arc<ServicePort>>,
}

impl PortChange {
    /// Only the endpoints changed (the frontends are the same).
    pub fn endpoints_only(&self) -> bool {
        let (Some(a), Some(b)) = (&self.old, &self.new) else {
            return false;
        };
        let mut a = ServicePort::clone(a);
        a.all_endpoints.clone_from(&b.all_endpoints);
        a.cluster_endpoints.clone_from(&b.cluster_endpoints);
        a.external_endpoints.clone_from(&b.external_endpoints);
        a.local_endpoint_count = b.local_endpoint_count;
        a == **b
    }
}

impl ChangeSet {
    /// Every Service port that differs between `old` and `new` (a
    /// from-scratch comparison, for tests and one-off callers).
    pub fn between(old: &DesiredState, new: &DesiredState) -> ChangeSet {
        let mut out = ChangeSet::default();
        for (name, sp) in &new.services {
            let before = old.services.get(name);
            if before != Some(sp) {
                out.insert(name.clone(), before.cloned(), Some(sp.clone()));
            }
        }
        for (name, sp) in &old.services {
            if !new.services.contains_key(name) {
                out.insert(name.clone(), Some(sp.clone()), None);
            }
        }
        out
    }

    /// Records a change; one with `old == new` is no change and is dropped.
    pub fn insert(
        &mut self,
        name: ServicePortName,
        old: Option<Arc<ServicePort>>,
        new: Option<Arc<ServicePort>>,
    ) {
        if old != new {
            self.ports.insert(name, PortChange { old, new });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn get(&self, name: &ServicePortName) -> Option<&PortChange> {
        self.ports.get(name)
    }

    /// Every change, by Service port name.
    pub fn iter(&self) -> impl Iterator<Item = (&ServicePortName, &PortChange)> {
        self.ports.iter()
    }

    /// Ports that are new.
    pub fn added(&self) -> impl Iterator<Item = &ServicePortName> {
        self.ports
            .iter()
            .filter(|(_, c)| c.old.is_none())
            .map(|(n, _)| n)
    }

    /// Ports that changed.
    pub fn updated(&self) -> impl Iterator<Item = &ServicePortName> {
        self.ports
            .iter()
            .filter(|(_, c)| c.old.is_some() && c.new.is_some())
            .map(|(n, _)| n)
    }

    /// Ports that are gone.
    pub fn removed(&self) -> impl Iterator<Item = &ServicePortName> {
        self.ports
            .iter()
            .filter(|(_, c)| c.new.is_none())
            .map(|(n, _)| n)
    }
}

/// (De)serializes the services map as a list so `DesiredState` is valid JSON.
mod services_as_list {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::{ServicePort, ServicePortName};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<ServicePortName, Arc<ServicePort>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.values().map(|p| &**p))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ServicePortName, Arc<ServicePort>>, D::Error> {
        let list = Vec::<ServicePort>::deserialize(d)?;
        Ok(list
            .into_iter()
            .map(|p| (p.name.clone(), Arc::new(p)))
            .collect())
    }
}

/// (De)serializes a shared string as a plain one.
mod shared_str {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(Arc::from))
    }
}
