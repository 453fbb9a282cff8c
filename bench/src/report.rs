//! Results as JSON (one file per run) and a Markdown table with ratios
//! against the `iptables-restore` floor measured in the same run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::manifests::ENDPOINTS_PER_SERVICE;
use crate::measure::{Backend, ChangeResult, DatapathResult, SyncResult};

#[derive(Serialize)]
pub struct Report {
    pub started_unix: u64,
    pub kernel: String,
    pub cpus: usize,
    pub kproxy: PathBuf,
    pub endpoints_per_service: usize,
    pub sync: Vec<SyncRow>,
    /// iptables mode (first backend), one per Service count.
    pub endpoint_change: Vec<ChangeResult>,
    /// ebpf mode, same manifests, same run.
    pub ebpf_sync: Vec<EbpfRow>,
    pub ebpf_endpoint_change: Vec<ChangeResult>,
    pub errors: Vec<String>,
}

#[derive(Serialize)]
pub struct EbpfRow {
    pub services: usize,
    /// `rules` counts frontends read back from the kernel's maps.
    pub kproxy: Option<SyncResult>,
    pub errors: Vec<String>,
}

#[derive(Serialize)]
pub struct SyncRow {
    pub services: usize,
    pub backend: Backend,
    /// `iptables-<backend>-restore --noflush` of `kproxy render` output into a fresh namespace.
    pub floor_restore_s: Option<f64>,
    /// `-A` lines in `kproxy render` output (compare with `kproxy.rules`).
    pub rendered_rules: Option<usize>,
    pub kproxy: Option<SyncResult>,
    pub errors: Vec<String>,
}

impl SyncRow {
    pub fn new(services: usize, backend: Backend) -> Self {
        SyncRow {
            services,
            backend,
            floor_restore_s: None,
            rendered_rules: None,
            kproxy: None,
            errors: Vec::new(),
        }
    }
}

