//! A watch cache of what target resolution reads: the target object (by
//! name) and the pods its selector matches (or the pod itself), kept by
//! kube reflectors. A new connection resolves from memory instead of a GET
//! and a LIST. Until a watch has listed everything, or after the API server
//! refused it (no `list`/`watch` permission), resolution falls back to
//! GET/LIST per connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, ReplicationController, Service};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};

use super::resolve::PodSelector;
use super::spec::{Kind, Target};

/// A reflector running in a task, and whether its first list is in.
struct Watch<K: kube::Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    ready: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl<K: kube::Resource + 'static> Drop for Watch<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<K> Watch<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    fn start(
        client: Client,
        ns: &str,
        config: watcher::Config,
        refused: Arc<AtomicBool>,
        down: Arc<Mutex<Option<String>>>,
    ) -> Self {
        let api: Api<K> = Api::namespaced(client, ns);
        let (store, writer) = reflector::store();
        let ready = Arc::new(AtomicBool::new(false));
        let ready2 = ready.clone();
        let what = std::any::type_name::<K>()
            .rsplit("::")
            .next()
            .unwrap_or("objects");
        let task = tokio::spawn(async move {
            let mut events = reflector::reflector(writer, watcher(api, config))
                .default_backoff()
                .boxed();
            while let Some(ev) = events.next().await {
                if ev.is_ok() {
                    *down.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                match ev {
                    Ok(watcher::Event::InitDone) => ready2.store(true, Ordering::Relaxed),
                    Ok(_) => {}
                    Err(e) if forbidden(&e) => {
                        tracing::info!(
                            "no permission to watch {what} ({e}): resolving the target with a GET per connection"
                        );
                        refused.store(true, Ordering::Relaxed);
                        return;
                    }
                    // The API server is away: the backoff retries; resolution
                    // says so (a port-forward cannot work without it either).
                    Err(e) => {
                        tracing::debug!("watch of {what}: {e}");
                        *down.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                    }
                }
            }
        });
        Watch { store, ready, task }
    }
}

impl<K: kube::Resource + 'static> Watch<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

fn forbidden(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 403
    )
}

/// The target object, by kind.
enum TargetWatch {
    Service(Watch<Service>),
    Deployment(Watch<Deployment>),
    StatefulSet(Watch<StatefulSet>),
    ReplicaSet(Watch<ReplicaSet>),
    DaemonSet(Watch<DaemonSet>),
    Job(Watch<Job>),
    ReplicationController(Watch<ReplicationController>),
}

/// What the cache knows of the target.
pub enum Cached {
    /// Not known yet (or the cache is off): ask the API server.
    Unknown,
    /// The watches cannot reach the API server (why).
    Unreachable(String),
    /// The target object does not exist.
    Gone,
    /// `pod/`: the pod (its checks are the caller's).
    Pod(Arc<Pod>),
    /// A Service or workload: its selector (a label selector query), the
    /// Service (for port mapping), and the pods the selector matches.
    Selected {
        selector: String,
        service: Option<Box<Service>>,
        pods: Vec<Arc<Pod>>,
    },
}

/// The target object in the cache.
enum Object {
    NotYet,
    Missing,
    /// Its selector as a label selector query, and the Service.
    Found(String, Option<Box<Service>>),
}

pub struct Cache {
    client: Client,
    namespace: String,
    target: Target,
    refused: Arc<AtomicBool>,
    /// The last watch error, until a watch works again.
    down: Arc<Mutex<Option<String>>>,
    object: Option<TargetWatch>,
    /// Pods: of `pod/NAME` by name, else of the current selector.
    pods: Mutex<Option<(String, Watch<Pod>)>>,
}

