//! Real-kernel tests of ebpf mode (need root, BTF, cgroup2; fail loudly
//! otherwise). Each test builds its own world and tears it down on drop:
//!
//! ```text
//!  client ns (10.0.0.2) ──c0/n0── node ns ──n2/r0── remote ns (192.168.0.2: "node2" backends)
//!                              (10.0.0.1,   │
//!                          192.168.0.1)   n1/p0
//!                                           │
//!                                       pod ns (10.244.1.10: local backend)
//! ```
//!
//! The dataplane attaches TC programs to n0, n1 and n2 (the node's devices)
//! inside the node namespace, its socket hooks to a cgroup made for the
//! test, and pins into a bpffs instance mounted for the test. Checksum
//! offload is off on every veth, so a wrong checksum is dropped by the
//! receiving kernel and the test fails. No namespace has a default route.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::test_support::{ep, state, svc};
use super::{EbpfConfig, EbpfDataplane, MapSizes};
use crate::dataplane::{Dataplane, DataplaneConfig, DetectLocalMode};
use crate::model::{ChangeSet, DesiredState, Protocol, ServicePort, TrafficPolicy};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The pid in a `kpx-ebpf-<tag>-<pid>-<n>` name, when that process is gone.
fn dead_owner(name: &str) -> bool {
    let mut parts = name.rsplit('-');
    let (_, pid) = (parts.next(), parts.next());
    name.starts_with("kpx-ebpf-")
        && pid
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes what killed runs left: their bpffs mounts, cgroups and
/// namespaces (each name carries its test process's pid).
fn remove_leftovers() {
    let tmp = std::env::temp_dir();
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead_owner(&name) {
            let _ = Command::new("umount").arg(e.path()).status();
            let _ = std::fs::remove_dir(e.path());
        }
    }
    if let Some(root) = super::checks::detect_cgroup2() {
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if dead_owner(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if dead_owner(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

fn unique(tag: &str) -> String {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(remove_leftovers);
    format!(
        "kpx-ebpf-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
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

fn require_root() {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "ebpf kernel tests need root (they create namespaces, cgroups and BPF programs)"
    );
}

/// A network namespace owned by one test; deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = unique(tag);
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    fn exec(&self, cmd: &[&str]) -> String {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(cmd);
        run("ip", &a)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&path);
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            setns(&path);
            f()
        })
    }
}

fn setns(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: plain syscall on a valid fd; only this thread moves.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A bpffs instance mounted for one test (the pin path lives in it).
struct BpfFs {
    dir: PathBuf,
}

impl BpfFs {
    fn new() -> BpfFs {
        let dir = std::env::temp_dir().join(unique("bpffs"));
        std::fs::create_dir_all(&dir).unwrap();
        run("mount", &["-t", "bpf", "bpf", dir.to_str().unwrap()]);
        BpfFs { dir }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        // Unmounting drops every pin: links detach, maps are freed.
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A cgroup made for one test under the cgroup2 mount.
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    fn new() -> Cgroup {
        let root = super::checks::detect_cgroup2()
            .expect("no cgroup2 mount in /proc/mounts: ebpf kernel tests need one");
        let dir = root.join(unique("cg"));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Cgroup { dir }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes placed here by the tests have exited; retry briefly
        // while the kernel finishes tearing them down.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

const CLIENT_IP: &str = "10.0.0.2";
const NODE_IP: &str = "10.0.0.1";
const NODE_UNDERLAY_IP: &str = "192.168.0.1";
const POD_IP: &str = "10.244.1.10";
const REMOTE_IP: &str = "192.168.0.2";

/// The namespaces, cgroup and bpffs of one test. Field order is drop order.
struct World {
    dataplane: Option<EbpfDataplane>,
    servers: Vec<Server>,
    pin: PathBuf,
    _bpffs: BpfFs,
    cgroup: Cgroup,
    node: NetNs,
    client: NetNs,
    pod: NetNs,
    remote: NetNs,
}

fn veth(ns_a: &NetNs, a: &str, ns_b: &NetNs, b: &str) {
    ns_a.ip(&[
        "link", "add", a, "type", "veth", "peer", "name", b, "netns", &ns_b.name,
    ]);
    for (ns, dev) in [(ns_a, a), (ns_b, b)] {
        // Checksums must be computed by the kernel, so a broken rewrite is caught.
        ns.exec(&["ethtool", "-K", dev, "tx", "off", "rx", "off"]);
        ns.ip(&["link", "set", dev, "up"]);
    }
}

impl World {
    fn new() -> World {
        require_root();
        let node = NetNs::new("node");
        let client = NetNs::new("client");
        let pod = NetNs::new("pod");
        let remote = NetNs::new("remote");
        veth(&node, "n0", &client, "c0");
        node.ip(&["addr", "add", "10.0.0.1/24", "dev", "n0"]);
        client.ip(&["addr", "add", "10.0.0.2/24", "dev", "c0"]);
        veth(&node, "n1", &pod, "p0");
        node.ip(&["addr", "add", "10.244.1.1/32", "dev", "n1"]);
        node.ip(&["route", "add", "10.244.1.10/32", "dev", "n1"]);
        pod.ip(&["addr", "add", "10.244.1.10/32", "dev", "p0"]);
        pod.ip(&["route", "add", "10.244.1.1/32", "dev", "p0"]);
        pod.ip(&["route", "add", "10.0.0.0/24", "via", "10.244.1.1"]);
        pod.ip(&["route", "add", "192.168.0.0/24", "via", "10.244.1.1"]);
        veth(&node, "n2", &remote, "r0");
        node.ip(&["addr", "add", "192.168.0.1/24", "dev", "n2"]);
        remote.ip(&["addr", "add", "192.168.0.2/24", "dev", "r0"]);
        node.exec(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        let bpffs = BpfFs::new();
        World {
            dataplane: None,
            servers: Vec::new(),
            pin: bpffs.dir.join("kproxy"),
            _bpffs: bpffs,
            cgroup: Cgroup::new(),
            node,
            client,
            pod,
            remote,
        }
    }

    fn ebpf_config(&self, sizes: MapSizes) -> EbpfConfig {
        EbpfConfig {
            pin_path: self.pin.clone(),
            cgroup_root: Some(self.cgroup.dir.clone()),
            devices: vec!["n0".into(), "n1".into(), "n2".into()],
            map_sizes: sizes,
            nat_ports: None,
            gc: Default::default(),
        }
    }

    fn dp_config() -> DataplaneConfig {
        DataplaneConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            nodeport_addresses: vec![],
            masquerade_all: false,
            node_ips: vec![NODE_IP.parse().unwrap(), NODE_UNDERLAY_IP.parse().unwrap()],
            ..DataplaneConfig::default()
        }
    }

    fn try_start(
        &self,
        cfg: EbpfConfig,
    ) -> Result<EbpfDataplane, crate::dataplane::DataplaneError> {
        self.try_start_with(World::dp_config(), cfg)
    }

    fn try_start_with(
        &self,
        dp: DataplaneConfig,
        cfg: EbpfConfig,
    ) -> Result<EbpfDataplane, crate::dataplane::DataplaneError> {
        self.node.enter(|| EbpfDataplane::start(dp, cfg))
    }

    fn start(&mut self) {
        self.start_sized(MapSizes::default());
    }

    fn start_sized(&mut self, sizes: MapSizes) {
        let dp = self
            .try_start(self.ebpf_config(sizes))
            .unwrap_or_else(|e| panic!("starting the ebpf dataplane: {e}"));
        self.dataplane = Some(dp);
    }

    fn sync(&mut self, desired: &DesiredState) {
        // In the node namespace, as kproxy runs: a sync may list devices.
        let dp = self.dataplane.as_mut().expect("started");
        let stats = self
            .node
            .enter(|| dp.sync(desired, &ChangeSet::default(), true))
            .unwrap_or_else(|e| panic!("sync: {e}"));
        assert!(stats.errors.is_empty(), "{:?}", stats.errors);
    }

    fn serve(&mut self, ns: Which, name: &str, ip: &str, port: u16, proto: Protocol) {
        let ns = match ns {
            Which::Pod => &self.pod,
            Which::Remote => &self.remote,
        };
        self.servers.push(Server::start(ns, name, ip, port, proto));
    }

    /// One TCP request from the client namespace: (server name, peer it saw).
    fn tcp_from_client(&self, dst: &str, port: u16) -> std::io::Result<(String, String)> {
        let addr: SocketAddr = format!("{dst}:{port}").parse().unwrap();
        self.client.enter(|| tcp_request(addr))
    }

    fn udp_from_client(&self, dst: &str, port: u16) -> std::io::Result<(String, String)> {
        let addr: SocketAddr = format!("{dst}:{port}").parse().unwrap();
        self.client.enter(|| udp_request(addr))
    }

    /// Runs the Python client in the test cgroup, inside the node namespace
    /// (a process on the node, as a pod or host process would be).
    fn socket_client(
        &self,
        proto: &str,
        host: &str,
        port: u16,
        n: usize,
    ) -> Vec<serde_json::Value> {
        let cmd = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} /usr/bin/python3 -c \"$0\" {proto} {host} {port} {n}",
            self.cgroup.dir.display(),
            self.node.name
        );
        let out = Command::new("sh")
            .args(["-c", &cmd, PY_CLIENT])
            .output()
            .expect("run python client");
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "client output {:?}: {e}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.dataplane = None;
        let _ = super::loader::cleanup(&self.pin);
    }
}

/// When each request finished and which backend answered (or the error).
type RequestLog = Vec<(Instant, Result<String, String>)>;

#[derive(Clone, Copy)]
enum Which {
    Pod,
    Remote,
}

/// Client used through the socket hooks: prints a JSON list of results.
const PY_CLIENT: &str = r#"
import json, socket, sys
proto, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = []
for i in range(n):
    try:
        if proto == "tcp":
            s = socket.create_connection((host, port), timeout=2)
            data = s.recv(200).decode()
            out.append({"reply": data.strip(), "peer": "%s:%d" % s.getpeername()})
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.sendto(b"hi", (host, port))
            data, addr = s.recvfrom(200)
            out.append({"reply": data.decode().strip(), "peer": "%s:%d" % addr})
        s.close()
    except OSError as e:
        out.append({"error": type(e).__name__, "errno": e.errno})
print(json.dumps(out))
"#;

/// A backend: answers "<name> <client address it saw>", then echoes lines (TCP).
struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &NetNs, name: &str, ip: &str, port: u16, proto: Protocol) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let name = name.to_string();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let flag = stop.clone();
        let handle = ns.spawn(move || match proto {
            Protocol::Udp => {
                let sock = UdpSocket::bind(addr).expect("bind udp");
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                tx.send(()).unwrap();
                let mut buf = [0u8; 512];
                while !flag.load(Ordering::SeqCst) {
                    if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(format!("{name} {}\n", peer.ip()).as_bytes(), peer);
                    }
                }
            }
            _ => {
                let l = TcpListener::bind(addr).expect("bind tcp");
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !flag.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((mut s, peer)) => {
                            let name = name.clone();
                            let flag = flag.clone();
                            std::thread::spawn(move || {
                                s.set_nonblocking(false).unwrap();
                                let _ = s.write_all(format!("{name} {}\n", peer.ip()).as_bytes());
                                s.set_read_timeout(Some(Duration::from_millis(100)))
                                    .unwrap();
                                let mut r = BufReader::new(s.try_clone().unwrap());
                                let mut line = String::new();
                                while !flag.load(Ordering::SeqCst) {
                                    line.clear();
                                    match r.read_line(&mut line) {
                                        Ok(0) => break,
                                        Ok(_) => {
                                            let _ = s.write_all(line.as_bytes());
                                        }
                                        Err(e)
                                            if e.kind() == ErrorKind::WouldBlock
                                                || e.kind() == ErrorKind::TimedOut =>
                                        {
                                            continue
                                        }
                                        Err(_) => break,
                                    }
                                }
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => break,
                    }
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("server did not start");
        Server {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn parse_reply(line: &str) -> (String, String) {
    let mut it = line.split_whitespace();
    (
        it.next().unwrap_or_default().to_string(),
        it.next().unwrap_or_default().to_string(),
    )
}

fn tcp_request(addr: SocketAddr) -> std::io::Result<(String, String)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))?;
    s.set_read_timeout(Some(Duration::from_millis(1500)))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "no reply"));
    }
    Ok(parse_reply(&line))
}

fn udp_request(addr: SocketAddr) -> std::io::Result<(String, String)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_millis(1500)))?;
    s.send_to(b"hi", addr)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    assert_eq!(from, addr, "UDP reply must come from the address dialled");
    Ok(parse_reply(&String::from_utf8_lossy(&buf[..n])))
}

