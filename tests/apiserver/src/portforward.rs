//! `pods/{name}/portforward` as kubelet serves it behind the API server, over
//! WebSocket (`v4.channel.k8s.io`; `v5.channel.k8s.io` is accepted when v4
//! is not offered). For port i of the `ports` query
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
use std::sync::Arc;

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
use tokio::sync::mpsc;
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
    Arc::new(|addr| Box::pin(TcpStream::connect(addr)))
}

/// The port-forward handler, for [`crate::Options::port_forward`].
pub fn hook(dialer: Dialer) -> PortForwardHook {
    Arc::new(move |pod, req| handle(pod, req, dialer.clone()))
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

fn handle(pod: Arc<Value>, mut req: Request, dialer: Dialer) -> Response {
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
    let protocol = if offered.iter().any(|p| p == V4) {
        V4
    } else if offered.iter().any(|p| p == V5) {
        V5
    } else {
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
        if let Err(e) = forward(ws, ip, ports, dialer).await {
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
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
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
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    let ch = b[0];
                    if ch == CLOSE_SIGNAL {
                        // Half-close: the client will send no more on that channel.
                        if let Some(Some(w)) = b.get(1).and_then(|c| writers.get_mut(*c as usize / 2)) {
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
            },
            data = rx.recv() => match data {
                Some((_, bytes)) if bytes.is_empty() => {
                    open_readers -= 1;
                    if open_readers == 0 {
                        // Every pod connection is done: end the stream.
                        sink.send(Message::Close(None)).await?;
                        // Drain until the client acknowledges the close.
                        while let Some(Ok(m)) = stream.next().await {
                            if m.is_close() { break; }
                        }
                        return Ok(());
                    }
                }
                Some((ch, bytes)) => sink.send(frame(ch, &bytes)).await?,
                None => return Ok(()),
            }
        }
    }
}
