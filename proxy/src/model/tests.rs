//! Unit tests: every validation and build rule, good and bad input.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::*;

pub(super) fn svc(yaml: &str) -> Service {
    serde_yaml::from_str(yaml).expect("test Service YAML")
}

pub(super) fn slice(yaml: &str) -> EndpointSlice {
    serde_yaml::from_str(yaml).expect("test EndpointSlice YAML")
}

fn node(yaml: &str) -> Node {
    serde_yaml::from_str(yaml).expect("test Node YAML")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn reasons(r: &[Rejection]) -> Vec<(&str, &str)> {
    r.iter()
        .map(|r| (r.field.as_str(), r.reason.as_str()))
        .collect()
}

fn cfg() -> ModelConfig {
    ModelConfig {
        node_name: "node-a".into(),
    }
}

fn build_one(services: Vec<Service>, slices: Vec<EndpointSlice>) -> DesiredState {
    build(
        &ClusterObjects::from_owned(services, slices, vec![]),
        &cfg(),
    )
}

fn port_name(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        service: ServiceKey::new(ns, name),
        port: port.into(),
        protocol,
    }
}

fn web_svc() -> Service {
    svc(r#"
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
"#)
}

/// Slice for shop/web with endpoints `(ip, node, ready, serving, terminating)`.
fn web_slice(name: &str, port: i32, eps: &[(&str, &str, bool, bool, bool)]) -> EndpointSlice {
    let mut yaml = format!(
        "metadata:\n  name: {name}\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{{port: {port}}}]\nendpoints:\n"
    );
    for (a, n, r, s, t) in eps {
        yaml.push_str(&format!(
            "- addresses: [{a}]\n  nodeName: {n}\n  conditions: {{ready: {r}, serving: {s}, terminating: {t}}}\n"
        ));
    }
    slice(&yaml)
}

fn web_port(state: &DesiredState) -> &ServicePort {
    state
        .services
        .get(&port_name("shop", "web", "", Protocol::Tcp))
        .expect("shop/web port")
}

fn ips(eps: &[Endpoint]) -> Vec<String> {
    eps.iter().map(|e| e.to_string()).collect()
}

// ------------------------------------------------------------ Service validation

#[test]
fn valid_service_has_no_rejection() {
    assert!(validate_service(&web_svc()).is_empty());
}

#[test]
fn service_names_with_injection_are_rejected_and_quoted() {
    for bad in [
        "a b",
        "a\"b",
        "web\n-j ACCEPT",
        "-j ACCEPT",
        "Web",
        "web-",
        "a.b",
        &"a".repeat(64),
    ] {
        let mut s = web_svc();
        s.metadata.name = Some(bad.to_string());
        let r = validate_service(&s);
        assert_eq!(reasons(&r), [("metadata.name", "invalid_name")], "{bad:?}");
        assert!(
            r[0].message.contains(&format!("{bad:?}")),
            "{}",
            r[0].message
        );
        assert!(
            !r[0].message.contains('\n'),
            "message must not carry raw newlines"
        );
        assert!(!r[0].to_string().contains('\n'));
    }
    let mut s = web_svc();
    s.metadata.name = Some("a".repeat(63));
    assert!(validate_service(&s).is_empty());
}

#[test]
fn missing_name_and_bad_namespace() {
    let mut s = web_svc();
    s.metadata.name = None;
    s.metadata.namespace = Some("bad ns".into());
    let r = validate_service(&s);
    assert_eq!(
        reasons(&r),
        [
            ("metadata.name", "missing_field"),
            ("metadata.namespace", "invalid_name")
        ]
    );
    assert!(r[1].message.contains("\"bad ns\""));
}

#[test]
fn missing_namespace_means_default() {
    let mut s = web_svc();
    s.metadata.namespace = None;
    let state = build_one(vec![s], vec![]);
    assert!(state
        .services
        .contains_key(&port_name("default", "web", "", Protocol::Tcp)));
}

#[test]
fn invalid_ips_are_rejected() {
    let s = svc(r#"
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.300
  clusterIPs: [10.96.0.1, "nope"]
  externalIPs: [1.2.3.4, " 1.2.3.5", "1.2.3"]
  loadBalancerSourceRanges: [" 10.0.0.0/8 ", "10.0.0.0/33", "banana"]
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 5.6.7.8}, {hostname: lb.example.com}, {ip: "5.6.7"}]
"#);
    let r = validate_service(&s);
    assert_eq!(
        reasons(&r),
        [
            ("spec.clusterIP", "invalid_ip"),
            ("spec.clusterIPs[1]", "invalid_ip"),
            ("spec.externalIPs[1]", "invalid_ip"),
            ("spec.externalIPs[2]", "invalid_ip"),
            ("status.loadBalancer.ingress[2].ip", "invalid_ip"),
            ("spec.loadBalancerSourceRanges[1]", "invalid_ip"),
            ("spec.loadBalancerSourceRanges[2]", "invalid_ip"),
        ]
    );
    assert!(r
        .iter()
        .all(|r| r.kind == "Service" && r.namespace == "default"));
}

#[test]
fn leading_zero_ipv4_is_rejected() {
    let mut s = web_svc();
    s.spec.as_mut().unwrap().cluster_ip = Some("010.96.0.1".into());
    assert_eq!(
        reasons(&validate_service(&s)),
        [("spec.clusterIP", "invalid_ip")]
    );
}

