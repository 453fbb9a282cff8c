//! Real traffic through the packet path: many short flows through a
//! NodePort that needs SNAT, idle and draining flows, a SYN flood, a small
//! MTU, fragmented datagrams and ICMP errors. Each test builds its own
//! topology (see tests/src/topo.rs) and runs in both modes where the
//! behaviour is shared; ebpf mode gets short timeouts and small maps through
//! its flags so expiry and floods happen within seconds.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kproxy_tests::client::ClientSpec;
use kproxy_tests::manifests::{self as m, ready, service, slice, Endpoint};
use kproxy_tests::topo::NODE_IPS;
use kproxy_tests::{poll, Mode, Topology};
use serde_json::Value;

const A: &str = "10.244.1.10"; // pod-a on node1
const B: &str = "10.244.2.10"; // pod-b on node2
const VIP: &str = "10.96.0.10";
const NODE1: &str = NODE_IPS[0];

/// ebpf mode's conntrack shrunk to seconds (iptables mode ignores them).
const SHORT_CT: &[&str] = &[
    "--bpf-ct-timeout-syn=2s",
    "--bpf-ct-timeout-close=1s",
    "--conntrack-udp-timeout=2s",
    "--conntrack-udp-timeout-stream=3s",
    "--bpf-ct-gc-interval=200ms",
];

fn a() -> Endpoint {
    ready(A, "node1")
}
fn b() -> Endpoint {
    ready(B, "node2")
}

/// Builds the topology, serves the usual ports plus a UDP echo on 7777 in
/// every pod, and starts kproxy with `extra` flags (ebpf ones only in
/// ebpf mode).
fn start(mode: Mode, extra: &[&str]) -> Result<Topology> {
    let mut topo = Topology::build(mode)?;
    for i in 0..topo.pods.len() {
        topo.serve(
            i,
            &[
                "--tcp",
                "8080",
                "--tcp",
                "9090",
                "--udp",
                "5353",
                "--tcp-close-first",
                "8081",
            ],
        )?;
        topo.serve(i, &["--udp-echo", "7777"])?;
    }
    for node in &mut topo.nodes {
        node.config.extra_args = extra
            .iter()
            .filter(|a| mode == Mode::Ebpf || !a.starts_with("--bpf-"))
            .map(|a| a.to_string())
            .collect();
    }
    for i in 0..topo.nodes.len() {
        topo.start_kproxy(i)?;
    }
    Ok(topo)
}

/// `web`: TCP 80 -> 8080 on node port 30080, UDP 53 -> 5353 on 30053.
fn web(endpoints: &[Endpoint]) -> Vec<Value> {
    vec![
        service(
            "web",
            VIP,
            vec![
                m::tcp("http", 80, 8080).node_port(30080),
                m::udp("dns", 53, 5353).node_port(30053),
            ],
        )
        .to_json(),
        slice(
            "web-1",
            "web",
            &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
            endpoints,
        ),
    ]
}

/// A Service `name` with the one NodePort `port`, whose only endpoint is
/// pod-b on node2; returns once kproxy serves it.
fn service_on_b(topo: &Topology, name: &str, vip: &str, port: m::Port) -> Result<()> {
    let (port_name, proto) = (port.name.clone(), port.protocol);
    let target = port.target.as_u64().context("numeric targetPort")? as u16;
    topo.write(
        &format!("{name}.yaml"),
        &[
            service(name, vip, vec![port]).to_json(),
            slice(
                &format!("{name}-1"),
                name,
                &[(port_name.as_str(), proto, target)],
                &[b()],
            ),
        ],
    )?;
    topo.wait_backends(
        &format!("default/{name}:{port_name}"),
        "NodePort",
        &[&format!("{B}:{target}")],
    )
}

fn pod_of(reply: Option<&str>) -> Option<String> {
    reply
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string)
}

