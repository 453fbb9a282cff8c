//! A SPDY client session over one upgraded connection: streams opened by
//! us (odd ids), frames written by one writer task (small frames batched,
//! data written without copying the payload) and read by one reader task
//! that hands each stream its events. The server's PINGs are answered; our
//! own PINGs (every `keepalive`) reset the peer's idle timer, which
//! spdystream resets on every frame read or written.
//!
//! As in spdystream there is no flow control: a stream whose consumer does
//! not keep up holds up the reader, and so the session's other streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::frame::{self, Decoder, Encoder, Frame, Headers, FLAG_FIN};
use crate::forward::recycle::Recycler;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("the SPDY connection is closed: {0}")]
    Closed(String),
    #[error("the server is closing the SPDY connection (GOAWAY)")]
    GoingAway,
    #[error("no stream ids left on this SPDY connection")]
    Exhausted,
}

/// What happens on one stream, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// The server accepted the stream (SYN_REPLY).
    Reply,
    Data(Bytes),
    /// The server will send no more on this stream.
    Fin,
    /// The server reset the stream (RST_STREAM status).
    Reset(u32),
}

enum Out {
    Frame(Frame),
    /// A data frame whose payload is written as is. Its slot is freed
    /// (dropped) once the payload is written.
    Data {
        stream_id: u32,
        flags: u8,
        payload: Bytes,
        slot: OwnedSemaphorePermit,
    },
}

type StreamMap = Arc<Mutex<HashMap<u32, mpsc::Sender<StreamEvent>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Inner {
    out: mpsc::Sender<Out>,
    streams: StreamMap,
    next_id: AtomicU32,
    /// Why the session ended (None while it is up).
    closed: watch::Receiver<Option<String>>,
    going_away: Arc<AtomicBool>,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer says GOAWAY and shuts the connection down once the
        // channel closes (with `out`, dropped here); stop reading.
        self.reader.abort();
    }
}

/// A SPDY session; cheap to clone. Ends when the last clone and the last
/// stream are dropped, or when the connection fails.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

/// Frames queued for the writer: enough to batch, small enough to push
/// back on a fast local sender.
const OUT_QUEUE: usize = 64;
/// Events queued per stream before the reader waits for its consumer.
const STREAM_QUEUE: usize = 32;
/// Data messages of one stream queued and not yet written: a sender that
/// reads ahead of the connection waits for the writer instead of filling
/// the queue (and holding its read buffers there).
const UNWRITTEN_PER_STREAM: usize = 2;
/// Small frames are copied into the write buffer; larger payloads are
/// written straight from their own buffer.
const COPY_LIMIT: usize = 16 * 1024;

/// The session's read buffers: their size, how many wait for their frames
/// to be written out before one is reused (what a session keeps beyond its
/// current buffer), and the least room a read is given.
const RECV_BUF: usize = 512 * 1024;
const RECV_BUFS_KEPT: usize = 16;
const MIN_READ: usize = 64 * 1024;

