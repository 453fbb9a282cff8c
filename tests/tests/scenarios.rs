//! The scenario suite: every scenario is written once, as a function of the
//! dataplane mode, and run once per mode (see the macros at the bottom).
//! Each builds its own topology of namespaces (tests run in parallel) and
//! asserts what a user would see: who answered, which client address the
//! backend saw, connections refused or dropped.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use kproxy_tests::client::{now_ms, ClientSpec};
use kproxy_tests::manifests::{self as m, ready, service, slice, terminating, Endpoint};
use kproxy_tests::topo::{EXT_IP, NODE_IPS};
use kproxy_tests::{poll, Mode, Topology};
use serde_json::Value;

const A: &str = "10.244.1.10"; // pod-a on node1
const C: &str = "10.244.1.30"; // pod-c on node1 (usually the client)
const B: &str = "10.244.2.10"; // pod-b on node2
const VIP: &str = "10.96.0.10";
const SVC: &str = "default/web:http";

fn ep(ip: &str) -> String {
    format!("{ip}:8080")
}

fn a() -> Endpoint {
    ready(A, "node1")
}
fn b() -> Endpoint {
    ready(B, "node2")
}
fn c() -> Endpoint {
    ready(C, "node1")
}

/// Service `web` (port `http` 80 -> 8080, optionally a node port) and one
/// EndpointSlice with `endpoints`.
fn web(svc: m::Service, endpoints: &[Endpoint]) -> Vec<Value> {
    vec![
        svc.to_json(),
        slice("web-1", "web", &[("http", "TCP", 8080)], endpoints),
    ]
}

fn web_svc() -> m::Service {
    service("web", VIP, vec![m::tcp("http", 80, 8080)])
}

fn web_nodeport(np: u16) -> m::Service {
    service("web", VIP, vec![m::tcp("http", 80, 8080).node_port(np)])
}

pub fn clusterip_spreads_over_every_endpoint(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 200))?;
    out.expect_all_ok("ClusterIP from pod-c")?;
    let by_pod = out.by_pod();
    for pod in ["pod-a", "pod-b"] {
        let n = by_pod.get(pod).copied().unwrap_or(0);
        // Expect 100 each; 50 is far outside random variation (p < 1e-12).
        ensure!(
            n >= 50,
            "{pod} got {n} of 200 connections: {}",
            out.summary()
        );
    }
    // The backend sees the pod's own address: no SNAT inside the cluster.
    ensure!(
        out.attempts.iter().all(|a| a.seen_client_ip() == Some(C)),
        "backends saw a translated client address: {:?}",
        out.attempts.first()
    );
    Ok(())
}

pub fn nodeport_through_either_node(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_nodeport(30080), &[a(), b()]))?;
    topo.wait_backends(SVC, "NodePort", &[&ep(A), &ep(B)])?;
    for node_ip in NODE_IPS {
        let out = topo.from_ext(&ClientSpec::tcp(format!("{node_ip}:30080"), 60))?;
        out.expect_all_ok(&format!("NodePort via {node_ip}"))?;
        ensure!(
            out.by_pod().len() == 2,
            "via {node_ip} only {:?} answered",
            out.by_pod()
        );
    }
    Ok(())
}

pub fn etp_cluster_backend_sees_node_address(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_nodeport(30080), &[a(), b()]))?;
    topo.wait_backends(SVC, "NodePort", &[&ep(A), &ep(B)])?;
    for node_ip in NODE_IPS {
        let out = topo.from_ext(&ClientSpec::tcp(format!("{node_ip}:30080"), 30))?;
        out.expect_all_ok("NodePort")?;
        for a in &out.attempts {
            ensure!(
                a.seen_client_ip() == Some(node_ip),
                "externalTrafficPolicy Cluster via {node_ip}: backend saw {:?}, want the node address",
                a.reply
            );
        }
    }
    Ok(())
}

pub fn etp_local_preserves_client_and_drops_without_endpoint(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_nodeport(30080).etp_local(), &[a()]))?;
    topo.wait_for("node1 NodePort -> pod-a, node2 none", |i, fs| {
        let want: Vec<String> = if i == 0 { vec![ep(A)] } else { vec![] };
        fs.iter()
            .any(|f| f.service == SVC && f.kind == "NodePort" && f.backends == want)
    })?;
    let out = topo.from_ext(&ClientSpec::tcp(format!("{}:30080", NODE_IPS[0]), 20))?;
    out.expect_all_ok("ETP Local via node1")?;
    for a in &out.attempts {
        ensure!(
            a.pod() == Some("pod-a") && a.seen_client_ip() == Some(EXT_IP),
            "ETP Local: want pod-a seeing {EXT_IP}, got {:?}",
            a.reply
        );
    }
    let out =
        topo.from_ext(&ClientSpec::tcp(format!("{}:30080", NODE_IPS[1]), 3).timeout_ms(500))?;
    ensure!(
        out.attempts.iter().all(|a| !a.ok),
        "node2 has no local endpoint and must not answer: {}",
        out.summary()
    );
    Ok(())
}

pub fn itp_local_keeps_traffic_on_node(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc().itp_local(), &[a(), b()]))?;
    topo.wait_for("ClusterIP -> local endpoint only", |i, fs| {
        let want = vec![ep(if i == 0 { A } else { B })];
        fs.iter()
            .any(|f| f.service == SVC && f.kind == "ClusterIP" && f.backends == want)
    })?;
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 40))?;
    out.expect_all_ok("ITP Local from pod-c")?;
    ensure!(
        out.by_pod().keys().eq(["pod-a"]),
        "internalTrafficPolicy Local on node1 must only reach pod-a: {}",
        out.summary()
    );
    Ok(())
}

pub fn session_affinity_sticks_to_one_backend(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc().affinity(600), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 40))?;
    out.expect_all_ok("affinity")?;
    ensure!(
        out.by_pod().len() == 1,
        "sessionAffinity ClientIP: one client must stick to one backend: {}",
        out.summary()
    );
    Ok(())
}