#[test]
fn port_ranges() {
    let s = svc(r#"
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.1
  healthCheckNodePort: 70000
  ports:
  - {name: a, port: 0}
  - {name: b, port: 65536}
  - {name: c, port: 1, nodePort: 0}
  - {name: d, port: 2, nodePort: 65536}
  - {name: e, port: 3, targetPort: -1}
  - {name: f, port: 4, targetPort: 65536}
  - {name: g, port: 65535, nodePort: 65535, targetPort: 65535}
  - {name: h, port: -1}
  - {name: i, port: 5, targetPort: 0}
  - {name: j, port: 6, targetPort: ""}
"#);
    assert_eq!(
        reasons(&validate_service(&s)),
        [
            ("spec.healthCheckNodePort", "invalid_port"),
            ("spec.ports[0].port", "invalid_port"),
            ("spec.ports[1].port", "invalid_port"),
            ("spec.ports[2].nodePort", "invalid_port"),
            ("spec.ports[3].nodePort", "invalid_port"),
            ("spec.ports[4].targetPort", "invalid_port"),
            ("spec.ports[5].targetPort", "invalid_port"),
            ("spec.ports[7].port", "invalid_port"),
        ]
    );
}

#[test]
fn named_target_ports() {
    for (target, ok) in [
        ("http", true),
        ("web-80", true),
        ("a1", true),
        ("8080", false),
        ("-http", false),
        ("http-", false),
        ("ht--tp", false),
        ("HTTP", false),
        ("sixteen-letters1", false),
        ("fifteen-letters", true),
        ("a b", false),
    ] {
        let s = svc(&format!(
            "metadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80, targetPort: {target:?}}}]}}"
        ));
        let r = validate_service(&s);
        assert_eq!(r.is_empty(), ok, "{target:?}: {r:?}");
        if !ok {
            assert_eq!(reasons(&r), [("spec.ports[0].targetPort", "invalid_port")]);
        }
    }
}

#[test]
fn port_names_and_protocols() {
    let s = svc(r#"
metadata: {name: web}
spec:
  clusterIP: 10.96.0.1
  ports:
  - {name: http, port: 80}
  - {name: http, port: 81}
  - {port: 82}
  - {name: "Bad Name", port: 83}
  - {name: q, port: 84, protocol: ICMP}
  - {name: r, port: 85, protocol: tcp}
  - {name: s, port: 80, protocol: TCP}
  - {name: t, port: 80, protocol: UDP}
  - {name: u, port: 80, protocol: SCTP}
"#);
    assert_eq!(
        reasons(&validate_service(&s)),
        [
            ("spec.ports[1].name", "duplicate_port_name"),
            ("spec.ports[2].name", "missing_field"),
            ("spec.ports[3].name", "invalid_name"),
            ("spec.ports[4].protocol", "unknown_protocol"),
            ("spec.ports[5].protocol", "unknown_protocol"),
            ("spec.ports[6].port", "invalid_value"),
        ]
    );
}

#[test]
fn single_unnamed_port_is_fine() {
    let s = svc(
        "metadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 53, protocol: UDP}]}",
    );
    assert!(validate_service(&s).is_empty());
}

#[test]
fn affinity_policies_and_type() {
    let s = svc(r#"
metadata: {name: web}
spec:
  type: Magic
  clusterIP: 10.96.0.1
  sessionAffinity: Sticky
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}
  externalTrafficPolicy: Nearby
  internalTrafficPolicy: Global
  ports: [{port: 80}]
"#);
    assert_eq!(
        reasons(&validate_service(&s)),
        [
            ("spec.type", "invalid_value"),
            ("spec.externalTrafficPolicy", "invalid_value"),
            ("spec.internalTrafficPolicy", "invalid_value"),
            (
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                "invalid_value"
            ),
            ("spec.sessionAffinity", "invalid_value"),
        ]
    );
    for t in [0, -5] {
        let s = svc(&format!(
            "metadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.1, sessionAffinity: ClientIP, \
             sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}, ports: [{{port: 80}}]}}"
        ));
        assert_eq!(validate_service(&s).len(), 1);
    }
    // "Global" is the old spelling of Cluster for externalTrafficPolicy.
    let s = svc("metadata: {name: web}\nspec: {clusterIP: 10.96.0.1, externalTrafficPolicy: Global, ports: [{port: 80}]}");
    assert!(validate_service(&s).is_empty());
}

#[test]
fn ignored_services_only_get_metadata_checked() {
    let ext = svc("metadata: {name: ext}\nspec: {type: ExternalName, externalName: x.example.com, ports: [{port: 0}]}");
    assert!(validate_service(&ext).is_empty());
    let foreign = svc(r#"
metadata: {name: f, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: bogus, ports: [{port: 80}]}
"#);
    assert!(validate_service(&foreign).is_empty());
    let bad_name = svc("metadata: {name: 'ext ernal'}\nspec: {type: ExternalName}");
    assert_eq!(
        reasons(&validate_service(&bad_name)),
        [("metadata.name", "invalid_name")]
    );
}

#[test]
fn invalid_service_is_rejected_whole_and_does_not_affect_others() {
    let bad = svc(r#"
metadata: {name: bad, namespace: shop}
spec:
  clusterIP: 10.96.0.2
  ports: [{name: ok, port: 80}, {name: broken, port: 0}]
"#);
    let state = build_one(
        vec![bad, web_svc()],
        vec![web_slice(
            "web-1",
            8080,
            &[("10.0.0.1", "node-a", true, true, false)],
        )],
    );
    assert_eq!(state.services.len(), 1);
    assert!(state.services.keys().all(|k| k.service.name == "web"));
    assert_eq!(
        reasons(&state.rejected),
        [("spec.ports[1].port", "invalid_port")]
    );
    assert_eq!(state.rejected[0].name, "bad");
}

// ------------------------------------------------------------ EndpointSlice validation

#[test]
fn slice_bad_endpoints_and_ports_are_left_out() {
    let s = slice(
        r#"
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: http, port: 8081}
- {name: metrics, port: 0}
- {name: big, port: 65536}
- {name: icmp, port: 1, protocol: ICMP}
- {name: any}
endpoints:
- addresses: [10.0.0.1]
- addresses: ["10.0.0.300"]
- addresses: ["fd00::1"]
- addresses: []
- addresses: [10.0.0.5]
  nodeName: "node a"
"#,
    );
    let r = validate_endpoint_slice(&s);
    assert_eq!(
        reasons(&r),
        [
            ("endpoints[1].addresses[0]", "invalid_ip"),
            ("endpoints[2].addresses[0]", "invalid_ip"),
            ("endpoints[3].addresses", "missing_field"),
            ("endpoints[4].nodeName", "invalid_name"),
            ("ports[1].name", "duplicate_port_name"),
            ("ports[2].port", "invalid_port"),
            ("ports[3].port", "invalid_port"),
            ("ports[4].protocol", "unknown_protocol"),
        ]
    );
    assert!(r
        .iter()
        .all(|r| r.kind == "EndpointSlice" && r.name == "web-1"));

    // The rest of the slice is still used.
    let web = svc("metadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}");
    let state = build_one(vec![web], vec![s]);
    let p = &state.services[&port_name("shop", "web", "http", Protocol::Tcp)];
    assert_eq!(ips(&p.all_endpoints), ["10.0.0.1:8080"]);
    assert_eq!(state.rejected.len(), 8);
}

#[test]
fn ignored_slices_are_not_rejected() {
    let unlabelled =
        slice("metadata: {name: 'x y'}\naddressType: IPv4\nendpoints: [{addresses: [bogus]}]");
    assert!(validate_endpoint_slice(&unlabelled).is_empty());
    for family in ["IPv6", "FQDN"] {
        let s = slice(&format!(
            "metadata: {{name: s, labels: {{kubernetes.io/service-name: web}}}}\naddressType: {family}\n\
             endpoints: [{{addresses: [\"fd00::1\"]}}]"
        ));
        assert!(validate_endpoint_slice(&s).is_empty(), "{family}");
    }
}

#[test]
fn slice_with_bad_name_type_or_label_is_rejected_whole() {
    let s = slice(
        r#"
metadata: {name: "web\n-j ACCEPT", labels: {kubernetes.io/service-name: "Web"}}
addressType: IPv5
"#,
    );
    assert_eq!(
        reasons(&validate_endpoint_slice(&s)),
        [
            ("metadata.name", "invalid_name"),
            (
                "metadata.labels[\"kubernetes.io/service-name\"]",
                "invalid_name"
            ),
            ("addressType", "invalid_value"),
        ]
    );
    // A subdomain with dots is a fine slice name.
    let ok = slice("metadata: {name: web.abc-12, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4");
    assert!(validate_endpoint_slice(&ok).is_empty());
}

#[test]
fn ipv6_address_in_ipv4_slice_is_left_out() {
    let s = slice(
        r#"
metadata: {name: s, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00::1"]}, {addresses: [10.0.0.2]}]
"#,
    );
    let state = build_one(vec![web_svc()], vec![s]);
    assert_eq!(ips(&web_port(&state).all_endpoints), ["10.0.0.2:8080"]);
    assert_eq!(
        reasons(&state.rejected),
        [("endpoints[0].addresses[0]", "invalid_ip")]
    );
}

// ------------------------------------------------------------ Node validation

#[test]
fn node_validation_and_info() {
    let ours = node(
        r#"
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}
status:
  addresses:
  - {type: Hostname, address: node-a}
  - {type: InternalIP, address: 192.168.1.10}
  - {type: ExternalIP, address: 203.0.113.7}
  - {type: InternalIP, address: "192.168.1"}
"#,
    );
    assert_eq!(
        reasons(&validate_node(&ours)),
        [("status.addresses[3].address", "invalid_ip")]
    );
    let bad = node("metadata: {name: 'node a'}");
    assert_eq!(
        reasons(&validate_node(&bad)),
        [("metadata.name", "invalid_name")]
    );
    assert!(validate_node(&node("metadata: {name: node-b.example.com}")).is_empty());

    let state = build(
        &ClusterObjects::from_owned(
            vec![],
            vec![],
            vec![node("metadata: {name: other}\nstatus: {addresses: [{type: InternalIP, address: 1.1.1.1}]}"), ours, bad],
        ),
        &cfg(),
    );
    assert_eq!(state.node.name, "node-a");
    assert_eq!(
        state.node.addresses,
        [ip("192.168.1.10"), ip("203.0.113.7")]
    );
    assert_eq!(state.rejected.len(), 2);
}

#[test]
fn node_pod_cidrs_and_eligibility() {
    let build_one = |yaml: &str| {
        build(
            &ClusterObjects::from_owned(vec![], vec![], vec![node(yaml)]),
            &cfg(),
        )
    };
    let st = build_one("metadata: {name: node-a}\nspec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, 'fd00:1::/64']}");
    assert_eq!(
        st.node.pod_cidrs,
        vec![
            "10.244.1.0/24".parse::<ipnet::IpNet>().unwrap(),
            "fd00:1::/64".parse().unwrap()
        ]
    );
    assert!(st.node.eligible);
    // Older Nodes have only spec.podCIDR.
    let st = build_one("metadata: {name: node-a}\nspec: {podCIDR: 10.244.2.0/24}");
    assert_eq!(st.node.pod_cidrs.len(), 1);
    let st = build_one("metadata: {name: node-a}\nspec: {podCIDRs: [10.244.2.0/33]}");
    assert_eq!(reasons(&st.rejected), [("spec.podCIDRs[0]", "invalid_ip")]);
    // KEP-3836: being deleted, or drained by the cluster autoscaler.
    let st = build_one("metadata: {name: node-a, deletionTimestamp: '2024-01-01T00:00:00Z'}");
    assert!(!st.node.eligible);
    let st = build_one(
        "metadata: {name: node-a}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}]}",
    );
    assert!(!st.node.eligible);
    let st =
        build_one("metadata: {name: node-a}\nspec: {taints: [{key: other, effect: NoSchedule}]}");
    assert!(st.node.eligible);
    // Another node's state does not matter.
    let st = build_one("metadata: {name: node-b, deletionTimestamp: '2024-01-01T00:00:00Z'}");
    assert!(st.node.eligible);
}

#[test]
fn node_info_without_node_object() {
    let state = build(&ClusterObjects::default(), &cfg());
    assert_eq!(
        state.node,
        NodeInfo {
            name: "node-a".into(),
            ..NodeInfo::default()
        }
    );
    assert!(state.services.is_empty() && state.rejected.is_empty());
}

// ------------------------------------------------------------ build: frontends

#[test]
fn skipped_services_are_silent() {
    let services = vec![
        svc("metadata: {name: headless}\nspec: {clusterIP: None, ports: [{port: 80}]}"),
        svc("metadata: {name: ext}\nspec: {type: ExternalName, externalName: db.example.com}"),
        svc("metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: x}}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}"),
        svc("metadata: {name: v6}\nspec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10'], ports: [{port: 80}]}"),
        svc("metadata: {name: pending}\nspec: {ports: [{port: 80}]}"),
    ];
    let state = build_one(services, vec![]);
    assert!(state.services.is_empty(), "{:?}", state.services.keys());
    // Only the IPv6 one is reported: never dropped silently.
    assert_eq!(state.rejected.len(), 1, "{:?}", state.rejected);
    let r = &state.rejected[0];
    assert_eq!(
        (r.name.as_str(), r.reason.as_str()),
        ("v6", "ipv6_unsupported")
    );
    assert!(
        r.message.contains("fd00::10") && r.message.contains("IPv6-only"),
        "{}",
        r.message
    );
}

#[test]
fn dual_stack_services_report_their_ipv6_part() {
    let st = build_one(
        vec![svc("metadata: {name: ds}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.7, clusterIPs: [10.96.0.7, 'fd00::7'], externalIPs: ['2001:db8::9'], ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: '2001:db8::5'}]}}")],
        vec![],
    );
    assert_eq!(st.services.len(), 1, "the IPv4 part is programmed");
    assert_eq!(st.rejected.len(), 1);
    let m = &st.rejected[0].message;
    for part in [
        "ClusterIP fd00::7",
        "externalIP 2001:db8::9",
        "load-balancer IP 2001:db8::5",
        "IPv4 part",
    ] {
        assert!(m.contains(part), "{part}: {m}");
    }
    assert_eq!(st.rejected[0].field, "spec.clusterIPs");
}

#[test]
fn frontends_of_a_load_balancer() {
    let s = svc(r#"
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00::20"]
  externalIPs: [198.51.100.2, "2001:db8::2", 198.51.100.1]
  loadBalancerSourceRanges: [" 10.1.2.3/8", "2001:db8::/32"]
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: dns, port: 53, nodePort: 30053, protocol: UDP}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.9}, {ip: 203.0.113.10, ipMode: Proxy}, {ip: 203.0.113.8, ipMode: VIP}]
"#);
    let state = build_one(vec![s], vec![]);
    assert_eq!(state.services.len(), 2);
    let http = &state.services[&port_name("shop", "lb", "http", Protocol::Tcp)];
    assert_eq!(http.cluster_ips, [ip("10.96.0.20")]);
    assert_eq!(http.port, 80);
    assert_eq!(http.node_port, Some(30080));
    assert_eq!(http.external_ips, [ip("198.51.100.1"), ip("198.51.100.2")]);
    assert_eq!(
        http.load_balancer_ips,
        [ip("203.0.113.8"), ip("203.0.113.9")]
    );
    assert_eq!(
        http.load_balancer_source_ranges,
        [
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap()
        ] as [ipnet::IpNet; 2]
    );
    assert_eq!(http.session_affinity_seconds, Some(10800));
    assert_eq!(http.external_policy, TrafficPolicy::Cluster);
    assert_eq!(http.health_check_node_port, None);
    let dns = &state.services[&port_name("shop", "lb", "dns", Protocol::Udp)];
    assert_eq!((dns.port, dns.node_port), (53, Some(30053)));
}

#[test]
fn node_port_and_lb_fields_only_for_their_types() {
    let s = svc(r#"
metadata: {name: plain}
spec:
  clusterIP: 10.96.0.30
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports: [{port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.9}]}}
"#);
    let state = build_one(vec![s], vec![]);
    let p = state.services.values().next().unwrap();
    assert_eq!(p.node_port, None);
    assert!(p.load_balancer_ips.is_empty() && p.load_balancer_source_ranges.is_empty());
    assert!(!p.has_external_frontends());
}