/// 20,000 short TCP connections and 20,000 UDP exchanges, each from a
/// fresh socket, from outside through node1's NodePort to the only endpoint
/// on node2 (every flow needs a SNAT port): none fails, and in ebpf mode
/// the conntrack and NAT maps are back near empty once the timeouts pass.
pub fn many_short_flows_through_a_snat_node_port(mode: Mode) -> Result<()> {
    let mut extra = SHORT_CT.to_vec();
    extra.push("--bpf-ct-map-max=65536");
    let topo = start(mode, &extra)?;
    topo.write("web.yaml", &web(&[b()]))?;
    topo.wait_backends("default/web:http", "NodePort", &[&format!("{B}:8080")])?;
    let tcp = topo.from_ext(&ClientSpec::tcp(format!("{NODE1}:30080"), 20_000).timeout_ms(3000))?;
    tcp.expect_all_ok("20,000 TCP connections through the NodePort")?;
    ensure!(
        tcp.attempts
            .iter()
            .all(|a| a.seen_client_ip() == Some(NODE1)),
        "the backend saw an untranslated client: {:?}",
        tcp.attempts
            .iter()
            .find(|a| a.seen_client_ip() != Some(NODE1))
    );
    let udp = topo.from_ext(&ClientSpec::udp(format!("{NODE1}:30053"), 20_000).timeout_ms(3000))?;
    udp.expect_all_ok("20,000 UDP exchanges through the NodePort")?;
    if mode == Mode::Ebpf {
        // A flow lives at most a few seconds here: everything must go.
        for map in ["CT", "CT_NEW", "NAT", "NAT_NEW"] {
            poll::until(
                &format!("{map} back near empty"),
                Duration::from_secs(40),
                || {
                    let p = topo.metric(0, "kproxy_bpf_map_pressure", &format!("map=\"{map}\""))?;
                    ensure!(p < 0.002, "{map} pressure {p}");
                    Ok(())
                },
            )?;
        }
        let exhausted = topo.metric(
            0,
            "kproxy_bpf_datapath_events_total",
            "event=\"nat_port_exhausted\"",
        )?;
        ensure!(exhausted == 0.0, "{exhausted} NAT port allocations failed");
    }
    Ok(())
}

/// A backend that closes first (an HTTP/1.0 server) holds each 4-tuple in
/// TIME_WAIT for a minute and answers a new connection's SYN on it with an
/// ACK (the client resets and retries, or times out). 64 connections from
/// outside through a NodePort that needs SNAT, with 64 NAT ports in ebpf
/// mode: each gets a 4-tuple of its own at the backend, none reuses one the
/// backend still holds, and every one succeeds at once.
pub fn backend_closing_first_keeps_its_time_wait_tuples(mode: Mode) -> Result<()> {
    let mut extra = SHORT_CT.to_vec();
    extra.push("--bpf-nat-port-range=40000-40063");
    let topo = start(mode, &extra)?;
    service_on_b(
        &topo,
        "http10",
        "10.96.0.81",
        m::tcp("http", 81, 8081).node_port(30081),
    )?;
    let out = topo.from_ext(
        &ClientSpec::tcp(format!("{NODE1}:30081"), 64)
            .until_eof()
            .timeout_ms(3000),
    )?;
    out.expect_all_ok("64 connections to a backend that closes first")?;
    let mut seen: Vec<&str> = out
        .attempts
        .iter()
        .filter_map(|a| a.reply.as_deref()?.split(' ').nth(1))
        .collect();
    seen.sort_unstable();
    let reused: Vec<_> = seen
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    ensure!(
        reused.is_empty(),
        "the backend saw a client address twice while holding it in TIME_WAIT: {reused:?}"
    );
    // The connections are sequential: the ACK-and-retry of a reused 4-tuple
    // shows as a slow connect.
    let slow: Vec<_> = out.attempts.iter().filter(|a| a.ms > 200.0).collect();
    ensure!(
        slow.is_empty(),
        "slow connections (a SYN answered from TIME_WAIT): {slow:?}"
    );
    if mode == Mode::Ebpf {
        let reused = topo.metric(
            0,
            "kproxy_bpf_datapath_events_total",
            "event=\"time_wait_reused\"",
        )?;
        ensure!(
            reused == 0.0,
            "{reused} NAT ports reused from TIME_WAIT with free ones left"
        );
    }
    Ok(())
}