pub fn no_endpoints_is_refused_at_once(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_nodeport(30080), &[]))?;
    topo.wait_backends(SVC, "ClusterIP", &[])?;
    topo.wait_backends(SVC, "NodePort", &[])?;
    let from_pod = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 5))?;
    let from_ext = topo.from_ext(&ClientSpec::tcp(format!("{}:30080", NODE_IPS[0]), 5))?;
    for (who, out) in [
        ("pod-c -> ClusterIP", from_pod),
        ("ext -> NodePort", from_ext),
    ] {
        for a in &out.attempts {
            ensure!(
                a.error.as_deref() == Some("refused") && a.ms < 500.0,
                "{who}: a Service without endpoints must refuse at once, got {:?} after {:.0} ms",
                a.error.as_deref().or(a.reply.as_deref()),
                a.ms
            );
        }
    }
    Ok(())
}

pub fn endpoint_changes_under_load(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    let client = topo.start_from_pod(
        "pod-c",
        // Bounded, but long enough for a slow machine; stopped below.
        &ClientSpec::tcp(format!("{VIP}:80"), 20_000).interval_ms(2),
    )?;
    // Wait until the client is demonstrably running before changing anything.
    client.wait_until("client traffic", Duration::from_secs(10), |seen| {
        seen.iter().filter(|a| a.ok).count() >= 25
    })?;
    topo.write("web.yaml", &web(web_svc(), &[a()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A)])?;
    let removed_at = now_ms();
    topo.write("web.yaml", &web(web_svc(), &[a(), c()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(C)])?;
    let added_at = now_ms();
    client.wait_until("attempts after the add", Duration::from_secs(15), |seen| {
        seen.iter().filter(|a| a.t > added_at).count() >= 40
    })?;
    let out = client.stop()?;
    out.expect_all_ok("client looping through endpoint changes")?;
    ensure!(
        out.attempts.iter().any(|a| a.t < removed_at - 50.0),
        "the client did not run before the change: {}",
        out.summary()
    );
    for a in out.attempts.iter().filter(|a| a.t > removed_at) {
        ensure!(
            a.pod() != Some("pod-b"),
            "attempt {} started {:.0} ms after pod-b was removed and still reached it",
            a.i,
            a.t - removed_at
        );
    }
    let after: Vec<_> = out.attempts.iter().filter(|a| a.t > added_at).collect();
    ensure!(
        after.len() >= 20,
        "too few attempts after the endpoint was added ({}): the client ended too early",
        after.len()
    );
    ensure!(
        after.iter().any(|a| a.pod() == Some("pod-c")),
        "the added endpoint pod-c got no traffic in {} attempts",
        after.len()
    );
    Ok(())
}

pub fn terminating_only_service_still_serves(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[terminating(A, "node1")]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A)])?;
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 10))?;
    out.expect_all_ok("terminating-only Service")?;
    ensure!(out.by_pod().keys().eq(["pod-a"]), "{}", out.summary());
    // A ready endpoint takes over from the terminating one.
    topo.write("web.yaml", &web(web_svc(), &[terminating(A, "node1"), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(B)])?;
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 10))?;
    out.expect_all_ok("ready endpoint preferred")?;
    ensure!(out.by_pod().keys().eq(["pod-b"]), "{}", out.summary());
    Ok(())
}

pub fn udp_service(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    let svc = service(
        "dns",
        "10.96.0.53",
        vec![m::udp("dns", 53, 5353).node_port(30053)],
    );
    topo.write(
        "dns.yaml",
        &[
            svc.to_json(),
            slice("dns-1", "dns", &[("dns", "UDP", 5353)], &[a(), b()]),
        ],
    )?;
    let backends = [format!("{A}:5353"), format!("{B}:5353")];
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    topo.wait_backends("default/dns:dns", "ClusterIP", &backends)?;
    topo.wait_backends("default/dns:dns", "NodePort", &backends)?;
    let out = topo.from_pod("pod-c", &ClientSpec::udp("10.96.0.53:53", 60))?;
    out.expect_all_ok("UDP ClusterIP")?;
    ensure!(out.by_pod().len() == 2, "UDP spread: {}", out.summary());
    let out = topo.from_ext(&ClientSpec::udp(format!("{}:30053", NODE_IPS[1]), 20))?;
    out.expect_all_ok("UDP NodePort")?;
    Ok(())
}

pub fn multiport_with_named_target_ports(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    let svc = service(
        "multi",
        "10.96.0.20",
        vec![
            m::tcp("http", 80, 0).target_name("web"),
            m::tcp("admin", 81, 0).target_name("admin-port"),
        ],
    );
    topo.write(
        "multi.yaml",
        &[
            svc.to_json(),
            slice(
                "multi-1",
                "multi",
                // The EndpointSlice controller names slice ports after the
                // Service port and resolves the container port's name.
                &[("http", "TCP", 8080), ("admin", "TCP", 9090)],
                &[a(), b()],
            ),
        ],
    )?;
    topo.wait_backends(
        "default/multi:admin",
        "ClusterIP",
        &[&format!("{A}:9090"), &format!("{B}:9090")],
    )?;
    topo.wait_backends("default/multi:http", "ClusterIP", &[&ep(A), &ep(B)])?;
    for (port, want) in [(80, 8080), (81, 9090)] {
        let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("10.96.0.20:{port}"), 10))?;
        out.expect_all_ok(&format!("port {port}"))?;
        ensure!(
            out.attempts.iter().all(|a| a.served_port() == Some(want)),
            "Service port {port} must reach the pods' port {want}: {:?}",
            out.attempts.first().and_then(|a| a.reply.clone())
        );
    }
    Ok(())
}

pub fn health_check_node_port_and_load_balancer_ip(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    let svc = web_nodeport(30081)
        .etp_local()
        .load_balancer(&["203.0.113.10"], Some(30256));
    topo.write("web.yaml", &web(svc, &[a()]))?;
    topo.wait_for("LoadBalancer frontends", |_, fs| {
        fs.iter()
            .any(|f| f.service == SVC && f.kind == "LoadBalancer")
    })?;
    for (i, (code, count)) in [(200, 1), (503, 0)].into_iter().enumerate() {
        let addr = format!("{}:30256", NODE_IPS[i]);
        let node = &topo.nodes[i].ns;
        poll::until(
            &format!("{addr}/healthz to say {code}"),
            Duration::from_secs(10),
            || {
                let (got, body) = Topology::http_get(node, &addr, "/healthz")?;
                let json: Value = serde_json::from_str(&body).context("healthz body")?;
                if got == code
                    && json["localEndpoints"] == count
                    && json["service"]["name"] == "web"
                {
                    Ok(())
                } else {
                    bail!("{got} {body}")
                }
            },
        )?;
    }
    // The load balancer sends traffic to node1, which has the endpoint.
    topo.route_from_ext("203.0.113.10/32", 0)?;
    let out = topo.from_ext(&ClientSpec::tcp("203.0.113.10:80", 10))?;
    out.expect_all_ok("LoadBalancer IP via node1")?;
    ensure!(
        out.attempts
            .iter()
            .all(|a| a.seen_client_ip() == Some(EXT_IP)),
        "ETP Local keeps the client address: {:?}",
        out.attempts.first().and_then(|a| a.reply.clone())
    );
    // Through node2 (no local endpoint) it is dropped, as the 503 announces.
    topo.route_from_ext("203.0.113.10/32", 1)?;
    let out = topo.from_ext(&ClientSpec::tcp("203.0.113.10:80", 2).timeout_ms(500))?;
    ensure!(
        out.failures().len() == 2,
        "node2 answered: {}",
        out.summary()
    );
    Ok(())
}

