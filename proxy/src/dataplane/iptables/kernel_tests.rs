//! Real-kernel tests, each in a fresh network namespace created here (needs
//! root; fails loudly without it). The dataplane runs on a thread that has
//! entered the namespace with setns(2), so every iptables process it starts
//! runs there too. Nothing is added to the root namespace.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::golden_tests::{config, ep, state, svc};
use super::names::sep_chain;
use super::{Backend, IptablesDataplane};
use crate::dataplane::{Dataplane, ProgrammedFrontend};
use crate::model::{ChangeSet, Protocol, TrafficPolicy};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace owned by one test; deleted on drop, even on panic.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!(
            "kpx-ipt-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; panics with its stderr on failure.
    fn exec(&self, cmd: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }

    /// Runs `f` on a new thread that has entered the namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: plain syscall on a valid fd; only this thread moves.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into {path}: {}",
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// Like [`NetNs::enter`] but detached, for servers.
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: plain syscall on a valid fd; only this thread moves.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {path}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tool(backend: Backend, name: &str) -> String {
    format!("iptables-{}{name}", backend.name())
}

/// nat + filter of the namespace without comments and counters.
fn normalized_save(ns: &NetNs, backend: Backend) -> String {
    let mut out = String::new();
    for table in ["nat", "filter"] {
        let text = ns.exec(&[&tool(backend, "-save"), "-t", table]);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let line = match line.rfind(" [") {
                Some(i) if line.starts_with(':') => &line[..i],
                _ => line,
            };
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn frontend(service: &str, kind: &str, frontend: &str, backends: &[&str]) -> ProgrammedFrontend {
    ProgrammedFrontend {
        service: service.into(),
        kind: kind.into(),
        frontend: frontend.into(),
        backends: backends.iter().map(|s| s.to_string()).collect(),
    }
}

fn lifecycle(backend: Backend) {
    let ns = NetNs::new(backend.name());
    // Someone else's rules in both tables: must survive everything we do.
    let ipt = tool(backend, "");
    ns.exec(&[&ipt, "-t", "nat", "-N", "OTHER-CHAIN"]);
    ns.exec(&[
        &ipt,
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "2222",
        "-j",
        "OTHER-CHAIN",
    ]);
    ns.exec(&[
        &ipt, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT",
    ]);
    let before = normalized_save(&ns, backend);

    let mut web = svc(
        "default",
        "web",
        "http",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        vec![ep("10.244.1.5", 8080, true), ep("10.244.2.6", 8080, false)],
    );
    web.node_port = Some(30080);
    let mut dns = svc(
        "kube-system",
        "dns",
        "dns",
        Protocol::Udp,
        "10.96.0.53",
        53,
        vec![ep("10.244.1.2", 53, true)],
    );
    dns.session_affinity_seconds = Some(60);
    let mut lb = svc(
        "default",
        "lb",
        "",
        Protocol::Tcp,
        "10.96.0.20",
        443,
        vec![ep("10.244.2.9", 443, false)],
    );
    lb.load_balancer_ips = vec!["198.51.100.9".parse().unwrap()];
    lb.load_balancer_source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
    lb.external_policy = TrafficPolicy::Local;
    lb.external_endpoints = vec![];
    let empty = svc(
        "default",
        "empty",
        "",
        Protocol::Tcp,
        "10.96.0.40",
        80,
        vec![],
    );
    let s1 = state(vec![web.clone(), dns.clone(), lb.clone(), empty.clone()]);

    // Auto picks the backend that holds rules here.
    let resolved = ns.enter(|| Backend::Auto.resolve().unwrap());
    assert_eq!(resolved, backend);

    let (programmed1, dp) = ns.enter(|| {
        let mut dp = IptablesDataplane::new(config(), backend).unwrap();
        assert_eq!(dp.backend_name(), backend.name());
        let stats = dp.sync(&s1, &ChangeSet::default(), true).unwrap();
        assert!(stats.full);
        (dp.programmed().unwrap(), dp)
    });
    let mut want = vec![
        frontend("default/empty", "ClusterIP", "10.96.0.40:80/tcp", &[]),
        frontend(
            "default/lb",
            "ClusterIP",
            "10.96.0.20:443/tcp",
            &["10.244.2.9:443"],
        ),
        frontend("default/lb", "LoadBalancer", "198.51.100.9:443/tcp", &[]),
        frontend(
            "default/web:http",
            "ClusterIP",
            "10.96.0.10:80/tcp",
            &["10.244.1.5:8080", "10.244.2.6:8080"],
        ),
        frontend(
            "default/web:http",
            "NodePort",
            "*:30080/tcp",
            &["10.244.1.5:8080", "10.244.2.6:8080"],
        ),
        frontend(
            "kube-system/dns:dns",
            "ClusterIP",
            "10.96.0.53:53/udp",
            &["10.244.1.2:53"],
        ),
    ];
    want.sort_by(|a, b| {
        (&a.service, &a.kind, &a.frontend).cmp(&(&b.service, &b.kind, &b.frontend))
    });
    assert_eq!(programmed1, want);

    // Partial sync: web loses an endpoint, dns goes away, empty gets one.
    let mut web2 = web.clone();
    web2.cluster_endpoints.truncate(1);
    web2.external_endpoints.truncate(1);
    let mut empty2 = empty.clone();
    empty2.cluster_endpoints = vec![ep("10.244.1.7", 80, true)];
    empty2.external_endpoints = empty2.cluster_endpoints.clone();
    let s2 = state(vec![web2, lb.clone(), empty2]);
    let changes = ChangeSet::between(&s1, &s2);
    let dns_chain_count_before = normalized_save(&ns, backend)
        .matches(":KPROXY-SEP-")
        .count();
    let (stats, programmed2, mut dp) = ns.enter(move || {
        let mut dp = dp;
        let stats = dp.sync(&s2, &changes, false).unwrap();
        (stats, dp.programmed().unwrap(), dp)
    });
    assert!(!stats.full);
    assert_eq!(
        stats.objects_deleted, 3,
        "web's second SEP, dns's SVC and SEP"
    );
    let saved = normalized_save(&ns, backend);
    assert_eq!(
        saved.matches(":KPROXY-SEP-").count(),
        dns_chain_count_before - 2 + 1
    );
    assert!(!saved.contains("10.244.2.6:8080") && !saved.contains("10.244.1.2:53"));
    assert!(programmed2.contains(&frontend(
        "default/empty",
        "ClusterIP",
        "10.96.0.40:80/tcp",
        &["10.244.1.7:80"]
    )));
    assert!(!programmed2
        .iter()
        .any(|f| f.service.starts_with("kube-system")));

    // Drift: a stray chain and a lost jump rule are repaired by a full sync.
    ns.exec(&[&ipt, "-t", "nat", "-N", "KPROXY-SEP-STRAYSTRAYSTRAY"]);
    ns.exec(&[
        &ipt,
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        "kproxy service portals",
        "-j",
        "KPROXY-SERVICES",
    ]);
    let s3 = state(vec![web.clone(), lb.clone()]);
    let dp = ns.enter(move || {
        dp.sync(&s3, &ChangeSet::default(), true).unwrap();
        dp
    });
    let saved = normalized_save(&ns, backend);
    assert!(!saved.contains("STRAY"));
    assert_eq!(
        saved
            .matches(
                "-A PREROUTING -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES"
            )
            .count(),
        1
    );
    assert_eq!(
        saved.matches("-j KPROXY-FORWARD").count(),
        1,
        "jump rules are not duplicated"
    );

    // A failed partial sync forces the next one to be full: a foreign rule
    // still references the SEP chain the sync wants to delete.
    let gone = sep_chain(&web.name, &web.cluster_endpoints[1]);
    ns.exec(&[&ipt, "-t", "nat", "-A", "OTHER-CHAIN", "-j", &gone]);
    let mut web4 = web.clone();
    web4.cluster_endpoints.truncate(1);
    web4.external_endpoints.truncate(1);
    let s4 = state(vec![web4, lb.clone()]);
    let changes = ChangeSet::between(&state(vec![web.clone(), lb.clone()]), &s4);
    let (err, mut dp) = ns.enter(move || {
        let mut dp = dp;
        let err = dp
            .sync(&s4, &changes, false)
            .expect_err("deleting a referenced chain fails");
        (err.to_string(), dp)
    });
    assert!(err.contains("restore"), "error names the tool: {err}");
    ns.exec(&[&ipt, "-t", "nat", "-D", "OTHER-CHAIN", "-j", &gone]);
    let s4 = state(vec![web.clone(), lb.clone()]);
    ns.enter(move || {
        // The sync loop makes the sync after a failure full.
        let stats = dp.sync(&s4, &ChangeSet::default(), true).unwrap();
        assert!(stats.full);
        dp.cleanup().unwrap();
    });
    assert_eq!(
        normalized_save(&ns, backend),
        before,
        "cleanup restores the original ruleset"
    );
}

#[test]
fn kernel_lifecycle_nft() {
    lifecycle(Backend::Nft);
}

#[test]
fn kernel_lifecycle_legacy() {
    lifecycle(Backend::Legacy);
}

/// Connects with a deadline; returns the error kind on failure.
fn connect(addr: &str) -> Result<TcpStream, ErrorKind> {
    let addr: SocketAddr = addr.parse().unwrap();
    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.kind())
}

/// Real traffic inside the namespace: a local socket reaches a ClusterIP
/// through the OUTPUT DNAT path, and a Service without endpoints refuses at
/// once.
#[test]
fn kernel_traffic_cluster_ip() {
    let ns = NetNs::new("traffic");
    ns.exec(&[
        "ip", "link", "add", "kpx0", "type", "veth", "peer", "name", "kpx1",
    ]);
    ns.exec(&["ip", "link", "set", "kpx0", "up"]);
    ns.exec(&["ip", "link", "set", "kpx1", "up"]);
    ns.exec(&["ip", "addr", "add", "10.244.1.5/32", "dev", "kpx0"]);
    // The service range is routed to the veth (no default route).
    ns.exec(&["ip", "route", "add", "10.96.0.0/16", "dev", "kpx0"]);
    let web = svc(
        "default",
        "web",
        "",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        vec![ep("10.244.1.5", 8080, true)],
    );
    let empty = svc(
        "default",
        "empty",
        "",
        Protocol::Tcp,
        "10.96.0.40",
        80,
        vec![],
    );
    let s = state(vec![web, empty]);
    ns.enter(move || {
        let listener = TcpListener::bind("10.244.1.5:8080").unwrap();
        let mut dp = IptablesDataplane::new(config(), Backend::Nft).unwrap();
        dp.sync(&s, &ChangeSet::default(), true).unwrap();

        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(&buf).unwrap();
        });
        let mut c = connect("10.96.0.10:80").expect("ClusterIP connect");
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        server.join().unwrap();

        let start = Instant::now();
        assert_eq!(
            connect("10.96.0.40:80").unwrap_err(),
            ErrorKind::ConnectionRefused
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "refused at once, not hanging"
        );
        dp.cleanup().unwrap();
    });
}

