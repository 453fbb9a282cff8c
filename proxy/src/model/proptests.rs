//! Property tests: arbitrary (often invalid) objects in, invariants out.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort as K8sPort,
    ServiceSpec, ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as K8sEndpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
    ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::*;

pub(super) const NODE: &str = "node-a";

fn pick(items: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(items).prop_map(str::to_string)
}

/// Mostly a valid value, sometimes a bad one: enough valid objects survive
/// validation for the build invariants to be exercised.
fn mostly(
    good: &'static [&'static str],
    bad: &'static [&'static str],
) -> impl Strategy<Value = String> {
    prop_oneof![19 => pick(good), 1 => pick(bad)]
}

fn meta(ns: Option<String>, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        namespace: ns,
        name: Some(name),
        labels: Some(labels),
        ..Default::default()
    }
}

fn namespace() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        8 => Just(Some("shop".to_string())),
        1 => Just(None),
        1 => mostly(&["default"], &["Bad NS"]).prop_map(Some),
    ]
}

fn svc_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just("web".to_string()),
        1 => Just("db".to_string()),
        1 => mostly(&["dns"], &["web\n-j ACCEPT", "q\"x"]),
    ]
}

fn port_number() -> impl Strategy<Value = i32> {
    prop_oneof![
        19 => proptest::sample::select(&[80, 443, 53, 8080, 30080][..]),
        1 => proptest::sample::select(&[-1, 0, 1, 65535, 65536][..]),
    ]
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        6 => Just(None),
        3 => mostly(&["TCP", "UDP", "SCTP", "UDP"], &["ICMP"]).prop_map(Some),
    ]
}

fn port_name() -> impl Strategy<Value = Option<String>> {
    option::of(mostly(&["", "http", "dns", "metrics"], &["Bad"]))
}

fn address() -> impl Strategy<Value = String> {
    mostly(
        &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"],
        &["10.0.0.300", "fd00::1", ""],
    )
}

/// `spec.ports`: usually distinct named ports or one unnamed port,
/// sometimes anything at all.
fn service_ports() -> impl Strategy<Value = Vec<K8sPort>> {
    let garbage = vec(
        (
            port_name(),
            protocol(),
            port_number(),
            option::of(port_number()),
        ),
        0..4,
    )
    .prop_map(|ports| {
        ports
            .into_iter()
            .map(|(name, protocol, port, node_port)| K8sPort {
                name,
                protocol,
                port,
                node_port,
                ..Default::default()
            })
            .collect()
    });
    let named = proptest::sample::subsequence(
        &[
            ("http", 80, 30080),
            ("dns", 53, 30053),
            ("metrics", 9090, 30090),
        ][..],
        1..=3,
    )
    .prop_flat_map(|ports| {
        let n = ports.len();
        (Just(ports), vec(pick(&["TCP", "TCP", "TCP", "UDP"]), n))
    })
    .prop_map(|(ports, protos)| {
        ports
            .into_iter()
            .zip(protos)
            .map(|((name, port, node_port), protocol)| K8sPort {
                name: Some(name.to_string()),
                protocol: Some(protocol),
                port,
                node_port: Some(node_port),
                ..Default::default()
            })
            .collect()
    });
    let single = (protocol(), port_number()).prop_map(|(protocol, port)| {
        vec![K8sPort {
            protocol,
            port,
            node_port: Some(30000),
            ..Default::default()
        }]
    });
    prop_oneof![4 => named, 4 => single, 1 => garbage]
}

