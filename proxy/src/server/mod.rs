//! HTTP servers: `/healthz` (kube-proxy's health endpoint), the metrics
//! server (`/metrics`, `/proxyMode`, `/healthz`, `/livez`, and kproxy's
//! `/kproxy/rejections` and `/kproxy/frontends` for `kproxy status`) and the
//! per-Service healthCheckNodePort servers ([`HealthCheckServers`]).
//!
//! Wiring, for the sync loop (inside a tokio runtime):
//!
//! ```text
//! let health = Arc::new(HealthState::new(2 * sync_period));
//! let metrics = Arc::new(Metrics::new(mode));
//! tokio::spawn(serve_healthz(healthz_addr, health.clone(), metrics.clone(), hard_fail));
//! tokio::spawn(serve_metrics(metrics_addr, metrics.clone(), health.clone(), mode, hard_fail));
//! let mut hc = HealthCheckServers::new(nodeport_ips, health.clone()); // empty = 0.0.0.0
//! // on every change:  health.queued(now); metrics.observe_queued(now);
//! // after each sync:  metrics.observe_sync(full, elapsed, ok);
//! //   ok, full:    health.updated(now); metrics.observe_desired(&desired); hc.sync(&desired);
//! //   ok, partial: health.updated(now); metrics.observe_changes(&desired, &changes);
//! //                hc.sync_changes(&desired, &changes);
//! //   err: health.sync_failed(&err);
//! // when hc.next_retry() is due: hc.retry_due(now) (addresses not bound yet)
//! ```

mod healthcheck;
mod http;
pub mod udp_relay;

#[cfg(test)]
pub(crate) use healthcheck::FlakyBinder;
pub use healthcheck::HealthCheckServers;
pub use http::{serve_connections, HEADER_READ_TIMEOUT, MAX_CONNECTIONS};

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::dataplane::ProxyMode;
use crate::health::{HealthReport, HealthState};
use crate::metrics::{self, Metrics};

/// A server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: address in use: set {flag} to a free address")]
    AddrInUse { addr: SocketAddr, flag: String },
    #[error("cannot listen on {addr}: not an address of this host: set {flag}")]
    AddrNotAvailable { addr: SocketAddr, flag: String },
    #[error(
        "cannot listen on {addr}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE): set {flag}"
    )]
    PermissionDenied { addr: SocketAddr, flag: String },
    // The io errors below are fields, not `source`s: the text says them
    // once (an error chain would repeat them).
    #[error("cannot listen on {addr} ({flag}): {error}")]
    Bind {
        addr: SocketAddr,
        flag: String,
        error: io::Error,
    },
    #[error("server on {addr} failed: {error}")]
    Serve { addr: SocketAddr, error: io::Error },
}

impl ServerError {
    /// Turns a bind error into one that names the flag to change.
    pub fn from_bind(addr: SocketAddr, flag: &str, err: io::Error) -> Self {
        let flag = flag.to_string();
        match err.kind() {
            io::ErrorKind::AddrInUse => ServerError::AddrInUse { addr, flag },
            io::ErrorKind::AddrNotAvailable => ServerError::AddrNotAvailable { addr, flag },
            io::ErrorKind::PermissionDenied => ServerError::PermissionDenied { addr, flag },
            _ => ServerError::Bind {
                addr,
                flag,
                error: err,
            },
        }
    }
}

/// Binds `addr`; errors name `flag` (e.g. `--healthz-bind-address`), the
/// command-line option that chose the address.
pub async fn bind(addr: SocketAddr, flag: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| ServerError::from_bind(addr, flag, err))
}

/// Serves `router` on an already bound listener until the task is dropped,
/// with a header-read timeout and a connection cap ([`serve_connections`]).
pub async fn serve_on(listener: TcpListener, router: Router) -> Result<(), ServerError> {
    let addr = listener.local_addr().map_err(|error| ServerError::Serve {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        error,
    })?;
    tracing::info!(%addr, "serving HTTP");
    serve_connections(listener, router, std::future::pending()).await;
    Ok(())
}

/// How long a server whose address cannot be bound waits before trying
/// again (without `--bind-address-hard-fail`), as kube-proxy does.
pub const BIND_RETRY: Duration = Duration::from_secs(5);

