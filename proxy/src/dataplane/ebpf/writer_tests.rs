//! The writer over in-memory tables: ids, refcounts, the order of map
//! operations, full maps and restarts, without root.

use proxy_common::maps as names;

use super::tables::memory::MemoryMaps;
use super::test_support::{config, ep, state, svc};
use super::writer::Writer;
use crate::model::{ChangeSet, DesiredState, Protocol, ServicePort};

fn web(eps: &[&str]) -> ServicePort {
    svc(
        "default",
        "web",
        "http",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        eps.iter().map(|ip| ep(ip, 8080, false)).collect(),
    )
}

fn api(eps: &[&str]) -> ServicePort {
    svc(
        "default",
        "api",
        "http",
        Protocol::Tcp,
        "10.96.0.11",
        80,
        eps.iter().map(|ip| ep(ip, 8080, false)).collect(),
    )
}

/// A node-port LoadBalancer with source ranges and affinity: every map.
fn lb() -> ServicePort {
    let mut sp = svc(
        "default",
        "lb",
        "",
        Protocol::Udp,
        "10.96.0.12",
        53,
        vec![ep("10.244.1.9", 5353, true)],
    );
    sp.node_port = Some(30053);
    sp.load_balancer_ips = vec!["192.0.2.7".parse().unwrap()];
    sp.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    sp.session_affinity_seconds = Some(60);
    sp
}

fn changed(old: &DesiredState, new: &DesiredState) -> ChangeSet {
    ChangeSet::between(old, new)
}

/// (map, op) pairs of a log, with empty operations left out.
fn ops(log: &[(&'static str, &'static str, usize)]) -> Vec<(&'static str, &'static str)> {
    log.iter()
        .filter(|(_, _, n)| *n > 0)
        .map(|(m, op, _)| (*m, *op))
        .collect()
}

/// A new port's writes: one batch per map, in the order that keeps
/// lookups atomic.
const SWITCH_ORDER: [(&str, &str); 4] = [
    (names::BACKENDS, "put"),
    (names::SLOTS, "put"),
    (names::SVC_INFO, "put"),
    (names::FRONTENDS, "put"),
];

fn sync(w: &mut Writer, old: &DesiredState, new: &DesiredState, full: bool) -> usize {
    let (counts, errors) = w
        .sync(new, &changed(old, new), &[], full, &config())
        .unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    counts.written
}

#[test]
fn a_new_port_writes_backends_then_slots_then_its_name_then_frontends() {
    let fake = MemoryMaps::default();
    let mut w = Writer::over(fake.tables(), None).unwrap();
    let empty = state(vec![]);
    let one = state(vec![web(&["10.244.2.1", "10.244.2.2"])]);
    sync(&mut w, &empty, &one, false);
    assert_eq!(
        ops(&fake.take_log()),
        SWITCH_ORDER,
        "one batch per map, in the order that keeps lookups atomic"
    );
    let (_, slots, backends, svc_names, _) = fake.lens();
    assert_eq!((slots, backends, svc_names), (2, 2, 1));
    // The first ids are 1, and the frontends point at a complete group.
    let fes = fake.frontends();
    assert!(fes
        .iter()
        .all(|(_, f)| f.svc_id == 1 && f.group == 1 && f.count == 2));
}

