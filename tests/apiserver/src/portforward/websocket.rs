//! Port-forward over WebSocket with the channel protocol, as the kubelet's
//! `wsstream` serves it: `v4.channel.k8s.io` (or no subprotocol at all),
//! and `v5.channel.k8s.io` only as an opt-in fault. A client may half-close
//! a port under v5 by sending `[255, data channel]`: the pod connection's
//! write side is shut down and its reply still flows back. The server never
//! sends the signal itself; when every pod connection has ended it closes
//! the WebSocket.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{header_values, kubelet_error, spawn_stream, Activity, Dialer, Faults};

const V4: &str = "v4.channel.k8s.io";
const V5: &str = "v5.channel.k8s.io";
/// v5: a message `[255, channel]` closes that channel (half-close).
const CLOSE_SIGNAL: u8 = 255;
/// Largest chunk read from a pod connection into one message.
const CHUNK: usize = 128 * 1024;

pub(super) fn is_websocket(req: &Request) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The `ports` query (kubelet: required for WebSocket port-forward).
fn ports_of(req: &Request) -> Result<Vec<u16>, String> {
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
                .ok_or_else(|| format!("invalid port {p:?}"))?;
            ports.push(port);
        }
    }
    if ports.is_empty() {
        return Err("at least one port must be specified".into());
    }
    Ok(ports)
}

/// Answers the upgrade (101) and forwards on the upgraded connection.
pub(super) fn serve(
    pod: String,
    ip: IpAddr,
    mut req: Request,
    dialer: Dialer,
    faults: Arc<Faults>,
) -> Response {
    let ports = match ports_of(&req) {
        Ok(p) => p,
        Err(e) => return kubelet_error(StatusCode::BAD_REQUEST, &e),
    };
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return kubelet_error(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let offered = header_values(&req, "sec-websocket-protocol");
    // The first protocol the client offers that is served (wsstream's
    // handshake); none offered is the raw v4 codec.
    let v5 = faults.v5();
    let protocol = if offered.is_empty() {
        Some("")
    } else {
        offered.iter().find_map(|p| match p.as_str() {
            V4 => Some(V4),
            V5 if v5 => Some(V5),
            _ => None,
        })
    };
    let Some(protocol) = protocol else {
        let supported = if v5 { vec![V5, V4] } else { vec![V4] };
        return kubelet_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "requested protocol(s) are not supported: {offered:?}; supports {supported:?}"
            ),
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let close_signal = protocol == V5;
    spawn_stream(faults, pod, move |activity, _faults| async move {
        let upgraded = on_upgrade
            .await
            .map_err(|e| format!("upgrade failed: {e}"))?;
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        forward(ws, ip, ports, dialer, &activity, close_signal)
            .await
            .map_err(|e| e.to_string())
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if !protocol.is_empty() {
        resp = resp.header(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
    }
    resp.body(Body::empty()).unwrap_or_default()
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
    activity: &Activity,
    close_signal: bool,
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
    // Readers of the pod connections send finished messages (channel byte
    // first); None is that connection's EOF.
    let (tx, mut rx) = mpsc::channel::<Option<Vec<u8>>>(16);
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
                    loop {
                        // Read straight into the message: no copy.
                        let mut msg = Vec::with_capacity(CHUNK + 1);
                        msg.push(ch);
                        match r.read_buf(&mut msg).await {
                            Ok(0) | Err(_) => {
                                let _ = tx.send(None).await;
                                return;
                            }
                            Ok(_) => {
                                if tx.send(Some(msg)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            Err(e) => {
                writers.push(None);
                // As the runtime words it.
                let msg = format!(
                    "error forwarding port {port} to pod {ip}: failed to connect to localhost:{port} inside namespace: {e}"
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
    // A close from the client is answered with a close, as x/net/websocket
    // does when the kubelet's handler returns.
    let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel::<()>();
    let down = async move {
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = &mut closed_rx => {
                    let _ = sink.close().await;
                    return Ok(());
                }
            };
            let Some(msg) = msg else {
                open_readers -= 1;
                if open_readers == 0 {
                    break;
                }
                continue;
            };
            activity.data();
            sink.send(Message::binary(msg)).await?;
        }
        // Every pod connection is done: end the stream (the up side drains
        // until the client acknowledges the close).
        sink.send(Message::Close(None)).await?;
        // Keep the sink alive until the up side ends.
        std::future::pending::<()>().await;
        Ok::<(), tokio_tungstenite::tungstenite::Error>(())
    };
    let up = async move {
        loop {
            match stream.next().await {
                Some(Ok(Message::Binary(b))) => {
                    // wsstream resets the idle timer for every message, an
                    // empty one included (a keepalive); pings do not.
                    activity.data();
                    let Some((&ch, payload)) = b.split_first() else {
                        continue;
                    };
                    if ch == CLOSE_SIGNAL && close_signal {
                        // Half-close: the client will send no more on that channel.
                        if let Some(Some(w)) = payload
                            .first()
                            .and_then(|c| writers.get_mut(*c as usize / 2))
                        {
                            let _ = w.shutdown().await;
                        }
                        continue;
                    }
                    if ch % 2 == 0 {
                        if let Some(Some(w)) = writers.get_mut(ch as usize / 2) {
                            if w.write_all(payload).await.is_err() {
                                writers[ch as usize / 2] = None;
                            }
                        }
                    }
                }
                Some(Ok(Message::Text(_))) => activity.data(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => activity.control(),
                Some(Ok(Message::Close(_))) => {
                    let _ = closed_tx.send(());
                    // Let the close reply go out (the down side ends the stream).
                    return std::future::pending().await;
                }
                None | Some(Err(_)) => return Ok(()),
                Some(Ok(Message::Frame(_))) => {}
            }
        }
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}
