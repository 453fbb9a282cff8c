//! A Kubernetes API server for tests.
//!
//! Speaks the real HTTP/JSON API (discovery, list and watch with
//! resourceVersion, bookmarks and 410 Gone, label and field selectors,
//! create / update / patch / delete, `dryRun=All`) over plain HTTP on
//! loopback, well enough for `kubectl` and the `kube` client. Objects are
//! stored as JSON, so any type in [`resources::RESOURCES`] is accepted.
//!
//! Faults are injected through the [`TestApiServer`] handle: drop every
//! watch, refuse connections (stop listening, later restart on the same
//! port), compact the history (expire resourceVersions).

pub mod authz;
pub mod ephemeral;
pub mod http;
pub mod patch;
pub mod portforward;
pub mod resources;
pub mod selector;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use store::{ApiError, Store};

use http::Shared;

/// Creates the listening socket (a test topology can bind inside a network
/// namespace: the socket keeps the namespace it was created in).
pub type Binder = Arc<dyn Fn(SocketAddr) -> std::io::Result<std::net::TcpListener> + Send + Sync>;

/// Settings for [`TestApiServer::start_with`].
#[derive(Clone)]
pub struct Options {
    /// Where to listen; port 0 picks a free port.
    pub addr: SocketAddr,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// `pods/portforward` handler (default: dial `status.podIP` directly;
    /// see [`portforward::hook`] to dial from elsewhere). `None`: 404.
    pub port_forward: Option<http::PortForwardHook>,
    /// How to create the listener (default: bind in this process's namespace).
    pub bind: Option<Binder>,
    /// Starts the ephemeral containers added to a pod (see [`ephemeral`]);
    /// `None`: they stay waiting.
    pub ephemeral_containers: Option<ephemeral::EphemeralHook>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            bookmark_interval: Duration::from_secs(1),
            port_forward: Some(portforward::hook(portforward::direct_dialer())),
            bind: None,
            ephemeral_containers: None,
        }
    }
}

/// A running test API server. Dropping it stops it.
pub struct TestApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop and every connection; aborted to refuse service.
    serving: Mutex<Option<JoinSet<()>>>,
    bind: Option<Binder>,
}

async fn bind_with(bind: &Option<Binder>, addr: SocketAddr) -> std::io::Result<TcpListener> {
    match bind {
        None => TcpListener::bind(addr).await,
        Some(b) => {
            let l = b(addr)?;
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        }
    }
}