/// A connection idle across many garbage-collector sweeps still works.
pub fn idle_flow_outlives_gc_sweeps(mode: Mode) -> Result<()> {
    let topo = start(mode, SHORT_CT)?;
    topo.write("web.yaml", &web(&[b()]))?;
    topo.wait_backends("default/web:http", "NodePort", &[&format!("{B}:8080")])?;
    // Two exchanges 4 s apart on one connection: 20 sweeps in between,
    // twice the SYN and UDP timeouts.
    let out = topo.from_ext(
        &ClientSpec::tcp(format!("{NODE1}:30080"), 2)
            .hold()
            .interval_ms(4000),
    )?;
    out.expect_all_ok("an idle connection through the NodePort")?;
    Ok(())
}

/// The topology with short timeouts and `web` served by pod-a and pod-b.
fn web_on_both_nodes(mode: Mode) -> Result<Topology> {
    let topo = start(mode, SHORT_CT)?;
    topo.write("web.yaml", &web(&[a(), b()]))?;
    topo.wait_backends(
        "default/web:http",
        "NodePort",
        &[&format!("{A}:8080"), &format!("{B}:8080")],
    )?;
    Ok(topo)
}

/// An endpoint that leaves its slice (a draining pod) keeps its
/// established connection; new connections go to the others.
pub fn draining_endpoint_keeps_established_flows(mode: Mode) -> Result<()> {
    let topo = web_on_both_nodes(mode)?;
    let held = topo.start_from_ext(
        &ClientSpec::tcp(format!("{NODE1}:30080"), 30)
            .hold()
            .interval_ms(100),
    )?;
    held.wait_until(
        "the held connection answers",
        Duration::from_secs(10),
        |a| a.iter().filter(|a| a.ok).count() >= 3,
    )?;
    let first = held.attempts_so_far();
    let pod = pod_of(first[0].reply.as_deref()).context("first reply names no pod")?;
    let (gone, stays, stays_ep) = if pod == "pod-a" {
        (A, B, b())
    } else {
        (B, A, a())
    };
    topo.write("web.yaml", &web(&[stays_ep]))?;
    topo.wait_backends("default/web:http", "NodePort", &[&format!("{stays}:8080")])?;
    let out = held.wait()?;
    out.expect_all_ok("the established connection after its endpoint left")?;
    ensure!(
        out.attempts
            .iter()
            .all(|a| pod_of(a.reply.as_deref()).as_deref() == Some(pod.as_str())),
        "the established connection moved: {}",
        out.summary()
    );
    let fresh = topo.from_ext(&ClientSpec::tcp(format!("{NODE1}:30080"), 20))?;
    fresh.expect_all_ok("new connections after the change")?;
    ensure!(
        fresh.attempts.iter().all(|a| a.seen_client_ip().is_some()
            && pod_of(a.reply.as_deref()).as_deref() != Some(pod.as_str())),
        "a new connection reached the removed endpoint {gone}: {}",
        fresh.summary()
    );
    Ok(())
}