/// UDP has no teardown: when the endpoint a flow was DNATed to goes away,
/// the sync deletes that flow's conntrack entry (through netlink) so the
/// next datagram is balanced again; a long-lived flow to an endpoint that
/// stays is left alone and keeps reaching it.
#[test]
fn kernel_udp_conntrack_cleared_only_for_the_removed_endpoint() {
    let ns = NetNs::new("udp");
    ns.exec(&[
        "ip", "link", "add", "kpx0", "type", "veth", "peer", "name", "kpx1",
    ]);
    ns.exec(&["ip", "link", "set", "kpx0", "up"]);
    ns.exec(&["ip", "link", "set", "kpx1", "up"]);
    ns.exec(&["ip", "addr", "add", "10.244.1.2/32", "dev", "kpx0"]);
    ns.exec(&["ip", "addr", "add", "10.244.1.3/32", "dev", "kpx0"]);
    ns.exec(&["ip", "route", "add", "10.96.0.0/16", "dev", "kpx0"]);
    let with = |eps: &[&str]| {
        state(vec![svc(
            "kube-system",
            "dns",
            "dns",
            Protocol::Udp,
            "10.96.0.53",
            53,
            eps.iter().map(|ip| ep(ip, 5353, true)).collect(),
        )])
    };
    let (only_a, both, only_a_again) = (
        with(&["10.244.1.2"]),
        with(&["10.244.1.2", "10.244.1.3"]),
        with(&["10.244.1.2"]),
    );
    let changed = ChangeSet::between(&only_a, &both);
    let changed_back = ChangeSet::between(&both, &only_a_again);
    ns.enter(move || {
        let recv_a = std::net::UdpSocket::bind("10.244.1.2:5353").unwrap();
        let recv_b = std::net::UdpSocket::bind("10.244.1.3:5353").unwrap();
        for r in [&recv_a, &recv_b] {
            r.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
        }
        let got = |r: &std::net::UdpSocket| {
            let mut buf = [0u8; 8];
            r.recv_from(&mut buf)
                .ok()
                .map(|(n, from)| (buf[..n].to_vec(), from))
        };
        let mut dp = IptablesDataplane::new(config(), Backend::Nft).unwrap();
        dp.sync(&only_a, &ChangeSet::default(), true).unwrap();
        // The long-lived flow: one socket, talking to A.
        let long_lived = std::net::UdpSocket::bind("10.244.1.2:0").unwrap();
        long_lived.send_to(b"1", "10.96.0.53:53").unwrap();
        assert_eq!(got(&recv_a).expect("DNATed to A").0, b"1");

        // B joins; find a flow that the balancer sent to B.
        let stats = dp.sync(&both, &changed, false).unwrap();
        assert_eq!(
            stats.conntrack.map(|c| c.deleted),
            Some(0),
            "adding B clears nothing"
        );
        let mut to_b = None;
        for _ in 0..64 {
            let s = std::net::UdpSocket::bind("10.244.1.2:0").unwrap();
            s.send_to(b"2", "10.96.0.53:53").unwrap();
            if got(&recv_b).is_some() {
                to_b = Some(s);
                break;
            }
            let _ = got(&recv_a);
        }
        let to_b = to_b.expect("one of 64 flows balanced to B");
        let to_b_port = to_b.local_addr().unwrap().port();

        // B leaves: exactly its flows go; the long-lived flow to A stays.
        let stats = dp.sync(&only_a_again, &changed_back, false).unwrap();
        let ct = stats.conntrack.expect("a UDP change reconciles");
        assert!(ct.deleted >= 1, "the flow to B is deleted: {ct:?}");
        let text = ns_entries_here();
        assert!(
            !text.contains("src=10.244.1.3"),
            "no flow to B left:\n{text}"
        );
        assert!(
            !text.contains(&format!("sport={to_b_port} ")),
            "the B flow's entry is gone:\n{text}"
        );
        long_lived.send_to(b"3", "10.96.0.53:53").unwrap();
        let (data, _) = got(&recv_a).expect("the long-lived flow still reaches A");
        assert_eq!(data, b"3");
        // The flow that went to B is balanced again, to A.
        to_b.send_to(b"4", "10.96.0.53:53").unwrap();
        assert_eq!(got(&recv_a).expect("re-balanced to A").0, b"4");
        dp.cleanup().unwrap();
    });
}

