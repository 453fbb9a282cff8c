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
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::BIND_RETRY;
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

/// One address a Service's port could not be bound on: retried with
/// backoff, and at every sync.
#[derive(Debug)]
struct BindFailure {
    /// The last error, as logged: a retry failing the same way logs nothing.
    error: String,
    /// Failed attempts so far (the backoff's exponent).
    attempts: u32,
    retry_at: Instant,
}

#[derive(Debug)]
struct Instance {
    port: u16,
    state: Arc<ServiceHealth>,
    running: BTreeMap<IpAddr, Running>,
    /// Addresses not bound yet. They do not hold back the others: a load
    /// balancer reaching the node on a bound address gets its answer.
    failed: BTreeMap<IpAddr, BindFailure>,
}

/// Opens listening sockets: the operating system's, or a fake in tests
/// (which makes an address fail a set number of times).
pub(crate) trait Binder: Send + std::fmt::Debug {
    fn bind(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener>;
}

#[derive(Debug)]
struct OsBinder;

impl Binder for OsBinder {
    fn bind(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        std::net::TcpListener::bind(addr)
    }
}

/// The first retry of an address that failed to bind comes after this;
/// each failure doubles it up to [`BIND_RETRY`] (the healthz and metrics
/// servers' retry period), so a tentative IPv6 address is served about
/// a second after DAD ends, and a port that stays taken costs one bind
/// attempt per 5 s.
const FIRST_BIND_RETRY: Duration = Duration::from_secs(1);

fn backoff(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    (FIRST_BIND_RETRY * (1 << doublings)).min(BIND_RETRY)
}

/// The healthCheckNodePort servers of all Services, kept in step with the
/// desired state by [`HealthCheckServers::sync`].
#[derive(Debug)]
pub struct HealthCheckServers {
    /// Where to listen: every address (`0.0.0.0`) when `None`.
    addresses: Option<Vec<IpAddr>>,
    health: Arc<HealthState>,
    services: BTreeMap<ServiceKey, Instance>,
    binder: Box<dyn Binder>,
}

impl HealthCheckServers {
    /// `addresses`: the node IPs matching `--nodeport-addresses`, or empty to
    /// listen on every address (`0.0.0.0`). `health` feeds
    /// `serviceProxyHealthy`.
    ///
    /// IPv6 link-local addresses (`fe80::/10`) are left out: they cannot be
    /// bound without naming their interface, and kube-proxy never serves
    /// them on their own either (its listen has no zone and fails; only its
    /// wildcard listen for `0.0.0.0/0` or `::/0` reaches them).
    pub fn new(addresses: Vec<IpAddr>, health: Arc<HealthState>) -> Self {
        Self::with_binder(addresses, health, Box::new(OsBinder))
    }

    /// Only on `addresses` (those of the node that `--nodeport-addresses`
    /// lets through), none when it is empty: a list that matches no node
    /// address serves nowhere, as kube-proxy, instead of everywhere.
    pub fn only_on(addresses: Vec<IpAddr>, health: Arc<HealthState>) -> Self {
        if addresses.is_empty() {
            tracing::warn!("--nodeport-addresses matches no address of this node: healthCheckNodePorts are not served");
        }
        Self::build(Some(addresses), health, Box::new(OsBinder))
    }

    pub(crate) fn with_binder(
        addresses: Vec<IpAddr>,
        health: Arc<HealthState>,
        binder: Box<dyn Binder>,
    ) -> Self {
        Self::build((!addresses.is_empty()).then_some(addresses), health, binder)
    }

    fn build(
        addresses: Option<Vec<IpAddr>>,
        health: Arc<HealthState>,
        binder: Box<dyn Binder>,
    ) -> Self {
        let addresses = addresses.map(|addresses| {
            let (link_local, usable): (Vec<IpAddr>, Vec<IpAddr>) =
                addresses.into_iter().partition(is_ipv6_link_local);
            if !link_local.is_empty() {
                tracing::info!(
                    addresses = ?link_local,
                    "healthCheckNodePorts are not served on IPv6 link-local addresses (as kube-proxy)"
                );
            }
            if usable.is_empty() && !link_local.is_empty() {
                tracing::warn!("no address to serve healthCheckNodePorts on: --nodeport-addresses matches only link-local ones");
            }
            usable
        });
        HealthCheckServers {
            addresses,
            health,
            services: BTreeMap::new(),
            binder,
        }
    }

    /// Starts servers for new Services, stops them for removed ones (or when
    /// the port changed) and updates local endpoint counts in place. An
    /// address that cannot be bound is logged and retried: at each sync, and
    /// on its own schedule ([`Self::retry_due`]). Must be called within a
    /// tokio runtime.
    pub fn sync(&mut self, desired: &DesiredState) {
        let wanted = wanted_servers(desired.services.values().map(|sp| &**sp));
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.reconcile(&key, None);
        }
        for (key, w) in wanted {
            self.reconcile(&key, Some(w));
        }
        self.retry(Instant::now(), true);
    }

    /// As [`Self::sync`] after a sync that applied `changes`: only the
    /// Services of changed ports that have or had a healthCheckNodePort are
    /// looked at (and every address not bound yet is tried again), so a
    /// sync costs its changes, not a walk over every Service.
    pub fn sync_changes(&mut self, desired: &DesiredState, changes: &ChangeSet) {
        let keys: BTreeSet<ServiceKey> = changes
            .iter()
            .filter(|(_, c)| {
                c.old
                    .iter()
                    .chain(&c.new)
                    .any(|sp| sp.health_check_node_port.is_some())
            })
            .map(|(n, _)| n.service.clone())
            .collect();
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
        self.retry(Instant::now(), true);
    }