#[test]
fn clusterips_fallback_and_affinity_timeout() {
    let s = svc(r#"
metadata: {name: web}
spec:
  clusterIP: 10.96.0.40
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 80}]
"#);
    let state = build_one(vec![s], vec![]);
    let p = state.services.values().next().unwrap();
    assert_eq!(p.cluster_ips, [ip("10.96.0.40")]);
    assert_eq!(p.session_affinity_seconds, Some(60));
}

#[test]
fn duplicate_service_keeps_the_first() {
    let mut second = web_svc();
    second.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.99".into());
    let state = build_one(vec![web_svc(), second], vec![]);
    assert_eq!(web_port(&state).cluster_ips, [ip("10.96.0.10")]);
    assert_eq!(
        reasons(&state.rejected),
        [("metadata.name", "invalid_value")]
    );
}

// ------------------------------------------------------------ build: endpoints

#[test]
fn slices_merge_and_ports_resolve_by_name_and_protocol() {
    let s = svc(r#"
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP}
"#);
    let a = slice(
        r#"
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: TCP}]
endpoints: [{addresses: [10.0.0.2]}, {addresses: [10.0.0.1]}]
"#,
    );
    let b = slice(
        r#"
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.0.0.3]}]
"#,
    );
    // Same Service name in another namespace: not ours.
    let other_ns = slice(
        r#"
metadata: {name: web-c, namespace: other, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.9.9]}]
"#,
    );
    let state = build_one(vec![s], vec![a, b, other_ns]);
    let http = &state.services[&port_name("shop", "web", "http", Protocol::Tcp)];
    assert_eq!(
        ips(&http.all_endpoints),
        ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
    );
    assert_eq!(http.cluster_endpoints, http.all_endpoints);
    let dns = &state.services[&port_name("shop", "web", "dns", Protocol::Udp)];
    assert_eq!(ips(&dns.all_endpoints), ["10.0.0.3:5353"]);
}

