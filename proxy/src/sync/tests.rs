//! The sync loop with a fake dataplane: each metric kube-proxy exports about
//! syncs moves when its cause happens (a failing iptables-restore, changes
//! that wait, a programmed EndpointSlice change with a trigger time, rule
//! counts and conntrack reconciles reported by the dataplane).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::{mpsc, watch};

use super::*;
use crate::dataplane::{
    ConntrackReconcile, DataplaneError, ProgrammedFrontend, ProxyMode, SyncStats,
};
use crate::model::{ChangeSet, DesiredState, Event, Object};
use crate::sync::frontends;

type Outcome = Result<SyncStats, DataplaneError>;

/// Returns queued outcomes in order, then success; counts its full syncs
/// and drift checks, and reports drift once when told to.
#[derive(Default)]
struct FakeDataplane {
    outcomes: Arc<Mutex<VecDeque<Outcome>>>,
    probe: DriftProbe,
}

/// What a test sees of a [`FakeDataplane`]'s syncs and drift checks.
#[derive(Default, Clone)]
struct DriftProbe {
    full_syncs: Arc<std::sync::atomic::AtomicUsize>,
    checks: Arc<std::sync::atomic::AtomicUsize>,
    drift: Arc<std::sync::atomic::AtomicBool>,
}

impl Dataplane for FakeDataplane {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Iptables
    }
    fn sync(&mut self, _: &DesiredState, _: &ChangeSet, full: bool) -> Outcome {
        if full {
            self.probe.full_syncs.fetch_add(1, Ordering::SeqCst);
        }
        let next = self.outcomes.lock().unwrap().pop_front();
        next.unwrap_or(Ok(SyncStats {
            full,
            ..SyncStats::default()
        }))
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn programmed(&self) -> Result<Vec<ProgrammedFrontend>, DataplaneError> {
        Ok(vec![])
    }
    fn drifted(&mut self) -> bool {
        self.probe.checks.fetch_add(1, Ordering::SeqCst);
        self.probe.drift.swap(false, Ordering::SeqCst)
    }
}

/// A Service and its slice (with this endpoint and trigger time), as a source tells them.
fn objects(endpoint_ip: &str, trigger: &str) -> Vec<Event> {
    let svc: Service = serde_yaml::from_str(
        "metadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, protocol: UDP}]}",
    )
    .unwrap();
    let slice: EndpointSlice = serde_yaml::from_str(&format!(
        "metadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{trigger}'}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: UDP}}]\nendpoints: [{{addresses: ['{endpoint_ip}'], conditions: {{ready: true}}}}]"
    ))
    .unwrap();
    vec![
        Event::upsert(Object::Service(Arc::new(svc))),
        Event::upsert(Object::EndpointSlice(Arc::new(slice))),
    ]
}

fn restore_error() -> DataplaneError {
    DataplaneError::Command {
        tool: "iptables-nft-restore --noflush".into(),
        message: "line 3 failed".into(),
    }
}

