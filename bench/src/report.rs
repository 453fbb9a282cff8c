//! The sweep's results: a JSON file with every run, a Markdown report with
//! the tables and the machine, and the published anchors beside them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::manifests::ENDPOINTS_PER_SERVICE;
use crate::point::{Line, Plan, Run};
use crate::stats::Spread;
use crate::sys::{load_average, Machine};

/// One floor measurement: a whole ruleset loaded by the kernel interface's
/// own tool into a fresh namespace.
#[derive(Debug, Serialize, Deserialize)]
pub struct FloorRun {
    pub services: usize,
    pub tool: String,
    pub repeat: usize,
    pub seconds: Option<f64>,
    pub capped: bool,
    /// Rules (`-A` lines) loaded.
    pub rules: Option<usize>,
    pub error: Option<String>,
}

impl FloorRun {
    pub fn new(services: usize, tool: &str, repeat: usize, rules: Option<usize>) -> FloorRun {
        FloorRun {
            services,
            tool: tool.to_string(),
            repeat,
            seconds: None,
            capped: false,
            rules,
            error: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PlanJson {
    pub repeat: usize,
    pub connects: usize,
    pub changes: usize,
    pub flood_secs: f64,
    pub flood_threads: usize,
    pub nft_cap_s: f64,
    pub change_budget_s: f64,
    /// Sweeps written before the flag existed closed client first.
    #[serde(default = "client_first")]
    pub client_closes_first: bool,
    #[serde(default)]
    pub sustain_secs: f64,
    #[serde(default)]
    pub drain_cap_s: f64,
}

fn client_first() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Sweep {
    pub started_unix: u64,
    pub machine: Machine,
    pub kproxy: PathBuf,
    pub endpoints_per_service: usize,
    pub services: Vec<usize>,
    pub lines: Vec<Line>,
    pub plan: PlanJson,
    pub floors: Vec<FloorRun>,
    pub runs: Vec<Run>,
    pub errors: Vec<String>,
    pub duration_s: f64,
}

/// A published figure, not measured here.
pub struct Anchor {
    pub source: &'static str,
    pub url: &'static str,
    pub what: &'static str,
    pub services: &'static str,
    pub figure: &'static str,
}

/// Looked up for issue 13; the kube-proxy figures were read off the
/// blog's chart (its SVG: bar heights against the axis, ±4 µs).
pub const ANCHORS: &[Anchor] = &[
    Anchor {
        source: "kube-proxy nftables blog (Kubernetes, 2025-02-28), iptables mode",
        url: "https://kubernetes.io/blog/2025/02/28/nftables-kube-proxy/",
        what: "first-packet latency p01 / p50 / p90 / p99",
        services: "5,000",
        figure: "≈ 15 / 47 / 120 / 152 µs",
    },
    Anchor {
        source: "same chart",
        url: "https://kubernetes.io/blog/2025/02/28/nftables-kube-proxy/",
        what: "first-packet latency p01 / p50 / p90 / p99",
        services: "10,000",
        figure: "≈ 11 / 62 / 189 / 257 µs",
    },
    Anchor {
        source: "same chart",
        url: "https://kubernetes.io/blog/2025/02/28/nftables-kube-proxy/",
        what: "first-packet latency p01 / p50 / p90 / p99",
        services: "30,000",
        figure: "≈ 40 / 272 / 493 / 714 µs",
    },
    Anchor {
        source: "same post, nftables mode (text; its chart is not machine-readable here)",
        url: "https://kubernetes.io/blog/2025/02/28/nftables-kube-proxy/",
        what: "first-packet latency",
        services: "5,000–30,000",
        figure: "p50 at 5k/10k ≈ iptables' p01 (≈ 11–15 µs); p99 at 30k a few µs below iptables' p01 (≈ 40 µs): flat in N",
    },
    Anchor {
        source: "Cilium CNI performance benchmark (Cilium 1.9, kernel 5.10, 100 Gbit/s bare metal)",
        url: "https://docs.cilium.io/en/stable/operations/performance/benchmark/",
        what: "TCP_CRR (new connections/s), eBPF kube-proxy replacement vs iptables (Calico + kube-proxy)",
        services: "few",
        figure: "eBPF ahead, most with 32 processes, where iptables' per-connection cost dominates (figures only in the charts)",
    },
    Anchor {
        source: "Cilium blog: CNI benchmark (2021-05-11)",
        url: "https://cilium.io/blog/2021/05/11/cni-benchmark",
        what: "same measurements, with Calico eBPF",
        services: "few",
        figure: "eBPF datapaths clearly ahead of iptables in TCP_RR / TCP_CRR (charts)",
    },
    Anchor {
        source: "TKE Cilium network benchmark (third party)",
        url: "https://imroc.cc/tke/en/networking/cilium/appendix/network-benchmark",
        what: "short-connection requests/s, kube-proxy iptables vs Cilium, 4 endpoints per Service",
        services: "5,000–30,000",
        figure: "iptables ahead at small N; overtaken at ≈ 20,000 Services; at 30,000 iptables has 70–88 % of Cilium's",
    },
];

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Sweep {
    pub fn new(
        kproxy: &Path,
        services: &[usize],
        lines: &[Line],
        repeat: usize,
        plan: &Plan,
    ) -> Sweep {
        Sweep {
            started_unix: now_unix(),
            machine: Machine::read(),
            kproxy: kproxy.to_path_buf(),
            endpoints_per_service: ENDPOINTS_PER_SERVICE,
            services: services.to_vec(),
            lines: lines.to_vec(),
            plan: PlanJson {
                repeat,
                connects: plan.connects,
                changes: plan.changes,
                flood_secs: plan.flood_secs,
                flood_threads: plan.flood_threads,
                nft_cap_s: plan.nft_cap.as_secs_f64(),
                change_budget_s: plan.change_budget.as_secs_f64(),
                client_closes_first: plan.client_closes_first,
                sustain_secs: plan.sustain_secs,
                drain_cap_s: plan.drain_cap.as_secs_f64(),
            },
            floors: Vec::new(),
            runs: Vec::new(),
            errors: Vec::new(),
            duration_s: 0.0,
        }
    }

    pub fn finish(&mut self, took: Duration) {
        self.duration_s = took.as_secs_f64();
        self.machine.load_end = Some(load_average());
    }

    pub fn failures(&self) -> usize {
        self.errors.len()
            + self.runs.iter().filter(|r| !r.errors.is_empty()).count()
            + self.floors.iter().filter(|f| f.error.is_some()).count()
    }

    /// The stem of this sweep's files: `bench-<unix time>`.
    pub fn stem(&self) -> String {
        format!("bench-{}", self.started_unix)
    }

    /// Writes `<stem>.json`, `<stem>.md` and `latest.md` into `out`.
    pub fn write(&self, out: &Path) -> Result<Vec<String>> {
        let json = out.join(format!("{}.json", self.stem()));
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
        let plots = crate::plot::existing(self, out);
        let text = self.markdown(&plots);
        let md = out.join(format!("{}.md", self.stem()));
        std::fs::write(&md, &text).with_context(|| format!("writing {}", md.display()))?;
        std::fs::write(out.join("latest.md"), &text)?;
        Ok(vec![json.display().to_string(), md.display().to_string()])
    }

    fn runs_of(&self, n: usize, line: Line) -> impl Iterator<Item = &Run> {
        self.runs
            .iter()
            .filter(move |r| r.services == n && r.line == line && r.note.is_none())
    }

    /// A metric over the repeats of one point.
    pub fn spread(&self, n: usize, line: Line, f: impl Fn(&Run) -> Option<f64>) -> Option<Spread> {
        Spread::of(self.runs_of(n, line).filter_map(f))
    }

    pub fn capped(&self, n: usize, line: Line) -> bool {
        self.runs
            .iter()
            .any(|r| r.services == n && r.line == line && r.capped)
    }

    pub fn floor(&self, n: usize, tool: &str) -> Option<Spread> {
        Spread::of(
            self.floors
                .iter()
                .filter(|f| f.services == n && f.tool == tool)
                .filter_map(|f| f.seconds),
        )
    }

    fn floor_capped(&self, n: usize, tool: &str) -> bool {
        self.floors
            .iter()
            .any(|f| f.services == n && f.tool == tool && f.capped)
    }

    /// Cell text: median (min–max), `capped` or `-`.
    fn cell(&self, n: usize, line: Line, digits: usize, f: impl Fn(&Run) -> Option<f64>) -> String {
        match self.spread(n, line, f) {
            Some(s) => s.show(digits),
            None if self.capped(n, line) => format!("capped (> {:.0} s)", self.plan.nft_cap_s),
            None => "-".into(),
        }
    }

    pub fn markdown(&self, plots: &[(String, PathBuf)]) -> String {
        let mut m = String::new();
        let mc = &self.machine;
        let _ = writeln!(
            m,
            "# kproxy benchmark: {} endpoints per Service\n",
            self.endpoints_per_service
        );
        let _ = writeln!(
            m,
            "Machine: {} ({} CPUs), {:.0} GiB, kernel {}. Load average at the start {:.2} / {:.2} / {:.2}{}. Sweep: Services {:?}, {} run(s) per point, {} connections per latency series, {} endpoint changes, {} s floods; took {:.0} s.\n",
            mc.cpu_model,
            mc.cpus,
            mc.memory_gib,
            mc.kernel,
            mc.load_start[0],
            mc.load_start[1],
            mc.load_start[2],
            mc.load_end
                .map(|l| format!(", at the end {:.2} / {:.2} / {:.2}", l[0], l[1], l[2]))
                .unwrap_or_default(),
            self.services,
            self.plan.repeat,
            self.plan.connects,
            self.plan.changes,
            self.plan.flood_secs,
            self.duration_s
        );
        if mc.busy() {
            let _ = writeln!(
                m,
                "**Warning: the machine was busy at the start (load average {:.2} on {} CPUs); other processes' work is in these numbers.**\n",
                mc.load_start[0], mc.cpus
            );
        }
        m.push_str("Cells: median over the runs, (min–max) when there were several. Lines: `ebpf` and `iptables-legacy` / `iptables-nft` are kproxy's modes; `nftables (ruleset)` is kube-proxy's nftables ruleset shape for the same Services loaded with `nft -f` (no controller: no start, no endpoint change); `direct` is pod to pod with no proxy, the physical limit of the topology.\n\n");

        self.headline(&mut m);
        self.sync_table(&mut m);
        self.change_table(&mut m);
        self.connect_table(&mut m);
        self.flood_table(&mut m);
        self.sustain_table(&mut m);
        self.memory_table(&mut m);
        if !plots.is_empty() {
            m.push_str("\n## Plots\n\n");
            for (title, path) in plots {
                let _ = writeln!(m, "- [{title}]({})", path.display());
            }
        }
        anchors(&mut m);
        let errors: Vec<String> = self
            .errors
            .iter()
            .cloned()
            .chain(self.runs.iter().flat_map(|r| {
                r.errors
                    .iter()
                    .map(move |e| format!("{} Services, {}: {e}", r.services, r.line.name()))
            }))
            .chain(self.floors.iter().filter_map(|f| {
                f.error
                    .as_ref()
                    .map(|e| format!("{} Services, {}: {e}", f.services, f.tool))
            }))
            .collect();
        if !errors.is_empty() {
            m.push_str("\n## Errors\n\n");
            for e in errors {
                let _ = writeln!(m, "- {}", e.lines().next().unwrap_or(""));
            }
        }
        m
    }

    fn lines_with(&self, pred: impl Fn(Line) -> bool) -> Vec<Line> {
        self.lines.iter().copied().filter(|&l| pred(l)).collect()
    }

    fn headline(&self, m: &mut String) {
        m.push_str("## Headline\n\nFull sync (s; `nftables`: the `nft -f` of the whole ruleset) and first-packet latency p99 through the Service from a pod in the hooked cgroup (µs; `direct`: to the pod):\n\n");
        let _ = write!(m, "| Services |");
        let mut cols = 0;
        for l in &self.lines {
            if *l != Line::Direct {
                let _ = write!(m, " {} sync (s) |", l.name());
                cols += 1;
            }
            let _ = write!(m, " {} p99 (µs) |", l.name());
            cols += 1;
        }
        let _ = writeln!(m, "\n|---:|{}", "---:|".repeat(cols));
        for &n in &self.services {
            let _ = write!(m, "| {n} |");
            for &l in &self.lines {
                if l != Line::Direct {
                    let _ = write!(m, " {} |", self.cell(n, l, 3, |r| r.sync.full_sync_s));
                }
                let to = if l == Line::Direct {
                    "direct"
                } else {
                    "service"
                };
                let _ = write!(
                    m,
                    " {} |",
                    self.cell(n, l, 0, |r| r.connect("hooked", to).map(|p| p.p99))
                );
            }
            m.push('\n');
        }
    }

    fn sync_table(&self, m: &mut String) {
        m.push_str("\n## Sync\n\nkproxy: full sync is `kubeproxy_sync_full_proxy_rules_duration_seconds` (sum / count after the first sync), start → healthy the wall time from spawn to the first 200 on `/healthz`. Floors: the same rules restored by `iptables-<backend>-restore --noflush` (from `kproxy render`) into a fresh namespace.\n\n");
        m.push_str("| Services | line | full sync (s) | start → healthy (s) | programmed | floor (s) | sync / floor |\n|---:|---|---:|---:|---:|---:|---:|\n");
        for &n in &self.services {
            for l in self.lines_with(|l| l != Line::Direct) {
                let tool = match l {
                    Line::Legacy => Some("iptables-legacy-restore"),
                    Line::Nft => Some("iptables-nft-restore"),
                    _ => None,
                };
                let floor = tool.and_then(|t| self.floor(n, t));
                let sync = self.spread(n, l, |r| r.sync.full_sync_s);
                let floor_text = match (tool, floor) {
                    (_, Some(f)) => f.show(3),
                    (Some(t), None) if self.floor_capped(n, t) => {
                        format!("capped (> {:.0} s)", self.plan.nft_cap_s)
                    }
                    _ => "-".into(),
                };
                let ratio = match (sync, floor) {
                    (Some(s), Some(f)) if f.median > 0.0 => format!("{:.2}x", s.median / f.median),
                    _ => "-".into(),
                };
                let _ = writeln!(
                    m,
                    "| {n} | {} | {} | {} | {} | {floor_text} | {ratio} |",
                    l.name(),
                    self.cell(n, l, 3, |r| r.sync.full_sync_s),
                    self.cell(n, l, 3, |r| r.sync.start_to_healthy_s),
                    self.cell(n, l, 0, |r| r.sync.programmed.map(|v| v as f64)),
                );
            }
        }
        m.push_str("\n`programmed`: iptables `-A` rules in `iptables-save`; ebpf frontends in `kproxy status`; nftables chains loaded.\n");
    }

    fn change_table(&self, m: &mut String) {
        let lines = self.lines_with(Line::is_kproxy);
        if lines.is_empty() {
            return;
        }
        m.push_str("\n## Endpoint change → traffic\n\nThe probe Service's EndpointSlice file is switched between pod A and pod B (atomic rename) while a client in the hooked cgroup connects to its ClusterIP about once a millisecond; each change is timed from the rename to the first answer from the new pod. kproxy runs with `--iptables-min-sync-period 0s`.\n\n");
        m.push_str("| Services | line | changes | p50 (ms) | p99 (ms) | max (ms) | old answers / failures during changes |\n|---:|---|---:|---:|---:|---:|---:|\n");
        for &n in &self.services {
            for &l in &lines {
                let ch = |f: fn(&crate::point::ChangeSample) -> f64| {
                    move |r: &Run| {
                        r.changes
                            .as_ref()
                            .filter(|c| !c.latency_ms.is_empty())
                            .map(f)
                    }
                };
                let _ = writeln!(
                    m,
                    "| {n} | {} | {} | {} | {} | {} | {} / {} |",
                    l.name(),
                    self.cell(n, l, 0, ch(|c| c.latency_ms.len() as f64)),
                    self.cell(n, l, 1, ch(|c| c.percentiles.p50)),
                    self.cell(n, l, 1, ch(|c| c.percentiles.p99)),
                    self.cell(n, l, 1, ch(|c| c.percentiles.max)),
                    self.cell(n, l, 0, ch(|c| c.stale as f64)),
                    self.cell(n, l, 0, ch(|c| c.failed as f64)),
                );
            }
        }
    }

    fn connect_table(&self, m: &mut String) {
        let _ = write!(
            m,
            "\n## Connect latency (first packet)\n\nTime for `connect()` to complete (SYN out, SYN-ACK back) from pod C, {} connections per series in alternating blocks of 100 between the Service's ClusterIP and pod A's address; each then reads the backend's name, and {} closes first. `hooked`: the client is in the cgroup ebpf mode balances (socket hooks); `outside`: it is not (ebpf: the TC path). In the iptables and nftables lines both clients take the same path.\n\n",
            self.plan.connects,
            if self.plan.client_closes_first {
                "the client"
            } else {
                "the backend (TIME_WAIT on the backend: a Service connection and a direct one may meet on one 4-tuple there)"
            }
        );
        m.push_str("| Services | line | from | via Service p50 / p99 / p99.9 (µs) | direct p50 / p99 / p99.9 (µs) | Service / direct (p50) | errors |\n|---:|---|---|---:|---:|---:|---:|\n");
        for &n in &self.services {
            for &l in &self.lines {
                for from in ["hooked", "outside"] {
                    let pct = |to: &'static str| {
                        let p = |f: fn(&crate::stats::Percentiles) -> f64| {
                            move |r: &Run| r.connect(from, to).map(f)
                        };
                        if self.spread(n, l, p(|p| p.p50)).is_none() {
                            return "-".to_string();
                        }
                        format!(
                            "{} / {} / {}",
                            self.cell(n, l, 0, p(|p| p.p50)),
                            self.cell(n, l, 0, p(|p| p.p99)),
                            self.cell(n, l, 0, p(|p| p.p999))
                        )
                    };
                    let svc = self.spread(n, l, |r| r.connect(from, "service").map(|p| p.p50));
                    let dir = self.spread(n, l, |r| r.connect(from, "direct").map(|p| p.p50));
                    let ratio = match (svc, dir) {
                        (Some(s), Some(d)) if d.median > 0.0 => {
                            format!("{:.2}x", s.median / d.median)
                        }
                        _ => "-".into(),
                    };
                    let errors: usize = self
                        .runs_of(n, l)
                        .flat_map(|r| r.connect.iter().filter(|c| c.from == from))
                        .map(|c| c.errors.values().sum::<usize>() + c.wrong_backend)
                        .sum();
                    if svc.is_none() && dir.is_none() && !self.capped(n, l) {
                        continue;
                    }
                    let _ = writeln!(
                        m,
                        "| {n} | {} | {from} | {} | {} | {ratio} | {errors} |",
                        l.name(),
                        pct("service"),
                        pct("direct")
                    );
                }
            }
        }
    }

    fn flood_table(&self, m: &mut String) {
        let _ = write!(
            m,
            "\n## New connections\n\n{} threads in pod C open, read and close connections for {} s. CPU: `usage_usec` of the cgroup holding every process of the node (backends, client, kproxy; the kernel's packet work is charged to them) per 1,000 connections.\n\n",
            self.plan.flood_threads, self.plan.flood_secs
        );
        m.push_str("| Services | line | from → to | connections/s | CPU ms per 1,000 | failed |\n|---:|---|---|---:|---:|---:|\n");
        for &n in &self.services {
            for &l in &self.lines {
                for (from, to) in [
                    ("hooked", "service"),
                    ("outside", "service"),
                    ("hooked", "direct"),
                ] {
                    if self
                        .spread(n, l, |r| r.flood(from, to).map(|f| f.conns_per_s))
                        .is_none()
                    {
                        continue;
                    }
                    let _ = writeln!(
                        m,
                        "| {n} | {} | {from} → {to} | {} | {} | {} |",
                        l.name(),
                        self.cell(n, l, 0, |r| r.flood(from, to).map(|f| f.conns_per_s)),
                        self.cell(n, l, 1, |r| r.flood(from, to).map(|f| f.cpu_ms_per_1k)),
                        self.cell(n, l, 0, |r| r.flood(from, to).map(|f| f.failed as f64)),
                    );
                }
            }
        }
    }

    fn sustain_table(&self, m: &mut String) {
        let has = |r: &Run| r.sustained.is_some();
        if !self.runs.iter().any(has) {
            return;
        }
        let _ = write!(
            m,
            "\n## Sustained NodePort with SNAT\n\n{} threads outside the cluster open, read and close connections for {} s through a NodePort whose only endpoint is on another node (every connection is SNATed). Table fill: ebpf `kproxy_bpf_map_pressure` per map, iptables `nf_conntrack_count / nf_conntrack_max` of the node; 6 s after the connections (ebpf's gauges follow its garbage collector's 5 s walks), and when every table was under 0.1 % (or at the {} s cap).\n\n",
            self.plan.flood_threads, self.plan.sustain_secs, self.plan.drain_cap_s
        );
        m.push_str("| Services | line | run | connections/s | connections | failed | wrong backend | fill after | drained after (s) | fill then |\n|---:|---|---:|---:|---:|---:|---:|---|---:|---|\n");
        let fill = |f: &std::collections::BTreeMap<String, f64>| {
            f.iter()
                .map(|(k, v)| format!("{k} {:.2} %", v * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for r in self.runs.iter().filter(|r| has(r)) {
            let Some(s) = &r.sustained else { continue };
            let mut failed = s.failed.to_string();
            if !s.errors.is_empty() {
                let kinds: Vec<String> = s.errors.iter().map(|(k, v)| format!("{v} {k}")).collect();
                failed = format!("{failed} ({})", kinds.join(", "));
            }
            let _ = writeln!(
                m,
                "| {} | {} | {} | {:.0} | {} | {failed} | {} | {} | {} | {} |",
                r.services,
                r.line.name(),
                r.repeat + 1,
                s.conns_per_s,
                s.ok,
                s.wrong_backend,
                fill(&s.fill_after),
                s.drained_after_s.map_or_else(
                    || format!("> {:.0}", self.plan.drain_cap_s),
                    |d| format!("{d:.1}")
                ),
                fill(&s.fill_after_timeouts),
            );
        }
    }

    fn memory_table(&self, m: &mut String) {
        let lines = self.lines_with(Line::is_kproxy);
        if lines.is_empty() {
            return;
        }
        m.push_str("\n## Memory\n\n| Services | line | kproxy RSS after the first sync (MiB) | after the endpoint changes (MiB) | BPF maps, locked (MiB) |\n|---:|---|---:|---:|---:|\n");
        let mib = |kib: u64| kib as f64 / 1024.0;
        for &n in &self.services {
            for &l in &lines {
                let _ = writeln!(
                    m,
                    "| {n} | {} | {} | {} | {} |",
                    l.name(),
                    self.cell(n, l, 1, |r| r.sync.rss_kib.map(mib)),
                    self.cell(n, l, 1, |r| r.rss_after_changes_kib.map(mib)),
                    self.cell(n, l, 1, |r| r
                        .sync
                        .bpf_memlock_bytes
                        .map(|b| b as f64 / 1024.0 / 1024.0)),
                );
            }
        }
    }
}

fn anchors(m: &mut String) {
    m.push_str("\n## Published anchors (published elsewhere, not measured here)\n\nOther hardware, other topologies, other tools: compare shapes (how a line grows with N, which line is ahead), not absolute values.\n\n| source | what | Services | published figure |\n|---|---|---:|---|\n");
    for a in ANCHORS {
        let _ = writeln!(
            m,
            "| [{}]({}) | {} | {} | {} |",
            a.source, a.url, a.what, a.services, a.figure
        );
    }
}

/// One line per run for the progress output.
pub fn one_line(r: &Run) -> String {
    if let Some(note) = &r.note {
        return format!("{} Services, {}: {note}", r.services, r.line.name());
    }
    if r.capped {
        return format!("{} Services, {}: capped", r.services, r.line.name());
    }
    let mut s = format!(
        "{} Services, {} in {:.0} s:",
        r.services,
        r.line.name(),
        r.wall_s
    );
    if let Some(v) = r.sync.full_sync_s {
        let _ = write!(s, " sync {v:.3} s");
    }
    if let Some(p) = r.connect("hooked", "service") {
        let _ = write!(s, ", connect p50/p99 {:.0}/{:.0} µs", p.p50, p.p99);
    }
    if let Some(p) = r.connect("hooked", "direct") {
        let _ = write!(s, " (direct {:.0}/{:.0})", p.p50, p.p99);
    }
    if let Some(c) = &r.changes {
        let _ = write!(
            s,
            ", change p50/p99 {:.0}/{:.0} ms",
            c.percentiles.p50, c.percentiles.p99
        );
    }
    if let Some(f) = r.floods.first() {
        let _ = write!(s, ", {:.0} conn/s", f.conns_per_s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::{Line, Run};
    use crate::stats::Percentiles;

    fn plan() -> Plan {
        Plan {
            connects: 10,
            changes: 2,
            flood_secs: 1.0,
            flood_threads: 2,
            nft_cap: Duration::from_secs(60),
            sync_deadline: Duration::from_secs(60),
            change_budget: Duration::from_secs(60),
            client_closes_first: true,
            sustain_secs: 1.0,
            drain_cap: Duration::from_secs(1),
        }
    }

    fn run(n: usize, line: Line, repeat: usize, sync: f64) -> Run {
        let mut r: Run = serde_json::from_value(serde_json::json!({
            "services": n, "line": line, "repeat": repeat, "capped": false,
            "sync": {"full_sync_s": sync, "start_to_healthy_s": sync + 1.0},
            "connect": [], "floods": [], "changes": null, "rss_after_changes_kib": null,
            "errors": [], "note": null, "wall_s": 1.0
        }))
        .unwrap();
        r.connect.push(crate::point::ConnectSeries {
            from: "hooked".into(),
            to: "service".into(),
            connect: Percentiles::of(&[10.0, 20.0, 30.0 * sync]),
            histogram: Default::default(),
            wrong_backend: 0,
            errors: Default::default(),
        });
        r
    }

    #[test]
    fn json_round_trip_and_tables_of_the_repeats() {
        let mut s = Sweep::new(
            Path::new("/k"),
            &[1000],
            &[Line::Ebpf, Line::Nft],
            3,
            &plan(),
        );
        for (i, v) in [0.2, 0.1, 0.3].into_iter().enumerate() {
            s.runs.push(run(1000, Line::Ebpf, i, v));
        }
        s.runs.push(Run::skipped(1000, Line::Nft, 0));
        let text = serde_json::to_string(&s).unwrap();
        let back: Sweep = serde_json::from_str(&text).unwrap();
        assert_eq!(back.runs.len(), 4);
        let sp = back
            .spread(1000, Line::Ebpf, |r| r.sync.full_sync_s)
            .unwrap();
        assert_eq!((sp.min, sp.median, sp.max), (0.1, 0.2, 0.3));
        assert!(back.capped(1000, Line::Nft));
        let md = back.markdown(&[]);
        assert!(md.contains("| 1000 | ebpf | 0.200 (0.100–0.300) |"), "{md}");
        assert!(md.contains("capped (> 60 s)"), "{md}");
        assert!(md.contains("## Published anchors"));
    }
}
