//! Port-forward over SPDY/3.1 (`portforward.k8s.io`), kubectl's protocol:
//! a POST upgraded to `SPDY/3.1`, then per forwarded connection an error
//! stream and a data stream (headers `streamtype`, `port`, `requestid`)
//! opened by the client. As the kubelet: both streams of a request id are
//! paired before the pod is dialled; a dial error is written on the error
//! stream; every stream is replied to at once. As containerd's runtime:
//! when one direction ends the other gets one second, then everything is
//! closed (the pod is never shut down for writing: it sees no EOF).
//! As spdystream: no flow control, and every frame resets the idle timer.
//!
//! Written apart from kproxy's client on purpose (its framing is the
//! format, read from the draft), so the two check each other.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::Response;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{header_values, kubelet_error, spawn_stream, Activity, Dialer, Faults};

pub(super) const PROTOCOL: &str = "portforward.k8s.io";
/// Largest chunk read from a pod connection into one data frame: 32 KiB, as
/// a real kubelet's (the container runtime copies a pod connection to the
/// stream with Go's `io.Copy`, whose buffer is 32 KiB; each write is one
/// data frame).
const CHUNK: usize = 32 * 1024;
/// The buffer frames are cut from (a new one when the frames cut from the
/// last are still queued).
const BATCH: usize = 1024 * 1024;
/// containerd's grace for the second direction once the first ended.
const RUNTIME_GRACE: Duration = Duration::from_secs(1);

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FIN: u8 = 1;

pub(super) fn is_spdy(req: &Request) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("SPDY/3.1"))
}

