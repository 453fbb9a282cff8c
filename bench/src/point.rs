//! One measured point: a line (a kproxy mode, the nftables ruleset, or no
//! proxy at all) at N Services, once. Everything is black-box: kproxy is
//! started through its CLI and read through `/healthz`, `/metrics`,
//! `kproxy status`, /proc and the traffic its kernel state lets through.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::floor::{timed_load, Backend, Timed};
use crate::manifests::SUSTAIN_NODE_PORT;
use crate::manifests::{self, CLUSTER_CIDR, NODE_NAME};
use crate::probe::{self, ConnectSamples, FloodResult};
use crate::stats::{Histogram, Percentiles};
use crate::sys::{bpf_map_memlock, cgroup_cpu_usec, http_get, Bpffs, Netns, Proc};
use crate::topo::{Topology, BACKEND_PORT, DEVICES, NODE_IP, POD_A, POD_B, POD_D, PROBE_VIP};

const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";

/// A line of the plots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Line {
    /// kproxy --proxy-mode ebpf.
    Ebpf,
    /// kproxy --proxy-mode iptables --iptables-backend legacy.
    Legacy,
    /// kproxy --proxy-mode iptables --iptables-backend nft (capped).
    Nft,
    /// kube-proxy's nftables ruleset shape loaded with `nft -f` (no controller).
    Nftables,
    /// No proxy: pod to pod, the physical limit of the topology.
    Direct,
}