pub fn external_ips_from_outside(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write(
        "web.yaml",
        &web(web_svc().external_ips(&["198.51.100.10"]), &[a(), b()]),
    )?;
    topo.wait_backends(SVC, "ExternalIP", &[&ep(A), &ep(B)])?;
    topo.route_from_ext("198.51.100.10/32", 1)?;
    let out = topo.from_ext(&ClientSpec::tcp("198.51.100.10:80", 30))?;
    out.expect_all_ok("externalIP from outside")?;
    ensure!(out.by_pod().len() == 2, "{}", out.summary());
    Ok(())
}

pub fn load_balancer_source_ranges(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    let lb = |ranges: &[&str]| {
        web_nodeport(30082)
            .load_balancer(&["203.0.113.20"], None)
            .source_ranges(ranges)
    };
    topo.route_from_ext("203.0.113.20/32", 0)?;
    topo.write("web.yaml", &web(lb(&["10.0.0.0/8"]), &[a(), b()]))?;
    topo.wait_for("LoadBalancer frontends", |_, fs| {
        fs.iter()
            .any(|f| f.service == SVC && f.kind == "LoadBalancer")
    })?;
    let out = topo.from_ext(&ClientSpec::tcp("203.0.113.20:80", 2).timeout_ms(500))?;
    ensure!(
        out.failures().len() == 2,
        "{EXT_IP} is outside loadBalancerSourceRanges 10.0.0.0/8 and must not get through: {}",
        out.summary()
    );
    topo.write(
        "web.yaml",
        &web(lb(&["10.0.0.0/8", "172.30.0.0/24"]), &[a(), b()]),
    )?;
    poll::until(
        "the widened source range to let ext in",
        Duration::from_secs(10),
        || {
            let out = topo.from_ext(&ClientSpec::tcp("203.0.113.20:80", 1).timeout_ms(300))?;
            out.expect_all_ok("allowed source").map(drop)
        },
    )?;
    let out = topo.from_ext(&ClientSpec::tcp("203.0.113.20:80", 10))?;
    out.expect_all_ok("allowed source range")?;
    Ok(())
}

pub fn hairpin_pod_reaches_itself(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[a()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A)])?;
    let out = topo.from_pod("pod-a", &ClientSpec::tcp(format!("{VIP}:80"), 10))?;
    out.expect_all_ok("pod-a through its own Service")?;
    ensure!(out.by_pod().keys().eq(["pod-a"]), "{}", out.summary());
    Ok(())
}

/// AF_INET6 sockets dialling an IPv4 Service as a v4-mapped address
/// (`::ffff:10.96.0.10`, Java's default) are balanced like AF_INET ones:
/// TCP (connect6, getpeername6), connected UDP, and unconnected UDP whose
/// answer comes from the address dialled (recvmsg6). From the node itself
/// (in ebpf mode only the socket hooks can serve it: the node's own
/// packets meet no TC DNAT), from a pod, and from a pod reaching itself
/// through a Service whose only endpoint it is.
pub fn v4_mapped_ipv6_sockets_are_balanced(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    let solo = "10.96.0.12";
    let dns = "10.96.0.53";
    topo.write("web.yaml", &web(web_svc(), &[a(), b()]))?;
    topo.write(
        "solo.yaml",
        &[
            service("solo", solo, vec![m::tcp("http", 80, 8080)]).to_json(),
            slice("solo-1", "solo", &[("http", "TCP", 8080)], &[a()]),
        ],
    )?;
    topo.write(
        "dns.yaml",
        &[
            service("dns", dns, vec![m::udp("dns", 53, 5353)]).to_json(),
            slice("dns-1", "dns", &[("dns", "UDP", 5353)], &[a(), b()]),
        ],
    )?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    topo.wait_backends("default/solo:http", "ClusterIP", &[&ep(A)])?;
    let dns_backends = [format!("{A}:5353"), format!("{B}:5353")];
    topo.wait_backends(
        "default/dns:dns",
        "ClusterIP",
        &[&dns_backends[0], &dns_backends[1]],
    )?;
    let web_mapped = format!("[::ffff:{VIP}]:80");
    let dns_mapped = format!("[::ffff:{dns}]:53");
    let check = |what: &str, out: &kproxy_tests::client::Outcome, peer: &str, pods: usize| {
        out.expect_all_ok(what)?;
        ensure!(
            out.by_pod().len() == pods,
            "{what}: want {pods} backends answering: {}",
            out.summary()
        );
        for a in &out.attempts {
            ensure!(
                a.peer.as_deref() == Some(peer),
                "{what}: the socket must show the address it dialled ({peer}), got {:?}",
                a.peer
            );
        }
        Ok(())
    };
    // (what, the pod it runs in or node1 itself, spec, peer it must show,
    // client address the backend must see)
    let cases = [
        (
            "TCP from node1",
            None,
            ClientSpec::tcp(&web_mapped, 40),
            &web_mapped,
            NODE_IPS[0],
        ),
        (
            "UDP from node1",
            None,
            ClientSpec::udp(&dns_mapped, 40),
            &dns_mapped,
            NODE_IPS[0],
        ),
        (
            "unconnected UDP from node1",
            None,
            ClientSpec::udp(&dns_mapped, 40).unconnected(),
            &dns_mapped,
            NODE_IPS[0],
        ),
        (
            "TCP from pod-c",
            Some("pod-c"),
            ClientSpec::tcp(&web_mapped, 40),
            &web_mapped,
            C,
        ),
        (
            "unconnected UDP from pod-c",
            Some("pod-c"),
            ClientSpec::udp(&dns_mapped, 40).unconnected(),
            &dns_mapped,
            C,
        ),
    ];
    for (what, pod, spec, peer, client) in &cases {
        let out = match pod {
            Some(pod) => topo.from_pod(pod, spec)?,
            None => topo.from_node(0, spec)?,
        };
        check(what, &out, peer, 2)?;
        for a in &out.attempts {
            ensure!(
                a.seen_client_ip() == Some(*client),
                "{what}: backend saw {:?}, want {client}",
                a.reply
            );
        }
    }
    let solo_mapped = format!("[::ffff:{solo}]:80");
    let out = topo.from_pod("pod-a", &ClientSpec::tcp(&solo_mapped, 10))?;
    check("pod-a through its own Service", &out, &solo_mapped, 1)?;
    ensure!(out.by_pod().keys().eq(["pod-a"]), "{}", out.summary());
    Ok(())
}

