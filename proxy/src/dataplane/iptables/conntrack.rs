//! Clearing stale UDP conntrack entries. UDP has no connection teardown, so
//! without this a client keeps hitting a removed endpoint (or a cached
//! REJECT) until the entry times out.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::process::Command;

use tracing::{debug, warn};

use crate::model::{DesiredState, Protocol, ServicePort, ServicePortName};

/// A UDP frontend: destination address (`None` = any, for node ports) and port.
type Frontend = (Option<IpAddr>, u16);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct UdpPort {
    frontends: Vec<Frontend>,
    endpoints: BTreeSet<(IpAddr, u16)>,
}

fn udp_port(sp: &ServicePort) -> UdpPort {
    let mut frontends: Vec<Frontend> = sp
        .cluster_ips
        .iter()
        .chain(&sp.external_ips)
        .chain(&sp.load_balancer_ips)
        .filter(|ip| ip.is_ipv4())
        .map(|ip| (Some(*ip), sp.port))
        .collect();
    if let Some(np) = sp.node_port {
        frontends.push((None, np));
    }
    let endpoints = sp
        .cluster_endpoints
        .iter()
        .chain(&sp.external_endpoints)
        .map(|e| (e.ip, e.port))
        .collect();
    UdpPort {
        frontends,
        endpoints,
    }
}

/// UDP Service ports as of the last successful sync.
#[derive(Debug, Default)]
pub struct UdpState {
    ports: HashMap<ServicePortName, UdpPort>,
}

impl UdpState {
    /// Records the new state and clears conntrack entries of every UDP
    /// frontend that lost an endpoint or got its first one.
    pub fn apply(&mut self, desired: &DesiredState) {
        let mut next = HashMap::new();
        let mut clear: BTreeSet<Frontend> = BTreeSet::new();
        for sp in desired.services.values() {
            if sp.name.protocol != Protocol::Udp {
                continue;
            }
            let new = udp_port(sp);
            match self.ports.get(&sp.name) {
                Some(old) => {
                    let lost = !old.endpoints.is_subset(&new.endpoints);
                    let first = old.endpoints.is_empty() && !new.endpoints.is_empty();
                    if lost || first {
                        clear.extend(old.frontends.iter().copied());
                        clear.extend(new.frontends.iter().copied());
                    }
                }
                None if !new.endpoints.is_empty() => clear.extend(new.frontends.iter().copied()),
                None => {}
            }
            next.insert(sp.name.clone(), new);
        }
        for (name, old) in &self.ports {
            if !next.contains_key(name) && !old.endpoints.is_empty() {
                clear.extend(old.frontends.iter().copied());
            }
        }
        self.ports = next;
        for f in clear {
            clear_frontend(f);
        }
    }
}

/// `conntrack -D` for one UDP frontend; "nothing to delete" is not an error.
fn clear_frontend((addr, port): Frontend) {
    let mut cmd = Command::new("conntrack");
    cmd.args(["-D", "-p", "udp"]);
    if let Some(addr) = addr {
        cmd.args(["--orig-dst", &addr.to_string()]);
    }
    cmd.args(["--orig-port-dst", &port.to_string()]);
    match cmd.output() {
        Ok(out) if out.status.success() => debug!(?addr, port, "cleared UDP conntrack entries"),
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // conntrack exits 1 when no entry matched.
            if !stderr.contains("0 flow entries") {
                warn!(?addr, port, error = %stderr.trim(), "conntrack -D failed");
            }
        }
        Err(e) => {
            warn!(?addr, port, error = %e, "cannot run conntrack; stale UDP entries stay until they time out")
        }
    }
}
