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

#[test]
fn udp_through_the_node_agents_relay() -> Result<()> {
    let mut topo = Topology::build(Mode::Iptables)?;
    // pod-b (10.244.2.10, on node2): a DNS server and a UDP echo.
    let b = topo
        .pods
        .iter()
        .position(|p| p.name == "pod-b")
        .context("pod-b")?;
    topo.serve(b, &["--dns", "53", "--udp-echo", "9000"])?;
    let pod_b_ip = topo.pods[b].ip.clone();

    let mut namespaces = HashMap::new();
    for p in &topo.pods {
        namespaces.insert(p.ip.parse()?, p.ns.name.clone());
    }
    for n in &topo.nodes {
        namespaces.insert(n.ip.parse()?, n.ns.name.clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(TestApiServer::start_with(Options {
        addr: format!("{LAN_IP}:0").parse()?,
        bind: Some(topo.lan_binder()),
        port_forward: Some(portforward::hook(runtime_dialer(namespaces))),
        ..Options::default()
    }))?;
    let kubeconfig = topo.workdir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
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
    server.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "dns-0", "namespace": "default", "labels": {"app": "dns"}},
        "spec": {"nodeName": "node2", "containers": [{"name": "dns", "image": "dns", "ports": [
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": 53},
            {"name": "echo", "containerPort": 9000, "protocol": "UDP"}]}]},
        "status": {"phase": "Running", "podIP": pod_b_ip,
            "conditions": [{"type": "Ready", "status": "True"}]}}))?;
    server.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "dns", "namespace": "default"},
        "spec": {"selector": {"app": "dns"}, "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"},
            {"name": "echo", "port": 9000, "protocol": "UDP", "targetPort": "echo"}]}}))?;

    let fwd = Forward::start(
        &topo,
        &kubeconfig,
        &[
            "svc/dns",
            ":53/udp",
            ":9000/udp",
            "--address",
            "127.0.0.1",
            "--udp-idle-timeout",
            "2s",
        ],
    )?;
    let dns_port = fwd.next_port()?;
    let echo_port = fwd.next_port()?;

    // DNS: queries from 20 client sockets (a resolver's random source
    // ports: a session each), each answered for its own name and id.
    let dns = topo.ext.enter(move || -> Result<()> {
        for i in 0..20u16 {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let name = format!("web-{i}.default.svc.cluster.local");
            let id = 0x1000 + i;
            s.send_to(&dns_query(id, &name), ("127.0.0.1", dns_port))?;
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
    })?;
    dns.with_context(|| fwd.stderr())?;

    // Echo: 1,000 numbered datagrams on one session, at most 64 in
    // flight; count what comes back, and that it comes back in order.
    let socket = topo.ext.enter(move || -> Result<UdpSocket> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.connect(("127.0.0.1", echo_port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    })??;
    let socket = Arc::new(socket);
    let received = Arc::new(AtomicUsize::new(0));
    let receiver = {
        let (socket, received) = (socket.clone(), received.clone());
        std::thread::spawn(move || -> Result<Vec<u32>> {
            let mut seqs = Vec::with_capacity(1000);
            let mut buf = [0u8; 2048];
            // Ends after 2s without a datagram (the sender is long done then).
            while let Ok(n) = socket.recv(&mut buf) {
                ensure!(
                    n == 512 && buf[4..512].iter().all(|b| *b == 0xab),
                    "datagram corrupted"
                );
                seqs.push(u32::from_be_bytes(buf[..4].try_into()?));
                received.fetch_add(1, Ordering::Relaxed);
                if seqs.len() == 1000 {
                    break;
                }
            }
            Ok(seqs)
        })
    };
    let started = Instant::now();
    for seq in 0..1000u32 {
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
    let lost = 1000 - seqs.len();
    let reordered = seqs.windows(2).filter(|w| w[1] < w[0]).count();
    eprintln!(
        "UDP echo through the relay: 1000 datagrams of 512 bytes, {lost} lost, {reordered} out of order, {:.0} datagrams/s each way",
        seqs.len() as f64 / elapsed.as_secs_f64()
    );
    ensure!(reordered == 0, "{reordered} datagrams out of order");
    // Loopback and veths in namespaces lose nothing at this pace.
    ensure!(
        lost == 0,
        "{lost} of 1000 datagrams lost; stderr:\n{}",
        fwd.stderr()
    );
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