fn web(eps: Vec<crate::model::Endpoint>) -> ServicePort {
    svc(
        "default",
        "web",
        "http",
        Protocol::Tcp,
        "10.96.0.10",
        80,
        eps,
    )
}

fn csum_errors(ns: &NetNs) -> u64 {
    let out = ns.exec(&["nstat", "-az", "TcpInCsumErrors", "UdpInCsumErrors"]);
    out.lines()
        .filter(|l| l.contains("CsumErrors"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn cluster_ip_via_socket_hooks_tcp_and_udp() {
    let mut w = World::new();
    w.serve(Which::Pod, "pod", POD_IP, 8080, Protocol::Tcp);
    w.serve(Which::Remote, "remote", REMOTE_IP, 8080, Protocol::Tcp);
    w.serve(Which::Pod, "pod-udp", POD_IP, 5353, Protocol::Udp);
    w.start();
    let dns = svc(
        "kube-system",
        "dns",
        "dns",
        Protocol::Udp,
        "10.96.0.53",
        53,
        vec![ep(POD_IP, 5353, true)],
    );
    w.sync(&state(vec![
        web(vec![ep(POD_IP, 8080, true), ep(REMOTE_IP, 8080, false)]),
        dns,
    ]));

    let results = w.socket_client("tcp", "10.96.0.10", 80, 40);
    let mut seen = BTreeMap::new();
    for r in &results {
        let reply = r["reply"].as_str().unwrap_or_else(|| panic!("failed: {r}"));
        // getpeername4: the application sees the VIP it dialled.
        assert_eq!(r["peer"], "10.96.0.10:80", "{r}");
        *seen.entry(parse_reply(reply).0).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both backends should answer: {seen:?}");
    assert!(
        seen.values().all(|n| *n >= 5),
        "spread too uneven: {seen:?}"
    );

    // UDP: sendmsg4 translates, recvmsg4 makes the reply come from the VIP.
    let results = w.socket_client("udp", "10.96.0.53", 53, 5);
    for r in &results {
        assert_eq!(r["peer"], "10.96.0.53:53", "{r}");
        assert!(r["reply"].as_str().unwrap().starts_with("pod-udp"), "{r}");
    }

    // status reads the maps back from the kernel.
    let programmed = EbpfDataplane::open(World::dp_config(), w.ebpf_config(MapSizes::default()))
        .programmed()
        .unwrap();
    let web = programmed
        .iter()
        .find(|f| f.service == "default/web:http")
        .expect("web programmed");
    assert_eq!(web.kind, "ClusterIP");
    assert_eq!(web.frontend, "10.96.0.10:80/tcp");
    assert_eq!(web.backends, vec!["10.244.1.10:8080", "192.168.0.2:8080"]);
}

#[test]
fn no_endpoints_is_connection_refused_at_once() {
    let mut w = World::new();
    w.start();
    let mut sp = web(vec![]);
    sp.node_port = Some(30080);
    w.sync(&state(vec![sp]));
    let started = Instant::now();
    let results = w.socket_client("tcp", "10.96.0.10", 80, 3);
    for r in &results {
        assert_eq!(r["error"], "ConnectionRefusedError", "{r}");
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // From outside through the node port: refused by the node's stack.
    let err = w.tcp_from_client(NODE_IP, 30080).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn node_port_cluster_policy_snats_to_the_node_address() {
    let mut w = World::new();
    w.serve(Which::Remote, "remote", REMOTE_IP, 8080, Protocol::Tcp);
    w.serve(Which::Remote, "remote-udp", REMOTE_IP, 5353, Protocol::Udp);
    w.serve(Which::Pod, "pod", POD_IP, 8080, Protocol::Tcp);
    w.start();
    let mut tcp = web(vec![ep(REMOTE_IP, 8080, false)]);
    tcp.node_port = Some(30080);
    let mut local = svc(
        "default",
        "local",
        "",
        Protocol::Tcp,
        "10.96.0.11",
        80,
        vec![ep(POD_IP, 8080, true)],
    );
    local.node_port = Some(30081);
    let mut udp = svc(
        "default",
        "dns",
        "",
        Protocol::Udp,
        "10.96.0.53",
        53,
        vec![ep(REMOTE_IP, 5353, false)],
    );
    udp.node_port = Some(30053);
    w.sync(&state(vec![tcp, udp, local]));
    for _ in 0..10 {
        let (name, peer) = w
            .tcp_from_client(NODE_IP, 30080)
            .expect("node port answers");
        assert_eq!(name, "remote");
        assert_eq!(peer, NODE_UNDERLAY_IP, "backend must see the node address");
    }
    // A backend on this node sees the node's address on its device (what
    // MASQUERADE picks in iptables mode).
    for _ in 0..10 {
        let (name, peer) = w
            .tcp_from_client(NODE_IP, 30081)
            .expect("node port answers");
        assert_eq!(name, "pod");
        assert_eq!(peer, "10.244.1.1", "local backend must see a node address");
    }
    for _ in 0..5 {
        let (name, peer) = w
            .udp_from_client(NODE_IP, 30053)
            .expect("UDP node port answers");
        assert_eq!(name, "remote-udp");
        assert_eq!(peer, NODE_UNDERLAY_IP);
    }
    assert_eq!(csum_errors(&w.remote), 0);
    assert_eq!(csum_errors(&w.pod), 0);
    assert_eq!(csum_errors(&w.client), 0);
}

#[test]
fn node_port_local_policy_keeps_client_address_and_drops_without_local_endpoint() {
    let mut w = World::new();
    w.serve(Which::Pod, "pod", POD_IP, 8080, Protocol::Tcp);
    w.serve(Which::Pod, "pod-udp", POD_IP, 5353, Protocol::Udp);
    w.serve(Which::Remote, "remote", REMOTE_IP, 8080, Protocol::Tcp);
    w.start();
    let mut local = web(vec![ep(POD_IP, 8080, true), ep(REMOTE_IP, 8080, false)]);
    local.node_port = Some(30080);
    local.external_policy = TrafficPolicy::Local;
    local.external_endpoints = vec![ep(POD_IP, 8080, true)];
    let mut udp = svc(
        "default",
        "dns",
        "",
        Protocol::Udp,
        "10.96.0.53",
        53,
        vec![ep(POD_IP, 5353, true)],
    );
    udp.node_port = Some(30053);
    udp.external_policy = TrafficPolicy::Local;
    let mut none = svc(
        "default",
        "elsewhere",
        "",
        Protocol::Tcp,
        "10.96.0.20",
        80,
        vec![ep(REMOTE_IP, 8080, false)],
    );
    none.node_port = Some(30090);
    none.external_policy = TrafficPolicy::Local;
    none.external_endpoints = vec![];
    w.sync(&state(vec![local, udp, none]));
    for _ in 0..10 {
        let (name, peer) = w
            .tcp_from_client(NODE_IP, 30080)
            .expect("node port answers");
        assert_eq!(
            name, "pod",
            "only the local endpoint takes external traffic"
        );
        assert_eq!(peer, CLIENT_IP, "policy Local keeps the client address");
    }
    let (name, peer) = w.udp_from_client(NODE_IP, 30053).expect("UDP node port");
    assert_eq!((name.as_str(), peer.as_str()), ("pod-udp", CLIENT_IP));
    // No local endpoint: dropped (a timeout, not a refusal).
    let err = w.tcp_from_client(NODE_IP, 30090).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "expected a drop, got {err}"
    );
    assert_eq!(csum_errors(&w.pod), 0);
    assert_eq!(csum_errors(&w.client), 0);
}

#[test]
fn endpoint_change_under_load_never_reaches_a_removed_backend() {
    let mut w = World::new();
    w.serve(Which::Pod, "a", POD_IP, 8080, Protocol::Tcp);
    w.serve(Which::Remote, "b", REMOTE_IP, 8080, Protocol::Tcp);
    w.serve(Which::Remote, "c", REMOTE_IP, 8081, Protocol::Tcp);
    w.start();
    let mk = |eps| {
        let mut sp = web(eps);
        sp.node_port = Some(30080);
        sp
    };
    w.sync(&state(vec![mk(vec![
        ep(POD_IP, 8080, true),
        ep(REMOTE_IP, 8080, false),
    ])]));

    // Hammer the node port from the client namespace while endpoints change.
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<RequestLog>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, log) = (stop.clone(), log.clone());
        workers.push(w.client.spawn(move || {
            let addr: SocketAddr = format!("{NODE_IP}:30080").parse().unwrap();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 5000 {
                n += 1;
                let r = tcp_request(addr)
                    .map(|(name, _)| name)
                    .map_err(|e| e.to_string());
                log.lock().unwrap().push((Instant::now(), r));
            }
        }));
    }
    // Polls until `n` requests finished after `since`.
    let wait_for = |n: usize, since: Instant| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t > since)
            .count()
            < n
        {
            assert!(Instant::now() < deadline, "load did not get going");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(100, Instant::now());
    // a leaves, c joins.
    w.sync(&state(vec![mk(vec![
        ep(REMOTE_IP, 8080, false),
        ep(REMOTE_IP, 8081, false),
    ])]));
    let switched = Instant::now();
    wait_for(300, switched + Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    for h in workers {
        h.join().unwrap();
    }
    let log = log.lock().unwrap();
    let failures: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failures.is_empty(),
        "requests failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    // A request that started after the switch returned never reaches a;
    // give in-flight ones the time of one request.
    let after: Vec<&String> = log
        .iter()
        .filter(|(t, _)| *t > switched + Duration::from_millis(50))
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    assert!(
        after.len() >= 300,
        "too few requests after the change: {}",
        after.len()
    );
    assert!(
        !after.iter().any(|n| n.as_str() == "a"),
        "a removed backend got traffic"
    );
    let names: BTreeSet<&str> = after.iter().map(|s| s.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["b", "c"]));
}

#[test]
fn restart_adopts_pinned_state_and_keeps_connections() {
    let mut w = World::new();
    w.serve(Which::Pod, "a", POD_IP, 8080, Protocol::Tcp);
    w.serve(Which::Remote, "b", REMOTE_IP, 8080, Protocol::Tcp);
    w.start();
    let mut sp = web(vec![ep(POD_IP, 8080, true), ep(REMOTE_IP, 8080, false)]);
    sp.node_port = Some(30080);
    let desired = state(vec![sp]);
    w.sync(&desired);

    // An established connection through the TC path (DNAT + maybe SNAT).
    let addr: SocketAddr = format!("{NODE_IP}:30080").parse().unwrap();
    let held = w.client.enter(move || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    let mut reader = BufReader::new(held.try_clone().unwrap());
    let mut hello = String::new();
    reader.read_line(&mut hello).unwrap();

    // New connections keep flowing while kproxy restarts.
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<Result<String, String>>>> = Arc::default();
    let loader = {
        let (stop, results) = (stop.clone(), results.clone());
        w.client.spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 5000 {
                n += 1;
                let r = tcp_request(addr).map(|(n, _)| n).map_err(|e| e.to_string());
                results.lock().unwrap().push(r);
            }
        })
    };
    // "SIGTERM": the process state goes, pins stay.
    w.dataplane = None;
    let before = results.lock().unwrap().len();
    w.start();
    w.sync(&desired);
    let deadline = Instant::now() + Duration::from_secs(20);
    while results.lock().unwrap().len() < before + 100 {
        assert!(Instant::now() < deadline, "no progress after restart");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    loader.join().unwrap();

    let mut held = held;
    held.write_all(b"still there\n").unwrap();
    let mut echo = String::new();
    reader.read_line(&mut echo).unwrap();
    assert_eq!(
        echo, "still there\n",
        "established connection must survive the restart"
    );

    let results = results.lock().unwrap();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "connections failed during restart: {failed:?}"
    );
    let names: BTreeSet<&str> = results.iter().filter_map(|r| r.as_deref().ok()).collect();
    assert_eq!(names, BTreeSet::from(["a", "b"]), "still balanced");

    // cleanup removes links, maps and the pin directory.
    w.dataplane.as_mut().unwrap().cleanup().unwrap();
    assert!(!w.pin.exists(), "pin path left behind");
    let err = w.tcp_from_client(NODE_IP, 30080).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

/// A restart reads the pinned maps back in batches of 4,096 entries: over
/// more entries than one batch (6,000 backends and slots), an unchanged
/// state still writes and deletes nothing, so no batch boundary lost or
/// repeated an entry.
#[test]
fn a_restart_over_more_entries_than_one_batch_writes_nothing() {
    let mut w = World::new();
    w.start();
    let ports: Vec<ServicePort> = (0..600u32)
        .map(|i| {
            let eps = (0..10u32)
                .map(|e| {
                    ep(
                        &format!("10.128.{}.{}", i / 25, (i % 25) * 10 + e + 1),
                        8080,
                        true,
                    )
                })
                .collect();
            svc(
                "bench",
                &format!("svc-{i}"),
                "http",
                Protocol::Tcp,
                &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                80,
                eps,
            )
        })
        .collect();
    let desired = state(ports);
    let sync = |w: &mut World| {
        let dp = w.dataplane.as_mut().expect("started");
        w.node
            .enter(|| dp.sync(&desired, &ChangeSet::default(), true))
            .unwrap_or_else(|e| panic!("sync: {e}"))
    };
    let first = sync(&mut w);
    assert!(first.objects_written > 12_000, "{first:?}");

    w.dataplane = None;
    w.start();
    let again = sync(&mut w);
    assert_eq!(
        (again.objects_written, again.objects_deleted),
        (0, 0),
        "a restart over unchanged maps rewrote or deleted entries: {again:?}"
    );
    w.dataplane.as_mut().unwrap().cleanup().unwrap();
}

/// A map pinned by a kproxy whose layout differs (here CONFIG with an
/// older, shorter value) is created anew: start-up succeeds and Services
/// work, instead of the verifier rejecting the programs.
#[test]
fn pinned_map_of_another_layout_is_created_anew() {
    let mut w = World::new();
    w.serve(Which::Pod, "pod", POD_IP, 8080, Protocol::Tcp);
    let maps = w.pin.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let config = maps.join(proxy_common::maps::CONFIG);
    let path = config.to_str().unwrap();
    run(
        "bpftool",
        &[
            "map", "create", path, "type", "array", "key", "4", "value", "8", "entries", "1",
            "name", "CONFIG",
        ],
    );
    w.start();
    w.sync(&state(vec![web(vec![ep(POD_IP, 8080, true)])]));
    for r in w.socket_client("tcp", "10.96.0.10", 80, 5) {
        assert!(r["reply"].as_str().is_some(), "failed: {r}");
    }
    let info = aya::maps::MapData::from_pin(&config)
        .unwrap()
        .info()
        .unwrap();
    assert_eq!(
        info.value_size() as usize,
        std::mem::size_of::<proxy_common::Config>()
    );
}

#[test]
fn full_map_names_the_service_and_keeps_the_others() {
    let mut w = World::new();
    w.start_sized(MapSizes {
        lb: 3,
        ..MapSizes::default()
    });
    let ports: Vec<ServicePort> = (0..4)
        .map(|i| {
            svc(
                "default",
                &format!("svc{i}"),
                "",
                Protocol::Tcp,
                &format!("10.96.1.{i}"),
                80,
                vec![ep(POD_IP, 8080, true)],
            )
        })
        .collect();
    let stats = w
        .dataplane
        .as_mut()
        .unwrap()
        .sync(&state(ports), &ChangeSet::default(), true)
        .unwrap();
    assert_eq!(stats.errors.len(), 1, "{:?}", stats.errors);
    let e = &stats.errors[0];
    assert_eq!(e.reason, "map_full");
    assert!(e.message.contains("default/svc3"), "{}", e.message);
    assert!(e.message.contains("--bpf-lb-map-max"), "{}", e.message);
    let programmed = w.dataplane.as_ref().unwrap().programmed().unwrap();
    let names: Vec<&str> = programmed.iter().map(|f| f.service.as_str()).collect();
    assert_eq!(names, vec!["default/svc0", "default/svc1", "default/svc2"]);
}

#[test]
fn bad_device_and_missing_cgroup_are_clear_errors() {
    let w = World::new();
    let mut cfg = w.ebpf_config(MapSizes::default());
    cfg.devices = vec!["nosuchdev0".into()];
    let err = w.try_start(cfg).err().expect("must fail").to_string();
    assert!(
        err.contains("nosuchdev0") && err.contains("--devices"),
        "{err}"
    );

    let mut cfg = w.ebpf_config(MapSizes::default());
    cfg.cgroup_root = Some(w.cgroup.dir.join("missing"));
    let err = w.try_start(cfg).err().expect("must fail").to_string();
    assert!(
        err.contains("--cgroup-root") && err.contains("missing"),
        "{err}"
    );
    // Nothing was pinned by the failed starts.
    assert!(!w.pin.join("links").exists());
}

#[test]
fn source_ranges_and_affinity_on_the_tc_path() {
    let mut w = World::new();
    w.serve(Which::Pod, "a", POD_IP, 8080, Protocol::Tcp);
    w.serve(Which::Pod, "b", POD_IP, 8081, Protocol::Tcp);
    w.start();
    let mut sticky = web(vec![ep(POD_IP, 8080, true), ep(POD_IP, 8081, true)]);
    sticky.node_port = Some(30080);
    sticky.session_affinity_seconds = Some(60);
    let mut lb = svc(
        "default",
        "lb",
        "",
        Protocol::Tcp,
        "10.96.0.30",
        80,
        vec![ep(POD_IP, 8080, true)],
    );
    lb.load_balancer_ips = vec!["10.0.0.100".parse().unwrap()];
    lb.load_balancer_source_ranges = vec!["10.0.0.0/30".parse().unwrap()];
    let mut denied = lb.clone();
    denied.name.service.name = "lb-denied".into();
    denied.cluster_ips = vec!["10.96.0.31".parse().unwrap()];
    denied.load_balancer_ips = vec!["10.0.0.101".parse().unwrap()];
    denied.load_balancer_source_ranges = vec!["172.16.0.0/12".parse().unwrap()];
    w.sync(&state(vec![sticky, lb, denied]));
    // The LB IPs are not local: route them to the node.
    w.client
        .ip(&["route", "add", "10.0.0.100/32", "via", NODE_IP]);
    w.client
        .ip(&["route", "add", "10.0.0.101/32", "via", NODE_IP]);

    let first = w.tcp_from_client(NODE_IP, 30080).unwrap().0;
    for _ in 0..10 {
        assert_eq!(
            w.tcp_from_client(NODE_IP, 30080).unwrap().0,
            first,
            "affinity"
        );
    }
    let (name, _) = w.tcp_from_client("10.0.0.100", 80).expect("allowed source");
    assert_eq!(name, "a");
    let err = w.tcp_from_client("10.0.0.101", 80).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "source outside the ranges must be dropped: {err}"
    );
}

/// One TCP request from a fixed local port (to reuse a port on purpose).
fn tcp_request_from(local_port: u16, addr: SocketAddr) -> std::io::Result<(String, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::io::AsyncBufReadExt;
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_reuseaddr(true)?;
        sock.bind(SocketAddr::from(([0, 0, 0, 0], local_port)))?;
        let s = tokio::time::timeout(Duration::from_millis(1500), sock.connect(addr))
            .await
            .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "connect timed out"))??;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_millis(1500),
            tokio::io::BufReader::new(s).read_line(&mut line),
        )
        .await
        .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "no reply"))??;
        Ok(parse_reply(&line))
    })
}