impl Cache {
    /// Starts the watches for `target` (inside a tokio runtime).
    pub fn start(client: Client, namespace: String, target: Target) -> Cache {
        let refused = Arc::new(AtomicBool::new(false));
        let down = Arc::new(Mutex::new(None));
        let by_name = watcher::Config::default().fields(&format!("metadata.name={}", target.name));
        let (c, ns, r, d) = (
            client.clone(),
            namespace.as_str(),
            refused.clone(),
            down.clone(),
        );
        let cfg = by_name.clone();
        let object = match target.kind {
            Kind::Pod => None,
            Kind::Service => Some(TargetWatch::Service(Watch::start(c, ns, cfg, r, d))),
            Kind::Deployment => Some(TargetWatch::Deployment(Watch::start(c, ns, cfg, r, d))),
            Kind::StatefulSet => Some(TargetWatch::StatefulSet(Watch::start(c, ns, cfg, r, d))),
            Kind::ReplicaSet => Some(TargetWatch::ReplicaSet(Watch::start(c, ns, cfg, r, d))),
            Kind::DaemonSet => Some(TargetWatch::DaemonSet(Watch::start(c, ns, cfg, r, d))),
            Kind::Job => Some(TargetWatch::Job(Watch::start(c, ns, cfg, r, d))),
            Kind::ReplicationController => Some(TargetWatch::ReplicationController(Watch::start(
                c, ns, cfg, r, d,
            ))),
        };
        let pods = (target.kind == Kind::Pod).then(|| {
            let w = Watch::start(
                client.clone(),
                &namespace,
                by_name,
                refused.clone(),
                down.clone(),
            );
            (String::new(), w)
        });
        Cache {
            client,
            namespace,
            target,
            refused,
            down,
            object,
            pods: Mutex::new(pods),
        }
    }

    fn key<K: kube::Resource>(&self) -> ObjectRef<K>
    where
        K::DynamicType: Default,
    {
        ObjectRef::new(&self.target.name).within(&self.namespace)
    }

    /// The target object's selector (and Service), as far as known.
    fn object(&self) -> Object {
        /// The object's selector, and `service(object)`.
        fn sel<K: kube::Resource + Clone + PodSelector>(
            w: &Watch<K>,
            key: ObjectRef<K>,
            service: impl Fn(&K) -> Option<Box<Service>>,
        ) -> Object
        where
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            if !w.ready() {
                return Object::NotYet;
            }
            match w.store.get(&key) {
                Some(o) => Object::Found(o.pod_selector(), service(&o)),
                None => Object::Missing,
            }
        }
        fn none<K>(_: &K) -> Option<Box<Service>> {
            None
        }
        match &self.object {
            None => Object::NotYet,
            Some(TargetWatch::Service(w)) => {
                sel(w, self.key(), |s: &Service| Some(Box::new(s.clone())))
            }
            Some(TargetWatch::Deployment(w)) => sel(w, self.key(), none),
            Some(TargetWatch::StatefulSet(w)) => sel(w, self.key(), none),
            Some(TargetWatch::ReplicaSet(w)) => sel(w, self.key(), none),
            Some(TargetWatch::DaemonSet(w)) => sel(w, self.key(), none),
            Some(TargetWatch::Job(w)) => sel(w, self.key(), none),
            Some(TargetWatch::ReplicationController(w)) => sel(w, self.key(), none),
        }
    }

    /// The API server answered: the watches' last error is history.
    pub fn reachable(&self) {
        *self.down.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// What the cache knows now.
    pub fn lookup(&self) -> Cached {
        if self.refused.load(Ordering::Relaxed) {
            return Cached::Unknown;
        }
        if let Some(e) = self.down.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Cached::Unreachable(e);
        }
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        if self.target.kind == Kind::Pod {
            let Some((_, w)) = pods.as_ref() else {
                return Cached::Unknown;
            };
            if !w.ready() {
                return Cached::Unknown;
            }
            return match w.store.get(&self.key()) {
                Some(p) => Cached::Pod(p),
                None => Cached::Gone,
            };
        }
        let (selector, service) = match self.object() {
            Object::NotYet => return Cached::Unknown,
            Object::Missing => return Cached::Gone,
            Object::Found(l, s) => (l, s),
        };
        if selector.is_empty() {
            // The resolver says why there is nothing to forward to.
            return Cached::Unknown;
        }
        let wanted = selector.clone();
        // A new selector (or none watched yet): watch the pods it matches.
        if pods.as_ref().is_none_or(|(s, _)| *s != wanted) {
            let cfg = watcher::Config::default().labels(&wanted);
            let w = Watch::start(
                self.client.clone(),
                &self.namespace,
                cfg,
                self.refused.clone(),
                self.down.clone(),
            );
            *pods = Some((wanted, w));
            return Cached::Unknown;
        }
        let Some((_, w)) = pods.as_ref() else {
            return Cached::Unknown;
        };
        if !w.ready() {
            return Cached::Unknown;
        }
        Cached::Selected {
            selector,
            service,
            pods: w.store.state(),
        }
    }
}