pub(super) fn serve(
    pod: String,
    ip: IpAddr,
    mut req: Request,
    dialer: Dialer,
    faults: Arc<Faults>,
) -> Response {
    // httpstream.Handshake: the client's X-Stream-Protocol-Version values.
    let offered = header_values(&req, "x-stream-protocol-version");
    if !offered.iter().any(|p| p == PROTOCOL) {
        return kubelet_error(
            StatusCode::FORBIDDEN,
            &format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports [\"{PROTOCOL}\"]"
            ),
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    spawn_stream(faults, pod, move |activity, _faults| async move {
        let upgraded = on_upgrade
            .await
            .map_err(|e| format!("upgrade failed: {e}"))?;
        session(TokioIo::new(upgraded), ip, dialer, activity).await
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "SPDY/3.1")
        .header("X-Stream-Protocol-Version", PROTOCOL)
        .body(Body::empty())
        .unwrap_or_default()
}

// ---------------------------------------------------------------- frames

enum In {
    Control { kind: u16, flags: u8, body: Bytes },
    Data { id: u32, flags: u8, data: Bytes },
}

/// Reads whole frames off the connection.
struct FrameReader<R> {
    r: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    async fn next(&mut self) -> std::io::Result<Option<In>> {
        loop {
            if self.buf.len() >= 8 {
                let len = ((self.buf[5] as usize) << 16)
                    | ((self.buf[6] as usize) << 8)
                    | self.buf[7] as usize;
                if self.buf.len() >= 8 + len {
                    let head = self.buf.split_to(8);
                    let body = self.buf.split_to(len).freeze();
                    let flags = head[4];
                    return Ok(Some(if head[0] & 0x80 != 0 {
                        In::Control {
                            kind: u16::from_be_bytes([head[2], head[3]]),
                            flags,
                            body,
                        }
                    } else {
                        In::Data {
                            id: u32::from_be_bytes([head[0], head[1], head[2], head[3]]),
                            flags,
                            data: body,
                        }
                    }));
                }
                self.buf.reserve(8 + len);
            } else {
                self.buf.reserve(64 * 1024);
            }
            if self.r.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

fn dictionary() -> Vec<u8> {
    // SPDY/3 draft §2.6.10.1: length-prefixed names, then common values.
    let words = "options head post put delete trace accept accept-charset accept-encoding \
        accept-language accept-ranges age allow authorization cache-control connection \
        content-base content-encoding content-language content-length content-location \
        content-md5 content-range content-type date etag expect expires from host if-match \
        if-modified-since if-none-match if-range if-unmodified-since last-modified location \
        max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after \
        server te trailer transfer-encoding upgrade user-agent vary via warning \
        www-authenticate method get status 200_OK version HTTP/1.1 url public set-cookie \
        keep-alive origin";
    let mut d = Vec::new();
    for w in words.split_whitespace() {
        let w = w.replace('_', " ");
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(
        b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505\
203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request\
401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented\
503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 \
Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,\
application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=\
gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    d
}

/// The header (de)compression contexts of a connection.
struct Zlib {
    inflate: Decompress,
    deflate: Compress,
    dict: Vec<u8>,
}

impl Zlib {
    fn new() -> Zlib {
        let dict = dictionary();
        let mut deflate = Compress::new(Compression::best(), true);
        deflate.set_dictionary(&dict).expect("dictionary");
        Zlib {
            inflate: Decompress::new(true),
            deflate,
            dict,
        }
    }

    fn headers(&mut self, block: &[u8]) -> Result<HashMap<String, String>, String> {
        let mut out = Vec::with_capacity(4096);
        let mut input = block;
        while !input.is_empty() {
            out.reserve(4096);
            let before = self.inflate.total_in();
            let r = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            input = &input[(self.inflate.total_in() - before) as usize..];
            if let Err(e) = r {
                if e.needs_dictionary().is_none() {
                    return Err(e.to_string());
                }
                self.inflate
                    .set_dictionary(&self.dict)
                    .map_err(|e| e.to_string())?;
            }
        }
        let mut b = &out[..];
        let u32_ = |b: &mut &[u8]| -> Result<usize, String> {
            if b.len() < 4 {
                return Err("short header block".into());
            }
            let v = b.get_u32() as usize;
            Ok(v)
        };
        let n = u32_(&mut b)?;
        let mut map = HashMap::new();
        for _ in 0..n {
            let mut pair = Vec::new();
            for _ in 0..2 {
                let len = u32_(&mut b)?;
                if b.len() < len {
                    return Err("short header block".into());
                }
                pair.push(String::from_utf8_lossy(&b[..len]).into_owned());
                b.advance(len);
            }
            map.insert(pair[0].to_ascii_lowercase(), pair.remove(1));
        }
        Ok(map)
    }

    /// An empty header block (what a SYN_REPLY of the kubelet carries).
    fn empty_block(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.deflate
            .compress_vec(&[0, 0, 0, 0], &mut out, FlushCompress::Sync)
            .expect("deflate");
        out
    }
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&[0x80, 3]);
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(body);
    f.into()
}

fn data(id: u32, flags: u8, payload: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&id.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(payload);
    f.into()
}

// ---------------------------------------------------------------- session

/// What a stream's consumer gets.
enum Ev {
    Data(Bytes),
    Fin,
    Reset,
}

struct Half {
    id: u32,
    rx: mpsc::Receiver<Ev>,
}

#[derive(Default)]
struct Pending {
    data: Option<Half>,
    error: Option<Half>,
    port: u16,
}

async fn session<IO>(
    io: IO,
    ip: IpAddr,
    dialer: Dialer,
    activity: Arc<Activity>,
) -> Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, mut w) = tokio::io::split(io);
    let mut reader = FrameReader {
        r,
        buf: BytesMut::with_capacity(256 * 1024),
    };
    // One writer; frames are already encoded (the compressor lives here,
    // on the reading side, as replies are its only header blocks).
    let (out, mut out_rx) = mpsc::channel::<Bytes>(64);
    let writer_activity = activity.clone();
    // Every task of the session lives in this set: a cut (dropping this
    // future) ends them all, the connection with them.
    let mut tasks = tokio::task::JoinSet::new();
    let writer = tasks.spawn(async move {
        while let Some(f) = out_rx.recv().await {
            writer_activity.data();
            if w.write_all(&f).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut zlib = Zlib::new();
    let streams: Arc<Mutex<HashMap<u32, mpsc::Sender<Ev>>>> = Arc::default();
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let result = loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        };
        // spdystream resets its idle timer on every frame, pings included.
        activity.data();
        match frame {
            In::Control {
                kind: SYN_STREAM,
                flags,
                body,
            } => {
                if body.len() < 10 {
                    break Err("short SYN_STREAM".into());
                }
                let id = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) & 0x7fff_ffff;
                let headers = zlib.headers(&body[10..])?;
                let mut reply = id.to_be_bytes().to_vec();
                reply.extend_from_slice(&zlib.empty_block());
                let _ = out.send(control(SYN_REPLY, 0, &reply)).await;
                let (tx, rx) = mpsc::channel(32);
                if flags & FIN != 0 {
                    let _ = tx.try_send(Ev::Fin);
                }
                streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, tx);
                let port = headers
                    .get("port")
                    .and_then(|p| p.parse::<u16>().ok())
                    .filter(|p| *p > 0);
                let (Some(kind), Some(port), Some(request)) =
                    (headers.get("streamtype"), port, headers.get("requestid"))
                else {
                    let mut rst = id.to_be_bytes().to_vec();
                    rst.extend_from_slice(&1u32.to_be_bytes());
                    let _ = out.send(control(RST_STREAM, 0, &rst)).await;
                    continue;
                };
                let p = pending.entry(request.clone()).or_default();
                p.port = port;
                let half = Some(Half { id, rx });
                match kind.as_str() {
                    "data" => p.data = half,
                    "error" => p.error = half,
                    _ => continue,
                }
                if p.data.is_some() && p.error.is_some() {
                    let p = pending.remove(request).unwrap_or_default();
                    let (Some(d), Some(e)) = (p.data, p.error) else {
                        continue;
                    };
                    tasks.spawn(forward(
                        d,
                        e,
                        SocketAddr::new(ip, p.port),
                        dialer.clone(),
                        out.clone(),
                        streams.clone(),
                    ));
                }
            }
            In::Control {
                kind: RST_STREAM,
                body,
                ..
            } if body.len() >= 8 => {
                let id = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) & 0x7fff_ffff;
                let tx = streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if let Some(tx) = tx {
                    let _ = tx.send(Ev::Reset).await;
                }
            }
            In::Control {
                kind: PING, body, ..
            } => {
                // Echo the client's (odd) pings.
                let _ = out.send(control(PING, 0, &body)).await;
            }
            In::Control { kind: GOAWAY, .. } => break Ok(()),
            In::Control { .. } => {}
            In::Data { id, flags, data } => {
                let tx = streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .cloned();
                if let Some(tx) = tx {
                    // No flow control: a slow consumer holds up the reader.
                    if !data.is_empty() {
                        let _ = tx.send(Ev::Data(data)).await;
                    }
                    if flags & FIN != 0 {
                        let _ = tx.send(Ev::Fin).await;
                    }
                }
            }
        }
    };
    drop(out);
    streams.lock().unwrap_or_else(|e| e.into_inner()).clear();
    // The forwards end with their streams; the writer when they are done.
    while let Some(done) = tasks.join_next_with_id().await {
        if matches!(done, Ok((id, ())) if id == writer.id()) {
            break;
        }
    }
    result
}

/// One forwarded connection: dial the pod, copy both ways (containerd's
/// rules), then close both streams.
async fn forward(
    mut d: Half,
    mut e: Half,
    addr: SocketAddr,
    dialer: Dialer,
    out: mpsc::Sender<Bytes>,
    streams: Arc<Mutex<HashMap<u32, mpsc::Sender<Ev>>>>,
) {
    let conn = dialer(addr).await;
    let (d_id, e_id) = (d.id, e.id);
    match conn {
        Err(err) => {
            let msg = format!(
                "error forwarding port {} to pod {}, uid : failed to connect to localhost:{} inside namespace: {err}",
                addr.port(),
                addr.ip(),
                addr.port()
            );
            let _ = out.send(data(e_id, 0, msg.as_bytes())).await;
        }
        Ok(conn) => {
            let (mut pr, mut pw) = conn.into_split();
            let to_pod = async {
                while let Some(ev) = d.rx.recv().await {
                    match ev {
                        Ev::Data(b) => {
                            if pw.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                        Ev::Fin | Ev::Reset => return,
                    }
                }
            };
            let from_pod = async {
                // Frames are cut from one buffer, each read in place
                // behind its header; the buffer's room is used again once
                // the writer has sent the frames cut from it (no
                // allocation per read).
                let mut buf = BytesMut::new();
                loop {
                    if !buf.try_reclaim(8 + CHUNK) {
                        buf = BytesMut::with_capacity(BATCH);
                    }
                    buf.put_bytes(0, 8);
                    let n = match pr.read_buf(&mut (&mut buf).limit(CHUNK)).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf[..4].copy_from_slice(&d_id.to_be_bytes());
                    buf[4] = 0;
                    buf[5..8].copy_from_slice(&(n as u32).to_be_bytes()[1..]);
                    if out.send(buf.split().freeze()).await.is_err() {
                        return;
                    }
                }
            };
            tokio::pin!(to_pod, from_pod);
            tokio::select! {
                _ = &mut to_pod => { let _ = tokio::time::timeout(RUNTIME_GRACE, from_pod).await; }
                _ = &mut from_pod => { let _ = tokio::time::timeout(RUNTIME_GRACE, to_pod).await; }
            }
        }
    }
    // The kubelet closes both streams when the runtime returns.
    let _ = out.send(data(d_id, FIN, &[])).await;
    let _ = out.send(data(e_id, FIN, &[])).await;
    let mut s = streams.lock().unwrap_or_else(|e| e.into_inner());
    s.remove(&d_id);
    s.remove(&e_id);
    drop(e.rx.try_recv());
}
