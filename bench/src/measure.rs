//! The measurements: kproxy's full sync against the `iptables-restore` floor,
//! and the time from an EndpointSlice change until traffic follows it.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::manifests::{self, CLUSTER_CIDR, NODE_NAME};
use crate::sys::{http_get, EbpfEnv, Netns, Proc};

const NODE_IP: &str = "172.30.0.11";
const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";
/// Upper bound for kproxy to become healthy with the largest Service count.
const SYNC_DEADLINE: Duration = Duration::from_secs(600);

/// iptables flavour used for a run: kproxy's `--iptables-backend` and the floor's restore binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nft" => Ok(Backend::Nft),
            "legacy" => Ok(Backend::Legacy),
            _ => bail!("unknown iptables backend {s:?}: use nft or legacy"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
    fn tool(self, what: &str) -> String {
        format!("iptables-{}-{what}", self.name())
    }
}

/// Writes `kproxy render` output for `manifests` into `out`.
/// Runs in a namespace shaped like the measured node (same node address), so
/// any node-address lookup render does sees what `kproxy run` will see.
/// Returns the number of `-A` rules rendered.
pub fn render(kproxy: &Path, manifests: &Path, out: &Path) -> Result<usize> {
    let ns = Netns::new("render")?;
    node_address(&ns)?;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let res = ns
        .command(kproxy)
        .args(["render", "--manifests"])
        .arg(manifests)
        .args([
            "--hostname-override",
            NODE_NAME,
            "--cluster-cidr",
            CLUSTER_CIDR,
        ])
        .stdin(Stdio::null())
        .stdout(f)
        .output()
        .with_context(|| format!("starting {} render", kproxy.display()))?;
    if !res.status.success() {
        bail!(
            "`kproxy render --manifests {}` failed ({}): {}",
            manifests.display(),
            res.status,
            String::from_utf8_lossy(&res.stderr).trim()
        );
    }
    let size = std::fs::metadata(out)?.len();
    if size == 0 {
        bail!(
            "`kproxy render` printed nothing for {}: is render implemented?",
            manifests.display()
        );
    }
    let text = std::fs::read_to_string(out)?;
    Ok(text.lines().filter(|l| l.starts_with("-A")).count())
}

/// The floor: one `iptables-<backend>-restore --noflush` of the rendered rules
/// into a fresh namespace. Returns seconds (includes `ip netns exec`, a few ms).
pub fn restore_floor(rules: &Path, backend: Backend) -> Result<f64> {
    let ns = Netns::new("floor")?;
    let input = File::open(rules).with_context(|| format!("opening {}", rules.display()))?;
    let tool = backend.tool("restore");
    let start = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, &tool, "--noflush"])
        .stdin(input)
        .output()
        .with_context(|| format!("starting {tool}"))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{tool} --noflush < {} failed ({}): {}",
            rules.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(secs)
}

#[derive(Debug, Default, Serialize)]
pub struct SyncResult {
    /// Spawn until the first 200 on /healthz.
    pub wall_to_healthy_s: f64,
    /// kubeproxy_sync_full_proxy_rules_duration_seconds sum / count.
    pub full_sync_s: Option<f64>,
    pub full_sync_count: Option<f64>,
    /// `-A` lines in iptables-save afterwards.
    pub rules: usize,
    pub rss_kib: u64,
}

/// Which dataplane a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// iptables mode; `None` lets kproxy pick the backend.
    Iptables(Option<Backend>),
    Ebpf,
}

/// Mode flags for `kproxy run` (ebpf mode needs its pin path, cgroup and devices).
fn mode_args(mode: Mode, ebpf: Option<(&EbpfEnv, &str)>) -> Vec<String> {
    match (mode, ebpf) {
        (Mode::Ebpf, Some((env, devices))) => env.args(devices),
        (Mode::Iptables(Some(b)), _) => vec![
            "--proxy-mode".into(),
            "iptables".into(),
            "--iptables-backend".into(),
            b.name().into(),
        ],
        _ => vec!["--proxy-mode".into(), "iptables".into()],
    }
}

