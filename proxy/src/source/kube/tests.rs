//! The kube source against the test API server, with the real `kube` client.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::kube::{Client, Config};
use kproxy_test_apiserver::TestApiServer;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::KubeSource;
use crate::dataplane::{Dataplane, DataplaneError, ProgrammedFrontend, ProxyMode, SyncStats};
use crate::health::{HealthState, Unhealthy};
use crate::metrics::Metrics;
use crate::model::{ChangeSet, DesiredState, ModelConfig};
use crate::server::HealthCheckServers;
use crate::source::Snapshot;
use crate::sync::{SyncLoop, SyncTiming};

const NODE: &str = "node1";

fn service(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    })
}

fn slice(name: &str, svc: &str, addrs: &[&str]) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": NODE}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}})
}

fn client_for(server: &TestApiServer) -> Client {
    Client::try_from(Config::new(server.url().parse().unwrap())).unwrap()
}

/// Endpoint addresses of a slice in the snapshot.
fn addresses(snap: &Snapshot, slice: &str) -> Vec<String> {
    snap.objects
        .endpoint_slices
        .iter()
        .filter(|s| s.metadata.name.as_deref() == Some(slice))
        .flat_map(|s| {
            s.endpoints
                .iter()
                .flatten()
                .flat_map(|e| e.addresses.clone())
        })
        .collect()
}

async fn wait_for(
    rx: &mut watch::Receiver<Snapshot>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        {
            let snap = rx.borrow_and_update();
            if snap.synced && pred(&snap) {
                return snap.clone();
            }
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("source stopped while waiting for {what}"),
            Err(_) => {
                let snap = rx.borrow();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last snapshot: synced={} services={} slices={} nodes={}",
                    snap.synced,
                    snap.objects.services.len(),
                    snap.objects.endpoint_slices.len(),
                    snap.objects.nodes.len()
                )
            }
        }
    }
}