#[test]
fn an_endpoint_change_switches_then_frees_only_what_nobody_uses() {
    let fake = MemoryMaps::default();
    let mut w = Writer::over(fake.tables(), None).unwrap();
    let empty = state(vec![]);
    // 10.244.2.2 is a backend of both Services.
    let s1 = state(vec![
        web(&["10.244.2.1", "10.244.2.2"]),
        api(&["10.244.2.2"]),
    ]);
    sync(&mut w, &empty, &s1, false);
    let groups_before: Vec<u32> = fake.frontends().iter().map(|(_, f)| f.group).collect();
    fake.take_log();

    let s2 = state(vec![
        web(&["10.244.2.1", "10.244.2.3"]),
        api(&["10.244.2.2"]),
    ]);
    sync(&mut w, &s1, &s2, false);
    assert_eq!(
        ops(&fake.take_log()),
        [
            (names::BACKENDS, "put"),
            (names::SLOTS, "put"),
            (names::FRONTENDS, "put"),
            (names::SLOTS, "delete"),
        ],
        "new backend, new group, switch, then the old group; the shared backend stays"
    );
    let ips: Vec<u32> = fake.backends().iter().map(|(_, b)| b.ip).collect();
    assert_eq!(ips.len(), 3, "{ips:?}");
    // A new group id, never one used before.
    let web_ip = super::plan::ip_key("10.96.0.10".parse().unwrap());
    let web_group = fake
        .frontends()
        .iter()
        .find(|(k, _)| k.ip == web_ip)
        .map(|(_, f)| f.group)
        .unwrap();
    assert!(groups_before.iter().all(|g| *g < web_group));

    // Removing the other user of 10.244.2.2 frees it.
    let s3 = state(vec![web(&["10.244.2.1", "10.244.2.3"])]);
    sync(&mut w, &s2, &s3, false);
    assert_eq!(
        ops(&fake.take_log()),
        [
            (names::FRONTENDS, "delete"),
            (names::SVC_INFO, "delete"),
            (names::SLOTS, "delete"),
            (names::BACKENDS, "delete"),
        ]
    );
    assert_eq!(fake.lens(), (w.entry_counts().0, 2, 2, 1, 0));
}

#[test]
fn a_full_map_fails_one_port_leaves_nothing_behind_and_is_retried() {
    let fake = MemoryMaps::default();
    fake.set_capacity(names::SLOTS, 3);
    let mut w = Writer::over(fake.tables(), None).unwrap();
    let empty = state(vec![]);
    let s = state(vec![
        api(&["10.244.2.8", "10.244.2.9"]),
        web(&["10.244.2.1", "10.244.2.2"]),
    ]);
    let (_, errors) = w
        .sync(&s, &changed(&empty, &s), &[], false, &config())
        .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].service, "default/web:http");
    assert_eq!(errors[0].reason, "map_full");
    assert!(
        errors[0]
            .message
            .contains("SLOTS is full (3 entries); raise --bpf-backend-map-max"),
        "{}",
        errors[0].message
    );
    // api is programmed; web left no backend, slot or name behind.
    let (_, slots, backends, svc_names, _) = fake.lens();
    assert_eq!((slots, backends, svc_names), (2, 2, 1));

    // Room again: a sync retrying web programs it.
    fake.set_capacity(names::SLOTS, 100);
    let retry = [errors[0].port.clone()];
    let (_, errors) = w
        .sync(&s, &ChangeSet::default(), &retry, false, &config())
        .unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let (_, slots, backends, svc_names, _) = fake.lens();
    assert_eq!((slots, backends, svc_names), (4, 4, 2));
}

#[test]
fn a_restart_over_unchanged_maps_writes_nothing() {
    let fake = MemoryMaps::default();
    let s = state(vec![
        web(&["10.244.2.1", "10.244.2.2"]),
        api(&["10.244.2.2"]),
        lb(),
    ]);
    let mut first = Writer::over(fake.tables(), None).unwrap();
    assert!(sync(&mut first, &state(vec![]), &s, true) > 0);
    let before = (fake.frontends(), fake.slots(), fake.backends());
    drop(first);
    fake.take_log();

    // A new process adopts the maps: same ids, not one write or delete.
    let mut second = Writer::over(fake.tables(), None).unwrap();
    assert_eq!(sync(&mut second, &state(vec![]), &s, true), 0);
    assert_eq!(ops(&fake.take_log()), []);
    assert_eq!((fake.frontends(), fake.slots(), fake.backends()), before);
    // The periodic full sync over its own state writes nothing either.
    assert_eq!(sync(&mut second, &s, &s, true), 0);
    assert_eq!(ops(&fake.take_log()), []);
}