/// `conntrack -L` for the VIP, from inside the namespace this thread is in.
fn ns_entries_here() -> String {
    let out = Command::new("conntrack")
        .args(["-L", "-p", "udp", "--orig-dst", "10.96.0.53"])
        .output()
        .expect("conntrack installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A server that answers each connection with the peer address it saw,
/// for up to `max` connections or until `deadline`.
fn peer_echo_server(listener: TcpListener, max: usize, deadline: Instant) -> usize {
    listener.set_nonblocking(true).unwrap();
    let mut served = 0;
    while served < max && Instant::now() < deadline {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                conn.set_nonblocking(false).unwrap();
                let _ = conn.write_all(peer.ip().to_string().as_bytes());
                served += 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    served
}

/// The address the backend saw, or the connect error.
fn seen_peer(addr: &str) -> Result<String, ErrorKind> {
    let mut c = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1))
        .map_err(|e| e.kind())?;
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).map_err(|e| e.kind())?;
    Ok(s)
}

/// NodePort from another namespace through a forwarding node namespace to a
/// pod namespace: policy Cluster masquerades, policy Local keeps the client
/// address, Local without a local endpoint drops, no endpoints rejects.
#[test]
fn kernel_traffic_node_ports() {
    let ext = NetNs::new("ext");
    let node = NetNs::new("node");
    let pod = NetNs::new("pod");
    run(
        "ip",
        &[
            "link", "add", "kpxe0", "netns", &ext.name, "type", "veth", "peer", "name", "kpxn0",
            "netns", &node.name,
        ],
    );
    run(
        "ip",
        &[
            "link", "add", "kpxp0", "netns", &pod.name, "type", "veth", "peer", "name", "kpxn1",
            "netns", &node.name,
        ],
    );
    ext.exec(&["ip", "addr", "add", "192.168.1.1/24", "dev", "kpxe0"]);
    ext.exec(&["ip", "link", "set", "kpxe0", "up"]);
    node.exec(&["ip", "addr", "add", "192.168.1.10/24", "dev", "kpxn0"]);
    node.exec(&["ip", "link", "set", "kpxn0", "up"]);
    node.exec(&["ip", "addr", "add", "10.244.1.1/32", "dev", "kpxn1"]);
    node.exec(&["ip", "link", "set", "kpxn1", "up"]);
    node.exec(&["ip", "route", "add", "10.244.1.5/32", "dev", "kpxn1"]);
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    pod.exec(&["ip", "addr", "add", "10.244.1.5/32", "dev", "kpxp0"]);
    pod.exec(&["ip", "link", "set", "kpxp0", "up"]);
    pod.exec(&["ip", "route", "add", "10.244.1.1/32", "dev", "kpxp0"]);
    pod.exec(&["ip", "route", "add", "192.168.1.0/24", "via", "10.244.1.1"]);

    let endpoint = vec![ep("10.244.1.5", 8080, true)];
    let mut cluster = svc(
        "default",
        "cluster",
        "",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        endpoint.clone(),
    );
    cluster.node_port = Some(30080);
    let mut local = svc(
        "default",
        "local",
        "",
        Protocol::Tcp,
        "10.96.0.11",
        80,
        endpoint,
    );
    local.node_port = Some(30081);
    local.external_policy = TrafficPolicy::Local;
    let mut remote = svc(
        "default",
        "remote",
        "",
        Protocol::Tcp,
        "10.96.0.12",
        80,
        vec![ep("10.244.2.9", 8080, false)],
    );
    remote.node_port = Some(30082);
    remote.external_policy = TrafficPolicy::Local;
    remote.external_endpoints = vec![];
    let mut empty = svc(
        "default",
        "empty",
        "",
        Protocol::Tcp,
        "10.96.0.13",
        80,
        vec![],
    );
    empty.node_port = Some(30083);
    let s = state(vec![cluster, local, remote, empty]);
    node.enter(move || {
        let mut dp = IptablesDataplane::new(config(), Backend::Nft).unwrap();
        dp.sync(&s, &ChangeSet::default(), true).unwrap();
    });

    let listener = pod.enter(|| TcpListener::bind("10.244.1.5:8080").unwrap());
    let server =
        pod.spawn(move || peer_echo_server(listener, 2, Instant::now() + Duration::from_secs(10)));
    let results =
        ext.enter(|| [30080, 30081, 30082, 30083].map(|p| seen_peer(&format!("192.168.1.10:{p}"))));
    assert_eq!(
        results[0],
        Ok("10.244.1.1".to_string()),
        "Cluster: client masqueraded to the node"
    );
    assert_eq!(
        results[1],
        Ok("192.168.1.1".to_string()),
        "Local: client address preserved"
    );
    assert!(
        matches!(results[2], Err(ErrorKind::TimedOut | ErrorKind::WouldBlock)),
        "Local without local endpoints drops: {:?}",
        results[2]
    );
    assert_eq!(
        results[3],
        Err(ErrorKind::ConnectionRefused),
        "no endpoints: refused"
    );
    assert_eq!(server.join().unwrap(), 2);
}

