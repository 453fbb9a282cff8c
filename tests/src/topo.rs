//! The test topology, built in namespaces this process creates:
//!
//! ```text
//!            lan (bridge br0, 172.30.0.1/24)
//!      ┌──────────────┼────────────────┐
//!     ext           node1             node2
//! 172.30.0.100   172.30.0.11       172.30.0.12
//!                 │      │              │
//!               pod-a  pod-c          pod-b
//!         10.244.1.10  10.244.1.30   10.244.2.10
//! ```
//!
//! Pods hang off their node by a veth with a /32 route, as a simple routed
//! CNI does; a pod's default route points at its node's LAN address (onlink,
//! answered by the node's ARP), so traffic leaving a pod always crosses its
//! node. Nodes route each other's pod /24 over the LAN and have no default
//! route: a missed translation fails as "unreachable". Checksum offload is
//! off on every veth, so a wrong checksum is dropped by the receiving kernel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cgroup::Cgroup;
use crate::client::{ClientSpec, Outcome, Running};
use crate::kproxy::{KproxyConfig, KproxyProcess, Mode};
use crate::netns::{unique_id, NetNs};
use crate::poll;

pub const EXT_IP: &str = "172.30.0.100";
/// The LAN namespace's own address (where a test API server listens).
pub const LAN_IP: &str = "172.30.0.1";
pub const NODE_IPS: [&str; 2] = ["172.30.0.11", "172.30.0.12"];
pub const NODE_NAMES: [&str; 2] = ["node1", "node2"];
pub const POD_CIDRS: [&str; 2] = ["10.244.1.0/24", "10.244.2.0/24"];
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Service VIPs are routed onto the LAN by the nodes (as a default route
/// would): a packet nobody translated dies there, and a REJECT rule in the
/// forward path sees packets to a VIP with no endpoints.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// One frontend as `kproxy status -o json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Frontend {
    /// `default/web:http`.
    pub service: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP`, `LoadBalancer`.
    pub kind: String,
    pub frontend: String,
    pub backends: Vec<String>,
}

/// A pod: a namespace with one address, attached to a node.
pub struct Pod {
    pub name: String,
    pub ip: String,
    /// Index into [`Topology::nodes`].
    pub node: usize,
    pub ns: NetNs,
    servers: Vec<std::process::Child>,
}

/// A node: a namespace, its LAN address, a cgroup for its pods' processes,
/// and (once started) its kproxy.
pub struct Node {
    pub name: String,
    pub ip: String,
    pub ns: NetNs,
    pub cgroup: Cgroup,
    pub config: KproxyConfig,
    pub kproxy: Option<KproxyProcess>,
}

/// The whole test world. Drop order tears it down: processes first, then
/// namespaces, cgroups, pins and the manifest directory.
pub struct Topology {
    pub id: String,
    pub mode: Mode,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    pub ext: NetNs,
    pub lan: NetNs,
    manifests: tempfile::TempDir,
    workdir: tempfile::TempDir,
    /// ebpf mode: a bpffs instance mounted for this test (inside `workdir`)
    /// holding every node's pin path; unmounted on drop.
    bpffs: Option<PathBuf>,
}

/// Mounts a private bpffs instance at `dir` (pins of one test, whatever
/// the host has at /sys/fs/bpf).
fn mount_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let dir_text = dir.to_str().context("bpffs path is not UTF-8")?;
    crate::netns::run("mount", &["-t", "bpf", "bpf", dir_text])
        .map(|_| ())
        .with_context(|| format!("mounting a bpf filesystem at {dir_text}"))
}

/// The pods every topology has: (name, ip, node index).
pub const PODS: [(&str, &str, usize); 3] = [
    ("pod-a", "10.244.1.10", 0),
    ("pod-c", "10.244.1.30", 0),
    ("pod-b", "10.244.2.10", 1),
];

impl Topology {
    /// Builds the namespaces and links (no kproxy yet: see [`Topology::start`]).
    pub fn build(mode: Mode) -> Result<Topology> {
        preflight()?;
        let id = unique_id();
        let lan = NetNs::new(format!("{id}-lan"))?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        // The LAN itself has an address: cluster-mode tests run the API
        // server here, reachable from both nodes.
        lan.ip(&["addr", "add", &format!("{LAN_IP}/24"), "dev", "br0"])?;
        let ext = NetNs::new(format!("{id}-ext"))?;
        attach_to_lan(&lan, &ext, "l-ext", EXT_IP)?;

        let manifests = tempfile::Builder::new()
            .prefix(&format!("{id}-manifests"))
            .tempdir()?;
        let workdir = tempfile::Builder::new()
            .prefix(&format!("{id}-work"))
            .tempdir()?;

        let bpffs = if mode == Mode::Ebpf {
            let dir = workdir.path().join("bpffs");
            mount_bpffs(&dir)?;
            Some(dir)
        } else {
            None
        };
        let mut nodes = Vec::new();
        for (i, name) in NODE_NAMES.iter().enumerate() {
            let ns = NetNs::new(format!("{id}-{name}"))?;
            attach_to_lan(&lan, &ns, &format!("l-{name}"), NODE_IPS[i])?;
            ns.sysctls(&[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv4/conf/all/rp_filter", "0"),
                ("net/ipv4/conf/default/rp_filter", "0"),
            ])?;
            let other = 1 - i;
            ns.ip(&["route", "add", POD_CIDRS[other], "via", NODE_IPS[other]])?;
            ns.ip(&["route", "add", SERVICE_CIDR, "dev", "eth0"])?;
            let cgroup = Cgroup::new(&format!("{id}-{name}"))?;
            let config = KproxyConfig {
                mode,
                node_name: name.to_string(),
                manifests: manifests.path().to_path_buf(),
                kubeconfig: None,
                cluster_cidr: CLUSTER_CIDR.into(),
                cgroup: Some(cgroup.path.clone()),
                pin_path: bpffs.as_ref().map(|b| b.join(name)),
                log: workdir.path().join(format!("kproxy-{name}.log")),
                extra_args: Vec::new(),
            };
            nodes.push(Node {
                name: name.to_string(),
                ip: NODE_IPS[i].into(),
                ns,
                cgroup,
                config,
                kproxy: None,
            });
        }

        let mut pods = Vec::new();
        for (name, ip, node) in PODS {
            let ns = NetNs::new(format!("{id}-{name}"))?;
            let n = &nodes[node];
            let host_dev = format!("v-{name}");
            n.ns.ip(&[
                "link", "add", &host_dev, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])?;
            n.ns.ip(&["link", "set", &host_dev, "up"])?;
            n.ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_dev])?;
            n.ns.no_offload(&host_dev)?;
            ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&[
                "route", "add", "default", "via", &n.ip, "dev", "eth0", "onlink",
            ])?;
            ns.no_offload("eth0")?;
            pods.push(Pod {
                name: name.to_string(),
                ip: ip.to_string(),
                node,
                ns,
                servers: Vec::new(),
            });
        }
        Ok(Topology {
            id,
            mode,
            pods,
            nodes,
            ext,
            lan,
            manifests,
            workdir,
            bpffs,
        })
    }

    /// Builds the topology, starts the test servers in every pod (TCP 8080
    /// and 9090, UDP 5353), and starts kproxy on both nodes.
    pub fn start(mode: Mode) -> Result<Topology> {
        let mut topo = Topology::build(mode)?;
        for i in 0..topo.pods.len() {
            topo.serve(i, &["--tcp", "8080", "--tcp", "9090", "--udp", "5353"])?;
        }
        for i in 0..topo.nodes.len() {
            topo.start_kproxy(i)?;
        }
        Ok(topo)
    }

    pub fn manifests(&self) -> &Path {
        self.manifests.path()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Starts `kproxy-testpod serve` in pod `i` and waits until it is bound.
    pub fn serve(&mut self, i: usize, ports: &[&str]) -> Result<()> {
        use std::io::BufRead;
        let bin = crate::client::testpod_binary()?;
        let pod = &mut self.pods[i];
        let cgroup = self.nodes[pod.node].cgroup.path.clone();
        let mut child = pod
            .ns
            .command(bin.to_str().context("testpod path")?, Some(&cgroup))
            .args(["serve", "--name", &pod.name])
            .args(ports)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting kproxy-testpod serve")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        pod.servers.push(child);
        if line.trim() != "ready" {
            bail!("server in {} did not start: {line:?}", pod.name);
        }
        Ok(())
    }

    pub fn start_kproxy(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        node.kproxy = Some(KproxyProcess::start(&node.ns, &node.config)?);
        Ok(())
    }

    /// SIGTERMs node `i`'s kproxy and waits for it to exit.
    pub fn stop_kproxy(&mut self, i: usize) -> Result<()> {
        if let Some(k) = self.nodes[i].kproxy.take() {
            let status = k.stop()?;
            if !status.success() {
                bail!(
                    "kproxy on {} exited with {status} after SIGTERM",
                    self.nodes[i].name
                );
            }
        }
        Ok(())
    }

    /// Writes manifests (atomically) into the directory both kproxies watch.
    pub fn write(&self, file: &str, docs: &[Value]) -> Result<()> {
        crate::manifests::write(self.manifests(), file, docs)
    }

    pub fn remove(&self, file: &str) -> Result<()> {
        crate::manifests::remove(self.manifests(), file)
    }

    /// Waits until `pred(node index, frontends)` holds on every node with a
    /// running kproxy, reading `kproxy status -o json` (what the kernel has
    /// programmed, read back from it: the same check for both modes).
    pub fn wait_for(&self, what: &str, pred: impl Fn(usize, &[Frontend]) -> bool) -> Result<()> {
        self.wait_for_within(what, Duration::from_secs(15), pred)
    }

    /// [`Topology::wait_for`] with its own deadline per node.
    pub fn wait_for_within(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(usize, &[Frontend]) -> bool,
    ) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.kproxy.is_none() {
                continue;
            }
            poll::until(&format!("{what} on {}", node.name), timeout, || {
                let got = self.programmed(i)?;
                if pred(i, &got) {
                    Ok(())
                } else {
                    bail!("programmed on {}: {got:#?}", node.name)
                }
            })
            .with_context(|| self.logs())?;
        }
        Ok(())
    }

    /// Waits until `service`'s frontends of `kind` exist on every node and
    /// each lists exactly `backends` (in any order; empty = rejected).
    pub fn wait_backends(&self, service: &str, kind: &str, backends: &[&str]) -> Result<()> {
        self.wait_backends_within(service, kind, backends, Duration::from_secs(15))
    }

    pub fn wait_backends_within(
        &self,
        service: &str,
        kind: &str,
        backends: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let mut want: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        want.sort();
        let what = format!("{service} {kind} -> {backends:?}");
        self.wait_for_within(&what, timeout, |_, fs| {
            let mine: Vec<&Frontend> = fs
                .iter()
                .filter(|f| f.service == service && f.kind == kind)
                .collect();
            !mine.is_empty()
                && mine.iter().all(|f| {
                    let mut got = f.backends.clone();
                    got.sort();
                    got == want
                })
        })
    }

    /// Waits until no node programs anything for `service`.
    pub fn wait_gone(&self, service: &str) -> Result<()> {
        self.wait_for(&format!("{service} removed"), |_, fs| {
            fs.iter().all(|f| f.service != service)
        })
    }

    /// What `kproxy status -o json` says node `i`'s kernel has.
    pub fn programmed(&self, i: usize) -> Result<Vec<Frontend>> {
        let node = &self.nodes[i];
        let out = crate::kproxy::run_command(&node.ns, &node.config, &["status", "-o", "json"])?;
        serde_json::from_str(&out).context("parsing kproxy status -o json")
    }

    /// Runs a client in pod `pod` (in its node's cgroup) to completion.
    pub fn from_pod(&self, pod: &str, spec: &ClientSpec) -> Result<Outcome> {
        self.start_from_pod(pod, spec)?.wait()
    }

    pub fn start_from_pod(&self, pod: &str, spec: &ClientSpec) -> Result<Running> {
        let p = self.pod(pod);
        Running::start(&p.ns, Some(self.nodes[p.node].cgroup.path()), spec)
    }

    /// Starts a client in pod `pod` outside the node's cgroup: in ebpf mode
    /// its traffic takes the TC path, like a pod kproxy does not hook.
    pub fn start_from_pod_unhooked(&self, pod: &str, spec: &ClientSpec) -> Result<Running> {
        Running::start(&self.pod(pod).ns, None, spec)
    }

    /// A metric of node `i`'s kproxy (the sum over its label sets that
    /// contain `labels`), from its /metrics in the node's namespace.
    pub fn metric(&self, i: usize, name: &str, labels: &str) -> Result<f64> {
        let (code, body) = Self::http_get(&self.nodes[i].ns, "127.0.0.1:10249", "/metrics")?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        let mut sum = 0.0;
        let mut found = false;
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let metric = key.split('{').next().unwrap_or(key);
            if metric == name && key.contains(labels) {
                sum += value.parse::<f64>().unwrap_or(0.0);
                found = true;
            }
        }
        anyhow::ensure!(found, "no metric {name}{{{labels}}} in /metrics");
        Ok(sum)
    }

    /// Runs a client in the outside namespace (not in any node's cgroup).
    pub fn from_ext(&self, spec: &ClientSpec) -> Result<Outcome> {
        Running::start(&self.ext, None, spec)?.wait()
    }

    pub fn start_from_ext(&self, spec: &ClientSpec) -> Result<Running> {
        Running::start(&self.ext, None, spec)
    }

    /// Runs a client on node `i` itself (host network, node's cgroup).
    pub fn from_node(&self, i: usize, spec: &ClientSpec) -> Result<Outcome> {
        Running::start(&self.nodes[i].ns, Some(self.nodes[i].cgroup.path()), spec)?.wait()
    }

    /// Routes `cidr` from the outside client to node `i` (what a load
    /// balancer or a router in front of the cluster would do).
    pub fn route_from_ext(&self, cidr: &str, node: usize) -> Result<()> {
        self.ext
            .ip(&["route", "replace", cidr, "via", &self.nodes[node].ip])
            .map(drop)
    }

    /// HTTP GET from inside a namespace: (status code, body).
    pub fn http_get(ns: &NetNs, addr: &str, path: &str) -> Result<(u16, String)> {
        let addr: std::net::SocketAddr = addr.parse()?;
        let path = path.to_string();
        ns.enter(move || http_get(addr, &path))?
    }

    /// Everything a dataplane can leave in node `i`'s namespace, as text:
    /// the iptables tables (both backends, counters dropped), tc filters on
    /// every device, and the BPF programs on the node's cgroup.
    pub fn dataplane_snapshot(&self, i: usize) -> Result<String> {
        let node = &self.nodes[i];
        let mut out = String::new();
        for tool in ["iptables-nft-save", "iptables-legacy-save"] {
            for table in ["nat", "filter", "mangle", "raw"] {
                let text = node.ns.exec(tool, &["-t", table]).unwrap_or_default();
                for line in text.lines().filter(|l| !l.starts_with('#')) {
                    // `:CHAIN POLICY [packets:bytes]`: counters change with traffic.
                    let line = match line.rfind(" [") {
                        Some(i) if line.starts_with(':') => &line[..i],
                        _ => line,
                    };
                    out.push_str(&format!("{tool} {table}: {line}\n"));
                }
            }
        }
        let links = node.ns.ip(&["-o", "link", "show"])?;
        for dev in links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|d| d.split('@').next().unwrap_or(d))
        {
            for dir in ["ingress", "egress"] {
                let text = node
                    .ns
                    .exec("tc", &["filter", "show", "dev", dev, dir])
                    .unwrap_or_default();
                out.push_str(&format!("tc {dev} {dir}: {text}\n"));
            }
        }
        let cg = node.cgroup.path().display().to_string();
        let progs = crate::netns::run("bpftool", &["cgroup", "show", &cg]).unwrap_or_default();
        out.push_str(&format!("cgroup programs: {progs}\n"));
        Ok(out)
    }

    /// Creates listening sockets inside the LAN namespace (for a test API
    /// server, reachable from both nodes and from nowhere outside the
    /// test's namespaces): a socket keeps the namespace it was created in.
    #[allow(clippy::type_complexity)]
    pub fn lan_binder(
        &self,
    ) -> std::sync::Arc<
        dyn Fn(std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> + Send + Sync,
    > {
        let lan = self.lan.name.clone();
        std::sync::Arc::new(move |addr| {
            crate::netns::enter(&lan, move || std::net::TcpListener::bind(addr))
                .map_err(std::io::Error::other)?
        })
    }

    /// Node `i`'s whole kproxy log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].config.log).unwrap_or_default()
    }

    /// The kproxy logs of every node, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let text = std::fs::read_to_string(&node.config.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- kproxy on {} (last lines) ---\n", node.name));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for pod in &mut self.pods {
            for child in &mut pod.servers {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for node in &mut self.nodes {
            drop(node.kproxy.take());
        }
        // ebpf mode: pins outlive the process by design; remove what this
        // test made. Unpinning detaches the programs once namespaces go.
        if self.mode == Mode::Ebpf {
            for node in &self.nodes {
                let _ = crate::kproxy::run_command(&node.ns, &node.config, &["cleanup"]);
                if let Some(pin) = &node.config.pin_path {
                    let _ = std::fs::remove_dir_all(pin);
                }
            }
        }
        // Unmounting drops whatever pins are left.
        if let Some(dir) = &self.bpffs {
            let _ = std::process::Command::new("umount").arg(dir).status();
        }
    }
}

fn attach_to_lan(lan: &NetNs, ns: &NetNs, lan_dev: &str, ip: &str) -> Result<()> {
    lan.ip(&[
        "link", "add", lan_dev, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ])?;
    lan.ip(&["link", "set", lan_dev, "master", "br0", "up"])?;
    lan.no_offload(lan_dev)?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.no_offload("eth0")?;
    Ok(())
}

/// Fails loudly, with the fix, when the machine cannot run these tests.
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("network namespaces, iptables and BPF need root: run this as root (sudo)");
    }
    for tool in ["ip", "ethtool", "iptables-restore"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` is not installed: run `cargo xtask setup`");
        }
    }
    Ok(())
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP response {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