#[test]
fn direct_connection_reusing_a_service_flows_ports_is_not_translated() {
    // Policy Local: the backend sees the client itself, so a Service flow
    // and a later direct connection from the same client port have the same
    // reply tuple (backend:8080 -> client:port).
    let mut w = World::new();
    w.serve(Which::Pod, "pod", POD_IP, 8080, Protocol::Tcp);
    w.start();
    let mut local = web(vec![ep(POD_IP, 8080, true)]);
    local.node_port = Some(30080);
    local.external_policy = TrafficPolicy::Local;
    local.external_endpoints = vec![ep(POD_IP, 8080, true)];
    w.sync(&state(vec![local]));
    w.client
        .ip(&["route", "add", "10.244.1.0/24", "via", NODE_IP]);
    let via_service: SocketAddr = format!("{NODE_IP}:30080").parse().unwrap();
    let direct: SocketAddr = format!("{POD_IP}:8080").parse().unwrap();
    for port in [40_001u16, 40_002, 40_003] {
        let (name, _) = w
            .client
            .enter(|| tcp_request_from(port, via_service))
            .expect("through the node port");
        assert_eq!(name, "pod");
        let got = w.client.enter(|| tcp_request_from(port, direct));
        let (name, peer) = got.unwrap_or_else(|e| {
            panic!("direct connection from port {port} after a Service flow on it failed: {e}")
        });
        assert_eq!((name.as_str(), peer.as_str()), ("pod", CLIENT_IP));
    }
    assert_eq!(csum_errors(&w.client), 0);
}

