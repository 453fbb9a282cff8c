//! The HTTP/1.1 upgrade of a port-forward request (on kube's auth and TLS:
//! [`super::apiconn`]): a WebSocket GET (`v4.channel.k8s.io`), or
//! kubectl's SPDY POST (`SPDY/3.1`, `portforward.k8s.io`). A refusal keeps
//! what the caller needs to decide: the status, who answered (the API
//! server writes a JSON `Status`; the kubelet plain text) and `Retry-After`.

use std::time::Duration;

use axum::http::{header, HeaderValue, Method, Request};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;

use super::apiconn::{Answer, ApiConn};

pub type Io = TokioIo<Upgraded>;

pub const V4: &str = "v4.channel.k8s.io";
pub const V5: &str = "v5.channel.k8s.io";
pub const SPDY: &str = "SPDY/3.1";
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

/// Why an upgrade failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpgradeError {
    /// The server answered with an error status.
    #[error("{message}")]
    Refused {
        status: u16,
        message: String,
        /// A plain-text body: the kubelet (or its runtime) answered, not the API server.
        from_kubelet: bool,
        retry_after: Option<Duration>,
    },
    /// The server answered but did not switch protocols as asked.
    #[error("{0}")]
    Protocol(String),
    /// No answer: the API server could not be reached.
    #[error("{0}")]
    Transport(String),
}

impl UpgradeError {
    pub fn status(&self) -> Option<u16> {
        match self {
            UpgradeError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Sends `req` and waits for the 101 and the upgraded connection.
async fn upgrade(
    api: &ApiConn,
    req: Request<Empty<Bytes>>,
) -> Result<(Io, axum::http::HeaderMap), UpgradeError> {
    let (status, headers, body) = match api.upgrade(req).await? {
        Answer::Upgraded(io, headers) => return Ok((io, headers)),
        Answer::Refused(status, headers, body) => (status, headers, body),
    };
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let (message, from_kubelet) = match serde_json::from_str::<Status>(&text) {
        Ok(s) => (s.message.unwrap_or_default(), false),
        Err(_) => (text, true),
    };
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        message
    };
    Err(UpgradeError::Refused {
        status: status.as_u16(),
        message,
        from_kubelet,
        retry_after,
    })
}

/// A WebSocket port-forward of `ports` of `pod` (channel protocol: v5
/// offered first, v4 as real servers negotiate). Returns the upgraded connection and
/// whether v5 (half-close) was negotiated.
pub async fn websocket(
    api: &ApiConn,
    namespace: &str,
    pod: &str,
    ports: &[u16],
) -> Result<(Io, bool), UpgradeError> {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let req = Request::builder()
        .method(Method::GET)
        .uri(format!(
            "/api/v1/namespaces/{namespace}/pods/{pod}/portforward?ports={}",
            ports.join(",")
        ))
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, &key)
        .header(header::SEC_WEBSOCKET_PROTOCOL, format!("{V5}, {V4}"))
        .body(Empty::new())
        .map_err(|e| UpgradeError::Protocol(e.to_string()))?;
    let (io, headers) = upgrade(api, req).await?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if headers.get(header::SEC_WEBSOCKET_ACCEPT) != HeaderValue::from_str(&accept).ok().as_ref() {
        return Err(UpgradeError::Protocol(
            "the server's Sec-WebSocket-Accept does not match".into(),
        ));
    }
    let v5 = match headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
    {
        Some(V5) => true,
        // No subprotocol: wsstream's raw codec, as v4.
        Some(V4) | None => false,
        Some(other) => {
            return Err(UpgradeError::Protocol(format!(
                "the server chose subprotocol {other:?}, not {V4}"
            )))
        }
    };
    Ok((io, v5))
}

/// kubectl's SPDY port-forward: a POST upgraded to `SPDY/3.1` with
/// `X-Stream-Protocol-Version: portforward.k8s.io` (ports go in the streams).
pub async fn spdy(api: &ApiConn, namespace: &str, pod: &str) -> Result<Io, UpgradeError> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "/api/v1/namespaces/{namespace}/pods/{pod}/portforward"
        ))
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, SPDY)
        .header("X-Stream-Protocol-Version", PORT_FORWARD_PROTOCOL)
        .body(Empty::new())
        .map_err(|e| UpgradeError::Protocol(e.to_string()))?;
    let (io, headers) = upgrade(api, req).await?;
    let chosen = headers
        .get("X-Stream-Protocol-Version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if chosen != PORT_FORWARD_PROTOCOL {
        return Err(UpgradeError::Protocol(format!(
            "the server chose stream protocol {chosen:?}, not {PORT_FORWARD_PROTOCOL}"
        )));
    }
    Ok(io)
}
