//! Builders of desired states for the eBPF dataplane's tests.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::dataplane::DataplaneConfig;
use crate::model::{
    DesiredState, Endpoint, NodeInfo, Protocol, ServiceKey, ServicePort, ServicePortName,
    TrafficPolicy,
};

pub fn ep(ip: &str, port: u16, local: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port,
        node_name: Some(if local { "node1" } else { "node2" }.into()),
        is_local: local,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// A ClusterIP Service port whose endpoints all receive all traffic.
pub fn svc(
    ns: &str,
    name: &str,
    port_name: &str,
    proto: Protocol,
    vip: &str,
    port: u16,
    eps: Vec<Endpoint>,
) -> ServicePort {
    ServicePort {
        name: ServicePortName {
            service: ServiceKey::new(ns, name),
            port: port_name.to_string(),
            protocol: proto,
        },
        cluster_ips: vec![vip.parse().unwrap()],
        port,
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        session_affinity_seconds: None,
        health_check_node_port: None,
        all_endpoints: eps.clone(),
        cluster_endpoints: eps.clone(),
        external_endpoints: eps.clone(),
        local_endpoint_count: eps.iter().filter(|e| e.is_local).count(),
    }
}

pub fn state(ports: Vec<ServicePort>) -> DesiredState {
    DesiredState {
        node: NodeInfo {
            name: "node1".into(),
            ..NodeInfo::default()
        },
        services: ports
            .into_iter()
            .map(|p| (p.name.clone(), Arc::new(p)))
            .collect::<BTreeMap<_, _>>(),
        rejected: vec![],
    }
}

pub fn config() -> DataplaneConfig {
    DataplaneConfig {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        nodeport_addresses: vec![],
        masquerade_all: false,
        node_ips: vec!["192.168.1.10".parse().unwrap()],
        ..DataplaneConfig::default()
    }
}
