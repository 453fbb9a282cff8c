//! `kproxy forward ... PORT/udp` end to end in the namespace topology: the
//! test API server listens in the LAN namespace and serves port-forward as
//! containerd does (it dials localhost inside the pod's network namespace;
//! for a hostNetwork pod, the node's); `kproxy run` on both nodes (cluster
//! mode) runs the UDP relay on its loopback; `kproxy forward` runs in the
//! outside namespace (a laptop) and reaches pod-b on node2 through node2's
//! agent: DNS queries, and an echo of 1,000 datagrams with loss counted.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kproxy_test_apiserver::ephemeral::EphemeralHook;
use kproxy_test_apiserver::portforward::{self, Dialer};
use kproxy_test_apiserver::{Options, TestApiServer};
use kproxy_tests::topo::{LAN_IP, NODE_IPS, NODE_NAMES};
use kproxy_tests::{Mode, Topology};
use serde_json::json;

/// `kproxy run`'s default `--udp-relay-port`.
const RELAY_PORT: u16 = 10266;

/// The port-forward dialer of a container runtime: localhost inside the
/// network namespace the pod (by its IP) lives in.
fn runtime_dialer(namespaces: HashMap<std::net::IpAddr, String>) -> Dialer {
    let namespaces = Arc::new(namespaces);
    Arc::new(move |addr: SocketAddr| {
        let namespaces = namespaces.clone();
        Box::pin(async move {
            let ns = namespaces
                .get(&addr.ip())
                .cloned()
                .ok_or_else(|| std::io::Error::other(format!("no namespace for {}", addr.ip())))?;
            let port = addr.port();
            let std = tokio::task::spawn_blocking(move || {
                kproxy_tests::netns::enter(&ns, move || {
                    std::net::TcpStream::connect(("127.0.0.1", port))
                })
                .map_err(std::io::Error::other)?
            })
            .await
            .map_err(std::io::Error::other)??;
            std.set_nonblocking(true)?;
            std.set_nodelay(true)?;
            tokio::net::TcpStream::from_std(std)
        })
    })
}

/// `kproxy forward` in the outside namespace, killed on drop.
struct Forward {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: std::path::PathBuf,
}

