//! Pure translation of one Service port into map entries: frontend keys,
//! the backend list of each scope, source ranges. No I/O; unit tested.
//!
//! Semantics follow iptables mode (`iptables/render.rs`):
//! - ClusterIP: cluster endpoints; masquerade of sources outside
//!   `--cluster-cidr` (or the Node's pod CIDRs, or of packets that did not
//!   arrive on the pods' bridge / interfaces, per `--detect-local-mode`; or
//!   all with `--masquerade-all`) when the backend is on another node.
//! - externalIPs, LB IPs, node ports reached from outside: external
//!   endpoints; policy Cluster SNATs to the node address (remote backends),
//!   policy Local keeps the client address and drops when there is no local
//!   endpoint. The same addresses dialled by this node's own sockets use the
//!   cluster endpoints, as iptables mode's "LOCAL traffic -> SVC" rule does.
//! - loadBalancerSourceRanges apply to LB IPs only.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use proxy_common::*;

use crate::dataplane::{DataplaneConfig, DetectLocalMode};
use crate::model::{Endpoint, Protocol, ServicePort, TrafficPolicy};

/// An IPv4 address as the maps store it (network byte order in memory).
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip_from_key(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(k.to_ne_bytes())
}

pub fn port_key(port: u16) -> u16 {
    port.to_be()
}

pub fn port_from_key(k: u16) -> u16 {
    u16::from_be(k)
}

pub fn proto_key(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
        Protocol::Sctp => PROTO_SCTP,
    }
}

/// Which backend list a frontend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Set {
    Cluster,
    External,
}

/// One frontend entry to program; `svc_id` and `group` are filled by the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendPlan {
    pub key: FrontendKey,
    pub set: Set,
    pub flags: u8,
    pub kind: u8,
}

/// Everything one Service port needs in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    /// `ns/name:port`, stored in SVC_INFO for status.
    pub display: String,
    pub cluster: Vec<Backend>,
    /// `None` when the external list equals the cluster list (shared group).
    pub external: Option<Vec<Backend>>,
    pub frontends: Vec<FrontendPlan>,
    pub affinity_secs: u32,
    pub src_ranges: Vec<Ipv4Net>,
}

impl PortPlan {
    pub fn backends(&self, set: Set) -> &[Backend] {
        match (set, &self.external) {
            (Set::External, Some(ext)) => ext,
            _ => &self.cluster,
        }
    }
}

fn backends(eps: &[Endpoint]) -> Vec<Backend> {
    eps.iter()
        .filter_map(|e| match e.ip {
            IpAddr::V4(ip) => Some(Backend {
                ip: ip_key(ip),
                port: port_key(e.port),
                flags: if e.is_local { BE_LOCAL } else { 0 },
                _pad: 0,
            }),
            IpAddr::V6(_) => None,
        })
        .collect()
}

fn v4(ips: &[IpAddr]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    ips.iter().filter_map(|ip| match ip {
        IpAddr::V4(ip) => Some(*ip),
        IpAddr::V6(_) => None,
    })
}

pub fn plan(sp: &ServicePort, config: &DataplaneConfig) -> PortPlan {
    let proto = proto_key(sp.name.protocol);
    let cluster = backends(&sp.cluster_endpoints);
    let ext_list = backends(&sp.external_endpoints);
    let external = (ext_list != cluster).then_some(ext_list);

    let cluster_flags = if config.masquerade_all {
        FE_SNAT
    } else if matches!(
        config.detect_local,
        DetectLocalMode::BridgeInterface(_) | DetectLocalMode::InterfaceNamePrefix(_)
    ) {
        // Local: arrived on a device in LOCAL_IFS (kept by `local_ifs`).
        FE_SNAT_NONLOCAL_IF
    } else if config
        .cluster_cidrs
        .iter()
        .any(|c| matches!(c, IpNet::V4(_)))
    {
        FE_SNAT_NONCLUSTER
    } else {
        0
    };
    let ext_flags = match sp.external_policy {
        TrafficPolicy::Local => FE_LOCAL,
        TrafficPolicy::Cluster => FE_SNAT,
    };

    let mut frontends = Vec::new();
    let mut add = |ip: u32, port: u16, set: Set, flags: u8, kind: u8| {
        frontends.push(FrontendPlan {
            key: FrontendKey {
                ip,
                port: port_key(port),
                proto,
                scope: match set {
                    Set::Cluster => SCOPE_INTERNAL,
                    Set::External => SCOPE_EXTERNAL,
                },
            },
            set,
            flags,
            kind,
        });
    };
    for vip in v4(&sp.cluster_ips) {
        add(
            ip_key(vip),
            sp.port,
            Set::Cluster,
            cluster_flags,
            KIND_CLUSTER_IP,
        );
    }
    for ip in v4(&sp.external_ips) {
        add(ip_key(ip), sp.port, Set::Cluster, 0, KIND_EXTERNAL_IP);
        add(
            ip_key(ip),
            sp.port,
            Set::External,
            ext_flags,
            KIND_EXTERNAL_IP,
        );
    }
    let ranges: Vec<Ipv4Net> = sp
        .load_balancer_source_ranges
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(n.trunc()),
            IpNet::V6(_) => None,
        })
        .collect();
    for ip in v4(&sp.load_balancer_ips) {
        let range_flag = if ranges.is_empty() { 0 } else { FE_SRC_RANGES };
        add(ip_key(ip), sp.port, Set::Cluster, 0, KIND_LOAD_BALANCER);
        add(
            ip_key(ip),
            sp.port,
            Set::External,
            ext_flags | range_flag,
            KIND_LOAD_BALANCER,
        );
    }
    if let Some(np) = sp.node_port {
        add(0, np, Set::Cluster, 0, KIND_NODE_PORT);
        add(0, np, Set::External, ext_flags, KIND_NODE_PORT);
    }
    PortPlan {
        display: sp.name.to_string(),
        cluster,
        external,
        frontends,
        affinity_secs: sp.session_affinity_seconds.unwrap_or(0),
        src_ranges: if v4(&sp.load_balancer_ips).next().is_some() {
            ranges
        } else {
            Vec::new()
        },
    }
}

