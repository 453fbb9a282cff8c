//! Prometheus metrics. kube-proxy's metric names, types, labels (`ip_family`
//! where kube-proxy has it) and buckets (dashboards and alerts keep working),
//! the process collector (`process_*`), plus `kproxy_*` ones of our own. The
//! sync loop and the dataplanes feed them; `/metrics` renders them.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    exponential_buckets, linear_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::dataplane::ProxyMode;
use crate::model::{ChangeSet, DesiredState, Rejection, ServicePort, TrafficPolicy};
use crate::sync::frontends::{self, FrontendTable, Status};

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// The `ip_family` label value of everything kproxy programs today.
pub const IPV4: &str = "IPv4";

/// All kproxy metrics, in their own registry (no global state, so tests can
/// make as many as they like).
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    sync_full_duration: Histogram,
    sync_partial_duration: Histogram,
    last_sync_timestamp: Gauge,
    last_queued_timestamp: Gauge,
    network_programming: Histogram,
    service_changes_total: IntCounter,
    service_changes_pending: IntGauge,
    endpoint_changes_total: IntCounter,
    endpoint_changes_pending: IntGauge,
    iptables_restore_failures: IntCounter,
    iptables_partial_restore_failures: IntCounter,
    iptables_rules: IntGaugeVec,
    iptables_rules_last: IntGaugeVec,
    no_local_endpoints: IntGaugeVec,
    healthz_total: IntCounterVec,
    livez_total: IntCounterVec,
    conntrack_deleted: IntCounter,
    conntrack_sync_duration: Histogram,
    programmed_services: IntGauge,
    programmed_endpoints: IntGauge,
    rejected_objects: IntGaugeVec,
    sync_errors: IntCounter,
    service_program_errors: IntGaugeVec,
    service_program_failures: IntCounter,
    frontends: IntGaugeVec,
    frontend_errors: IntCounterVec,
    frontend_retries: IntCounter,
    /// The current rejections, for `/kproxy/rejections` (`kproxy status`).
    rejections: std::sync::Mutex<Vec<Rejection>>,
    /// Every frontend's status, kept by the sync loop, for
    /// `/kproxy/frontends` (`kproxy status`).
    frontend_table: std::sync::Mutex<FrontendTable>,
    /// The frontend table's errors generation last exported to
    /// `kproxy_service_program_errors`.
    exported_errors: std::sync::Mutex<Option<u64>>,
    /// The programmed counts, kept up to date change by change.
    desired_counts: std::sync::Mutex<DesiredCounts>,
    /// client-go's `rest_client_*`, fed by the API client's layer.
    rest_client: crate::source::kube::rest_metrics::RestClientMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Registers `metric` and hands it back; names are static and unique, so a
/// failure is a programming error.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid");
    metric
}

/// A histogram with an `ip_family` label; the IPv4 child.
fn family_histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        &["ip_family"],
    )
    .expect("valid histogram");
    register(registry, h).with_label_values(&[IPV4])
}

/// A gauge with an `ip_family` label; the IPv4 child.
fn family_gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = GaugeVec::new(Opts::new(name, help), &["ip_family"]).expect("valid gauge");
    register(registry, g).with_label_values(&[IPV4])
}

/// A counter with an `ip_family` label; the IPv4 child.
fn family_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounterVec::new(Opts::new(name, help), &["ip_family"]).expect("valid counter");
    register(registry, c).with_label_values(&[IPV4])
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid gauge"))
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("valid counter"),
    )
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter vec"),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge vec"),
    )
}

/// kube-proxy's sync latency buckets: 1ms doubling to ~16s.
fn sync_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 15).expect("valid buckets")
}