/// Polls `metrics` until `line` appears (bounded).
async fn wait_for(metrics: &Metrics, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = metrics.render();
        if text.contains(line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{line} never appeared:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A running sync loop, as [`spawn_loop`] starts it.
struct Looping {
    metrics: Arc<Metrics>,
    events: mpsc::UnboundedSender<Vec<Event>>,
    /// Dropping it stops the loop.
    _stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), SyncError>>,
}

/// A sync loop over `dataplane` (changes applied at once, no periodic full
/// sync).
fn spawn_loop(dataplane: Box<dyn Dataplane>) -> Looping {
    spawn_loop_with(
        dataplane,
        SyncTiming {
            full_sync_period: Duration::from_secs(3600),
            min_sync_period: Duration::ZERO,
            drift_check_period: None,
        },
    )
}

fn spawn_loop_with(dataplane: Box<dyn Dataplane>, timing: SyncTiming) -> Looping {
    spawn_loop_serving(dataplane, timing, |health| {
        HealthCheckServers::new(vec![], health)
    })
}

/// As [`spawn_loop_with`], with the healthCheckNodePort servers `servers`
/// makes.
fn spawn_loop_serving(
    dataplane: Box<dyn Dataplane>,
    timing: SyncTiming,
    servers: impl FnOnce(Arc<HealthState>) -> HealthCheckServers,
) -> Looping {
    let metrics = Arc::new(Metrics::new(dataplane.mode()));
    let health = Arc::new(HealthState::new(Duration::from_secs(60)));
    let sync = SyncLoop::new(
        dataplane,
        ModelConfig {
            node_name: "node1".into(),
        },
        timing,
        metrics.clone(),
        health.clone(),
        servers(health.clone()),
    );
    let (events, events_rx) = mpsc::unbounded_channel();
    let (stop, stop_rx) = watch::channel(false);
    Looping {
        metrics,
        events,
        _stop: stop,
        task: tokio::spawn(sync.run(events_rx, stop_rx)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_and_progress_metrics_move_with_their_causes() {
    let outcomes = Arc::new(Mutex::new(VecDeque::new()));
    let Looping {
        metrics,
        events,
        _stop,
        task,
    } = spawn_loop(Box::new(FakeDataplane {
        outcomes: outcomes.clone(),
        ..FakeDataplane::default()
    }));

    // First sync: the dataplane reports its rules and a conntrack reconcile.
    outcomes.lock().unwrap().push_back(Ok(SyncStats {
        full: true,
        rules: vec![("nat", 40, 40), ("filter", 7, 7)],
        conntrack: Some(ConntrackReconcile {
            duration: Duration::from_millis(2),
            examined: 10,
            deleted: 3,
        }),
        ..SyncStats::default()
    }));
    let trigger = "2020-01-01T00:00:00Z";
    let mut first = objects("10.244.1.5", trigger);
    first.push(Event::Synced);
    events.send(first).unwrap();
    wait_for(
        &metrics,
        "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 40",
    )
    .await;
    let text = metrics.render();
    for line in [
        "kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"filter\"} 7",
        "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 3",
        "kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv4\"} 1",
        // The slice changed with a trigger time years ago: one observation in +Inf.
        "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1",
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"300\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }

    // Partial syncs now fail in iptables-restore: the failure counters move
    // and the change stays pending.
    {
        let mut q = outcomes.lock().unwrap();
        for _ in 0..3 {
            q.push_back(Err(restore_error()));
        }
    }
    events
        .send(objects("10.244.1.6", "2020-01-01T00:00:01Z"))
        .unwrap();
    wait_for(
        &metrics,
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1",
    )
    .await;
    let text = metrics.render();
    assert!(
        text.contains("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 1\n"),
        "the slice change waits:\n{text}"
    );
    // The Service's frontend shows the failed restore until a sync succeeds.
    let report = wait_report(&metrics, "web in error", |r| r.counts.error == 1).await;
    let web = &report.frontends[0];
    assert_eq!(web.frontend, "10.96.0.10:80/udp");
    assert_eq!(web.reason.as_deref(), Some(frontends::SYNC_FAILED));
    assert_eq!(
        web.error.as_deref(),
        Some("iptables-nft-restore --noflush failed: line 3 failed")
    );
    // Retries fail until the queue is empty, then the change goes through.
    wait_for(
        &metrics,
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0\n",
    )
    .await;
    let text = metrics.render();
    assert!(
        text.contains(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 3"
        ),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 2"),
        "{text}"
    );
    assert!(text.contains("kproxy_sync_errors_total 3\n"), "{text}");
    wait_report(&metrics, "web applied", |r| {
        r.counts.error == 0 && r.counts.pending == 0 && r.counts.applied == 1
    })
    .await;
    assert!(
        text.contains("kproxy_frontend_errors_total{reason=\"sync_failed\"} 3\n"),
        "{text}"
    );
    task.abort();
}

#[test]
fn ebpf_mode_applies_changes_at_once_and_iptables_keeps_its_rate_limit() {
    let (full, min) = (Duration::from_secs(30), Duration::from_secs(1));
    let ipt = SyncTiming::for_mode(ProxyMode::Iptables, full, min);
    assert_eq!(ipt.min_sync_period, min);
    // As kube-proxy: a canary check and a partial sync every sync period,
    // a full restore (10 s at 10,000 Services) once an hour.
    assert_eq!(ipt.drift_check_period, Some(full));
    assert_eq!(ipt.full_sync_period, Duration::from_secs(3600));
    let ebpf = SyncTiming::for_mode(ProxyMode::Ebpf, full, min);
    assert_eq!(ebpf.min_sync_period, Duration::ZERO);
    assert_eq!(
        ebpf.full_sync_period, full,
        "drift repair stays in both modes"
    );
}

/// The eBPF writer over in-memory maps, as the ebpf dataplane drives it.
struct FakeMapsDataplane {
    writer: crate::dataplane::ebpf::writer::Writer,
}

impl Dataplane for FakeMapsDataplane {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Ebpf
    }
    fn sync(&mut self, desired: &DesiredState, changes: &ChangeSet, full: bool) -> Outcome {
        self.sync_retrying(desired, changes, &[], full)
    }
    fn sync_retrying(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        retry: &[crate::model::ServicePortName],
        full: bool,
    ) -> Outcome {
        let config = crate::dataplane::ebpf::test_support::config();
        let (counts, errors) = self.writer.sync(desired, changes, retry, full, &config)?;
        Ok(crate::dataplane::ebpf::to_stats(full, counts, errors))
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn programmed(&self) -> Result<Vec<ProgrammedFrontend>, DataplaneError> {
        Ok(vec![])
    }
}

/// A ClusterIP Service `name` with one endpoint.
fn cluster_ip(name: &str, vip: &str) -> Vec<Event> {
    let svc: Service = serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {vip}, ports: [{{name: http, port: 80}}]}}"
    ))
    .unwrap();
    let slice: EndpointSlice = serde_yaml::from_str(&format!(
        "metadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: ['10.244.2.9'], conditions: {{ready: true}}}}]"
    ))
    .unwrap();
    vec![
        Event::upsert(Object::Service(Arc::new(svc))),
        Event::upsert(Object::EndpointSlice(Arc::new(slice))),
    ]
}

/// Polls the frontend table until `pred` holds on its report (bounded).
async fn wait_report(
    metrics: &Metrics,
    what: &str,
    pred: impl Fn(&frontends::Report) -> bool,
) -> frontends::Report {
    // Generous: a debug build on a loaded machine (a first sync of a
    // thousand Services) must not time out; a failure still ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let report = metrics
            .frontend_table()
            .report(true, std::time::Instant::now());
        if pred(&report) {
            return report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never happened: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A sync loop over the eBPF writer on in-memory maps with room for
/// `frontends` frontend records.
fn loop_over_fake_maps(
    frontends: usize,
) -> (crate::dataplane::ebpf::tables::memory::MemoryMaps, Looping) {
    let fake = crate::dataplane::ebpf::tables::memory::MemoryMaps::default();
    fake.set_capacity(proxy_common::maps::FRONTENDS, frontends);
    let writer = crate::dataplane::ebpf::writer::Writer::over(fake.tables(), None).unwrap();
    let looping = spawn_loop(Box::new(FakeMapsDataplane { writer }));
    (fake, looping)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_that_does_not_fit_is_in_error_alone_and_retried_until_it_fits() {
    use frontends::Status;

    // Room for two frontend records: the third Service does not fit.
    let (fake, looping) = loop_over_fake_maps(2);
    let Looping {
        metrics,
        events,
        _stop,
        task,
    } = looping;

    let mut first = cluster_ip("a", "10.96.0.1");
    first.extend(cluster_ip("b", "10.96.0.2"));
    first.extend(cluster_ip("c", "10.96.0.3"));
    first.push(Event::Synced);
    events.send(first).unwrap();
    let report = wait_report(&metrics, "the first sync", |r| r.counts.error == 1).await;
    assert_eq!(report.counts.applied, 2, "{report:#?}");
    let c = report
        .frontends
        .iter()
        .find(|f| f.status == Status::Error)
        .unwrap();
    assert_eq!(
        (c.service.as_str(), c.kind.as_str(), c.frontend.as_str()),
        ("default/c:http", "ClusterIP", "10.96.0.3:80/tcp")
    );
    assert_eq!(c.reason.as_deref(), Some("map_full"));
    let message = c.error.as_deref().unwrap();
    assert!(
        message.contains("BPF map FRONTENDS is full (2 entries); raise --bpf-lb-map-max"),
        "{message}"
    );
    // The gauges follow the table just after it settles.
    for line in [
        "kproxy_frontends{status=\"applied\"} 2\n",
        "kproxy_frontends{status=\"error\"} 1\n",
        "kproxy_frontends{status=\"pending\"} 0\n",
        "kproxy_frontend_errors_total{reason=\"map_full\"} 1\n",
        "kproxy_service_program_errors{reason=\"map_full\",service=\"default/c:http\"} 1\n",
    ] {
        wait_for(&metrics, line).await;
    }

    // No event comes, yet c is retried on its own after its backoff, and
    // without a full sync.
    wait_report(&metrics, "a retry", |r| {
        r.frontends
            .iter()
            .any(|f| f.status == Status::Error && f.attempts == 2)
    })
    .await;
    let text = metrics.render();
    assert!(
        text.contains(
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1\n"
        ),
        "{text}"
    );
    assert!(text.contains("kproxy_frontend_retries_total 1\n"), "{text}");
    assert!(
        text.contains("kproxy_frontend_errors_total{reason=\"map_full\"} 2\n"),
        "{text}"
    );

    // a goes: its record makes room, and c is retried in that same sync.
    events
        .send(vec![Event::Delete(crate::model::ObjectKey {
            kind: crate::model::Kind::Service,
            namespace: "default".into(),
            name: "a".into(),
        })])
        .unwrap();
    let report = wait_report(&metrics, "c applied", |r| {
        r.counts.error == 0 && r.counts.applied == 2
    })
    .await;
    assert!(
        report
            .frontends
            .iter()
            .all(|f| f.service != "default/a:http"),
        "{report:#?}"
    );
    for line in [
        "kproxy_frontends{status=\"applied\"} 2\n",
        "kproxy_frontends{status=\"error\"} 0\n",
        "kproxy_frontend_retries_total 2\n",
    ] {
        wait_for(&metrics, line).await;
    }
    let text = metrics.render();
    assert!(!text.contains("kproxy_service_program_errors{"), "{text}");
    let vips: Vec<u32> = fake.frontends().iter().map(|(k, _)| k.ip).collect();
    assert!(
        vips.contains(&crate::dataplane::ebpf::plan::ip_key(
            "10.96.0.3".parse().unwrap()
        )),
        "c is in the map"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_of_a_thousand_services_settles_the_status_of_each_frontend() {
    use frontends::Status;

    // Enough Service ports that the status table's bookkeeping runs on a
    // thread beside the dataplane's sync; one frontend does not fit.
    let services = BEGIN_BESIDE_MIN + 100;
    let (_fake, looping) = loop_over_fake_maps(services - 1);
    let Looping {
        metrics,
        events,
        _stop,
        task,
    } = looping;
    let mut first = Vec::new();
    for i in 0..services {
        first.extend(cluster_ip(
            &format!("s{i:05}"),
            &format!("10.96.{}.{}", i / 250, i % 250 + 1),
        ));
    }
    first.push(Event::Synced);
    events.send(first).unwrap();
    let report = wait_report(&metrics, "the first sync", |r| r.counts.error == 1).await;
    assert_eq!(report.counts.applied, services - 1, "{:?}", report.counts);
    assert_eq!(report.counts.pending, 0, "{:?}", report.counts);
    let failed: Vec<_> = report
        .frontends
        .iter()
        .filter(|f| f.status == Status::Error)
        .map(|f| f.reason.as_deref())
        .collect();
    assert_eq!(failed, [Some("map_full")]);
    // The gauges follow the table just after it settles.
    for line in [
        format!("kproxy_frontends{{status=\"applied\"}} {}\n", services - 1),
        "kproxy_frontends{status=\"error\"} 1\n".to_string(),
        "kproxy_frontends{status=\"pending\"} 0\n".to_string(),
    ] {
        wait_for(&metrics, &line).await;
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_mode_checks_for_drift_each_period_and_rewrites_everything_only_after_drift() {
    let probe = DriftProbe::default();
    let Looping {
        events,
        _stop,
        task,
        ..
    } = spawn_loop_with(
        Box::new(FakeDataplane {
            probe: probe.clone(),
            ..FakeDataplane::default()
        }),
        SyncTiming::for_mode(
            ProxyMode::Iptables,
            Duration::from_millis(20),
            Duration::ZERO,
        ),
    );
    let mut first = objects("10.244.1.5", "2026-12-05T00:00:00Z");
    first.push(Event::Synced);
    events.send(first).unwrap();
    let full = || probe.full_syncs.load(Ordering::SeqCst);
    let checks = || probe.checks.load(Ordering::SeqCst);
    until("the first sync", || full() == 1).await;
    // Periodic syncs without drift: checks, no full rewrite.
    until("five drift checks", || checks() >= 5).await;
    assert_eq!(
        full(),
        1,
        "a periodic sync without drift rewrote everything"
    );
    probe.drift.store(true, Ordering::SeqCst);
    until("the full sync after the drift", || full() == 2).await;
    let seen = checks();
    until("the checks going on", || checks() >= seen + 5).await;
    assert_eq!(full(), 2, "drift reported once, repaired once");
    task.abort();
}

/// Polls `pred` until it holds (bounded).
async fn until(what: &str, pred: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !pred() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never happened"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn missing_pod_cidrs_in_node_cidr_mode_are_said_once_per_change() {
    let mut node = model::NodeInfo {
        name: "node1".into(),
        ..Default::default()
    };
    let (missing, warn) = pod_cidr_notice(None, &node).expect("said at the first sync");
    assert!(
        missing && warn.contains("\"node1\"") && warn.contains("--hostname-override"),
        "{warn}"
    );
    assert_eq!(pod_cidr_notice(Some(true), &node), None, "said once");
    node.pod_cidrs = vec!["10.244.1.0/24".parse().unwrap()];
    let (missing, info) = pod_cidr_notice(Some(true), &node).expect("said when they come");
    assert!(!missing && info.contains("10.244.1.0/24"), "{info}");
    assert_eq!(pod_cidr_notice(Some(false), &node), None);
    // Present from the start: nothing to say.
    assert_eq!(pod_cidr_notice(None, &node), None);
}

/// A healthCheckNodePort address that failed to bind (a tentative IPv6
/// address) is bound by the sync loop on its own backoff: no Service
/// change, no periodic sync needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_node_port_that_failed_to_bind_is_retried_without_a_change() {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
    let binder = crate::server::FlakyBinder::default().failing(localhost, 1);
    let Looping {
        events,
        _stop,
        task,
        ..
    } = spawn_loop_serving(
        Box::new(FakeDataplane::default()),
        SyncTiming {
            full_sync_period: Duration::from_secs(3600),
            min_sync_period: Duration::ZERO,
            drift_check_period: None,
        },
        {
            let binder = binder.clone();
            move |health| HealthCheckServers::with_binder(vec![localhost], health, Box::new(binder))
        },
    );
    let svc: Service = serde_yaml::from_str(&format!(
        "metadata: {{name: web, namespace: default}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, healthCheckNodePort: {port}, ports: [{{name: http, port: 80, nodePort: 30080, protocol: TCP}}]}}",
    ))
    .unwrap();
    events
        .send(vec![
            Event::upsert(Object::Service(Arc::new(svc))),
            Event::Synced,
        ])
        .unwrap();

    until("the first bind attempt", || binder.attempts(localhost) >= 1).await;
    until("the retry", || binder.attempts(localhost) >= 2).await;
    let addr = std::net::SocketAddr::new(localhost, port);
    crate::server::testclient::get(addr, "/")
        .await
        .expect("the retried address serves");
    task.abort();
}