    /// When the next address not bound yet is due to be tried again, if any:
    /// the sync loop calls [`Self::retry_due`] then, so binding does not
    /// wait for a Service change (a periodic sync with nothing to write
    /// does not call `sync`).
    pub fn next_retry(&self) -> Option<Instant> {
        self.services
            .values()
            .flat_map(|inst| inst.failed.values().map(|f| f.retry_at))
            .min()
    }

    /// Tries again the addresses whose backoff is over at `now`.
    pub fn retry_due(&mut self, now: Instant) {
        self.retry(now, false);
    }

    /// Addresses a healthCheckNodePort is wanted on but not bound, with the
    /// last error, by Service.
    pub fn not_bound(&self) -> BTreeMap<ServiceKey, Vec<(SocketAddr, String)>> {
        self.services
            .iter()
            .filter(|(_, inst)| !inst.failed.is_empty())
            .map(|(k, inst)| {
                let failed = inst
                    .failed
                    .iter()
                    .map(|(ip, f)| (SocketAddr::new(*ip, inst.port), f.error.clone()))
                    .collect();
                (k.clone(), failed)
            })
            .collect()
    }

    /// One Service's server to what it should be: `wanted` (port, local
    /// endpoints), or none.
    fn reconcile(&mut self, key: &ServiceKey, wanted: Option<(u16, usize)>) {
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
        let addresses = match &self.addresses {
            None => vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            Some(addresses) => addresses.clone(),
        };
        let now = Instant::now();
        // Bound by the `retry` that ends every sync.
        let inst = Instance {
            port,
            state,
            running: BTreeMap::new(),
            // Not tried yet: due now.
            failed: addresses
                .into_iter()
                .map(|ip| {
                    let pending = BindFailure {
                        error: String::new(),
                        attempts: 0,
                        retry_at: now,
                    };
                    (ip, pending)
                })
                .collect(),
        };
        self.services.insert(key.clone(), inst);
    }

    /// Tries to bind the addresses not bound yet: all of them, or those
    /// whose backoff is over at `now`.
    fn retry(&mut self, now: Instant, all: bool) {
        for (key, inst) in &mut self.services {
            if !inst.failed.is_empty() {
                bind_failed(&*self.binder, key, inst, now, all);
            }
        }
    }

    /// Services with a serving healthCheckNodePort, and the addresses
    /// listened on.
    pub fn serving(&self) -> BTreeMap<ServiceKey, Vec<SocketAddr>> {
        self.services
            .iter()
            .filter(|(_, inst)| !inst.running.is_empty())
            .map(|(k, inst)| (k.clone(), inst.running.values().map(|r| r.addr).collect()))
            .collect()
    }
}

/// `fe80::/10`: usable only with a scope id (the interface), which a node
/// IP does not carry.
fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// Binds `inst`'s failed addresses (all, or those due at `now`) one by one,
/// so one that fails does not keep the others from serving. A failure is
/// logged when it is new or its error changed; a later success is logged
/// too.
fn bind_failed(
    binder: &dyn Binder,
    key: &ServiceKey,
    inst: &mut Instance,
    now: Instant,
    all: bool,
) {
    let port = inst.port;
    let due: Vec<IpAddr> = inst
        .failed
        .iter()
        .filter(|(_, f)| all || f.retry_at <= now)
        .map(|(ip, _)| *ip)
        .collect();
    for ip in due {
        let addr = SocketAddr::new(ip, port);
        // Bound synchronously so the outcome is known in this sync.
        match bind_now(binder, addr) {
            Ok(listener) => {
                let failure = inst.failed.remove(&ip);
                let attempts = failure.map_or(0, |f| f.attempts);
                tracing::info!(service = %key, %addr, failed_attempts = attempts, "serving healthCheckNodePort");
                inst.running
                    .insert(ip, serve(addr, listener, inst.state.clone()));
            }
            Err(err) => {
                let Some(f) = inst.failed.get_mut(&ip) else {
                    continue;
                };
                let error = err.to_string();
                if error != f.error {
                    tracing::error!(
                        service = %key,
                        %addr,
                        %err,
                        "cannot serve healthCheckNodePort {port} for Service {key} on {addr}; retrying every {}s at most (other addresses are served)",
                        BIND_RETRY.as_secs()
                    );
                } else {
                    tracing::debug!(service = %key, %addr, %err, "healthCheckNodePort still cannot be bound");
                }
                f.error = error;
                f.attempts += 1;
                f.retry_at = now + backoff(f.attempts);
            }
        }
    }
}

fn bind_now(binder: &dyn Binder, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let std_listener = binder.bind(addr)?;
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

/// A [`Binder`] for tests: binds for real, but fails an address its first
/// `n` times with `EADDRNOTAVAIL` (as a tentative IPv6 address does), and
/// counts every attempt.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub(crate) struct FlakyBinder {
    failures: Arc<Mutex<BTreeMap<IpAddr, u32>>>,
    attempts: Arc<Mutex<BTreeMap<IpAddr, u32>>>,
}

#[cfg(test)]
impl FlakyBinder {
    /// `ip` fails its next `n` binds.
    pub(crate) fn failing(self, ip: IpAddr, n: u32) -> Self {
        self.failures.lock().unwrap().insert(ip, n);
        self
    }

    /// Binds of `ip` tried so far.
    pub(crate) fn attempts(&self, ip: IpAddr) -> u32 {
        self.attempts.lock().unwrap().get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
impl Binder for FlakyBinder {
    fn bind(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        *self.attempts.lock().unwrap().entry(addr.ip()).or_default() += 1;
        if let Some(left) = self.failures.lock().unwrap().get_mut(&addr.ip()) {
            if *left > 0 {
                *left -= 1;
                return Err(std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL));
            }
        }
        std::net::TcpListener::bind(addr)
    }
}