impl Session {
    /// Runs a client session on `io` (an upgraded connection), sending a
    /// PING every `keepalive`.
    pub fn client<IO>(io: IO, keepalive: Duration) -> Session
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let streams: StreamMap = Arc::default();
        let (closed_tx, closed) = watch::channel(None);
        let closed_tx = Arc::new(closed_tx);
        let going_away = Arc::new(AtomicBool::new(false));
        tokio::spawn(write_loop(w, out_rx, keepalive, closed_tx.clone()));
        let reader = tokio::spawn(read_loop(
            r,
            streams.clone(),
            out_tx.downgrade(),
            closed_tx,
            going_away.clone(),
        ));
        Session {
            inner: Arc::new(Inner {
                out: out_tx,
                streams,
                next_id: AtomicU32::new(1),
                closed,
                going_away,
                reader,
            }),
        }
    }

    /// Why the session ended, if it has.
    pub fn closed(&self) -> Option<String> {
        self.inner.closed.borrow().clone()
    }

    /// Whether new streams can be opened.
    pub fn is_usable(&self) -> bool {
        self.closed().is_none()
            && !self.inner.going_away.load(Ordering::Relaxed)
            && self.inner.next_id.load(Ordering::Relaxed) < 0x7fff_0000
    }

    /// Streams open right now.
    pub fn open_streams(&self) -> usize {
        lock(&self.inner.streams).len()
    }

    fn error(&self) -> SessionError {
        match self.closed() {
            Some(why) => SessionError::Closed(why),
            None => SessionError::GoingAway,
        }
    }

    async fn send(&self, out: Out) -> Result<(), SessionError> {
        self.inner.out.send(out).await.map_err(|_| self.error())
    }

    /// Opens a stream (SYN_STREAM with `headers`); does not wait for the reply.
    pub async fn open(&self, headers: Headers) -> Result<Stream, SessionError> {
        if let Some(why) = self.closed() {
            return Err(SessionError::Closed(why));
        }
        if self.inner.going_away.load(Ordering::Relaxed) {
            return Err(SessionError::GoingAway);
        }
        let id = self.inner.next_id.fetch_add(2, Ordering::Relaxed);
        if id >= 0x7fff_ffff {
            return Err(SessionError::Exhausted);
        }
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        lock(&self.inner.streams).insert(id, tx);
        let stream = Stream {
            id,
            events: rx,
            session: self.clone(),
            unwritten: Arc::new(Semaphore::new(UNWRITTEN_PER_STREAM)),
        };
        self.send(Out::Frame(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers,
        }))
        .await?;
        Ok(stream)
    }
}

/// One stream of a session: its events. Dropping it forgets the stream
/// (its late frames are ignored); [`StreamSender::reset`] also tells the server.
pub struct Stream {
    pub id: u32,
    events: mpsc::Receiver<StreamEvent>,
    session: Session,
    unwritten: Arc<Semaphore>,
}

impl Stream {
    /// The next event; None when the session ended.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        self.events.recv().await
    }

    /// The next event if one is queued already.
    pub fn try_next(&mut self) -> Option<StreamEvent> {
        self.events.try_recv().ok()
    }

    /// Sends on this stream (usable while events are awaited).
    pub fn sender(&self) -> StreamSender {
        StreamSender {
            id: self.id,
            session: self.session.clone(),
            unwritten: self.unwritten.clone(),
        }
    }

    pub fn session(&self) -> &Session {
        &self.session
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        lock(&self.session.inner.streams).remove(&self.id);
    }
}

/// The sending side of a stream.
#[derive(Clone)]
pub struct StreamSender {
    pub id: u32,
    session: Session,
    unwritten: Arc<Semaphore>,
}

/// A place in the write queue for one data message of a stream.
pub struct Slot<'a> {
    sender: &'a StreamSender,
    permit: OwnedSemaphorePermit,
}

impl Slot<'_> {
    /// Sends `data` (empty with `fin`: just the end of our side).
    pub async fn send(self, data: Bytes, fin: bool) -> Result<(), SessionError> {
        self.sender
            .session
            .send(Out::Data {
                stream_id: self.sender.id,
                flags: if fin { FLAG_FIN } else { 0 },
                payload: data,
                slot: self.permit,
            })
            .await
    }
}

impl StreamSender {
    /// Waits until the stream has fewer than [`UNWRITTEN_PER_STREAM`] data
    /// messages unwritten. Taken before reading what is to be sent, so
    /// that a read buffer is not filled while the writer still holds it.
    pub async fn slot(&self) -> Result<Slot<'_>, SessionError> {
        let permit = self
            .unwritten
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.session.error())?;
        Ok(Slot {
            sender: self,
            permit,
        })
    }

    /// Sends `data` (empty with `fin`: just the end of our side).
    pub async fn send(&self, data: Bytes, fin: bool) -> Result<(), SessionError> {
        self.slot().await?.send(data, fin).await
    }

    /// Ends the stream both ways (RST_STREAM CANCEL).
    pub async fn reset(&self) {
        let _ = self
            .session
            .send(Out::Frame(Frame::RstStream {
                stream_id: self.id,
                status: frame::RST_CANCEL,
            }))
            .await;
        lock(&self.session.inner.streams).remove(&self.id);
    }
}

