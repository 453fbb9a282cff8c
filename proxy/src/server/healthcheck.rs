//! healthCheckNodePort servers: for every Service with externalTrafficPolicy
//! Local and a `healthCheckNodePort`, an HTTP server on that port telling
//! load balancers whether this node has local endpoints for the Service
//! (200) or not (503), as kube-proxy does.

use std::collections::{BTreeMap, BTreeSet};
use std::future::{pending, poll_fn};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::health::HealthState;
use crate::model::{
    ChangeSet, DesiredState, Protocol, ServiceKey, ServicePort, ServicePortName, TrafficPolicy,
};

/// What one Service's handler reads: updated in place by `sync`.
#[derive(Debug)]
struct ServiceHealth {
    key: ServiceKey,
    local_endpoints: AtomicUsize,
    proxy: Arc<HealthState>,
}

/// A listening socket the owner can close synchronously: the serving task
/// only borrows it while polling `accept`, so `close` frees the port at once
/// (a re-bind in the same sync cannot race the task's shutdown).
#[derive(Debug, Clone)]
struct SharedListener(Arc<Mutex<Option<TcpListener>>>);

impl SharedListener {
    fn close(&self) {
        let listener = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(listener);
    }
}

impl axum::serve::Listener for SharedListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let accepted = poll_fn(|cx| {
                let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_ref() {
                    Some(listener) => listener.poll_accept(cx).map(Some),
                    None => Poll::Ready(None),
                }
            })
            .await;
            match accepted {
                Some(Ok(conn)) => return conn,
                // Closed: the shutdown signal that comes with it ends the server.
                None => pending::<()>().await,
                Some(Err(err)) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    tracing::warn!(%err, "healthCheckNodePort accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(l) => l.local_addr(),
            None => Err(std::io::Error::other("listener closed")),
        }
    }
}

/// One serving listener; dropping it closes the port and lets open
/// connections finish gracefully.
#[derive(Debug)]
struct Running {
    addr: SocketAddr,
    listener: SharedListener,
    _shutdown: oneshot::Sender<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.listener.close();
        // Dropping `_shutdown` signals the server task.
    }
}

#[derive(Debug)]
struct Instance {
    port: u16,
    state: Arc<ServiceHealth>,
    running: Vec<Running>,
}

/// The healthCheckNodePort servers of all Services, kept in step with the
/// desired state by [`HealthCheckServers::sync`].
#[derive(Debug)]
pub struct HealthCheckServers {
    /// Where to listen; `0.0.0.0` when empty.
    addresses: Vec<IpAddr>,
    health: Arc<HealthState>,
    services: BTreeMap<ServiceKey, Instance>,
    /// Services whose port could not be bound: tried again at each sync.
    unbound: BTreeSet<ServiceKey>,
}

impl HealthCheckServers {
    /// `addresses`: the node IPs matching `--nodeport-addresses`, or empty to
    /// listen on every address (`0.0.0.0`). `health` feeds
    /// `serviceProxyHealthy`.
    pub fn new(addresses: Vec<IpAddr>, health: Arc<HealthState>) -> Self {
        HealthCheckServers {
            addresses,
            health,
            services: BTreeMap::new(),
            unbound: BTreeSet::new(),
        }
    }

    /// Starts servers for new Services, stops them for removed ones (or when
    /// the port changed) and updates local endpoint counts in place. A port
    /// that cannot be bound is logged and retried at the next sync. Must be
    /// called within a tokio runtime.
    pub fn sync(&mut self, desired: &DesiredState) {
        let wanted = wanted_servers(desired.services.values().map(|sp| &**sp));
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        self.unbound.clear();
        for key in gone {
            self.reconcile(&key, None);
        }
        for (key, w) in wanted {
            self.reconcile(&key, Some(w));
        }
    }

    /// As [`Self::sync`] after a sync that applied `changes`: only the
    /// Services of changed ports that have or had a healthCheckNodePort
    /// (and those whose port could not be bound yet) are looked at, so a
    /// sync costs its changes, not a walk over every Service.
    pub fn sync_changes(&mut self, desired: &DesiredState, changes: &ChangeSet) {
        let mut keys: BTreeSet<ServiceKey> = changes
            .iter()
            .filter(|(_, c)| {
                c.old
                    .iter()
                    .chain(&c.new)
                    .any(|sp| sp.health_check_node_port.is_some())
            })
            .map(|(n, _)| n.service.clone())
            .collect();
        keys.extend(self.unbound.iter().cloned());
        for key in keys {
            let lowest = ServicePortName {
                service: key.clone(),
                port: String::new(),
                protocol: Protocol::Tcp,
            };
            // The Service's ports: a range of the map, which is ordered by
            // Service first.
            let ports = desired
                .services
                .range(lowest..)
                .take_while(|(n, _)| n.service == key)
                .map(|(_, sp)| &**sp);
            let wanted = wanted_servers(ports).remove(&key);
            self.reconcile(&key, wanted);
        }
    }

