//! The cluster source: `kube` reflectors on Services, EndpointSlices and this
//! node's Node, published as the same [`Snapshot`] the manifest source sends.
//!
//! Each watcher is retried forever with a capped, jittered backoff, so an API
//! server that is down (at start or later) is found again within seconds of
//! its return; 410 Gone relists at once. The reflector stores
//! replace their contents atomically when a relist completes (after a watch
//! ends with 410 Gone, for example), so a relist never shows the sync loop an
//! empty or partial cluster: the dataplane is never flushed by a reconnect.

mod client;

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::watcher;
use ::kube::{Api, Client};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::{watch, Notify};

use super::Snapshot;
use crate::health::HealthState;
use crate::model::ClusterObjects;

pub use client::{client_config, ClientError};

/// The label every EndpointSlice of a Service carries (kube-proxy watches only those).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the three watchers share with the publisher.
#[derive(Default)]
struct Progress {
    /// Each watcher has completed its initial list (services, slices, node).
    synced: [bool; 3],
    /// The last error of each watcher, cleared by its next event.
    errors: [Option<String>; 3],
}

const NAMES: [&str; 3] = ["Services", "EndpointSlices", "Node"];

/// Watches a Kubernetes API server and publishes snapshots.
pub struct KubeSource {
    client: Client,
    node_name: String,
    health: Option<Arc<HealthState>>,
}

impl KubeSource {
    pub fn new(client: Client, node_name: impl Into<String>) -> Self {
        KubeSource {
            client,
            node_name: node_name.into(),
            health: None,
        }
    }

    /// Report "waiting for the API server" (with the error) on `/healthz`
    /// until the first complete list.
    pub fn with_health(mut self, health: Arc<HealthState>) -> Self {
        self.health = Some(health);
        self
    }

    /// Runs until `tx` has no receivers. Never returns an error: API
    /// failures are retried with backoff and reported in logs and health.
    pub async fn run(self, tx: watch::Sender<Snapshot>) {
        let services: Api<Service> = Api::all(self.client.clone());
        let slices: Api<EndpointSlice> = Api::all(self.client.clone());
        let nodes: Api<Node> = Api::all(self.client.clone());

        let (svc_store, svc_writer) = reflector::store();
        let (slice_store, slice_writer) = reflector::store();
        let (node_store, node_writer) = reflector::store();

        let progress = Arc::new(Mutex::new(Progress::default()));
        let changed = Arc::new(Notify::new());

        let svc_stream =
            reflector::reflector(svc_writer, watcher(services, watcher::Config::default()));
        let slice_stream = reflector::reflector(
            slice_writer,
            watcher(
                slices,
                watcher::Config::default().labels(SERVICE_NAME_LABEL),
            ),
        );
        let node_stream = reflector::reflector(
            node_writer,
            watcher(
                nodes,
                watcher::Config::default().fields(&format!("metadata.name={}", self.node_name)),
            ),
        );
        let drivers = [
            tokio::spawn(drive(0, svc_stream, progress.clone(), changed.clone())),
            tokio::spawn(drive(1, slice_stream, progress.clone(), changed.clone())),
            tokio::spawn(drive(2, node_stream, progress.clone(), changed.clone())),
        ];
        let _abort = AbortOnDrop(drivers.iter().map(|d| d.abort_handle()).collect());

        let mut announced = false;
        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = tx.closed() => return,
            }
            let (synced, errors) = {
                let p = progress.lock().unwrap_or_else(|e| e.into_inner());
                (p.synced.iter().all(|s| *s), p.errors.clone())
            };
            if !synced {
                let problem = errors
                    .iter()
                    .zip(NAMES)
                    .find_map(|(e, name)| e.as_ref().map(|e| format!("listing {name}: {e}")));
                if let Some(health) = &self.health {
                    health.set_source_problem(Some(format!(
                        "waiting for the Kubernetes API server{}",
                        problem.map(|p| format!(" ({p})")).unwrap_or_default()
                    )));
                }
                continue;
            }
            if !announced {
                announced = true;
                if let Some(health) = &self.health {
                    health.set_source_problem(None);
                }
                tracing::info!(
                    services = svc_store.len(),
                    endpoint_slices = slice_store.len(),
                    node = node_store.len(),
                    "initial list from the Kubernetes API server complete"
                );
            }
            let snapshot = snapshot_of(&svc_store, &slice_store, &node_store);
            if tx.send(snapshot).is_err() {
                return;
            }
        }
    }
}

struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Delay before the next attempt after a watcher error: exponential from
/// 800 ms, capped at [`MAX_BACKOFF`], with jitter so a fleet of nodes does
/// not reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

/// Longest wait between reconnection attempts (client-go uses 30 s; a node
/// proxy that is blind to changes should look again sooner).
const MAX_BACKOFF: Duration = Duration::from_secs(8);
const FIRST_BACKOFF: Duration = Duration::from_millis(800);

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: FIRST_BACKOFF,
        }
    }

    fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }

    /// The delay for this error. 410 Gone means "relist now": the history
    /// is gone but the server is fine, so waiting would only delay the resync.
    fn delay(&mut self, err: &watcher::Error, jitter: f64) -> Duration {
        if is_expired(err) {
            return Duration::ZERO;
        }
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        base.mul_f64(0.5 + jitter.clamp(0.0, 1.0) * 0.5)
    }
}

/// A watch or list answered 410 Gone (resourceVersion too old).
fn is_expired(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(::kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(::kube::Error::Api(status))
        | watcher::Error::WatchFailed(::kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// A number in [0, 1) that differs between calls and processes.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Polls one reflector stream, recording progress and waking the publisher.
/// Errors are retried after [`Backoff`] (polling again restarts the watch).
async fn drive<K, S>(idx: usize, stream: S, progress: Arc<Mutex<Progress>>, changed: Arc<Notify>)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    let mut backoff = Backoff::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                let notify = match event {
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => true,
                    watcher::Event::InitDone => {
                        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                        if !p.synced[idx] {
                            tracing::debug!("{}: initial list complete", NAMES[idx]);
                        }
                        p.synced[idx] = true;
                        true
                    }
                    watcher::Event::Init | watcher::Event::InitApply(_) => false,
                };
                backoff.reset();
                if failing {
                    failing = false;
                    tracing::info!("{}: watching the Kubernetes API server again", NAMES[idx]);
                    progress.lock().unwrap_or_else(|e| e.into_inner()).errors[idx] = None;
                }
                if notify {
                    changed.notify_one();
                }
            }
            Err(err) => {
                // 410 Gone is routine: the watcher relists; the store swaps atomically.
                if !failing {
                    tracing::warn!(error = %err, "{}: Kubernetes API error; retrying with backoff, the dataplane stays as programmed", NAMES[idx]);
                } else {
                    tracing::debug!(error = %err, "{}: still failing", NAMES[idx]);
                }
                failing = true;
                progress.lock().unwrap_or_else(|e| e.into_inner()).errors[idx] =
                    Some(err.to_string());
                changed.notify_one();
                tokio::time::sleep(backoff.delay(&err, jitter())).await;
            }
        }
    }
}

/// The stores' contents as the model's input (sorted, so equal contents give equal snapshots).
fn snapshot_of(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    nodes: &Store<Node>,
) -> Snapshot {
    fn sorted<K: ::kube::Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<Arc<K>> {
        let mut items: Vec<Arc<K>> = store.state();
        items.sort_by(|a, b| {
            (a.meta().namespace.as_deref(), a.meta().name.as_deref())
                .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
        });
        items
    }
    Snapshot {
        objects: Arc::new(ClusterObjects {
            services: sorted(services),
            endpoint_slices: sorted(slices),
            nodes: sorted(nodes),
        }),
        rejected: Vec::new(),
        synced: true,
    }
}