/// In each backend pod, drops the first SYN of every connection (and
/// records its source in the set `firstsyn`), so every client retransmits
/// its SYN once. The first SYN rather than the SYN-ACK: the backend's own
/// SYN-ACK retransmission would race the client's SYN retransmission, and
/// the proxy sees the same thing either way (a SYN and no answer).
fn drop_first_syns(topo: &Topology, pods: &[&str]) -> Result<()> {
    let rules = "table inet kpt_firstsyn {
  set firstsyn { type ipv4_addr . inet_service; flags dynamic; size 65535; }
  chain input {
    type filter hook input priority 0;
    tcp flags & (syn | ack) == syn ip saddr . tcp sport @firstsyn accept
    tcp flags & (syn | ack) == syn add @firstsyn { ip saddr . tcp sport } drop
  }
}
";
    let file = topo.workdir().join("firstsyn.nft");
    std::fs::write(&file, rules)?;
    for pod in pods {
        topo.pod(pod)
            .ns
            .exec("nft", &["-f", file.to_str().context("path")?])
            .with_context(|| format!("nft in {pod}"))?;
    }
    Ok(())
}

/// The sources (`ip:port`) whose first SYN `pod` dropped.
fn first_syns(topo: &Topology, pod: &str) -> Result<Vec<String>> {
    let out = topo.pod(pod).ns.exec(
        "nft",
        &["-j", "list", "set", "inet", "kpt_firstsyn", "firstsyn"],
    )?;
    let v: Value = serde_json::from_str(&out).context("nft -j output")?;
    let mut seen = Vec::new();
    for item in v["nftables"].as_array().context("nftables array")? {
        for e in item["set"]["elem"].as_array().into_iter().flatten() {
            // A plain element, or {"elem": {"val": ..}} when it has a timeout.
            let c = e.get("elem").map_or(e, |x| &x["val"]);
            let c = c["concat"].as_array().context("concat element")?;
            seen.push(format!("{}:{}", c[0].as_str().unwrap_or("?"), c[1]));
        }
    }
    Ok(seen)
}

