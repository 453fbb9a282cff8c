//! The HTTP/1.1 connections the port-forward upgrades go over.
//!
//! kube's `Client` sends a request through a tower `Buffer` (a worker task)
//! and hyper's pooled client (a connection task, a pool checkout, a new TCP
//! and TLS connection for each upgrade, since an upgraded connection never
//! returns to the pool): several task wake-ups and a connect on the path of
//! every new local connection. Here each upgrade is one hyper HTTP/1.1
//! connection of its own, driven in the caller's task, and a spare
//! connection (TCP and TLS done, nothing sent) is kept ready, so a new local
//! connection pays one request and its answer.
//!
//! What the request carries is kube's: the same TLS (CA, client
//! certificates, `tls-server-name`), the same base URI, and kube's own
//! auth and extra-header layers (bearer tokens, token files and exec
//! plugins refreshed as kube refreshes them, impersonation).
//! With a `proxy-url` in the kubeconfig, kube's client is used as it is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use kube::{Client, Config};
use tokio::time::Instant;
use tower::{BoxError, ServiceExt};

use super::upgrade::{Io, UpgradeError};

type Stream = hyper_rustls::MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
/// kube's request layers (base URI, auth, extra headers) around a service
/// that hands the finished request back (in its answer's extensions, as
/// the auth layer wants an HTTP response).
type Layers = tower::util::BoxCloneSyncService<Request<Empty<Bytes>>, Response<()>, BoxError>;

/// The request as kube's layers made it.
#[derive(Clone)]
struct Prepared(axum::http::request::Parts);

/// A spare connection older than this is not used (an API server, or a
/// load balancer in front of it, may have closed it as idle; Go's servers
/// keep idle HTTP/1.1 connections for 90s and more).
const SPARE_MAX_AGE: Duration = Duration::from_secs(30);

/// Sends the upgrade requests of port-forwards.
#[derive(Clone)]
pub enum ApiConn {
    /// Own connections (see the module's doc).
    Direct(Arc<Direct>),
    /// kube's client (with a `proxy-url`).
    Kube(Client),
}

pub struct Direct {
    connector: Connector,
    layers: Layers,
    cluster_url: Uri,
    /// A connected, unused connection, and when it was made.
    spare: Mutex<Option<(Instant, Stream)>>,
    /// A spare is being connected.
    filling: AtomicBool,
}

/// What answered an upgrade request.
pub enum Answer {
    Upgraded(Io, HeaderMap),
    /// Another status; its headers and body.
    Refused(StatusCode, HeaderMap, Bytes),
}

