//! One forwarded connection over a WebSocket port-forward stream of its
//! own (channel protocol, one port: index 0), framed by [`wsframe`] with
//! as little copying as the protocol allows: client → pod, the local
//! socket is read straight into a frame buffer behind room for the header
//! (and the channel byte), the payload is masked in place and the frame
//! written in one piece; pod → client, the server's frames are parsed in
//! the read buffer and their payloads written to the local socket from
//! there (a frame is never collected), those of every message a read
//! brought in one vectored write: a real kubelet's messages are at most
//! 32 KiB (the runtime's `io.Copy`), and a write each cost a TCP push.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{write_all_vectored, TunnelError, TunnelOpts, CHUNK};
use crate::forward::channel::{self, Demux, Event};
use crate::forward::wsframe::{self, MAX_HEADER};
use crate::forward::Stats;

/// The read buffer for the server's frames, at most.
const READ_BUF: usize = 256 * 1024;

/// What the buffers start with: a connection that carries little (most
/// do) never pays for zeroing and faulting in the large ones; one whose
/// reads fill them grows them.
const START_BUF: usize = 16 * 1024;

/// The next size of a buffer of `len` bytes whose last read filled it, up
/// to `max`.
fn grown(len: usize, max: usize) -> usize {
    (len * 4).min(max)
}

fn stream_error(e: std::io::Error) -> TunnelError {
    TunnelError::Stream(e.to_string())
}

/// Reads more of the server's bytes into `buf[end..]` (moving the unread
/// `buf[start..end]` to the front first when the buffer is full, and
/// growing it when a read filled all the room there was); false at EOF.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    start: &mut usize,
    end: &mut usize,
) -> Result<bool, TunnelError> {
    if *start == *end {
        (*start, *end) = (0, 0);
    } else if *end == buf.len() {
        buf.copy_within(*start..*end, 0);
        (*start, *end) = (0, *end - *start);
    }
    let room = buf.len() - *end;
    let n = r.read(&mut buf[*end..]).await.map_err(stream_error)?;
    *end += n;
    if n == room && buf.len() < READ_BUF {
        buf.resize(grown(buf.len(), READ_BUF), 0);
    }
    Ok(n > 0)
}

/// Payload bytes of the read buffer not yet written to the local socket:
/// (offset, length) ranges, in order.
#[derive(Default)]
struct Unwritten(Vec<(usize, usize)>);

impl Unwritten {
    /// `data`, a slice of `buf`, is to be written.
    fn push(&mut self, buf: &[u8], data: &[u8]) {
        let at = data.as_ptr() as usize - buf.as_ptr() as usize;
        match self.0.last_mut() {
            Some((o, l)) if *o + *l == at => *l += data.len(),
            _ => self.0.push((at, data.len())),
        }
    }

    /// Writes what is pending (in one vectored write when the socket takes
    /// it) and tells `written` how many bytes.
    async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        buf: &[u8],
        written: impl Fn(usize),
    ) -> Result<(), TunnelError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut slices: Vec<IoSlice<'_>> = self
            .0
            .iter()
            .map(|&(o, l)| IoSlice::new(&buf[o..o + l]))
            .collect();
        self.0.clear();
        let n = write_all_vectored(w, &mut slices)
            .await
            .map_err(TunnelError::Local)?;
        written(n);
        Ok(())
    }
}

fn ended_mid_frame() -> TunnelError {
    TunnelError::Stream("the connection ended in the middle of a WebSocket frame".into())
}