#[test]
fn unnamed_service_port_matches_unnamed_slice_port() {
    let a = slice(
        r#"
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: "", port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"#,
    );
    let b = slice(
        r#"
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 9090}]
endpoints: [{addresses: [10.0.0.2]}]
"#,
    );
    let state = build_one(vec![web_svc()], vec![a, b]);
    assert_eq!(ips(&web_port(&state).all_endpoints), ["10.0.0.1:8080"]);
}

#[test]
fn slice_port_absent_is_unusable() {
    let s = slice(
        r#"
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: ""}]
endpoints: [{addresses: [10.0.0.1]}]
"#,
    );
    assert!(validate_endpoint_slice(&s).is_empty());
    let state = build_one(vec![web_svc()], vec![s]);
    assert!(web_port(&state).all_endpoints.is_empty());
}

#[test]
fn condition_defaults() {
    let s = slice(
        r#"
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.0.0.1]
- addresses: [10.0.0.2]
  conditions: {ready: false}
- addresses: [10.0.0.3]
  conditions: {ready: false, terminating: true}
- addresses: [10.0.0.4]
  conditions: {serving: true, terminating: true, ready: false}
"#,
    );
    let state = build_one(vec![web_svc()], vec![s]);
    let all = &web_port(&state).all_endpoints;
    let conds: Vec<_> = all
        .iter()
        .map(|e| (e.ready, e.serving, e.terminating))
        .collect();
    assert_eq!(
        conds,
        [
            (true, true, false),
            (false, false, false),
            (false, false, true),
            (false, true, true)
        ]
    );
}