/// Binds `addr` and serves `router`. A bind failure is returned with
/// `hard_fail` (kube-proxy's `--bind-address-hard-fail`); otherwise it is
/// logged and retried every [`BIND_RETRY`], so a port held by a leftover
/// process does not keep the proxy from programming the node.
pub async fn serve_retrying(
    addr: SocketAddr,
    flag: &str,
    router: Router,
    hard_fail: bool,
) -> anyhow::Result<()> {
    let mut logged = false;
    loop {
        match bind(addr, flag).await {
            Ok(listener) => {
                serve_on(listener, router).await?;
                return Ok(());
            }
            Err(err) if hard_fail => return Err(err.into()),
            Err(err) => {
                if !logged {
                    tracing::error!(%err, "retrying every {}s (set --bind-address-hard-fail to exit instead)", BIND_RETRY.as_secs());
                    logged = true;
                }
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    }
}

/// The `/healthz` server on `--healthz-bind-address`.
pub async fn serve_healthz(
    addr: SocketAddr,
    health: Arc<HealthState>,
    metrics: Arc<Metrics>,
    hard_fail: bool,
) -> anyhow::Result<()> {
    serve_retrying(
        addr,
        "--healthz-bind-address",
        healthz_router(health, metrics),
        hard_fail,
    )
    .await
}

/// The metrics server on `--metrics-bind-address`.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
    mode: ProxyMode,
    hard_fail: bool,
) -> anyhow::Result<()> {
    serve_retrying(
        addr,
        "--metrics-bind-address",
        metrics_router(metrics, health, mode),
        hard_fail,
    )
    .await
}

/// What the health handlers read: the health and the counters of answers.
#[derive(Clone)]
struct HealthzState {
    health: Arc<HealthState>,
    metrics: Arc<Metrics>,
}

/// `/healthz` and `/livez`, as kube-proxy's health server.
pub fn healthz_router(health: Arc<HealthState>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(HealthzState { health, metrics })
}

/// `/metrics`, `/proxyMode`, plus the health endpoints.
pub fn metrics_router(metrics: Arc<Metrics>, health: Arc<HealthState>, mode: ProxyMode) -> Router {
    let metrics_routes = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/kproxy/rejections", get(rejections))
        .route("/kproxy/frontends", get(frontends))
        .with_state(metrics.clone());
    Router::new()
        .route("/proxyMode", get(move || async move { mode.to_string() }))
        .merge(metrics_routes)
        .merge(healthz_router(health, metrics))
}

async fn render_metrics(State(metrics): State<Arc<Metrics>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics.render(),
    )
        .into_response()
}

/// What the last sync left out and why (invalid objects, IPv6 parts,
/// frontends another Service owns), as JSON: read by `kproxy status`.
async fn rejections(State(metrics): State<Arc<Metrics>>) -> Response {
    let body = serde_json::to_string(&metrics.rejections()).unwrap_or_default();
    json_response(StatusCode::OK, body, &[])
}

/// `?all=true` on `/kproxy/frontends`.
#[derive(Debug, Default, serde::Deserialize)]
struct FrontendsQuery {
    #[serde(default)]
    all: bool,
}

/// Each frontend's status: the counts, and the frontends not applied
/// (with `?all=true`, every frontend), as JSON: read by `kproxy status`.
async fn frontends(
    State(metrics): State<Arc<Metrics>>,
    axum::extract::Query(q): axum::extract::Query<FrontendsQuery>,
) -> Response {
    let report = metrics
        .frontend_table()
        .report(q.all, std::time::Instant::now());
    let body = serde_json::to_string(&report).unwrap_or_default();
    json_response(StatusCode::OK, body, &[])
}

async fn healthz(State(s): State<HealthzState>) -> Response {
    let resp = health_response(s.health.report(SystemTime::now()));
    s.metrics.count_healthz(resp.status().as_u16());
    resp
}

async fn livez(State(s): State<HealthzState>) -> Response {
    let resp = health_response(s.health.live_report(SystemTime::now()));
    s.metrics.count_livez(resp.status().as_u16());
    resp
}

fn health_response(report: HealthReport) -> Response {
    let status = if report.is_healthy() {
        StatusCode::OK
    } else {
        if let Some(why) = &report.unhealthy {
            tracing::debug!(reason = %why, "reporting unhealthy");
        }
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, report.to_json(), &[])
}

/// A JSON response with kube-proxy's headers.
pub(crate) fn json_response(
    status: StatusCode,
    body: String,
    extra: &[(&'static str, HeaderValue)],
) -> Response {
    let mut resp = (status, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    for (name, value) in extra {
        headers.insert(*name, value.clone());
    }
    resp
}

#[cfg(test)]
pub(crate) mod testclient;

#[cfg(test)]
mod tests;
