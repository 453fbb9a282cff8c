//! Service and EndpointSlice manifests for scenarios, written as JSON
//! documents (valid YAML) into the manifest directory kproxy watches.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// A Service port: name, protocol, port, targetPort (number or name), nodePort.
#[derive(Debug, Clone)]
pub struct Port {
    pub name: String,
    pub protocol: &'static str,
    pub port: u16,
    pub target: Value,
    pub node_port: Option<u16>,
}

pub fn tcp(name: &str, port: u16, target: u16) -> Port {
    Port {
        name: name.into(),
        protocol: "TCP",
        port,
        target: json!(target),
        node_port: None,
    }
}

pub fn udp(name: &str, port: u16, target: u16) -> Port {
    Port {
        protocol: "UDP",
        ..tcp(name, port, target)
    }
}

impl Port {
    pub fn node_port(mut self, port: u16) -> Self {
        self.node_port = Some(port);
        self
    }

    /// A named targetPort, resolved through the EndpointSlice's port names.
    pub fn target_name(mut self, name: &str) -> Self {
        self.target = json!(name);
        self
    }
}

/// A Service in namespace `default`.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub cluster_ip: String,
    pub type_: &'static str,
    pub ports: Vec<Port>,
    pub external_traffic_policy: Option<&'static str>,
    pub internal_traffic_policy: Option<&'static str>,
    pub health_check_node_port: Option<u16>,
    pub session_affinity_seconds: Option<u32>,
    pub external_ips: Vec<String>,
    pub lb_ips: Vec<String>,
    pub source_ranges: Vec<String>,
}

pub fn service(name: &str, cluster_ip: &str, ports: Vec<Port>) -> Service {
    let type_ = if ports.iter().any(|p| p.node_port.is_some()) {
        "NodePort"
    } else {
        "ClusterIP"
    };
    Service {
        name: name.into(),
        cluster_ip: cluster_ip.into(),
        type_,
        ports,
        external_traffic_policy: None,
        internal_traffic_policy: None,
        health_check_node_port: None,
        session_affinity_seconds: None,
        external_ips: Vec::new(),
        lb_ips: Vec::new(),
        source_ranges: Vec::new(),
    }
}

impl Service {
    pub fn etp_local(mut self) -> Self {
        self.external_traffic_policy = Some("Local");
        self
    }

    pub fn itp_local(mut self) -> Self {
        self.internal_traffic_policy = Some("Local");
        self
    }

    pub fn affinity(mut self, seconds: u32) -> Self {
        self.session_affinity_seconds = Some(seconds);
        self
    }

    /// A LoadBalancer with these ingress IPs (and, with `hcnp`, a healthCheckNodePort).
    pub fn load_balancer(mut self, ips: &[&str], hcnp: Option<u16>) -> Self {
        self.type_ = "LoadBalancer";
        self.lb_ips = ips.iter().map(|s| s.to_string()).collect();
        self.health_check_node_port = hcnp;
        self
    }

    pub fn external_ips(mut self, ips: &[&str]) -> Self {
        self.external_ips = ips.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn source_ranges(mut self, cidrs: &[&str]) -> Self {
        self.source_ranges = cidrs.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn to_json(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut v = json!({"name": p.name, "protocol": p.protocol, "port": p.port, "targetPort": p.target});
                if let Some(np) = p.node_port {
                    v["nodePort"] = json!(np);
                }
                v
            })
            .collect();
        let mut spec = json!({
            "type": self.type_,
            "clusterIP": self.cluster_ip,
            "clusterIPs": [self.cluster_ip],
            "selector": {"app": self.name},
            "ports": ports,
        });
        if let Some(p) = self.external_traffic_policy {
            spec["externalTrafficPolicy"] = json!(p);
        }
        if let Some(p) = self.internal_traffic_policy {
            spec["internalTrafficPolicy"] = json!(p);
        }
        if let Some(p) = self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(p);
        }
        if let Some(s) = self.session_affinity_seconds {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": s}});
        }
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(self.external_ips);
        }
        if !self.source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.source_ranges);
        }
        let mut svc = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": "default"},
            "spec": spec,
        });
        if !self.lb_ips.is_empty() {
            let ingress: Vec<Value> = self.lb_ips.iter().map(|ip| json!({"ip": ip})).collect();
            svc["status"] = json!({"loadBalancer": {"ingress": ingress}});
        }
        svc
    }
}

/// One endpoint of a slice.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub ip: String,
    pub node: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

pub fn ready(ip: &str, node: &str) -> Endpoint {
    Endpoint {
        ip: ip.into(),
        node: node.into(),
        ready: true,
        serving: true,
        terminating: false,
    }
}

pub fn terminating(ip: &str, node: &str) -> Endpoint {
    Endpoint {
        ready: false,
        serving: true,
        terminating: true,
        ..ready(ip, node)
    }
}

/// An EndpointSlice of Service `service` with `(port name, protocol, port)`s.
pub fn slice(
    name: &str,
    service: &str,
    ports: &[(&str, &str, u16)],
    endpoints: &[Endpoint],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "port": port}))
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": [e.ip],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "nodeName": e.node,
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// Writes documents to `dir/file` atomically (write + rename), so kproxy
/// never reads a half-written file.
pub fn write(dir: &Path, file: &str, docs: &[Value]) -> Result<()> {
    let text: String = docs
        .iter()
        .map(|d| format!("---\n{}\n", serde_json::to_string_pretty(d).expect("json")))
        .collect();
    write_raw(dir, file, &text)
}

/// Writes raw text (for malformed-input tests) atomically.
pub fn write_raw(dir: &Path, file: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(file)).with_context(|| format!("renaming to {file}"))
}

pub fn remove(dir: &Path, file: &str) -> Result<()> {
    std::fs::remove_file(dir.join(file)).with_context(|| format!("removing {file}"))
}