#[test]
fn duplicates_across_slices_prefer_the_ready_copy() {
    let a = web_slice("web-a", 8080, &[("10.0.0.1", "node-b", false, true, true)]);
    let b = web_slice("web-b", 8080, &[("10.0.0.1", "node-b", true, true, false)]);
    for slices in [vec![a.clone(), b.clone()], vec![b, a]] {
        let state = build_one(vec![web_svc()], slices);
        let p = web_port(&state);
        assert_eq!(p.all_endpoints.len(), 1);
        assert!(p.all_endpoints[0].ready);
    }
}

#[test]
fn ready_endpoints_win_over_terminating() {
    let s = web_slice(
        "web-a",
        8080,
        &[
            ("10.0.0.1", "node-b", true, true, false),
            ("10.0.0.2", "node-b", false, true, true),
            ("10.0.0.3", "node-b", false, false, false),
        ],
    );
    let state = build_one(vec![web_svc()], vec![s]);
    let p = web_port(&state);
    assert_eq!(ips(&p.cluster_endpoints), ["10.0.0.1:8080"]);
    assert_eq!(ips(&p.external_endpoints), ["10.0.0.1:8080"]);
    assert_eq!(p.all_endpoints.len(), 3);
}

#[test]
fn serving_terminating_used_when_none_ready() {
    let s = web_slice(
        "web-a",
        8080,
        &[
            ("10.0.0.2", "node-b", false, true, true),
            ("10.0.0.3", "node-b", false, false, true),
            ("10.0.0.4", "node-b", false, false, false),
            ("10.0.0.5", "node-b", false, true, false),
        ],
    );
    let state = build_one(vec![web_svc()], vec![s]);
    assert_eq!(ips(&web_port(&state).cluster_endpoints), ["10.0.0.2:8080"]);
}

