//! One forwarded connection over a WebSocket port-forward stream of its
//! own (channel protocol, one port: index 0).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{TunnelError, TunnelOpts, CHUNK};
use crate::forward::channel::{self, Demux, Event};
use crate::forward::Stats;

/// One data message (`[channel, payload..]`) read from `r`; None at EOF.
async fn read_message<R: AsyncRead + Unpin>(r: &mut R, ch: u8) -> std::io::Result<Option<Vec<u8>>> {
    let mut msg = Vec::with_capacity(CHUNK + 1);
    msg.push(ch);
    // read_buf fills the spare capacity (at most CHUNK bytes).
    let n = r.read_buf(&mut msg).await?;
    Ok((n > 0).then_some(msg))
}

/// Splices `local` and `ws` until both directions are done (or one fails).
pub async fn run<L, S>(
    local: L,
    ws: WebSocketStream<S>,
    v5: bool,
    port: u16,
    opts: TunnelOpts,
    stats: &Stats,
) -> Result<(), TunnelError>
where
    L: AsyncRead + AsyncWrite,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut lr, mut lw) = tokio::io::split(local);
    let (mut sink, mut stream) = ws.split();
    let mut demux = Demux::new(0, port);
    let ch = demux.data_channel();
    // When the pod last sent data (ms since `base`): after a v4 half-close
    // the connection is closed only once the pod has been quiet for the
    // half-close timeout, so a reply still streaming is never cut short.
    let base = Instant::now();
    let last_down = AtomicU64::new(0);

    // Pod → client.
    let down = async {
        let result = loop {
            let msg = match stream.next().await {
                None | Some(Ok(Message::Close(_))) => break Ok(()),
                Some(Err(e)) => break Err(TunnelError::WebSocket(e)),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(_)) => continue,
            };
            match demux.on_message(&msg) {
                Ok(Event::Data(d)) => {
                    if let Err(e) = lw.write_all(d).await {
                        break Err(TunnelError::Local(e));
                    }
                    stats.bytes_out.fetch_add(d.len() as u64, Ordering::Relaxed);
                    last_down.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                Ok(Event::Nothing) => {}
                Ok(Event::DataClosed) => {
                    let _ = lw.shutdown().await;
                }
                Ok(Event::Error(e)) => break Err(TunnelError::Remote(e)),
                Err(e) => break Err(e.into()),
            }
        };
        let _ = lw.shutdown().await;
        result
    };

    // Client → pod, plus keepalives.
    let up = async {
        let mut keepalive = tokio::time::interval_at(
            Instant::now() + opts.keepalive_interval,
            opts.keepalive_interval,
        );
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut eof = false;
        let mut deadline: Option<Instant> = None;
        let result = loop {
            tokio::select! {
                // Read straight into the message (channel byte first): the
                // buffer moves into the frame without another copy.
                r = read_message(&mut lr, ch), if !eof => match r {
                    Ok(None) => {
                        eof = true;
                        if v5 {
                            if let Err(e) = sink.send(Message::binary(channel::close_signal(ch))).await {
                                break Err(e.into());
                            }
                        } else {
                            // v4 cannot tell the pod: keep reading the reply
                            // until the pod closes, at most this long.
                            deadline = Some(Instant::now() + opts.half_close_timeout);
                        }
                    }
                    Ok(Some(msg)) => {
                        let n = msg.len() - 1;
                        if let Err(e) = sink.send(Message::binary(msg)).await {
                            break Err(e.into());
                        }
                        stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => break Err(TunnelError::Local(e)),
                },
                _ = keepalive.tick() => {
                    // Empty: wsstream skips it after resetting its idle timer.
                    if let Err(e) = sink.send(Message::binary(Vec::new())).await {
                        break Err(e.into());
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
        let _ = sink.send(Message::Close(None)).await;
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
                Ok(Err(TunnelError::WebSocket(e))) => {
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