fn start_kproxy(
    ns: &Netns,
    kproxy: &Path,
    manifests: &Path,
    mode: &[String],
    log: &Path,
) -> Result<Proc> {
    let mut cmd = ns.command(kproxy);
    cmd.arg("run")
        .args(mode)
        .arg("--manifests")
        .arg(manifests)
        .args([
            "--hostname-override",
            NODE_NAME,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--healthz-bind-address",
            HEALTHZ,
            "--metrics-bind-address",
            METRICS,
            "--iptables-min-sync-period",
            "0s",
        ]);
    Proc::spawn(cmd, "kproxy run", Some(log))
}

/// Polls /healthz inside `ns` until 200; returns the elapsed time since `since`.
fn wait_healthy(ns: &Netns, kproxy: &mut Proc, since: Instant) -> Result<f64> {
    let addr: SocketAddr = HEALTHZ.parse()?;
    let deadline = since + SYNC_DEADLINE;
    loop {
        kproxy.check_alive()?;
        let status = ns.run_in(move || http_get(addr, "/healthz", Duration::from_millis(500)));
        if let Ok((200, _)) = status {
            return Ok(since.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!(
                "kproxy not healthy on {HEALTHZ}/healthz after {SYNC_DEADLINE:?} (last: {status:?}){}",
                kproxy.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Runs kproxy against `manifests` in a fresh namespace and measures its first sync.
pub fn kproxy_sync(kproxy: &Path, manifests: &Path, mode: Mode, log: &Path) -> Result<SyncResult> {
    let ns = Netns::new("sync")?;
    node_address(&ns)?;
    let env = match mode {
        Mode::Ebpf => Some(EbpfEnv::new()?),
        Mode::Iptables(_) => None,
    };
    let args = mode_args(mode, env.as_ref().map(|e| (e, "eth0")));
    let start = Instant::now();
    let mut p = start_kproxy(&ns, kproxy, manifests, &args, log)?;
    let wall = wait_healthy(&ns, &mut p, start)?;
    let rss_kib = p.rss_kib()?;

    let maddr: SocketAddr = METRICS.parse()?;
    let (code, text) = ns
        .run_in(move || http_get(maddr, "/metrics", Duration::from_secs(5)))
        .with_context(|| format!("fetching http://{METRICS}/metrics"))?;
    if code != 200 {
        bail!("http://{METRICS}/metrics answered {code}");
    }
    let base = "kubeproxy_sync_full_proxy_rules_duration_seconds";
    let sum = metric(&text, &format!("{base}_sum"));
    let count = metric(&text, &format!("{base}_count"));
    let full_sync_s = match (sum, count) {
        (Some(s), Some(c)) if c > 0.0 => Some(s / c),
        _ => {
            eprintln!("warning: {base} missing from /metrics; reporting wall time only");
            None
        }
    };
    let rules = match mode {
        Mode::Iptables(backend) => {
            let tool = backend.unwrap_or(Backend::Nft).tool("save");
            let save = ns.exec(&tool, &[])?;
            save.lines().filter(|l| l.starts_with("-A")).count()
        }
        // Frontends in the kernel's maps, as `kproxy status` reads them back.
        Mode::Ebpf => {
            let mut status_args = vec!["status".to_string()];
            status_args.extend(args.iter().take(4).cloned());
            status_args.extend(["-o".into(), "json".into()]);
            let out = ns
                .command(kproxy)
                .args(&status_args)
                .output()
                .context("kproxy status")?;
            if !out.status.success() {
                bail!(
                    "kproxy status failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            v.as_array().map_or(0, Vec::len)
        }
    };
    p.stop();
    drop(env);
    Ok(SyncResult {
        wall_to_healthy_s: wall,
        full_sync_s,
        full_sync_count: count,
        rules,
        rss_kib,
    })
}

/// The node's own address (NodePorts need one), on a veth whose peer stays in
/// the same namespace (the `dummy` link type is not built into every kernel).
fn node_address(ns: &Netns) -> Result<()> {
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])?;
    ns.ip(&["link", "set", "eth0p", "up"])?;
    ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 30);
const PROBE_VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 10);
const BACKEND_PORT: u16 = 8080;

/// One node namespace with three routed pods (A and B serve, C is the client),
/// wired like a simple CNI: pod ADDR/32, default via the link-local gateway
/// 169.254.1.1 held by the node side of every pod veth. No default route on the node.
struct Topology {
    // Field order: pods go before the node (Drop order does not matter for correctness).
    pods: Vec<Netns>,
    node: Netns,
}

impl Topology {
    fn new() -> Result<Self> {
        let node = Netns::new("node")?;
        node_address(&node)?;
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
            pods.push(pod);
        }
        Ok(Topology { pods, node })
    }
}

/// One request: connect, read the backend's one-line name.
fn ask(addr: SocketAddrV4, timeout: Duration) -> Result<String> {
    let s = TcpStream::connect_timeout(&addr.into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Polls `target` from inside `pod` until it answers `name` (a deadline, no
/// fixed sleep beyond the 20 ms between tries).
fn wait_answer(pod: &Netns, target: SocketAddrV4, name: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = pod.run_in(move || ask(target, Duration::from_millis(500)));
        match got {
            Ok(n) if n == name => return Ok(()),
            _ if Instant::now() > deadline => {
                bail!("{target} did not answer {name:?} (last: {got:?})")
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Backend server for the latency run (`kproxy-bench serve`): answers every
/// connection with `NAME\n` and closes it.
pub fn serve(name: &str, port: u16) -> Result<()> {
    let l = std::net::TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("binding port {port}"))?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let _ = writeln!(c, "{name}");
    }
    Ok(())
}

/// Request round trips (connect, one-line reply, close) from the client pod.
#[derive(Debug, Default, Serialize)]
pub struct DatapathResult {
    pub requests: usize,
    /// Straight to pod A's address: the ceiling, no Service translation.
    pub direct_p50_us: f64,
    pub direct_p99_us: f64,
    /// To the probe Service's ClusterIP (backend A), through the dataplane.
    pub service_p50_us: f64,
    pub service_p99_us: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `rounds` alternating blocks of direct and Service requests (alternating
/// so drift in machine load hits both alike). Runs inside the client pod.
fn measure_datapath(
    direct: SocketAddrV4,
    vip: SocketAddrV4,
    rounds: usize,
) -> Result<DatapathResult> {
    const BLOCK: usize = 100;
    let (mut d, mut s) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    for _ in 0..rounds {
        for (target, out) in [(direct, &mut d), (vip, &mut s)] {
            for _ in 0..BLOCK {
                let t = Instant::now();
                let name = ask(target, Duration::from_secs(1))
                    .with_context(|| format!("request to {target}"))?;
                if name != "A" {
                    bail!("{target} answered {name:?}, want A");
                }
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    d.sort_by(f64::total_cmp);
    s.sort_by(f64::total_cmp);
    Ok(DatapathResult {
        requests: d.len(),
        direct_p50_us: percentile(&d, 0.5),
        direct_p99_us: percentile(&d, 0.99),
        service_p50_us: percentile(&s, 0.5),
        service_p99_us: percentile(&s, 0.99),
    })
}

#[derive(Debug, Default, Serialize)]
pub struct ChangeResult {
    pub services: usize,
    /// From the atomic rename of the EndpointSlice file until the first reply from B.
    pub latency_s: f64,
    /// Requests after the change that still reached A or failed.
    pub stale_replies: usize,
    pub failed_requests: usize,
    pub rss_kib: u64,
    pub wall_to_healthy_s: f64,
    /// Request latency through the Service against direct, before the change.
    pub datapath: Option<DatapathResult>,
}

/// The endpoint-change latency at `services` Services (plus the probe Service).
pub fn endpoint_change(
    kproxy: &Path,
    manifests: &Path,
    services: usize,
    mode: Mode,
    log: &Path,
) -> Result<ChangeResult> {
    let topo = Topology::new()?;
    // ebpf: the client is a thread of this process (not in a hooked
    // cgroup), so its ClusterIP packets take the TC path on the pod veths.
    let env = match mode {
        Mode::Ebpf => Some(EbpfEnv::new()?),
        Mode::Iptables(_) => None,
    };
    let args = mode_args(mode, env.as_ref().map(|e| (e, "eth0,vpod0,vpod1,vpod2")));
    let exe = std::env::current_exe()?;
    let mut servers = Vec::new();
    for (pod, name) in topo.pods[..2].iter().zip(["A", "B"]) {
        let mut cmd = pod.command(&exe);
        cmd.args(["serve", "--name", name, "--port", &BACKEND_PORT.to_string()]);
        servers.push(Proc::spawn(cmd, &format!("backend {name}"), None)?);
    }
    // Backends reachable directly from the client pod before kproxy is involved.
    for (addr, name) in [(POD_A, "A"), (POD_B, "B")] {
        let target = SocketAddrV4::new(addr, BACKEND_PORT);
        wait_answer(&topo.pods[2], target, name, Duration::from_secs(10))
            .with_context(|| format!("backend {name} not reachable from the client pod"))?;
    }

    manifests::write_atomic(
        manifests,
        "probe.yaml",
        &manifests::probe_service(PROBE_VIP),
    )?;
    let slice = |pod| {
        let mut y = String::new();
        manifests::endpoint_slice(&mut y, "probe", &[pod]);
        y
    };
    manifests::write_atomic(manifests, "probe-slice.yaml", &slice(POD_A))?;

    let start = Instant::now();
    let mut p = start_kproxy(&topo.node, kproxy, manifests, &args, log)?;
    let wall = wait_healthy(&topo.node, &mut p, start)?;

    // Service against direct, once the probe answers from A (one at a
    // time, before the client loop starts).
    let vip = SocketAddrV4::new(PROBE_VIP, 80);
    let direct = SocketAddrV4::new(POD_A, BACKEND_PORT);
    let datapath = wait_answer(&topo.pods[2], vip, "A", Duration::from_secs(60))
        .context("probe Service never answered from A")
        .and_then(|()| topo.pods[2].run_in(move || measure_datapath(direct, vip, 20)));
    let mut datapath = match datapath {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("error: datapath measurement: {e:#}");
            None
        }
    };

    // Client loop in pod C: bounded in count and time, stopped by a flag.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(Instant, Result<String, String>)>();
    let client = {
        let stop = stop.clone();
        topo.pods[2].spawn(move || {
            let end = Instant::now() + Duration::from_secs(180);
            for _ in 0..2_000_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > end {
                    break;
                }
                let r = ask(vip, Duration::from_millis(500)).map_err(|e| e.to_string());
                if tx.send((Instant::now(), r)).is_err() {
                    break;
                }
                // Pacing, so the client does not starve kproxy of CPU.
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })
    };
    let result = (|| -> Result<ChangeResult> {
        // Traffic must reach A before the switch.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, r) = rx
                .recv_timeout(Duration::from_secs(5))
                .context("client stopped")?;
            if r.as_deref() == Ok("A") {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "probe Service {vip} never answered from A (last: {r:?}){}",
                    p.log_tail()
                );
            }
        }
        while rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        manifests::write_atomic(manifests, "probe-slice.yaml", &slice(POD_B))?;
        let (mut stale, mut failed) = (0, 0);
        let deadline = t0 + Duration::from_secs(60);
        loop {
            let (at, r) = rx
                .recv_timeout(Duration::from_secs(5))
                .context("client stopped")?;
            match r.as_deref() {
                Ok("B") if at >= t0 => {
                    return Ok(ChangeResult {
                        services,
                        latency_s: (at - t0).as_secs_f64(),
                        stale_replies: stale,
                        failed_requests: failed,
                        rss_kib: p.rss_kib()?,
                        wall_to_healthy_s: wall,
                        datapath: datapath.take(),
                    })
                }
                Ok(_) => stale += 1,
                Err(_) => failed += 1,
            }
            if Instant::now() > deadline {
                bail!("traffic to {vip} did not move to B within 60 s ({stale} replies from A, {failed} failures){}", p.log_tail());
            }
        }
    })();
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    let _ = client.join();
    p.stop();
    drop(env);
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_metrics() {
        let text = "# HELP x\nkubeproxy_sync_full_proxy_rules_duration_seconds_sum 1.5\nkubeproxy_sync_full_proxy_rules_duration_seconds_count 3\n";
        assert_eq!(
            super::metric(text, "kubeproxy_sync_full_proxy_rules_duration_seconds_sum"),
            Some(1.5)
        );
        assert_eq!(
            super::metric(
                text,
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
            ),
            Some(3.0)
        );
        assert_eq!(
            super::metric(text, "kubeproxy_sync_full_proxy_rules_duration_seconds"),
            None
        );
    }
}
