//! The UDP relay of `kproxy forward ... PORT/udp`: the node agent (`kproxy
//! run --udp-relay-port`, a hostNetwork pod on every node) relays framed
//! datagrams between a port-forward stream and pods. It listens on loopback
//! only: the API's port-forward into the agent pod dials localhost in the
//! node's network namespace, so reaching it takes `pods/portforward` on the
//! agent pod, and nothing else on the network can use it. With allowed
//! networks (`--cluster-cidr`) it sends only to pod addresses.
//!
//! Per stream, one connected UDP socket per session (a client address of
//! the forward), closed after `idle` without traffic either way or when the
//! client says so; datagrams of a session keep their order.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::forward::udp::frame::{self, Frame, MAX_DATAGRAM};

/// The relay's port unless `--udp-relay-port` says otherwise (next to
/// kube-proxy's 10249 and 10256; 0 turns the relay off).
pub const DEFAULT_PORT: u16 = 10266;

/// How the relay behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Destinations must be in one of these networks (empty: any).
    pub allowed: Vec<IpNet>,
    /// A session without traffic for this long is closed.
    pub idle: Duration,
    /// Sessions per stream at most.
    pub max_sessions: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            allowed: Vec::new(),
            idle: Duration::from_secs(120),
            max_sessions: 4096,
        }
    }
}

/// Binds the relay on loopback (127.0.0.1, and ::1 where the host has IPv6).
pub async fn bind(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let mut out = vec![TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?];
    let port = out[0].local_addr()?.port();
    if let Ok(l) = TcpListener::bind((Ipv6Addr::LOCALHOST, port)).await {
        out.push(l);
    }
    Ok(out)
}

/// `kproxy run`'s relay on loopback port `port` (0: none), sending only to
/// `allowed` networks (the cluster CIDRs; empty: anywhere). Optional: a
/// port it cannot bind is logged and the proxy runs on without it. The
/// relay stops when the returned handle is dropped.
pub async fn start(port: u16, allowed: &[IpNet]) -> Option<RelayHandle> {
    if port == 0 {
        return None;
    }
    match bind(port).await {
        Ok(listeners) => {
            tracing::info!(port, "UDP relay for kproxy forward listening on loopback");
            let cfg = RelayConfig {
                allowed: allowed.to_vec(),
                ..RelayConfig::default()
            };
            Some(RelayHandle(tokio::spawn(serve(listeners, cfg))))
        }
        Err(e) => {
            tracing::error!(
                "UDP relay not started: cannot listen on 127.0.0.1:{port} ({e}); set --udp-relay-port to a free port (or 0); kproxy forward .../udp cannot use this node"
            );
            None
        }
    }
}

/// `kproxy udp-relay`: the relay alone, until it has been unused for
/// `--exit-after-idle`.
pub async fn run_standalone(args: crate::cli::UdpRelayArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let listeners = bind(args.port)
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{} (pass --port)", args.port))?;
    let cfg = RelayConfig {
        allowed: args.allow,
        ..RelayConfig::default()
    };
    let nets: Vec<String> = cfg.allowed.iter().map(ToString::to_string).collect();
    // The line kproxy forward's users see in the container's log.
    tracing::info!(port = args.port, allowed = %nets.join(","), "UDP relay listening on loopback");
    if args.exit_after_idle.is_zero() {
        serve(listeners, cfg).await;
    } else {
        serve_until_idle(listeners, cfg, args.exit_after_idle).await;
    }
    Ok(())
}

/// Stops the relay when dropped.
pub struct RelayHandle(tokio::task::JoinHandle<()>);

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the relay on `listeners` until the task is dropped.
pub async fn serve(listeners: Vec<TcpListener>, cfg: RelayConfig) {
    serve_counting(listeners, cfg, Arc::new(watch::channel(0).0)).await
}

/// Serves the relay on `listeners` until no stream has been open for
/// `exit_after` (`kproxy udp-relay` in an ephemeral container: the process,
/// and so the container, ends once no forward uses it).
pub async fn serve_until_idle(listeners: Vec<TcpListener>, cfg: RelayConfig, exit_after: Duration) {
    let open = Arc::new(watch::channel(0usize).0);
    let mut rx = open.subscribe();
    let idle = async move {
        loop {
            if rx.wait_for(|n| *n == 0).await.is_err() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(exit_after) => return,
                _ = rx.wait_for(|n| *n > 0) => {}
            }
        }
    };
    tokio::select! {
        _ = serve_counting(listeners, cfg, open) => {}
        _ = idle => tracing::info!(
            "no kproxy forward used the UDP relay for {exit_after:?}: exiting"
        ),
    }
}

/// Ends a stream's count in `open` when dropped.
struct Open(Arc<watch::Sender<usize>>);

