//! The nftables floor: the ruleset kube-proxy's nftables mode would write
//! for the same Services, as an `nft -f` script of `add` commands (the form
//! kube-proxy's transactions take).
//!
//! Its shape follows kube-proxy's nftables proxier (KEP-3866): one
//! `service-ips` verdict map (`ip daddr . meta l4proto . th dport`) and one
//! `service-nodeports` map dispatch to a chain per Service port, which
//! picks an endpoint chain with `numgen random mod N vmap`; each endpoint
//! chain DNATs to its endpoint; a `mark-for-masquerade` / `masquerading`
//! pair SNATs traffic from outside the cluster CIDR. Firewall, no-endpoint
//! and affinity maps are left out: none of the generated Services needs them.
//! Timing one `nft -f` of this into a fresh namespace is what applying the
//! same Services through nftables costs at least.

use std::fmt::Write as _;

use crate::manifests::SvcSpec;

const TABLE: &str = "ip kube-proxy";

/// kube-proxy prefixes its chain names with a hash of the Service port
/// (so names stay unique and short enough); any stable hash gives the shape.
fn hash8(text: &str) -> String {
    // FNV-1a, 32 bits.
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08X}")
}

fn service_chain(s: &SvcSpec) -> String {
    let id = format!("{}/{}/tcp/http", s.namespace, s.name);
    format!("service-{}-{id}", hash8(&id))
}

fn external_chain(s: &SvcSpec) -> String {
    let id = format!("{}/{}/tcp/http", s.namespace, s.name);
    format!("external-{}-{id}", hash8(&format!("external/{id}")))
}

fn endpoint_chain(s: &SvcSpec, ep: std::net::Ipv4Addr) -> String {
    let id = format!(
        "{}/{}/tcp/http__{ep}/{}",
        s.namespace, s.name, s.target_port
    );
    format!("endpoint-{}-{id}", hash8(&id))
}

/// The whole ruleset for `services`; `cluster_cidr` decides masquerading.
pub fn ruleset(services: &[SvcSpec], cluster_cidr: &str) -> String {
    let mut o = String::with_capacity(services.len() * 3000 + 4096);
    let t = TABLE;
    let _ = writeln!(o, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    for chain in ["mark-for-masquerade", "masquerading", "services"] {
        let _ = writeln!(o, "add chain {t} {chain}");
    }
    let _ = writeln!(
        o,
        "add chain {t} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}"
    );
    let _ = writeln!(
        o,
        "add chain {t} nat-output {{ type nat hook output priority -100 ; }}"
    );
    let _ = writeln!(
        o,
        "add chain {t} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}"
    );
    let _ = writeln!(
        o,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        o,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        o,
        "add rule {t} mark-for-masquerade mark set mark or 0x4000"
    );
    let _ = writeln!(o, "add rule {t} masquerading mark and 0x4000 == 0 return");
    let _ = writeln!(o, "add rule {t} masquerading mark set mark xor 0x4000");
    let _ = writeln!(o, "add rule {t} masquerading masquerade fully-random");
    let _ = writeln!(
        o,
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        o,
        "add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(o, "add rule {t} nat-prerouting jump services");
    let _ = writeln!(o, "add rule {t} nat-output jump services");
    let _ = writeln!(o, "add rule {t} nat-postrouting jump masquerading");

    for s in services {
        let svc = service_chain(s);
        let eps: Vec<String> = s.endpoints.iter().map(|&e| endpoint_chain(s, e)).collect();
        let _ = writeln!(o, "add chain {t} {svc}");
        for (ep, chain) in s.endpoints.iter().zip(&eps) {
            let _ = writeln!(o, "add chain {t} {chain}");
            let _ = writeln!(
                o,
                "add rule {t} {chain} ip saddr {ep} jump mark-for-masquerade"
            );
            let _ = writeln!(
                o,
                "add rule {t} {chain} meta l4proto tcp dnat to {ep}:{}",
                s.target_port
            );
        }
        let _ = writeln!(
            o,
            "add rule {t} {svc} ip daddr {} tcp dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
            s.cluster_ip, s.port
        );
        if !eps.is_empty() {
            let vmap: Vec<String> = eps
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{i} : goto {c}"))
                .collect();
            let _ = writeln!(
                o,
                "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
                eps.len(),
                vmap.join(" , ")
            );
        }
        let _ = writeln!(
            o,
            "add element {t} service-ips {{ {} . tcp . {} : goto {svc} }}",
            s.cluster_ip, s.port
        );
        if let Some(np) = s.node_port {
            let ext = external_chain(s);
            let _ = writeln!(o, "add chain {t} {ext}");
            let _ = writeln!(o, "add rule {t} {ext} jump mark-for-masquerade");
            let _ = writeln!(o, "add rule {t} {ext} goto {svc}");
            let _ = writeln!(
                o,
                "add element {t} service-nodeports {{ tcp . {np} : goto {ext} }}"
            );
        }
    }
    o
}

/// Chains and map elements of a ruleset (for the report: the size loaded).
pub fn size(ruleset: &str) -> (usize, usize) {
    let chains = ruleset
        .lines()
        .filter(|l| l.starts_with("add chain"))
        .count();
    let elements = ruleset
        .lines()
        .filter(|l| l.starts_with("add element"))
        .count();
    (chains, elements)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{probe_spec, spec};

    #[test]
    fn one_map_element_and_chain_per_service_and_endpoint() {
        let svcs: Vec<SvcSpec> = (0..20).map(spec).collect();
        let r = ruleset(&svcs, "10.128.0.0/9");
        let (chains, elements) = size(&r);
        // 6 fixed chains; per Service 1 + 10 endpoint chains; NodePorts
        // (Services 0 and 10) an external chain each.
        assert_eq!(chains, 6 + 20 * 11 + 2);
        assert_eq!(elements, 20 + 2);
        assert!(r.contains(
            "add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto service-"
        ));
        assert!(r.contains(
            "add element ip kube-proxy service-nodeports { tcp . 30000 : goto external-"
        ));
        assert!(r.contains("numgen random mod 10 vmap { 0 : goto endpoint-"));
        assert!(r.contains("meta l4proto tcp dnat to 10.128.0.1:8080"));
        // Maps are declared before any element refers to them.
        let map = r.find("add map ip kube-proxy service-ips").unwrap();
        assert!(map < r.find("add element").unwrap());
    }

    #[test]
    fn chain_names_are_unique_and_stable() {
        let a = probe_spec(
            "10.97.0.10".parse().unwrap(),
            "10.244.1.10".parse().unwrap(),
        );
        assert_eq!(service_chain(&a), service_chain(&a.clone()));
        let names: std::collections::BTreeSet<String> =
            (0..2000).map(|i| service_chain(&spec(i))).collect();
        assert_eq!(names.len(), 2000);
        assert!(service_chain(&a).ends_with("-bench/probe/tcp/http"));
    }
}