pub fn restart_keeps_traffic_flowing(mode: Mode) -> Result<()> {
    let mut topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    // Long enough to outlast a slow restart; stopped once both clients
    // have been seen working on either side of it.
    let spec = ClientSpec::tcp(format!("{VIP}:80"), 2000).interval_ms(15);
    let clients = [
        (
            "held connection",
            topo.start_from_pod("pod-c", &spec.clone().hold())?,
        ),
        ("new connections", topo.start_from_pod("pod-c", &spec)?),
    ];
    for (what, client) in &clients {
        client.wait_until(what, Duration::from_secs(10), |seen| {
            seen.iter().any(|a| a.ok)
        })?;
    }
    let stopped_at = now_ms();
    topo.stop_kproxy(0)?;
    topo.start_kproxy(0)?;
    let node = &topo.nodes[0].ns;
    poll::until("restarted kproxy healthy", Duration::from_secs(15), || {
        let (code, body) = Topology::http_get(node, "127.0.0.1:10256", "/healthz")?;
        ensure!(code == 200, "{code} {body}");
        Ok(())
    })
    .with_context(|| topo.logs())?;
    let restarted_at = now_ms();
    for (what, client) in &clients {
        client.wait_until(what, Duration::from_secs(15), |seen| {
            seen.iter().filter(|a| a.t > restarted_at).count() >= 3
        })?;
    }
    for (what, client) in clients {
        let out = client.stop()?;
        out.expect_all_ok(what)?;
        ensure!(
            out.attempts.first().is_some_and(|a| a.t < stopped_at)
                && out.attempts.last().is_some_and(|a| a.t > restarted_at),
            "{what}: the client did not span the restart"
        );
        if what == "held connection" {
            ensure!(
                out.by_pod().len() == 1,
                "one connection, one backend: {}",
                out.summary()
            );
        }
    }
    Ok(())
}

pub fn cleanup_restores_the_namespace(mode: Mode) -> Result<()> {
    let mut topo = Topology::build(mode)?;
    for i in 0..topo.pods.len() {
        topo.serve(i, &["--tcp", "8080"])?;
    }
    let before = topo.dataplane_snapshot(0)?;
    topo.start_kproxy(0)?;
    topo.write("web.yaml", &web(web_nodeport(30080), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    ensure!(
        topo.dataplane_snapshot(0)? != before,
        "kproxy programmed nothing visible"
    );
    // SIGTERM leaves the dataplane in place: traffic still flows.
    topo.stop_kproxy(0)?;
    topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 10))?
        .expect_all_ok("after SIGTERM, before cleanup")?;
    kproxy_tests::kproxy::run_command(&topo.nodes[0].ns, &topo.nodes[0].config, &["cleanup"])?;
    let after = topo.dataplane_snapshot(0)?;
    if after != before {
        bail!(
            "kproxy cleanup left the namespace changed:\n--- before\n{before}\n--- after\n{after}"
        );
    }
    let out = topo.from_pod(
        "pod-c",
        &ClientSpec::tcp(format!("{VIP}:80"), 2).timeout_ms(300),
    )?;
    ensure!(
        out.failures().len() == 2,
        "after cleanup the VIP still works: {}",
        out.summary()
    );
    Ok(())
}

/// Hostile and invalid objects are rejected with a message naming them, never
/// reach the dataplane, and do not disturb the valid Service.
pub fn bad_input_is_rejected_and_contained(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;

    let mut bad = Vec::new();
    let mut named = |name: &str, f: &dyn Fn(&mut Value)| {
        let mut v = service(name, "10.96.0.50", vec![m::tcp("http", 80, 8080)]).to_json();
        f(&mut v);
        bad.push((name.to_string(), v));
    };
    named("bad-ip", &|v| v["spec"]["clusterIP"] = "10.96.0.300".into());
    named("port-zero", &|v| v["spec"]["ports"][0]["port"] = 0.into());
    named("port-big", &|v| {
        v["spec"]["ports"][0]["port"] = 65536.into()
    });
    named("target-big", &|v| {
        v["spec"]["ports"][0]["targetPort"] = 70000.into()
    });
    named("dup-names", &|v| {
        v["spec"]["ports"] = serde_json::json!([
            {"name": "x", "protocol": "TCP", "port": 80, "targetPort": 8080},
            {"name": "x", "protocol": "TCP", "port": 81, "targetPort": 8080}
        ])
    });
    named("bad-proto", &|v| {
        v["spec"]["ports"][0]["protocol"] = "HTTP".into()
    });
    named("evil\" -j ACCEPT", &|_| {});
    named("evil space", &|_| {});
    named("evil\nnewline", &|_| {});
    named("evil-port-name", &|v| {
        v["spec"]["ports"][0]["name"] = "x\" -j ACCEPT -m comment --comment \"".into()
    });
    for (i, (_, doc)) in bad.iter().enumerate() {
        topo.write(&format!("bad-{i}.yaml"), std::slice::from_ref(doc))?;
    }
    m::write_raw(
        topo.manifests(),
        "typo.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: typo\nspec: [",
    )?;

    // Each is reported by name (log lines debug-quote names).
    for (name, _) in &bad {
        let quoted = format!("{name:?}");
        poll::until(
            &format!("a rejection naming {quoted}"),
            Duration::from_secs(10),
            || {
                let log = topo.log(0);
                ensure!(
                    log.contains(&quoted.replace('\\', "\\\\")) || log.contains(&quoted),
                    "not yet"
                );
                Ok(())
            },
        )
        .with_context(|| topo.logs())?;
    }
    poll::until(
        "the unparsable file reported",
        Duration::from_secs(10),
        || {
            ensure!(topo.log(0).contains("typo.yaml"), "not yet");
            Ok(())
        },
    )?;
    // Nothing of them reached the dataplane; the good Service still works.
    for i in 0..topo.nodes.len() {
        let fs = topo.programmed(i)?;
        ensure!(
            fs.iter().all(|f| f.service == SVC),
            "only {SVC} may be programmed, found {:?}",
            fs.iter().map(|f| &f.service).collect::<Vec<_>>()
        );
        let snapshot = topo.dataplane_snapshot(i)?;
        ensure!(
            !snapshot.contains("evil") && !snapshot.contains("10.96.0.50"),
            "a rejected object reached the dataplane:\n{snapshot}"
        );
    }
    topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 20))?
        .expect_all_ok("the valid Service next to bad input")?;
    Ok(())
}

