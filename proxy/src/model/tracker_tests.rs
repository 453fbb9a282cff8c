//! The change tracker: it recomputes only what an event touches, and its
//! result always equals a from-scratch build over the same objects.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;

use super::proptests::{cfg, endpoint_slice, service, NODE};
use super::tests::{slice, svc};
use super::*;

fn web(i: usize, cluster_ip: &str, extra: &str) -> Service {
    svc(&format!(
        "metadata: {{name: web{i}, namespace: shop}}\nspec: {{clusterIP: {cluster_ip}, ports: [{{port: 80}}]{extra}}}"
    ))
}

fn web_slice(i: usize, ip: &str) -> EndpointSlice {
    slice(&format!(
        "metadata: {{name: web{i}-1, namespace: shop, labels: {{kubernetes.io/service-name: web{i}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: ['{ip}']}}]"
    ))
}

fn upsert_svc(s: Service) -> Event {
    Event::upsert(Object::Service(Arc::new(s)))
}

fn upsert_slice(s: EndpointSlice) -> Event {
    Event::upsert(Object::EndpointSlice(Arc::new(s)))
}

/// The tracker's state equals a build of its objects.
fn assert_matches_build(t: &Tracker) {
    let fresh = build(&t.objects(), &cfg());
    assert_eq!(t.state(), &fresh);
}

/// A first sync large enough for the Services' ports to be computed on
/// several threads (`PARALLEL_RAW_PORTS_MIN`) equals a build, conflicts
/// included (every 500th Service reuses another's ClusterIP).
#[test]
fn a_first_sync_of_thousands_of_services_equals_a_build() {
    let mut t = Tracker::new(cfg());
    let n = 3000;
    assert!(n > tracker::PARALLEL_RAW_PORTS_MIN);
    for i in 0..n {
        let j = if i % 500 == 499 { i - 1 } else { i };
        t.apply(upsert_svc(web(
            i,
            &format!("10.96.{}.{}", j / 250, j % 250 + 1),
            "",
        )));
        t.apply(upsert_slice(web_slice(
            i,
            &format!("10.244.{}.{}", i / 250, i % 250 + 1),
        )));
    }
    let first = t.take_changes();
    assert_eq!(t.recomputed(), n);
    assert_eq!(
        first.added().count(),
        n - 6,
        "6 Services lose their ClusterIP"
    );
    assert_matches_build(&t);
    // Each Service's ports stayed with it: deleting some of them removes
    // theirs, and only theirs.
    for i in (0..n).step_by(7) {
        t.apply(Event::Delete(ObjectKey {
            kind: Kind::Service,
            namespace: "shop".into(),
            name: format!("web{i}"),
        }));
    }
    t.take_changes();
    assert_matches_build(&t);
}

#[test]
fn one_changed_slice_recomputes_one_service() {
    let mut t = Tracker::new(cfg());
    for i in 0..200 {
        t.apply(upsert_svc(web(i, &format!("10.96.1.{i}"), "")));
        t.apply(upsert_slice(web_slice(i, &format!("10.244.1.{i}"))));
    }
    let first = t.take_changes();
    assert_eq!(first.len(), 200);
    assert_eq!(first.added().count(), 200);
    assert_eq!(t.recomputed(), 200);

    t.apply(upsert_slice(web_slice(7, "10.244.2.7")));
    let changes = t.take_changes();
    assert_eq!(t.recomputed(), 1, "only shop/web7 is recomputed");
    let (name, change) = changes.iter().next().expect("one change");
    assert_eq!(changes.len(), 1);
    assert_eq!(name.service, ServiceKey::new("shop", "web7"));
    let ip = |c: &Option<Arc<ServicePort>>| c.as_ref().unwrap().cluster_endpoints[0].ip.to_string();
    assert_eq!(
        (ip(&change.old), ip(&change.new)),
        ("10.244.1.7".into(), "10.244.2.7".into())
    );
    assert!(change.endpoints_only());
    assert_matches_build(&t);

    // The same object again, and an event for nothing: no work, no change.
    t.apply(upsert_slice(web_slice(7, "10.244.2.7")));
    t.apply(Event::Delete(ObjectKey {
        kind: Kind::EndpointSlice,
        namespace: "shop".into(),
        name: "nothing".into(),
    }));
    assert!(t.take_changes().is_empty());
    assert_eq!(t.recomputed(), 0);

    // Deleting the Service removes its port; its slice stays, unused.
    t.apply(Event::Delete(ObjectKey {
        kind: Kind::Service,
        namespace: "shop".into(),
        name: "web3".into(),
    }));
    let changes = t.take_changes();
    assert_eq!(changes.removed().count(), 1);
    assert_eq!(t.recomputed(), 1);
    assert_matches_build(&t);
}

