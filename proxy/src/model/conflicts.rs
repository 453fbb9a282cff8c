//! Two Services claiming one frontend: an externalIP equal to another
//! Service's ClusterIP or load-balancer IP (the CVE-2020-8554 class), two
//! manifests with the same ClusterIP, or one node port twice. Exactly one
//! Service keeps the frontend, decided here once for both dataplanes, so
//! neither can let the last writer win nor remove the winner's rules or map
//! entries when the loser goes away.
//!
//! The winner: the frontend kind the API server allocates beats the one a
//! user writes (ClusterIP, then load-balancer IP from status, then
//! externalIP); then the older Service (`creationTimestamp`); then
//! namespace/name. The loser keeps its other frontends (a port left without
//! a ClusterIP is dropped whole); the lost one is reported as a rejection
//! (reason `frontend_conflict`) naming the winner.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::types::{Protocol, Rejection, ServiceKey, ServicePort, ServicePortName};

pub(crate) const REASON_FRONTEND_CONFLICT: &str = "frontend_conflict";

/// What a frontend is, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ClusterIp,
    LoadBalancer,
    ExternalIp,
    NodePort,
}

impl Kind {
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            Kind::ClusterIp => ("ClusterIP", "spec.clusterIPs"),
            Kind::LoadBalancer => ("load-balancer IP", "status.loadBalancer.ingress"),
            Kind::ExternalIp => ("externalIP", "spec.externalIPs"),
            Kind::NodePort => ("node port", "spec.ports[].nodePort"),
        }
    }
}

/// A frontend as the dataplanes key it: address (none for a node port),
/// port, protocol.
type Frontend = (Option<IpAddr>, u16, Protocol);

#[derive(Debug, Clone)]
struct Claim {
    kind: Kind,
    created: Option<jiff::Timestamp>,
    port: ServicePortName,
}

impl Claim {
    /// Lower wins. A Service without a creation time (a manifest) counts as
    /// newer than any that has one.
    fn rank(&self) -> impl Ord + '_ {
        (
            self.kind,
            self.created.is_none(),
            self.created,
            &self.port.service,
            &self.port.port,
        )
    }
}

/// Removes every lost frontend from `services` and returns one rejection
/// per loss. `created` is each Service's creation time.
pub(crate) fn resolve(
    services: &mut BTreeMap<ServicePortName, ServicePort>,
    created: &BTreeMap<ServiceKey, Option<jiff::Timestamp>>,
) -> Vec<Rejection> {
    let mut claims: BTreeMap<Frontend, Vec<Claim>> = BTreeMap::new();
    for sp in services.values() {
        let created = created.get(&sp.name.service).copied().flatten();
        let proto = sp.name.protocol;
        let mut claim = |fe: Frontend, kind: Kind| {
            claims.entry(fe).or_default().push(Claim {
                kind,
                created,
                port: sp.name.clone(),
            })
        };
        for ip in &sp.cluster_ips {
            claim((Some(*ip), sp.port, proto), Kind::ClusterIp);
        }
        for ip in &sp.load_balancer_ips {
            claim((Some(*ip), sp.port, proto), Kind::LoadBalancer);
        }
        for ip in &sp.external_ips {
            claim((Some(*ip), sp.port, proto), Kind::ExternalIp);
        }
        if let Some(np) = sp.node_port {
            claim((None, np, proto), Kind::NodePort);
        }
    }
    let mut rejected = Vec::new();
    for (fe, mut list) in claims {
        // One Service port naming an address twice (its externalIP equal
        // to its own ClusterIP) is no conflict.
        let distinct = list
            .iter()
            .map(|c| &c.port)
            .collect::<std::collections::BTreeSet<_>>();
        if distinct.len() < 2 {
            continue;
        }
        list.sort_by(|a, b| a.rank().cmp(&b.rank()));
        let winner = list[0].clone();
        for loser in list.iter().skip(1).filter(|c| c.port != winner.port) {
            let Some(sp) = services.get_mut(&loser.port) else {
                continue;
            };
            match (fe.0, loser.kind) {
                (Some(ip), Kind::ClusterIp) => sp.cluster_ips.retain(|i| *i != ip),
                (Some(ip), Kind::LoadBalancer) => sp.load_balancer_ips.retain(|i| *i != ip),
                (Some(ip), Kind::ExternalIp) => sp.external_ips.retain(|i| *i != ip),
                _ => sp.node_port = None,
            }
            rejected.push(rejection(fe, loser, &winner));
        }
    }
    // A port whose every ClusterIP belongs to another Service is no
    // Service port at all: none of its frontends is programmed.
    services.retain(|_, sp| !sp.cluster_ips.is_empty());
    // Without external frontends left, there is no external traffic policy.
    for sp in services.values_mut() {
        if !sp.has_external_frontends() {
            sp.external_policy = super::types::TrafficPolicy::Cluster;
            sp.health_check_node_port = None;
        }
    }
    rejected
}

fn rejection(fe: Frontend, loser: &Claim, winner: &Claim) -> Rejection {
    let (what, field) = loser.kind.describe();
    let (winner_what, _) = winner.kind.describe();
    let frontend = match fe.0 {
        Some(IpAddr::V6(ip)) => format!("[{ip}]:{}/{}", fe.1, fe.2),
        Some(ip) => format!("{ip}:{}/{}", fe.1, fe.2),
        None => format!("{}/{}", fe.1, fe.2),
    };
    let why = if winner.kind != loser.kind {
        format!("a {winner_what} wins over an {what}")
    } else if winner.created != loser.created {
        "the older Service keeps it".to_string()
    } else {
        "the first by namespace/name keeps it".to_string()
    };
    Rejection {
        kind: "Service".into(),
        namespace: loser.port.service.namespace.clone(),
        name: loser.port.service.name.clone(),
        field: field.into(),
        reason: REASON_FRONTEND_CONFLICT.into(),
        message: format!(
            "{what} {frontend} of port {:?} is also the {winner_what} of Service {} ({why}): not programmed for this Service; use another address or port",
            loser.port.port, winner.port
        ),
        origin: None,
    }
}