/// Hostile object names go through a real restore without adding a rule.
#[test]
fn kernel_hostile_names_are_inert() {
    let ns = NetNs::new("evil");
    let evil = "x\" -j ACCEPT\n-A INPUT -j ACCEPT\nCOMMIT\n*filter\n-A OUTPUT -j DROP";
    let mut p = svc(
        evil,
        evil,
        evil,
        Protocol::Tcp,
        "10.96.0.10",
        80,
        vec![ep("10.244.1.5", 80, true)],
    );
    p.node_port = Some(30080);
    let empty = svc(
        evil,
        "empty",
        "-j ACCEPT",
        Protocol::Udp,
        "10.96.0.11",
        53,
        vec![],
    );
    let s = state(vec![p, empty]);
    ns.enter(move || {
        let mut dp = IptablesDataplane::new(config(), Backend::Nft).unwrap();
        dp.sync(&s, &ChangeSet::default(), true).unwrap();
        assert_eq!(dp.programmed().unwrap().len(), 3);
    });
    let saved = normalized_save(&ns, Backend::Nft);
    for line in saved
        .lines()
        .filter(|l| l.starts_with("-A INPUT") || l.starts_with("-A OUTPUT"))
    {
        assert!(line.contains("-j KPROXY-"), "foreign rule appeared: {line}");
    }
}

