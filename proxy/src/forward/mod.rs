//! `kproxy forward`: a port-forward like `kubectl port-forward`, through the
//! API's `pods/portforward` subresource (WebSocket channel protocol), that
//! survives what kubectl does not: one connection's failure ends that
//! connection only; a replaced pod is followed (or waited for); a dropped
//! API connection is re-established; idle streams are kept alive.

pub mod apiconn;
pub mod cache;
pub mod channel;
pub mod dial;
pub mod file;
pub mod recycle;
pub mod resolve;
pub mod spdy;
pub mod spec;
pub mod status;
pub mod tunnel;
pub mod udp;
pub mod upgrade;
pub mod wsframe;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::ForwardArgs;
use crate::source::kube::{env_kubeconfig, EnvKubeconfig};
use apiconn::ApiConn;
use dial::{Dialer, Opened};
use resolve::{ResolveError, Resolved, Resolver};
use spec::{Kind, PortPair, SpecError};
use status::State;
use upgrade::UpgradeError;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("local port {port} on {ip} is already in use")]
    InUse { port: u16, ip: std::net::IpAddr },
    /// Not a `source`: the text says it once (the chain would repeat it).
    #[error("cannot listen on {addr}: {error}{}", bind_hint(*addr, error))]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// The target is gone for good, or the API unreachable for too long.
    #[error("{0}")]
    Fatal(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What to do about a local port that cannot be bound.
fn bind_hint(addr: SocketAddr, error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE: pick a local port of 1024 or more, as in 8080:80)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (no interface has this address: --address takes addresses of this host, or localhost)"
        }
        _ => "",
    }
}

/// Counters printed on exit.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    /// Client → pod.
    pub bytes_in: AtomicU64,
    /// Pod → client.
    pub bytes_out: AtomicU64,
    pub errors: AtomicU64,
    /// UDP datagrams client → pod, and pod → client.
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
}

impl Stats {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} connections, {} bytes in, {} bytes out, {} errors",
            self.connections.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        );
        let (din, dout) = (
            self.datagrams_in.load(Ordering::Relaxed),
            self.datagrams_out.load(Ordering::Relaxed),
        );
        if din + dout > 0 {
            s.push_str(&format!(", {din} datagrams in, {dout} datagrams out"));
        }
        s
    }
}

/// Why a connection could not be set up.
#[derive(Debug)]
enum SetupError {
    /// Ends the whole forward.
    Fatal(String),
    /// Ends this connection only.
    Conn(String),
}

/// The kube client, the port-forward connections (on the same config),
/// and the namespace to use.
async fn client(spec: &ForwardSpec) -> Result<(Client, ApiConn, String, String), ForwardError> {
    let opts = KubeConfigOptions {
        context: spec.context.clone(),
        cluster: spec.cluster.clone(),
        user: spec.user.clone(),
    };
    let chosen = opts.context.is_some() || opts.cluster.is_some() || opts.user.is_some();
    let server = spec.server.as_deref().map(server_url).transpose()?;
    let loaded = match &spec.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| {
                ForwardError::Config(format!("cannot read kubeconfig {}: {e}", path.display()))
            })?;
            Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| ForwardError::Config(format!("kubeconfig {}: {e}", path.display())))
        }
        None => match env_kubeconfig(std::env::var_os("KUBECONFIG").as_deref()) {
            Err(e) => Err(ForwardError::Config(format!("kubeconfig ($KUBECONFIG): {e}"))),
            Ok(EnvKubeconfig::Merged(kc)) => Config::from_custom_kubeconfig(*kc, &opts)
                .await
                .map_err(|e| ForwardError::Config(format!("kubeconfig ($KUBECONFIG): {e}"))),
            Ok(EnvKubeconfig::NoFile) if chosen => Err(ForwardError::Config(
                "kubeconfig: none of the files of $KUBECONFIG exist".into(),
            )),
            Ok(EnvKubeconfig::NoFile) => Config::incluster().map_err(|e| {
                ForwardError::Config(format!(
                    "no Kubernetes client configuration (pass --kubeconfig, or --server): none of the files of $KUBECONFIG exist; in-cluster: {e}"
                ))
            }),
            Ok(EnvKubeconfig::Unset) if chosen => Config::from_kubeconfig(&opts)
                .await
                .map_err(|e| ForwardError::Config(format!("kubeconfig: {e}"))),
            Ok(EnvKubeconfig::Unset) => Config::infer().await.map_err(|e| {
                ForwardError::Config(format!(
                    "no Kubernetes client configuration (pass --kubeconfig, or --server): {e}"
                ))
            }),
        },
    };
    let mut config = match (loaded, &server) {
        (Ok(config), _) => config,
        // As kubectl: --server alone needs no kubeconfig.
        (Err(_), Some(url)) if spec.kubeconfig.is_none() && !chosen => Config::new(url.clone()),
        (Err(e), _) => return Err(e),
    };
    if let Some(url) = server {
        config.cluster_url = url;
    }
    if let Some(token) = &spec.token {
        config.auth_info = kube::config::AuthInfo {
            token: Some(secrecy::SecretString::from(token.clone())),
            ..Default::default()
        };
    }
    spec.impersonate.apply(&mut config.auth_info);
    if spec.insecure_skip_tls_verify {
        config.accept_invalid_certs = true;
    }
    let ns = spec
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let building =
        |e: kube::Error| ForwardError::Config(format!("building the Kubernetes client: {e}"));
    let client = Client::try_from(config.clone()).map_err(building)?;
    let api = ApiConn::new(&config, client.clone()).map_err(building)?;
    Ok((client, api, ns, config.cluster_url.to_string()))
}

