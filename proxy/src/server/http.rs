//! The HTTP serving loop of every kproxy server (healthz, metrics,
//! healthCheckNodePorts): HTTP/1.1 with a header-read timeout, so a client
//! that opens connections and sends nothing (or a byte a minute) cannot hold
//! them, and a cap on open connections, so a flood cannot exhaust file
//! descriptors and take the other servers and the dataplane down with it.
//! Connections over the cap are closed at once.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Semaphore};

/// Time a client has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections per server; more are closed at once.
pub const MAX_CONNECTIONS: usize = 512;

/// Serves `router` on `listener` until `shutdown` completes; then open
/// connections finish their current request and close.
pub async fn serve_connections<L>(
    mut listener: L,
    router: Router,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener,
{
    let slots = std::sync::Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut over_cap_logged = false;
    loop {
        let (io, _peer) = tokio::select! {
            conn = listener.accept() => conn,
            _ = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if !over_cap_logged {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "too many open HTTP connections: closing new ones until some end"
                );
                over_cap_logged = true;
            }
            drop(io);
            continue;
        };
        over_cap_logged = false;
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
}