pub fn svc_info(display: &str) -> SvcInfo {
    let mut name = [0u8; SVC_NAME_LEN];
    let bytes = display.as_bytes();
    let n = bytes.len().min(SVC_NAME_LEN);
    name[..n].copy_from_slice(&bytes[..n]);
    SvcInfo {
        len: n as u32,
        name,
    }
}

pub fn svc_info_name(info: &SvcInfo) -> String {
    let n = (info.len as usize).min(SVC_NAME_LEN);
    String::from_utf8_lossy(&info.name[..n]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{config, ep, svc};
    use super::*;

    #[test]
    fn cluster_ip_uses_cluster_endpoints_and_masquerades_outside_sources() {
        let sp = svc(
            "default",
            "web",
            "http",
            Protocol::Tcp,
            "10.96.0.10",
            80,
            vec![ep("10.244.1.5", 8080, true), ep("10.244.2.6", 8080, false)],
        );
        let p = plan(&sp, &config());
        assert_eq!(p.display, "default/web:http");
        assert_eq!(p.cluster.len(), 2);
        assert_eq!(p.cluster[0].flags, BE_LOCAL);
        assert_eq!(p.cluster[1].port, 8080u16.to_be());
        assert!(p.external.is_none());
        assert_eq!(p.frontends.len(), 1);
        let fe = &p.frontends[0];
        assert_eq!(fe.key.ip, ip_key("10.96.0.10".parse().unwrap()));
        assert_eq!(fe.key.port, 80u16.to_be());
        assert_eq!(fe.key.scope, SCOPE_INTERNAL);
        assert_eq!(fe.flags, FE_SNAT_NONCLUSTER);
    }

    #[test]
    fn node_port_local_policy_gets_its_own_external_set() {
        let mut sp = svc(
            "default",
            "web",
            "",
            Protocol::Udp,
            "10.96.0.10",
            53,
            vec![ep("10.244.1.5", 53, true), ep("10.244.2.6", 53, false)],
        );
        sp.node_port = Some(30053);
        sp.external_policy = TrafficPolicy::Local;
        sp.external_endpoints = vec![ep("10.244.1.5", 53, true)];
        sp.load_balancer_ips = vec!["198.51.100.9".parse().unwrap()];
        sp.load_balancer_source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        let p = plan(&sp, &config());
        assert_eq!(p.external.as_ref().unwrap().len(), 1);
        let np: Vec<_> = p.frontends.iter().filter(|f| f.key.ip == 0).collect();
        assert_eq!(np.len(), 2);
        assert!(np
            .iter()
            .any(|f| f.set == Set::External && f.flags == FE_LOCAL));
        assert!(np.iter().any(|f| f.set == Set::Cluster && f.flags == 0));
        let lb_ext = p
            .frontends
            .iter()
            .find(|f| f.kind == KIND_LOAD_BALANCER && f.set == Set::External)
            .unwrap();
        assert_eq!(lb_ext.flags, FE_LOCAL | FE_SRC_RANGES);
        assert_eq!(
            p.src_ranges,
            vec!["192.0.2.0/24".parse::<Ipv4Net>().unwrap()]
        );
        assert_eq!(p.frontends[0].key.proto, PROTO_UDP);
    }

    /// A ClusterIP Service with one remote endpoint.
    fn remote_only() -> ServicePort {
        svc(
            "a",
            "b",
            "",
            Protocol::Tcp,
            "10.96.0.1",
            443,
            vec![ep("10.0.0.1", 6443, false)],
        )
    }

    #[test]
    fn masquerade_all_and_no_cluster_cidr() {
        let sp = remote_only();
        let mut c = config();
        c.masquerade_all = true;
        assert_eq!(plan(&sp, &c).frontends[0].flags, FE_SNAT);
        c.masquerade_all = false;
        c.cluster_cidrs.clear();
        assert_eq!(plan(&sp, &c).frontends[0].flags, 0);
    }

    #[test]
    fn interface_detect_local_modes_ask_for_the_arrival_device() {
        let mut sp = remote_only();
        sp.node_port = Some(30443);
        for mode in [
            DetectLocalMode::BridgeInterface("cbr0".into()),
            DetectLocalMode::InterfaceNamePrefix("veth".into()),
        ] {
            let mut c = config();
            c.detect_local = mode;
            let p = plan(&sp, &c);
            let cluster_ip = p
                .frontends
                .iter()
                .find(|f| f.kind == KIND_CLUSTER_IP)
                .unwrap();
            assert_eq!(cluster_ip.flags, FE_SNAT_NONLOCAL_IF);
            // Node ports do not depend on where the client is.
            assert!(p
                .frontends
                .iter()
                .filter(|f| f.kind == KIND_NODE_PORT)
                .all(|f| f.flags & FE_SNAT_NONLOCAL_IF == 0));
            c.masquerade_all = true;
            assert_eq!(plan(&sp, &c).frontends[0].flags, FE_SNAT);
        }
    }

    #[test]
    fn svc_info_round_trips_and_truncates() {
        assert_eq!(svc_info_name(&svc_info("ns/a:b")), "ns/a:b");
        let long = "x".repeat(300);
        assert_eq!(svc_info_name(&svc_info(&long)).len(), SVC_NAME_LEN);
    }
}
