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

fn sync(w: &mut Writer, old: &DesiredState, new: &DesiredState, full: bool) -> usize {
    let (counts, errors) = w.sync(new, &changed(old, new), full, &config()).unwrap();
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
        [
            (names::BACKENDS, "put"),
            (names::SLOTS, "put"),
            (names::SVC_INFO, "put"),
            (names::FRONTENDS, "put"),
        ],
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
    let (_, errors) = w.sync(&s, &changed(&empty, &s), false, &config()).unwrap();
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

    // Room again: the next sync retries web without being told.
    fake.set_capacity(names::SLOTS, 100);
    let (_, errors) = w.sync(&s, &ChangeSet::default(), false, &config()).unwrap();
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