#[test]
fn a_pod_device_created_after_start_is_hooked_at_the_next_sync() {
    // Default devices (no --devices): the TC programs must reach a pod
    // device that did not exist at start, or a NodePort flow SNATed to a
    // backend behind it gets no SNAT and its replies are reset.
    let mut w = World::new();
    let mut cfg = w.ebpf_config(MapSizes::default());
    cfg.devices = Vec::new();
    w.dataplane = Some(
        w.try_start(cfg)
            .unwrap_or_else(|e| panic!("starting the ebpf dataplane: {e}")),
    );
    let late = NetNs::new("late");
    veth(&w.node, "n3", &late, "p0");
    w.node.ip(&["addr", "add", "10.244.1.1/32", "dev", "n3"]);
    w.node.ip(&["route", "add", "10.244.1.20/32", "dev", "n3"]);
    late.ip(&["addr", "add", "10.244.1.20/32", "dev", "p0"]);
    late.ip(&["route", "add", "10.244.1.1/32", "dev", "p0"]);
    late.ip(&["route", "add", "10.0.0.0/24", "via", "10.244.1.1"]);
    let _server = Server::start(&late, "late", "10.244.1.20", 8080, Protocol::Tcp);
    let mut np = web(vec![ep("10.244.1.20", 8080, true)]);
    np.node_port = Some(30080);
    w.sync(&state(vec![np]));
    for _ in 0..5 {
        let (name, peer) = w
            .tcp_from_client(NODE_IP, 30080)
            .expect("node port to a backend behind a device created after start");
        assert_eq!(name, "late");
        assert_ne!(peer, CLIENT_IP, "policy Cluster SNATs");
    }
    assert_eq!(csum_errors(&w.client), 0);
}