/// A file that turns bad keeps its last good state programmed.
pub fn broken_file_keeps_last_good_state(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    let good = std::fs::read_to_string(topo.manifests().join("web.yaml"))?;
    m::write_raw(
        topo.manifests(),
        "web.yaml",
        &good.replace("\"ports\"", "\"portz\""),
    )?;
    poll::until("the broken file reported", Duration::from_secs(10), || {
        let log = topo.log(0);
        ensure!(log.contains("web.yaml") && log.contains("portz"), "not yet");
        Ok(())
    })
    .with_context(|| topo.logs())?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 10))?
        .expect_all_ok("last good state")?;
    Ok(())
}

/// Two Services claiming one frontend (CVE-2020-8554): `thief` names
/// `web`'s ClusterIP as its externalIP. Whoever comes first, `web` keeps
/// it, `thief` is reported, and deleting `thief` leaves `web` working.
pub fn frontend_conflict_has_one_winner(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    let thief = service("thief", "10.96.0.11", vec![m::tcp("http", 80, 8080)]).external_ips(&[VIP]);
    topo.write(
        "thief.yaml",
        &[
            thief.to_json(),
            slice("thief-1", "thief", &[("http", "TCP", 8080)], &[b()]),
        ],
    )?;
    topo.wait_backends("default/thief:http", "ClusterIP", &[&ep(B)])?;
    topo.write("web.yaml", &web(web_svc(), &[a()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A)])?;
    topo.wait_for("thief without web's address", |_, fs| {
        fs.iter()
            .filter(|f| f.service == "default/thief:http")
            .all(|f| !f.frontend.starts_with(&format!("{VIP}:")))
    })?;
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 20))?;
    out.expect_all_ok("web's ClusterIP while thief claims it")?;
    ensure!(
        out.by_pod().keys().eq(["pod-a"]),
        "only web's endpoint answers: {}",
        out.summary()
    );
    let node = &topo.nodes[0].ns;
    poll::until(
        "the conflict counted in /metrics",
        Duration::from_secs(10),
        || {
            let (_, text) = Topology::http_get(node, "127.0.0.1:10249", "/metrics")?;
            ensure!(
                text.contains(
                    "kproxy_rejected_objects{kind=\"Service\",reason=\"frontend_conflict\"} 1"
                ),
                "not yet"
            );
            Ok(())
        },
    )?;
    ensure!(
        topo.log(0).contains("frontend_conflict") && topo.log(0).contains("default/web:http"),
        "the log names the conflict and the winner:\n{}",
        topo.logs()
    );
    // The loser goes away: the winner's rules and map entries stay.
    topo.remove("thief.yaml")?;
    topo.wait_gone("default/thief:http")?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A)])?;
    topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 20))?
        .expect_all_ok("web after thief was deleted")?;
    Ok(())
}

/// KEP-3836: a Node being drained by the cluster autoscaler (or deleted)
/// answers 503 on /healthz with nodeEligible false, so load balancers move
/// away; /livez stays 200; the Services keep working.
pub fn draining_node_is_not_eligible(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    let node = |taint: bool| {
        let taints = if taint {
            serde_json::json!([{"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}])
        } else {
            serde_json::json!([])
        };
        serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node1"},
            "spec": {"taints": taints},
        })
    };
    let healthz =
        |i: usize, path: &str| Topology::http_get(&topo.nodes[i].ns, "127.0.0.1:10256", path);
    topo.write("node1.yaml", &[node(true)])?;
    poll::until(
        "node1 /healthz 503, not eligible",
        Duration::from_secs(10),
        || {
            let (code, body) = healthz(0, "/healthz")?;
            ensure!(
                code == 503 && body.contains("\"nodeEligible\":false"),
                "{code} {body}"
            );
            Ok(())
        },
    )
    .with_context(|| topo.logs())?;
    let (code, body) = healthz(0, "/livez")?;
    ensure!(code == 200, "/livez ignores eligibility: {code} {body}");
    let (code, body) = healthz(1, "/healthz")?;
    ensure!(code == 200, "node2 is not drained: {code} {body}");
    topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 10))?
        .expect_all_ok("Services on a draining node")?;
    topo.write("node1.yaml", &[node(false)])?;
    poll::until("node1 eligible again", Duration::from_secs(10), || {
        let (code, body) = healthz(0, "/healthz")?;
        ensure!(
            code == 200 && body.contains("\"nodeEligible\":true"),
            "{code} {body}"
        );
        Ok(())
    })?;
    Ok(())
}