fn secs(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

impl Report {
    pub fn new(kproxy: &Path) -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        Report {
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            kernel,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kproxy: kproxy.to_path_buf(),
            endpoints_per_service: ENDPOINTS_PER_SERVICE,
            sync: Vec::new(),
            endpoint_change: Vec::new(),
            ebpf_sync: Vec::new(),
            ebpf_endpoint_change: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub fn failures(&self) -> usize {
        self.errors.len()
            + self.sync.iter().filter(|r| !r.errors.is_empty()).count()
            + self
                .ebpf_sync
                .iter()
                .filter(|r| !r.errors.is_empty())
                .count()
    }

    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(
            m,
            "## kproxy benchmark ({} endpoints per Service, kernel {}, {} CPUs)\n",
            self.endpoints_per_service, self.kernel, self.cpus
        );
        m.push_str("| Services | backend | floor: iptables-restore (s) | kproxy full sync (s) | sync / floor | kproxy start to healthy (s) | healthy / floor | rules rendered / programmed | kproxy RSS (MiB) |\n");
        m.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.sync {
            let k = r.kproxy.as_ref();
            let sync = k.and_then(|k| k.full_sync_s);
            let wall = k.map(|k| k.wall_to_healthy_s);
            let rules = format!(
                "{} / {}",
                r.rendered_rules
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                k.map(|k| k.rules.to_string()).unwrap_or_else(|| "-".into())
            );
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.services,
                r.backend.name(),
                secs(r.floor_restore_s),
                secs(sync),
                ratio(sync, r.floor_restore_s),
                secs(wall),
                ratio(wall, r.floor_restore_s),
                rules,
                k.map(|k| format!("{:.1}", k.rss_kib as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        for c in &self.endpoint_change {
            let _ = writeln!(
                m,
                "\nEndpoint change at {} Services (EndpointSlice file switched from pod A to pod B, client looping on the ClusterIP from a pod): traffic followed after **{:.3} s** ({} replies still from A, {} failed requests in between); kproxy RSS {:.1} MiB.",
                c.services,
                c.latency_s,
                c.stale_replies,
                c.failed_requests,
                c.rss_kib as f64 / 1024.0
            );
        }
        if !self.ebpf_sync.is_empty() {
            m.push_str("\n### ebpf mode against iptables mode (same manifests, same run)\n\n");
            m.push_str("| Services | ebpf full sync (s) | iptables full sync (s, backend) | iptables / ebpf | ebpf start to healthy (s) | frontends programmed | ebpf RSS (MiB) |\n");
            m.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
            for r in &self.ebpf_sync {
                let k = r.kproxy.as_ref();
                let ebpf = k.and_then(|k| k.full_sync_s);
                // The fastest iptables backend of the same Service count.
                let ipt = self
                    .sync
                    .iter()
                    .filter(|s| s.services == r.services)
                    .filter_map(|s| Some((s.kproxy.as_ref()?.full_sync_s?, s.backend.name())))
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.services,
                    secs(ebpf),
                    ipt.map(|(s, b)| format!("{s:.3} ({b})"))
                        .unwrap_or_else(|| "-".into()),
                    ratio(ipt.map(|(s, _)| s), ebpf),
                    secs(k.map(|k| k.wall_to_healthy_s)),
                    k.map(|k| k.rules.to_string()).unwrap_or_else(|| "-".into()),
                    k.map(|k| format!("{:.1}", k.rss_kib as f64 / 1024.0))
                        .unwrap_or_else(|| "-".into()),
                );
            }
        }
        for c in &self.ebpf_endpoint_change {
            let _ = writeln!(
                m,
                "\nebpf mode, endpoint change at {} Services (client pod's packets to the ClusterIP take the TC path on the pod veths): traffic followed after **{:.3} s** ({} replies still from A, {} failed requests in between); kproxy RSS {:.1} MiB.",
                c.services,
                c.latency_s,
                c.stale_replies,
                c.failed_requests,
                c.rss_kib as f64 / 1024.0
            );
        }
        self.datapath_table(&mut m);
        let errors: Vec<&String> = self
            .sync
            .iter()
            .flat_map(|r| &r.errors)
            .chain(self.ebpf_sync.iter().flat_map(|r| &r.errors))
            .chain(&self.errors)
            .collect();
        if !errors.is_empty() {
            m.push_str("\nErrors:\n");
            for e in errors {
                let first = e.lines().next().unwrap_or("");
                let _ = writeln!(m, "- {first}");
            }
        }
        m
    }

    /// Request latency through the ClusterIP of each mode against direct
    /// pod-to-pod requests measured in the same namespace, same minute.
    fn datapath_table(&self, m: &mut String) {
        let mut rows: Vec<(&str, &ChangeResult, &DatapathResult)> = self
            .endpoint_change
            .iter()
            .map(|c| ("iptables", c))
            .chain(self.ebpf_endpoint_change.iter().map(|c| ("ebpf", c)))
            .filter_map(|(mode, c)| Some((mode, c, c.datapath.as_ref()?)))
            .collect();
        if rows.is_empty() {
            return;
        }
        rows.sort_by_key(|(mode, c, _)| (c.services, *mode));
        m.push_str(
            "\n### Datapath: request latency through the ClusterIP against direct (same run)\n\n",
        );
        m.push_str("Each request: TCP connect from a pod, one-line reply, close; blocks of 100 alternate between the pod address and the ClusterIP.\n\n");
        m.push_str("| Services | mode | requests each | direct p50 / p99 (µs) | via Service p50 / p99 (µs) | Service / direct (p50) |\n");
        m.push_str("|---:|---|---:|---:|---:|---:|\n");
        for (mode, c, d) in rows {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {:.0} / {:.0} | {:.0} / {:.0} | {} |",
                c.services,
                mode,
                d.requests,
                d.direct_p50_us,
                d.direct_p99_us,
                d.service_p50_us,
                d.service_p99_us,
                ratio(Some(d.service_p50_us), Some(d.direct_p50_us)),
            );
        }
    }

    /// Writes `bench-<unix time>.json` and `.md` (and `latest.md`) into `out`.
    pub fn write(&self, out: &Path) -> Result<(PathBuf, PathBuf)> {
        let json = out.join(format!("bench-{}.json", self.started_unix));
        let md = out.join(format!("bench-{}.md", self.started_unix));
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
        let text = self.markdown();
        std::fs::write(&md, &text).with_context(|| format!("writing {}", md.display()))?;
        std::fs::write(out.join("latest.md"), &text)?;
        Ok((json, md))
    }
}