#[test]
fn no_endpoints_gives_empty_lists() {
    let state = build_one(vec![web_svc()], vec![]);
    let p = web_port(&state);
    assert!(p.all_endpoints.is_empty() && p.cluster_endpoints.is_empty());
    assert_eq!(p.local_endpoint_count, 0);
}

fn local_svc(etp: &str, itp: &str, kind: &str) -> Service {
    svc(&format!(
        r#"
metadata: {{name: web, namespace: shop}}
spec:
  type: {kind}
  clusterIP: 10.96.0.10
  externalTrafficPolicy: {etp}
  internalTrafficPolicy: {itp}
  healthCheckNodePort: 32000
  ports: [{{port: 80, nodePort: 30080}}]
"#
    ))
}

fn mixed_slice() -> EndpointSlice {
    web_slice(
        "web-a",
        8080,
        &[
            ("10.0.0.1", "node-a", true, true, false),
            ("10.0.0.2", "node-b", true, true, false),
            ("10.0.0.3", "node-a", false, true, true),
            ("10.0.0.4", "node-a", false, false, false),
        ],
    )
}

#[test]
fn external_traffic_policy_local() {
    let state = build_one(
        vec![local_svc("Local", "Cluster", "LoadBalancer")],
        vec![mixed_slice()],
    );
    let p = web_port(&state);
    assert_eq!(p.external_policy, TrafficPolicy::Local);
    assert_eq!(p.internal_policy, TrafficPolicy::Cluster);
    assert_eq!(p.health_check_node_port, Some(32000));
    assert_eq!(
        ips(&p.cluster_endpoints),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
    assert_eq!(ips(&p.external_endpoints), ["10.0.0.1:8080"]);
    assert_eq!(p.local_endpoint_count, 1);
    assert!(p.all_endpoints[0].is_local && !p.all_endpoints[1].is_local);
    assert_eq!(p.all_endpoints[0].node_name.as_deref(), Some("node-a"));
}

#[test]
fn external_local_falls_back_to_local_terminating() {
    let s = web_slice(
        "web-a",
        8080,
        &[
            ("10.0.0.1", "node-a", false, true, true),
            ("10.0.0.2", "node-b", true, true, false),
        ],
    );
    let state = build_one(vec![local_svc("Local", "Cluster", "NodePort")], vec![s]);
    let p = web_port(&state);
    assert_eq!(ips(&p.external_endpoints), ["10.0.0.1:8080"]);
    assert_eq!(ips(&p.cluster_endpoints), ["10.0.0.2:8080"]);
    assert_eq!(p.local_endpoint_count, 0);
}

#[test]
fn external_local_without_external_frontends_is_cluster() {
    let state = build_one(
        vec![local_svc("Local", "Cluster", "ClusterIP")],
        vec![mixed_slice()],
    );
    let p = web_port(&state);
    assert_eq!(p.external_policy, TrafficPolicy::Cluster);
    assert_eq!(p.health_check_node_port, None);
    assert_eq!(p.external_endpoints, p.cluster_endpoints);
}

#[test]
fn external_local_with_external_ips_only() {
    let s = svc(r#"
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, externalIPs: [198.51.100.1], externalTrafficPolicy: Local, ports: [{port: 80}]}
"#);
    let state = build_one(vec![s], vec![mixed_slice()]);
    let p = web_port(&state);
    assert_eq!(p.external_policy, TrafficPolicy::Local);
    assert_eq!(ips(&p.external_endpoints), ["10.0.0.1:8080"]);
}

#[test]
fn internal_traffic_policy_local() {
    let state = build_one(
        vec![local_svc("Cluster", "Local", "NodePort")],
        vec![mixed_slice()],
    );
    let p = web_port(&state);
    assert_eq!(p.internal_policy, TrafficPolicy::Local);
    assert_eq!(p.external_policy, TrafficPolicy::Cluster);
    assert_eq!(ips(&p.cluster_endpoints), ["10.0.0.1:8080"]);
    assert_eq!(
        ips(&p.external_endpoints),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
}

#[test]
fn internal_local_without_local_endpoints_is_empty() {
    let s = web_slice("web-a", 8080, &[("10.0.0.2", "node-b", true, true, false)]);
    let state = build_one(vec![local_svc("Cluster", "Local", "ClusterIP")], vec![s]);
    assert!(web_port(&state).cluster_endpoints.is_empty());
}

#[test]
fn empty_node_name_makes_nothing_local() {
    let s = slice(
        r#"
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"#,
    );
    let state = build(
        &ClusterObjects::from_owned(vec![web_svc()], vec![s], vec![]),
        &ModelConfig::default(),
    );
    assert!(!web_port(&state).all_endpoints[0].is_local);
}

#[test]
fn topology_hints_narrow_to_our_zone() {
    let hinted = |zones: [&str; 3]| {
        slice(&format!(
            r#"
metadata: {{name: web-a, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [10.0.0.1], hints: {{forZones: [{{name: {}}}]}}}}
- {{addresses: [10.0.0.2], hints: {{forZones: [{{name: {}}}]}}}}
- {{addresses: [10.0.0.3], hints: {{forZones: [{{name: {}}}]}}}}
"#,
            zones[0], zones[1], zones[2]
        ))
    };
    let zone_node = node("metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}");
    let run = |s: EndpointSlice| {
        build(
            &ClusterObjects::from_owned(vec![web_svc()], vec![s], vec![zone_node.clone()]),
            &cfg(),
        )
    };
    let state = run(hinted(["z1", "z2", "z1"]));
    let p = web_port(&state);
    assert_eq!(
        ips(&p.cluster_endpoints),
        ["10.0.0.1:8080", "10.0.0.3:8080"]
    );
    assert_eq!(p.all_endpoints.len(), 3);
    // No endpoint for our zone: use them all.
    let state = run(hinted(["z2", "z2", "z3"]));
    assert_eq!(web_port(&state).cluster_endpoints.len(), 3);
    // Not every endpoint hinted: hints are ignored.
    let mut partial = hinted(["z1", "z2", "z2"]);
    partial.endpoints.as_mut().unwrap()[1].hints = None;
    let state = run(partial);
    assert_eq!(web_port(&state).cluster_endpoints.len(), 3);
}

// ------------------------------------------------------------ rejections and diff

#[test]
fn rejections_are_sorted() {
    let mut bad1 = web_svc();
    bad1.metadata.name = Some("zz bad".into());
    let mut bad2 = web_svc();
    bad2.metadata.name = Some("aa bad".into());
    let state = build_one(vec![bad1, bad2], vec![]);
    let names: Vec<_> = state.rejected.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["aa bad", "zz bad"]);
    assert!(state.rejected.iter().all(|r| r.origin.is_none()));
}

#[test]
fn diff_reports_added_updated_removed() {
    let old = build_one(
        vec![
            web_svc(),
            svc("metadata: {name: gone}\nspec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}"),
        ],
        vec![web_slice(
            "web-a",
            8080,
            &[("10.0.0.1", "node-b", true, true, false)],
        )],
    );
    let new = build_one(
        vec![
            web_svc(),
            svc("metadata: {name: fresh}\nspec: {clusterIP: 10.96.0.51, ports: [{port: 80}]}"),
        ],
        vec![web_slice(
            "web-a",
            8080,
            &[("10.0.0.2", "node-b", true, true, false)],
        )],
    );
    let c = ChangeSet::between(&old, &new);
    let names = |it: &mut dyn Iterator<Item = &ServicePortName>| it.cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&mut c.added()),
        [port_name("default", "fresh", "", Protocol::Tcp)]
    );
    assert_eq!(
        names(&mut c.updated()),
        [port_name("shop", "web", "", Protocol::Tcp)]
    );
    assert_eq!(
        names(&mut c.removed()),
        [port_name("default", "gone", "", Protocol::Tcp)]
    );
    let web = c.get(&port_name("shop", "web", "", Protocol::Tcp)).unwrap();
    assert!(web.endpoints_only());
    assert!(ChangeSet::between(&new, &new).is_empty());
    let back = ChangeSet::between(&new, &old);
    assert_eq!(
        (names(&mut back.added()), names(&mut back.removed())),
        (names(&mut c.removed()), names(&mut c.added()))
    );
}

