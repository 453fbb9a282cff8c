//! `pods/{name}/portforward` as kubelet serves it behind the API server, over
//! WebSocket (`v4.channel.k8s.io` or `v5.channel.k8s.io`: the first the
//! client offers, as the API server negotiates). For port i of the `ports` query
//! the data channel is 2i and the error channel 2i+1; the first frame the
//! server sends on each carries the port number (u16, little endian). Every
//! data frame is one binary message, prefixed with its channel byte.
//! A client may half-close a port by sending `[255, data channel]` (v5's
//! close signal): the pod connection's write side is shut down and its reply
//! still flows back. The server never sends the signal itself (kubelet does
//! not, and the `kube` client would take it for a bad channel); when every
//! pod connection has ended it closes the WebSocket.
//! SPDY is not served: clients that only speak SPDY get a 400.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::http::PortForwardHook;
use crate::store::ApiError;

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
    Arc::new(move |pod, req, faults| handle(pod, req, dialer.clone(), faults))
}

/// Faults injected into the port-forward streams (see the `TestApiServer` methods).
pub struct Faults {
    cut: watch::Sender<u64>,
    idle_timeout: Mutex<Option<Duration>>,
    opened: AtomicU64,
    idle_cut: AtomicU64,
    /// Serve v4 only (as a kubelet without the close signal).
    v4_only: std::sync::atomic::AtomicBool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            cut: watch::Sender::new(0),
            idle_timeout: Mutex::new(None),
            opened: AtomicU64::new(0),
            idle_cut: AtomicU64::new(0),
            v4_only: Default::default(),
        }
    }
}

impl Faults {
    /// Cuts every open stream.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
    pub fn set_idle_timeout(&self, t: Option<Duration>) {
        *self.idle_timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }
    fn idle_timeout(&self) -> Option<Duration> {
        *self.idle_timeout.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Negotiate v4 only (no half-close signal), as older kubelets.
    pub fn set_v4_only(&self, v4_only: bool) {
        self.v4_only.store(v4_only, Ordering::Relaxed);
    }
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
    pub fn idle_cut(&self) -> u64 {
        self.idle_cut.load(Ordering::Relaxed)
    }
}

const V4: &str = "v4.channel.k8s.io";
const V5: &str = "v5.channel.k8s.io";
/// v5: a message `[255, channel]` closes that channel (half-close).
const CLOSE_SIGNAL: u8 = 255;

fn status(e: ApiError) -> Response {
    (
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::BAD_REQUEST),
        [(header::CONTENT_TYPE, "application/json")],
        e.status().to_string(),
    )
        .into_response()
}

fn ports_of(req: &Request) -> Result<Vec<u16>, ApiError> {
    let mut ports = Vec::new();
    for (k, v) in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
    {
        if k != "ports" {
            continue;
        }
        let v = v.replace("%2C", ",").replace("%2c", ",");
        for p in v.split(',').filter(|p| !p.is_empty()) {
            let port: u16 = p
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| ApiError::bad_request(format!("invalid port {p:?}")))?;
            ports.push(port);
        }
    }
    if ports.is_empty() {
        return Err(ApiError::bad_request(
            "at least one port must be given (ports=)",
        ));
    }
    Ok(ports)
}

fn handle(pod: Arc<Value>, mut req: Request, dialer: Dialer, faults: Arc<Faults>) -> Response {
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    let ports = match ports_of(&req) {
        Ok(p) => p,
        Err(e) => return status(e),
    };
    let Some(ip) = pod
        .pointer("/status/podIP")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<IpAddr>().ok())
    else {
        return status(ApiError::bad_request(format!(
            "pod {name} does not have a pod IP yet (status.podIP)"
        )));
    };
    let headers = req.headers();
    let is_ws = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return status(ApiError::bad_request(
            "port-forward needs a WebSocket upgrade (v4/v5.channel.k8s.io); SPDY is not served",
        ));
    };
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
    // The first protocol the client offers that is served (as the API server's wsstream).
    let v4_only = faults.v4_only.load(Ordering::Relaxed);
    let Some(protocol) = offered.iter().find_map(|p| match p.as_str() {
        V4 => Some(V4),
        V5 if !v4_only => Some(V5),
        _ => None,
    }) else {
        return status(ApiError::bad_request(format!(
            "no supported port-forward subprotocol in {offered:?} (supported: {V5}, {V4})"
        )));
    };
    if !is_ws {
        return status(ApiError::bad_request("expected Upgrade: websocket"));
    }
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "port-forward upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        faults.opened.fetch_add(1, Ordering::Relaxed);
        let mut cut = faults.cut.subscribe();
        cut.mark_unchanged();
        let result = tokio::select! {
            r = forward(ws, ip, ports, dialer, &faults) => r,
            _ = cut.changed() => {
                tracing::debug!(pod = %name, "port-forward cut (fault)");
                return;
            }
        };
        if let Err(e) = result {
            tracing::debug!(pod = %name, error = %e, "port-forward ended");
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        )
        .body(Body::empty())
        .unwrap_or_default()
}

