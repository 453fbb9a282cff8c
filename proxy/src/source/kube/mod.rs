//! The cluster source: `kube` watchers on Services, EndpointSlices and this
//! node's Node, told to the sync loop as the same per-object events the
//! manifest source sends (each object checked here, once).
//!
//! Each watcher is retried forever with a capped, jittered backoff, so an API
//! server that is down (at start or later) is found again within seconds of
//! its return; 410 Gone relists at once. A relist (after a watch ends with
//! 410 Gone, for example) is told as one batch when it completes: the
//! objects that changed, and deletes for the ones no longer listed, so it
//! never shows the sync loop an empty or partial cluster: the dataplane is
//! never flushed by a reconnect.

mod client;
pub mod rest_metrics;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::runtime::watcher;
use ::kube::{Api, Client};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::Notify;

use super::EventSender;
use crate::health::HealthState;
use crate::model::{Checked, Event, Object, ObjectKey};

pub use client::{client_config, env_kubeconfig, ClientError, EnvKubeconfig};

/// The label every EndpointSlice of a Service carries (kube-proxy watches only those).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the three watchers share with the publisher.
#[derive(Default)]
struct Progress {
    /// Each watcher has completed its initial list (services, slices, node).
    synced: [bool; 3],
    /// The last error of each watcher, cleared by its next event.
    errors: [Option<String>; 3],
    /// Objects in each watcher's last complete list.
    counts: [usize; 3],
}

const NAMES: [&str; 3] = ["Services", "EndpointSlices", "Node"];

/// Watches a Kubernetes API server and tells what changes.
pub struct KubeSource {
    client: Client,
    node_name: String,
    health: Option<Arc<HealthState>>,
    keep_objects: bool,
}

impl KubeSource {
    pub fn new(client: Client, node_name: impl Into<String>) -> Self {
        KubeSource {
            client,
            node_name: node_name.into(),
            health: None,
            keep_objects: true,
        }
    }

    /// Tells only the checked parts of objects, not the objects (`kproxy
    /// run`: the model needs no more; see
    /// [`crate::model::Checked::without_object`]).
    pub fn without_objects(mut self) -> Self {
        self.keep_objects = false;
        self
    }

    /// Report "waiting for the API server" (with the error) on `/healthz`
    /// until the first complete list.
    pub fn with_health(mut self, health: Arc<HealthState>) -> Self {
        self.health = Some(health);
        self
    }