#[test]
fn cleanup_kube_proxy_removes_its_chains_and_keeps_others() {
    let ns = NetNs::new("kubeproxy");
    let rules = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAA - [0:0]\n:KUBE-SEP-BBB - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:OTHER - [0:0]\n\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-AAA\n\
-A KUBE-SVC-AAA -j KUBE-SEP-BBB\n-A KUBE-SEP-BBB -p tcp -m tcp -j DNAT --to-destination 10.244.1.5:8080\n\
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n-A OTHER -j RETURN\n-A POSTROUTING -j OTHER\nCOMMIT\n\
*filter\n:KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n-A INPUT -j KUBE-FIREWALL\n-A FORWARD -j KUBE-FORWARD\nCOMMIT\n";
    let (removed, nat, filter) = ns.enter(|| {
        let backend = Backend::Auto.resolve().unwrap();
        super::exec::restore(backend, rules).unwrap();
        let removed = super::kube_proxy::cleanup_kube_proxy(Backend::Auto).unwrap();
        (
            removed,
            super::exec::save(backend, "nat").unwrap(),
            super::exec::save(backend, "filter").unwrap(),
        )
    });
    assert_eq!(removed, 6, "nat: {nat}\nfilter: {filter}");
    assert!(!nat.contains("KUBE-"), "{nat}");
    assert!(nat.contains("-A POSTROUTING -j OTHER"), "{nat}");
    assert!(
        filter.contains("-A INPUT -j KUBE-FIREWALL"),
        "kubelet's chain stays: {filter}"
    );
    assert!(!filter.contains("KUBE-FORWARD"), "{filter}");
}
