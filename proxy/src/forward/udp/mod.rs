//! `kproxy forward TARGET LOCAL:REMOTE/udp`: UDP, which the API's
//! port-forward cannot carry (it is TCP only), through the UDP relay of the
//! kproxy node agent on the target pod's node (`kproxy run
//! --udp-relay-port`, see `server::udp_relay`). kproxy forward finds the
//! agent pod of that node, port-forwards to its relay port (a TCP stream,
//! over WebSocket or SPDY like any connection) and frames datagrams on it
//! ([`frame`]). A session per client address: the first datagram from an
//! address opens it (towards the pod the target resolves to then), replies
//! go back to that address, and it is closed after `--udp-idle-timeout`
//! without traffic. One stream per local socket keeps every session's
//! datagrams in order. Where no agent runs, the relay runs in an ephemeral
//! container of the target pod instead ([`ephemeral`], `--udp-relay`).

pub mod ephemeral;
pub mod frame;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::dial::{Dialer, Opened};
use super::{tunnel, SetupError, Shared};
use frame::{Frame, MAX_DATAGRAM};

/// Which relay a UDP forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum RelayMode {
    /// The kproxy agent on the pod's node; where none runs (or the agents cannot be
    /// listed), an ephemeral container in the target pod.
    #[default]
    Auto,
    /// Only the kproxy agent on the pod's node.
    Agent,
    /// Only an ephemeral container in the target pod.
    Ephemeral,
}

/// Where the relays are: the kproxy agent pods, or ephemeral containers.
#[derive(Debug, Clone)]
pub struct RelayOpts {
    pub mode: RelayMode,
    /// The image of the ephemeral relay container.
    pub image: String,
    /// How long the ephemeral relay container may take to start.
    pub start_timeout: Duration,
    pub namespace: String,
    /// Label selector of the agent pods.
    pub selector: String,
    /// The relay's port in the agent pod (its loopback).
    pub port: u16,
    /// A session without traffic for this long is closed.
    pub idle: Duration,
}

/// A relay stream: frames out, frames in.
struct Relay {
    /// Which relay, for messages (`agent pod X`, `pod Y's container Z`).
    name: String,
    /// What it serves: `node N` (an agent) or `pod NS/NAME` (its own relay).
    key: String,
    tx: mpsc::Sender<Frame>,
    rx: mpsc::Receiver<Frame>,
    /// The stream's tasks (the port-forward, framing both ways): aborted
    /// when the relay is dropped.
    _tasks: tokio::task::JoinSet<()>,
}

/// Why no agent relay can be used.
enum NoAgent {
    /// There is none (or the agents cannot be listed): the ephemeral
    /// container may stand in.
    Missing(String),
    /// Looking failed otherwise (the API is down...).
    Failed(SetupError),
}

/// The kproxy agent pod on `node`.
async fn find_agent(shared: &Shared, opts: &RelayOpts, node: &str) -> Result<String, NoAgent> {
    let pods: Api<Pod> = Api::namespaced(shared.resolver.client().clone(), &opts.namespace);
    let lp = ListParams::default()
        .labels(&opts.selector)
        .fields(&format!("spec.nodeName={node}"));
    let list = pods.list(&lp).await.map_err(|e| {
        let msg = format!(
            "listing the kproxy agent pods ({} in namespace {}): {e}",
            opts.selector, opts.namespace
        );
        match e {
            kube::Error::Api(s) if s.code == 403 => NoAgent::Missing(msg),
            _ => NoAgent::Failed(SetupError::Conn(msg)),
        }
    })?;
    list.items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .filter_map(|p| p.metadata.name)
        .min()
        .ok_or_else(|| {
            NoAgent::Missing(format!(
                "no kproxy agent runs on node {node} (no Running pod with labels {} in namespace {})",
                opts.selector, opts.namespace
            ))
        })
}