/// Splices `local` and the upgraded connection `ws` until both directions
/// are done (or one fails).
pub async fn run<L, S>(
    local: L,
    ws: S,
    v5: bool,
    port: u16,
    opts: TunnelOpts,
    stats: &Stats,
) -> Result<(), TunnelError>
where
    L: AsyncRead + AsyncWrite,
    S: AsyncRead + AsyncWrite,
{
    let (mut lr, mut lw) = tokio::io::split(local);
    let (mut ar, mut aw) = tokio::io::split(ws);
    let mut demux = Demux::new(0, port);
    let ch = demux.data_channel();
    // When the pod last sent data (ms since `base`): after a v4 half-close
    // the connection is closed only once the pod has been quiet for the
    // half-close timeout, so a reply still streaming is never cut short.
    let base = Instant::now();
    let last_down = AtomicU64::new(0);
    // Pongs for the server's pings, written by the up side.
    let (pong_tx, mut pong_rx) = mpsc::channel::<Vec<u8>>(4);

    // Pod → client.
    let down = async {
        let mut buf = vec![0u8; START_BUF];
        let (mut start, mut end) = (0, 0);
        // Inside a fragmented data message (RFC 6455 section 5.4).
        let mut in_message = false;
        let mut unwritten = Unwritten::default();
        // Writes the data parsed so far, before the buffer is refilled (or
        // the local side is shut).
        let written = |n: usize| {
            stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            last_down.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
        };
        macro_rules! write_out {
            () => {
                if let Err(e) = unwritten.write(&mut lw, &buf, written).await {
                    return finish(&mut lw, Err(e)).await;
                }
            };
        }
        let result = loop {
            let (header, size) = match wsframe::parse_header(&buf[start..end]) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    write_out!();
                    let filled = fill(&mut ar, &mut buf, &mut start, &mut end).await;
                    match filled {
                        Ok(true) => continue,
                        // The stream ended without a close frame.
                        Ok(false) if start == end => {
                            break Err(TunnelError::Stream(
                                "the connection ended without a WebSocket close".into(),
                            ))
                        }
                        Ok(false) => break Err(ended_mid_frame()),
                        Err(e) => break Err(e),
                    }
                }
                Err(e) => break Err(e.into()),
            };
            start += size;
            let len = header.len as usize;
            if header.is_control() {
                while end - start < len {
                    write_out!();
                    match fill(&mut ar, &mut buf, &mut start, &mut end).await {
                        Ok(true) => {}
                        Ok(false) => return finish(&mut lw, Err(ended_mid_frame())).await,
                        Err(e) => return finish(&mut lw, Err(e)).await,
                    }
                }
                let payload = &buf[start..start + len];
                start += len;
                match header.opcode {
                    wsframe::OP_PING => {
                        let pong = wsframe::small_client_frame(
                            wsframe::OP_PONG,
                            payload,
                            wsframe::mask_key(),
                        );
                        // A pong may be skipped when pings pile up.
                        let _ = pong_tx.try_send(pong);
                    }
                    wsframe::OP_CLOSE => break Ok(()),
                    _ => {}
                }
                continue;
            }
            // Binary messages carry the channels; text ones are not used
            // by port-forward and are skipped.
            let text = match (header.opcode, in_message) {
                (wsframe::OP_CONTINUATION, true) => false,
                (wsframe::OP_BINARY, false) => {
                    demux.start_message();
                    false
                }
                (wsframe::OP_TEXT, false) => true,
                _ => {
                    break Err(TunnelError::Stream(format!(
                        "unexpected WebSocket opcode {:#x} {} a fragmented message",
                        header.opcode,
                        if in_message { "inside" } else { "outside" }
                    )))
                }
            };
            in_message = !header.fin;
            let mut remaining = header.len;
            let mut failed = None;
            while remaining > 0 {
                if start == end {
                    write_out!();
                    match fill(&mut ar, &mut buf, &mut start, &mut end).await {
                        Ok(true) => {}
                        Ok(false) => return finish(&mut lw, Err(ended_mid_frame())).await,
                        Err(e) => return finish(&mut lw, Err(e)).await,
                    }
                }
                let take = remaining.min((end - start) as u64) as usize;
                let piece = &buf[start..start + take];
                start += take;
                remaining -= take as u64;
                if text {
                    continue;
                }
                match demux.on_piece(piece) {
                    Ok(Event::Data(d)) => unwritten.push(&buf, d),
                    Ok(Event::DataClosed) => {
                        write_out!();
                        let _ = lw.shutdown().await;
                    }
                    // Error text is reported at the message's end.
                    Ok(Event::Nothing | Event::Error(_)) => {}
                    Err(e) => {
                        failed = Some(e.into());
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
            if header.fin && !text {
                match demux.end_message() {
                    Ok(Event::Error(e)) => break Err(TunnelError::Remote(e)),
                    Ok(_) => {}
                    Err(e) => break Err(e.into()),
                }
            }
        };
        // What the server sent before it closed (or failed) still reaches
        // the client.
        let result = match (unwritten.write(&mut lw, &buf, written).await, result) {
            (Err(e), Ok(())) => Err(e),
            (_, r) => r,
        };
        finish(&mut lw, result).await
    };

    // Client → pod, plus keepalives and pongs.
    let up = async {
        let mut keepalive = tokio::time::interval_at(
            Instant::now() + opts.keepalive_interval,
            opts.keepalive_interval,
        );
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut eof = false;
        let mut deadline: Option<Instant> = None;
        // Room for the header and the channel byte, then the payload.
        let mut frame = vec![0u8; MAX_HEADER + 1 + START_BUF];
        let result = loop {
            tokio::select! {
                r = lr.read(&mut frame[MAX_HEADER + 1..]), if !eof => match r {
                    Ok(0) => {
                        eof = true;
                        if v5 {
                            let signal = wsframe::small_client_frame(
                                wsframe::OP_BINARY,
                                &channel::close_signal(ch),
                                wsframe::mask_key(),
                            );
                            if let Err(e) = send(&mut aw, &signal).await {
                                break Err(e);
                            }
                        } else {
                            // v4 cannot tell the pod: keep reading the reply
                            // until the pod closes, at most this long.
                            deadline = Some(Instant::now() + opts.half_close_timeout);
                        }
                    }
                    Ok(n) => {
                        frame[MAX_HEADER] = ch;
                        let at = wsframe::client_frame(
                            &mut frame,
                            wsframe::OP_BINARY,
                            n + 1,
                            wsframe::mask_key(),
                        );
                        if let Err(e) = send(&mut aw, &frame[at..MAX_HEADER + 1 + n]).await {
                            break Err(e);
                        }
                        stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        let room = frame.len() - MAX_HEADER - 1;
                        if n == room && room < CHUNK {
                            frame.resize(MAX_HEADER + 1 + grown(room, CHUNK), 0);
                        }
                    }
                    Err(e) => break Err(TunnelError::Local(e)),
                },
                Some(pong) = pong_rx.recv() => {
                    if let Err(e) = send(&mut aw, &pong).await {
                        break Err(e);
                    }
                }
                _ = keepalive.tick() => {
                    // An empty data message: wsstream skips it after
                    // resetting its idle timer.
                    let empty = wsframe::small_client_frame(wsframe::OP_BINARY, &[], wsframe::mask_key());
                    if let Err(e) = send(&mut aw, &empty).await {
                        break Err(e);
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let quiet_until = base
                        + Duration::from_millis(last_down.load(Ordering::Relaxed))
                        + opts.half_close_timeout;
                    if quiet_until > Instant::now() {
                        // The reply is still coming: wait on.
                        deadline = Some(quiet_until);
                        continue;
                    }
                    tracing::debug!("pod quiet for the half-close timeout after the client's EOF; closing");
                    break Ok(());
                }
            }
        };
        let close = wsframe::small_client_frame(wsframe::OP_CLOSE, &[], wsframe::mask_key());
        let _ = send(&mut aw, &close).await;
        result
    };

    tokio::pin!(down, up);
    tokio::select! {
        r = &mut down => r,
        r = &mut up => match r {
            // Closed on purpose (half-close timeout): give the reply a
            // moment; the stream ending without a close handshake is then
            // no error of the connection's.
            Ok(()) => match tokio::time::timeout(Duration::from_secs(2), down).await {
                Ok(Err(TunnelError::Stream(e))) => {
                    tracing::debug!("stream ended after our close: {e}");
                    Ok(())
                }
                Ok(r) => r,
                Err(_) => Ok(()),
            },
            Err(e) => Err(e),
        },
    }
}

/// Writes one whole frame to the server (flushed: a TLS stream holds
/// records back otherwise).
async fn send<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), TunnelError> {
    w.write_all(frame).await.map_err(stream_error)?;
    w.flush().await.map_err(stream_error)
}

/// The pod side is done: the client sees EOF.
async fn finish<W: AsyncWrite + Unpin>(
    lw: &mut W,
    result: Result<(), TunnelError>,
) -> Result<(), TunnelError> {
    let _ = lw.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
            .collect()
    }

    /// An unmasked server frame.
    fn server_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// The next whole client frame at the front of `buf` (unmasked):
    /// (opcode, payload), removed from `buf`.
    fn take_client_frame(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
        if buf.len() < 2 {
            return None;
        }
        assert_eq!(buf[0] & 0xf0, 0x80, "final, no reserved bits");
        assert_ne!(buf[1] & 0x80, 0, "a client frame is masked");
        let (len, at) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => (
                u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if buf.len() < at + 4 + len {
            return None;
        }
        let key = &buf[at..at + 4];
        let payload = (0..len).map(|i| buf[at + 4 + i] ^ key[i % 4]).collect();
        let op = buf[0] & 0x0f;
        buf.drain(..at + 4 + len);
        Some((op, payload))
    }

    #[tokio::test]
    async fn large_and_fragmented_frames_cross_byte_exact_both_ways() {
        let (local, mut client) = tokio::io::duplex(64 * 1024);
        let (ws, server) = tokio::io::duplex(64 * 1024);
        let stats = Arc::new(Stats::default());
        let opts = TunnelOpts {
            half_close_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(3600),
        };
        let tunnel = tokio::spawn({
            let stats = stats.clone();
            async move { run(local, ws, false, 8080, opts, &stats).await }
        });

        // Server → client: the port headers, a 300 KiB + 300 KiB message in
        // two fragments with a ping between them, a 70,000-byte message and
        // a 100-byte one; written in odd pieces so that headers and
        // payloads are split across reads.
        let (a, b, c, d) = (
            pattern(300 * 1024, 1),
            pattern(300 * 1024, 2),
            pattern(70_000, 3),
            pattern(100, 4),
        );
        let p = 8080u16.to_le_bytes();
        let mut wire = Vec::new();
        wire.extend(server_frame(0x82, &[0, p[0], p[1]]));
        wire.extend(server_frame(0x82, &[1, p[0], p[1]]));
        wire.extend(server_frame(0x02, &[&[0u8][..], &a].concat()));
        wire.extend(server_frame(0x89, b"are you there"));
        wire.extend(server_frame(0x80, &b));
        wire.extend(server_frame(0x82, &[&[0u8][..], &c].concat()));
        wire.extend(server_frame(0x82, &[&[0u8][..], &d].concat()));
        let down_expected = [a, b, c, d].concat();
        let up_sent = pattern(1 << 20, 5);

        let (mut sr, mut sw) = tokio::io::split(server);
        let server_writes = async {
            for piece in wire.chunks(7777) {
                sw.write_all(piece).await.unwrap();
            }
        };
        // What the server reads: data messages and the pong.
        let server_reads = async {
            let (mut buf, mut data, mut pong) = (Vec::new(), Vec::new(), None);
            let mut chunk = vec![0u8; 10_000];
            while data.len() < up_sent.len() || pong.is_none() {
                let n = sr.read(&mut chunk).await.unwrap();
                assert_ne!(n, 0, "EOF after {} bytes", data.len());
                buf.extend_from_slice(&chunk[..n]);
                while let Some((op, payload)) = take_client_frame(&mut buf) {
                    match op {
                        wsframe::OP_BINARY => {
                            assert_eq!(payload[0], 0, "the data channel");
                            data.extend_from_slice(&payload[1..]);
                        }
                        wsframe::OP_PONG => pong = Some(payload),
                        op => panic!("unexpected opcode {op}"),
                    }
                }
            }
            (data, pong)
        };
        let (mut cr, mut cw) = tokio::io::split(&mut client);
        let client_writes = async {
            for piece in up_sent.chunks(50_000) {
                cw.write_all(piece).await.unwrap();
            }
        };
        let client_reads = async {
            let mut got = vec![0u8; down_expected.len()];
            cr.read_exact(&mut got).await.unwrap();
            got
        };
        let (_, (up_got, pong), _, down_got) =
            tokio::time::timeout(Duration::from_secs(60), async {
                tokio::join!(server_writes, server_reads, client_writes, client_reads)
            })
            .await
            .expect("every byte crosses within a minute");
        assert!(down_got == down_expected, "server → client bytes differ");
        assert!(up_got == up_sent, "client → server bytes differ");
        assert_eq!(pong.as_deref(), Some(&b"are you there"[..]));

        // The server closes: the tunnel ends cleanly and the client sees EOF.
        sw.write_all(&server_frame(0x88, &1000u16.to_be_bytes()))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), tunnel)
            .await
            .expect("the tunnel ends on the server's close")
            .unwrap()
            .unwrap();
        let mut rest = Vec::new();
        cr.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            stats.bytes_out.load(Ordering::Relaxed),
            down_expected.len() as u64
        );
        assert_eq!(stats.bytes_in.load(Ordering::Relaxed), up_sent.len() as u64);
    }

    #[tokio::test]
    async fn error_channel_text_split_over_frames_fails_the_connection() {
        let (local, _client) = tokio::io::duplex(1024);
        let (ws, mut server) = tokio::io::duplex(1024);
        let opts = TunnelOpts {
            half_close_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(3600),
        };
        let p = 80u16.to_le_bytes();
        let mut wire = server_frame(0x82, &[0, p[0], p[1]]);
        wire.extend(server_frame(0x82, &[1, p[0], p[1]]));
        wire.extend(server_frame(0x02, b"\x01error forwarding port 80"));
        wire.extend(server_frame(0x80, b": connection refused\n"));
        server.write_all(&wire).await.unwrap();
        let stats = Stats::default();
        match run(local, ws, false, 80, opts, &stats).await {
            Err(TunnelError::Remote(e)) => {
                assert_eq!(e, "error forwarding port 80: connection refused")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Counts the writes to the local side (plain or vectored).
    struct CountingWrites<T> {
        inner: T,
        writes: Arc<AtomicU64>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for CountingWrites<T> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for CountingWrites<T> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// 64 messages of 32 KiB (a kubelet's size) that arrive together reach
    /// the local socket in far fewer writes than messages, byte-exact.
    #[tokio::test]
    async fn messages_that_arrive_together_are_written_together() {
        let (local, mut client) = tokio::io::duplex(4 << 20);
        let (ws, mut server) = tokio::io::duplex(4 << 20);
        let writes = Arc::new(AtomicU64::new(0));
        let local = CountingWrites {
            inner: local,
            writes: writes.clone(),
        };
        let opts = TunnelOpts {
            half_close_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(3600),
        };
        let p = 8080u16.to_le_bytes();
        let mut wire = Vec::new();
        wire.extend(server_frame(0x82, &[0, p[0], p[1]]));
        wire.extend(server_frame(0x82, &[1, p[0], p[1]]));
        let messages: Vec<Vec<u8>> = (0..64).map(|i| pattern(32 * 1024, i)).collect();
        for m in &messages {
            wire.extend(server_frame(0x82, &[&[0u8][..], m].concat()));
        }
        wire.extend(server_frame(0x88, &[]));
        // All of it is there before the tunnel reads.
        server.write_all(&wire).await.unwrap();
        let stats = Stats::default();
        let (got, result) = tokio::join!(
            async {
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                got
            },
            run(local, ws, false, 8080, opts, &stats)
        );
        result.unwrap();
        assert_eq!(got, messages.concat());
        let writes = writes.load(Ordering::Relaxed);
        assert!(writes <= 16, "{writes} local writes for 64 messages");
    }
}
