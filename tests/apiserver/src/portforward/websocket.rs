//! Port-forward over WebSocket with the channel protocol, as the kubelet's
//! `wsstream` serves it: `v4.channel.k8s.io` (or no subprotocol at all),
//! and `v5.channel.k8s.io` only as an opt-in fault. A client may half-close
//! a port under v5 by sending `[255, data channel]`: the pod connection's
//! write side is shut down and its reply still flows back. The server never
//! sends the signal itself; when every pod connection has ended it closes
//! the WebSocket.
//!
//! The frames (RFC 6455) are read and written here, the server's side
//! only, written apart from kproxy's client framing so that the two check
//! each other: a client frame is unmasked in the read buffer and its
//! payload written to the pod from there; a pod's bytes are read behind
//! room for the frame header and written as one frame, by the pod
//! connection's own task (no copy, no allocation per message).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::{header_values, kubelet_error, spawn_stream, Activity, Dialer, Faults};

const V4: &str = "v4.channel.k8s.io";
const V5: &str = "v5.channel.k8s.io";
/// v5: a message `[255, channel]` closes that channel (half-close).
const CLOSE_SIGNAL: u8 = 255;
/// Largest chunk read from a pod connection into one message: 32 KiB, as
/// a real kubelet's (the container runtime copies a pod connection to the
/// stream with Go's `io.Copy`, whose buffer is 32 KiB; each write is one
/// message).
const CHUNK: usize = 32 * 1024;

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
        forward(
            TokioIo::new(upgraded),
            ip,
            ports,
            dialer,
            activity,
            close_signal,
        )
        .await
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

// ---------------------------------------------------------------- frames
//
// RFC 6455 section 5, the server's side: client frames arrive masked and
// are unmasked in the read buffer; server frames go out unmasked, each
// written in one piece (the header in room kept in front of the payload).

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;
/// The longest header of a server frame.
const HEADROOM: usize = 10;

/// A client frame's header.
struct Head {
    fin: bool,
    opcode: u8,
    len: u64,
    key: [u8; 4],
}

/// Parses a client frame header at the start of `b` (None: not all there yet).
fn parse_head(b: &[u8]) -> Result<Option<(Head, usize)>, String> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x70 != 0 {
        return Err("reserved bits set".into());
    }
    if b[1] & 0x80 == 0 {
        return Err("unmasked client frame".into());
    }
    let opcode = b[0] & 0x0f;
    let (len, at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap()), 10),
        126 | 127 => return Ok(None),
        n => (n as u64, 2),
    };
    if b.len() < at + 4 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    if opcode & 0x8 != 0 && (!fin || len > 125) {
        return Err(format!("bad control frame (opcode {opcode:#x})"));
    }
    let key = [b[at], b[at + 1], b[at + 2], b[at + 3]];
    Ok(Some((
        Head {
            fin,
            opcode,
            len,
            key,
        },
        at + 4,
    )))
}

/// Unmasks `data`, the payload bytes from `offset` on.
fn unmask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let r = (offset % 4) as usize;
    let k = [key[r], key[(r + 1) % 4], key[(r + 2) % 4], key[(r + 3) % 4]];
    let wide = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().unwrap()) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= k[i % 4];
    }
}