/// Repeats `f` until it returns `true`, for at most `limit`.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn interface_detect_local_modes_decide_snat_on_the_tc_path() {
    // ClusterIP traffic from the client namespace takes the TC path (no
    // hooked socket) to a backend on "node2": masqueraded unless it arrived
    // on a local device. Every device is hooked (no --devices), as on a node
    // whose pods' devices come and go.
    let mut w = World::new();
    w.serve(Which::Remote, "remote", REMOTE_IP, 8080, Protocol::Tcp);
    // Replies to an unmasqueraded client must find their way back.
    w.remote
        .ip(&["route", "add", "10.0.0.0/24", "via", NODE_UNDERLAY_IP]);
    w.client
        .ip(&["route", "add", "10.96.0.0/16", "via", NODE_IP]);
    let mut ebpf = w.ebpf_config(MapSizes::default());
    ebpf.devices = Vec::new();
    let start = |w: &mut World, mode: DetectLocalMode| {
        w.dataplane = None;
        let mut dp = World::dp_config();
        dp.detect_local = mode;
        w.dataplane = Some(
            w.try_start_with(dp, ebpf.clone())
                .unwrap_or_else(|e| panic!("starting the ebpf dataplane: {e}")),
        );
        w.sync(&state(vec![web(vec![ep(REMOTE_IP, 8080, false)])]));
    };
    let seen = |w: &World| match w.tcp_from_client("10.96.0.10", 80) {
        Ok((name, peer)) => {
            assert_eq!(name, "remote");
            peer
        }
        Err(e) => panic!("ClusterIP through the TC path: {e}"),
    };

    start(&mut w, DetectLocalMode::InterfaceNamePrefix("pods".into()));
    for _ in 0..3 {
        assert_eq!(seen(&w), NODE_UNDERLAY_IP, "n0 is not local: masqueraded");
    }
    // The client's device now matches the prefix. No sync runs: the link
    // event alone makes it local.
    w.node.ip(&["link", "set", "n0", "down"]);
    w.node.ip(&["link", "set", "n0", "name", "pods0"]);
    w.node.ip(&["link", "set", "pods0", "up"]);
    eventually(
        "a renamed device matching the prefix is local",
        Duration::from_secs(5),
        || seen(&w) == CLIENT_IP,
    );
    for _ in 0..3 {
        assert_eq!(seen(&w), CLIENT_IP, "pods0 is local: not masqueraded");
    }
    let cfg = ebpf.clone();
    let notes = w
        .node
        .enter(|| EbpfDataplane::open(World::dp_config(), cfg).node_notes());
    assert!(
        notes.len() == 1 && notes[0].contains("pods0"),
        "status names the local device: {notes:?}"
    );

    // BridgeInterface: the client's device becomes a port of a bridge that
    // holds the node's address (pods on a bridge, as kubenet's cbr0).
    w.node.ip(&["link", "add", "kb0", "type", "bridge"]);
    w.node.ip(&["addr", "del", "10.0.0.1/24", "dev", "pods0"]);
    w.node.ip(&["link", "set", "pods0", "master", "kb0"]);
    w.node.ip(&["addr", "add", "10.0.0.1/24", "dev", "kb0"]);
    w.node.ip(&["link", "set", "kb0", "up"]);
    start(&mut w, DetectLocalMode::BridgeInterface("kb1".into()));
    for _ in 0..3 {
        assert_eq!(
            seen(&w),
            NODE_UNDERLAY_IP,
            "kb0 is not the bridge: masqueraded"
        );
    }
    start(&mut w, DetectLocalMode::BridgeInterface("kb0".into()));
    for _ in 0..3 {
        assert_eq!(seen(&w), CLIENT_IP, "arrived through kb0: not masqueraded");
    }
    assert_eq!(csum_errors(&w.client), 0);
    assert_eq!(csum_errors(&w.remote), 0);
}