/// Opens a stream to the relay in pod `pod` (of `namespace`, reached by
/// `dialer`) and runs the framing on it. With `ack`, the relay must answer
/// the greeting first (a relay just started: the stream is known to reach
/// it, not a port nobody listens on yet).
async fn connect(
    dialer: &Dialer,
    pod: &str,
    namespace: &str,
    opts: &RelayOpts,
    shared: &Arc<Shared>,
    ack: bool,
) -> Result<Relay, SetupError> {
    let opened = dialer.dial(pod, opts.port).await.map_err(|e| {
        SetupError::Conn(format!(
            "port-forward to the UDP relay (pod {pod} in {namespace}, port {}): {e}",
            opts.port
        ))
    })?;
    // The port-forward splices onto one end of an in-memory pipe; the
    // framing runs on the other.
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let mut tasks = tokio::task::JoinSet::new();
    let port = opts.port;
    let tunnel_shared = shared.clone();
    tasks.spawn(async move {
        let stats = &tunnel_shared.relay_stats;
        let r = match opened {
            Opened::WebSocket { io, v5 } => {
                tunnel::websocket::run(theirs, io, v5, port, tunnel_shared.opts, stats).await
            }
            Opened::Spdy {
                session,
                request_id,
            } => tunnel::spdy::run(theirs, &session, port, request_id, stats).await,
        };
        if let Err(e) = r {
            tracing::debug!("UDP relay stream: {e}");
        }
    });
    let (mut r, w) = tokio::io::split(ours);
    let (out_tx, out_rx) = mpsc::channel::<Frame>(256);
    let (in_tx, in_rx) = mpsc::channel::<Frame>(256);
    let greeting = if ack { frame::MAGIC_ACK } else { frame::MAGIC };
    tasks.spawn(write_frames(w, out_rx, greeting));
    if ack {
        let mut answer = [0u8; 4];
        let answered = tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut answer));
        match answered.await {
            Ok(Ok(_)) if &answer == frame::MAGIC_ACK => {}
            Ok(Ok(_)) => {
                return Err(SetupError::Conn(format!(
                    "port {port} of pod {pod} is not the kproxy UDP relay (it answered {answer:?}); pass --udp-relay-port"
                )))
            }
            Ok(Err(_)) => {
                return Err(SetupError::Conn(format!(
                    "the UDP relay in pod {pod} did not answer: the stream to port {port} ended"
                )))
            }
            Err(_) => {
                return Err(SetupError::Conn(format!(
                    "the UDP relay in pod {pod} did not answer within 10s"
                )))
            }
        }
    }
    tasks.spawn(async move {
        let mut buf = BytesMut::with_capacity(128 * 1024);
        loop {
            loop {
                match frame::decode(&mut buf) {
                    Ok(Some(f)) => {
                        if in_tx.send(f).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("UDP relay: {e}");
                        return;
                    }
                }
            }
            buf.reserve(64 * 1024);
            match r.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    Ok(Relay {
        name: pod.to_string(),
        key: String::new(),
        tx: out_tx,
        rx: in_rx,
        _tasks: tasks,
    })
}

/// Writes `first`, then the frames of `rx` (batched) to `w`, until `rx`
/// ends or a write fails. Both ends of a relay stream use it.
pub async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Frame>,
    first: &[u8],
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    buf.extend_from_slice(first);
    loop {
        if buf.is_empty() {
            match rx.recv().await {
                Some(f) => frame::encode(&f, &mut buf),
                None => return,
            }
        }
        while let Ok(f) = rx.try_recv() {
            frame::encode(&f, &mut buf);
            if buf.len() > 256 * 1024 {
                break;
            }
        }
        if w.write_all_buf(&mut buf).await.is_err() {
            return;
        }
    }
}

struct Client {
    addr: SocketAddr,
    last: Instant,
}

/// Serves UDP pair `idx` on `socket` until the forward ends.
pub(super) async fn serve(
    socket: UdpSocket,
    shared: Arc<Shared>,
    idx: usize,
    fatal: mpsc::Sender<String>,
) {
    let Some(opts) = shared.relay.clone() else {
        return;
    };
    let mut relay: Option<Relay> = None;
    let mut by_addr: HashMap<SocketAddr, u32> = HashMap::new();
    let mut clients: HashMap<u32, Client> = HashMap::new();
    let mut next_id: u32 = 1;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(
        (opts.idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(5)),
    );
    let stats = &shared.stats;
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("UDP receive: {e}");
                        continue;
                    }
                };
                let id = match by_addr.get(&from) {
                    Some(id) => *id,
                    None => match open_session(&shared, &opts, idx, &mut relay).await {
                        Ok(dest) => {
                            let id = next_id;
                            next_id = next_id.wrapping_add(1).max(1);
                            let Some(r) = &relay else { continue };
                            if r.tx.send(Frame::Open { session: id, dest }).await.is_err() {
                                relay = None;
                                continue;
                            }
                            stats.connections.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(session = id, client = %from, %dest, "UDP session open");
                            by_addr.insert(from, id);
                            clients.insert(id, Client { addr: from, last: Instant::now() });
                            id
                        }
                        Err(SetupError::Fatal(msg)) => {
                            let _ = fatal.send(msg).await;
                            return;
                        }
                        Err(SetupError::Conn(msg)) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("UDP datagram from {from} dropped: {msg}");
                            continue;
                        }
                    },
                };
                if let Some(c) = clients.get_mut(&id) {
                    c.last = Instant::now();
                }
                let payload = Bytes::copy_from_slice(&buf[..n]);
                let sent = match &relay {
                    Some(r) => r.tx.send(Frame::Data { session: id, payload }).await.is_ok(),
                    None => false,
                };
                if sent {
                    stats.datagrams_in.fetch_add(1, Ordering::Relaxed);
                    stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            f = next_frame(&mut relay) => match f {
                Some(Frame::Data { session, payload }) => {
                    if let Some(c) = clients.get_mut(&session) {
                        c.last = Instant::now();
                        if socket.send_to(&payload, c.addr).await.is_ok() {
                            stats.datagrams_out.fetch_add(1, Ordering::Relaxed);
                            stats.bytes_out.fetch_add(payload.len() as u64, Ordering::Relaxed);
                        }
                    }
                }
                Some(Frame::Close { session }) => {
                    if let Some(c) = clients.remove(&session) {
                        by_addr.remove(&c.addr);
                    }
                }
                Some(Frame::Error { session, message }) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(c) = clients.remove(&session) {
                        by_addr.remove(&c.addr);
                        tracing::warn!("UDP session of {} failed at the relay: {message}", c.addr);
                    }
                }
                Some(Frame::Open { .. }) => {}
                None => {
                    if let Some(r) = relay.take() {
                        tracing::warn!(
                            "the UDP relay stream to {} ended ({} sessions dropped); the next datagram opens a new one",
                            r.name,
                            clients.len()
                        );
                    }
                    clients.clear();
                    by_addr.clear();
                }
            },
            _ = sweep.tick() => {
                let idle: Vec<u32> = clients
                    .iter()
                    .filter(|(_, c)| c.last.elapsed() >= opts.idle)
                    .map(|(id, _)| *id)
                    .collect();
                for id in idle {
                    if let Some(c) = clients.remove(&id) {
                        by_addr.remove(&c.addr);
                        tracing::debug!(session = id, client = %c.addr, "UDP session idle: closed");
                    }
                    if let Some(r) = &relay {
                        let _ = r.tx.send(Frame::Close { session: id }).await;
                    }
                }
            }
        }
    }
}

