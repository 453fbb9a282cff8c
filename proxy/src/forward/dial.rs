//! Opens port-forward streams to a pod: over WebSocket (a stream per
//! connection), or over SPDY (one session per pod, a stream pair per
//! connection), falling back from the first to the second as kubectl does
//! when the WebSocket upgrade is refused with 403 or 400 (a role written
//! for kubectl's SPDY grants `create` on pods/portforward, not the `get` a
//! WebSocket needs; an old or strict server may not take the WebSocket).
//! Once SPDY worked after such a refusal, it is used from then on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::apiconn::ApiConn;
use super::spdy::Session;
use super::upgrade::{self, Io, UpgradeError};
use clap::ValueEnum;

/// Which protocol `kproxy forward` speaks to the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Transport {
    /// WebSocket, falling back to SPDY on a 403 or 400 (as kubectl).
    #[default]
    Auto,
    /// WebSocket only (`v4.channel.k8s.io`).
    Websocket,
    /// SPDY only (`portforward.k8s.io`, kubectl's protocol before 1.31).
    Spdy,
}

/// An open port-forward for one connection.
pub enum Opened {
    WebSocket {
        /// The upgraded connection (frames: [`super::wsframe`]).
        io: Io,
        /// `v5.channel.k8s.io` (half-close) was negotiated.
        v5: bool,
    },
    Spdy {
        session: Session,
        request_id: u64,
    },
}

pub struct Dialer {
    api: ApiConn,
    namespace: String,
    transport: Transport,
    keepalive: Duration,
    /// Auto fell back to SPDY.
    fell_back: AtomicBool,
    /// The SPDY session, and the pod it goes to.
    session: tokio::sync::Mutex<Option<(String, Session)>>,
    request_ids: AtomicU64,
}

impl Dialer {
    pub fn new(api: ApiConn, namespace: String, transport: Transport, keepalive: Duration) -> Self {
        Dialer {
            api,
            namespace,
            transport,
            keepalive,
            fell_back: AtomicBool::new(false),
            session: tokio::sync::Mutex::new(None),
            request_ids: AtomicU64::new(0),
        }
    }

    fn spdy_now(&self) -> bool {
        self.transport == Transport::Spdy || self.fell_back.load(Ordering::Relaxed)
    }

    /// The protocol new connections use now.
    pub fn protocol(&self) -> &'static str {
        if self.spdy_now() {
            "SPDY"
        } else {
            "WebSocket"
        }
    }

    /// One attempt at a port-forward of `port` of `pod` (with the fallback).
    pub async fn dial(&self, pod: &str, port: u16) -> Result<Opened, UpgradeError> {
        if self.spdy_now() {
            return self.spdy(pod).await;
        }
        let ws_err = match upgrade::websocket(&self.api, &self.namespace, pod, &[port]).await {
            Ok((io, v5)) => return Ok(Opened::WebSocket { io, v5 }),
            Err(e) => e,
        };
        let fallback =
            self.transport == Transport::Auto && matches!(ws_err.status(), Some(403 | 400));
        if !fallback {
            return Err(ws_err);
        }
        match self.spdy(pod).await {
            Ok(opened) => {
                if !self.fell_back.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the API server refused the WebSocket port-forward ({} {}); using SPDY from now on, as kubectl does",
                        ws_err.status().unwrap_or(0),
                        ws_err
                    );
                }
                Ok(opened)
            }
            // Both refused: say what each needs.
            Err(UpgradeError::Refused {
                status,
                message,
                from_kubelet,
                retry_after,
            }) => Err(UpgradeError::Refused {
                status,
                message: format!("over WebSocket: {ws_err}; over SPDY: {message}"),
                from_kubelet,
                retry_after,
            }),
            Err(e) => Err(e),
        }
    }

    /// A stream pair on the SPDY session to `pod` (made on first use, and
    /// again when the last one ended or the pod changed).
    async fn spdy(&self, pod: &str) -> Result<Opened, UpgradeError> {
        let mut current = self.session.lock().await;
        let session = match &*current {
            Some((p, s)) if p == pod && s.is_usable() => s.clone(),
            _ => {
                let io = upgrade::spdy(&self.api, &self.namespace, pod).await?;
                let s = Session::client(io, self.keepalive);
                *current = Some((pod.to_string(), s.clone()));
                s
            }
        };
        Ok(Opened::Spdy {
            session,
            request_id: self.request_ids.fetch_add(1, Ordering::Relaxed),
        })
    }
}