fn frame(ch: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(ch);
    v.extend_from_slice(data);
    Message::binary(v)
}

async fn forward<S>(
    ws: WebSocketStream<S>,
    ip: IpAddr,
    ports: Vec<u16>,
    dialer: Dialer,
    faults: &Faults,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    for (i, port) in ports.iter().enumerate() {
        let p = port.to_le_bytes();
        sink.send(frame(2 * i as u8, &p)).await?;
        sink.send(frame(2 * i as u8 + 1, &p)).await?;
    }
    // Readers of the pod connections report (data channel, bytes); empty bytes is EOF.
    let (tx, mut rx) = mpsc::channel::<(u8, Vec<u8>)>(64);
    let mut writers: Vec<Option<OwnedWriteHalf>> = Vec::new();
    let mut open_readers = 0;
    for (i, port) in ports.iter().enumerate() {
        let ch = 2 * i as u8;
        match dialer(SocketAddr::new(ip, *port)).await {
            Ok(conn) => {
                let (mut r, w) = conn.into_split();
                writers.push(Some(w));
                open_readers += 1;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = tx.send((ch, Vec::new())).await;
                                return;
                            }
                            Ok(n) => {
                                if tx.send((ch, buf[..n].to_vec())).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            Err(e) => {
                writers.push(None);
                let msg = format!(
                    "error forwarding port {port} to pod {ip}: failed to connect to {ip}:{port}: {e}"
                );
                sink.send(frame(ch + 1, msg.as_bytes())).await?;
            }
        }
    }
    drop(tx);
    if open_readers == 0 {
        sink.send(Message::Close(None)).await?;
        return Ok(());
    }
    // The two directions run independently, so that a slow reader on one
    // side never stalls the other (an echoing pod would deadlock otherwise).
    let down = async move {
        while let Some((ch, bytes)) = rx.recv().await {
            if bytes.is_empty() {
                open_readers -= 1;
                if open_readers == 0 {
                    break;
                }
                continue;
            }
            sink.send(frame(ch, &bytes)).await?;
        }
        // Every pod connection is done: end the stream (the up side drains
        // until the client acknowledges the close).
        sink.send(Message::Close(None)).await?;
        // Keep the sink alive until the up side ends.
        std::future::pending::<()>().await;
        Ok::<(), tokio_tungstenite::tungstenite::Error>(())
    };
    let idle = faults.idle_timeout();
    let v4_only = faults.v4_only.load(Ordering::Relaxed);
    let up = async move {
        loop {
            let msg = match idle {
                None => stream.next().await,
                Some(d) => match tokio::time::timeout(d, stream.next()).await {
                    Ok(m) => m,
                    Err(_) => {
                        faults.idle_cut.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("port-forward cut: idle for {d:?} (fault)");
                        return Ok(());
                    }
                },
            };
            match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    let ch = b[0];
                    if ch == CLOSE_SIGNAL && !v4_only {
                        // Half-close: the client will send no more on that channel.
                        if let Some(Some(w)) =
                            b.get(1).and_then(|c| writers.get_mut(*c as usize / 2))
                        {
                            let _ = w.shutdown().await;
                        }
                        continue;
                    }
                    if ch % 2 == 0 {
                        if let Some(Some(w)) = writers.get_mut(ch as usize / 2) {
                            if w.write_all(&b[1..]).await.is_err() {
                                writers[ch as usize / 2] = None;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}