/// What a kube error that is no API answer says, with its causes: kube's
/// and hyper's own texts name only a kind ("ServiceError: client error
/// (Connect)"); what the user can act on (connection refused, a TLS
/// failure) is further down the source chain. Each text is said once.
pub(crate) fn kube_cause(e: &kube::Error) -> String {
    let top: &(dyn std::error::Error + 'static) = match e {
        kube::Error::Service(inner) => inner.as_ref(),
        e => e,
    };
    let mut out = top.to_string();
    let mut source = top.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `--server` as a URL (https when it names no scheme, as kubectl).
fn server_url(server: &str) -> Result<axum::http::Uri, ForwardError> {
    let with_scheme = if server.contains("://") {
        server.to_string()
    } else {
        format!("https://{server}")
    };
    match with_scheme.parse::<axum::http::Uri>() {
        Ok(uri) if uri.host().is_some() && matches!(uri.scheme_str(), Some("http" | "https")) => {
            Ok(uri)
        }
        _ => Err(ForwardError::Config(format!(
            "invalid --server {server:?}: expected a URL such as https://10.0.0.1:6443"
        ))),
    }
}

/// State shared by the connections and the target monitor.
struct Shared {
    resolver: Resolver,
    dialer: Dialer,
    /// Bounds the connection set-ups in flight (API requests).
    setups: tokio::sync::Semaphore,
    /// UDP pairs: where the relays are, and how to reach them.
    relay: Option<udp::RelayOpts>,
    relay_dialer: Option<Dialer>,
    /// Bytes of the relay streams (framing included), kept apart.
    relay_stats: Stats,
    pairs: Vec<PortPair>,
    stats: Arc<Stats>,
    opts: tunnel::TunnelOpts,
    pod_wait_timeout: Duration,
    /// Since when the API server has been unreachable.
    api_down_since: Mutex<Option<Instant>>,
    /// Since when the target has had no pod to forward to.
    unavailable_since: Mutex<Option<Instant>>,
    /// The pod last forwarded to (to say when it changes).
    current_pod: Mutex<String>,
    /// `-f`: this forward's status line, and what its sockets listen on.
    status: Option<watch::Sender<State>>,
    listening: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 && s % 60.0 == 0.0 {
        format!("{}m", s as u64 / 60)
    } else if s >= 1.0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Tries of a connection whose pod the kubelet says does not exist.
const KUBELET_404_ATTEMPTS: u32 = 3;
/// Tries of a connection the API server throttles (429), and the longest
/// Retry-After obeyed.
const THROTTLED_ATTEMPTS: u32 = 5;
const RETRY_AFTER_MAX: Duration = Duration::from_secs(10);

impl Shared {
    fn set_status(&self, state: State) {
        if let Some(tx) = &self.status {
            tx.send_if_modified(|s| {
                let changed = *s != state;
                *s = state;
                changed
            });
        }
    }

    /// Up again (after waiting or reconnecting), to the current pod.
    fn set_up(&self) {
        if lock(&self.api_down_since).is_some() || lock(&self.unavailable_since).is_some() {
            return;
        }
        self.set_status(State::Up {
            listening: self.listening.clone(),
            pod: lock(&self.current_pod).clone(),
        });
    }

    fn api_down(&self, e: &str) -> Result<(), SetupError> {
        self.set_status(State::Reconnecting(format!(
            "lost the connection to the API server ({e}); reconnecting"
        )));
        let mut since = lock(&self.api_down_since);
        let start = *since.get_or_insert_with(|| {
            tracing::warn!(
                "lost the connection to the API server ({e}); reconnecting with backoff"
            );
            Instant::now()
        });
        if start.elapsed() > self.pod_wait_timeout {
            return Err(SetupError::Fatal(format!(
                "the API server has been unreachable for more than {}: {e}",
                fmt_duration(self.pod_wait_timeout)
            )));
        }
        Ok(())
    }

    fn api_up(&self) {
        if lock(&self.api_down_since).take().is_some() {
            tracing::warn!("reconnected to the API server");
            self.set_up();
        }
    }

    fn unavailable(&self, why: &str) -> Result<(), SetupError> {
        self.set_status(State::Waiting(format!("{why}; new connections wait")));
        let target = &self.resolver.target;
        let mut since = lock(&self.unavailable_since);
        let start = *since.get_or_insert_with(|| {
            match target.kind {
                Kind::Pod => tracing::warn!(
                    "waiting for pod {} to come back ({why}); new connections wait",
                    target.name
                ),
                _ => tracing::warn!(
                    "waiting for a running pod of {target} ({why}); new connections wait"
                ),
            }
            Instant::now()
        });
        if start.elapsed() > self.pod_wait_timeout {
            return Err(SetupError::Fatal(format!(
                "{target} did not come back within --pod-wait-timeout {}: {why}",
                fmt_duration(self.pod_wait_timeout)
            )));
        }
        Ok(())
    }

    fn available(&self, pod: &Resolved) {
        let was_waiting = lock(&self.unavailable_since).take().is_some();
        let mut current = lock(&self.current_pod);
        if was_waiting || *current != pod.name {
            if was_waiting {
                tracing::warn!(
                    "{} is back: forwarding to pod {}",
                    self.resolver.target,
                    pod.name
                );
            } else {
                tracing::info!(
                    "{}: now forwarding to pod {}",
                    self.resolver.target,
                    pod.name
                );
            }
            *current = pod.name.clone();
            drop(current);
            self.set_up();
        }
    }

    /// Resolves the target, waiting (within --pod-wait-timeout) while it
    /// has no pod or the API server is unreachable.
    async fn resolve(&self, pairs: &[PortPair]) -> Result<(Resolved, Vec<u16>), SetupError> {
        let mut backoff = BACKOFF_START;
        loop {
            match self.resolver.resolve(pairs).await {
                Ok(r) => {
                    self.api_up();
                    self.available(&r.0);
                    return Ok(r);
                }
                Err(ResolveError::Unreachable(e)) => self.api_down(&e)?,
                Err(ResolveError::NotReady(why)) => {
                    self.api_up();
                    self.unavailable(&why)?
                }
                Err(ResolveError::Gone(why)) if self.resolver.target.kind == Kind::Pod => {
                    self.api_up();
                    self.unavailable(&why)?
                }
                Err(ResolveError::Gone(why)) => {
                    return Err(SetupError::Fatal(format!(
                        "{} is gone ({why}): nothing left to forward to",
                        self.resolver.target
                    )))
                }
                Err(e @ (ResolveError::Port(_) | ResolveError::Api(_))) => {
                    self.api_up();
                    return Err(SetupError::Conn(e.to_string()));
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Opens the port-forward stream for pair `idx`: resolves the target,
    /// then dials (at most `--max-concurrent-setups` at once). A kubelet
    /// that says the pod does not exist is retried a few times, then the
    /// connection fails; a 429 is retried after the server's Retry-After.
    async fn open(&self, idx: usize) -> Result<(Opened, String, u16), SetupError> {
        let mut backoff = BACKOFF_START;
        let started = Instant::now();
        let (mut kubelet_404, mut throttled) = (0u32, 0u32);
        loop {
            let permit = self.setups.acquire().await;
            let (pod, ports) = self.resolve(&self.pairs[idx..=idx]).await?;
            let port = ports[0];
            let result = self.dialer.dial(&pod.name, port).await;
            drop(permit);
            match result {
                Ok(opened) => {
                    self.api_up();
                    return Ok((opened, pod.name, port));
                }
                Err(UpgradeError::Refused {
                    status: 404,
                    from_kubelet: true,
                    message,
                    ..
                }) => {
                    self.api_up();
                    kubelet_404 += 1;
                    if kubelet_404 >= KUBELET_404_ATTEMPTS {
                        return Err(SetupError::Conn(format!(
                            "the kubelet says pod {} does not exist ({message}; {kubelet_404} attempts in {:.1}s) although the API server has it: a pod recreated under the same name, or a node that is behind; giving up on this connection",
                            pod.name,
                            started.elapsed().as_secs_f64()
                        )));
                    }
                    tracing::debug!(pod = %pod.name, "the kubelet says the pod does not exist; trying again");
                }
                // The pod went away between resolving and connecting: again.
                Err(UpgradeError::Refused { status: 404, .. }) => {
                    self.api_up();
                    tracing::debug!(pod = %pod.name, "pod vanished before port-forward; re-resolving");
                }
                Err(UpgradeError::Refused {
                    status: 429,
                    retry_after,
                    message,
                    ..
                }) => {
                    self.api_up();
                    throttled += 1;
                    if throttled > THROTTLED_ATTEMPTS {
                        return Err(SetupError::Conn(format!(
                            "the API server kept refusing the port-forward with 429 Too Many Requests ({message}; {throttled} attempts): it is overloaded or limits this user (API priority and fairness); fewer concurrent connections or a lower --max-concurrent-setups help"
                        )));
                    }
                    let wait = retry_after
                        .unwrap_or(Duration::from_secs(1))
                        .min(RETRY_AFTER_MAX);
                    tracing::warn!(
                        "the API server is throttling port-forward requests (429 Too Many Requests: {message}); retrying in {}",
                        fmt_duration(wait)
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(UpgradeError::Refused {
                    status: 403,
                    message,
                    ..
                }) => {
                    self.api_up();
                    return Err(SetupError::Conn(format!(
                        "no permission to port-forward to pod {} (403 Forbidden): {message} (a role needs get and create on pods/portforward)",
                        pod.name
                    )));
                }
                Err(UpgradeError::Refused {
                    status, message, ..
                }) => {
                    self.api_up();
                    return Err(SetupError::Conn(format!(
                        "port-forward to pod {} refused ({status}): {message}",
                        pod.name
                    )));
                }
                Err(UpgradeError::Protocol(m)) => {
                    return Err(SetupError::Conn(format!(
                        "port-forward to pod {}: {m}",
                        pod.name
                    )))
                }
                Err(UpgradeError::Transport(m)) => self.api_down(&m)?,
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Keepalive (and no Nagle) on a local connection, so a long idle forward
/// is not dropped by a middlebox and dead peers are noticed.
fn tune_local(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let _ = s.set_nodelay(true);
    let fd = s.as_raw_fd();
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| {
        // SAFETY: a valid socket fd and a pointer to a c_int of the given size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 15);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 4);
}

async fn handle(shared: Arc<Shared>, local: TcpStream, idx: usize, fatal: mpsc::Sender<String>) {
    let n = shared.stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
    let peer = local.peer_addr().ok();
    let local_port = local.local_addr().map(|a| a.port()).unwrap_or(0);
    tracing::debug!(conn = n, ?peer, "handling connection for {local_port}");
    tune_local(&local);
    let (opened, pod, port) = match shared.open(idx).await {
        Ok(o) => o,
        Err(SetupError::Fatal(msg)) => {
            let _ = fatal.send(msg).await;
            return;
        }
        Err(SetupError::Conn(msg)) => {
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(conn = n, "connection for {local_port} failed: {msg}");
            return;
        }
    };
    let result = match opened {
        Opened::WebSocket { io, v5 } => {
            tracing::debug!(conn = n, %pod, port, v5, "port-forward stream open (WebSocket)");
            tunnel::websocket::run(local, io, v5, port, shared.opts, &shared.stats).await
        }
        Opened::Spdy {
            session,
            request_id,
        } => {
            tracing::debug!(conn = n, %pod, port, request_id, "port-forward stream open (SPDY)");
            tunnel::spdy::run(local, &session, port, request_id, &shared.stats).await
        }
    };
    match result {
        Ok(()) => tracing::debug!(conn = n, %pod, port, "connection closed"),
        Err(tunnel::TunnelError::Local(e)) => {
            tracing::debug!(conn = n, %pod, port, "connection ended by the local side: {e}")
        }
        Err(e) => {
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                conn = n,
                "connection for {local_port} to pod {pod} port {port} failed (the forward goes on): {e}"
            );
        }
    }
}

/// A bound local socket of a pair.
enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Listener {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Udp(s) => s.local_addr(),
        }
    }
}

/// Listen backlog, as Go's (kubectl's) listeners: the kernel caps it at
/// `net.core.somaxconn`. std's 128 drops connections of a burst before
/// they are accepted.
const BACKLOG: i32 = 4096;

/// Binds as Go does: an IPv6 socket is IPv6 only (`IPV6_V6ONLY`), so
/// `--address ::` does not listen on IPv4 too, and `0.0.0.0,::` can bind
/// both; TCP with `SO_REUSEADDR` (as std and Go), a port in TIME_WAIT can be
/// listened on again.
fn bind_one(addr: SocketAddr, protocol: spec::Protocol) -> std::io::Result<Listener> {
    use socket2::{Domain, Socket, Type};
    let domain = Domain::for_address(addr);
    Ok(match protocol {
        spec::Protocol::Tcp => {
            let s = Socket::new(domain, Type::STREAM, None)?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Listener::Tcp(TcpListener::from_std(s.into())?)
        }
        spec::Protocol::Udp => {
            let s = Socket::new(domain, Type::DGRAM, None)?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&addr.into())?;
            s.set_nonblocking(true)?;
            Listener::Udp(UdpSocket::from_std(s.into())?)
        }
    })
}

/// Binds every pair on every address (all before any is announced).
fn bind_all(
    addrs: &[spec::BindAddr],
    pairs: &[PortPair],
) -> Result<Vec<(Listener, usize)>, ForwardError> {
    let mut out = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        let mut port = pair.local;
        for a in addrs {
            let addr = SocketAddr::new(a.ip, port);
            match bind_one(addr, pair.protocol) {
                Ok(l) => {
                    if port == 0 {
                        port = l.local_addr()?.port();
                    }
                    out.push((l, i));
                }
                Err(e) if !a.required && e.kind() == std::io::ErrorKind::AddrInUse => {
                    tracing::warn!(
                        "not listening on {addr}: local port {port} on {} is already in use",
                        a.ip
                    );
                }
                Err(e) if !a.required => {
                    tracing::debug!(%addr, "not listening on optional address: {e}");
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(ForwardError::InUse { port, ip: a.ip })
                }
                Err(error) => return Err(ForwardError::Bind { addr, error }),
            }
        }
    }
    Ok(out)
}

/// One forward: the target and ports of `kproxy forward TARGET PORTS...`,
/// or an entry of a `-f` file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    /// `pod/NAME`, `svc/NAME`, ...
    pub target: String,
    /// Port pairs, as on the command line.
    pub ports: Vec<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub context: Option<String>,
    /// kubeconfig cluster and user, overriding the context's.
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// kubectl's -s, --token and --insecure-skip-tls-verify: the command's
    /// flags, for every forward.
    #[serde(skip)]
    pub server: Option<String>,
    #[serde(skip)]
    pub token: Option<String>,
    #[serde(skip)]
    pub insecure_skip_tls_verify: bool,
    /// kubectl's --as, --as-group and --as-uid.
    #[serde(skip)]
    pub impersonate: Impersonate,
    #[serde(default)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Local addresses (default: the command's `--address`).
    #[serde(default)]
    pub address: Vec<String>,
}

/// Impersonation (kubectl's --as, --as-group, --as-uid), sent by kube's
/// auth layers on every request, the port-forward upgrades included.
#[derive(Debug, Clone, Default)]
pub struct Impersonate {
    pub user: Option<String>,
    pub groups: Vec<String>,
    pub uid: Option<String>,
}

impl Impersonate {
    pub fn from_args(args: &ForwardArgs) -> Impersonate {
        Impersonate {
            user: args.as_user.clone(),
            groups: args.as_group.clone(),
            uid: args.as_uid.clone(),
        }
    }

    fn apply(&self, auth: &mut kube::config::AuthInfo) {
        if self.user.is_some() {
            auth.impersonate = self.user.clone();
        }
        if !self.groups.is_empty() {
            auth.impersonate_groups = Some(self.groups.clone());
        }
        if self.uid.is_some() {
            auth.impersonate_uid = self.uid.clone();
        }
    }
}

/// What every forward of a command shares: its flags.
#[derive(Debug, Clone)]
struct Common {
    pod_wait_timeout: Duration,
    check_interval: Duration,
    transport: dial::Transport,
    max_concurrent_setups: usize,
    opts: tunnel::TunnelOpts,
    relay: udp::RelayOpts,
}

impl Common {
    fn from_args(args: &ForwardArgs) -> Common {
        let keepalive = args.keepalive_interval.max(Duration::from_millis(10));
        Common {
            pod_wait_timeout: args.pod_wait_timeout,
            check_interval: args.check_interval,
            transport: args.transport,
            max_concurrent_setups: args.max_concurrent_setups.max(1),
            opts: tunnel::TunnelOpts {
                half_close_timeout: args.half_close_timeout,
                keepalive_interval: keepalive,
            },
            relay: udp::RelayOpts {
                mode: args.udp_relay,
                image: args.udp_relay_image.clone(),
                start_timeout: args.udp_relay_start_timeout,
                namespace: args.udp_relay_namespace.clone(),
                selector: args.udp_relay_selector.clone(),
                port: args.udp_relay_port,
                idle: args.udp_idle_timeout.max(Duration::from_millis(10)),
            },
        }
    }
}

/// A forward with its target checked and its ports bound.
struct Prepared {
    shared: Arc<Shared>,
    listeners: Vec<(Listener, usize)>,
    /// What each socket forwards (`127.0.0.1:8080 -> 80`).
    lines: Vec<String>,
}

/// Checks the target and every port, then binds (nothing is left bound on
/// an error).
async fn prepare(
    spec: &ForwardSpec,
    common: &Common,
    stats: Arc<Stats>,
    status: Option<watch::Sender<State>>,
) -> Result<Prepared, ForwardError> {
    let target = spec::parse_target(&spec.target)?;
    let pairs = spec
        .ports
        .iter()
        .map(|p| spec::parse_port_pair(p))
        .collect::<Result<Vec<_>, _>>()?;
    let addrs = spec::parse_addresses(&spec.address)?;
    let (client, api, ns, server) = client(spec).await?;
    let keepalive = common.opts.keepalive_interval;
    let dialer = Dialer::new(api.clone(), ns.clone(), common.transport, keepalive);
    let udp = pairs.iter().any(|p| p.protocol == spec::Protocol::Udp);
    let relay_dialer = udp.then(|| {
        Dialer::new(
            api.clone(),
            common.relay.namespace.clone(),
            common.transport,
            keepalive,
        )
    });
    let mut resolver = Resolver::new(client, ns, target);
    // Validate before listening: a wrong name, kind, port or permission
    // fails here, with nothing bound.
    let (pod, ports) =
        match first_resolve(&resolver, &pairs, common.pod_wait_timeout, status.as_ref()).await {
            // Which server: the kubeconfig's may not be the one meant.
            Err(ForwardError::Resolve(ResolveError::Unreachable(why))) => {
                return Err(ForwardError::Fatal(format!(
                    "cannot reach the API server {server}: {why}"
                )))
            }
            r => r?,
        };
    // A bare port name's local port is its number as resolved now; it stays
    // (the listener is bound once), as kubectl's.
    let mut pairs = pairs;
    for (pair, (local, _)) in pairs.iter_mut().zip(&ports) {
        pair.local = *local;
    }
    let ports: Vec<u16> = ports.into_iter().map(|(_, remote)| remote).collect();
    // From now on new connections resolve from a watch cache, and the
    // first one finds an API server connection ready.
    resolver.start_cache();
    api.warm();
    let listeners = bind_all(&addrs, &pairs)?;
    let mut lines = Vec::new();
    for (l, i) in &listeners {
        let udp = if pairs[*i].protocol == spec::Protocol::Udp {
            "/udp"
        } else {
            ""
        };
        lines.push(format!("{} -> {}{udp}", l.local_addr()?, ports[*i]));
    }
    let shared = Arc::new(Shared {
        resolver,
        dialer,
        setups: tokio::sync::Semaphore::new(common.max_concurrent_setups),
        relay: udp.then(|| common.relay.clone()),
        relay_dialer,
        relay_stats: Stats::default(),
        pairs,
        stats,
        opts: common.opts,
        pod_wait_timeout: common.pod_wait_timeout,
        api_down_since: Mutex::new(None),
        unavailable_since: Mutex::new(None),
        current_pod: Mutex::new(pod.name.clone()),
        status,
        listening: lines.clone(),
    });
    shared.set_up();
    Ok(Prepared {
        shared,
        listeners,
        lines,
    })
}

/// The target's pod at start. A target that exists but has no running pod
/// yet (just applied, still Pending) is waited for within
/// `--pod-wait-timeout`, as kubectl's `--pod-running-timeout` waits for a
/// pod; every other failure (no such target, a bad port, no permission)
/// ends at once.
async fn first_resolve(
    resolver: &Resolver,
    pairs: &[PortPair],
    timeout: Duration,
    status: Option<&watch::Sender<State>>,
) -> Result<(Resolved, Vec<(u16, u16)>), ForwardError> {
    let started = Instant::now();
    let mut backoff = BACKOFF_START;
    loop {
        match resolver.resolve_local(pairs).await {
            Err(ResolveError::NotReady(why)) => {
                if started.elapsed() >= timeout {
                    return Err(ForwardError::Fatal(format!(
                        "{why} (waited --pod-wait-timeout {})",
                        fmt_duration(timeout)
                    )));
                }
                if backoff == BACKOFF_START {
                    tracing::warn!(
                        "waiting for {}: {why} (up to --pod-wait-timeout {})",
                        resolver.target,
                        fmt_duration(timeout)
                    );
                }
                if let Some(s) = status {
                    s.send_replace(State::Waiting(why));
                }
            }
            r => return Ok(r?),
        }
        let left = timeout.saturating_sub(started.elapsed());
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Serves a prepared forward until it fails for good; returns why.
async fn serve(p: Prepared, check_interval: Duration) -> String {
    let shared = p.shared;
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<String>(4);
    let mut tasks = JoinSet::new();
    for (l, i) in p.listeners {
        let shared = shared.clone();
        let fatal = fatal_tx.clone();
        match l {
            Listener::Udp(socket) => {
                tasks.spawn(udp::serve(socket, shared, i, fatal));
            }
            Listener::Tcp(l) => {
                tasks.spawn(async move {
                    let mut conns = JoinSet::new();
                    loop {
                        tokio::select! {
                            accepted = l.accept() => match accepted {
                                Ok((s, _)) => {
                                    conns.spawn(handle(shared.clone(), s, i, fatal.clone()));
                                }
                                Err(e) => {
                                    tracing::warn!("accept: {e}");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            },
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                        }
                    }
                });
            }
        }
    }
    // The monitor notices a vanished target (and the API server's state)
    // without waiting for a connection.
    {
        let shared = shared.clone();
        let fatal = fatal_tx.clone();
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(check_interval).await;
                match shared.resolve(&[]).await {
                    Ok(_) => {}
                    Err(SetupError::Fatal(msg)) => {
                        let _ = fatal.send(msg).await;
                        return;
                    }
                    Err(SetupError::Conn(msg)) => tracing::debug!("target check: {msg}"),
                }
            }
        });
    }
    drop(fatal_tx);
    let why = fatal_rx
        .recv()
        .await
        .unwrap_or_else(|| "the forward stopped".to_string());
    tasks.abort_all();
    why
}

pub async fn run(args: ForwardArgs) -> Result<(), ForwardError> {
    // As kubectl (an empty --address= is not the default).
    if args
        .address
        .iter()
        .flat_map(|a| a.split(','))
        .all(|a| a.trim().is_empty())
    {
        return Err(ForwardError::Config(
            "--address: you must specify at least 1 address".into(),
        ));
    }
    if args.request_timeout.is_some_and(|t| !t.is_zero()) {
        tracing::warn!(
            "--request-timeout is accepted as kubectl's and not applied (kproxy's API requests have their own timeouts and retries)"
        );
    }
    let common = Common::from_args(&args);
    if let Some(path) = &args.file {
        let specs = file::load(path, &args)?;
        return run_file(specs, common).await;
    }
    let spec = ForwardSpec {
        target: args.target.clone().unwrap_or_default(),
        ports: args.ports.clone(),
        namespace: args.namespace.clone(),
        context: args.context.clone(),
        cluster: args.cluster.clone(),
        user: args.user.clone(),
        server: args.server.clone(),
        token: args.token.clone(),
        insecure_skip_tls_verify: args.insecure_skip_tls_verify,
        impersonate: Impersonate::from_args(&args),
        kubeconfig: args.kubeconfig.clone(),
        address: args.address.clone(),
    };
    let stats = Arc::new(Stats::default());
    // Before the target is resolved: the start-up wait (a Pending pod) can
    // be long, and must end on a signal as a running forward does. Tokio's
    // handlers also replace an inherited SIG_IGN (a background job of a
    // non-interactive shell ignores SIGINT), as `kill -INT` expects.
    let (mut sigint, mut sigterm) = signals()?;
    let prepared = tokio::select! {
        p = prepare(&spec, &common, stats.clone(), None) => Some(p?),
        _ = sigint.recv() => None,
        _ = sigterm.recv() => None,
    };
    let result = match prepared {
        None => Ok(()),
        Some(prepared) => {
            for line in &prepared.lines {
                println!("Forwarding from {line}");
            }
            tokio::select! {
                _ = sigint.recv() => Ok(()),
                _ = sigterm.recv() => Ok(()),
                msg = serve(prepared, common.check_interval) => Err(ForwardError::Fatal(msg)),
            }
        }
    };
    eprintln!("kproxy forward: {}", stats.summary());
    result
}

/// SIGINT and SIGTERM, which end a forward with exit 0.
fn signals() -> std::io::Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{signal, SignalKind};
    Ok((
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    ))
}

/// Pause before a failed forward of `-f` is tried again: 1s doubling to 30s.
const RETRY_START: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One forward of `-f`, for ever: prepare and serve; on a failure, say so
/// in its status and try again after a pause. The others are not touched.
async fn supervise(
    spec: ForwardSpec,
    common: Common,
    stats: Arc<Stats>,
    status: watch::Sender<State>,
) {
    let mut pause = RETRY_START;
    loop {
        status.send_replace(State::Starting);
        let started = Instant::now();
        let why = match prepare(&spec, &common, stats.clone(), Some(status.clone())).await {
            Ok(p) => serve(p, common.check_interval).await,
            Err(e) => e.to_string(),
        };
        if started.elapsed() > RETRY_MAX {
            pause = RETRY_START;
        }
        tracing::warn!(
            "{}: {why}; trying again in {}",
            spec.target,
            fmt_duration(pause)
        );
        status.send_replace(State::Error(format!(
            "{why}; trying again in {}",
            fmt_duration(pause)
        )));
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// `kproxy forward -f FILE`: every forward of the file at once, with a
/// status line each (redrawn in place on a terminal, a plain line per
/// change otherwise). One failing forward never stops the others.
async fn run_file(specs: Vec<(String, ForwardSpec)>, common: Common) -> Result<(), ForwardError> {
    use std::io::{IsTerminal, Write};
    // Before any forward starts (see run).
    let (mut sigint, mut sigterm) = signals()?;
    let mut tasks = JoinSet::new();
    let mut forwards = Vec::new();
    for (name, spec) in specs {
        let (tx, rx) = watch::channel(State::Starting);
        let stats = Arc::new(Stats::default());
        tasks.spawn(supervise(spec, common.clone(), stats.clone(), tx));
        forwards.push((name, rx, stats));
    }
    let terminal = std::io::stdout().is_terminal();
    let mut drawn = 0;
    let mut printed: Vec<Option<State>> = vec![None; forwards.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {}
        }
        let states: Vec<(String, State)> = forwards
            .iter()
            .map(|(name, rx, _)| (name.clone(), rx.borrow().clone()))
            .collect();
        let mut out = std::io::stdout().lock();
        if terminal {
            if printed
                .iter()
                .zip(&states)
                .any(|(p, (_, s))| p.as_ref() != Some(s))
            {
                let _ = out
                    .write_all(status::redraw(drawn, &states, status::terminal_width()).as_bytes());
                drawn = states.len();
            }
        } else {
            for (p, (name, s)) in printed.iter().zip(&states) {
                if p.as_ref() != Some(s) {
                    let _ = writeln!(out, "{}", status::line(name, s));
                }
            }
        }
        let _ = out.flush();
        printed = states.into_iter().map(|(_, s)| Some(s)).collect();
    }
    tasks.abort_all();
    for (name, _, stats) in &forwards {
        eprintln!("kproxy forward: {name}: {}", stats.summary());
    }
    Ok(())
}