pub(super) fn service() -> impl Strategy<Value = Service> {
    let ports = service_ports();
    (
        (namespace(), svc_name(), proptest::bool::weighted(0.05)),
        option::of(mostly(
            &[
                "ClusterIP",
                "NodePort",
                "NodePort",
                "LoadBalancer",
                "LoadBalancer",
                "ExternalName",
            ],
            &["Odd"],
        )),
        option::weighted(
            0.95,
            mostly(
                &[
                    "10.96.0.10",
                    "10.96.0.11",
                    "10.96.0.12",
                    "10.96.0.13",
                    "10.96.0.14",
                    "None",
                    "",
                    "fd00::10",
                ],
                &["10.96.0.999"],
            ),
        ),
        vec(mostly(&["198.51.100.1", "198.51.100.2"], &["nope"]), 0..2),
        option::weighted(0.8, mostly(&["Local", "Cluster", "Global"], &["Weird"])),
        option::of(mostly(&["Local", "Cluster"], &["Weird"])),
        (
            option::of(pick(&["ClientIP", "None"])),
            option::of(prop_oneof![19 => Just(60), 1 => Just(0), 1 => Just(86401)]),
        ),
        (
            vec(mostly(&["203.0.113.1", "203.0.113.2"], &["bad"]), 0..2),
            vec(mostly(&["10.0.0.0/8", " 192.168.0.0/16 "], &["x/99"]), 0..2),
        ),
        ports,
    )
        .prop_map(
            |(
                (ns, name, foreign),
                type_,
                cip,
                eips,
                etp,
                itp,
                (aff, timeout),
                (lb, ranges),
                ports,
            )| {
                let mut labels = BTreeMap::new();
                if foreign {
                    labels.insert(validate::LABEL_SERVICE_PROXY_NAME.to_string(), "x".into());
                }
                Service {
                    metadata: meta(ns, name, labels),
                    spec: Some(ServiceSpec {
                        type_,
                        cluster_ip: cip,
                        external_ips: Some(eips),
                        external_traffic_policy: etp,
                        internal_traffic_policy: itp,
                        health_check_node_port: Some(32000),
                        session_affinity: aff,
                        session_affinity_config: Some(SessionAffinityConfig {
                            client_ip: Some(ClientIPConfig {
                                timeout_seconds: timeout,
                            }),
                        }),
                        load_balancer_source_ranges: Some(ranges),
                        ports: Some(ports),
                        ..Default::default()
                    }),
                    status: Some(ServiceStatus {
                        load_balancer: Some(LoadBalancerStatus {
                            ingress: Some(
                                lb.into_iter()
                                    .map(|ip| LoadBalancerIngress {
                                        ip: Some(ip),
                                        ..Default::default()
                                    })
                                    .collect(),
                            ),
                        }),
                        ..Default::default()
                    }),
                }
            },
        )
}