impl TestApiServer {
    /// Starts on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> anyhow::Result<Self> {
        let listener = bind_with(&opts.bind, opts.addr)
            .await
            .with_context(|| format!("binding the test API server to {}", opts.addr))?;
        let addr = listener.local_addr()?;
        let (drop_watches, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            store: Arc::new(Store::new()),
            drop_watches,
            stopped: AtomicBool::new(false),
            bookmark_interval: opts.bookmark_interval,
            server_addr: addr.to_string(),
            requests: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            port_forward: opts.port_forward,
            port_forward_faults: Arc::new(portforward::Faults::default()),
            authz: Mutex::new(Default::default()),
            ephemeral: opts.ephemeral_containers,
        });
        let server = TestApiServer {
            addr,
            shared,
            serving: Mutex::new(None),
            bind: opts.bind,
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&self, listener: TcpListener) {
        let router = axum::Router::new()
            .fallback(http::handle)
            .with_state(self.shared.clone());
        let mut set = JoinSet::new();
        set.spawn(async move {
            // Connections live in their own set, aborted with this task.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        // As the real API server (Go sets TCP_NODELAY): small
                        // port-forward frames must not wait for delayed ACKs.
                        let _ = stream.set_nodelay(true);
                        let svc = TowerToHyperService::new(router.clone());
                        conns.spawn(async move {
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(set);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Watches answered with 410 Gone so far.
    pub fn expired_watches(&self) -> u64 {
        self.shared.expired.load(Ordering::Relaxed)
    }

    /// A kubeconfig for this server (context `kproxy-test`, namespace default).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kproxy-test\n  cluster:\n    server: {}\ncontexts:\n- name: kproxy-test\n  context:\n    cluster: kproxy-test\n    user: kproxy-test\n    namespace: default\ncurrent-context: kproxy-test\nusers:\n- name: kproxy-test\n  user:\n    token: kproxy-test\npreferences: {{}}\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.kubeconfig())
            .with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// Fault: ends every open watch (clients must re-watch).
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|g| *g += 1);
    }

    fn authz(&self) -> std::sync::MutexGuard<'_, authz::Authz> {
        self.shared.authz.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fault: answers every request on `resource` (`pods`, `pods/portforward`,
    /// `services`, `deployments`, ...) with 403 Forbidden, whatever the verb.
    pub fn deny(&self, resource: &str) {
        self.authz().deny(resource);
    }

    /// Undoes [`Self::deny`].
    pub fn allow(&self, resource: &str) {
        self.authz().allow(resource);
    }

    /// RBAC as a Role would: with `Some(rules)` only the verbs the rules grant
    /// on each resource are allowed (`[("pods", &["get", "list"]),
    /// ("pods/portforward", &["create"])]`); `None` allows everything again.
    /// A WebSocket port-forward is checked as `get`, kubectl's SPDY one
    /// (a POST) as `create`.
    pub fn set_role(&self, rules: Option<&[(&str, &[&str])]>) {
        self.authz().set_role(rules);
    }

    /// Kubernetes 1.35's `AuthorizePodWebsocketUpgradeCreatePermission`: a
    /// WebSocket port-forward needs `create` as well as `get`. Off by default
    /// (1.34 and before).
    pub fn set_websocket_create_check(&self, on: bool) {
        self.authz().set_websocket_create_check(on);
    }

    /// Fault: cuts every open port-forward stream (the TCP connection is
    /// dropped without a WebSocket close).
    pub fn cut_port_forwards(&self) {
        self.shared.port_forward_faults.cut();
    }

    /// Fault: the container runtime's stream idle timeout (containerd's
    /// `stream_idle_timeout`): a port-forward stream that carries no data
    /// message for `timeout` is cut. As the runtime, only data resets the
    /// timer (an empty WebSocket message counts, a ping does not).
    pub fn set_port_forward_idle_timeout(&self, timeout: Option<Duration>) {
        self.shared.port_forward_faults.set_idle_timeout(timeout);
    }

    /// Fault: an idle-timeout proxy in front of the API server: a stream on
    /// which nothing at all (pings included) passes for `timeout` is cut.
    pub fn set_port_forward_proxy_idle_timeout(&self, timeout: Option<Duration>) {
        self.shared
            .port_forward_faults
            .set_proxy_idle_timeout(timeout);
    }

    /// Opt-in: port-forward also negotiates `v5.channel.k8s.io` (with its
    /// half-close signal) when the client offers it first. No real server
    /// does: they serve `v4.channel.k8s.io` only.
    pub fn set_port_forward_v5(&self, on: bool) {
        self.shared.port_forward_faults.set_v5(on);
    }

    /// Fault: WebSocket port-forward upgrades are answered `400 Bad
    /// Request` (a server, or a proxy on the way, that takes SPDY only);
    /// SPDY still works.
    pub fn refuse_websocket_port_forwards(&self, on: bool) {
        self.shared.port_forward_faults.set_websocket_refused(on);
    }

    /// Fault: the kubelet does not know pod `name` (the API server has it):
    /// its port-forward is answered `404 pod does not exist`, in plain text
    /// as the kubelet writes it.
    pub fn set_unknown_to_kubelet(&self, name: &str, unknown: bool) {
        self.shared
            .port_forward_faults
            .set_unknown_to_kubelet(name, unknown);
    }

    /// Fault: the next `n` port-forward requests are turned away with
    /// 429 Too Many Requests and `Retry-After: 1`, as API priority and
    /// fairness does under load.
    pub fn throttle_port_forwards(&self, n: u64) {
        self.shared.port_forward_faults.throttle(n);
    }

    /// Fault: every port-forward request waits `delay` before it is
    /// answered (a slow API server or kubelet), so that concurrent set-ups
    /// overlap and [`Self::port_forward_max_in_flight`] can count them.
    pub fn set_port_forward_setup_delay(&self, delay: Option<Duration>) {
        self.shared.port_forward_faults.set_setup_delay(delay);
    }

    /// Authentication for port-forwards: a request without
    /// `Authorization: Bearer TOKEN` is answered 401 Unauthorized, as the
    /// API server answers an unauthenticated one (None: anything goes).
    pub fn require_port_forward_token(&self, token: Option<&str>) {
        self.shared.port_forward_faults.require_token(token);
    }

    /// Port-forward requests (upgrades) received so far.
    pub fn port_forward_requests(&self) -> u64 {
        self.shared.port_forward_faults.requests()
    }

    /// The most port-forward requests being answered at once so far.
    pub fn port_forward_max_in_flight(&self) -> u64 {
        self.shared.port_forward_faults.max_in_flight()
    }

    /// Port-forward streams opened so far (upgraded WebSockets).
    pub fn port_forwards_opened(&self) -> u64 {
        self.shared.port_forward_faults.opened()
    }

    /// Port-forward streams cut for idleness so far.
    pub fn port_forwards_idle_cut(&self) -> u64 {
        self.shared.port_forward_faults.idle_cut()
    }

    /// Fault: stops listening and cuts every connection (port-forward
    /// streams too); new connections are refused.
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.drop_watches();
        self.cut_port_forwards();
        if let Some(mut set) = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            set.abort_all();
            // Dropping the set after abort_all releases the listener once the task is cancelled.
            drop(set);
        }
    }

    /// Listens again on the same port, with the same objects.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop();
        // The aborted accept loop may take a moment to release the port.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match bind_with(&self.bind, self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "waiting to rebind the test API server");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("rebinding {}", self.addr));
                }
            }
        };
        self.serve(listener);
        self.shared.stopped.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Fault: forgets the event history; watches from older resourceVersions get 410 Gone.
    pub fn compact(&self) {
        self.shared.store.compact();
    }

    /// Creates or replaces an object (kind and apiVersion pick the resource).
    pub fn apply(&self, obj: Value) -> anyhow::Result<Arc<Value>> {
        let res = resource_of(&obj)?;
        Ok(self.shared.store.put(res, obj)?)
    }

    /// Applies every document of a YAML stream.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: Value = serde::Deserialize::deserialize(doc)?;
            if v.is_null() {
                continue;
            }
            self.apply(v)?;
        }
        Ok(())
    }

    /// Deletes an object named like `obj` (apiVersion, kind, namespace, name).
    pub fn delete(&self, obj: &Value) -> anyhow::Result<()> {
        let res = resource_of(obj)?;
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str);
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .context("object without metadata.name")?;
        self.shared.store.delete(res, ns, name, false)?;
        Ok(())
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Option<Arc<Value>> {
        let res = resources::for_kind(api_version, kind)?;
        self.shared.store.get(res, ns, name).ok()
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn resource_of(obj: &Value) -> anyhow::Result<&'static resources::Resource> {
    let api_version = obj["apiVersion"].as_str().unwrap_or("");
    let kind = obj["kind"].as_str().unwrap_or("");
    resources::for_kind(api_version, kind)
        .with_context(|| format!("the test API server does not serve {api_version} {kind}"))
}
