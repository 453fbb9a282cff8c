//! Synthetic manifests at scale: N Services with 10 endpoints each,
//! written as Kubernetes YAML the way a user would (Service +
//! discovery.k8s.io/v1 EndpointSlice), split into files of 1000 Services.
//! [`spec`] describes the same Services for the bench's nftables floor.
//! Used by the bench (`kproxy-bench manifests`), the scale test of the
//! namespace suite and kproxy's criterion benchmark.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{ensure, Context, Result};

pub const ENDPOINTS_PER_SERVICE: usize = 10;
pub const NODE_NAME: &str = "node1";
/// Covers every generated endpoint (10.128.0.0 upwards) and the latency pods (10.244.1.0/24).
pub const CLUSTER_CIDR: &str = "10.128.0.0/9";
const SERVICES_PER_FILE: usize = 1000;

/// ClusterIP of generated Service `i`: 10.96.0.0/16, skipping .0.0.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32 + 1)
}

/// Address of endpoint `j` of Service `i`: 10.128.0.0 upwards (never reaches 10.244 for N <= 100k).
fn endpoint_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * ENDPOINTS_PER_SERVICE + j) as u32 + 1,
    )
}

/// NodePorts fit in 30000..=32766 (2,767 ports; 32767 is the sustained
/// phase's): the first 2,767 of every 10th Service are NodePorts, the rest
/// ClusterIPs (above 27,670 Services fewer than 10 % are NodePorts).
const NODE_PORTS: usize = 2767;
/// The NodePort of the sustained-connections Service.
pub const SUSTAIN_NODE_PORT: u16 = 32767;

/// One generated Service as both the YAML and the nftables floor see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SvcSpec {
    pub namespace: &'static str,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// Service port (TCP) and the endpoints' target port.
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<Ipv4Addr>,
}

/// Generated Service `i`.
pub fn spec(i: usize) -> SvcSpec {
    SvcSpec {
        namespace: "bench",
        name: format!("svc-{i}"),
        cluster_ip: cluster_ip(i),
        port: 80,
        target_port: 8080,
        node_port: (i.is_multiple_of(10) && i / 10 < NODE_PORTS).then(|| 30000 + (i / 10) as u16),
        endpoints: (0..ENDPOINTS_PER_SERVICE)
            .map(|j| endpoint_ip(i, j))
            .collect(),
    }
}

/// The probe Service of the datapath and endpoint-change measurements.
pub fn probe_spec(vip: Ipv4Addr, endpoint: Ipv4Addr) -> SvcSpec {
    SvcSpec {
        namespace: "bench",
        name: "probe".into(),
        cluster_ip: vip,
        port: 80,
        target_port: 8080,
        node_port: None,
        endpoints: vec![endpoint],
    }
}

/// Writes `services` Services into `dir` (see [`spec`]).
pub fn generate(dir: &Path, services: usize) -> Result<()> {
    ensure!(
        services < 65_000,
        "at most 64999 Services fit in 10.96.0.0/16 (asked for {services})"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut file_no = 0;
    let mut start = 0;
    while start < services {
        let end = (start + SERVICES_PER_FILE).min(services);
        let mut y = String::with_capacity((end - start) * 1600);
        for i in start..end {
            let s = spec(i);
            service(&mut y, &s);
            endpoint_slice(&mut y, &s.name, &s.endpoints);
        }
        let path = dir.join(format!("services-{file_no:03}.yaml"));
        std::fs::write(&path, y).with_context(|| format!("writing {}", path.display()))?;
        file_no += 1;
        start = end;
    }
    Ok(())
}

fn service(y: &mut String, s: &SvcSpec) {
    let _ = write!(
        y,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  type: {}\n  clusterIP: {}\n  clusterIPs: [\"{}\"]\n  ports:\n  - name: http\n    protocol: TCP\n    port: {}\n    targetPort: {}\n",
        s.name,
        s.namespace,
        if s.node_port.is_some() { "NodePort" } else { "ClusterIP" },
        s.cluster_ip,
        s.cluster_ip,
        s.port,
        s.target_port,
    );
    if let Some(np) = s.node_port {
        let _ = writeln!(y, "    nodePort: {np}");
    }
}

/// One EndpointSlice `<service>-bench` for Service `service` in namespace bench, port http 8080.
pub fn endpoint_slice(y: &mut String, service: &str, eps: &[Ipv4Addr]) {
    endpoint_slice_on(y, service, eps, NODE_NAME)
}

/// [`endpoint_slice`] with endpoints on node `node`.
pub fn endpoint_slice_on(y: &mut String, service: &str, eps: &[Ipv4Addr], node: &str) {
    let _ = write!(
        y,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-bench\n  namespace: bench\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n- name: http\n  protocol: TCP\n  port: 8080\nendpoints:\n"
    );
    for ip in eps {
        let _ = write!(
            y,
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: {node}\n"
        );
    }
}

/// The probe Service used by the endpoint-change measurement.
pub fn probe_service(vip: Ipv4Addr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: probe\n  namespace: bench\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [\"{vip}\"]\n  ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: 8080\n"
    )
}

/// The sustained phase's Service: NodePort [`SUSTAIN_NODE_PORT`]
/// (externalTrafficPolicy Cluster) whose one endpoint is on another node.
pub fn sustain_service(endpoint: Ipv4Addr) -> String {
    let mut y = String::new();
    service(
        &mut y,
        &SvcSpec {
            namespace: "bench",
            name: "sustain".into(),
            cluster_ip: Ipv4Addr::new(10, 97, 0, 11),
            port: 80,
            target_port: 8080,
            node_port: Some(SUSTAIN_NODE_PORT),
            endpoints: vec![endpoint],
        },
    );
    endpoint_slice_on(&mut y, "sustain", &[endpoint], "node2");
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_do_not_collide() {
        assert_eq!(cluster_ip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(cluster_ip(255), Ipv4Addr::new(10, 96, 1, 0));
        assert!(endpoint_ip(99_999, 9) < Ipv4Addr::new(10, 244, 0, 0));
    }

    #[test]
    fn node_ports_stay_unique_at_50k() {
        let ports: Vec<u16> = (0..50_000).filter_map(|i| spec(i).node_port).collect();
        assert_eq!(ports.len(), NODE_PORTS);
        let unique: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        assert!(ports.iter().all(|p| (30000..=32767).contains(p)));
    }

    #[test]
    fn generates_files() {
        let dir = std::env::temp_dir().join(format!("kproxy-bench-gen-{}", std::process::id()));
        generate(&dir, 1500).unwrap();
        let a = std::fs::read_to_string(dir.join("services-000.yaml")).unwrap();
        let b = std::fs::read_to_string(dir.join("services-001.yaml")).unwrap();
        assert_eq!(a.matches("kind: Service\n").count(), 1000);
        assert_eq!(b.matches("kind: EndpointSlice\n").count(), 500);
        assert!(a.contains("nodePort: 30000\n"));
        assert_eq!(a.matches("- addresses:").count(), 10_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
