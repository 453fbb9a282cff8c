//! `pods/{name}/portforward` as the API server and the kubelet (with its
//! container runtime's streaming server) serve it. Behaves as the real
//! server by default:
//!
//! - WebSocket (a GET, authorised as `get`; see [`crate::authz`]): the
//!   channel protocol `v4.channel.k8s.io` only, as the kubelet's `wsstream`
//!   (`v5.channel.k8s.io`, with its half-close signal, is never negotiated
//!   for port-forward by a real server: an opt-in fault here). For port i of
//!   the `ports` query, channel 2i carries data and 2i+1 errors; the first
//!   frame on each carries the port (u16 little endian). See [`websocket`].
//! - The runtime's stream idle timer (containerd's `stream_idle_timeout`) is
//!   reset by data messages only: a WebSocket ping does not count.
//! - SPDY (a POST, authorised as `create`): kubectl's `portforward.k8s.io`
//!   streams, see [`spdy`].
//! - Errors from the kubelet are plain text (`pod does not exist`), not a
//!   JSON `Status`; errors of the API server itself are JSON.

mod spdy;
mod websocket;

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::http::PortForwardHook;

/// Opens the TCP connection to a pod's port (the default dials it directly;
/// a test topology can dial from inside a network namespace).
pub type Dialer = Arc<
    dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> + Send + Sync,
>;

pub fn direct_dialer() -> Dialer {
    Arc::new(|addr| {
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            // As kubelet (Go sets TCP_NODELAY).
            s.set_nodelay(true)?;
            Ok(s)
        })
    })
}

/// The port-forward handler, for [`crate::Options::port_forward`].
pub fn hook(dialer: Dialer) -> PortForwardHook {
    Arc::new(move |pod, req, faults| {
        let dialer = dialer.clone();
        Box::pin(async move {
            let _in_flight = InFlight::new(&faults);
            let delay = *lock(&faults.setup_delay);
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            handle(pod, req, dialer, faults.clone())
        })
    })
}

/// Counts a port-forward request being answered (the most at once is kept).
struct InFlight<'a>(&'a Faults);

impl<'a> InFlight<'a> {
    fn new(f: &'a Faults) -> Self {
        f.requests.fetch_add(1, Ordering::Relaxed);
        let now = f.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        f.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(f)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Faults injected into the port-forward streams (see the `TestApiServer` methods).
pub struct Faults {
    cut: watch::Sender<u64>,
    /// The runtime's stream idle timeout: reset by data only.
    idle_timeout: Mutex<Option<Duration>>,
    /// An idle-timeout proxy in front of the API server: any frame counts.
    proxy_idle_timeout: Mutex<Option<Duration>>,
    opened: AtomicU64,
    idle_cut: AtomicU64,
    /// Opt-in: negotiate `v5.channel.k8s.io` (no real server does for port-forward).
    v5: AtomicBool,
    /// WebSocket upgrades answered 400 (a server or proxy that takes SPDY only).
    websocket_refused: AtomicBool,
    /// Pods the kubelet does not know (answered `404 pod does not exist`).
    unknown_to_kubelet: Mutex<HashSet<String>>,
    /// How many of the next requests get 429 Too Many Requests.
    throttle: AtomicU64,
    /// A delay before each port-forward request is answered.
    setup_delay: Mutex<Option<Duration>>,
    /// The bearer token a port-forward request must carry (else 401).
    required_token: Mutex<Option<String>>,
    requests: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            cut: watch::Sender::new(0),
            idle_timeout: Mutex::new(None),
            proxy_idle_timeout: Mutex::new(None),
            opened: AtomicU64::new(0),
            idle_cut: AtomicU64::new(0),
            v5: AtomicBool::new(false),
            websocket_refused: AtomicBool::new(false),
            unknown_to_kubelet: Mutex::new(HashSet::new()),
            throttle: AtomicU64::new(0),
            setup_delay: Mutex::new(None),
            required_token: Mutex::new(None),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        }
    }
}

impl Faults {
    /// Cuts every open stream.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
    pub fn set_idle_timeout(&self, t: Option<Duration>) {
        *lock(&self.idle_timeout) = t;
    }
    pub fn set_proxy_idle_timeout(&self, t: Option<Duration>) {
        *lock(&self.proxy_idle_timeout) = t;
    }
    pub fn set_v5(&self, on: bool) {
        self.v5.store(on, Ordering::Relaxed);
    }
    pub fn set_websocket_refused(&self, on: bool) {
        self.websocket_refused.store(on, Ordering::Relaxed);
    }
    pub fn set_unknown_to_kubelet(&self, pod: &str, unknown: bool) {
        let mut set = lock(&self.unknown_to_kubelet);
        if unknown {
            set.insert(pod.to_string());
        } else {
            set.remove(pod);
        }
    }
    pub fn throttle(&self, next: u64) {
        self.throttle.store(next, Ordering::Relaxed);
    }
    pub fn set_setup_delay(&self, d: Option<Duration>) {
        *lock(&self.setup_delay) = d;
    }
    pub fn require_token(&self, token: Option<&str>) {
        *lock(&self.required_token) = token.map(str::to_string);
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::Relaxed)
    }
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
    pub fn idle_cut(&self) -> u64 {
        self.idle_cut.load(Ordering::Relaxed)
    }
    fn v5(&self) -> bool {
        self.v5.load(Ordering::Relaxed)
    }
}