impl Forward {
    fn start(topo: &Topology, kubeconfig: &std::path::Path, args: &[&str]) -> Result<Forward> {
        let bin = kproxy_tests::kproxy::binary()?;
        let log = topo.workdir().join("forward.log");
        let mut child = topo
            .ext
            .command(bin.to_str().context("kproxy path")?, None)
            .arg("forward")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .env("RUST_LOG", "kproxy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting kproxy forward")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line);
            }
        });
        Ok(Forward { child, lines, log })
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The local port of the next `Forwarding from 127.0.0.1:PORT -> REMOTE/udp` line.
    fn next_port(&self) -> Result<u16> {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("no Forwarding line; stderr:\n{}", self.stderr()))?;
        line.strip_prefix("Forwarding from 127.0.0.1:")
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected line {line:?}"))
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS query for an A record of `name` with id `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The namespace topology (no kproxy started) with pod-b (10.244.2.10, on
/// node2) serving DNS on 53 and a UDP echo on 9000; and pod-b's address.
fn topology_with_dns() -> Result<(Topology, String)> {
    let mut topo = Topology::build(Mode::Iptables)?;
    let b = topo
        .pods
        .iter()
        .position(|p| p.name == "pod-b")
        .context("pod-b")?;
    topo.serve(b, &["--dns", "53", "--udp-echo", "9000"])?;
    let ip = topo.pods[b].ip.clone();
    Ok((topo, ip))
}

/// The test API server in the LAN namespace, with the runtime's
/// port-forward and `ephemeral` starting ephemeral containers; its
/// runtime and a kubeconfig for it.
fn api_server(
    topo: &Topology,
    ephemeral: Option<EphemeralHook>,
) -> Result<(tokio::runtime::Runtime, TestApiServer, std::path::PathBuf)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(TestApiServer::start_with(Options {
        addr: format!("{LAN_IP}:0").parse()?,
        bind: Some(topo.lan_binder()),
        port_forward: Some(portforward::hook(runtime_dialer(namespaces(topo)?))),
        ephemeral_containers: ephemeral,
        ..Options::default()
    }))?;
    let kubeconfig = topo.workdir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    Ok((rt, server, kubeconfig))
}

/// Each pod's and node's network namespace, by address.
fn namespaces(topo: &Topology) -> Result<HashMap<std::net::IpAddr, String>> {
    let mut namespaces = HashMap::new();
    for p in &topo.pods {
        namespaces.insert(p.ip.parse()?, p.ns.name.clone());
    }
    for n in &topo.nodes {
        namespaces.insert(n.ip.parse()?, n.ns.name.clone());
    }
    Ok(namespaces)
}

/// The API objects of the DNS server in pod-b: pod `dns-0` (at `ip`, on
/// node2) and Service `dns` (DNS over UDP and TCP, and a UDP echo).
fn dns_objects(server: &TestApiServer, ip: &str) -> Result<()> {
    server.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "dns-0", "namespace": "default", "labels": {"app": "dns"}},
        "spec": {"nodeName": "node2", "containers": [{"name": "dns", "image": "dns", "ports": [
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": 53},
            {"name": "echo", "containerPort": 9000, "protocol": "UDP"}]}]},
        "status": {"phase": "Running", "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}]}}))?;
    server.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "dns", "namespace": "default"},
        "spec": {"selector": {"app": "dns"}, "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"},
            {"name": "echo", "port": 9000, "protocol": "UDP", "targetPort": "echo"}]}}))?;
    Ok(())
}

/// The flags every forward here runs with: the outside namespace's
/// loopback, and sessions idle after 2 s.
const FORWARD_FLAGS: [&str; 4] = ["--address", "127.0.0.1", "--udp-idle-timeout", "2s"];

/// `kproxy forward svc/dns :53/udp :9000/udp`: 20 DNS queries answered and
/// 1,000 datagrams echoed with none lost (loopback and veths in namespaces
/// lose nothing at this pace); the forward, for the checks that follow.
fn forward_dns_and_echo(topo: &Topology, kubeconfig: &std::path::Path) -> Result<Forward> {
    let fwd = Forward::start(
        topo,
        kubeconfig,
        &[&["svc/dns", ":53/udp", ":9000/udp"], &FORWARD_FLAGS[..]].concat(),
    )?;
    let dns_port = fwd.next_port()?;
    let echo_port = fwd.next_port()?;
    dns_queries(topo, dns_port, 20).with_context(|| fwd.stderr())?;
    let lost = echo(topo, echo_port, 1000)?;
    ensure!(
        lost == 0,
        "{lost} of 1000 datagrams lost; stderr:\n{}",
        fwd.stderr()
    );
    Ok(fwd)
}

/// DNS through forward port `port`: queries from `n` client sockets (a
/// resolver's random source ports: a session each), each answered for its
/// own name and id.
fn dns_queries(topo: &Topology, port: u16, n: u16) -> Result<()> {
    topo.ext.enter(move || -> Result<()> {
        for i in 0..n {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let name = format!("web-{i}.default.svc.cluster.local");
            let id = 0x1000 + i;
            s.send_to(&dns_query(id, &name), ("127.0.0.1", port))?;
            let mut buf = [0u8; 512];
            let n = s
                .recv(&mut buf)
                .with_context(|| format!("no answer to query {i}"))?;
            let a = &buf[..n];
            ensure!(a[..2] == id.to_be_bytes(), "answer {i}: wrong id");
            ensure!(
                a[2] & 0x80 != 0 && a[7] == 1,
                "answer {i}: not a response with one answer"
            );
            let label = name.split('.').next().unwrap_or_default().as_bytes();
            ensure!(
                a.windows(label.len()).any(|w| w == label),
                "answer {i}: not for {name}"
            );
            ensure!(
                a[n - 4..] == [10, 96, 0, 53],
                "answer {i}: address {:?}",
                &a[n - 4..]
            );
        }
        Ok(())
    })?
}

/// Echo through forward port `port`: `count` numbered datagrams of 512
/// bytes on one session, at most 64 in flight; fails on corruption or
/// reordering, returns how many were lost.
fn echo(topo: &Topology, port: u16, count: u32) -> Result<usize> {
    let socket = topo.ext.enter(move || -> Result<UdpSocket> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    })??;
    let socket = Arc::new(socket);
    let received = Arc::new(AtomicUsize::new(0));
    let receiver = {
        let (socket, received) = (socket.clone(), received.clone());
        std::thread::spawn(move || -> Result<Vec<u32>> {
            let mut seqs = Vec::with_capacity(count as usize);
            let mut buf = [0u8; 2048];
            // Ends after 2s without a datagram (the sender is long done then).
            while let Ok(n) = socket.recv(&mut buf) {
                ensure!(
                    n == 512 && buf[4..512].iter().all(|b| *b == 0xab),
                    "datagram corrupted"
                );
                seqs.push(u32::from_be_bytes(buf[..4].try_into()?));
                received.fetch_add(1, Ordering::Relaxed);
                if seqs.len() == count as usize {
                    break;
                }
            }
            Ok(seqs)
        })
    };
    let started = Instant::now();
    for seq in 0..count {
        // Window of 64; a loss would stall it, so wait at most 200 ms.
        let wait = Instant::now();
        while seq as usize >= received.load(Ordering::Relaxed) + 64
            && wait.elapsed() < Duration::from_millis(200)
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut d = seq.to_be_bytes().to_vec();
        d.resize(512, 0xab);
        socket.send(&d)?;
    }
    let seqs = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let elapsed = started.elapsed();
    let lost = count as usize - seqs.len();
    let reordered = seqs.windows(2).filter(|w| w[1] < w[0]).count();
    eprintln!(
        "UDP echo through the relay: {count} datagrams of 512 bytes, {lost} lost, {reordered} out of order, {:.0} datagrams/s each way",
        seqs.len() as f64 / elapsed.as_secs_f64()
    );
    ensure!(reordered == 0, "{reordered} datagrams out of order");
    Ok(lost)
}

#[test]
fn udp_through_the_node_agents_relay() -> Result<()> {
    let (mut topo, pod_b_ip) = topology_with_dns()?;

    let (rt, server, kubeconfig) = api_server(&topo, None)?;
    for i in 0..topo.nodes.len() {
        topo.nodes[i].config.kubeconfig = Some(kubeconfig.clone());
        topo.start_kproxy(i)?;
    }
    // The agents are ready once their relays listen (as a readiness probe
    // would say).
    for node in &topo.nodes {
        kproxy_tests::poll::until(
            &format!("the UDP relay on {}", node.name),
            Duration::from_secs(30),
            || {
                node.ns
                    .enter(|| std::net::TcpStream::connect(("127.0.0.1", RELAY_PORT)))?
                    .map(drop)
                    .map_err(Into::into)
            },
        )
        .with_context(|| topo.logs())?;
    }
    // The agents as the API server sees them: hostNetwork pods of the DaemonSet.
    for (i, node) in NODE_NAMES.iter().enumerate() {
        server.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("kproxy-{node}"), "namespace": "kube-system",
                "labels": {"app.kubernetes.io/name": "kproxy"}},
            "spec": {"nodeName": node, "hostNetwork": true, "containers": [{"name": "kproxy", "image": "kproxy"}]},
            "status": {"phase": "Running", "podIP": NODE_IPS[i]}}))?;
    }
    dns_objects(&server, &pod_b_ip)?;

    let fwd = forward_dns_and_echo(&topo, &kubeconfig)?;
    // 21 sessions (20 DNS clients, 1 echo) through node2's agent.
    let stderr = fwd.stderr();
    ensure!(
        stderr.contains("agent=kproxy-node2"),
        "relay not via node2's agent:\n{stderr}"
    );
    drop(fwd);
    drop(server);
    drop(rt);
    Ok(())
}

/// Ephemeral containers as the kubelet starts them: each runs its command
/// (the image's kproxy is this build's) in the network namespace of its
/// pod (found by the pod's IP), logging to the work dir. Killed on drop.
#[derive(Default)]
struct Containers(Arc<std::sync::Mutex<Vec<Child>>>);

impl Containers {
    fn count(&self) -> usize {
        self.0.lock().map(|c| c.len()).unwrap_or_default()
    }

    fn hook(&self, topo: &Topology) -> Result<EphemeralHook> {
        let namespaces = Arc::new(namespaces(topo)?);
        let bin = kproxy_tests::kproxy::binary()?;
        let dir = topo.workdir().to_path_buf();
        let running = self.0.clone();
        Ok(Arc::new(move |pod, container| {
            let (namespaces, bin, dir, running) = (
                namespaces.clone(),
                bin.clone(),
                dir.clone(),
                running.clone(),
            );
            Box::pin(async move {
                let fail = |why: String| ("RunContainerError".to_string(), why);
                let ns = pod["status"]["podIP"]
                    .as_str()
                    .and_then(|ip| ip.parse().ok())
                    .and_then(|ip: std::net::IpAddr| namespaces.get(&ip).cloned())
                    .ok_or_else(|| fail("the pod has no network namespace".into()))?;
                let argv: Vec<String> = container["command"]
                    .as_array()
                    .into_iter()
                    .chain(container["args"].as_array())
                    .flatten()
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect();
                if argv.first().map(String::as_str) != Some("/usr/local/bin/kproxy") {
                    return Err(fail(format!("not kproxy's image command: {argv:?}")));
                }
                let name = container["name"].as_str().unwrap_or("container");
                let log = std::fs::File::create(dir.join(format!("{name}.log")))
                    .map_err(|e| fail(e.to_string()))?;
                let child = kproxy_tests::netns::command_in(&ns, &bin, None)
                    .args(&argv[1..])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().map_err(|e| fail(e.to_string()))?)
                    .stderr(log)
                    .spawn()
                    .map_err(|e| fail(e.to_string()))?;
                running
                    .lock()
                    .map_err(|_| fail("poisoned".into()))?
                    .push(child);
                Ok(())
            })
        }))
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if let Ok(mut all) = self.0.lock() {
            for c in all.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Sends one datagram to forward port `port` from the outside namespace
/// (to make the forward open a session) and waits until its stderr says
/// `expected`.
fn datagram_gets(topo: &Topology, fwd: &Forward, port: u16, expected: &[&str]) -> Result<()> {
    topo.ext.enter(|| -> Result<()> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.send_to(b"hello", ("127.0.0.1", port))?;
        Ok(())
    })??;
    kproxy_tests::poll::until(
        &format!("kproxy forward to log {expected:?}"),
        Duration::from_secs(30),
        || {
            let stderr = fwd.stderr();
            ensure!(
                expected.iter().all(|e| stderr.contains(e)),
                "stderr so far:\n{stderr}"
            );
            Ok(())
        },
    )
}

#[test]
fn udp_through_an_ephemeral_relay_container_where_no_agent_runs() -> Result<()> {
    // No kproxy agent anywhere: a cluster that runs kube-proxy.
    let (topo, pod_b_ip) = topology_with_dns()?;
    let containers = Containers::default();
    let (rt, server, kubeconfig) = api_server(&topo, Some(containers.hook(&topo)?))?;
    dns_objects(&server, &pod_b_ip)?;
    let pod = || -> Result<serde_json::Value> {
        let res = kproxy_test_apiserver::resources::find("", "v1", "pods").context("pods")?;
        Ok((*server.store().get(res, Some("default"), "dns-0")?).clone())
    };

    // Agents only: the forward says there is none and how to do without.
    {
        let fwd = Forward::start(
            &topo,
            &kubeconfig,
            &[
                &["svc/dns", ":9000/udp", "--udp-relay", "agent"],
                &FORWARD_FLAGS[..],
            ]
            .concat(),
        )?;
        let port = fwd.next_port()?;
        datagram_gets(
            &topo,
            &fwd,
            port,
            &["no kproxy agent runs on node node2", "--udp-relay=auto"],
        )?;
    }
    // A role without patch on pods/ephemeralcontainers: the message names it.
    server.deny("pods/ephemeralcontainers");
    {
        let fwd = Forward::start(
            &topo,
            &kubeconfig,
            &[&["svc/dns", ":9000/udp"], &FORWARD_FLAGS[..]].concat(),
        )?;
        let port = fwd.next_port()?;
        datagram_gets(
            &topo,
            &fwd,
            port,
            &["needs patch on pods/ephemeralcontainers in namespace default"],
        )?;
    }
    server.allow("pods/ephemeralcontainers");
    ensure!(
        pod()?["spec"].get("ephemeralContainers").is_none(),
        "a container was added although the forwards could not: {}",
        pod()?["spec"]
    );

    // The default: the relay runs in an ephemeral container of the pod.
    let fwd = forward_dns_and_echo(&topo, &kubeconfig)?;
    let added = pod()?["spec"]["ephemeralContainers"].clone();
    let expected_image = format!("ghcr.io/kproxy/kproxy:{}", env!("CARGO_PKG_VERSION"));
    ensure!(
        added.as_array().map(Vec::len) == Some(1)
            && added[0]["name"] == "kproxy-udp-relay-1"
            && added[0]["image"] == expected_image.as_str()
            && added[0]["command"][1] == "udp-relay"
            && added[0]["securityContext"]["runAsNonRoot"] == true,
        "ephemeral containers: {added}"
    );
    ensure!(
        fwd.stderr().contains("ephemeral container"),
        "{}",
        fwd.stderr()
    );

    // A second forward to the same pod uses the running relay.
    let fwd2 = Forward::start(
        &topo,
        &kubeconfig,
        &[&["pod/dns-0", ":9000/udp"], &FORWARD_FLAGS[..]].concat(),
    )?;
    let port2 = fwd2.next_port()?;
    let lost = echo(&topo, port2, 200)?;
    ensure!(lost == 0, "{lost} of 200 lost; stderr:\n{}", fwd2.stderr());
    let added = pod()?["spec"]["ephemeralContainers"].clone();
    ensure!(
        added.as_array().map(Vec::len) == Some(1) && containers.count() == 1,
        "the second forward added a relay: {added}"
    );
    drop(fwd2);
    drop(fwd);
    drop(server);
    drop(rt);
    drop(containers);
    Ok(())
}