#[test]
fn desired_state_round_trips_through_json() {
    let state = build_one(vec![web_svc()], vec![mixed_slice()]);
    let json = serde_json::to_string(&state).unwrap();
    let back: DesiredState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
}

#[test]
fn global_is_cluster_and_local_without_health_check_port() {
    let s = svc(r#"
metadata: {name: web, namespace: shop}
spec: {type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Global, ports: [{port: 80, nodePort: 30080}]}
"#);
    let state = build_one(vec![s], vec![mixed_slice()]);
    assert_eq!(web_port(&state).external_policy, TrafficPolicy::Cluster);
    assert_eq!(web_port(&state).external_endpoints.len(), 2);

    let s = svc(r#"
metadata: {name: web, namespace: shop}
spec: {type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}
"#);
    let state = build_one(vec![s], vec![mixed_slice()]);
    let p = web_port(&state);
    assert_eq!(p.external_policy, TrafficPolicy::Local);
    assert_eq!(p.health_check_node_port, None);
}

#[test]
fn sctp_ports_are_programmed() {
    let s = svc("metadata: {name: sig, namespace: shop}\nspec: {clusterIP: 10.96.0.60, ports: [{port: 3868, protocol: SCTP}]}");
    let e = slice(
        r#"
metadata: {name: sig-1, namespace: shop, labels: {kubernetes.io/service-name: sig}}
addressType: IPv4
ports: [{port: 3868, protocol: SCTP}]
endpoints: [{addresses: [10.0.0.7]}]
"#,
    );
    let state = build_one(vec![s], vec![e]);
    let p = &state.services[&port_name("shop", "sig", "", Protocol::Sctp)];
    assert_eq!(ips(&p.cluster_endpoints), ["10.0.0.7:3868"]);
}

#[test]
fn node_without_status_has_no_addresses() {
    let state = build(
        &ClusterObjects::from_owned(vec![], vec![], vec![node("metadata: {name: node-a}")]),
        &cfg(),
    );
    assert!(state.node.addresses.is_empty() && state.rejected.is_empty());
}

#[test]
fn rejection_display_quotes_names() {
    let mut s = web_svc();
    s.metadata.name = Some("a\"b\nc".into());
    let mut r = validate_service(&s).remove(0);
    r.origin = Some("svc.yaml, document 2".into());
    let shown = r.to_string();
    assert!(
        shown.starts_with("svc.yaml, document 2: Service \"shop\"/\"a\\\"b\\nc\": metadata.name: "),
        "{shown}"
    );
    assert!(!shown.contains('\n'));
}

// ------------------------------------------------------------ frontend conflicts

/// CVE-2020-8554: a Service naming another Service's ClusterIP as its
/// externalIP does not get it, whatever the order of the objects; the
/// winner is unchanged and the loser keeps its other frontends.
#[test]
fn external_ip_equal_to_another_cluster_ip_loses() {
    let victim = svc(
        "metadata: {name: db, namespace: prod, creationTimestamp: '2024-06-01T00:00:00Z'}\nspec: {clusterIP: 10.96.0.50, ports: [{name: sql, port: 5432}]}",
    );
    let thief = svc(
        "metadata: {name: thief, namespace: evil, creationTimestamp: '2020-01-01T00:00:00Z'}\nspec: {clusterIP: 10.96.0.99, externalIPs: [10.96.0.50, 198.51.100.7], ports: [{name: sql, port: 5432}]}",
    );
    for services in [vec![victim.clone(), thief.clone()], vec![thief, victim]] {
        let st = build_one(services, vec![]);
        let db = &st.services[&port_name("prod", "db", "sql", Protocol::Tcp)];
        assert_eq!(db.cluster_ips, [ip("10.96.0.50")]);
        let t = &st.services[&port_name("evil", "thief", "sql", Protocol::Tcp)];
        assert_eq!(
            t.external_ips,
            [ip("198.51.100.7")],
            "the other externalIP stays"
        );
        assert_eq!(t.cluster_ips, [ip("10.96.0.99")]);
        assert_eq!(st.rejected.len(), 1, "{:?}", st.rejected);
        let r = &st.rejected[0];
        assert_eq!(
            (
                r.namespace.as_str(),
                r.name.as_str(),
                r.reason.as_str(),
                r.field.as_str()
            ),
            ("evil", "thief", "frontend_conflict", "spec.externalIPs")
        );
        assert!(
            r.message.contains("prod/db:sql") && r.message.contains("10.96.0.50:5432/tcp"),
            "{}",
            r.message
        );
    }
}

/// Same kind of frontend twice: the older Service wins; without creation
/// times (manifests), the first by namespace/name. Different ports or
/// protocols on one address are no conflict.
#[test]
fn same_kind_conflicts_go_to_the_older_service() {
    let lb = |name: &str, created: &str, vip: u8, port: u16, proto: &str| {
        svc(&format!(
            "metadata: {{name: {name}{created}}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.{vip}, ports: [{{name: p, port: {port}, protocol: {proto}, nodePort: 3{port}}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 203.0.113.5}}]}}}}"
        ))
    };
    let st = build_one(
        vec![
            lb(
                "b-new",
                ", creationTimestamp: '2024-01-01T00:00:00Z'",
                1,
                80,
                "TCP",
            ),
            lb(
                "z-old",
                ", creationTimestamp: '2023-01-01T00:00:00Z'",
                2,
                80,
                "TCP",
            ),
            lb("c-udp", "", 3, 80, "UDP"),
            lb("d-other-port", "", 4, 81, "TCP"),
        ],
        vec![],
    );
    let get = |name: &str, proto| &st.services[&port_name("default", name, "p", proto)];
    assert_eq!(
        get("z-old", Protocol::Tcp).load_balancer_ips,
        [ip("203.0.113.5")]
    );
    assert_eq!(get("z-old", Protocol::Tcp).node_port, Some(380));
    let loser = get("b-new", Protocol::Tcp);
    assert!(loser.load_balancer_ips.is_empty());
    assert_eq!(
        loser.node_port, None,
        "the node port 380/TCP is z-old's too"
    );
    assert_eq!(
        loser.cluster_ips,
        [ip("10.96.0.1")],
        "its own ClusterIP stays"
    );
    assert_eq!(
        get("c-udp", Protocol::Udp).load_balancer_ips,
        [ip("203.0.113.5")]
    );
    assert_eq!(
        get("d-other-port", Protocol::Tcp).load_balancer_ips,
        [ip("203.0.113.5")]
    );
    let r: Vec<(&str, &str)> = st
        .rejected
        .iter()
        .map(|r| (r.name.as_str(), r.field.as_str()))
        .collect();
    assert_eq!(
        r,
        [
            ("b-new", "spec.ports[].nodePort"),
            ("b-new", "status.loadBalancer.ingress"),
        ]
    );
    assert!(
        st.rejected[1].message.contains("older Service"),
        "{}",
        st.rejected[1].message
    );

    // Manifests have no creation time: a before b. Two Services with one
    // ClusterIP: the loser's port is not programmed at all.
    let manifests = build_one(
        vec![lb("b", "", 7, 80, "TCP"), lb("a", "", 7, 80, "TCP")],
        vec![],
    );
    let a = &manifests.services[&port_name("default", "a", "p", Protocol::Tcp)];
    assert_eq!(
        (a.node_port, a.cluster_ips.as_slice()),
        (Some(380), &[ip("10.96.0.7")][..])
    );
    assert!(!manifests
        .services
        .contains_key(&port_name("default", "b", "p", Protocol::Tcp)));
    assert!(manifests
        .rejected
        .iter()
        .any(|r| r.name == "b" && r.field == "spec.clusterIPs"));
}

/// A Service naming its own ClusterIP as externalIP conflicts with no one.
#[test]
fn own_addresses_twice_are_no_conflict() {
    let st = build_one(
        vec![svc("metadata: {name: self}\nspec: {clusterIP: 10.96.0.5, externalIPs: [10.96.0.5], ports: [{port: 80}]}")],
        vec![],
    );
    assert!(st.rejected.is_empty(), "{:?}", st.rejected);
}