impl ApiConn {
    /// kube's TLS and auth from `config`, on connections of our own (with
    /// TCP_NODELAY: the streams carry small interactive frames that Nagle
    /// would hold back for a delayed ACK); kube's client with a proxy.
    pub fn new(config: &Config, client: Client) -> Result<ApiConn, kube::Error> {
        use kube::client::ConfigExt;
        if config.proxy_url.is_some() {
            return Ok(ApiConn::Kube(client));
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(config.connect_timeout);
        let connector = config.rustls_https_connector_with_connector(http)?;
        let layers = tower::ServiceBuilder::new()
            .layer(config.base_uri_layer())
            .option_layer(config.auth_layer()?)
            .layer(config.extra_headers_layer()?)
            .map_err(BoxError::from)
            .service(tower::service_fn(|req: Request<Empty<Bytes>>| async {
                let mut res = Response::new(());
                res.extensions_mut().insert(Prepared(req.into_parts().0));
                Ok::<_, std::convert::Infallible>(res)
            }));
        Ok(ApiConn::Direct(Arc::new(Direct {
            connector,
            layers: Layers::new(layers),
            cluster_url: config.cluster_url.clone(),
            spare: Mutex::new(None),
            filling: AtomicBool::new(false),
        })))
    }

    /// Connects a spare connection now (for the first local connection).
    pub fn warm(&self) {
        if let ApiConn::Direct(d) = self {
            d.refill();
        }
    }

    /// Sends `req` (a path and query, headers) and returns the upgraded
    /// connection on a 101, else the answer.
    pub async fn upgrade(&self, req: Request<Empty<Bytes>>) -> Result<Answer, UpgradeError> {
        match self {
            ApiConn::Direct(d) => d.upgrade(req).await,
            ApiConn::Kube(client) => {
                let res = client
                    .send(req.map(|_| kube::client::Body::empty()))
                    .await
                    .map_err(|e| UpgradeError::Transport(e.to_string()))?;
                finish(res, std::future::ready(Ok(()))).await
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the answer: on a 101 waits for the upgraded connection, else
/// collects the body; `conn` (the connection's own future, when the caller
/// drives it) is polled meanwhile.
async fn finish<B, F>(res: Response<B>, conn: F) -> Result<Answer, UpgradeError>
where
    B: hyper::body::Body<Data = Bytes>,
    F: std::future::Future<Output = hyper::Result<()>>,
{
    let status = res.status();
    let headers = res.headers().clone();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        conn.await.map_err(|e| {
            UpgradeError::Transport(format!("the API server connection failed: {e}"))
        })?;
        let upgraded = hyper::upgrade::on(res)
            .await
            .map_err(|e| UpgradeError::Transport(format!("upgrading the connection: {e}")))?;
        return Ok(Answer::Upgraded(TokioIo::new(upgraded), headers));
    }
    // The body of a refusal; the connection is dropped afterwards.
    let body = async {
        res.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    };
    tokio::pin!(body, conn);
    let mut conn_done = false;
    let body = loop {
        tokio::select! {
            b = &mut body => break b,
            _ = &mut conn, if !conn_done => conn_done = true,
        }
    };
    Ok(Answer::Refused(status, headers, body))
}

impl Direct {
    /// A new connection (TCP, and TLS for https).
    async fn connect(&self) -> Result<Stream, UpgradeError> {
        self.connector
            .clone()
            .oneshot(self.cluster_url.clone())
            .await
            .map_err(|e| UpgradeError::Transport(format!("connecting to the API server: {e}")))
    }

    /// Connects a spare in the background, unless one is there or coming.
    fn refill(self: &Arc<Self>) {
        if lock(&self.spare).is_some() || self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            // A failure is left to the next set-up, which connects itself
            // and reports it.
            if let Ok(s) = me.connect().await {
                lock(&me.spare).get_or_insert((Instant::now(), s));
            }
            me.filling.store(false, Ordering::Release);
        });
    }

    /// The spare connection if there is a fresh one.
    fn take_spare(&self) -> Option<Stream> {
        lock(&self.spare)
            .take()
            .filter(|(made, _)| made.elapsed() < SPARE_MAX_AGE)
            .map(|(_, s)| s)
    }

    async fn upgrade(self: &Arc<Self>, req: Request<Empty<Bytes>>) -> Result<Answer, UpgradeError> {
        let answer = self.upgrade_once(req).await;
        // The next spare is connected once this upgrade is answered, so
        // that its connect (and the server's accept) does not compete
        // with this one.
        self.refill();
        answer
    }

    async fn upgrade_once(&self, req: Request<Empty<Bytes>>) -> Result<Answer, UpgradeError> {
        let prepared = self
            .layers
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| UpgradeError::Transport(format!("authenticating to the API server: {e}")))?
            .extensions_mut()
            .remove::<Prepared>()
            .ok_or_else(|| {
                UpgradeError::Protocol("kube's request layers lost the request".into())
            })?;
        let req = origin_form(Request::from_parts(prepared.0, Empty::new()))?;
        if let Some(spare) = self.take_spare() {
            // A spare the server has closed meanwhile fails before any
            // answer: then once more on a new connection.
            match send(spare, clone_request(&req)).await {
                Err(Stale(e)) => {
                    tracing::debug!(
                        "the spare API server connection was closed ({e}); connecting anew"
                    )
                }
                Ok(answer) => return answer,
            }
        }
        let stream = self.connect().await?;
        match send(stream, req).await {
            Ok(answer) => answer,
            Err(Stale(e)) => Err(UpgradeError::Transport(format!(
                "the API server closed the connection: {e}"
            ))),
        }
    }
}

/// The request ended without an answer (the connection was closed).
struct Stale(hyper::Error);

/// One request on a connection of its own, driven in this task.
async fn send(
    stream: Stream,
    req: Request<Empty<Bytes>>,
) -> Result<Result<Answer, UpgradeError>, Stale> {
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(stream).await {
        Ok(h) => h,
        Err(e) => return Err(Stale(e)),
    };
    let conn = conn.with_upgrades();
    tokio::pin!(conn);
    let response = sender.send_request(req);
    tokio::pin!(response);
    let mut conn_result = None;
    let res = loop {
        tokio::select! {
            biased;
            r = &mut response => break r,
            c = &mut conn, if conn_result.is_none() => conn_result = Some(c),
        }
    };
    let res = match res {
        Ok(res) => res,
        Err(e) => return Err(Stale(e)),
    };
    let conn = async move {
        match conn_result {
            Some(r) => r,
            None => conn.await,
        }
    };
    Ok(finish(res, conn).await)
}

/// The request with an origin-form target and a Host header, as hyper's
/// pooled client sends it.
fn origin_form(req: Request<Empty<Bytes>>) -> Result<Request<Empty<Bytes>>, UpgradeError> {
    let (mut parts, body) = req.into_parts();
    if let Some(authority) = parts.uri.authority() {
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| UpgradeError::Protocol(format!("API server address: {e}")))?;
        parts.headers.insert(header::HOST, host);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"));
    Ok(Request::from_parts(parts, body))
}

fn clone_request(req: &Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let mut r = Request::new(Empty::new());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}
