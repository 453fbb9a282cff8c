//! The measured node: one node namespace with routed pods, wired like a
//! simple CNI (pod ADDR/32, default route via the link-local gateway
//! 169.254.1.1 held by the node side of every pod veth; no default route
//! on the node), and a cgroup tree that holds every process of the run so
//! its CPU time can be read:
//!
//! ```text
//! node cgroup ─┬─ hooked   backends A and B, the client whose sockets
//!              │           ebpf mode balances (its --cgroup-root)
//!              ├─ outside  the client whose packets take the TC path
//!              └─ kproxy
//! ```
//!
//! Pods A (10.244.1.10) and B (10.244.1.11) serve; pod C (10.244.1.30)
//! is the client, in either cgroup.
//!
//! The node's eth0 leads to a second namespace, `remote`, that stands for
//! the rest of the cluster and the world at once: it holds 172.30.0.12 (a
//! client outside the cluster) and pod D (10.244.2.10, a backend on another
//! node, routed via 172.30.0.12). A connection from there to a NodePort
//! whose endpoint is D needs SNAT on the node, or D's answer would never
//! go back through it: the path of the sustained NodePort phase.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys::{CgroupTree, Netns, Proc};

pub const NODE_IP: &str = "172.30.0.11";
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
pub const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 30);
pub const POD_D: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
pub const REMOTE_IP: &str = "172.30.0.12";
pub const PROBE_VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 10);
pub const BACKEND_PORT: u16 = 8080;
/// The devices ebpf mode attaches its TC programs to.
pub const DEVICES: &str = "eth0,vpod0,vpod1,vpod2";

/// The node's own address (NodePorts need one), on a veth whose peer is
/// the `remote` namespace's link (see the module's comment).
pub fn node_address(ns: &Netns, remote: &Netns) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &remote.name,
    ])?;
    ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", &format!("{POD_D}/32"), "via", REMOTE_IP])?;
    remote.ip(&["addr", "add", &format!("{REMOTE_IP}/24"), "dev", "eth0"])?;
    remote.ip(&["link", "set", "eth0", "up"])?;
    remote.ip(&["link", "set", "lo", "up"])?;
    remote.ip(&["addr", "add", &format!("{POD_D}/32"), "dev", "lo"])?;
    remote.sysctls(&[
        ("net/ipv4/ip_local_port_range", "1024 65535"),
        ("net/ipv4/tcp_tw_reuse", "1"),
    ])?;
    Ok(())
}

pub struct Topology {
    /// Backends first: they leave before their namespaces and cgroups.
    pub servers: Vec<Proc>,
    pub pods: Vec<Netns>,
    /// Another node's pod D and a client outside the cluster.
    pub remote: Netns,
    pub node: Netns,
    pub cgroups: CgroupTree,
}

impl Topology {
    /// Builds the node, the pods and the cgroups, and starts backends A and
    /// B (which wait for the client to close when `client_closes`).
    pub fn new(client_closes: bool) -> Result<Self> {
        let cgroups = CgroupTree::new("node", &["hooked", "outside", "kproxy"])?;
        let node = Netns::new("node")?;
        let remote = Netns::new("remote")?;
        node_address(&node, &remote)?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let mut pods = Vec::new();
        for (i, addr) in [POD_A, POD_B, POD_C].into_iter().enumerate() {
            let pod = Netns::new(&format!("pod{i}"))?;
            let veth = format!("vpod{i}");
            node.ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ])?;
            node.ip(&["link", "set", &veth, "up"])?;
            node.sysctl(&format!("net.ipv4.conf.{veth}.proxy_arp"), "1")?;
            // The pods' gateway: the node has no default route, so proxy ARP
            // alone would not answer for it.
            node.ip(&["addr", "add", "169.254.1.1/32", "dev", &veth])?;
            node.ip(&["route", "add", &format!("{addr}/32"), "dev", &veth])?;
            pod.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
            pod.ip(&["link", "set", "eth0", "up"])?;
            pod.ip(&[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            pod.ip(&[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
            // Tens of thousands of short connections: the whole port range,
            // and TIME_WAIT ports reused (safe with TCP timestamps).
            pod.sysctls(&[
                ("net/ipv4/ip_local_port_range", "1024 65535"),
                ("net/ipv4/tcp_tw_reuse", "1"),
            ])?;
            pods.push(pod);
        }
        let mut topo = Topology {
            servers: Vec::new(),
            pods,
            remote,
            node,
            cgroups,
        };
        let exe = std::env::current_exe()?;
        for (i, name) in ["A", "B", "D"].into_iter().enumerate() {
            // D is another node's pod: outside the cgroup ebpf mode hooks.
            let (ns, cgroup) = match i {
                2 => (&topo.remote, "outside"),
                _ => (&topo.pods[i], "hooked"),
            };
            let mut cmd = ns.command_in(&exe, topo.cgroups.child(cgroup));
            cmd.args(["serve", "--name", name, "--port", &BACKEND_PORT.to_string()]);
            if client_closes {
                cmd.arg("--client-closes");
            }
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped());
            let mut p = Proc::spawn(cmd, &format!("backend {name}"), None)?;
            let mut line = String::new();
            let out = p.child.stdout.take().context("backend stdout")?;
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
            if line.trim() != "ready" {
                bail!("backend {name} did not start: {line:?}");
            }
            topo.servers.push(p);
        }
        for (addr, name) in [(POD_A, "A"), (POD_B, "B")] {
            topo.wait_answer(
                SocketAddrV4::new(addr, BACKEND_PORT),
                name,
                Duration::from_secs(10),
            )
            .with_context(|| format!("backend {name} not reachable from the client pod"))?;
        }
        Ok(topo)
    }

    pub fn client(&self) -> &Netns {
        &self.pods[2]
    }

    pub fn node_cgroup(&self) -> &Path {
        self.cgroups.root.path()
    }

    /// Polls `target` from the client pod (a thread of the bench: outside
    /// every hooked cgroup) until it answers `name`.
    pub fn wait_answer(&self, target: SocketAddrV4, name: &str, timeout: Duration) -> Result<()> {
        self.wait_answer_from(self.client(), target, name, timeout)
    }

    /// [`Topology::wait_answer`] from namespace `ns`.
    pub fn wait_answer_from(
        &self,
        ns: &Netns,
        target: SocketAddrV4,
        name: &str,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = ns.run_in(move || ask(target.into()));
            match got {
                Ok(n) if n == name => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!("{target} did not answer {name:?} within {timeout:?} (last: {got:?})")
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn ask(addr: SocketAddr) -> Result<String> {
    use std::io::BufRead;
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}