/// Every connection's first SYN is lost at its backend: the retransmitted
/// SYN reaches the backend the first one chose, never the other one, and
/// the connection completes there.
pub fn retransmitted_syn_keeps_its_backend(mode: Mode) -> Result<()> {
    let topo = web_on_both_nodes(mode)?;
    drop_first_syns(&topo, &["pod-a", "pod-b"])?;
    // Concurrent connections, one each: with two backends, a SYN that
    // forgot its backend would move in half of them.
    let clients = (0..12)
        .map(|_| {
            topo.start_from_ext(&ClientSpec::tcp(format!("{NODE1}:30080"), 1).timeout_ms(8000))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut answered = Vec::new();
    for c in clients {
        let out = c.wait()?;
        out.expect_all_ok("a connection whose first SYN was dropped")?;
        answered.extend(out.attempts);
    }
    let dropped = [first_syns(&topo, "pod-a")?, first_syns(&topo, "pod-b")?];
    for a in &answered {
        let reply = a.reply.as_deref().unwrap_or("");
        let seen = reply.split(' ').nth(1).context("reply names no client")?;
        let (here, other) = match a.pod() {
            Some("pod-a") => (&dropped[0], &dropped[1]),
            _ => (&dropped[1], &dropped[0]),
        };
        ensure!(
            here.iter().any(|s| s == seen),
            "{reply}: the answering pod never dropped a first SYN from {seen} \
             (no retransmission happened?); dropped {dropped:?}"
        );
        ensure!(
            !other.iter().any(|s| s == seen),
            "{reply}: the retransmitted SYN of {seen} went to the other backend first"
        );
    }
    Ok(())
}

/// 150,000 SYNs from random sources at map sizes shrunk to 4,096 flows:
/// an established idle connection keeps working, and new ones connect.
pub fn syn_flood_leaves_established_flows_alone(mode: Mode) -> Result<()> {
    let mut extra = SHORT_CT.to_vec();
    extra.push("--bpf-ct-map-max=4096");
    let topo = start(mode, &extra)?;
    topo.write("web.yaml", &web(&[b()]))?;
    topo.wait_backends("default/web:http", "NodePort", &[&format!("{B}:8080")])?;
    let idle = topo.start_from_ext(
        &ClientSpec::tcp(format!("{NODE1}:30080"), 2)
            .hold()
            .interval_ms(15_000),
    )?;
    idle.wait_until(
        "the idle connection answers",
        Duration::from_secs(10),
        |a| a.iter().any(|a| a.ok),
    )?;
    let bin = kproxy_tests::client::testpod_binary()?;
    let mut flood = topo.ext.command(bin.to_str().context("path")?, None);
    flood.args([
        "flood",
        "--target",
        &format!("{NODE1}:30080"),
        "--count",
        "150000",
        "--max-ms",
        "12000",
    ]);
    let report = kproxy_tests::netns::output(&mut flood, "SYN flood")?;
    let out = idle.wait()?;
    out.expect_all_ok(&format!(
        "an idle connection across a SYN flood ({})",
        report.trim()
    ))?;
    topo.from_ext(&ClientSpec::tcp(format!("{NODE1}:30080"), 50).timeout_ms(3000))?
        .expect_all_ok("new connections after the flood")?;
    Ok(())
}

/// A 1 MiB download through a SNAT NodePort by a client whose link has
/// MTU 1280.
pub fn small_mtu_client_downloads_through_a_node_port(mode: Mode) -> Result<()> {
    let topo = start(mode, SHORT_CT)?;
    topo.ext.ip(&["link", "set", "eth0", "mtu", "1280"])?;
    topo.lan.ip(&["link", "set", "l-ext", "mtu", "1280"])?;
    topo.write("web.yaml", &web(&[b()]))?;
    topo.wait_backends("default/web:http", "NodePort", &[&format!("{B}:8080")])?;
    let out = topo.from_ext(&download(format!("{NODE1}:30080")))?;
    out.expect_all_ok("1 MiB through the NodePort at MTU 1280")?;
    Ok(())
}

fn download(target: String) -> ClientSpec {
    let mut spec = ClientSpec::tcp(target, 3).timeout_ms(5000);
    spec.extra = vec!["--download".into(), (1 << 20).to_string()];
    spec
}

fn sized_udp(target: String, size: usize) -> ClientSpec {
    let mut spec = ClientSpec::udp(target, 20).timeout_ms(2000);
    spec.extra = vec!["--size".into(), size.to_string()];
    spec
}

/// `echo` (UDP 7777, policy Cluster, endpoint pod-b) on node port 30077;
/// `echo-local` (policy Local, endpoint pod-a on node1) on 30078.
fn echo() -> Vec<Value> {
    vec![
        service(
            "echo",
            "10.96.0.20",
            vec![m::udp("echo", 7777, 7777).node_port(30077)],
        )
        .to_json(),
        slice("echo-1", "echo", &[("echo", "UDP", 7777)], &[b()]),
        service(
            "echo-local",
            "10.96.0.21",
            vec![m::udp("echo", 7777, 7777).node_port(30078)],
        )
        .etp_local()
        .to_json(),
        slice(
            "echo-local-1",
            "echo-local",
            &[("echo", "UDP", 7777)],
            &[a()],
        ),
    ]
}

/// 3,000-byte datagrams (two fragments each way) through a NodePort with
/// policy Cluster and Local, and through a ClusterIP from a pod that
/// kproxy does not hook (the packet path).
pub fn fragmented_udp_through_every_path(mode: Mode) -> Result<()> {
    let topo = start(mode, SHORT_CT)?;
    topo.write("echo.yaml", &echo())?;
    topo.wait_backends("default/echo:echo", "NodePort", &[&format!("{B}:7777")])?;
    topo.wait_backends(
        "default/echo-local:echo",
        "ClusterIP",
        &[&format!("{A}:7777")],
    )?;
    topo.from_ext(&sized_udp(format!("{NODE1}:30077"), 3000))?
        .expect_all_ok("3,000-byte datagrams through a NodePort (Cluster)")?;
    topo.from_ext(&sized_udp(format!("{NODE1}:30078"), 3000))?
        .expect_all_ok("3,000-byte datagrams through a NodePort (Local)")?;
    topo.start_from_pod_unhooked("pod-c", &sized_udp("10.96.0.20:7777".into(), 3000))?
        .wait()?
        .expect_all_ok("3,000-byte datagrams through a ClusterIP from an unhooked pod")?;
    Ok(())
}

/// A backend's "port unreachable" reaches the client as a refusal (the
/// ICMP error's quoted packet is translated back).
pub fn icmp_port_unreachable_reaches_the_client(mode: Mode) -> Result<()> {
    let topo = start(mode, SHORT_CT)?;
    service_on_b(
        &topo,
        "closed",
        "10.96.0.30",
        m::udp("closed", 5399, 5999).node_port(30099),
    )?;
    let out = topo.from_ext(&ClientSpec::udp(format!("{NODE1}:30099"), 5).timeout_ms(2000))?;
    ensure!(
        out.attempts
            .iter()
            .all(|a| a.error.as_deref() == Some("refused")),
        "expected every datagram refused (ICMP port unreachable): {}",
        out.summary()
    );
    Ok(())
}

/// A firewall reload (every table flushed, every chain deleted, with both
/// iptables backends) is repaired at the next periodic sync: kproxy's
/// canary chain in mangle is gone, so that sync rewrites every rule. The
/// full rewrite itself comes only once an hour, as in kube-proxy.
pub fn a_firewall_reload_is_repaired_at_the_next_periodic_sync(mode: Mode) -> Result<()> {
    let topo = start(mode, &["--iptables-sync-period=1s"])?;
    service_on_b(
        &topo,
        "fw",
        "10.96.0.40",
        m::tcp("http", 80, 8080).node_port(30040),
    )?;
    let target = format!("{NODE1}:30040");
    topo.from_ext(&ClientSpec::tcp(&target, 5))?
        .expect_all_ok("connections through the NodePort before the reload")?;
    let ns = &topo.nodes[0].ns;
    for tool in ["iptables-legacy", "iptables-nft"] {
        for table in ["mangle", "nat", "filter"] {
            for op in ["-F", "-X"] {
                // A backend that holds nothing may refuse; the other one counts.
                let _ = ns.exec(tool, &["-w", "-t", table, op]);
            }
        }
    }
    let refused = topo.from_ext(&ClientSpec::tcp(&target, 1).timeout_ms(500))?;
    ensure!(
        !refused.all_ok(),
        "the NodePort still answered with every rule flushed: {}",
        refused.summary()
    );
    kproxy_tests::poll::until(
        "the rules rewritten after the reload",
        Duration::from_secs(30),
        || {
            topo.from_ext(&ClientSpec::tcp(&target, 3).timeout_ms(500))?
                .expect_all_ok("connections through the NodePort after the reload")
                .map(drop)
        },
    )?;
    Ok(())
}

/// A ClusterIP Service `name` on TCP 80 -> 8080 of pod-b.
fn cluster_ip_on_b(name: &str, vip: &str) -> Vec<Value> {
    vec![
        service(name, vip, vec![m::tcp("http", 80, 8080)]).to_json(),
        slice(&format!("{name}-1"), name, &[("http", "TCP", 8080)], &[b()]),
    ]
}

/// What node1's kproxy reports about its frontends (`kproxy status
/// --summary -o json`): `{"frontends": {"counts", "frontends"}, ...}`.
fn frontend_report(topo: &Topology) -> Result<Value> {
    let node = &topo.nodes[0];
    let out = kproxy_tests::kproxy::run_command(
        &node.ns,
        &node.config,
        &["status", "--summary", "-o", "json"],
    )?;
    let v: Value = serde_json::from_str(&out).context("parsing kproxy status --summary")?;
    ensure!(
        v["frontends"].is_object(),
        "the running kproxy did not answer: {out}"
    );
    Ok(v["frontends"].clone())
}

/// A Service that does not fit in the BPF maps (`--bpf-lb-map-max=2`, two
/// Services already there) is shown in error by `kproxy status`, naming
/// the map and the flag, while the others carry traffic; when one of them
/// goes, the retry programs it and it carries traffic too.
fn a_service_that_does_not_fit_is_shown_in_error_and_the_others_carry_traffic(
    mode: Mode,
) -> Result<()> {
    let topo = start(mode, &["--bpf-lb-map-max=2"])?;
    topo.write("web.yaml", &cluster_ip_on_b("web", VIP))?;
    topo.write("api.yaml", &cluster_ip_on_b("api", "10.96.0.11"))?;
    topo.wait_backends("default/web:http", "ClusterIP", &[&format!("{B}:8080")])?;
    topo.wait_backends("default/api:http", "ClusterIP", &[&format!("{B}:8080")])?;
    topo.write("big.yaml", &cluster_ip_on_b("big", "10.96.0.12"))?;

    let report = poll::until("big in error", Duration::from_secs(15), || {
        let r = frontend_report(&topo)?;
        ensure!(r["counts"]["error"] == 1, "{r:#}");
        Ok(r)
    })?;
    ensure!(report["counts"]["applied"] == 2, "{report:#}");
    let big = &report["frontends"][0];
    ensure!(
        big["service"] == "default/big:http"
            && big["kind"] == "ClusterIP"
            && big["frontend"] == "10.96.0.12:80/tcp"
            && big["status"] == "error"
            && big["reason"] == "map_full",
        "{report:#}"
    );
    let error = big["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("is full (2 entries); raise --bpf-lb-map-max"),
        "{error}"
    );
    // What a user reads.
    let node = &topo.nodes[0];
    let text = kproxy_tests::kproxy::run_command(&node.ns, &node.config, &["status"])?;
    ensure!(
        text.contains("FRONTENDS (as the running kproxy reports): 2 applied, 0 pending, 1 error")
            && text.lines().any(|l| l.starts_with("default/big:http")
                && l.contains("error")
                && l.contains("raise --bpf-lb-map-max")),
        "kproxy status:\n{text}"
    );
    // The Services that fit carry traffic.
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 50))?;
    out.expect_all_ok("web while big does not fit")?;

    // api goes: big is retried in the same sync, and works.
    topo.remove("api.yaml")?;
    topo.wait_backends("default/big:http", "ClusterIP", &[&format!("{B}:8080")])?;
    let out = topo.from_pod("pod-c", &ClientSpec::tcp("10.96.0.12:80".to_string(), 50))?;
    out.expect_all_ok("big once it fits")?;
    let report = frontend_report(&topo)?;
    ensure!(
        report["counts"]["error"] == 0 && report["counts"]["applied"] == 2,
        "{report:#}"
    );
    Ok(())
}

macro_rules! traffic_tests {
    ($mode:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() -> anyhow::Result<()> {
                super::$name($mode)
            }
        )*
    };
}

macro_rules! shared {
    ($mode:expr) => {
        traffic_tests!(
            $mode;
            many_short_flows_through_a_snat_node_port,
            backend_closing_first_keeps_its_time_wait_tuples,
            idle_flow_outlives_gc_sweeps,
            draining_endpoint_keeps_established_flows,
            retransmitted_syn_keeps_its_backend,
            small_mtu_client_downloads_through_a_node_port,
            fragmented_udp_through_every_path,
            icmp_port_unreachable_reaches_the_client,
        );
    };
}

mod iptables {
    use kproxy_tests::Mode;
    shared!(Mode::Iptables);
    traffic_tests!(
        Mode::Iptables;
        a_firewall_reload_is_repaired_at_the_next_periodic_sync,
    );
}

mod ebpf {
    use kproxy_tests::Mode;
    shared!(Mode::Ebpf);
    traffic_tests!(
        Mode::Ebpf;
        syn_flood_leaves_established_flows_alone,
        a_service_that_does_not_fit_is_shown_in_error_and_the_others_carry_traffic,
    );
}
