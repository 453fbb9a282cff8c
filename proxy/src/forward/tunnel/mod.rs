//! One forwarded connection: a local TCP connection spliced onto a
//! port-forward stream, over WebSocket ([`websocket`]: a stream of its own)
//! or SPDY ([`spdy`]: a data and an error stream on a shared session).

pub mod spdy;
pub mod websocket;

use std::io::IoSlice;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::channel::ChannelError;
use super::spdy::SessionError;
use super::wsframe::FrameError;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}")]
    Remote(String),
    /// The WebSocket connection failed or ended without a close.
    #[error("port-forward stream: {0}")]
    Stream(String),
    #[error("port-forward stream: {0}")]
    Frame(#[from] FrameError),
    #[error("port-forward stream: {0}")]
    Spdy(#[from] SessionError),
    #[error("port-forward protocol: {0}")]
    Protocol(#[from] ChannelError),
    #[error("local connection: {0}")]
    Local(std::io::Error),
}

#[derive(Debug, Clone, Copy)]
pub struct TunnelOpts {
    /// Where the pod cannot be told that the client half-closed (WebSocket
    /// v4), how long the pod may stay quiet before the connection is closed.
    pub half_close_timeout: Duration,
    /// Keepalive period: an empty data message, which resets the runtime's
    /// stream idle timer (a WebSocket ping would not: the kubelet's wsstream
    /// counts data messages only) and a proxy's. SPDY sessions send a PING,
    /// which spdystream counts.
    pub keepalive_interval: Duration,
}

/// Largest payload read from the local connection into one message.
pub const CHUNK: usize = 128 * 1024;

/// The buffers a local connection's SPDY messages are read into and cut
/// from: two messages, as many as a stream may have unwritten, so that one
/// is read while the other is written; a connection keeps two such buffers
/// (see [`crate::forward::recycle`]).
pub const BATCH: usize = 2 * CHUNK;

/// Writes every slice, in order, in as few (vectored) writes as the socket
/// takes them; returns the bytes written.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    slices: &mut [IoSlice<'_>],
) -> std::io::Result<usize> {
    let total = slices.iter().map(|s| s.len()).sum();
    let mut rest = slices;
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(total)
}