impl Open {
    fn new(open: &Arc<watch::Sender<usize>>) -> Open {
        open.send_modify(|n| *n += 1);
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Serves the relay, counting the streams open in `open`.
async fn serve_counting(
    listeners: Vec<TcpListener>,
    cfg: RelayConfig,
    open: Arc<watch::Sender<usize>>,
) {
    let cfg = Arc::new(cfg);
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let cfg = cfg.clone();
        let open = open.clone();
        tasks.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = l.accept() => match accepted {
                        Ok((s, peer)) => {
                            let _ = s.set_nodelay(true);
                            let cfg = cfg.clone();
                            let counted = Open::new(&open);
                            conns.spawn(async move {
                                let _counted = counted;
                                if let Err(e) = relay(s, &cfg).await {
                                    tracing::debug!(%peer, "UDP relay stream ended: {e}");
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!("UDP relay accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

struct Session {
    socket: Arc<UdpSocket>,
    last: Arc<Mutex<Instant>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn touch(last: &Mutex<Instant>) {
    *last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
}

/// Relays one stream until it ends.
pub async fn relay<S>(stream: S, cfg: &RelayConfig) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, w) = tokio::io::split(stream);
    let (out_tx, out_rx) = mpsc::channel::<Frame>(256);
    // The writer starts at the greeting, which may ask to be answered.
    let mut unstarted = Some((w, out_rx));
    let mut writer = None;
    let mut sessions: HashMap<u32, Session> = HashMap::new();
    let mut buf = BytesMut::with_capacity(128 * 1024);
    let mut greeted = false;
    let mut sweep = tokio::time::interval(
        cfg.idle
            .min(Duration::from_secs(10))
            .max(Duration::from_millis(10)),
    );
    let result = loop {
        if !greeted {
            match frame::take_greeting(&mut buf) {
                Ok(Some(ack)) => {
                    greeted = true;
                    if let Some((w, out_rx)) = unstarted.take() {
                        let first: &'static [u8] = if ack { frame::MAGIC_ACK } else { &[] };
                        writer = Some(tokio::spawn(crate::forward::udp::write_frames(
                            w, out_rx, first,
                        )));
                    }
                }
                Ok(None) => {}
                Err(e) => break Err(e.to_string()),
            }
        }
        let decoded = if greeted {
            frame::decode(&mut buf)
        } else {
            Ok(None)
        };
        let f = match decoded {
            Err(e) => break Err(e.to_string()),
            Ok(Some(f)) => f,
            Ok(None) => {
                buf.reserve(64 * 1024);
                tokio::select! {
                    n = r.read_buf(&mut buf) => match n {
                        Ok(0) => break Ok(()),
                        Ok(_) => continue,
                        Err(e) => break Err(e.to_string()),
                    },
                    _ = sweep.tick() => {
                        let idle = cfg.idle;
                        let expired: Vec<u32> = sessions
                            .iter()
                            .filter(|(_, s)| s.last.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= idle)
                            .map(|(id, _)| *id)
                            .collect();
                        for id in expired {
                            sessions.remove(&id);
                            let _ = out_tx.send(Frame::Close { session: id }).await;
                        }
                        continue;
                    }
                }
            }
        };
        match f {
            Frame::Open { session, dest } => {
                match open(session, dest, cfg, sessions.len(), out_tx.clone()).await {
                    Ok(s) => {
                        sessions.insert(session, s);
                    }
                    Err(message) => {
                        tracing::debug!(session, %dest, "UDP relay refused a session: {message}");
                        let _ = out_tx.send(Frame::Error { session, message }).await;
                    }
                }
            }
            Frame::Data { session, payload } => {
                if let Some(s) = sessions.get(&session) {
                    touch(&s.last);
                    // A failed send (ICMP unreachable...) loses the datagram, as UDP does.
                    let _ = s.socket.send(&payload).await;
                }
            }
            Frame::Close { session } => {
                sessions.remove(&session);
            }
            Frame::Error { .. } => {}
        }
    };
    drop(sessions);
    drop(out_tx);
    if let Some(writer) = writer {
        let _ = writer.await;
    }
    result
}

async fn open(
    session: u32,
    dest: SocketAddr,
    cfg: &RelayConfig,
    open_sessions: usize,
    out: mpsc::Sender<Frame>,
) -> Result<Session, String> {
    if !cfg.allowed.is_empty() && !cfg.allowed.iter().any(|n| n.contains(&dest.ip())) {
        return Err(format!(
            "destination {dest} is outside the relay's allowed networks ({})",
            cfg.allowed
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if open_sessions >= cfg.max_sessions {
        return Err(format!(
            "the relay has {open_sessions} sessions on this stream already (at most {})",
            cfg.max_sessions
        ));
    }
    let local: SocketAddr = match dest.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    socket
        .connect(dest)
        .await
        .map_err(|e| format!("UDP socket to {dest}: {e}"))?;
    let socket = Arc::new(socket);
    let last = Arc::new(Mutex::new(Instant::now()));
    let reader = {
        let socket = socket.clone();
        let last = last.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match socket.recv(&mut buf).await {
                    Ok(n) => {
                        touch(&last);
                        let payload = Bytes::copy_from_slice(&buf[..n]);
                        if out.send(Frame::Data { session, payload }).await.is_err() {
                            return;
                        }
                    }
                    // ICMP port unreachable from an earlier send: keep going.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(_) => return,
                }
            }
        })
    };
    Ok(Session {
        socket,
        last,
        reader,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn udp_echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], peer).await;
            }
        });
        addr
    }

    async fn next(io: &mut tokio::io::DuplexStream, buf: &mut BytesMut) -> Frame {
        loop {
            if let Some(f) = frame::decode(buf).unwrap() {
                return f;
            }
            assert_ne!(io.read_buf(buf).await.unwrap(), 0, "EOF");
        }
    }

    #[tokio::test]
    async fn relays_sessions_in_order_and_refuses_outside_destinations() {
        let echo = udp_echo().await;
        let (client, server) = tokio::io::duplex(1 << 20);
        let cfg = RelayConfig {
            allowed: vec!["127.0.0.0/8".parse().unwrap()],
            idle: Duration::from_millis(300),
            max_sessions: 2,
        };
        tokio::spawn(async move { relay(server, &cfg).await });
        let mut c = client;
        let mut out = BytesMut::new();
        out.extend_from_slice(frame::MAGIC);
        for s in [1, 2] {
            frame::encode(
                &Frame::Open {
                    session: s,
                    dest: echo,
                },
                &mut out,
            );
        }
        frame::encode(
            &Frame::Open {
                session: 3,
                dest: "192.0.2.1:53".parse().unwrap(),
            },
            &mut out,
        );
        for i in 0..100u32 {
            frame::encode(
                &Frame::Data {
                    session: 1 + i % 2,
                    payload: Bytes::from(i.to_be_bytes().to_vec()),
                },
                &mut out,
            );
        }
        c.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        let mut seen = [Vec::new(), Vec::new()];
        let mut errors = Vec::new();
        while seen[0].len() + seen[1].len() < 100 || errors.is_empty() {
            match next(&mut c, &mut buf).await {
                Frame::Data { session, payload } => seen[session as usize - 1]
                    .push(u32::from_be_bytes(payload[..].try_into().unwrap())),
                Frame::Error { session, message } => errors.push((session, message)),
                f => panic!("unexpected {f:?}"),
            }
        }
        // Loopback loses nothing; each session in order.
        assert_eq!(seen[0], (0..100).step_by(2).collect::<Vec<_>>());
        assert_eq!(seen[1], (1..100).step_by(2).collect::<Vec<_>>());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, 3);
        assert!(
            errors[0].1.contains("outside the relay's allowed networks"),
            "{}",
            errors[0].1
        );
        // Idle sessions are closed and said so.
        let mut closed = Vec::new();
        while closed.len() < 2 {
            match next(&mut c, &mut buf).await {
                Frame::Close { session } => closed.push(session),
                f => panic!("unexpected {f:?}"),
            }
        }
        closed.sort();
        assert_eq!(closed, vec![1, 2]);
    }

    #[tokio::test]
    async fn a_stream_that_does_not_greet_is_dropped() {
        let (mut c, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { relay(server, &RelayConfig::default()).await });
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let r = task.await.unwrap();
        assert!(r.unwrap_err().contains("greeting"));
    }

    #[tokio::test]
    async fn a_greeting_that_asks_is_answered_before_any_frame() {
        let echo = udp_echo().await;
        let (mut c, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move { relay(server, &RelayConfig::default()).await });
        let mut out = BytesMut::new();
        out.extend_from_slice(frame::MAGIC_ACK);
        frame::encode(
            &Frame::Open {
                session: 1,
                dest: echo,
            },
            &mut out,
        );
        frame::encode(
            &Frame::Data {
                session: 1,
                payload: Bytes::from_static(b"ping"),
            },
            &mut out,
        );
        c.write_all(&out).await.unwrap();
        let mut answer = [0u8; 4];
        c.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, frame::MAGIC_ACK);
        let mut buf = BytesMut::new();
        assert_eq!(
            next(&mut c, &mut buf).await,
            Frame::Data {
                session: 1,
                payload: Bytes::from_static(b"ping")
            }
        );
    }

    #[tokio::test]
    async fn the_standalone_relay_exits_only_once_unused_for_its_idle_time() {
        let listeners = bind(0).await.unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        let idle = Duration::from_millis(300);
        let relay = tokio::spawn(serve_until_idle(listeners, RelayConfig::default(), idle));
        // A stream held open for three idle times keeps it up.
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::time::sleep(idle * 3).await;
        assert!(!relay.is_finished(), "exited with a stream open");
        let closed = Instant::now();
        drop(s);
        tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("exits once idle")
            .unwrap();
        assert!(
            closed.elapsed() >= idle,
            "exited {:?} after the stream closed",
            closed.elapsed()
        );
    }
}