async fn next_frame(relay: &mut Option<Relay>) -> Option<Frame> {
    match relay {
        Some(r) => r.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves the target for a new session and makes sure a relay stream for
/// it is up: to the agent on the pod's node, or to the pod's own relay
/// container (`--udp-relay`). Returns the session's destination.
async fn open_session(
    shared: &Arc<Shared>,
    opts: &RelayOpts,
    idx: usize,
    relay: &mut Option<Relay>,
) -> Result<SocketAddr, SetupError> {
    let permit = shared.setups.acquire().await;
    let (pod, ports) = shared.resolve(&shared.pairs[idx..=idx]).await?;
    let ip = pod
        .ip()
        .ok_or_else(|| SetupError::Conn(format!("pod {} has no IP (status.podIP)", pod.name)))?;
    let node = pod.node().ok_or_else(|| {
        SetupError::Conn(format!("pod {} is on no node (spec.nodeName)", pod.name))
    })?;
    let namespace = pod.pod.metadata.namespace.clone().unwrap_or_default();
    let (node_key, pod_key) = (
        format!("node {node}"),
        format!("pod {namespace}/{}", pod.name),
    );
    // Through the agent the destination is the pod's address; through the
    // pod's own relay, its loopback.
    let via_agent = SocketAddr::new(ip, ports[0]);
    let via_pod = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), ports[0]);
    // The stream for this node or pod is up: nothing to look up.
    if let Some(r) = relay.as_ref().filter(|r| !r.tx.is_closed()) {
        if r.key == node_key {
            return Ok(via_agent);
        }
        if r.key == pod_key {
            return Ok(via_pod);
        }
    }
    let missing = match opts.mode {
        RelayMode::Ephemeral => None,
        RelayMode::Agent | RelayMode::Auto => match find_agent(shared, opts, node).await {
            Ok(agent) => {
                let dialer = shared
                    .relay_dialer
                    .as_ref()
                    .ok_or_else(|| SetupError::Conn("no UDP relay configured".into()))?;
                let mut r = connect(dialer, &agent, &opts.namespace, opts, shared, false).await?;
                r.key = node_key;
                *relay = Some(r);
                tracing::info!(%agent, %node, "UDP relay stream open");
                drop(permit);
                return Ok(via_agent);
            }
            Err(NoAgent::Failed(e)) => return Err(e),
            Err(NoAgent::Missing(why)) if opts.mode == RelayMode::Agent => {
                return Err(SetupError::Conn(format!(
                    "{why}: UDP forwarding needs `kproxy run --udp-relay-port {}` on the target pod's node, or --udp-relay=auto to run the relay in an ephemeral container of the pod",
                    opts.port
                )))
            }
            Err(NoAgent::Missing(why)) => Some(why),
        },
    };
    let pods: Api<Pod> = Api::namespaced(shared.resolver.client().clone(), &namespace);
    let pod_relay = async {
        let container = ephemeral::ensure(
            &pods,
            &pod.name,
            &namespace,
            &opts.image,
            opts.port,
            opts.start_timeout,
        )
        .await?;
        // The container runs; its relay listens a moment later.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut backoff = Duration::from_millis(20);
        loop {
            match connect(&shared.dialer, &pod.name, &namespace, opts, shared, true).await {
                Ok(r) => break Ok((container, r)),
                Err(e) if Instant::now() >= deadline => break Err(e),
                Err(e) => {
                    tracing::debug!("UDP relay in pod {} not reachable yet: {e:?}", pod.name);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    };
    let (container, mut r) = pod_relay.await.map_err(|e| match (e, missing) {
        (SetupError::Conn(e), Some(why)) => {
            SetupError::Conn(format!("{why}, and the pod's own relay failed: {e}"))
        }
        (e, _) => e,
    })?;
    r.name = format!("pod {}'s container {container}", pod.name);
    r.key = pod_key;
    *relay = Some(r);
    tracing::info!(pod = %pod.name, %container, "UDP relay stream open (ephemeral container)");
    drop(permit);
    Ok(via_pod)
}