fn endpoint() -> impl Strategy<Value = K8sEndpoint> {
    (
        prop_oneof![9 => vec(address(), 1..=1), 1 => vec(address(), 0..3)],
        option::weighted(0.9, mostly(&[NODE, "node-b"], &["bad node"])),
        (
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
        ),
        option::of(vec(pick(&["z1", "z2"]), 0..2)),
    )
        .prop_map(
            |(addresses, node_name, (ready, serving, terminating), zones)| K8sEndpoint {
                addresses,
                node_name,
                conditions: Some(EndpointConditions {
                    ready,
                    serving,
                    terminating,
                }),
                hints: zones.map(|z| EndpointHints {
                    for_zones: Some(z.into_iter().map(|name| ForZone { name }).collect()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
}

pub(super) fn endpoint_slice() -> impl Strategy<Value = EndpointSlice> {
    (
        namespace(),
        mostly(&["s1", "s2", "s3", "s4"], &["bad slice"]),
        prop_oneof![9 => svc_name().prop_map(Some), 1 => Just(None)],
        prop_oneof![
            8 => Just("IPv4".to_string()),
            1 => mostly(&["IPv6", "FQDN"], &["IPv5"]),
        ],
        slice_ports(),
        vec(endpoint(), 0..6),
    )
        .prop_map(|(ns, name, svc, address_type, ports, endpoints)| {
            let mut labels = BTreeMap::new();
            if let Some(svc) = svc {
                labels.insert(validate::LABEL_SERVICE_NAME.to_string(), svc);
            }
            EndpointSlice {
                metadata: meta(ns, name, labels),
                address_type,
                endpoints: Some(endpoints),
                ports: Some(ports),
            }
        })
}

/// Slice ports: usually ones that match the Service ports generated above
/// (same names, TCP or UDP), sometimes anything at all.
fn slice_ports() -> impl Strategy<Value = Vec<EndpointPort>> {
    let likely = proptest::sample::subsequence(
        &[("", 8080), ("http", 8080), ("dns", 5353), ("metrics", 9090)][..],
        1..=3,
    )
    .prop_flat_map(|ports| {
        let n = ports.len();
        (
            Just(ports),
            vec(
                prop_oneof![3 => Just(None), 1 => Just(Some("UDP".to_string()))],
                n,
            ),
        )
    })
    .prop_map(|(ports, protos)| {
        ports
            .into_iter()
            .zip(protos)
            .map(|((name, port), protocol)| EndpointPort {
                name: Some(name.to_string()),
                protocol,
                port: Some(port),
                ..Default::default()
            })
            .collect()
    });
    let garbage = vec(
        (
            port_name(),
            protocol(),
            prop_oneof![9 => port_number().prop_map(Some), 1 => Just(None)],
        ),
        0..3,
    )
    .prop_map(|ports| {
        ports
            .into_iter()
            .map(|(name, protocol, port)| EndpointPort {
                name,
                protocol,
                port,
                ..Default::default()
            })
            .collect()
    });
    prop_oneof![4 => likely, 1 => garbage]
}

pub(super) fn objects() -> impl Strategy<Value = ClusterObjects> {
    let random = (vec(service(), 0..5), vec(endpoint_slice(), 0..8)).prop_map(
        |(services, endpoint_slices)| ClusterObjects::from_owned(services, endpoint_slices, vec![]),
    );
    // One Service with a cluster IP and slices that belong to it, so the
    // endpoint rules get exercised often, not just validation.
    let focused = (service(), vec(endpoint_slice(), 1..6)).prop_map(|(mut svc, mut slices)| {
        svc.metadata.namespace = Some("shop".into());
        svc.metadata.name = Some("web".into());
        svc.metadata.labels = None;
        let spec = svc.spec.get_or_insert_with(Default::default);
        spec.cluster_ip = Some("10.96.0.10".into());
        if spec.type_.as_deref() == Some("ExternalName") {
            spec.type_ = None;
        }
        for s in &mut slices {
            s.metadata.namespace = Some("shop".into());
            s.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(validate::LABEL_SERVICE_NAME.to_string(), "web".into());
        }
        ClusterObjects::from_owned(vec![svc], slices, vec![])
    });
    prop_oneof![1 => random, 2 => focused]
}

pub(super) fn cfg() -> ModelConfig {
    ModelConfig {
        node_name: NODE.into(),
    }
}

fn is_sorted<T: Ord>(v: &[T]) -> bool {
    v.windows(2).all(|w| w[0] <= w[1])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn build_upholds_invariants(objects in objects()) {
        let state = build(&objects, &cfg());
        prop_assert!(is_sorted(&state.rejected));
        for (key, p) in &state.services {
            prop_assert_eq!(key, &p.name);
            prop_assert!(is_sorted(&p.all_endpoints));
            prop_assert!(is_sorted(&p.cluster_endpoints));
            prop_assert!(is_sorted(&p.external_endpoints));
            prop_assert!(!p.cluster_ips.is_empty());
            for e in p.cluster_endpoints.iter().chain(&p.external_endpoints) {
                prop_assert!(p.all_endpoints.contains(e), "{} not in all_endpoints", e);
                prop_assert!(e.ready || (e.serving && e.terminating));
            }
            // (ip, port) unique.
            let mut addrs: Vec<_> = p.all_endpoints.iter().map(|e| (e.ip, e.port)).collect();
            addrs.dedup();
            prop_assert_eq!(addrs.len(), p.all_endpoints.len());
            for e in &p.all_endpoints {
                prop_assert_eq!(e.is_local, e.node_name.as_deref() == Some(NODE));
            }
            if p.internal_policy == TrafficPolicy::Local {
                prop_assert!(p.cluster_endpoints.iter().all(|e| e.is_local));
            }
            if p.external_policy == TrafficPolicy::Local {
                prop_assert!(p.external_endpoints.iter().all(|e| e.is_local));
                prop_assert!(p.has_external_frontends());
            } else {
                prop_assert_eq!(p.health_check_node_port, None);
            }
            // A ready candidate exists: nothing terminating/not-ready chosen.
            let ready_local = p.all_endpoints.iter().any(|e| e.ready && e.is_local);
            let ready_any = p.all_endpoints.iter().any(|e| e.ready);
            let cluster_has_ready = match p.internal_policy {
                TrafficPolicy::Cluster => ready_any,
                TrafficPolicy::Local => ready_local,
            };
            if cluster_has_ready {
                prop_assert!(!p.cluster_endpoints.is_empty());
                prop_assert!(p.cluster_endpoints.iter().all(|e| e.ready));
            }
            let external_has_ready = match p.external_policy {
                TrafficPolicy::Cluster => ready_any,
                TrafficPolicy::Local => ready_local,
            };
            if external_has_ready {
                prop_assert!(p.external_endpoints.iter().all(|e| e.ready));
            }
            prop_assert_eq!(
                p.local_endpoint_count,
                p.all_endpoints.iter().filter(|e| e.ready && e.is_local).count()
            );
        }
        // What build rejects is what the validators report (plus duplicates).
        let mut validated: Vec<Rejection> = objects.services.iter().flat_map(|s| validate_service(s))
            .chain(objects.endpoint_slices.iter().flat_map(|s| validate_endpoint_slice(s)))
            .collect();
        validated.sort();
        validated.dedup();
        let from_build: Vec<_> = state.rejected.iter()
            .filter(|r| !r.message.contains("defined more than once"))
            // Conflicts are between objects, not a property of one.
            .filter(|r| r.reason != "frontend_conflict" && r.reason != "ipv6_unsupported")
            .cloned().collect();
        prop_assert_eq!(from_build, validated);
        for r in &state.rejected {
            prop_assert!(!r.message.contains('\n'), "raw newline in {:?}", r.message);
        }
    }

    #[test]
    fn build_ignores_slice_order(
        (objects, shuffled) in objects().prop_flat_map(|o| {
            let slices = o.endpoint_slices.clone();
            (Just(o), Just(slices).prop_shuffle())
        })
    ) {
        let a = build(&objects, &cfg());
        let b = build(&ClusterObjects { endpoint_slices: shuffled, ..objects.clone() }, &cfg());
        prop_assert_eq!(a, b);
    }

    #[test]
    fn diff_is_consistent(a in objects(), b in objects()) {
        let a = build(&a, &cfg());
        let b = build(&b, &cfg());
        prop_assert!(ChangeSet::between(&a, &a).is_empty());
        let c = ChangeSet::between(&a, &b);
        for (k, change) in c.iter() {
            prop_assert_eq!(change.old.as_ref(), a.services.get(k));
            prop_assert_eq!(change.new.as_ref(), b.services.get(k));
            prop_assert!(change.old != change.new);
        }
        for (k, v) in &b.services {
            prop_assert_eq!(c.get(k).is_some(), a.services.get(k) != Some(v));
        }
        for k in a.services.keys() {
            prop_assert_eq!(c.get(k).is_some(), a.services.get(k) != b.services.get(k));
        }
        let back = ChangeSet::between(&b, &a);
        prop_assert_eq!(back.len(), c.len());
        for (k, change) in back.iter() {
            prop_assert_eq!(&change.old, &c.get(k).unwrap().new);
        }
    }
}

/// Guards the generators: the invariants above mean little if almost no
/// generated Service ends up with endpoints.
#[test]
fn generators_reach_the_endpoint_rules() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut with_eps, mut local, mut terminating) = (0, 0, 0);
    for _ in 0..500 {
        let o = objects().new_tree(&mut runner).unwrap().current();
        let s = build(&o, &cfg());
        let ports = || s.services.values();
        with_eps += ports().any(|p| !p.cluster_endpoints.is_empty()) as usize;
        local += ports()
            .any(|p| p.external_policy == TrafficPolicy::Local && !p.external_endpoints.is_empty())
            as usize;
        terminating += ports().any(|p| p.cluster_endpoints.iter().any(|e| e.terminating)) as usize;
    }
    assert!(
        with_eps > 80 && local > 8 && terminating > 20,
        "with_eps={with_eps} local={local} terminating={terminating}"
    );
}