    /// One Service's server to what it should be: `wanted` (port, local
    /// endpoints), or none.
    fn reconcile(&mut self, key: &ServiceKey, wanted: Option<(u16, usize)>) {
        self.unbound.remove(key);
        if let Some(inst) = self.services.get(key) {
            match wanted {
                Some((port, count)) if port == inst.port => {
                    inst.state.local_endpoints.store(count, Ordering::Relaxed);
                    return;
                }
                _ => {
                    tracing::info!(service = %key, port = inst.port, "closing healthCheckNodePort");
                    self.services.remove(key);
                }
            }
        }
        let Some((port, count)) = wanted else {
            return;
        };
        let state = Arc::new(ServiceHealth {
            key: key.clone(),
            local_endpoints: AtomicUsize::new(count),
            proxy: self.health.clone(),
        });
        match self.start(port, &state) {
            Ok(running) => {
                tracing::info!(service = %key, port, "serving healthCheckNodePort");
                self.services.insert(
                    key.clone(),
                    Instance {
                        port,
                        state,
                        running,
                    },
                );
            }
            Err((addr, err)) => {
                tracing::error!(
                    service = %key,
                    %addr,
                    %err,
                    "cannot serve healthCheckNodePort {port} for Service {key}; retrying at the next sync"
                );
                self.unbound.insert(key.clone());
            }
        }
    }

    /// Services with a serving healthCheckNodePort, and the addresses
    /// listened on.
    pub fn serving(&self) -> BTreeMap<ServiceKey, Vec<SocketAddr>> {
        self.services
            .iter()
            .map(|(k, inst)| (k.clone(), inst.running.iter().map(|r| r.addr).collect()))
            .collect()
    }

    /// Binds `port` on every address; all or nothing.
    fn start(
        &self,
        port: u16,
        state: &Arc<ServiceHealth>,
    ) -> Result<Vec<Running>, (SocketAddr, std::io::Error)> {
        let addresses = if self.addresses.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            self.addresses.clone()
        };
        let mut running = Vec::with_capacity(addresses.len());
        for ip in addresses {
            let addr = SocketAddr::new(ip, port);
            // Bound synchronously so the outcome is known in this sync;
            // on error `running` drops and closes what was opened.
            let listener = bind_now(addr).map_err(|e| (addr, e))?;
            running.push(serve(addr, listener, state.clone()));
        }
        Ok(running)
    }
}

fn bind_now(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    TcpListener::from_std(std_listener)
}

fn serve(addr: SocketAddr, listener: TcpListener, state: Arc<ServiceHealth>) -> Running {
    let listener = SharedListener(Arc::new(Mutex::new(Some(listener))));
    let (tx, rx) = oneshot::channel::<()>();
    // Any path and method, as kube-proxy answers.
    let router = Router::new()
        .fallback(service_health)
        .with_state(state.clone());
    let serving = listener.clone();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        super::serve_connections(serving, router, shutdown).await;
    });
    Running {
        addr,
        listener,
        _shutdown: tx,
    }
}

async fn service_health(State(state): State<Arc<ServiceHealth>>) -> Response {
    let count = state.local_endpoints.load(Ordering::Relaxed);
    let proxy_healthy = state.proxy.is_healthy(SystemTime::now());
    let status = if count > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    super::json_response(
        status,
        service_health_body(&state.key, count, proxy_healthy),
        &[("x-load-balancing-endpoint-weight", HeaderValue::from(count))],
    )
}

/// kube-proxy's body: tab-indented JSON.
fn service_health_body(key: &ServiceKey, count: usize, proxy_healthy: bool) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        service: &'a ServiceKey,
        local_endpoints: usize,
        service_proxy_healthy: bool,
    }
    let body = Body {
        service: key,
        local_endpoints: count,
        service_proxy_healthy: proxy_healthy,
    };
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Serializing strings and numbers into a Vec cannot fail.
    let _ = body.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default()
}

/// Service -> (healthCheckNodePort, local endpoints). Counts distinct local
/// ready endpoint IPs over all ports of the Service, as kube-proxy: only
/// ready ones, so a node whose endpoints are all terminating reports 503 and
/// load balancers drain it while existing connections finish.
fn wanted_servers<'a>(
    service_ports: impl Iterator<Item = &'a ServicePort>,
) -> BTreeMap<ServiceKey, (u16, usize)> {
    let mut ports: BTreeMap<&ServiceKey, u16> = BTreeMap::new();
    let mut local: BTreeMap<&ServiceKey, BTreeSet<IpAddr>> = BTreeMap::new();
    for sp in service_ports {
        // kube-proxy serves it only for externalTrafficPolicy Local.
        let Some(port) = sp.health_check_node_port else {
            continue;
        };
        if sp.external_policy != TrafficPolicy::Local {
            continue;
        }
        let key = &sp.name.service;
        let first = *ports.entry(key).or_insert(port);
        if first != port {
            // One field per Service, so ports cannot disagree; keep the first.
            tracing::warn!(service = %key, first, port, "ports of one Service disagree on healthCheckNodePort");
        }
        let ips = local.entry(key).or_default();
        ips.extend(
            sp.all_endpoints
                .iter()
                .filter(|e| e.is_local && e.ready)
                .map(|e| e.ip),
        );
    }
    ports
        .into_iter()
        .map(|(key, port)| {
            let count = local.get(key).map_or(0, BTreeSet::len);
            (key.clone(), (port, count))
        })
        .collect()
}