/// `--detect-local-mode`: traffic from `ext` to a ClusterIP, routed to
/// node1 and sent to pod-a there, is masqueraded (pod-a sees node1's
/// address) unless the mode counts `ext` as a local source (pod-a sees
/// `ext`). Each mode once with a setting that includes `ext`, once with one
/// that does not: the answer proves which sources the rules treat as local.
pub fn detect_local_modes_decide_masquerading(mode: Mode) -> Result<()> {
    let mut topo = Topology::build(mode)?;
    for i in 0..topo.pods.len() {
        topo.serve(i, &["--tcp", "8080"])?;
    }
    topo.start_kproxy(1)?;
    topo.route_from_ext(&format!("{VIP}/32"), 0)?;
    let node1 = |pod_cidrs: &[&str]| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node1"},
            "spec": {"podCIDRs": pod_cidrs},
        })
    };
    topo.write("web.yaml", &web(web_svc(), &[a()]))?;
    let lan = "172.30.0.0/24";
    let cases: Vec<(&str, Vec<String>, Option<Value>, &str)> = vec![
        (
            "ClusterCIDR without ext",
            vec!["--detect-local-mode=ClusterCIDR".into()],
            None,
            NODE_IPS[0],
        ),
        (
            "ClusterCIDR with ext",
            vec![
                "--detect-local-mode=ClusterCIDR".into(),
                format!("--cluster-cidr=10.244.0.0/16,{lan}"),
            ],
            None,
            EXT_IP,
        ),
        (
            "NodeCIDR without ext",
            vec!["--detect-local-mode=NodeCIDR".into()],
            Some(node1(&["10.244.1.0/24"])),
            NODE_IPS[0],
        ),
        (
            "NodeCIDR with ext",
            vec!["--detect-local-mode=NodeCIDR".into()],
            Some(node1(&[lan])),
            EXT_IP,
        ),
        (
            "InterfaceNamePrefix without ext",
            vec![
                "--detect-local-mode=InterfaceNamePrefix".into(),
                "--pod-interface-name-prefix=v-".into(),
            ],
            None,
            NODE_IPS[0],
        ),
        (
            "InterfaceNamePrefix with ext",
            vec![
                "--detect-local-mode=InterfaceNamePrefix".into(),
                "--pod-interface-name-prefix=eth".into(),
            ],
            None,
            EXT_IP,
        ),
        (
            "BridgeInterface without ext",
            vec![
                "--detect-local-mode=BridgeInterface".into(),
                "--pod-bridge-interface=cbr0".into(),
            ],
            None,
            NODE_IPS[0],
        ),
        (
            "BridgeInterface with ext",
            vec![
                "--detect-local-mode=BridgeInterface".into(),
                "--pod-bridge-interface=eth0".into(),
            ],
            None,
            EXT_IP,
        ),
    ];
    for (what, args, node, want) in cases {
        topo.stop_kproxy(0)?;
        match node {
            Some(n) => topo.write("node1.yaml", &[n])?,
            None => {
                let _ = topo.remove("node1.yaml");
            }
        }
        topo.nodes[0].config.extra_args = args;
        topo.start_kproxy(0)?;
        let ns = &topo.nodes[0].ns;
        poll::until(
            &format!("{what}: kproxy synced"),
            Duration::from_secs(15),
            || {
                let (code, body) = Topology::http_get(ns, "127.0.0.1:10256", "/healthz")?;
                ensure!(code == 200, "{code} {body}");
                Ok(())
            },
        )
        .with_context(|| topo.logs())?;
        let out = topo.from_ext(&ClientSpec::tcp(format!("{VIP}:80"), 5))?;
        out.expect_all_ok(what)?;
        for a in &out.attempts {
            ensure!(
                a.seen_client_ip() == Some(want),
                "{what}: pod-a saw {:?}, want {want}\n{}",
                a.reply,
                topo.logs()
            );
        }
    }
    Ok(())
}

/// The interface detect-local modes tell this node's pods from outside
/// traffic by the device a packet arrives on, as kube-proxy's `-i` matches
/// do. A ClusterIP whose only endpoint is pod-b (on node2) is reached
/// through node1 from pod-c (arrives on its veth `v-pod-c`, or on the bridge
/// `cbr0` once that veth is a port of it: local, pod-b sees pod-c) and from
/// ext (arrives on node1's eth0: masqueraded, pod-b sees node1). pod-c's
/// client runs outside node1's cgroup: in ebpf mode it takes the TC path,
/// where this is decided.
pub fn interface_detect_local_tells_pods_from_outside(mode: Mode) -> Result<()> {
    let mut topo = Topology::build(mode)?;
    for i in 0..topo.pods.len() {
        topo.serve(i, &["--tcp", "8080"])?;
    }
    topo.nodes[0].config.extra_args = vec![
        "--detect-local-mode=InterfaceNamePrefix".into(),
        "--pod-interface-name-prefix=v-".into(),
    ];
    topo.start_kproxy(0)?;
    topo.start_kproxy(1)?;
    topo.route_from_ext(&format!("{VIP}/32"), 0)?;
    topo.write("web.yaml", &web(web_svc(), &[b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(B)])?;
    let check = |topo: &Topology, what: &str| -> Result<()> {
        let spec = ClientSpec::tcp(format!("{VIP}:80"), 10);
        let from_pod = topo.start_from_pod_unhooked("pod-c", &spec)?.wait()?;
        from_pod.expect_all_ok(&format!("{what}: pod-c"))?;
        let from_ext = topo.from_ext(&spec)?;
        from_ext.expect_all_ok(&format!("{what}: ext"))?;
        for (who, out, want) in [("pod-c", &from_pod, C), ("ext", &from_ext, NODE_IPS[0])] {
            for a in &out.attempts {
                ensure!(
                    a.seen_client_ip() == Some(want),
                    "{what}: {who}'s connection reached pod-b as {:?}, want {want}\n{}",
                    a.reply,
                    topo.logs()
                );
            }
        }
        Ok(())
    };
    check(&topo, "InterfaceNamePrefix v-")?;

    // pod-c behind a bridge, as kubenet's cbr0: its veth becomes a port.
    topo.stop_kproxy(0)?;
    let node1 = &topo.nodes[0].ns;
    node1.ip(&["link", "add", "cbr0", "type", "bridge"])?;
    node1.ip(&["link", "set", "v-pod-c", "master", "cbr0"])?;
    node1.ip(&["link", "set", "cbr0", "up"])?;
    node1.ip(&["route", "replace", &format!("{C}/32"), "dev", "cbr0"])?;
    topo.nodes[0].config.extra_args = vec![
        "--detect-local-mode=BridgeInterface".into(),
        "--pod-bridge-interface=cbr0".into(),
    ];
    topo.start_kproxy(0)?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(B)])?;
    check(&topo, "BridgeInterface cbr0")
}