impl Line {
    pub fn parse(s: &str) -> Result<Line> {
        Ok(match s {
            "ebpf" => Line::Ebpf,
            "legacy" | "iptables-legacy" => Line::Legacy,
            "nft" | "iptables-nft" => Line::Nft,
            "nftables" => Line::Nftables,
            "direct" => Line::Direct,
            _ => bail!("unknown mode {s:?}: ebpf, legacy, nft, nftables or direct"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Line::Ebpf => "ebpf",
            Line::Legacy => "iptables-legacy",
            Line::Nft => "iptables-nft",
            Line::Nftables => "nftables (ruleset)",
            Line::Direct => "direct",
        }
    }

    pub fn is_kproxy(self) -> bool {
        matches!(self, Line::Ebpf | Line::Legacy | Line::Nft)
    }
}

/// How much each point measures.
#[derive(Debug, Clone)]
pub struct Plan {
    pub connects: usize,
    pub changes: usize,
    pub flood_secs: f64,
    pub flood_threads: usize,
    /// iptables-nft: give up on a sync (kproxy's or the floor's) after this.
    pub nft_cap: Duration,
    /// Every other sync.
    pub sync_deadline: Duration,
    /// Stop the endpoint changes of one point after this long.
    pub change_budget: Duration,
    /// Who closes each connection first (see `--client-closes-first`).
    pub client_closes_first: bool,
    /// kproxy lines: seconds of new connections from outside through a
    /// NodePort that needs SNAT (0: skipped).
    pub sustain_secs: f64,
    /// Longest wait for the tables to drain after the sustained phase.
    pub drain_cap: Duration,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SyncSample {
    /// kproxy: spawn until the first 200 on /healthz.
    pub start_to_healthy_s: Option<f64>,
    /// kproxy: kubeproxy_sync_full_proxy_rules_duration_seconds sum / count.
    /// nftables: the `nft -f` of the whole ruleset.
    pub full_sync_s: Option<f64>,
    /// iptables: `-A` lines in iptables-save; ebpf: frontends in
    /// `kproxy status`; nftables: chains in the ruleset.
    pub programmed: Option<usize>,
    pub rss_kib: Option<u64>,
    /// ebpf: bytes locked by the BPF maps kproxy holds.
    pub bpf_memlock_bytes: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectSeries {
    /// `hooked` (a pod in the cgroup ebpf mode balances) or `outside`.
    pub from: String,
    /// `service` (the probe's ClusterIP) or `direct` (pod A's address).
    pub to: String,
    /// µs.
    pub connect: Percentiles,
    pub histogram: Histogram,
    pub wrong_backend: usize,
    pub errors: std::collections::BTreeMap<String, usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FloodSample {
    pub from: String,
    pub to: String,
    pub conns_per_s: f64,
    pub failed: u64,
    /// CPU time of every process of the node's cgroup (backends, client,
    /// kproxy, and the kernel work done on their behalf) per 1,000 connections.
    pub cpu_ms_per_1k: f64,
}

/// New connections from outside the cluster through a NodePort whose
/// endpoint is on another node (every connection is SNATed), then the
/// connection-tracking tables: right after, and once their timeouts passed.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SustainSample {
    pub secs: f64,
    pub ok: u64,
    pub conns_per_s: f64,
    pub failed: u64,
    pub wrong_backend: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Fill (0..1) of each table 6 s after the connections: ebpf
    /// `kproxy_bpf_map_pressure` per map, iptables the node's
    /// `nf_conntrack_count / nf_conntrack_max`.
    pub fill_after: std::collections::BTreeMap<String, f64>,
    pub fill_after_timeouts: std::collections::BTreeMap<String, f64>,
    /// Seconds from the end of the connections until every table was
    /// under 0.1 %; None: not within `--drain-cap` (the fill is then the
    /// one at the cap).
    pub drained_after_s: Option<f64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChangeSample {
    /// ms from the atomic rename of the EndpointSlice file until the first
    /// answer from the new backend, one per change.
    pub latency_ms: Vec<f64>,
    pub percentiles: Percentiles,
    /// Answers from the old backend and failures, over all changes.
    pub stale: usize,
    pub failed: usize,
    /// Fewer changes than asked: the time budget ran out.
    pub budget_hit: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Run {
    pub services: usize,
    pub line: Line,
    pub repeat: usize,
    /// Did not finish within the cap (iptables-nft): nothing else measured.
    pub capped: bool,
    pub sync: SyncSample,
    pub connect: Vec<ConnectSeries>,
    pub floods: Vec<FloodSample>,
    pub changes: Option<ChangeSample>,
    pub rss_after_changes_kib: Option<u64>,
    #[serde(default)]
    pub sustained: Option<SustainSample>,
    pub errors: Vec<String>,
    /// Why nothing was measured, when so.
    pub note: Option<String>,
    pub wall_s: f64,
}

impl Run {
    fn empty(services: usize, line: Line, repeat: usize) -> Run {
        Run {
            services,
            line,
            repeat,
            capped: false,
            sync: SyncSample::default(),
            connect: Vec::new(),
            floods: Vec::new(),
            changes: None,
            rss_after_changes_kib: None,
            sustained: None,
            errors: Vec::new(),
            note: None,
            wall_s: 0.0,
        }
    }

    /// Not run: the line was capped at a smaller count.
    pub fn skipped(services: usize, line: Line, repeat: usize) -> Run {
        Run {
            capped: true,
            note: Some("skipped: capped at this or a smaller Service count".into()),
            ..Run::empty(services, line, repeat)
        }
    }

    pub fn connect(&self, from: &str, to: &str) -> Option<&Percentiles> {
        self.connect
            .iter()
            .find(|c| c.from == from && c.to == to && c.connect.count > 0)
            .map(|c| &c.connect)
    }

    pub fn flood(&self, from: &str, to: &str) -> Option<&FloodSample> {
        self.floods.iter().find(|f| f.from == from && f.to == to)
    }
}

/// Everything one point needs.
pub struct Setup<'a> {
    pub kproxy: &'a Path,
    /// The N Services' manifests (the probe Service is added here).
    pub manifests: &'a Path,
    pub services: usize,
    pub logs: &'a Path,
    pub work: &'a Path,
}

pub fn measure(setup: &Setup, line: Line, repeat: usize, plan: &Plan) -> Run {
    let start = Instant::now();
    let mut run = Run::empty(setup.services, line, repeat);
    if let Err(e) = measure_into(setup, line, plan, &mut run) {
        run.errors.push(format!("{e:#}"));
    }
    run.wall_s = start.elapsed().as_secs_f64();
    run
}

fn measure_into(setup: &Setup, line: Line, plan: &Plan, run: &mut Run) -> Result<()> {
    let topo = Topology::new(plan.client_closes_first)?;
    let vip = SocketAddrV4::new(PROBE_VIP, 80);
    let direct = SocketAddrV4::new(POD_A, BACKEND_PORT);
    match line {
        Line::Direct => {
            datapath(&topo, &[direct], plan, run)?;
        }
        Line::Nftables => {
            let mut svcs: Vec<_> = (0..setup.services).map(manifests::spec).collect();
            svcs.push(manifests::probe_spec(PROBE_VIP, POD_A));
            let rules = crate::nftables::ruleset(&svcs, CLUSTER_CIDR);
            let file = setup.work.join(format!("nftables-{}.nft", setup.services));
            std::fs::write(&file, &rules)?;
            run.sync.programmed = Some(crate::nftables::size(&rules).0);
            match timed_load(&topo.node, "nft", &["-f", "-"], &file, plan.nft_cap)? {
                Timed::Done(s) => run.sync.full_sync_s = Some(s),
                Timed::Capped(_) => {
                    run.capped = true;
                    return Ok(());
                }
            }
            topo.wait_answer(vip, "A", Duration::from_secs(10))?;
            datapath(&topo, &[vip, direct], plan, run)?;
        }
        Line::Ebpf | Line::Legacy | Line::Nft => {
            kproxy_point(setup, &topo, line, plan, run)?;
        }
    }
    Ok(())
}

fn kproxy_point(
    setup: &Setup,
    topo: &Topology,
    line: Line,
    plan: &Plan,
    run: &mut Run,
) -> Result<()> {
    let vip = SocketAddrV4::new(PROBE_VIP, 80);
    let direct = SocketAddrV4::new(POD_A, BACKEND_PORT);
    kproxy_tests::manifests::write_raw(
        setup.manifests,
        "probe.yaml",
        &manifests::probe_service(PROBE_VIP),
    )?;
    kproxy_tests::manifests::write_raw(setup.manifests, "probe-slice.yaml", &probe_slice(POD_A))?;
    kproxy_tests::manifests::write_raw(
        setup.manifests,
        "sustain.yaml",
        &manifests::sustain_service(POD_D),
    )?;
    let bpffs = match line {
        Line::Ebpf => Some(Bpffs::new()?),
        _ => None,
    };
    let mode: Vec<String> = match (line, &bpffs) {
        (Line::Ebpf, Some(b)) => {
            let mut args = b.args(topo.cgroups.child("hooked"), DEVICES);
            args.extend(map_sizes(setup.services));
            args
        }
        (Line::Nft, _) => ipt_args(Backend::Nft),
        _ => ipt_args(Backend::Legacy),
    };
    let log = setup
        .logs
        .join(format!("kproxy-{}-{}.log", setup.services, line_file(line)));
    let started = Instant::now();
    let mut cmd = topo
        .node
        .command_in(setup.kproxy, topo.cgroups.child("kproxy"));
    cmd.arg("run")
        .args(&mode)
        .arg("--manifests")
        .arg(setup.manifests)
        .args([
            "--hostname-override",
            NODE_NAME,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--healthz-bind-address",
            HEALTHZ,
            "--metrics-bind-address",
            METRICS,
            // The change itself, not a rate limit, is what is measured.
            "--iptables-min-sync-period",
            "0s",
        ])
        .stdin(Stdio::null());
    let mut kproxy = Proc::spawn(cmd, "kproxy run", Some(&log))?;
    let deadline = if line == Line::Nft {
        plan.nft_cap
    } else {
        plan.sync_deadline
    };
    match wait_healthy(topo, &mut kproxy, started, deadline)? {
        Some(s) => run.sync.start_to_healthy_s = Some(s),
        None if line == Line::Nft => {
            run.capped = true;
            return Ok(());
        }
        None => bail!("kproxy not healthy after {deadline:?}{}", kproxy.log_tail()),
    }
    run.sync.rss_kib = kproxy.rss_kib().ok();
    if line == Line::Ebpf {
        run.sync.bpf_memlock_bytes = bpf_map_memlock(kproxy.pid()).ok();
    }
    run.sync.full_sync_s = full_sync_seconds(topo)?;
    run.sync.programmed = programmed(setup.kproxy, topo, line, &mode).ok();

    topo.wait_answer(vip, "A", Duration::from_secs(60))
        .with_context(|| format!("the probe Service never answered{}", kproxy.log_tail()))?;
    datapath(topo, &[vip, direct], plan, run)?;
    kproxy.check_alive()?;
    run.changes = Some(endpoint_changes(setup.manifests, topo, plan)?);
    run.rss_after_changes_kib = kproxy.rss_kib().ok();
    kproxy.check_alive()?;
    if plan.sustain_secs > 0.0 {
        run.sustained = Some(
            sustained(topo, line, plan)
                .with_context(|| format!("sustained NodePort phase{}", kproxy.log_tail()))?,
        );
        kproxy.check_alive()?;
    }
    kproxy.stop();
    Ok(())
}

/// ebpf mode's map sizes for `services` Services of 10 endpoints, where the
/// defaults (65,536 frontends, 262,144 backends) are too small, as a user
/// at that scale sets them: a quarter to spare, rounded up to a power of two.
fn map_sizes(services: usize) -> Vec<String> {
    let size = |needed: usize| (needed + needed / 4).next_power_of_two();
    let mut out = Vec::new();
    // Two frontends per Service port at most (ClusterIP, NodePort).
    if size(services * 2) > 65_536 {
        out.extend([
            "--bpf-lb-map-max".to_string(),
            size(services * 2).to_string(),
        ]);
    }
    if size(services * 10) > 262_144 {
        out.extend([
            "--bpf-backend-map-max".to_string(),
            size(services * 10).to_string(),
        ]);
    }
    out
}

fn ipt_args(b: Backend) -> Vec<String> {
    ["--proxy-mode", "iptables", "--iptables-backend", b.name()]
        .map(String::from)
        .to_vec()
}

fn line_file(line: Line) -> &'static str {
    match line {
        Line::Ebpf => "ebpf",
        Line::Legacy => "legacy",
        Line::Nft => "nft",
        Line::Nftables => "nftables",
        Line::Direct => "direct",
    }
}

fn probe_slice(endpoint: std::net::Ipv4Addr) -> String {
    let mut y = String::new();
    manifests::endpoint_slice(&mut y, "probe", &[endpoint]);
    y
}

/// Polls /healthz inside the node until 200: Some(seconds since `since`),
/// None after `deadline`.
fn wait_healthy(
    topo: &Topology,
    kproxy: &mut Proc,
    since: Instant,
    deadline: Duration,
) -> Result<Option<f64>> {
    let addr: SocketAddr = HEALTHZ.parse()?;
    loop {
        kproxy.check_alive()?;
        let status = topo
            .node
            .run_in(move || http_get(addr, "/healthz", Duration::from_millis(500)));
        if let Ok((200, _)) = status {
            return Ok(Some(since.elapsed().as_secs_f64()));
        }
        if since.elapsed() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// When the tables are first read after the sustained phase.
const FILL_READ_AFTER: Duration = Duration::from_secs(6);

/// The sustained NodePort phase (see [`SustainSample`]).
fn sustained(topo: &Topology, line: Line, plan: &Plan) -> Result<SustainSample> {
    let target = SocketAddrV4::new(NODE_IP.parse()?, SUSTAIN_NODE_PORT);
    topo.wait_answer_from(&topo.remote, target, "D", Duration::from_secs(30))
        .context("the sustained phase's NodePort never answered")?;
    let r: FloodResult = probe_json(
        topo,
        &topo.remote,
        "outside",
        "flood",
        &[target],
        &[
            "--expect".into(),
            "D".into(),
            "--secs".into(),
            plan.sustain_secs.to_string(),
            "--threads".into(),
            plan.flood_threads.to_string(),
            "--count".into(),
            ((plan.sustain_secs * 100_000.0) as u64).to_string(),
        ],
    )?;
    let drained = Instant::now();
    // ebpf mode's gauges follow its garbage collector's walks (every 5 s
    // by default): both lines are read once one has passed.
    std::thread::sleep(FILL_READ_AFTER);
    let fill_after = table_fill(topo, line)?;
    let (fill_after_timeouts, drained_after_s) = loop {
        let fill = table_fill(topo, line)?;
        if fill.values().all(|&f| f < 0.001) {
            break (fill, Some(drained.elapsed().as_secs_f64()));
        }
        if drained.elapsed() > plan.drain_cap {
            break (fill, None);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    Ok(SustainSample {
        secs: r.secs,
        ok: r.ok,
        conns_per_s: r.ok as f64 / r.secs.max(1e-9),
        failed: r.failed,
        wrong_backend: r.wrong_backend,
        errors: r.errors,
        fill_after,
        fill_after_timeouts,
        drained_after_s,
    })
}

/// How full the connection-tracking tables of `line` are (see [`SustainSample`]).
fn table_fill(topo: &Topology, line: Line) -> Result<std::collections::BTreeMap<String, f64>> {
    let mut fill = std::collections::BTreeMap::new();
    if line == Line::Ebpf {
        let text = fetch_metrics(topo)?;
        for map in ["CT", "CT_NEW", "NAT", "NAT_NEW"] {
            let v = metric_labelled(&text, "kproxy_bpf_map_pressure", &format!("map=\"{map}\""))
                .with_context(|| format!("no kproxy_bpf_map_pressure for {map}"))?;
            fill.insert(map.to_string(), v);
        }
    } else {
        let read = |key: &'static str| {
            topo.node.run_in(move || {
                let path = format!("/proc/sys/net/netfilter/{key}");
                let text =
                    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                Ok(text.trim().parse::<f64>()?)
            })
        };
        let (count, max) = (read("nf_conntrack_count")?, read("nf_conntrack_max")?);
        fill.insert("nf_conntrack".to_string(), count / max.max(1.0));
    }
    Ok(fill)
}

/// The value of the series of `name` whose labels contain `label`.
pub fn metric_labelled(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let labels = l.strip_prefix(name)?.strip_prefix('{')?;
        let end = labels.find('}')?;
        if !labels[..end].split(',').any(|kv| kv == label) {
            return None;
        }
        labels[end + 1..].trim().parse().ok()
    })
}

/// One value of a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        // Labels (kube-proxy's `{ip_family="IPv4"}`) are skipped.
        let rest = match rest.strip_prefix('{') {
            Some(labels) => &labels[labels.find('}')? + 1..],
            None => rest,
        };
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// kproxy's /metrics, read inside the node.
fn fetch_metrics(topo: &Topology) -> Result<String> {
    let addr: SocketAddr = METRICS.parse()?;
    let (code, text) = topo
        .node
        .run_in(move || http_get(addr, "/metrics", Duration::from_secs(5)))
        .with_context(|| format!("fetching http://{METRICS}/metrics"))?;
    if code != 200 {
        bail!("http://{METRICS}/metrics answered {code}");
    }
    Ok(text)
}

fn full_sync_seconds(topo: &Topology) -> Result<Option<f64>> {
    let text = fetch_metrics(topo)?;
    let base = "kubeproxy_sync_full_proxy_rules_duration_seconds";
    Ok(
        match (
            metric(&text, &format!("{base}_sum")),
            metric(&text, &format!("{base}_count")),
        ) {
            (Some(s), Some(c)) if c > 0.0 => Some(s / c),
            _ => None,
        },
    )
}

/// What the kernel holds after the sync, read back.
fn programmed(kproxy: &Path, topo: &Topology, line: Line, mode: &[String]) -> Result<usize> {
    match line {
        Line::Ebpf => {
            let out = topo
                .node
                .command(kproxy)
                .arg("status")
                .args(&mode[..4])
                .args(["-o", "json"])
                .stdin(Stdio::null())
                .output()
                .context("kproxy status")?;
            if !out.status.success() {
                bail!(
                    "kproxy status failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            Ok(v.as_array().map_or(0, Vec::len))
        }
        _ => {
            let b = if line == Line::Nft {
                Backend::Nft
            } else {
                Backend::Legacy
            };
            let save = topo.node.exec(&b.tool("save"), &[])?;
            Ok(save.lines().filter(|l| l.starts_with("-A")).count())
        }
    }
}

/// Runs `kproxy-bench probe KIND` in the client pod, in `cgroup`, and
/// parses its one JSON line.
fn probe_json<T: serde::de::DeserializeOwned>(
    topo: &Topology,
    ns: &Netns,
    cgroup: &str,
    kind: &str,
    targets: &[SocketAddrV4],
    extra: &[String],
) -> Result<T> {
    let exe = std::env::current_exe()?;
    let mut cmd = ns.command_in(&exe, topo.cgroups.child(cgroup));
    cmd.args(["probe", kind]);
    for t in targets {
        cmd.args(["--target", &t.to_string()]);
    }
    cmd.args(extra);
    let out = kproxy_tests::netns::output(&mut cmd, &format!("kproxy-bench probe {kind}"))?;
    serde_json::from_str(&out).with_context(|| format!("parsing probe {kind} output"))
}

/// Connect latency from both clients, then the connection floods.
fn datapath(topo: &Topology, targets: &[SocketAddrV4], plan: &Plan, run: &mut Run) -> Result<()> {
    let names = |t: &SocketAddrV4| {
        if t.ip() == &PROBE_VIP {
            "service"
        } else {
            "direct"
        }
    };
    for from in ["hooked", "outside"] {
        let series: Vec<ConnectSamples> = probe_json(
            topo,
            topo.client(),
            from,
            "connect",
            targets,
            &[
                "--expect".into(),
                "A".into(),
                "--count".into(),
                plan.connects.to_string(),
                "--secs".into(),
                "300".into(),
            ],
        )?;
        for (t, s) in targets.iter().zip(series) {
            run.connect.push(ConnectSeries {
                from: from.into(),
                to: names(t).into(),
                connect: Percentiles::of(&s.connect_us),
                histogram: Histogram::of(&s.connect_us),
                wrong_backend: s.wrong_backend,
                errors: s.errors,
            });
        }
    }
    let mut floods = vec![("hooked", targets[0])];
    if targets.len() > 1 {
        floods.push(("outside", targets[0]));
        floods.push(("hooked", targets[1]));
    }
    for (from, target) in floods {
        let cpu0 = cgroup_cpu_usec(topo.node_cgroup())?;
        let r: FloodResult = probe_json(
            topo,
            topo.client(),
            from,
            "flood",
            &[target],
            &[
                "--secs".into(),
                plan.flood_secs.to_string(),
                "--threads".into(),
                plan.flood_threads.to_string(),
                "--count".into(),
                "2000000".into(),
            ],
        )?;
        let cpu_ms = (cgroup_cpu_usec(topo.node_cgroup())? - cpu0) as f64 / 1000.0;
        run.floods.push(FloodSample {
            from: from.into(),
            to: names(&target).into(),
            conns_per_s: r.ok as f64 / r.secs.max(1e-9),
            failed: r.failed,
            cpu_ms_per_1k: if r.ok > 0 {
                cpu_ms / r.ok as f64 * 1000.0
            } else {
                f64::NAN
            },
        });
    }
    Ok(())
}

/// Switches the probe's EndpointSlice between A and B `plan.changes` times
/// while a client in the hooked cgroup loops on the ClusterIP; each change
/// is timed from the rename until the first answer from the new backend.
fn endpoint_changes(manifests: &Path, topo: &Topology, plan: &Plan) -> Result<ChangeSample> {
    let exe = std::env::current_exe()?;
    let mut cmd = topo.client().command_in(&exe, topo.cgroups.child("hooked"));
    let budget = plan.change_budget.as_secs_f64();
    cmd.args(["probe", "follow", "--target", &format!("{PROBE_VIP}:80")])
        .args(["--secs", &(budget + 300.0).to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut follower = Proc::spawn(cmd, "probe follow", None)?;
    let stdout = follower.child.stdout.take().context("follower stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = (|| -> Result<ChangeSample> {
        let mut sample = ChangeSample::default();
        // Traffic reaches A before the first switch.
        wait_line(&rx, 0, "A", Duration::from_secs(60), &mut 0, &mut 0)?;
        let start = Instant::now();
        for k in 0..plan.changes {
            if start.elapsed() > plan.change_budget {
                sample.budget_hit = true;
                break;
            }
            let (to, ip) = if k % 2 == 0 {
                ("B", POD_B)
            } else {
                ("A", POD_A)
            };
            // Drop what was read before the switch.
            while rx.try_recv().is_ok() {}
            let t0 = probe::monotonic_ns();
            kproxy_tests::manifests::write_raw(manifests, "probe-slice.yaml", &probe_slice(ip))?;
            let t = wait_line(
                &rx,
                t0,
                to,
                Duration::from_secs(300),
                &mut sample.stale,
                &mut sample.failed,
            )
            .with_context(|| format!("change {k}: traffic never moved to {to}"))?;
            sample.latency_ms.push((t - t0) as f64 / 1e6);
        }
        sample.percentiles = Percentiles::of(&sample.latency_ms);
        Ok(sample)
    })();
    // Closing stdin ends the follower; then its output ends.
    drop(follower.child.stdin.take());
    let _ = follower.child.wait();
    drop(rx);
    let _ = reader.join();
    result
}

/// Reads follower lines until one at or after `t0` answered `want`;
/// returns its time. Counts other answers after `t0` as stale or failed.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    t0: u64,
    want: &str,
    timeout: Duration,
    stale: &mut usize,
    failed: &mut usize,
) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .context("no answer in time (or the client stopped)")?;
        let Some((t, what)) = probe::parse_follow_line(&line) else {
            continue;
        };
        if t < t0 {
            continue;
        }
        match what {
            Ok(name) if name == want => return Ok(t),
            Ok(_) => *stale += 1,
            Err(_) => *failed += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metrics() {
        let text = "# HELP x\nkubeproxy_sync_full_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"} 1.5\nkubeproxy_sync_full_proxy_rules_duration_seconds_count 3\n";
        let base = "kubeproxy_sync_full_proxy_rules_duration_seconds";
        assert_eq!(metric(text, &format!("{base}_sum")), Some(1.5));
        assert_eq!(metric(text, &format!("{base}_count")), Some(3.0));
        assert_eq!(metric(text, base), None);
    }

    #[test]
    fn lines_parse() {
        assert_eq!(Line::parse("ebpf").unwrap(), Line::Ebpf);
        assert_eq!(Line::parse("iptables-legacy").unwrap(), Line::Legacy);
        assert_eq!(Line::parse("nft").unwrap(), Line::Nft);
        assert!(Line::parse("ipvs").is_err());
        assert!(Line::Nft.is_kproxy() && !Line::Nftables.is_kproxy());
    }
}