async fn write_loop<W: AsyncWrite>(
    w: W,
    mut rx: mpsc::Receiver<Out>,
    keepalive: Duration,
    closed: Arc<watch::Sender<Option<String>>>,
) {
    tokio::pin!(w);
    let mut enc = Encoder::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_id: u32 = 1;
    let result: std::io::Result<()> = async {
        loop {
            let first = tokio::select! {
                o = rx.recv() => match o {
                    Some(o) => o,
                    // Every handle is gone: say goodbye and close.
                    None => {
                        enc.encode(&Frame::GoAway { last_good_stream_id: 0, status: 0 }, &mut buf);
                        w.write_all_buf(&mut buf).await?;
                        w.shutdown().await?;
                        return Ok(());
                    }
                },
                _ = ping.tick() => {
                    let id = ping_id;
                    ping_id = ping_id.wrapping_add(2) | 1;
                    Out::Frame(Frame::Ping(id))
                }
            };
            let mut next = Some(first);
            // Batch whatever else is already queued, then write.
            while let Some(out) = next.take() {
                match out {
                    Out::Frame(f) => enc.encode(&f, &mut buf),
                    Out::Data {
                        stream_id,
                        flags,
                        payload,
                        slot: _written,
                    } => {
                        let header = frame::data_header(stream_id, flags, payload.len());
                        buf.extend_from_slice(&header);
                        if payload.len() <= COPY_LIMIT {
                            buf.extend_from_slice(&payload);
                        } else {
                            // What is buffered, then the payload from its own
                            // buffer: one vectored write, no copy.
                            let mut both = buf.split().freeze().chain(payload);
                            w.write_all_buf(&mut both).await?;
                        }
                    }
                }
                if buf.len() < 256 * 1024 {
                    next = rx.try_recv().ok();
                }
            }
            w.write_all_buf(&mut buf).await?;
            w.flush().await?;
        }
    }
    .await;
    if let Err(e) = result {
        closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(format!("write: {e}"));
                true
            } else {
                false
            }
        });
    }
}

