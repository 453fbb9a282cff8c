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
pub(crate) enum Kind {
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
pub(crate) type Frontend = (Option<IpAddr>, u16, Protocol);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    pub kind: Kind,
    pub created: Option<jiff::Timestamp>,
    pub port: ServicePortName,
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

/// Every frontend `sp` claims, with how (`created`: its Service's creation time).
pub(crate) fn claims_of(
    sp: &ServicePort,
    created: Option<jiff::Timestamp>,
) -> Vec<(Frontend, Claim)> {
    let proto = sp.name.protocol;
    let claim = |kind| Claim {
        kind,
        created,
        port: sp.name.clone(),
    };
    let mut out = Vec::new();
    for ip in &sp.cluster_ips {
        out.push(((Some(*ip), sp.port, proto), claim(Kind::ClusterIp)));
    }
    for ip in &sp.load_balancer_ips {
        out.push(((Some(*ip), sp.port, proto), claim(Kind::LoadBalancer)));
    }
    for ip in &sp.external_ips {
        out.push(((Some(*ip), sp.port, proto), claim(Kind::ExternalIp)));
    }
    if let Some(np) = sp.node_port {
        out.push(((None, np, proto), claim(Kind::NodePort)));
    }
    out
}

/// The claim that keeps `fe`, when more than one Service port claims it
/// (`None`: no conflict). One Service port naming an address twice (its
/// externalIP equal to its own ClusterIP) is no conflict.
pub(crate) fn winner(claims: &[Claim]) -> Option<&Claim> {
    let first = &claims.first()?.port;
    if claims.iter().all(|c| &c.port == first) {
        return None;
    }
    claims.iter().min_by(|a, b| a.rank().cmp(&b.rank()))
}

/// Takes the lost frontend `fe` (claimed as `loser.kind`) away from `sp`.
pub(crate) fn take_away(sp: &mut ServicePort, fe: Frontend, kind: Kind) {
    match (fe.0, kind) {
        (Some(ip), Kind::ClusterIp) => sp.cluster_ips.retain(|i| *i != ip),
        (Some(ip), Kind::LoadBalancer) => sp.load_balancer_ips.retain(|i| *i != ip),
        (Some(ip), Kind::ExternalIp) => sp.external_ips.retain(|i| *i != ip),
        _ => sp.node_port = None,
    }
}

/// What is left of a Service port after its losses: `None` when every
/// ClusterIP belongs to another Service (none of its frontends is
/// programmed); without external frontends left, there is no external
/// traffic policy.
pub(crate) fn after_losses(mut sp: ServicePort) -> Option<ServicePort> {
    if sp.cluster_ips.is_empty() {
        return None;
    }
    if !sp.has_external_frontends() {
        sp.external_policy = super::types::TrafficPolicy::Cluster;
        sp.health_check_node_port = None;
    }
    Some(sp)
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
        for (fe, claim) in claims_of(sp, created) {
            claims.entry(fe).or_default().push(claim);
        }
    }
    let mut rejected = Vec::new();
    for (fe, list) in claims {
        let Some(winner) = winner(&list) else {
            continue;
        };
        for loser in list.iter().filter(|c| c.port != winner.port) {
            let Some(sp) = services.get_mut(&loser.port) else {
                continue;
            };
            take_away(sp, fe, loser.kind);
            rejected.push(rejection(fe, loser, winner));
        }
    }
    let all = std::mem::take(services);
    services.extend(
        all.into_iter()
            .filter_map(|(k, sp)| Some((k, after_losses(sp)?))),
    );
    rejected
}

pub(crate) fn rejection(fe: Frontend, loser: &Claim, winner: &Claim) -> Rejection {
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