/// Two Services claiming one address are decided together: a change to
/// either recomputes both, and the loser gets the frontend back when the
/// winner lets go.
#[test]
fn a_conflict_recomputes_the_claimants() {
    let mut t = Tracker::new(cfg());
    t.apply(upsert_svc(web(1, "10.96.0.1", "")));
    t.apply(upsert_svc(web(
        2,
        "10.96.0.2",
        ", externalIPs: [10.96.0.1]",
    )));
    for i in 3..50 {
        t.apply(upsert_svc(web(i, &format!("10.96.0.{i}"), "")));
    }
    t.take_changes();
    assert_matches_build(&t);
    assert!(t
        .state()
        .rejected
        .iter()
        .any(|r| r.reason == "frontend_conflict" && r.name == "web2"));

    // web1 moves away: web2 gets its externalIP.
    t.apply(upsert_svc(web(1, "10.96.0.100", "")));
    let changes = t.take_changes();
    assert_eq!(t.recomputed(), 2);
    assert_eq!(changes.len(), 2);
    let web2 = &t.state().services[&ServicePortName {
        service: ServiceKey::new("shop", "web2"),
        port: String::new(),
        protocol: Protocol::Tcp,
    }];
    assert_eq!(
        web2.external_ips,
        vec!["10.96.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(t.state().rejected.is_empty(), "{:#?}", t.state().rejected);
    assert_matches_build(&t);
}

#[test]
fn rejections_stay_with_their_object_and_origin() {
    let mut t = Tracker::new(cfg());
    let bad = svc("metadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}");
    t.apply(Event::Upsert(
        Object::Service(Arc::new(bad))
            .check()
            .with_origin("svc.yaml, document 1"),
    ));
    t.apply(Event::Problems(vec![Rejection {
        kind: String::new(),
        namespace: String::new(),
        name: String::new(),
        field: String::new(),
        reason: "parse_error".into(),
        message: "invalid YAML".into(),
        origin: Some("broken.yaml, document 1".into()),
    }]));
    assert!(t.take_changes().is_empty());
    let origins: Vec<_> = t
        .state()
        .rejected
        .iter()
        .map(|r| r.origin.clone().unwrap())
        .collect();
    assert_eq!(origins, ["broken.yaml, document 1", "svc.yaml, document 1"]);
    // Fixed: its rejection goes with the bad version.
    t.apply(upsert_svc(web(0, "10.96.0.9", "")));
    t.apply(Event::Problems(vec![]));
    t.apply(upsert_svc(svc("metadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}")));
    assert_eq!(t.take_changes().len(), 2);
    assert!(t.state().rejected.is_empty(), "{:#?}", t.state().rejected);
}

#[test]
fn our_nodes_zone_recomputes_every_service() {
    let mut t = Tracker::new(cfg());
    for i in 0..5 {
        t.apply(upsert_svc(web(i, &format!("10.96.1.{i}"), "")));
    }
    t.take_changes();
    let node =
        |zone: &str| Event::upsert(Object::Node(Arc::new(node(NODE, Some(zone), "192.0.2.1"))));
    t.apply(node("z1"));
    t.take_changes();
    assert_eq!(t.recomputed(), 5);
    assert_eq!(
        t.state().node.addresses,
        vec!["192.0.2.1".parse::<std::net::IpAddr>().unwrap()]
    );
    // Another Node, or ours with the same zone: no Service recomputed.
    t.apply(Event::upsert(Object::Node(Arc::new(node_b()))));
    t.apply(node("z1"));
    t.take_changes();
    assert_eq!(t.recomputed(), 0);
    assert_matches_build(&t);
}

fn node(name: &str, zone: Option<&str>, address: &str) -> Node {
    let mut labels = BTreeMap::new();
    if let Some(z) = zone {
        labels.insert("topology.kubernetes.io/zone".to_string(), z.to_string());
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some("10.244.0.0/24".into()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: address.into(),
            }]),
            ..Default::default()
        }),
    }
}

fn node_b() -> Node {
    node("node-b", Some("z2"), "192.0.2.2")
}

fn arb_node() -> impl Strategy<Value = Node> {
    (
        proptest::sample::select(&[NODE, NODE, "node-b", "Bad Node"][..]),
        proptest::option::of(proptest::sample::select(&["z1", "z2"][..])),
        proptest::sample::select(&["192.0.2.1", "192.0.2.2", "not-an-ip"][..]),
    )
        .prop_map(|(name, zone, addr)| node(name, zone, addr))
}