/// Writes the header of a final server frame of `opcode` with a payload of
/// `len` bytes into `buf` just before `buf[HEADROOM..]`; returns where the
/// frame starts.
fn put_head(buf: &mut [u8], opcode: u8, len: usize) -> usize {
    let mut h = [0u8; HEADROOM];
    h[0] = 0x80 | opcode;
    let size = if len < 126 {
        h[1] = len as u8;
        2
    } else if len <= 0xffff {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    buf[HEADROOM - size..HEADROOM].copy_from_slice(&h[..size]);
    HEADROOM - size
}

type Writer = Arc<tokio::sync::Mutex<WriteHalf<TokioIo<Upgraded>>>>;

/// A small final server frame, written whole.
async fn send_small(w: &Writer, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut buf = vec![0u8; HEADROOM + payload.len()];
    buf[HEADROOM..].copy_from_slice(payload);
    let at = put_head(&mut buf, opcode, payload.len());
    let mut w = w.lock().await;
    w.write_all(&buf[at..]).await?;
    w.flush().await
}

/// Buffers start this small (as Go's, which grow with the traffic): a
/// stream that carries little does not zero and fault in large ones.
const START_BUF: usize = 16 * 1024;
/// The read buffer of the client's frames, at most.
const READ_BUF: usize = 256 * 1024;

/// Reads more of the client's bytes into `buf[end..]` (moving the unread
/// part to the front when the buffer is full, growing it when a read
/// filled it); false at EOF.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    start: &mut usize,
    end: &mut usize,
) -> std::io::Result<bool> {
    if *start == *end {
        (*start, *end) = (0, 0);
    } else if *end == buf.len() {
        buf.copy_within(*start..*end, 0);
        (*start, *end) = (0, *end - *start);
    }
    let room = buf.len() - *end;
    let n = r.read(&mut buf[*end..]).await?;
    *end += n;
    if n == room && buf.len() < READ_BUF {
        buf.resize((buf.len() * 4).min(READ_BUF), 0);
    }
    Ok(n > 0)
}

/// The binary message being read from the client.
#[derive(Default)]
struct Incoming {
    /// Its channel (its first byte), once read.
    channel: Option<u8>,
    /// Of a v5 close signal: the channel it closes, once read.
    closes: Option<u8>,
    text: bool,
}