async fn read_loop<R: AsyncRead>(
    r: R,
    streams: StreamMap,
    out: mpsc::WeakSender<Out>,
    closed: Arc<watch::Sender<Option<String>>>,
    going_away: Arc<AtomicBool>,
) {
    tokio::pin!(r);
    let mut dec = Decoder::new();
    // Frames are cut from the read buffers and queued to their streams; a
    // buffer is reused once its frames are written out.
    let mut bufs = Recycler::new(RECV_BUF, RECV_BUFS_KEPT);
    let why: String = loop {
        let frame = match dec.decode(bufs.buf()) {
            Ok(Some(f)) => f,
            Ok(None) => {
                // Room for the rest of the frame at the front, and more.
                let need = frame::missing(bufs.buf()).max(MIN_READ);
                let buf = bufs.room(need);
                match r.read_buf(buf).await {
                    Ok(0) => break "the server closed the connection".into(),
                    Ok(_) => continue,
                    Err(e) => break format!("read: {e}"),
                }
            }
            Err(e) => break format!("protocol error: {e}"),
        };
        let to_stream = |id: u32| lock(&streams).get(&id).cloned();
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if let Some(tx) = to_stream(stream_id) {
                    if !data.is_empty() {
                        let _ = tx.send(StreamEvent::Data(data)).await;
                    }
                    if flags & FLAG_FIN != 0 {
                        let _ = tx.send(StreamEvent::Fin).await;
                    }
                }
            }
            Frame::SynReply {
                stream_id, flags, ..
            } => {
                if let Some(tx) = to_stream(stream_id) {
                    let _ = tx.send(StreamEvent::Reply).await;
                    if flags & FLAG_FIN != 0 {
                        let _ = tx.send(StreamEvent::Fin).await;
                    }
                }
            }
            Frame::Headers {
                stream_id, flags, ..
            } => {
                if flags & FLAG_FIN != 0 {
                    if let Some(tx) = to_stream(stream_id) {
                        let _ = tx.send(StreamEvent::Fin).await;
                    }
                }
            }
            Frame::RstStream { stream_id, status } => {
                let tx = lock(&streams).remove(&stream_id);
                if let Some(tx) = tx {
                    let _ = tx.send(StreamEvent::Reset(status)).await;
                }
            }
            Frame::Ping(id) => {
                // Ours are odd; the server's (even) are echoed.
                if id % 2 == 0 {
                    if let Some(out) = out.upgrade() {
                        let _ = out.send(Out::Frame(Frame::Ping(id))).await;
                    }
                }
            }
            Frame::GoAway { .. } => going_away.store(true, Ordering::Relaxed),
            Frame::SynStream { stream_id, .. } => {
                // Port-forward servers open no streams.
                if let Some(out) = out.upgrade() {
                    let _ = out
                        .send(Out::Frame(Frame::RstStream {
                            stream_id,
                            status: frame::RST_REFUSED_STREAM,
                        }))
                        .await;
                }
            }
            Frame::Settings(_) | Frame::WindowUpdate { .. } => {}
        }
    };
    closed.send_if_modified(|c| {
        if c.is_none() {
            *c = Some(why);
            true
        } else {
            false
        }
    });
    // Every stream learns the end from its closed channel.
    lock(&streams).clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server on the other end of a duplex pipe.
    async fn server_side() -> (Session, tokio::io::DuplexStream) {
        let (client, server) = tokio::io::duplex(1 << 20);
        (Session::client(client, Duration::from_secs(3600)), server)
    }

    async fn read_frame(
        io: &mut tokio::io::DuplexStream,
        dec: &mut Decoder,
        buf: &mut BytesMut,
    ) -> Frame {
        loop {
            if let Some(f) = dec.decode(buf).unwrap() {
                return f;
            }
            assert_ne!(io.read_buf(buf).await.unwrap(), 0, "EOF");
        }
    }

    async fn write_frame(io: &mut tokio::io::DuplexStream, enc: &mut Encoder, f: Frame) {
        let mut b = BytesMut::new();
        enc.encode(&f, &mut b);
        io.write_all(&b).await.unwrap();
    }

    #[tokio::test]
    async fn streams_are_multiplexed_and_pings_answered() {
        let (session, mut server) = server_side().await;
        let (mut dec, mut enc, mut buf) = (Decoder::new(), Encoder::new(), BytesMut::new());
        let mut a = session
            .open(vec![("streamtype".into(), "data".into())])
            .await
            .unwrap();
        let mut b = session
            .open(vec![("streamtype".into(), "error".into())])
            .await
            .unwrap();
        assert_eq!((a.id, b.id), (1, 3));
        for id in [1, 3] {
            let Frame::SynStream {
                stream_id, headers, ..
            } = read_frame(&mut server, &mut dec, &mut buf).await
            else {
                panic!()
            };
            assert_eq!(stream_id, id);
            assert_eq!(headers.len(), 1);
        }
        for id in [3, 1] {
            write_frame(
                &mut server,
                &mut enc,
                Frame::SynReply {
                    stream_id: id,
                    flags: 0,
                    headers: vec![],
                },
            )
            .await;
        }
        assert_eq!(a.next().await, Some(StreamEvent::Reply));
        assert_eq!(b.next().await, Some(StreamEvent::Reply));
        a.sender()
            .send(Bytes::from(vec![7u8; 100_000]), false)
            .await
            .unwrap();
        b.sender().send(Bytes::new(), true).await.unwrap();
        let Frame::Data {
            stream_id: 1,
            data,
            flags: 0,
        } = read_frame(&mut server, &mut dec, &mut buf).await
        else {
            panic!()
        };
        assert_eq!(data.len(), 100_000);
        assert_eq!(
            read_frame(&mut server, &mut dec, &mut buf).await,
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::new()
            }
        );
        // Server data to a, a server PING, then a reset of b.
        write_frame(
            &mut server,
            &mut enc,
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hi"),
            },
        )
        .await;
        write_frame(&mut server, &mut enc, Frame::Ping(2)).await;
        write_frame(
            &mut server,
            &mut enc,
            Frame::RstStream {
                stream_id: 3,
                status: 5,
            },
        )
        .await;
        assert_eq!(
            a.next().await,
            Some(StreamEvent::Data(Bytes::from_static(b"hi")))
        );
        assert_eq!(a.next().await, Some(StreamEvent::Fin));
        assert_eq!(b.next().await, Some(StreamEvent::Reset(5)));
        assert_eq!(
            read_frame(&mut server, &mut dec, &mut buf).await,
            Frame::Ping(2)
        );
        assert!(session.is_usable());
        // The connection dies: every stream and the session know.
        drop(server);
        assert_eq!(a.next().await, None);
        assert!(session.closed().is_some());
        assert!(matches!(
            session.open(vec![]).await,
            Err(SessionError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn goaway_stops_new_streams_and_the_last_handle_says_goodbye() {
        let (session, mut server) = server_side().await;
        let (mut dec, mut enc, mut buf) = (Decoder::new(), Encoder::new(), BytesMut::new());
        write_frame(
            &mut server,
            &mut enc,
            Frame::GoAway {
                last_good_stream_id: 0,
                status: 0,
            },
        )
        .await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while session.is_usable() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(
            session.open(vec![]).await.err(),
            Some(SessionError::GoingAway)
        );
        drop(session);
        assert!(matches!(
            read_frame(&mut server, &mut dec, &mut buf).await,
            Frame::GoAway { .. }
        ));
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn keepalive_pings_are_sent() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let _session = Session::client(client, Duration::from_millis(20));
        let (mut dec, mut buf) = (Decoder::new(), BytesMut::new());
        assert_eq!(
            read_frame(&mut server, &mut dec, &mut buf).await,
            Frame::Ping(1)
        );
        assert_eq!(
            read_frame(&mut server, &mut dec, &mut buf).await,
            Frame::Ping(3)
        );
    }

    /// A stream's sender reads ahead of the connection by at most
    /// `UNWRITTEN_PER_STREAM` messages: the next slot waits for the writer,
    /// and is given once the server has taken the bytes.
    #[tokio::test]
    async fn a_sender_waits_while_its_stream_has_two_messages_unwritten() {
        use futures::FutureExt;
        let (client, mut server) = tokio::io::duplex(4096);
        let session = Session::client(client, Duration::from_secs(3600));
        let stream = session.open(vec![]).await.unwrap();
        let tx = stream.sender();
        for _ in 0..UNWRITTEN_PER_STREAM {
            tx.send(Bytes::from(vec![1u8; 100_000]), false)
                .await
                .unwrap();
        }
        // The server reads nothing: the writer is stuck on the first one.
        assert!(tx.slot().now_or_never().is_none());
        let (mut dec, mut buf) = (Decoder::new(), BytesMut::new());
        let mut data = 0;
        while data < 100_000 {
            if let Frame::Data { data: d, .. } = read_frame(&mut server, &mut dec, &mut buf).await {
                data += d.len();
            }
        }
        let slot = tokio::time::timeout(Duration::from_secs(10), tx.slot())
            .await
            .expect("no slot after the first message was written")
            .unwrap();
        slot.send(Bytes::from_static(b"next"), false).await.unwrap();
    }
}