    /// Runs until `tx` has no receiver. Never returns an error: API
    /// failures are retried with backoff and reported in logs and health.
    pub async fn run(self, tx: EventSender) {
        let services: Api<Service> = Api::all(self.client.clone());
        let slices: Api<EndpointSlice> = Api::all(self.client.clone());
        let nodes: Api<Node> = Api::all(self.client.clone());

        let progress = Arc::new(Mutex::new(Progress::default()));
        let changed = Arc::new(Notify::new());

        let svc_stream = watcher(services, watcher::Config::default());
        let slice_stream = watcher(
            slices,
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
        );
        let node_stream = watcher(
            nodes,
            watcher::Config::default().fields(&format!("metadata.name={}", self.node_name)),
        );
        let shared = |idx| Driver {
            idx,
            progress: progress.clone(),
            changed: changed.clone(),
            tx: tx.clone(),
            keep_objects: self.keep_objects,
        };
        let drivers = [
            tokio::spawn(drive(shared(0), svc_stream, |o| {
                Object::Service(Arc::new(o))
            })),
            tokio::spawn(drive(shared(1), slice_stream, |o| {
                Object::EndpointSlice(Arc::new(o))
            })),
            tokio::spawn(drive(shared(2), node_stream, |o| Object::Node(Arc::new(o)))),
        ];
        let _abort = AbortOnDrop(drivers.iter().map(|d| d.abort_handle()).collect());

        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = tx.closed() => return,
            }
            let (synced, errors, counts) = {
                let p = progress.lock().unwrap_or_else(|e| e.into_inner());
                (p.synced.iter().all(|s| *s), p.errors.clone(), p.counts)
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
            if let Some(health) = &self.health {
                health.set_source_problem(None);
            }
            tracing::info!(
                services = counts[0],
                endpoint_slices = counts[1],
                node = counts[2],
                "initial list from the Kubernetes API server complete"
            );
            // Every watcher sent its initial batch before it counted as synced.
            let _ = tx.send(vec![Event::Synced]);
            break;
        }
        // The drivers run on; this task only keeps them alive.
        tx.closed().await;
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

/// What a watcher's driver shares with the others.
struct Driver {
    idx: usize,
    progress: Arc<Mutex<Progress>>,
    changed: Arc<Notify>,
    tx: EventSender,
    keep_objects: bool,
}

/// One object of a (re)list in progress, checked as it arrives so that a
/// list of 10,000 Services does not hold 10,000 typed objects until it
/// completes; one whose resourceVersion was told already is only named.
enum Listed {
    Unchanged(ObjectKey),
    Changed {
        version: Option<String>,
        checked: Checked,
    },
}

fn list_item(known: &HashMap<ObjectKey, Option<String>>, o: Object, keep_objects: bool) -> Listed {
    let key = o.key();
    let version = o.meta().resource_version.clone();
    if version.is_some() && known.get(&key) == Some(&version) {
        Listed::Unchanged(key)
    } else {
        Listed::Changed {
            version,
            checked: o.check_keeping(keep_objects),
        }
    }
}

/// Polls one watcher stream and sends its events: each change at once, a
/// (re)list as one batch when it completes. Errors are retried after
/// [`Backoff`] (polling again restarts the watch).
async fn drive<K, S>(d: Driver, stream: S, wrap: fn(K) -> Object)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let idx = d.idx;
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    let mut backoff = Backoff::new();
    // The resourceVersion of every object told, to tell a relist's
    // unchanged objects from changed ones.
    let mut known: HashMap<ObjectKey, Option<String>> = HashMap::new();
    let mut listing: Vec<Listed> = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                let listed = matches!(event, watcher::Event::InitDone);
                let batch = match event {
                    watcher::Event::Apply(o) => {
                        let o = wrap(o);
                        known.insert(o.key(), o.meta().resource_version.clone());
                        vec![Event::Upsert(o.check_keeping(d.keep_objects))]
                    }
                    watcher::Event::Delete(o) => {
                        let key = wrap(o).key();
                        known.remove(&key);
                        vec![Event::Delete(key)]
                    }
                    watcher::Event::Init => {
                        listing.clear();
                        Vec::new()
                    }
                    watcher::Event::InitApply(o) => {
                        listing.push(list_item(&known, wrap(o), d.keep_objects));
                        Vec::new()
                    }
                    watcher::Event::InitDone => relisted(&mut known, std::mem::take(&mut listing)),
                };
                if !batch.is_empty() && d.tx.send(batch).is_err() {
                    return;
                }
                backoff.reset();
                let mut p = d.progress.lock().unwrap_or_else(|e| e.into_inner());
                if listed {
                    // After its batch was sent: `Synced` follows every initial batch.
                    if !p.synced[idx] {
                        tracing::debug!("{}: initial list complete", NAMES[idx]);
                    }
                    p.synced[idx] = true;
                    p.counts[idx] = known.len();
                }
                if failing {
                    failing = false;
                    tracing::info!("{}: watching the Kubernetes API server again", NAMES[idx]);
                    p.errors[idx] = None;
                }
                drop(p);
                d.changed.notify_one();
            }
            Err(err) => {
                // 410 Gone is routine: the watcher relists; the relist is told whole.
                if !failing {
                    tracing::warn!(error = %err, "{}: Kubernetes API error; retrying with backoff, the dataplane stays as programmed", NAMES[idx]);
                } else {
                    tracing::debug!(error = %err, "{}: still failing", NAMES[idx]);
                }
                failing = true;
                d.progress.lock().unwrap_or_else(|e| e.into_inner()).errors[idx] =
                    Some(err.to_string());
                d.changed.notify_one();
                tokio::time::sleep(backoff.delay(&err, jitter())).await;
            }
        }
    }
}

/// A completed (re)list as one batch: the objects new or changed since
/// they were last told, and deletes for the ones no longer listed.
fn relisted(known: &mut HashMap<ObjectKey, Option<String>>, listed: Vec<Listed>) -> Vec<Event> {
    let mut batch = Vec::new();
    let mut seen = HashSet::with_capacity(listed.len());
    for item in listed {
        match item {
            Listed::Unchanged(key) => {
                seen.insert(key);
            }
            Listed::Changed { version, checked } => {
                let key = checked.key().clone();
                known.insert(key.clone(), version);
                batch.push(Event::Upsert(checked));
                seen.insert(key);
            }
        }
    }
    let gone: Vec<ObjectKey> = known
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    for key in gone {
        known.remove(&key);
        batch.push(Event::Delete(key));
    }
    batch
}