/// `--iptables-localhost-nodeports` (kube-proxy's default): the node's own
/// processes reach node ports on 127.0.0.1 (iptables mode: kproxy sets
/// route_localnet and masquerades the loopback source; ebpf mode: the
/// socket programs, for sockets of the node's network namespace only). A
/// pod's 127.0.0.1 stays its own. With the flag off, the node's does too.
pub fn localhost_node_ports_from_the_node(mode: Mode) -> Result<()> {
    let mut topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_nodeport(30080), &[a(), b()]))?;
    topo.wait_backends(SVC, "NodePort", &[&ep(A), &ep(B)])?;
    let out = topo.from_node(0, &ClientSpec::tcp("127.0.0.1:30080", 20))?;
    out.expect_all_ok("127.0.0.1:30080 from node1")?;
    ensure!(
        out.by_pod().len() == 2,
        "both endpoints, local and remote: {}",
        out.summary()
    );
    let out = topo.from_pod(
        "pod-c",
        &ClientSpec::tcp("127.0.0.1:30080", 2).timeout_ms(500),
    )?;
    ensure!(
        out.failures().len() == 2,
        "a pod's own 127.0.0.1:30080 is no node port: {}",
        out.summary()
    );
    topo.stop_kproxy(0)?;
    topo.nodes[0].config.extra_args = vec!["--iptables-localhost-nodeports=false".into()];
    topo.start_kproxy(0)?;
    let ns = &topo.nodes[0].ns;
    poll::until("restarted kproxy synced", Duration::from_secs(15), || {
        let (code, body) = Topology::http_get(ns, "127.0.0.1:10256", "/healthz")?;
        ensure!(code == 200, "{code} {body}");
        Ok(())
    })?;
    let out = topo.from_node(0, &ClientSpec::tcp("127.0.0.1:30080", 2).timeout_ms(500))?;
    ensure!(
        out.failures().len() == 2,
        "with --iptables-localhost-nodeports=false 127.0.0.1:30080 must not answer: {}",
        out.summary()
    );
    Ok(())
}

/// IPv6 is not programmed yet, and never silently: a dual-stack Service is
/// served on its IPv4 address and reported for its IPv6 one; an IPv6-only
/// Service is reported; both in the log (once), in /metrics and in
/// `kproxy status`.
pub fn ipv6_is_reported_not_dropped(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    let mut dual = web_svc().to_json();
    dual["spec"]["clusterIPs"] = serde_json::json!([VIP, "fd00::10"]);
    dual["spec"]["ipFamilies"] = serde_json::json!(["IPv4", "IPv6"]);
    let mut v6 = service("web6", "fd00::20", vec![m::tcp("http", 80, 8080)]).to_json();
    v6["spec"]["clusterIPs"] = serde_json::json!(["fd00::20"]);
    topo.write(
        "web.yaml",
        &[
            dual,
            slice("web-1", "web", &[("http", "TCP", 8080)], &[a()]),
        ],
    )?;
    topo.write("web6.yaml", &[v6])?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A)])?;
    topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 5))?
        .expect_all_ok("the IPv4 part of a dual-stack Service")?;
    let node = &topo.nodes[0].ns;
    poll::until("IPv6 counted in /metrics", Duration::from_secs(10), || {
        let (_, text) = Topology::http_get(node, "127.0.0.1:10249", "/metrics")?;
        ensure!(
            text.contains(
                "kproxy_rejected_objects{kind=\"Service\",reason=\"ipv6_unsupported\"} 2"
            ),
            "not yet"
        );
        Ok(())
    })?;
    let log = topo.log(0);
    for name in ["\"web\"", "\"web6\""] {
        let lines = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("ipv6_unsupported") && l.contains(name))
            .count();
        ensure!(
            lines == 1,
            "{name}: one warning at first sight, got {lines}:\n{log}"
        );
    }
    let out =
        kproxy_tests::kproxy::run_command(node, &topo.nodes[0].config, &["status", "-o", "json"])?;
    let rows: Vec<Value> = serde_json::from_str(&out)?;
    for svc in ["default/web", "default/web6"] {
        ensure!(
            rows.iter()
                .any(|r| r["service"] == svc && r["kind"] == "IPv6" && r["programmed"] == false),
            "status must mark {svc}'s IPv6 part: {out}"
        );
    }
    let table = kproxy_tests::kproxy::run_command(node, &topo.nodes[0].config, &["status"])?;
    ensure!(table.contains("default/web6  [IPv6]"), "{table}");
    Ok(())
}

/// A user error of kproxy: one line on stderr (with `RUST_BACKTRACE=1`),
/// containing every one of `want`.
fn one_line_error(
    what: &str,
    status: std::process::ExitStatus,
    stderr: &str,
    want: &[&str],
) -> Result<()> {
    ensure!(
        !status.success(),
        "{what} must fail, it exited with {status}: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "{what}: want one error line, got:\n{stderr}"
    );
    for w in want {
        ensure!(
            lines[0].contains(w),
            "{what}: the error must name {w:?}: {}",
            lines[0]
        );
    }
    Ok(())
}

/// `bpftool -j ARGS`, parsed.
fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = kproxy_tests::netns::run("bpftool", &[&["-j"], args].concat())?;
    serde_json::from_str(&out).with_context(|| format!("bpftool {args:?}: {out}"))
}

/// Which map a pin holds (its id).
fn pinned_map_id(path: &std::path::Path) -> Result<u64> {
    let path = path.to_str().context("pin path")?;
    let v = bpftool_json(&["map", "show", "pinned", path])?;
    v["id"].as_u64().with_context(|| format!("no id in {v}"))
}

/// The u64 in entry 0 of a pinned array (the layout stamp).
fn pinned_stamp(path: &std::path::Path) -> Result<u64> {
    let path = path.to_str().context("pin path")?;
    let v = bpftool_json(&["map", "lookup", "pinned", path, "key", "0", "0", "0", "0"])?;
    let bytes = v["value"]
        .as_array()
        .with_context(|| format!("no value in {v}"))?
        .iter()
        .map(|b| {
            let text = b.as_str().unwrap_or_default().trim_start_matches("0x");
            u8::from_str_radix(text, 16).with_context(|| format!("byte {b} in {v}"))
        })
        .collect::<Result<Vec<u8>>>()?;
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("not 8 bytes: {v}"))?;
    Ok(u64::from_le_bytes(bytes))
}

