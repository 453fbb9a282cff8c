//! One forwarded connection over SPDY, as kubectl does it: an error stream
//! and a data stream (headers `streamtype`, `port`, `requestid`) on the
//! session to the pod. The error stream is closed on our side at once; the
//! data stream carries the bytes both ways and a FIN for a half-close,
//! which the pod sees as EOF (the real half-close v4 WebSocket lacks).

use std::io::IoSlice;
use std::sync::atomic::Ordering;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{write_all_vectored, TunnelError, BATCH, CHUNK};
use crate::forward::recycle::Recycler;
use crate::forward::spdy::{Session, StreamEvent};
use crate::forward::Stats;

fn headers(kind: &str, port: u16, request_id: u64) -> Vec<(String, String)> {
    vec![
        ("streamtype".into(), kind.into()),
        ("port".into(), port.to_string()),
        ("requestid".into(), request_id.to_string()),
    ]
}

/// Splices `local` onto a new stream pair of `session` to `port`.
pub async fn run<L: AsyncRead + AsyncWrite>(
    local: L,
    session: &Session,
    port: u16,
    request_id: u64,
    stats: &Stats,
) -> Result<(), TunnelError> {
    let mut errors = session.open(headers("error", port, request_id)).await?;
    let error_tx = errors.sender();
    // As kubectl: nothing is ever written on the error stream.
    error_tx.send(Bytes::new(), true).await?;
    let mut data = session.open(headers("data", port, request_id)).await?;
    let data_tx = data.sender();
    let (mut lr, mut lw) = tokio::io::split(local);

    // Pod → client, and the error stream. Ok once the pod side has ended.
    let down = async {
        let mut error_text = Vec::new();
        let (mut data_done, mut errors_done) = (false, false);
        // An event taken from the data stream while collecting data.
        let mut held = None;
        while !(data_done && errors_done) {
            let (is_data, ev) = match held.take() {
                Some(ev) => (true, Some(ev)),
                None => tokio::select! {
                    ev = data.next(), if !data_done => (true, ev),
                    ev = errors.next(), if !errors_done => (false, ev),
                },
            };
            if is_data {
                match ev {
                    Some(StreamEvent::Reply) => {}
                    Some(StreamEvent::Data(b)) => {
                        // The frames already queued go out in one write: a
                        // kubelet's are at most 32 KiB (the runtime's
                        // io.Copy), and a write each cost a TCP push.
                        let mut batch = vec![b];
                        while batch.len() < MAX_BATCH {
                            match data.try_next() {
                                Some(StreamEvent::Data(b)) => batch.push(b),
                                other => {
                                    held = other;
                                    break;
                                }
                            }
                        }
                        let mut slices: Vec<IoSlice<'_>> =
                            batch.iter().map(|b| IoSlice::new(b)).collect();
                        let n = write_all_vectored(&mut lw, &mut slices)
                            .await
                            .map_err(TunnelError::Local)?;
                        stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Some(StreamEvent::Fin) => {
                        data_done = true;
                        let _ = lw.shutdown().await;
                    }
                    Some(StreamEvent::Reset(status)) => {
                        return Err(TunnelError::Remote(format!(
                            "the kubelet reset the data stream (RST_STREAM status {status})"
                        )))
                    }
                    None => return Err(closed(session)),
                }
            } else {
                match ev {
                    Some(StreamEvent::Reply) => {}
                    Some(StreamEvent::Data(b)) => error_text.extend_from_slice(&b),
                    Some(StreamEvent::Fin) | Some(StreamEvent::Reset(_)) => {
                        errors_done = true;
                        if !error_text.is_empty() {
                            return Err(TunnelError::Remote(
                                String::from_utf8_lossy(&error_text).trim().to_string(),
                            ));
                        }
                    }
                    None => return Err(closed(session)),
                }
            }
        }
        Ok(())
    };

    // Client → pod; EOF becomes our FIN (a half-close the pod sees).
    let up = async {
        // Each read lands in the free room of a buffer and is cut off as a
        // message; a buffer is used again once the session has written what
        // was cut from it (no allocation per read).
        let mut bufs = Recycler::new(BATCH, 1);
        loop {
            let slot = data_tx.slot().await?;
            let buf = bufs.room(CHUNK);
            let n = lr
                .read_buf(&mut buf.limit(CHUNK))
                .await
                .map_err(TunnelError::Local)?;
            if n == 0 {
                slot.send(Bytes::new(), true).await?;
                return Ok::<(), TunnelError>(());
            }
            slot.send(buf.split().freeze(), false).await?;
            stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
    };

    tokio::pin!(down, up);
    let (result, clean) = tokio::select! {
        // The pod side ended first: our side is cut short.
        r = &mut down => (r, false),
        r = &mut up => match r {
            Ok(()) => {
                let r = down.await;
                let ok = r.is_ok();
                (r, ok)
            }
            Err(e) => (Err(e), false),
        },
    };
    if !clean {
        // Frees the kubelet's side of streams that did not end both ways.
        data_tx.reset().await;
        error_tx.reset().await;
    }
    result
}

/// Frames of one stream written to the local socket at once, at most.
const MAX_BATCH: usize = 64;

fn closed(session: &Session) -> TunnelError {
    TunnelError::Remote(format!(
        "the SPDY connection to the API server ended: {}",
        session.closed().unwrap_or_else(|| "closed".to_string())
    ))
}