/// Starts the source; a monitor records the smallest Service count published
/// after the first complete snapshot (a flush would show up as a drop).
fn start_source(
    server: &TestApiServer,
    health: Option<Arc<HealthState>>,
) -> (
    watch::Receiver<Snapshot>,
    Arc<Mutex<Option<usize>>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let rx = crate::source::fold(events);
    let mut source = KubeSource::new(client_for(server), NODE);
    if let Some(h) = health {
        source = source.with_health(h);
    }
    let task = tokio::spawn(source.run(tx));
    let min_seen = Arc::new(Mutex::new(None::<usize>));
    let mut mon = rx.clone();
    let min2 = min_seen.clone();
    tokio::spawn(async move {
        while mon.changed().await.is_ok() {
            let snap = mon.borrow_and_update();
            if snap.synced {
                let n = snap.objects.services.len();
                let mut m = min2.lock().unwrap_or_else(|e| e.into_inner());
                *m = Some(m.map_or(n, |old: usize| old.min(n)));
            }
        }
    });
    (rx, min_seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_updates_and_watch_drop() {
    let server = TestApiServer::start().await.unwrap();
    server.apply(service("web", "10.96.0.10")).unwrap();
    server
        .apply(slice("web-1", "web", &["10.244.1.1"]))
        .unwrap();
    server.apply(node(NODE)).unwrap();
    server.apply(node("other-node")).unwrap();
    // A slice without the service-name label is not watched (as kube-proxy).
    let mut unlabelled = slice("stray", "web", &["10.244.9.9"]);
    unlabelled["metadata"]["labels"] = json!({});
    server.apply(unlabelled).unwrap();

    let (mut rx, min_seen, task) = start_source(&server, None);
    let snap = wait_for(&mut rx, "initial sync", Duration::from_secs(20), |s| {
        s.objects.services.len() == 1
    })
    .await;
    assert_eq!(
        snap.objects.endpoint_slices.len(),
        1,
        "only labelled slices"
    );
    assert_eq!(snap.objects.nodes.len(), 1, "only this node");
    assert_eq!(snap.objects.nodes[0].metadata.name.as_deref(), Some(NODE));
    assert_eq!(addresses(&snap, "web-1"), ["10.244.1.1"]);

    // Update propagation.
    server
        .apply(slice("web-1", "web", &["10.244.1.2", "10.244.1.3"]))
        .unwrap();
    wait_for(&mut rx, "slice update", Duration::from_secs(10), |s| {
        addresses(s, "web-1") == ["10.244.1.2", "10.244.1.3"]
    })
    .await;

    // Watches dropped: the watcher re-watches from its resourceVersion.
    server.drop_watches();
    server.apply(service("api", "10.96.0.11")).unwrap();
    server
        .apply(slice("web-1", "web", &["10.244.1.4"]))
        .unwrap();
    let snap = wait_for(
        &mut rx,
        "changes after watch drop",
        Duration::from_secs(20),
        |s| s.objects.services.len() == 2 && addresses(s, "web-1") == ["10.244.1.4"],
    )
    .await;
    assert_eq!(snap.objects.services.len(), 2);

    // Deletion propagates.
    server.delete(&service("api", "")).unwrap();
    wait_for(&mut rx, "service deletion", Duration::from_secs(10), |s| {
        s.objects.services.len() == 1
    })
    .await;
    assert_eq!(*min_seen.lock().unwrap(), Some(1));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_with_compaction_relists_to_the_right_state_without_flushing() {
    let server = TestApiServer::start().await.unwrap();
    for i in 0..20 {
        server
            .apply(service(&format!("svc-{i}"), &format!("10.96.1.{i}")))
            .unwrap();
        server
            .apply(slice(
                &format!("svc-{i}-a"),
                &format!("svc-{i}"),
                &["10.244.0.1"],
            ))
            .unwrap();
    }
    server.apply(node(NODE)).unwrap();
    let (mut rx, min_seen, task) = start_source(&server, None);
    wait_for(&mut rx, "initial sync", Duration::from_secs(20), |s| {
        s.objects.services.len() == 20
    })
    .await;

    // API server gone; the cluster changes meanwhile; history compacted.
    server.stop();
    // Nothing changed after stop() reaches the client (the test server
    // drops events that race a stop).
    server.apply(service("svc-new", "10.96.2.1")).unwrap();
    server.delete(&service("svc-0", "")).unwrap();
    server
        .apply(slice("svc-5-a", "svc-5", &["10.244.5.5"]))
        .unwrap();
    for _ in 0..5 {
        // Bump resourceVersions well past what the watcher saw.
        server.apply(node("other")).unwrap();
        server.delete(&node("other")).unwrap();
    }
    server.compact();
    // While it is down, the last state stays published.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.borrow().objects.services.len(), 20);
    server.restart().await.unwrap();

    let snap = wait_for(
        &mut rx,
        "relist after compaction",
        Duration::from_secs(60),
        |s| {
            s.objects
                .services
                .iter()
                .any(|x| x.metadata.name.as_deref() == Some("svc-new"))
                && addresses(s, "svc-5-a") == ["10.244.5.5"]
        },
    )
    .await;
    assert_eq!(snap.objects.services.len(), 20);
    assert!(
        server.expired_watches() >= 1,
        "the watchers should have been told 410 Gone and relisted"
    );
    assert!(!snap
        .objects
        .services
        .iter()
        .any(|x| x.metadata.name.as_deref() == Some("svc-0")));
    assert_eq!(
        *min_seen.lock().unwrap(),
        Some(20),
        "a relist must never publish a partial or empty state"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_down_at_start_is_not_ready_with_a_reason_then_ready() {
    let server = TestApiServer::start().await.unwrap();
    server.apply(service("web", "10.96.0.10")).unwrap();
    server.apply(node(NODE)).unwrap();
    server.stop();
    let health = Arc::new(HealthState::new(Duration::from_secs(60)));
    let (mut rx, _min, task) = start_source(&server, Some(health.clone()));

    let deadline = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        if let Some(Unhealthy::SourceNotReady { reason }) =
            health.report(std::time::SystemTime::now()).unhealthy
        {
            if reason.contains("listing") {
                break reason;
            }
        }
        assert!(Instant::now() < deadline, "no source problem reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(reason.contains("Kubernetes API server"), "{reason}");
    assert!(!rx.borrow().synced);

    server.restart().await.unwrap();
    wait_for(
        &mut rx,
        "sync after the API server came up",
        Duration::from_secs(60),
        |s| s.objects.services.len() == 1,
    )
    .await;
    assert!(matches!(
        health.report(std::time::SystemTime::now()).unhealthy,
        Some(Unhealthy::NotYetSynced { .. })
    ));
    task.abort();
}

/// Counts syncs and keeps the last desired state.
struct CountingDataplane {
    syncs: Arc<AtomicUsize>,
    last: Arc<Mutex<DesiredState>>,
}

impl Dataplane for CountingDataplane {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Iptables
    }
    fn sync(
        &mut self,
        desired: &DesiredState,
        _changes: &ChangeSet,
        full: bool,
    ) -> Result<SyncStats, DataplaneError> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        *self.last.lock().unwrap() = desired.clone();
        Ok(SyncStats {
            full,
            ..SyncStats::default()
        })
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn programmed(&self) -> Result<Vec<ProgrammedFrontend>, DataplaneError> {
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_slice_updates_is_coalesced_into_few_syncs() {
    let server = TestApiServer::start().await.unwrap();
    for i in 0..10 {
        server
            .apply(service(&format!("svc-{i}"), &format!("10.96.1.{i}")))
            .unwrap();
        server
            .apply(slice(
                &format!("svc-{i}-a"),
                &format!("svc-{i}"),
                &["10.244.0.1"],
            ))
            .unwrap();
    }
    server.apply(node(NODE)).unwrap();

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let source = tokio::spawn(KubeSource::new(client_for(&server), NODE).run(tx));
    let syncs = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(Mutex::new(DesiredState::default()));
    let health = Arc::new(HealthState::new(Duration::from_secs(60)));
    let sync = SyncLoop::new(
        Box::new(CountingDataplane {
            syncs: syncs.clone(),
            last: last.clone(),
        }),
        ModelConfig {
            node_name: NODE.into(),
        },
        SyncTiming {
            full_sync_period: Duration::from_secs(3600),
            min_sync_period: Duration::from_secs(1),
            drift_check_period: None,
        },
        Arc::new(Metrics::new(ProxyMode::Iptables)),
        health.clone(),
        HealthCheckServers::new(Vec::new(), health.clone()),
    );
    let (_stop_tx, stop_rx) = watch::channel(false);
    let sync_task = tokio::spawn(sync.run(rx, stop_rx));

    let endpoints_of = |last: &DesiredState, svc: &str| -> Vec<String> {
        last.services
            .iter()
            .filter(|(k, _)| k.to_string().contains(svc))
            .flat_map(|(_, p)| p.cluster_endpoints.iter().map(|e| e.to_string()))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while syncs.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no first sync");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = syncs.load(Ordering::SeqCst);

    let started = Instant::now();
    for n in 0..1000u32 {
        let i = n % 10;
        let addr = format!("10.244.{}.{}", 1 + n / 250, n % 250 + 1);
        server
            .apply(slice(&format!("svc-{i}-a"), &format!("svc-{i}"), &[&addr]))
            .unwrap();
    }
    let burst = started.elapsed();
    // The last update (n = 999, svc-9) must be programmed.
    let want = "10.244.4.250";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if endpoints_of(&last.lock().unwrap(), "svc-9")
            .iter()
            .any(|e| e.contains(want))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "last update never programmed: {:?}",
            endpoints_of(&last.lock().unwrap(), "svc-9")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = syncs.load(Ordering::SeqCst) - before;
    eprintln!("1000 slice updates in {burst:?} -> {during} syncs");
    // With a 1 s minimum period, a burst of ~1 s needs a handful of syncs, not 1000.
    assert!(
        during <= 2 + burst.as_secs() as usize * 2,
        "{during} syncs for a burst of {burst:?}"
    );
    sync_task.abort();
    source.abort();
}

#[test]
fn backoff_grows_to_its_cap_and_expired_relists_at_once() {
    use super::watcher;
    use ::kube::core::Status;
    let down = watcher::Error::WatchFailed(::kube::Error::Service("connection refused".into()));
    let mut b = super::Backoff::new();
    let delays: Vec<Duration> = (0..8).map(|_| b.delay(&down, 1.0)).collect();
    assert_eq!(delays[0], Duration::from_millis(800));
    assert_eq!(delays[1], Duration::from_millis(1600));
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    assert_eq!(*delays.last().unwrap(), super::MAX_BACKOFF);
    // Jitter only shortens, to at most half.
    assert_eq!(b.delay(&down, 0.0), super::MAX_BACKOFF / 2);

    let gone = Status {
        code: 410,
        reason: "Expired".into(),
        ..Status::default()
    };
    assert_eq!(
        b.delay(&watcher::Error::WatchError(Box::new(gone.clone())), 1.0),
        Duration::ZERO
    );
    assert_eq!(
        b.delay(
            &watcher::Error::WatchStartFailed(::kube::Error::Api(Box::new(gone))),
            1.0
        ),
        Duration::ZERO
    );
    b.reset();
    assert_eq!(b.delay(&down, 1.0), Duration::from_millis(800));
}

/// A relist tells only objects whose resourceVersion changed, deletes the
/// ones no longer listed, and (as `kproxy run` has it) carries no objects.
#[test]
fn a_relist_tells_changed_and_gone_objects_only() {
    use std::collections::HashMap;

    use k8s_openapi::api::core::v1::Service;

    use super::{list_item, relisted};
    use crate::model::{Event, Object, ObjectKey};

    let svc = |name: &str, version: &str| {
        let mut s = Service::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("default".into());
        s.metadata.resource_version = Some(version.into());
        Object::Service(Arc::new(s))
    };
    let mut known: HashMap<ObjectKey, Option<String>> = HashMap::new();
    let list = |known: &HashMap<ObjectKey, Option<String>>, objs: Vec<Object>| {
        objs.into_iter()
            .map(|o| list_item(known, o, false))
            .collect::<Vec<_>>()
    };
    let first = list(&known, vec![svc("a", "1"), svc("b", "1"), svc("c", "1")]);
    let told = relisted(&mut known, first);
    assert_eq!(told.len(), 3);
    assert!(told
        .iter()
        .all(|e| matches!(e, Event::Upsert(c) if c.object().is_none())));

    // b changed, c is gone, a is as it was.
    let again = list(&known, vec![svc("a", "1"), svc("b", "2")]);
    let told = relisted(&mut known, again);
    let names: Vec<String> = told
        .iter()
        .map(|e| match e {
            Event::Upsert(c) => format!("upsert {}", c.key().name),
            Event::Delete(k) => format!("delete {}", k.name),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, ["upsert b", "delete c"]);
}