async fn forward(
    io: TokioIo<Upgraded>,
    ip: IpAddr,
    ports: Vec<u16>,
    dialer: Dialer,
    activity: Arc<Activity>,
    close_signal: bool,
) -> Result<(), String> {
    let (mut rd, wr) = tokio::io::split(io);
    let writer: Writer = Arc::new(tokio::sync::Mutex::new(wr));
    let io_err = |e: std::io::Error| e.to_string();
    for (i, port) in ports.iter().enumerate() {
        let p = port.to_le_bytes();
        send_small(&writer, OP_BINARY, &[2 * i as u8, p[0], p[1]])
            .await
            .map_err(io_err)?;
        send_small(&writer, OP_BINARY, &[2 * i as u8 + 1, p[0], p[1]])
            .await
            .map_err(io_err)?;
    }
    // Each pod connection's reader writes its messages itself (channel
    // byte first, read straight behind the frame header) and says when it
    // is done; the set ends them with this stream.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(ports.len().max(1));
    let mut readers = JoinSet::new();
    let mut writers: Vec<Option<OwnedWriteHalf>> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let ch = 2 * i as u8;
        match dialer(SocketAddr::new(ip, *port)).await {
            Ok(conn) => {
                let (mut r, w) = conn.into_split();
                writers.push(Some(w));
                let (writer, activity, done) = (writer.clone(), activity.clone(), done_tx.clone());
                readers.spawn(async move {
                    let mut buf = vec![0u8; HEADROOM + 1 + START_BUF];
                    loop {
                        let n = match r.read(&mut buf[HEADROOM + 1..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let room = buf.len() - HEADROOM - 1;
                        let grow = n == room && room < CHUNK;
                        buf[HEADROOM] = ch;
                        let at = put_head(&mut buf, OP_BINARY, n + 1);
                        activity.data();
                        let mut w = writer.lock().await;
                        if w.write_all(&buf[at..HEADROOM + 1 + n]).await.is_err()
                            || w.flush().await.is_err()
                        {
                            break;
                        }
                        drop(w);
                        if grow {
                            buf.resize(HEADROOM + 1 + (room * 4).min(CHUNK), 0);
                        }
                    }
                    let _ = done.send(()).await;
                });
            }
            Err(e) => {
                writers.push(None);
                // As the runtime words it.
                let msg = format!(
                    "error forwarding port {port} to pod {ip}: failed to connect to localhost:{port} inside namespace: {e}"
                );
                let mut m = vec![ch + 1];
                m.extend_from_slice(msg.as_bytes());
                send_small(&writer, OP_BINARY, &m).await.map_err(io_err)?;
            }
        }
    }
    drop(done_tx);
    let mut open_readers = readers.len();
    if open_readers == 0 {
        let _ = send_small(&writer, OP_CLOSE, &[]).await;
        return Ok(());
    }
    // When every pod connection is done the stream is closed (a close
    // frame); the client's bytes are still read until it answers. A close
    // from the client is answered with a close, as x/net/websocket does
    // when the kubelet's handler returns.
    let close_sent = AtomicBool::new(false);
    let down = async {
        while open_readers > 0 {
            if done_rx.recv().await.is_none() {
                break;
            }
            open_readers -= 1;
        }
        close_sent.store(true, Ordering::Relaxed);
        let _ = send_small(&writer, OP_CLOSE, &[]).await;
        std::future::pending::<Result<(), String>>().await
    };
    let up = async {
        let mut buf = vec![0u8; START_BUF];
        let (mut start, mut end) = (0, 0);
        let mut message: Option<Incoming> = None;
        loop {
            let (head, size) = match parse_head(&buf[start..end])? {
                Some(h) => h,
                None => {
                    if !fill(&mut rd, &mut buf, &mut start, &mut end)
                        .await
                        .map_err(io_err)?
                    {
                        return Ok(());
                    }
                    continue;
                }
            };
            start += size;
            if head.opcode & 0x8 != 0 {
                let len = head.len as usize;
                while end - start < len {
                    if !fill(&mut rd, &mut buf, &mut start, &mut end)
                        .await
                        .map_err(io_err)?
                    {
                        return Ok(());
                    }
                }
                let payload = &mut buf[start..start + len];
                start += len;
                unmask(payload, head.key, 0);
                match head.opcode {
                    OP_PING => {
                        activity.control();
                        send_small(&writer, OP_PONG, payload)
                            .await
                            .map_err(io_err)?;
                    }
                    OP_PONG => activity.control(),
                    OP_CLOSE => {
                        // Answered, unless it answers ours.
                        if !close_sent.load(Ordering::Relaxed) {
                            let _ = send_small(&writer, OP_CLOSE, &[]).await;
                        }
                        return Ok(());
                    }
                    op => return Err(format!("unknown opcode {op:#x}")),
                }
                continue;
            }
            let mut msg = match (head.opcode, message.take()) {
                (OP_CONTINUATION, Some(m)) => m,
                (OP_BINARY, None) => Incoming::default(),
                (OP_TEXT, None) => Incoming {
                    text: true,
                    ..Default::default()
                },
                (op, _) => return Err(format!("unexpected opcode {op:#x}")),
            };
            let (mut remaining, mut offset) = (head.len, 0u64);
            while remaining > 0 {
                if start == end
                    && !fill(&mut rd, &mut buf, &mut start, &mut end)
                        .await
                        .map_err(io_err)?
                {
                    return Ok(());
                }
                let take = remaining.min((end - start) as u64) as usize;
                let piece = &mut buf[start..start + take];
                start += take;
                unmask(piece, head.key, offset);
                offset += take as u64;
                remaining -= take as u64;
                if msg.text {
                    continue;
                }
                let mut piece = &piece[..];
                let ch = match msg.channel {
                    Some(ch) => ch,
                    None => {
                        let ch = piece[0];
                        msg.channel = Some(ch);
                        piece = &piece[1..];
                        ch
                    }
                };
                if ch == CLOSE_SIGNAL && close_signal {
                    if msg.closes.is_none() {
                        msg.closes = piece.first().copied();
                    }
                } else if ch % 2 == 0 && !piece.is_empty() {
                    if let Some(Some(w)) = writers.get_mut(ch as usize / 2) {
                        if w.write_all(piece).await.is_err() {
                            writers[ch as usize / 2] = None;
                        }
                    }
                }
            }
            if !head.fin {
                message = Some(msg);
                continue;
            }
            // wsstream resets the idle timer for every message, an empty
            // one included (a keepalive); pings do not.
            activity.data();
            if let Some(c) = msg.closes {
                // Half-close: the client will send no more on that channel.
                if let Some(Some(w)) = writers.get_mut(c as usize / 2) {
                    let _ = w.shutdown().await;
                }
            }
        }
    };
    let result = tokio::select! {
        r = up => r,
        r = down => r,
    };
    drop(readers);
    result
}