/// One kproxy per pin path: a second `kproxy run` on the same
/// --bpf-pin-path is refused before it touches anything, naming the
/// running one's PID; `kproxy cleanup` is refused while it runs, and with
/// --force removes everything.
pub fn pin_path_has_one_owner(mode: Mode) -> Result<()> {
    let topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    let node = &topo.nodes[0];
    let pid = node.kproxy.as_ref().context("kproxy on node1")?.pid();
    let pin = node.config.pin_path.clone().context("ebpf pin path")?;
    let pin_text = pin.display().to_string();
    let frontends_id = pinned_map_id(&pin.join("maps/FRONTENDS"))?;
    let snapshot = topo.dataplane_snapshot(0)?;
    let timeout = Duration::from_secs(30);

    let (status, stderr) =
        kproxy_tests::kproxy::run_bounded(&node.ns, &node.config.run_args()?, timeout)?;
    one_line_error(
        "a second kproxy run",
        status,
        &stderr,
        &[&format!("pid {pid}"), &pin_text],
    )?;
    ensure!(
        pinned_map_id(&pin.join("maps/FRONTENDS"))? == frontends_id
            && topo.dataplane_snapshot(0)? == snapshot,
        "the refused instance touched the pinned state"
    );
    topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 20))?
        .expect_all_ok("the first instance after the second was refused")?;

    let mut cleanup: Vec<String> = vec!["cleanup".into()];
    cleanup.extend(node.config.mode_args());
    let (status, stderr) = kproxy_tests::kproxy::run_bounded(&node.ns, &cleanup, timeout)?;
    one_line_error(
        "kproxy cleanup under a live kproxy",
        status,
        &stderr,
        &[&format!("pid {pid}"), "--force"],
    )?;
    ensure!(
        pin.join("maps/FRONTENDS").exists(),
        "the refused cleanup removed pins"
    );
    topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 20))?
        .expect_all_ok("after the refused cleanup")?;

    cleanup.push("--force".into());
    let (status, stderr) = kproxy_tests::kproxy::run_bounded(&node.ns, &cleanup, timeout)?;
    ensure!(
        status.success(),
        "kproxy cleanup --force: {status}: {stderr}"
    );
    ensure!(!pin.exists(), "kproxy cleanup --force left {pin_text}");
    let progs = kproxy_tests::netns::run(
        "bpftool",
        &["cgroup", "show", &node.cgroup.path().display().to_string()],
    )?;
    ensure!(
        progs.trim().is_empty(),
        "programs left on the cgroup: {progs}"
    );
    Ok(())
}

/// A kproxy that finds pinned maps of another layout (here: the stamp map
/// rewritten while kproxy was stopped, its programs still running) takes
/// over with fresh maps and programs, with a warning naming both stamps,
/// instead of failing to start while the old programs serve frozen state.
pub fn changed_layout_stamp_takes_over_with_fresh_maps(mode: Mode) -> Result<()> {
    let mut topo = Topology::start(mode)?;
    topo.write("web.yaml", &web(web_svc(), &[a(), b()]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    let pin = topo.nodes[0]
        .config
        .pin_path
        .clone()
        .context("ebpf pin path")?;
    let stamp_map = pin.join("maps/LAYOUT");
    let ours = pinned_stamp(&stamp_map)?;
    topo.stop_kproxy(0)?;
    let frontends_id = pinned_map_id(&pin.join("maps/FRONTENDS"))?;
    let other: u64 = 0x0807_0605_0403_0201;
    kproxy_tests::netns::run(
        "bpftool",
        &[
            "map",
            "update",
            "pinned",
            stamp_map.to_str().context("pin path")?,
            "key",
            "0",
            "0",
            "0",
            "0",
            "value",
            "1",
            "2",
            "3",
            "4",
            "5",
            "6",
            "7",
            "8",
        ],
    )?;
    ensure!(
        pinned_stamp(&stamp_map)? == other,
        "the test could not change the stamp"
    );
    topo.start_kproxy(0)?;
    poll::until("the take-over logged", Duration::from_secs(20), || {
        let log = topo.log(0);
        ensure!(log.contains("replaced_other_layout=true"), "not yet");
        Ok(())
    })
    .with_context(|| topo.logs())?;
    let log = topo.log(0);
    ensure!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("another layout")
            && l.contains(&format!("{other:016x}"))
            && l.contains(&format!("{ours:016x}"))),
        "a warning must name the pinned and the new layout:\n{log}"
    );
    ensure!(
        pinned_map_id(&pin.join("maps/FRONTENDS"))? != frontends_id,
        "the maps of the other layout were kept"
    );
    ensure!(
        pinned_stamp(&stamp_map)? == ours,
        "the stamp was not rewritten"
    );
    ensure!(
        !pin.join("maps_retired").exists(),
        "the retired pins were left"
    );
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A), &ep(B)])?;
    topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 20))?
        .expect_all_ok("ClusterIP after the take-over")?;
    topo.from_node(0, &ClientSpec::tcp(format!("{VIP}:80"), 20))?
        .expect_all_ok("ClusterIP from node1 after the take-over")?;
    Ok(())
}

/// Writes a `#[test]` per scenario for one mode.
macro_rules! scenario_tests {
    ($mode:expr; $($scenario:ident),* $(,)?) => {
        $(
            #[test]
            fn $scenario() -> anyhow::Result<()> {
                super::$scenario($mode)
            }
        )*
    };
}

/// The scenario list, written once.
macro_rules! all_scenarios {
    ($mode:expr) => {
        scenario_tests!(
            $mode;
            clusterip_spreads_over_every_endpoint,
            nodeport_through_either_node,
            etp_cluster_backend_sees_node_address,
            etp_local_preserves_client_and_drops_without_endpoint,
            itp_local_keeps_traffic_on_node,
            session_affinity_sticks_to_one_backend,
            no_endpoints_is_refused_at_once,
            endpoint_changes_under_load,
            terminating_only_service_still_serves,
            udp_service,
            multiport_with_named_target_ports,
            health_check_node_port_and_load_balancer_ip,
            external_ips_from_outside,
            load_balancer_source_ranges,
            hairpin_pod_reaches_itself,
            v4_mapped_ipv6_sockets_are_balanced,
            restart_keeps_traffic_flowing,
            cleanup_restores_the_namespace,
            bad_input_is_rejected_and_contained,
            broken_file_keeps_last_good_state,
            frontend_conflict_has_one_winner,
            draining_node_is_not_eligible,
            detect_local_modes_decide_masquerading,
            interface_detect_local_tells_pods_from_outside,
            ipv6_is_reported_not_dropped,
            localhost_node_ports_from_the_node,
        );
    };
}

mod iptables {
    use super::*;
    all_scenarios!(Mode::Iptables);
}

mod ebpf {
    use super::*;
    all_scenarios!(Mode::Ebpf);
    scenario_tests!(
        Mode::Ebpf;
        pin_path_has_one_owner,
        changed_layout_stamp_takes_over_with_fresh_maps,
    );
}