#[derive(Debug, Clone)]
enum Op {
    Upsert(Object),
    /// Deletes the n-th object held of this kind (if any).
    Delete(Kind, proptest::sample::Index),
    Take,
}

fn op() -> impl Strategy<Value = Op> {
    // Services named shop/web with a ClusterIP, as the slices' label
    // usually says, so endpoints reach the ports often.
    let web = service().prop_map(|mut s| {
        s.metadata.namespace = Some("shop".into());
        s.metadata.name = Some("web".into());
        s.metadata.labels = None;
        s
    });
    let shop_slice = endpoint_slice().prop_map(|mut s| {
        s.metadata.namespace = Some("shop".into());
        s
    });
    // Services that claim each other's frontends (ClusterIPs, externalIPs,
    // node ports from a few values), older or newer, so conflicts are won
    // and lost often.
    let claimant = (
        service(),
        proptest::sample::select(&["a", "b", "c"][..]),
        proptest::sample::select(&["10.96.0.10", "10.96.0.11"][..]),
        proptest::collection::vec(
            proptest::sample::select(&["10.96.0.10", "10.96.0.11", "198.51.100.1"][..]),
            0..2,
        ),
        proptest::option::of(proptest::sample::select(
            &["2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z"][..],
        )),
    )
        .prop_map(|(mut s, name, cip, eips, created)| {
            s.metadata.namespace = Some("shop".into());
            s.metadata.name = Some(name.into());
            s.metadata.labels = None;
            s.metadata.creation_timestamp = created
                .map(|t| k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t.parse().unwrap()));
            let spec = s.spec.get_or_insert_with(Default::default);
            spec.cluster_ip = Some(cip.into());
            spec.external_ips = Some(eips.into_iter().map(String::from).collect());
            if spec.type_.as_deref() == Some("ExternalName") {
                spec.type_ = None;
            }
            s
        });
    let kind = proptest::sample::select(&[Kind::Service, Kind::EndpointSlice, Kind::Node][..]);
    prop_oneof![
        3 => service().prop_map(|s| Op::Upsert(Object::Service(Arc::new(s)))),
        2 => web.prop_map(|s| Op::Upsert(Object::Service(Arc::new(s)))),
        3 => claimant.prop_map(|s| Op::Upsert(Object::Service(Arc::new(s)))),
        4 => shop_slice.prop_map(|s| Op::Upsert(Object::EndpointSlice(Arc::new(s)))),
        1 => arb_node().prop_map(|n| Op::Upsert(Object::Node(Arc::new(n)))),
        2 => (kind, any::<proptest::sample::Index>()).prop_map(|(k, i)| Op::Delete(k, i)),
        2 => Just(Op::Take),
    ]
}

/// The keys of the objects `t` holds, of one kind.
fn keys(t: &Tracker, kind: Kind) -> Vec<ObjectKey> {
    let o = t.objects();
    match kind {
        Kind::Service => o
            .services
            .iter()
            .map(|s| ObjectKey::of(kind, &s.metadata))
            .collect(),
        Kind::EndpointSlice => o
            .endpoint_slices
            .iter()
            .map(|s| ObjectKey::of(kind, &s.metadata))
            .collect(),
        Kind::Node => o
            .nodes
            .iter()
            .map(|n| ObjectKey::of(kind, &n.metadata))
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// After any sequence of events, the tracker's state equals a build
    /// from scratch over the objects it holds, and the changes it handed
    /// out are exactly the difference between the states at two takes.
    #[test]
    fn incremental_equals_from_scratch(ops in proptest::collection::vec(op(), 1..40)) {
        let mut t = Tracker::new(cfg());
        let mut before = t.state().clone();
        for op in ops.into_iter().chain([Op::Take]) {
            match op {
                Op::Upsert(o) => t.apply(Event::upsert(o)),
                Op::Delete(kind, i) => {
                    let keys = keys(&t, kind);
                    if !keys.is_empty() {
                        t.apply(Event::Delete(keys[i.index(keys.len())].clone()));
                    }
                }
                Op::Take => {
                    let changes = t.take_changes();
                    let fresh = build(&t.objects(), &cfg());
                    prop_assert_eq!(t.state(), &fresh);
                    prop_assert_eq!(&changes, &ChangeSet::between(&before, &fresh));
                    before = fresh;
                }
            }
        }
    }
}
