//! Golden (snapshot) tests of the rendered ruleset, partial-sync rendering,
//! sanitisation and rendering speed. Regenerate the snapshots with
//! `UPDATE_GOLDEN=1 cargo test -p kproxy golden`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::names::{EXTERNAL_SERVICES, FIREWALL, NODEPORTS, SERVICES};
use super::render::{self, Mode, Ports};
use super::{readback, render_full};
use crate::dataplane::{DataplaneConfig, DetectLocalMode};
use crate::model::{
    ChangeSet, DesiredState, Endpoint, NodeInfo, Protocol, ServiceKey, ServicePort,
    ServicePortName, TrafficPolicy,
};

pub(super) fn ep(ip: &str, port: u16, local: bool) -> Endpoint {
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
pub(super) fn svc(
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

pub(super) fn state(ports: Vec<ServicePort>) -> DesiredState {
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

pub(super) fn config() -> DataplaneConfig {
    DataplaneConfig {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        nodeport_addresses: vec![],
        masquerade_all: false,
        node_ips: vec!["192.168.1.10".parse().unwrap()],
        ..DataplaneConfig::default()
    }
}

fn check_golden(name: &str, actual: &str) {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "src/dataplane/iptables/testdata",
        &format!("{name}.txt"),
    ]
    .iter()
    .collect();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    if expected != actual {
        let diff: Vec<String> = diff_lines(&expected, actual);
        panic!(
            "rendered rules differ from {} (UPDATE_GOLDEN=1 regenerates):\n{}",
            path.display(),
            diff.join("\n")
        );
    }
}

/// A crude line diff: lines only in one side, in order.
fn diff_lines(expected: &str, actual: &str) -> Vec<String> {
    let e: Vec<&str> = expected.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    let mut out = Vec::new();
    for l in &e {
        if !a.contains(l) {
            out.push(format!("- {l}"));
        }
    }
    for l in &a {
        if !e.contains(l) {
            out.push(format!("+ {l}"));
        }
    }
    if out.is_empty() {
        out.push("(same lines, different order)".into());
    }
    out
}

fn three_eps() -> Vec<Endpoint> {
    vec![
        ep("10.244.1.5", 8080, true),
        ep("10.244.2.6", 8080, false),
        ep("10.244.2.7", 8080, false),
    ]
}

#[test]
fn golden_cluster_ip() {
    let s = state(vec![svc(
        "default",
        "web",
        "http",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        three_eps(),
    )]);
    check_golden("cluster_ip", &render_full(&s, &config()));
}

#[test]
fn golden_node_port_cluster() {
    let mut p = svc(
        "default",
        "web",
        "",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        three_eps(),
    );
    p.node_port = Some(30080);
    check_golden(
        "node_port_cluster",
        &render_full(&state(vec![p]), &config()),
    );
}

#[test]
fn golden_node_port_local() {
    let mut p = svc(
        "default",
        "web",
        "",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        three_eps(),
    );
    p.node_port = Some(30080);
    p.external_policy = TrafficPolicy::Local;
    p.external_endpoints = vec![ep("10.244.1.5", 8080, true)];
    p.health_check_node_port = Some(32000);
    check_golden("node_port_local", &render_full(&state(vec![p]), &config()));
}

#[test]
fn golden_external_ip() {
    let mut p = svc(
        "default",
        "web",
        "http",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        three_eps(),
    );
    p.external_ips = vec!["203.0.113.7".parse().unwrap()];
    check_golden("external_ip", &render_full(&state(vec![p]), &config()));
}

#[test]
fn golden_load_balancer_source_ranges() {
    let mut p = svc(
        "default",
        "lb",
        "",
        Protocol::Tcp,
        "10.96.0.20",
        443,
        three_eps(),
    );
    p.node_port = Some(31443);
    p.load_balancer_ips = vec!["198.51.100.9".parse().unwrap()];
    p.load_balancer_source_ranges = vec![
        "192.0.2.0/24".parse().unwrap(),
        "198.18.0.0/15".parse().unwrap(),
    ];
    check_golden(
        "load_balancer_source_ranges",
        &render_full(&state(vec![p]), &config()),
    );
}

#[test]
fn golden_session_affinity() {
    let mut p = svc(
        "default",
        "sticky",
        "",
        Protocol::Tcp,
        "10.96.0.30",
        80,
        three_eps()[..2].to_vec(),
    );
    p.session_affinity_seconds = Some(10800);
    check_golden("session_affinity", &render_full(&state(vec![p]), &config()));
}

#[test]
fn golden_no_endpoints() {
    let mut cluster = svc(
        "default",
        "empty",
        "",
        Protocol::Tcp,
        "10.96.0.40",
        80,
        vec![],
    );
    cluster.node_port = Some(30040);
    cluster.external_ips = vec!["203.0.113.8".parse().unwrap()];
    let mut local = svc(
        "default",
        "empty-local",
        "",
        Protocol::Tcp,
        "10.96.0.41",
        80,
        vec![],
    );
    local.node_port = Some(30041);
    local.external_policy = TrafficPolicy::Local;
    // Endpoints exist, but none on this node.
    let mut remote = svc(
        "default",
        "remote-only",
        "",
        Protocol::Tcp,
        "10.96.0.42",
        80,
        vec![ep("10.244.2.6", 80, false)],
    );
    remote.node_port = Some(30042);
    remote.external_policy = TrafficPolicy::Local;
    remote.load_balancer_ips = vec!["198.51.100.10".parse().unwrap()];
    remote.external_endpoints = vec![];
    check_golden(
        "no_endpoints",
        &render_full(&state(vec![cluster, local, remote]), &config()),
    );
}

#[test]
fn golden_multi_port_and_udp() {
    let dns_udp = svc(
        "kube-system",
        "dns",
        "dns",
        Protocol::Udp,
        "10.96.0.53",
        53,
        vec![ep("10.244.1.2", 53, true), ep("10.244.2.3", 53, false)],
    );
    let dns_tcp = svc(
        "kube-system",
        "dns",
        "dns-tcp",
        Protocol::Tcp,
        "10.96.0.53",
        53,
        vec![ep("10.244.1.2", 53, true), ep("10.244.2.3", 53, false)],
    );
    let metrics = svc(
        "kube-system",
        "dns",
        "metrics",
        Protocol::Tcp,
        "10.96.0.53",
        9153,
        vec![ep("10.244.1.2", 9153, true)],
    );
    check_golden(
        "multi_port_udp",
        &render_full(&state(vec![dns_udp, dns_tcp, metrics]), &config()),
    );
}

#[test]
fn golden_config_variants() {
    let mut p = svc(
        "default",
        "web",
        "",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        three_eps(),
    );
    p.node_port = Some(30080);
    let mut cfg = config();
    cfg.cluster_cidrs.push("10.245.0.0/16".parse().unwrap());
    cfg.nodeport_addresses = vec!["192.168.1.0/24".parse().unwrap()];
    cfg.node_ips.push("172.16.0.1".parse().unwrap());
    check_golden(
        "multi_cidr_nodeport_addresses",
        &render_full(&state(vec![p.clone()]), &cfg),
    );
    let mut cfg = config();
    cfg.masquerade_all = true;
    check_golden("masquerade_all", &render_full(&state(vec![p]), &cfg));
}

/// `--detect-local-mode` decides which sources are "local" (not
/// masqueraded towards ClusterIPs, short-circuited for externalTrafficPolicy
/// Local), and `--iptables-masquerade-bit` / `--iptables-localhost-nodeports`
/// change the mark and the node-port match.
#[test]
fn golden_detect_local_modes() {
    let mut p = svc(
        "default",
        "web",
        "",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        three_eps(),
    );
    p.node_port = Some(30080);
    p.external_policy = TrafficPolicy::Local;
    p.external_endpoints = p
        .cluster_endpoints
        .iter()
        .filter(|e| e.is_local)
        .cloned()
        .collect();

    let mut cfg = config();
    cfg.detect_local = DetectLocalMode::BridgeInterface("cbr0".into());
    cfg.masquerade_bit = 5;
    cfg.localhost_nodeports = false;
    check_golden(
        "detect_local_bridge",
        &render_full(&state(vec![p.clone()]), &cfg),
    );

    let mut cfg = config();
    cfg.detect_local = DetectLocalMode::InterfaceNamePrefix("veth".into());
    let text = render_full(&state(vec![p.clone()]), &cfg);
    assert!(text.contains("! -i veth+ -d 10.96.0.10/32"), "{text}");
    assert!(
        text.contains(
            " -i veth+ -m comment --comment \"pod traffic for default/web external destinations\""
        ),
        "{text}"
    );

    // NodeCIDR: the Node's podCIDRs; none yet means no local traffic known.
    let mut cfg = config();
    cfg.detect_local = DetectLocalMode::NodeCidr;
    let mut st = state(vec![p.clone()]);
    let text = render_full(&st, &cfg);
    assert!(
        !text.contains("10.244.0.0/16"),
        "cluster CIDR unused in NodeCIDR mode: {text}"
    );
    assert!(
        !text.contains("! -s 10.") && !text.contains("pod traffic"),
        "no pod CIDR known yet: nothing is local: {text}"
    );
    st.node.pod_cidrs = vec!["10.244.1.0/24".parse().unwrap()];
    let text = render_full(&st, &cfg);
    assert!(
        text.contains("! -s 10.244.1.0/24 -d 10.96.0.10/32"),
        "{text}"
    );
    assert!(
        text.contains("-s 10.244.1.0/24 -m comment --comment \"pod traffic"),
        "{text}"
    );
}

#[test]
fn hostile_names_cannot_inject_rules() {
    let evil_ns = format!("ns\" -j ACCEPT\n-A INPUT -j ACCEPT\n#{}", "x".repeat(300));
    let evil_ns = evil_ns.as_str();
    let evil_name = "x' $(reboot) `id` -j ACCEPT\r\nCOMMIT";
    let evil_port = "p\\\" -j DROP";
    let mut p = svc(
        evil_ns,
        evil_name,
        evil_port,
        Protocol::Tcp,
        "10.96.0.10",
        80,
        three_eps(),
    );
    p.node_port = Some(30080);
    p.external_policy = TrafficPolicy::Local;
    p.external_endpoints = vec![ep("10.244.1.5", 8080, true)];
    let empty = svc(
        evil_ns,
        evil_name,
        "other -j ACCEPT",
        Protocol::Udp,
        "10.96.0.11",
        53,
        vec![],
    );
    let text = render_full(&state(vec![p, empty]), &config());
    let benign = render_full(
        &state(vec![
            {
                let mut p = svc("a", "b", "c", Protocol::Tcp, "10.96.0.10", 80, three_eps());
                p.node_port = Some(30080);
                p.external_policy = TrafficPolicy::Local;
                p.external_endpoints = vec![ep("10.244.1.5", 8080, true)];
                p
            },
            svc("a", "b", "d", Protocol::Udp, "10.96.0.11", 53, vec![]),
        ]),
        &config(),
    );
    // Same number of lines and same number of rules per chain as with
    // harmless names: no line was added or split.
    assert_eq!(text.lines().count(), benign.lines().count());
    for line in text.lines() {
        assert!(
            !line.contains('\r')
                && !line.contains('\'')
                && !line.contains('`')
                && !line.contains('$')
        );
        // Exactly zero or two double quotes per line, around a comment.
        let quotes = line.matches('"').count();
        assert!(quotes == 0 || quotes == 2, "bad quoting: {line}");
        if quotes == 2 {
            let start = line.find('"').unwrap();
            let len = line[start + 1..].find('"').unwrap();
            assert!(len <= 255, "comment too long for the kernel: {line}");
            assert!(
                line[..start].ends_with("--comment "),
                "quote outside a comment: {line}"
            );
        }
        assert!(!line.starts_with("-A INPUT"), "injected: {line}");
        assert_ne!(line, "#");
    }
    assert_eq!(text.lines().filter(|l| *l == "COMMIT").count(), 2);
    // The read-back parser sees the sanitised name as one service.
    let nat_part = text.split("*filter").next().unwrap();
    let fronts = readback::programmed(nat_part, "");
    assert!(fronts
        .iter()
        .all(|f| !f.service.contains(' ') && !f.service.contains('"')));
}

fn partial(prev: &Ports, s: &DesiredState, changes: &ChangeSet) -> render::Rendered {
    render::render(
        s,
        &config(),
        Mode::Partial {
            previous: prev,
            changes,
        },
    )
}

#[test]
fn partial_sync_writes_only_changed_ports() {
    let a = svc(
        "default",
        "a",
        "",
        Protocol::Tcp,
        "10.96.0.1",
        80,
        three_eps(),
    );
    let b = svc(
        "default",
        "b",
        "",
        Protocol::Tcp,
        "10.96.0.2",
        80,
        vec![ep("10.244.3.1", 80, false)],
    );
    let c = svc(
        "default",
        "c",
        "",
        Protocol::Udp,
        "10.96.0.3",
        53,
        vec![ep("10.244.3.2", 53, false)],
    );
    let s1 = state(vec![a.clone(), b.clone(), c.clone()]);
    let full = render::render(
        &s1,
        &config(),
        Mode::Full {
            stale_nat: &[],
            stale_filter: &[],
            missing_jumps: &[],
        },
    );
    let a_svc = full.ports[&a.name].chains[0].clone();
    let b_svc = full.ports[&b.name].chains[0].clone();
    let c_chains = full.ports[&c.name].chains.clone();

    // Nothing changed: fixed chains only, no per-port chain written.
    let none = partial(&full.ports, &s1, &ChangeSet::default());
    assert!(!none.payload.contains(&a_svc) || !none.payload.contains(&format!(":{a_svc}")));
    assert!(!none.payload.contains(&format!("-A {a_svc}")));
    assert!(
        none.payload.contains(&format!("-j {a_svc}")),
        "KPROXY-SERVICES is rewritten whole"
    );
    assert_eq!(none.chains_deleted, 0);

    // b loses its endpoint and c is removed: a untouched, b rewritten, c's
    // and b's SEP/SVC chains deleted.
    let mut b2 = b.clone();
    b2.cluster_endpoints.clear();
    b2.external_endpoints.clear();
    let s2 = state(vec![a.clone(), b2]);
    let p = partial(&full.ports, &s2, &ChangeSet::between(&s1, &s2));
    assert!(!p.payload.contains(&format!("-A {a_svc}")));
    assert!(p.payload.contains(&format!("-X {b_svc}\n")));
    for ch in &c_chains {
        assert!(
            p.payload.contains(&format!(":{ch} - [0:0]\n")),
            "{ch} flushed"
        );
        assert!(p.payload.contains(&format!("-X {ch}\n")), "{ch} deleted");
    }
    assert!(p.payload.contains(
        "10.96.0.2/32 -p tcp -m comment --comment \"default/b cluster IP has no endpoints\""
    ));
    assert_eq!(p.chains_deleted, 2 + c_chains.len());

    // Only the ports in the change set are rendered again: a change nobody
    // reported waits for the periodic full sync (drift repair).
    let mut a3 = a.clone();
    a3.cluster_endpoints.pop();
    a3.external_endpoints.pop();
    let s3 = state(vec![a3, b.clone(), c.clone()]);
    let unreported = partial(&full.ports, &s3, &ChangeSet::default());
    assert!(!unreported.payload.contains(&format!("-A {a_svc}")));
    let p3 = partial(&full.ports, &s3, &ChangeSet::between(&s1, &s3));
    assert!(p3.payload.contains(&format!("-A {a_svc}")));
    assert_eq!(p3.chains_deleted, 1, "the dropped endpoint's SEP chain");
}

/// The rules of the chains every sync rewrites whole, in payload order.
fn fixed_chain_rules(payload: &str) -> Vec<&str> {
    payload
        .lines()
        .filter(|l| {
            [SERVICES, NODEPORTS, EXTERNAL_SERVICES, FIREWALL]
                .iter()
                .any(|c| l.starts_with(&format!("-A {c} ")))
        })
        .collect()
}

#[test]
fn partial_sync_reuses_unchanged_ports_fixed_rules_as_a_full_render_has_them() {
    let mk = |name: &str, vip: &str, eps: Vec<Endpoint>| {
        svc("default", name, "", Protocol::Tcp, vip, 80, eps)
    };
    let a = mk("a", "10.96.0.1", three_eps());
    let b = mk("b", "10.96.0.2", vec![ep("10.244.3.1", 80, false)]);
    let c = mk("c", "10.96.0.3", vec![]);
    let s1 = state(vec![a.clone(), b.clone(), c.clone()]);
    let full = |s: &DesiredState, cfg: &DataplaneConfig| {
        render::render(
            s,
            cfg,
            Mode::Full {
                stale_nat: &[],
                stale_filter: &[],
                missing_jumps: &[],
            },
        )
    };
    let first = full(&s1, &config());
    // b loses its endpoint, c gains one, d arrives: a is reused as it was.
    let mut b2 = b.clone();
    b2.cluster_endpoints.clear();
    b2.external_endpoints.clear();
    let c2 = mk("c", "10.96.0.3", vec![ep("10.244.3.9", 80, false)]);
    let d = mk("d", "10.96.0.4", vec![ep("10.244.3.4", 80, false)]);
    let s2 = state(vec![a.clone(), b2, c2, d]);
    let p = partial(&first.ports, &s2, &ChangeSet::between(&s1, &s2));
    assert!(Arc::ptr_eq(&p.ports[&a.name], &first.ports[&a.name]));
    assert_eq!(
        fixed_chain_rules(&p.payload),
        fixed_chain_rules(&full(&s2, &config()).payload)
    );
    // Node-wide inputs changed (here --masquerade-all): every port again.
    let mut cfg = config();
    cfg.masquerade_all = !cfg.masquerade_all;
    let p = render::render(
        &s2,
        &cfg,
        Mode::Partial {
            previous: &first.ports,
            changes: &ChangeSet::default(),
        },
    );
    assert!(!Arc::ptr_eq(&p.ports[&a.name], &first.ports[&a.name]));
    assert_eq!(
        fixed_chain_rules(&p.payload),
        fixed_chain_rules(&full(&s2, &cfg).payload)
    );
}

#[test]
fn full_sync_deletes_stale_chains_and_inserts_missing_jumps() {
    let a = svc(
        "default",
        "a",
        "",
        Protocol::Tcp,
        "10.96.0.1",
        80,
        three_eps(),
    );
    let s = state(vec![a]);
    let stale = vec![
        "KPROXY-SEP-STALESTALESTALE1".to_string(),
        "KPROXY-SERVICES".to_string(),
    ];
    let stale_filter = vec!["KPROXY-OLD".to_string(), "KPROXY-FORWARD".to_string()];
    let missing = [render::JUMP_RULES[0]];
    let r = render::render(
        &s,
        &config(),
        Mode::Full {
            stale_nat: &stale,
            stale_filter: &stale_filter,
            missing_jumps: &missing,
        },
    );
    assert!(r.payload.contains("-X KPROXY-SEP-STALESTALESTALE1\n"));
    assert!(!r.payload.contains("-X KPROXY-SERVICES"));
    assert!(r.payload.contains("-X KPROXY-OLD\n"));
    assert!(!r.payload.contains("-X KPROXY-FORWARD"));
    assert_eq!(r.payload.matches("\n-I ").count(), 1);
    assert!(r.payload.contains(
        "-I PREROUTING -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES\n"
    ));
}

#[test]
fn probabilities_make_a_uniform_choice() {
    let eps: Vec<Endpoint> = (0..4)
        .map(|i| ep(&format!("10.244.0.{}", i + 1), 80, false))
        .collect();
    let text = render_full(
        &state(vec![svc("d", "s", "", Protocol::Tcp, "10.96.0.1", 80, eps)]),
        &config(),
    );
    let probs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("--probability ").nth(1))
        .map(|r| r.split(' ').next().unwrap())
        .collect();
    assert_eq!(probs, vec!["0.2500000000", "0.3333333333", "0.5000000000"]);
}

/// 10,000 Services x 10 endpoints (100k SEP chains) must render quickly.
/// The bound is generous for debug builds; in release it is ~100 ms.
#[test]
fn render_10k_services_is_fast() {
    let mut ports = Vec::with_capacity(10_000);
    for i in 0..10_000u32 {
        let vip: IpAddr = format!("10.96.{}.{}", i / 250, i % 250 + 1)
            .parse()
            .unwrap();
        let eps: Vec<Endpoint> = (0..10u32)
            .map(|j| {
                let n = i * 10 + j;
                ep(
                    &format!("10.{}.{}.{}", 100 + n / 65536, (n / 256) % 256, n % 256),
                    8080,
                    j == 0,
                )
            })
            .collect();
        let mut p = svc(
            "bench",
            &format!("svc-{i}"),
            "http",
            Protocol::Tcp,
            "10.96.0.1",
            80,
            eps,
        );
        p.cluster_ips = vec![vip];
        if i % 2 == 0 {
            p.node_port = Some(30000 + (i % 2000) as u16);
        }
        ports.push(p);
    }
    let s = state(ports);
    let start = Instant::now();
    let text = render_full(&s, &config());
    let took = start.elapsed();
    assert_eq!(text.matches("-j DNAT").count(), 100_000);
    let limit = if cfg!(debug_assertions) {
        Duration::from_secs(20)
    } else {
        Duration::from_millis(900)
    };
    assert!(took < limit, "rendering 10k services took {took:?}");
    eprintln!(
        "rendered 10k services x 10 endpoints ({} bytes) in {took:?}",
        text.len()
    );

    // One endpoint change: only that Service is rendered again.
    let first = render::render(
        &s,
        &config(),
        Mode::Full {
            stale_nat: &[],
            stale_filter: &[],
            missing_jumps: &[],
        },
    );
    let mut changed = s.clone();
    let one = Arc::make_mut(changed.services.values_mut().next().unwrap());
    one.cluster_endpoints.pop();
    one.external_endpoints.pop();
    let changes = ChangeSet::between(&s, &changed);
    let start = Instant::now();
    let p = partial(&first.ports, &changed, &changes);
    let partial_took = start.elapsed();
    assert_eq!(p.payload.matches("-j DNAT").count(), 9);
    assert!(
        partial_took * 5 < took,
        "a one-Service partial render took {partial_took:?}, a full one {took:?}"
    );
    eprintln!("partial render of one changed Service of 10k: {partial_took:?}");
}