/// kube-proxy's network programming buckets: 0, 0.25s, 0.5s, 1s..59s,
/// 60s..115s by 5s, 2min..5min by 30s.
fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0];
    for (start, width, count) in [
        (0.25, 0.25, 2),
        (1.0, 1.0, 59),
        (60.0, 5.0, 12),
        (120.0, 30.0, 7),
    ] {
        b.extend(linear_buckets(start, width, count).expect("valid buckets"));
    }
    b
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    /// The API client's layer that counts its requests (`rest_client_*`).
    pub fn rest_client_layer(
        &self,
        host: &str,
    ) -> crate::source::kube::rest_metrics::RestClientLayer {
        self.rest_client.layer(host)
    }

    pub fn new(mode: ProxyMode) -> Self {
        let r = Registry::new();
        let m = Metrics {
            sync_duration: family_histogram(
                &r,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_buckets(),
            ),
            sync_full_duration: family_histogram(
                &r,
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                sync_buckets(),
            ),
            sync_partial_duration: family_histogram(
                &r,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                sync_buckets(),
            ),
            last_sync_timestamp: family_gauge(
                &r,
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
            ),
            last_queued_timestamp: family_gauge(
                &r,
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
            ),
            network_programming: family_histogram(
                &r,
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                network_programming_buckets(),
            ),
            service_changes_total: counter(
                &r,
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
            ),
            service_changes_pending: int_gauge(
                &r,
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
            ),
            endpoint_changes_total: counter(
                &r,
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
            ),
            endpoint_changes_pending: int_gauge(
                &r,
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
            ),
            iptables_restore_failures: family_counter(
                &r,
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                "Cumulative proxy iptables restore failures",
            ),
            iptables_partial_restore_failures: family_counter(
                &r,
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
                "Cumulative proxy iptables partial restore failures",
            ),
            iptables_rules: gauge_vec(
                &r,
                "kubeproxy_sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
                &["ip_family", "table"],
            ),
            iptables_rules_last: gauge_vec(
                &r,
                "kubeproxy_sync_proxy_rules_iptables_last",
                "Number of iptables rules written by kube-proxy in last sync",
                &["ip_family", "table"],
            ),
            no_local_endpoints: gauge_vec(
                &r,
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                &["ip_family", "traffic_policy"],
            ),
            healthz_total: counter_vec(
                &r,
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
                &["code"],
            ),
            livez_total: counter_vec(
                &r,
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
                &["code"],
            ),
            conntrack_deleted: family_counter(
                &r,
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "Cumulative conntrack flows deleted by conntrack reconciler",
            ),
            conntrack_sync_duration: family_histogram(
                &r,
                "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                "ReconcileConntrackFlowsLatency latency in seconds",
                sync_buckets(),
            ),
            programmed_services: int_gauge(
                &r,
                "kproxy_programmed_services",
                "Service ports programmed by the last successful sync",
            ),
            programmed_endpoints: int_gauge(
                &r,
                "kproxy_programmed_endpoints",
                "Endpoints (per Service port) programmed by the last successful sync",
            ),
            rejected_objects: gauge_vec(
                &r,
                "kproxy_rejected_objects",
                "Objects (or parts of them) currently not programmed, by kind and reason: invalid, IPv6 (ipv6_unsupported), a frontend another Service owns (frontend_conflict)",
                &["kind", "reason"],
            ),
            sync_errors: counter(&r, "kproxy_sync_errors_total", "Cumulative failed syncs"),
            service_program_errors: gauge_vec(
                &r,
                "kproxy_service_program_errors",
                "Service ports the last sync could not program (e.g. a full BPF map), by Service and reason",
                &["service", "reason"],
            ),
            service_program_failures: counter(
                &r,
                "kproxy_service_program_failures_total",
                "Cumulative Service ports a sync could not program",
            ),
            frontends: gauge_vec(
                &r,
                "kproxy_frontends",
                "Frontends (Service port x ClusterIP, node port, external or LB IP) by status: applied, pending (in a sync not finished), error (retried with backoff)",
                &["status"],
            ),
            frontend_errors: counter_vec(
                &r,
                "kproxy_frontend_errors_total",
                "Cumulative frontend writes that failed, by reason (map_full, map_error, sync_failed)",
                &["reason"],
            ),
            frontend_retries: counter(
                &r,
                "kproxy_frontend_retries_total",
                "Cumulative frontends written again after an error",
            ),
            rejections: std::sync::Mutex::new(Vec::new()),
            frontend_table: std::sync::Mutex::new(FrontendTable::default()),
            exported_errors: std::sync::Mutex::new(None),
            desired_counts: std::sync::Mutex::new(DesiredCounts::default()),
            rest_client: crate::source::kube::rest_metrics::RestClientMetrics::register(&r),
            registry: r,
        };
        for status in Status::ALL {
            m.frontends.with_label_values(&[status.as_str()]).set(0);
        }
        // Label values that exist from the start, so a 0 is visible.
        for policy in ["internal", "external"] {
            m.no_local_endpoints
                .with_label_values(&[IPV4, policy])
                .set(0);
        }
        if mode == ProxyMode::Iptables {
            for table in ["filter", "nat"] {
                m.iptables_rules.with_label_values(&[IPV4, table]).set(0);
                m.iptables_rules_last
                    .with_label_values(&[IPV4, table])
                    .set(0);
            }
        }
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            if let Err(err) = m.registry.register(Box::new(process)) {
                tracing::warn!(%err, "process metrics unavailable");
            }
        }
        let build_info = gauge_vec(
            &m.registry,
            "kproxy_build_info",
            "Always 1; labels say the kproxy version and proxy mode",
            &["version", "mode"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &mode.to_string()])
            .set(1);
        m
    }

    /// The registry, to add more collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// One sync attempt took `duration`. Durations are observed whatever the
    /// outcome (as kube-proxy does); the last-sync timestamp moves only on
    /// success, failures count in `kproxy_sync_errors_total`.
    pub fn observe_sync(&self, full: bool, duration: Duration, ok: bool) {
        let secs = duration.as_secs_f64();
        self.sync_duration.observe(secs);
        if full {
            self.sync_full_duration.observe(secs);
        } else {
            self.sync_partial_duration.observe(secs);
        }
        if ok {
            self.last_sync_timestamp
                .set(unix_seconds(SystemTime::now()));
        } else {
            self.sync_errors.inc();
        }
    }

    /// A sync was queued at `now`.
    pub fn observe_queued(&self, now: SystemTime) {
        self.last_queued_timestamp.set(unix_seconds(now));
    }

    /// Time from an object change to its programming in the dataplane.
    pub fn observe_network_programming(&self, duration: Duration) {
        self.network_programming.observe(duration.as_secs_f64());
    }

    pub fn add_service_changes(&self, n: u64) {
        self.service_changes_total.inc_by(n);
    }

    pub fn add_endpoint_changes(&self, n: u64) {
        self.endpoint_changes_total.inc_by(n);
    }

    /// Changes seen but not yet programmed.
    pub fn set_pending(&self, services: usize, endpoints: usize) {
        self.service_changes_pending.set(services as i64);
        self.endpoint_changes_pending.set(endpoints as i64);
    }

    /// An `iptables-restore` failed; `partial` when it was a partial sync
    /// (kube-proxy counts those in a second counter too).
    pub fn inc_iptables_restore_failures(&self) {
        self.iptables_restore_failures.inc();
    }

    pub fn inc_iptables_partial_restore_failures(&self) {
        self.iptables_partial_restore_failures.inc();
    }

    /// Rules kproxy owns in `table` (`filter`, `nat`) after the last sync.
    pub fn set_iptables_rules(&self, table: &str, rules: usize) {
        self.iptables_rules
            .with_label_values(&[IPV4, table])
            .set(rules as i64);
    }

    /// Rules the last sync wrote in `table`.
    pub fn set_iptables_rules_last(&self, table: &str, rules: usize) {
        self.iptables_rules_last
            .with_label_values(&[IPV4, table])
            .set(rules as i64);
    }

    /// A `/healthz` answer with this HTTP status.
    pub fn count_healthz(&self, code: u16) {
        self.healthz_total
            .with_label_values(&[&code.to_string()])
            .inc();
    }

    /// A `/livez` answer with this HTTP status.
    pub fn count_livez(&self, code: u16) {
        self.livez_total
            .with_label_values(&[&code.to_string()])
            .inc();
    }

    /// One UDP conntrack reconcile: how long it took, flows it deleted.
    pub fn observe_conntrack_reconcile(&self, duration: Duration, deleted: usize) {
        self.conntrack_sync_duration.observe(duration.as_secs_f64());
        self.conntrack_deleted.inc_by(deleted as u64);
    }

    /// Service ports with an internal / external Local policy and no local
    /// endpoint to send that traffic to.
    pub fn set_no_local_endpoints(&self, internal: usize, external: usize) {
        self.no_local_endpoints
            .with_label_values(&[IPV4, "internal"])
            .set(internal as i64);
        self.no_local_endpoints
            .with_label_values(&[IPV4, "external"])
            .set(external as i64);
    }

    pub fn set_programmed(&self, services: usize, endpoints: usize) {
        self.programmed_services.set(services as i64);
        self.programmed_endpoints.set(endpoints as i64);
    }

    /// Replaces the rejection gauges with the current rejections (a fixed
    /// object disappears from the metric).
    pub fn set_rejected(&self, rejected: &[Rejection]) {
        *self.rejections.lock().unwrap_or_else(|e| e.into_inner()) = rejected.to_vec();
        let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for r in rejected {
            *counts
                .entry((r.kind.as_str(), r.reason.as_str()))
                .or_default() += 1;
        }
        self.rejected_objects.reset();
        for ((kind, reason), n) in counts {
            self.rejected_objects
                .with_label_values(&[kind, reason])
                .set(n);
        }
    }

    /// Service ports a sync could not program (others stayed programmed),
    /// counted in `kproxy_service_program_failures_total`.
    pub fn count_service_errors(&self, errors: &[crate::dataplane::ServiceError]) {
        self.service_program_failures.inc_by(errors.len() as u64);
    }

    /// The frontend status table (the sync loop writes it, `/kproxy/frontends` reads it).
    pub fn frontend_table(&self) -> std::sync::MutexGuard<'_, FrontendTable> {
        self.frontend_table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The gauges that follow the frontend table: `kproxy_frontends` and
    /// the Service ports in error (`kproxy_service_program_errors`); with
    /// a finished sync's outcome, the error and retry counters.
    pub fn observe_frontends(&self, outcome: Option<&frontends::Outcome>) {
        let (counts, errors) = {
            let t = self.frontend_table();
            let generation = t.errors_generation();
            let mut exported = self
                .exported_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Rebuilt only when the ports in error changed: a sync that
            // leaves them as they were costs nothing here.
            let errors = (*exported != Some(generation)).then(|| t.port_errors());
            *exported = Some(generation);
            (t.counts(), errors)
        };
        for status in Status::ALL {
            self.frontends
                .with_label_values(&[status.as_str()])
                .set(counts.get(status) as i64);
        }
        if let Some(errors) = errors {
            self.service_program_errors.reset();
            for (service, reason) in &errors {
                self.service_program_errors
                    .with_label_values(&[service, reason])
                    .set(1);
            }
        }
        if let Some(o) = outcome {
            for (reason, n) in &o.errors {
                self.frontend_errors
                    .with_label_values(&[reason])
                    .inc_by(*n as u64);
            }
            self.frontend_retries.inc_by(o.retried as u64);
        }
    }

    /// After a successful sync of `desired`: programmed counts, rejections
    /// and no-local-endpoint counts, all derived from the desired state.
    pub fn observe_desired(&self, desired: &DesiredState) {
        let counts = DesiredCounts::of(desired);
        *self
            .desired_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = counts;
        self.set_counts(counts);
        self.set_rejected(&desired.rejected);
    }

    /// As [`Self::observe_desired`] after a sync that applied `changes`:
    /// the counts move by what the changed ports had and have (a sync costs
    /// its changes, not a walk over every Service).
    pub fn observe_changes(&self, desired: &DesiredState, changes: &ChangeSet) {
        let counts = {
            let mut c = self
                .desired_counts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            c.update(changes);
            *c
        };
        self.set_counts(counts);
        self.set_rejected(&desired.rejected);
    }

    fn set_counts(&self, counts: DesiredCounts) {
        self.set_programmed(counts.service_ports, counts.endpoints);
        self.set_no_local_endpoints(counts.no_local_internal, counts.no_local_external);
    }

    /// The current rejections (objects or parts of them not programmed).
    pub fn rejections(&self) -> Vec<Rejection> {
        self.rejections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Text exposition format, for `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(%err, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Counts derived from a desired state, for [`Metrics::observe_desired`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DesiredCounts {
    pub service_ports: usize,
    /// Sum over Service ports of the distinct endpoints receiving any traffic.
    pub endpoints: usize,
    /// Ports with internalTrafficPolicy Local and no endpoint for ClusterIP traffic.
    pub no_local_internal: usize,
    /// Ports with external frontends, externalTrafficPolicy Local and no
    /// endpoint for external traffic.
    pub no_local_external: usize,
}

impl DesiredCounts {
    pub fn of(desired: &DesiredState) -> Self {
        let mut c = DesiredCounts::default();
        for sp in desired.services.values() {
            c.add(&DesiredCounts::port(sp));
        }
        c
    }

    /// What one Service port counts for.
    fn port(sp: &ServicePort) -> Self {
        let mut eps: Vec<_> = sp
            .cluster_endpoints
            .iter()
            .chain(&sp.external_endpoints)
            .map(|e| (e.ip, e.port))
            .collect();
        eps.sort_unstable();
        eps.dedup();
        DesiredCounts {
            service_ports: 1,
            endpoints: eps.len(),
            no_local_internal: usize::from(
                sp.internal_policy == TrafficPolicy::Local && sp.cluster_endpoints.is_empty(),
            ),
            no_local_external: usize::from(
                sp.has_external_frontends()
                    && sp.external_policy == TrafficPolicy::Local
                    && sp.external_endpoints.is_empty(),
            ),
        }
    }

    fn add(&mut self, o: &Self) {
        self.service_ports += o.service_ports;
        self.endpoints += o.endpoints;
        self.no_local_internal += o.no_local_internal;
        self.no_local_external += o.no_local_external;
    }

    fn sub(&mut self, o: &Self) {
        self.service_ports -= o.service_ports;
        self.endpoints -= o.endpoints;
        self.no_local_internal -= o.no_local_internal;
        self.no_local_external -= o.no_local_external;
    }

    /// The counts after `changes`: each changed port's old part out, its new
    /// part in.
    pub fn update(&mut self, changes: &ChangeSet) {
        for (_, c) in changes.iter() {
            if let Some(old) = &c.old {
                self.sub(&DesiredCounts::port(old));
            }
            if let Some(new) = &c.new {
                self.add(&DesiredCounts::port(new));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(kind: &str, reason: &str, name: &str) -> Rejection {
        Rejection {
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
            field: "spec".into(),
            reason: reason.into(),
            message: "bad".into(),
            origin: None,
        }
    }

    #[test]
    fn renders_every_metric_name_and_type() {
        let m = Metrics::new(ProxyMode::Iptables);
        m.observe_sync(true, Duration::from_millis(3), true);
        m.observe_network_programming(Duration::from_millis(700));
        m.set_rejected(&[rejection("Service", "invalid_port", "a")]);
        m.count_healthz(200);
        m.count_livez(503);
        let text = m.render();
        for (name, kind) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "histogram",
            ),
            (
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "histogram",
            ),
            ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "gauge",
            ),
            (
                "kubeproxy_network_programming_duration_seconds",
                "histogram",
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "counter",
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "gauge",
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "counter",
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "gauge",
            ),
            (
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                "counter",
            ),
            (
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
                "counter",
            ),
            ("kubeproxy_sync_proxy_rules_iptables_total", "gauge"),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "gauge",
            ),
            ("kproxy_programmed_services", "gauge"),
            ("kproxy_programmed_endpoints", "gauge"),
            ("kproxy_rejected_objects", "gauge"),
            ("kproxy_sync_errors_total", "counter"),
            ("kproxy_frontends", "gauge"),
            ("kproxy_frontend_retries_total", "counter"),
            ("kproxy_build_info", "gauge"),
            ("kubeproxy_sync_proxy_rules_iptables_last", "gauge"),
            ("kubeproxy_proxy_healthz_total", "counter"),
            ("kubeproxy_proxy_livez_total", "counter"),
            (
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "counter",
            ),
            (
                "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                "histogram",
            ),
            ("process_resident_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} ({kind}) missing from:\n{text}"
            );
        }
        assert!(text.contains(
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.004\"} 1"
        ));
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"16.384\"} 1")
        );
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.5\"} 0")
        );
        assert!(text.contains(
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"1\"} 1"
        ));
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"300\"} 1")
        );
        assert!(text.contains(
            "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 0"
        ));
        assert!(text.contains(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 0"
        ));
        assert!(text.contains(&format!(
            "kproxy_build_info{{mode=\"iptables\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn ebpf_mode_has_no_iptables_rule_counts() {
        let text = Metrics::new(ProxyMode::Ebpf).render();
        assert!(!text.contains("kubeproxy_sync_proxy_rules_iptables_total{"));
        assert!(text.contains("mode=\"ebpf\""));
    }

    #[test]
    fn sync_outcomes() {
        let m = Metrics::new(ProxyMode::Iptables);
        m.observe_sync(false, Duration::from_millis(1), false);
        m.observe_sync(false, Duration::from_millis(1), false);
        let text = m.render();
        assert!(text.contains("kproxy_sync_errors_total 2\n"));
        assert!(text.contains(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2\n"
        ));
        assert!(text.contains(
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 0\n"
        ));
        assert!(text
            .contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 0\n"));
        m.observe_sync(true, Duration::from_millis(1), true);
        assert!(!m
            .render()
            .contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 0\n"));
    }

    #[test]
    fn rejections_are_current_not_cumulative() {
        let m = Metrics::new(ProxyMode::Iptables);
        m.set_rejected(&[
            rejection("Service", "invalid_port", "a"),
            rejection("Service", "invalid_port", "b"),
            rejection("EndpointSlice", "invalid_ip", "c"),
        ]);
        let text = m.render();
        assert!(
            text.contains("kproxy_rejected_objects{kind=\"Service\",reason=\"invalid_port\"} 2")
        );
        assert!(text
            .contains("kproxy_rejected_objects{kind=\"EndpointSlice\",reason=\"invalid_ip\"} 1"));
        m.set_rejected(&[rejection("Service", "invalid_port", "a")]);
        let text = m.render();
        assert!(
            text.contains("kproxy_rejected_objects{kind=\"Service\",reason=\"invalid_port\"} 1")
        );
        assert!(!text.contains("reason=\"invalid_ip\""));
    }

    #[test]
    fn counters_and_gauges() {
        let m = Metrics::new(ProxyMode::Iptables);
        m.add_service_changes(3);
        m.add_endpoint_changes(5);
        m.set_pending(1, 2);
        m.set_programmed(7, 11);
        m.set_iptables_rules("nat", 42);
        m.inc_iptables_restore_failures();
        m.inc_iptables_partial_restore_failures();
        m.set_no_local_endpoints(1, 2);
        m.observe_queued(UNIX_EPOCH + Duration::from_secs(1_000));
        let text = m.render();
        for line in [
            "kubeproxy_sync_proxy_rules_service_changes_total 3",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 5",
            "kubeproxy_sync_proxy_rules_service_changes_pending 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 2",
            "kproxy_programmed_services 7",
            "kproxy_programmed_endpoints 11",
            "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 42",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 2",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"} 1000",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing from:\n{text}"
            );
        }
    }
}
