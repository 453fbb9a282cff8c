//! One forwarded connection over a WebSocket port-forward stream of its
//! own (channel protocol, one port: index 0), framed by [`wsframe`] with
//! as little copying as the protocol allows: client → pod, the local
//! socket is read straight into a frame buffer behind room for the header
//! (and the channel byte), the payload is masked in place and the frame
//! written in one piece; pod → client, the server's frames are parsed in
//! the read buffer and their payload written to the local socket from
//! there, piece by piece (a frame is never collected).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{TunnelError, TunnelOpts, CHUNK};
use crate::forward::channel::{self, Demux, Event};
use crate::forward::wsframe::{self, MAX_HEADER};
use crate::forward::Stats;

/// The read buffer for the server's frames.
const READ_BUF: usize = 256 * 1024;

fn stream_error(e: std::io::Error) -> TunnelError {
    TunnelError::Stream(e.to_string())
}

/// Reads more of the server's bytes into `buf[end..]` (moving the unread
/// `buf[start..end]` to the front first when the buffer is full); false at
/// EOF.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    start: &mut usize,
    end: &mut usize,
) -> Result<bool, TunnelError> {
    if *start == *end {
        (*start, *end) = (0, 0);
    } else if *end == buf.len() {
        buf.copy_within(*start..*end, 0);
        (*start, *end) = (0, *end - *start);
    }
    let n = r.read(&mut buf[*end..]).await.map_err(stream_error)?;
    *end += n;
    Ok(n > 0)
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
        let mut buf = vec![0u8; READ_BUF];
        let (mut start, mut end) = (0, 0);
        // Inside a fragmented data message (RFC 6455 section 5.4).
        let mut in_message = false;
        let result = loop {
            let (header, size) = match wsframe::parse_header(&buf[start..end]) {
                Ok(Some(h)) => h,
                Ok(None) => match fill(&mut ar, &mut buf, &mut start, &mut end).await {
                    Ok(true) => continue,
                    // The stream ended without a close frame.
                    Ok(false) if start == end => {
                        break Err(TunnelError::Stream(
                            "the connection ended without a WebSocket close".into(),
                        ))
                    }
                    Ok(false) => break Err(ended_mid_frame()),
                    Err(e) => break Err(e),
                },
                Err(e) => break Err(e.into()),
            };
            start += size;
            let len = header.len as usize;
            if header.is_control() {
                while end - start < len {
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
                    Ok(Event::Data(d)) => {
                        if let Err(e) = lw.write_all(d).await {
                            failed = Some(TunnelError::Local(e));
                            break;
                        }
                        stats.bytes_out.fetch_add(d.len() as u64, Ordering::Relaxed);
                        last_down.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                    Ok(Event::DataClosed) => {
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
        let mut frame = vec![0u8; MAX_HEADER + 1 + CHUNK];
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