#[test]
fn lookups_never_see_a_frontend_without_its_backends() {
    // The fake checks after every single map operation that each
    // frontend's slots and backends exist.
    let fake = MemoryMaps::default();
    let mut w = Writer::over(fake.tables(), None).unwrap();
    let steps = [
        state(vec![web(&["10.244.2.1"]), lb()]),
        state(vec![web(&["10.244.2.1", "10.244.2.2"]), lb()]),
        state(vec![web(&["10.244.2.3"])]),
        state(vec![web(&[]), api(&["10.244.2.3"])]),
        state(vec![api(&["10.244.2.4", "10.244.2.3"])]),
        state(vec![]),
    ];
    let mut old = state(vec![]);
    for new in steps {
        sync(&mut w, &old, &new, false);
        old = new;
    }
    assert!(fake.take_log().len() > 10);
    assert_eq!(fake.violations(), Vec::<String>::new());
    assert_eq!(
        fake.lens(),
        (0, 0, 0, 0, 0),
        "nothing left after the last Service"
    );
}

#[test]
fn the_fake_sees_each_way_a_lookup_can_break() {
    use proxy_common::{Backend, Frontend, FrontendKey, SlotKey};
    let fake = MemoryMaps::default();
    let mut t = fake.tables();
    let key = FrontendKey {
        ip: 1,
        port: 80,
        proto: 6,
        scope: 0,
    };
    let fe = Frontend {
        group: 1,
        count: 1,
        svc_id: 1,
        affinity_secs: 0,
        flags: 0,
        kind: 0,
        _pad: [0; 2],
    };
    let slot = SlotKey { group: 1, slot: 0 };
    let backend = Backend {
        ip: 2,
        port: 8080,
        flags: 0,
        _pad: 0,
    };
    // A frontend before its slot.
    t.frontends.put(&[(key, fe)]).unwrap();
    assert_eq!(fake.violations().len(), 1, "{:?}", fake.violations());
    // A slot before its backend.
    t.slots.put(&[(slot, 7)]).unwrap();
    assert_eq!(fake.violations().len(), 2, "{:?}", fake.violations());
    t.backends.put(&[(7, backend)]).unwrap();
    t.slots.put(&[(slot, 7)]).unwrap();
    t.frontends.put(&[(key, fe)]).unwrap();
    assert_eq!(fake.violations().len(), 2, "a complete group is fine");
    // A slot deleted while a frontend counts it.
    t.slots.delete(&[slot]).unwrap();
    assert_eq!(fake.violations().len(), 3, "{:?}", fake.violations());
    t.slots.put(&[(slot, 7)]).unwrap();
    // A backend deleted while a slot points at it.
    t.backends.delete(&[7]).unwrap();
    assert_eq!(fake.violations().len(), 4, "{:?}", fake.violations());
}

#[test]
fn the_fakes_checks_cost_what_the_operations_wrote() {
    // `kproxy render --proxy-mode ebpf` runs the writer over the fake: a
    // check of every entry after every operation made 10,000 Services a
    // quadratic affair (over 11 minutes).
    let ports: Vec<ServicePort> = (0..2000u32)
        .map(|i| {
            let eps = (0..10u32)
                .map(|j| {
                    let n = i * 10 + j;
                    ep(&format!("10.128.{}.{}", n / 256, n % 256), 8080, false)
                })
                .collect();
            let vip = std::net::Ipv4Addr::from(0x0a60_0001 + i).to_string();
            svc(
                "bench",
                &format!("svc-{i}"),
                "",
                Protocol::Tcp,
                &vip,
                80,
                eps,
            )
        })
        .collect();
    let fake = MemoryMaps::default();
    let mut w = Writer::over(fake.tables(), None).unwrap();
    sync(&mut w, &state(vec![]), &state(ports), true);
    let (frontends, slots, backends, _, _) = fake.lens();
    assert_eq!((frontends, slots, backends), (2000, 20_000, 20_000));
    assert_eq!(fake.violations(), Vec::<String>::new());
    assert!(
        fake.checked() <= 2 * (frontends + slots),
        "the checks looked at {} entries for {} written",
        fake.checked(),
        frontends + slots + backends
    );
}