/// When a stream last carried data, and anything at all (pings included):
/// what the runtime's and a proxy's idle timers see.
pub(crate) struct Activity {
    start: Instant,
    data_ms: AtomicU64,
    any_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            data_ms: AtomicU64::new(0),
            any_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A data message (either way): resets both timers.
    pub(crate) fn data(&self) {
        let now = self.now_ms();
        self.data_ms.store(now, Ordering::Relaxed);
        self.any_ms.store(now, Ordering::Relaxed);
    }

    /// A control frame (ping, pong): only a proxy counts it.
    pub(crate) fn control(&self) {
        self.any_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Resolves when the stream has been idle for longer than one of the
    /// timeouts (never when neither is set).
    async fn idle(&self, runtime: Option<Duration>, proxy: Option<Duration>) {
        if runtime.is_none() && proxy.is_none() {
            return std::future::pending().await;
        }
        loop {
            let deadline = |last: &AtomicU64, t: Option<Duration>| {
                t.map(|t| self.start + Duration::from_millis(last.load(Ordering::Relaxed)) + t)
            };
            let next = [
                deadline(&self.data_ms, runtime),
                deadline(&self.any_ms, proxy),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("a timeout is set");
            if Instant::now() >= next {
                return;
            }
            tokio::time::sleep_until(next).await;
        }
    }
}

/// The comma-separated values of every `name` header, in order.
fn header_values(req: &Request, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect()
}

/// An error the kubelet (or its runtime) answers: plain text, not a `Status`.
fn kubelet_error(code: StatusCode, text: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{text}\n"),
    )
        .into_response()
}

/// Runs a forwarding task with the faults every stream is subject to: a
/// cut, and the idle timeouts. `run` gets the activity tracker to update.
fn spawn_stream<F, Fut>(faults: Arc<Faults>, pod: String, run: F)
where
    F: FnOnce(Arc<Activity>, Arc<Faults>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    tokio::spawn(async move {
        faults.opened.fetch_add(1, Ordering::Relaxed);
        let mut cut = faults.cut.subscribe();
        cut.mark_unchanged();
        let activity = Arc::new(Activity::new());
        let runtime = *lock(&faults.idle_timeout);
        let proxy = *lock(&faults.proxy_idle_timeout);
        let work = run(activity.clone(), faults.clone());
        tokio::select! {
            r = work => if let Err(e) = r {
                tracing::debug!(%pod, error = %e, "port-forward ended");
            },
            _ = cut.changed() => tracing::debug!(%pod, "port-forward cut (fault)"),
            _ = activity.idle(runtime, proxy) => {
                faults.idle_cut.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%pod, "port-forward cut: idle (fault)");
            }
        }
    });
}

fn handle(pod: Arc<Value>, req: Request, dialer: Dialer, faults: Arc<Faults>) -> Response {
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    // The API server's authentication: a request without the token is
    // anonymous, and turned away before anything else.
    if let Some(token) = lock(&faults.required_token).as_deref() {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if bearer != Some(token) {
            let status = crate::store::ApiError::new(401, "Unauthorized", "Unauthorized").status();
            return (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "application/json")],
                status.to_string(),
            )
                .into_response();
        }
    }
    // API priority and fairness turning the request away.
    if faults
        .throttle
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        let status = crate::store::ApiError::new(
            429,
            "TooManyRequests",
            "Too many requests, please try again later.",
        )
        .status();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::RETRY_AFTER, "1"),
            ],
            status.to_string(),
        )
            .into_response();
    }
    // What the kubelet answers for a pod it does not run.
    if lock(&faults.unknown_to_kubelet).contains(&name) {
        return kubelet_error(StatusCode::NOT_FOUND, "pod does not exist");
    }
    let Some(ip) = pod
        .pointer("/status/podIP")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<IpAddr>().ok())
    else {
        return kubelet_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("failed to find sandbox of pod {name}: the pod has no IP yet"),
        );
    };
    if websocket::is_websocket(&req) {
        if faults.websocket_refused.load(Ordering::Relaxed) {
            return kubelet_error(
                StatusCode::BAD_REQUEST,
                "unable to upgrade connection: WebSocket port-forward is not served here",
            );
        }
        return websocket::serve(name, ip, req, dialer, faults);
    }
    if spdy::is_spdy(&req) {
        return spdy::serve(name, ip, req, dialer, faults);
    }
    kubelet_error(
        StatusCode::BAD_REQUEST,
        "unable to upgrade: missing upgrade headers in request (WebSocket v4.channel.k8s.io or SPDY/3.1)",
    )
}