#[test]
fn a_full_frontend_map_fails_only_the_frontends_that_did_not_fit() {
    use crate::dataplane::{FrontendKind, FrontendRef};
    let fake = MemoryMaps::default();
    // lb has 5 records: ClusterIP, LB IP (2 scopes), node port (2 scopes).
    fake.set_capacity(names::FRONTENDS, 3);
    let mut w = Writer::over(fake.tables(), None).unwrap();
    let s = state(vec![lb()]);
    let (_, errors) = w
        .sync(&s, &changed(&state(vec![]), &s), &[], false, &config())
        .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].port, lb().name);
    assert_eq!(
        errors[0].frontends,
        Some(vec![FrontendRef {
            kind: FrontendKind::NodePort,
            ip: None,
            port: 30053,
        }])
    );
    assert!(
        errors[0]
            .message
            .contains("BPF map FRONTENDS is full (3 entries); raise --bpf-lb-map-max"),
        "{}",
        errors[0].message
    );
    // The ClusterIP and the LB IP carry traffic.
    let kinds: Vec<u8> = fake.frontends().iter().map(|(_, f)| f.kind).collect();
    assert_eq!(kinds.len(), 3);
    assert!(!kinds.contains(&proxy_common::KIND_NODE_PORT), "{kinds:?}");
    assert_eq!(fake.violations(), Vec::<String>::new());

    // Room: the retry writes the node port and nothing else.
    fake.set_capacity(names::FRONTENDS, 10);
    fake.take_log();
    let (_, errors) = w
        .sync(&s, &ChangeSet::default(), &[lb().name], false, &config())
        .unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(ops(&fake.take_log()), [(names::FRONTENDS, "put")]);
    assert_eq!(fake.lens().0, 5);
}

/// `n` ClusterIP Services of 10 endpoints each, as the bench has them.
fn many(n: usize) -> DesiredState {
    state(
        (0..n)
            .map(|i| {
                svc(
                    "bench",
                    &format!("s{i}"),
                    "http",
                    Protocol::Tcp,
                    &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    80,
                    (1..=10)
                        .map(|e| {
                            ep(
                                &format!("10.128.{}.{}", i / 25, (i % 25) * 10 + e),
                                8080,
                                false,
                            )
                        })
                        .collect(),
                )
            })
            .collect(),
    )
}

#[test]
fn a_full_sync_into_empty_maps_writes_each_map_once_in_switch_order() {
    let fake = MemoryMaps::default();
    let mut w = Writer::over(fake.tables(), None).unwrap();
    let s = many(3_000);
    let written = sync(&mut w, &state(vec![]), &s, true);
    assert_eq!(written, 3_000 * (10 + 10 + 1 + 1));
    assert_eq!(
        ops(&fake.take_log()),
        SWITCH_ORDER,
        "one batch per map, every frontend after what it points at"
    );
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
    let (frontends, slots, backends, svc_names, _) = fake.lens();
    assert_eq!(
        (frontends, slots, backends, svc_names),
        (3_000, 30_000, 30_000, 3_000)
    );

    // Over maps that hold it all, a full sync goes port by port and writes nothing.
    let mut again = Writer::over(fake.tables(), None).unwrap();
    assert_eq!(sync(&mut again, &s, &s, true), 0);
    assert!(ops(&fake.take_log()).is_empty());
}

#[test]
fn a_full_sync_into_empty_maps_that_cannot_hold_it_fails_the_ports_the_kernel_would() {
    // Room for 2,500 of 3,000 Services' backends: the kernel would refuse
    // the backends of the last 500 ports, and so does the staged write.
    let fake = MemoryMaps::default();
    fake.set_capacity(names::BACKENDS, 25_000);
    let mut w = Writer::over(fake.tables(), None).unwrap();
    let s = many(3_000);
    let (_, errors) = w
        .sync(&s, &changed(&state(vec![]), &s), &[], true, &config())
        .unwrap();
    assert_eq!(errors.len(), 500);
    assert!(errors.iter().all(|e| e.reason == "map_full"), "{errors:?}");
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
    let (frontends, slots, backends, _, _) = fake.lens();
    assert_eq!((frontends, slots, backends), (2_500, 25_000, 25_000));
}
