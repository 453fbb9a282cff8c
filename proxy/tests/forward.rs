//! `kproxy forward` end to end: the real binary against the in-process test
//! API server, whose port-forward dials "pods" that are TCP listeners on
//! loopback (status.podIP 127.0.0.1, container port = the listener's port).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kproxy_test_apiserver::TestApiServer;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// Polls `f` until it returns Some, or panics after `within` with `what`.
async fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `kproxy forward`, killed on drop.
struct Kproxy {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(r: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            l.lock().unwrap().push(line);
        }
    });
    lines
}

impl Kproxy {
    /// `debug`: debug logs (one line per connection) on stderr.
    fn start(kubeconfig: &std::path::Path, args: &[&str], debug: bool) -> Kproxy {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kproxy"));
        cmd.arg("forward")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .env_remove("RUST_LOG");
        if debug {
            cmd.env("RUST_LOG", "kproxy=debug");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning kproxy");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Kproxy {
            child,
            stdout,
            stderr,
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    async fn wait_stderr(&self, needle: &str) {
        let what = format!("{needle:?} on stderr");
        let end = Instant::now() + DEADLINE;
        loop {
            if self.stderr_text().contains(needle) {
                return;
            }
            if Instant::now() > end {
                panic!(
                    "timed out waiting for {what}; stderr:\n{}",
                    self.stderr_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The local port of the first `Forwarding from 127.0.0.1:PORT -> REMOTE` line.
    async fn local_port(&mut self) -> u16 {
        let end = Instant::now() + DEADLINE;
        loop {
            for l in self.stdout_lines() {
                if let Some(rest) = l.strip_prefix("Forwarding from 127.0.0.1:") {
                    return rest.split(' ').next().unwrap().parse().unwrap();
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "kproxy exited ({status}) before forwarding; stderr:\n{}",
                    self.stderr_text()
                );
            }
            if Instant::now() > end {
                panic!("no Forwarding line; stderr:\n{}", self.stderr_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return status;
            }
            if Instant::now() > end {
                panic!("kproxy did not exit; stderr:\n{}", self.stderr_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Kproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    server: TestApiServer,
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    /// `--transport` for every forward (None: the default, auto).
    transport: Option<&'static str>,
}

impl Env {
    async fn new() -> Env {
        let server = TestApiServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).unwrap();
        Env {
            server,
            dir,
            kubeconfig,
            transport: None,
        }
    }

    /// Every forward of this env speaks `transport` (websocket, spdy).
    async fn with(transport: &'static str) -> Env {
        Env {
            transport: Some(transport),
            ..Env::new().await
        }
    }

    fn forward(&self, args: &[&str]) -> Kproxy {
        let mut args = args.to_vec();
        if let Some(t) = self.transport {
            args.extend(["--transport", t]);
        }
        Kproxy::start(&self.kubeconfig, &args, true)
    }

    /// Without debug logs.
    fn forward_quiet(&self, args: &[&str]) -> Kproxy {
        Kproxy::start(&self.kubeconfig, args, false)
    }
}

/// A Running, Ready pod at 127.0.0.1 with named container ports.
fn pod(name: &str, labels: Value, ports: &[(&str, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "containerPort": p}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "x", "ports": ports}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn deployment(name: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}})
}

fn service(name: &str, port: u16, target_port: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": name},
            "ports": [{"name": "web", "port": port, "targetPort": target_port}]}})
}

/// An echo "container port"; returns its port.
async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// Greets every connection with `greeting`, then echoes.
async fn greeter(greeting: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(greeting.as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Sends `msg`, reads as many bytes back.
async fn roundtrip(port: u16, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(back)
}

/// Reads `n` bytes (a greeting) from a new connection.
async fn greeting(port: u16, n: usize) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut back = vec![0u8; n];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(String::from_utf8_lossy(&back).into_owned())
}

/// Sends `msg`, half-closes, reads until EOF: the reply and how long the
/// reply took after the half-close.
async fn half_closed_exchange(port: u16, msg: &[u8]) -> (Vec<u8>, Duration) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let started = Instant::now();
    let mut reply = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut reply))
        .await
        .expect("no EOF after the half-close")
        .unwrap();
    (reply, started.elapsed())
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Deterministic pseudo-random bytes (xorshift).
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let b = state.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

// ---------------------------------------------------------------- data path

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_exactly_256_mib_each_way_over_websocket() {
    bytes_cross_exactly_256_mib_each_way(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_exactly_256_mib_each_way_over_spdy() {
    bytes_cross_exactly_256_mib_each_way(Env::with("spdy").await).await;
}

async fn bytes_cross_exactly_256_mib_each_way(env: Env) {
    let port = echo_server().await;
    env.server
        .apply(pod("web", json!({}), &[("http", port)]))
        .unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    const TOTAL: usize = 256 << 20;
    let s = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < TOTAL {
            fill(&mut buf, &mut state);
            w.write_all(&buf).await.unwrap();
            h.update(&buf);
            sent += buf.len();
        }
        w.shutdown().await.unwrap();
        h.finalize()
    });
    let reader = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            got += n;
        }
        (got, h.finalize())
    });
    let sent = tokio::time::timeout(Duration::from_secs(600), writer)
        .await
        .expect("writer timed out")
        .unwrap();
    let (got, back) = tokio::time::timeout(Duration::from_secs(600), reader)
        .await
        .expect("reader timed out")
        .unwrap();
    assert_eq!(got, TOTAL, "stderr:\n{}", kp.stderr_text());
    assert_eq!(sent, back, "the echoed bytes differ");
    kp.signal(libc::SIGINT);
    assert!(kp.wait_exit().await.success());
    kp.wait_stderr(&format!("{TOTAL} bytes in, {TOTAL} bytes out, 0 errors"))
        .await;
}

/// v5's close signal (an opt-in of the test server: no real server
/// negotiates v5 for port-forward) tells the pod at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_with_v5_still_gets_the_full_reply() {
    let env = Env::new().await;
    env.server.set_port_forward_v5(true);
    // Reads to EOF, then answers with the count and the sha256 of what it got.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                s.read_to_end(&mut all).await.unwrap();
                let reply = format!("got {} {:x}", all.len(), Sha256::digest(&all));
                // A large reply: it must all reach the client.
                s.write_all(reply.repeat(10_000).as_bytes()).await.unwrap();
            });
        }
    });
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&[
        "pod/web",
        &format!(":{port}"),
        "--half-close-timeout",
        "60s",
    ]);
    let local = kp.local_port().await;
    let mut s = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    let payload = vec![7u8; 1 << 20];
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    let started = Instant::now();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut reply))
        .await
        .expect("no reply after half-close")
        .unwrap();
    let expected = format!("got {} {:x}", payload.len(), Sha256::digest(&payload)).repeat(10_000);
    assert_eq!(reply.len(), expected.len());
    assert_eq!(reply, expected);
    // v5 told the pod at once: no waiting for the half-close timeout.
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// With v4 (what real servers negotiate) the pod cannot be told about the
/// half-close: the reply of a pod that answers without waiting for EOF still
/// reaches the client, and a pod that waits for EOF gets its connection
/// closed after --half-close-timeout (default 1s, the runtime's own grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_on_v4_waits_for_the_pod_then_times_out() {
    half_close_gives_the_pod_a_second(Env::with("websocket").await).await;
}

/// v4 again: a reply that is still streaming when the timeout has passed
/// since the client's EOF is not cut; the connection is closed once the pod
/// has been quiet for --half-close-timeout. (Cut at 1s after the EOF, 200
/// concurrent 1 MiB echoes on a busy machine lost their tails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_on_v4_keeps_a_reply_that_is_still_coming() {
    let env = Env::with("websocket").await;
    // After 5 bytes: 8 chunks 300 ms apart (2.4 s), then stays open.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 5];
                s.read_exact(&mut b).await.unwrap();
                for i in 0..8u8 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if s.write_all(&[i; 1000]).await.is_err() {
                        return;
                    }
                }
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            });
        }
    });
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{slow}"), "--half-close-timeout", "1s"]);
    let local = kp.local_port().await;
    let (reply, waited) = half_closed_exchange(local, b"hello").await;
    let want: Vec<u8> = (0..8u8).flat_map(|i| [i; 1000]).collect();
    assert_eq!(reply.len(), want.len(), "reply cut short");
    assert_eq!(reply, want);
    // Closed about a second after the last chunk (2.4 s + 1 s).
    assert!(waited < Duration::from_secs(8), "{waited:?}");
}

/// SPDY carries the half-close (a FIN on the data stream). As containerd,
/// the test server then gives the pod one second to answer (it never
/// shuts the pod's side down): the same outcome as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_over_spdy_gives_the_pod_the_runtime_grace() {
    half_close_gives_the_pod_a_second(Env::with("spdy").await).await;
}

async fn half_close_gives_the_pod_a_second(env: Env) {
    // Answers after 5 bytes, then closes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let answers = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 5];
                s.read_exact(&mut b).await.unwrap();
                // Reply after the client has half-closed.
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.write_all(&b.repeat(100_000)).await.unwrap();
            });
        }
    });
    let waits = greeter("").await; // echoes, never closes on its own
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&[
        "pod/web",
        &format!(":{answers}"),
        &format!(":{waits}"),
        "--address",
        "127.0.0.1",
    ]);
    let local = kp.local_port().await;
    let (reply, _) = half_closed_exchange(local, b"hello").await;
    assert_eq!(reply, b"hello".repeat(100_000));
    // The second pair: the pod never closes; the connection ends after the timeout.
    let second: u16 = eventually(DEADLINE, "the second Forwarding line", || {
        kp.stdout_lines().get(1).and_then(|l| {
            l.strip_prefix("Forwarding from 127.0.0.1:")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
    })
    .await;
    let (echoed, waited) = half_closed_exchange(second, b"ping").await;
    assert_eq!(echoed, b"ping");
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    if env.transport == Some("websocket") {
        kp.wait_stderr("v5=false").await;
    }
    kp.signal(libc::SIGINT);
    assert!(kp.wait_exit().await.success());
    kp.wait_stderr(" 0 errors").await;
}

/// A request written in two small pieces gets its reply without a Nagle +
/// delayed-ACK stall (40 ms) on kproxy's side of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_writes_are_not_delayed_over_websocket() {
    small_writes_are_not_delayed(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_writes_are_not_delayed_over_spdy() {
    small_writes_are_not_delayed(Env::with("spdy").await).await;
}

async fn small_writes_are_not_delayed(env: Env) {
    // Answers "ok" once it has the 2-byte request.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut b = [0u8; 2];
                while s.read_exact(&mut b).await.is_ok() {
                    if s.write_all(b"ok").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    let mut s = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut times = Vec::new();
    for _ in 0..30 {
        let start = Instant::now();
        s.write_all(b"a").await.unwrap();
        // Let the first byte leave as its own frame.
        tokio::time::sleep(Duration::from_millis(1)).await;
        s.write_all(b"b").await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    assert!(
        median < Duration::from_millis(25),
        "median {median:?}: {times:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_over_websocket() {
    two_hundred_concurrent_connections(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_over_spdy() {
    two_hundred_concurrent_connections(Env::with("spdy").await).await;
}

async fn two_hundred_concurrent_connections(env: Env) {
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        tasks.spawn(async move {
            let msg: Vec<u8> = (0..64 * 1024u32)
                .map(|j| ((i * 31 + j) % 251) as u8)
                .collect();
            let back = roundtrip(local, &msg).await?;
            if back != msg {
                return Err(std::io::Error::other(format!(
                    "connection {i}: bytes differ"
                )));
            }
            Ok(())
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.unwrap() {
            failures.push(e.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{failures:?}\nstderr:\n{}",
        kp.stderr_text()
    );
    kp.signal(libc::SIGINT);
    assert!(kp.wait_exit().await.success());
    kp.wait_stderr("200 connections,").await;
    kp.wait_stderr(" 0 errors").await;
}

// ---------------------------------------------------------------- failures kubectl does not survive

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_ends_that_connection_only_over_websocket() {
    a_refused_connection_ends_that_connection_only(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_ends_that_connection_only_over_spdy() {
    a_refused_connection_ends_that_connection_only(Env::with("spdy").await).await;
}

async fn a_refused_connection_ends_that_connection_only(env: Env) {
    let port = closed_port();
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    // The pod refuses: the error channel says so, this connection ends.
    let mut s = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("the refused connection was not closed");
    assert!(r.is_err() || buf.is_empty(), "{r:?} {buf:?}");
    kp.wait_stderr("the forward goes on").await;
    kp.wait_stderr("refused").await;
    // The forward still serves: once the pod listens, connections work.
    let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"up").await;
        }
    });
    assert_eq!(greeting(local, 2).await.unwrap(), "up");
    assert!(kp.child.try_wait().unwrap().is_none(), "kproxy exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_connection_ends_that_connection_only_over_websocket() {
    a_reset_connection_ends_that_connection_only(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_connection_ends_that_connection_only_over_spdy() {
    a_reset_connection_ends_that_connection_only(Env::with("spdy").await).await;
}

async fn a_reset_connection_ends_that_connection_only(env: Env) {
    // The first connection is reset by the pod, the others are echoed.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut s, _)) = l.accept().await {
            if first {
                first = false;
                let mut b = [0u8; 3];
                let _ = s.read_exact(&mut b).await;
                s.set_zero_linger().unwrap();
                drop(s); // RST
                continue;
            }
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    let first = roundtrip(local, b"abc").await;
    assert!(first.is_err(), "the reset connection got {first:?}");
    assert_eq!(roundtrip(local, b"again").await.unwrap(), b"again");
    assert_eq!(roundtrip(local, b"and again").await.unwrap(), b"and again");
    assert!(kp.child.try_wait().unwrap().is_none(), "kproxy exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svc_follows_a_replaced_pod_over_websocket() {
    svc_follows_a_replaced_pod(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svc_follows_a_replaced_pod_over_spdy() {
    svc_follows_a_replaced_pod(Env::with("spdy").await).await;
}

async fn svc_follows_a_replaced_pod(env: Env) {
    let a = greeter("pod-a").await;
    let b = greeter("pod-b").await;
    // targetPort by name: each pod has "http" on its own port.
    env.server.apply(service("web", 80, json!("http"))).unwrap();
    env.server
        .apply(pod("web-a", json!({"app": "web"}), &[("http", a)]))
        .unwrap();
    let mut kp = env.forward(&["svc/web", ":80"]);
    let local = kp.local_port().await;
    assert_eq!(greeting(local, 5).await.unwrap(), "pod-a");
    env.server.delete(&pod("web-a", json!({}), &[])).unwrap();
    env.server
        .apply(pod("web-b", json!({"app": "web"}), &[("http", b)]))
        .unwrap();
    // The watch cache learns of the change a moment later: a connection
    // made in that moment may still reach the old pod (here still
    // listening; over WebSocket the API server's 404 re-resolves it).
    let end = Instant::now() + DEADLINE;
    while greeting(local, 5).await.ok().as_deref() != Some("pod-b") {
        assert!(Instant::now() < end, "never reached pod-b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        assert_eq!(greeting(local, 5).await.unwrap(), "pod-b");
    }
    kp.wait_stderr("forwarding to pod web-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_follows_a_replaced_pod() {
    let env = Env::new().await;
    let a = greeter("pod-a").await;
    let b = greeter("pod-b").await;
    env.server.apply(deployment("web")).unwrap();
    env.server
        .apply(pod("web-a", json!({"app": "web"}), &[("http", a)]))
        .unwrap();
    // Not running: never chosen.
    let mut pending = pod("web-0", json!({"app": "web"}), &[("http", closed_port())]);
    pending["status"]["phase"] = json!("Pending");
    pending["status"]["conditions"][0]["status"] = json!("False");
    env.server.apply(pending).unwrap();
    let mut kp = env.forward(&["deployment/web", "0:http"]);
    let local = kp.local_port().await;
    assert_eq!(greeting(local, 5).await.unwrap(), "pod-a");
    env.server.delete(&pod("web-a", json!({}), &[])).unwrap();
    // No running pod for a moment: new connections wait for one.
    let waiting = tokio::spawn(greeting(local, 5));
    kp.wait_stderr("waiting for a running pod of deployment web")
        .await;
    env.server
        .apply(pod("web-b", json!({"app": "web"}), &[("http", b)]))
        .unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), "pod-b");
    assert_eq!(greeting(local, 5).await.unwrap(), "pod-b");
}

/// A greeter at 127.0.0.2 on a port that is free on 127.0.0.1 too (for a
/// pod whose container port kproxy listens on locally); returns its port.
async fn greeter_at_127_0_0_2(greeting: &'static str) -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(greeting.as_bytes()).await;
                });
            }
        });
        return port;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_port_name_listens_on_the_resolved_number() {
    let env = Env::new().await;
    // pod/web http: the container port on both sides, as kubectl.
    let http = greeter_at_127_0_0_2("hello").await;
    let mut web = pod("web", json!({"app": "web"}), &[("http", http)]);
    web["status"]["podIP"] = json!("127.0.0.2");
    env.server.apply(web).unwrap();
    let mut kp = env.forward(&["pod/web", "http", "--address", "127.0.0.1"]);
    assert_eq!(kp.local_port().await, http);
    assert_eq!(
        kp.stdout_lines(),
        [format!("Forwarding from 127.0.0.1:{http} -> {http}")]
    );
    assert_eq!(greeting(http, 5).await.unwrap(), "hello");
    drop(kp);
    // svc/web web: the Service port's number locally, its targetPort on
    // the pod.
    let svc_port = closed_port();
    env.server
        .apply(service("web", svc_port, json!("http")))
        .unwrap();
    let mut kp = env.forward(&["svc/web", "web", "--address", "127.0.0.1"]);
    assert_eq!(kp.local_port().await, svc_port);
    assert_eq!(
        kp.stdout_lines(),
        [format!("Forwarding from 127.0.0.1:{svc_port} -> {http}")]
    );
    assert_eq!(greeting(svc_port, 5).await.unwrap(), "hello");
}

/// A Running pod whose Ready condition is False.
fn unready_pod(name: &str, labels: Value, ports: &[(&str, u16)]) -> Value {
    let mut p = pod(name, labels, ports);
    p["status"]["conditions"][0]["status"] = json!("False");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svc_and_deploy_over_a_running_unready_pod_forward_at_once() {
    let env = Env::new().await;
    let unready = greeter("unready").await;
    let ready = greeter("ready-1").await;
    env.server.apply(service("nr", 80, json!("http"))).unwrap();
    env.server.apply(deployment("nr")).unwrap();
    env.server
        .apply(unready_pod(
            "nr-0",
            json!({"app": "nr"}),
            &[("http", unready)],
        ))
        .unwrap();
    // As kubectl: forwarded to at once (a short wait makes a regression
    // fail fast instead of waiting for a ready pod).
    let args = ["--pod-wait-timeout", "2s", "--check-interval", "100ms"];
    let mut svc = env.forward(&[&["svc/nr", ":80"][..], &args].concat());
    let mut deploy = env.forward(&[&["deploy/nr", ":http"][..], &args].concat());
    let (svc_port, deploy_port) = (svc.local_port().await, deploy.local_port().await);
    for _ in 0..3 {
        assert_eq!(greeting(svc_port, 7).await.unwrap(), "unready");
        assert_eq!(greeting(deploy_port, 7).await.unwrap(), "unready");
    }
    for (kp, what) in [(&svc, "service nr"), (&deploy, "deployment nr")] {
        let warn = format!("pod nr-0 of {what} is not ready: forwarding to it anyway");
        // Once, not per connection or target check.
        assert_eq!(
            kp.stderr_text().matches(&warn).count(),
            1,
            "{}",
            kp.stderr_text()
        );
    }
    // A ready pod appears: new connections go to it.
    env.server
        .apply(pod("nr-1", json!({"app": "nr"}), &[("http", ready)]))
        .unwrap();
    for port in [svc_port, deploy_port] {
        let end = Instant::now() + DEADLINE;
        while greeting(port, 7).await.ok().as_deref() != Some("ready-1") {
            assert!(Instant::now() < end, "never reached the ready pod");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(greeting(port, 7).await.unwrap(), "ready-1");
    }
    // The ready pod goes away: back to the not-ready one, at once.
    env.server.delete(&pod("nr-1", json!({}), &[])).unwrap();
    for port in [svc_port, deploy_port] {
        let end = Instant::now() + DEADLINE;
        while greeting(port, 7).await.ok().as_deref() != Some("unready") {
            assert!(Instant::now() < end, "never went back to the not-ready pod");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    svc.wait_stderr("now forwarding to pod nr-0").await;
    assert!(svc.child.try_wait().unwrap().is_none(), "kproxy exited");
    assert!(deploy.child.try_wait().unwrap().is_none(), "kproxy exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_target_waits_for_the_pod_to_come_back() {
    let env = Env::new().await;
    let port = greeter("hello").await;
    let web = pod("web", json!({}), &[]);
    env.server.apply(web.clone()).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}"), "--check-interval", "100ms"]);
    let local = kp.local_port().await;
    assert_eq!(greeting(local, 5).await.unwrap(), "hello");
    env.server.delete(&web).unwrap();
    kp.wait_stderr("waiting for pod web to come back").await;
    // A connection made meanwhile waits, and is served once the pod is back.
    let waiting = tokio::spawn(greeting(local, 5));
    tokio::task::yield_now().await;
    env.server.apply(web).unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), "hello");
    kp.wait_stderr("pod web is back").await;
    assert!(kp.child.try_wait().unwrap().is_none(), "kproxy exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gone_for_good_ends_with_an_error() {
    let env = Env::new().await;
    let port = echo_server().await;
    let web = pod("web", json!({}), &[]);
    env.server.apply(web.clone()).unwrap();
    let mut kp = env.forward(&[
        "pod/web",
        &format!(":{port}"),
        "--check-interval",
        "100ms",
        "--pod-wait-timeout",
        "1s",
    ]);
    let local = kp.local_port().await;
    env.server.delete(&web).unwrap();
    let status = kp.wait_exit().await;
    assert_eq!(status.code(), Some(1), "stderr:\n{}", kp.stderr_text());
    kp.wait_stderr("error: pod web did not come back within --pod-wait-timeout 1s")
        .await;
    assert!(!listening(local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_deployment_ends_with_an_error() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(deployment("web")).unwrap();
    env.server
        .apply(pod("web-a", json!({"app": "web"}), &[]))
        .unwrap();
    let mut kp = env.forward(&[
        "deploy/web",
        &format!(":{port}"),
        "--check-interval",
        "100ms",
    ]);
    let local = kp.local_port().await;
    assert_eq!(roundtrip(local, b"x").await.unwrap(), b"x");
    env.server.delete(&deployment("web")).unwrap();
    let status = kp.wait_exit().await;
    assert_eq!(status.code(), Some(1), "stderr:\n{}", kp.stderr_text());
    kp.wait_stderr("error: deployment web is gone").await;
    assert!(!listening(local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_api_server_drops_over_websocket() {
    reconnects_after_the_api_server_drops(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_api_server_drops_over_spdy() {
    reconnects_after_the_api_server_drops(Env::with("spdy").await).await;
}

async fn reconnects_after_the_api_server_drops(env: Env) {
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}"), "--check-interval", "100ms"]);
    let local = kp.local_port().await;
    assert_eq!(roundtrip(local, b"before").await.unwrap(), b"before");
    env.server.stop();
    kp.wait_stderr("lost the connection to the API server")
        .await;
    // A connection made during the outage waits for the API server.
    let during = tokio::spawn(roundtrip(local, b"during"));
    env.server.restart().await.unwrap();
    kp.wait_stderr("reconnected to the API server").await;
    assert_eq!(during.await.unwrap().unwrap(), b"during");
    assert_eq!(roundtrip(local, b"after").await.unwrap(), b"after");
}

/// The runtime cuts port-forward streams that carry no data for 500ms (as
/// containerd's stream_idle_timeout: pings do not count).
async fn idle_forward(env: Env, keepalive_interval: &str) -> (Env, Kproxy, TcpStream) {
    env.server
        .set_port_forward_idle_timeout(Some(Duration::from_millis(500)));
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&[
        "pod/web",
        &format!(":{port}"),
        "--keepalive-interval",
        keepalive_interval,
    ]);
    let local = kp.local_port().await;
    let mut s = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    (env, kp, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_forward_is_kept_alive_by_keepalives_over_websocket() {
    an_idle_forward_is_kept_alive_by_keepalives(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_forward_is_kept_alive_by_keepalives_over_spdy() {
    an_idle_forward_is_kept_alive_by_keepalives(Env::with("spdy").await).await;
}

async fn an_idle_forward_is_kept_alive_by_keepalives(env: Env) {
    let (env, _kp, mut s) = idle_forward(env, "100ms").await;
    // Idle for three times the server's idle timeout (this wait is the behaviour under test).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(env.server.port_forwards_idle_cut(), 0);
    s.write_all(b"b").await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"b");
}

/// The control: without keepalives in time the server does cut (so the test above can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keepalives_the_idle_stream_is_cut_over_websocket() {
    without_keepalives_the_idle_stream_is_cut(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keepalives_the_idle_stream_is_cut_over_spdy() {
    without_keepalives_the_idle_stream_is_cut(Env::with("spdy").await).await;
}

async fn without_keepalives_the_idle_stream_is_cut(env: Env) {
    let (env, _kp, mut s) = idle_forward(env, "1h").await;
    eventually(DEADLINE, "the idle cut", || {
        (env.server.port_forwards_idle_cut() == 1).then_some(())
    })
    .await;
    let mut buf = Vec::new();
    let r = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(r.is_err() || buf.is_empty());
}

/// The real thing: 10 minutes idle with the default keepalive interval (30s)
/// behind a 45s idle cut-off. `cargo test -p kproxy --test forward -- --ignored`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes 10 minutes"]
async fn idle_for_ten_minutes_with_default_keepalives() {
    let env = Env::new().await;
    env.server
        .set_port_forward_idle_timeout(Some(Duration::from_secs(45)));
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    let mut s = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    s.write_all(b"b").await.unwrap();
    tokio::time::timeout(DEADLINE, s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"b");
    assert_eq!(env.server.port_forwards_idle_cut(), 0);
}

// ---------------------------------------------------------------- the API connections

/// The port-forward upgrades carry kube's credentials on kproxy's own
/// connections: here a token from an exec plugin (kube's refreshable
/// token), which the API server checks on every port-forward request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forwards_carry_the_exec_plugins_token_over_websocket() {
    port_forwards_carry_the_exec_plugins_token(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forwards_carry_the_exec_plugins_token_over_spdy() {
    port_forwards_carry_the_exec_plugins_token(Env::with("spdy").await).await;
}

async fn port_forwards_carry_the_exec_plugins_token(env: Env) {
    use std::os::unix::fs::PermissionsExt;
    let plugin = env.dir.path().join("credential-plugin");
    std::fs::write(
        &plugin,
        "#!/bin/sh\necho '{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{\"token\":\"from-the-plugin\"}}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kubeconfig = std::fs::read_to_string(&env.kubeconfig).unwrap().replace(
        "    token: kproxy-test\n",
        &format!(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never\n",
            plugin.display()
        ),
    );
    assert!(kubeconfig.contains("exec:"), "{kubeconfig}");
    std::fs::write(&env.kubeconfig, kubeconfig).unwrap();
    // The control: a server that wants another token turns it away.
    env.server.require_port_forward_token(Some("another"));
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    assert!(roundtrip(local, b"x").await.is_err());
    kp.wait_stderr("(401): Unauthorized").await;
    env.server
        .require_port_forward_token(Some("from-the-plugin"));
    for i in 0..3u8 {
        assert_eq!(roundtrip(local, &[i; 100]).await.unwrap(), vec![i; 100]);
    }
}

/// A TCP proxy in front of the API server that closes a connection on
/// which nothing arrives within `idle` (a load balancer's idle timeout);
/// returns its port and how many connections it closed so.
async fn idle_closing_proxy(
    upstream: std::net::SocketAddr,
    idle: Duration,
) -> (u16, Arc<std::sync::atomic::AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let closed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let closed = counter.clone();
            tokio::spawn(async move {
                let mut first = vec![0u8; 64 * 1024];
                let n = match tokio::time::timeout(idle, client.read(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    Ok(_) => return,
                    Err(_) => {
                        closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                };
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if server.write_all(&first[..n]).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (port, closed)
}

/// kproxy keeps an API server connection ready for the next local
/// connection; one closed meanwhile (here by a load balancer's idle
/// timeout) is replaced at once: the connection goes through, and no
/// reconnect is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_api_connection_closed_while_idle_is_replaced() {
    let env = Env::with("websocket").await;
    let (lb, closed) = idle_closing_proxy(env.server.addr(), Duration::from_millis(300)).await;
    let kubeconfig = std::fs::read_to_string(&env.kubeconfig)
        .unwrap()
        .replace(&env.server.url(), &format!("http://127.0.0.1:{lb}"));
    std::fs::write(&env.kubeconfig, kubeconfig).unwrap();
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    eventually(DEADLINE, "the idle connection closed by the proxy", || {
        (closed.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    assert_eq!(roundtrip(local, b"after").await.unwrap(), b"after");
    assert_eq!(roundtrip(local, b"again").await.unwrap(), b"again");
    let stderr = kp.stderr_text();
    assert!(
        !stderr.contains("lost the connection to the API server"),
        "{stderr}"
    );
    kp.signal(libc::SIGINT);
    assert!(kp.wait_exit().await.success());
    kp.wait_stderr("2 connections, 10 bytes in, 10 bytes out, 0 errors")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_port_forward_fails_that_connection_only() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    env.server.deny("pods/portforward");
    assert!(roundtrip(local, b"x").await.is_err());
    kp.wait_stderr("no permission to port-forward to pod web (403 Forbidden)")
        .await;
    env.server.allow("pods/portforward");
    assert_eq!(roundtrip(local, b"y").await.unwrap(), b"y");
}

/// A role written for kubectl's SPDY (create, no get on pods/portforward):
/// the WebSocket is refused, kproxy falls back to SPDY as kubectl does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_only_role_falls_back_to_spdy() {
    let env = Env::new().await;
    env.server.set_role(Some(&[
        ("pods", &["get", "list"][..]),
        ("pods/portforward", &["create"][..]),
    ]));
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    for i in 0..5u8 {
        assert_eq!(roundtrip(local, &[i; 1000]).await.unwrap(), vec![i; 1000]);
    }
    kp.wait_stderr("using SPDY from now on").await;
    kp.wait_stderr("cannot get resource \"pods/portforward\"")
        .await;
    // One WebSocket refusal, then SPDY only: one upgrade for the session.
    assert_eq!(kp.stderr_text().matches("refused the WebSocket").count(), 1);
    kp.signal(libc::SIGINT);
    assert!(kp.wait_exit().await.success());
    kp.wait_stderr("5 connections, 5000 bytes in, 5000 bytes out, 0 errors")
        .await;
}

/// A server (or a proxy on the way) that answers the WebSocket upgrade
/// with 400: kproxy falls back to SPDY as kubectl does, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_refused_with_400_falls_back_to_spdy() {
    let env = Env::new().await;
    env.server.refuse_websocket_port_forwards(true);
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    for i in 0..3u8 {
        assert_eq!(roundtrip(local, &[i; 100]).await.unwrap(), vec![i; 100]);
    }
    kp.wait_stderr("refused the WebSocket port-forward (400")
        .await;
    kp.wait_stderr("using SPDY from now on").await;
    assert_eq!(kp.stderr_text().matches("refused the WebSocket").count(), 1);
    // One WebSocket try, then one SPDY session for all three connections.
    assert_eq!(env.server.port_forward_requests(), 2);
}

/// 1.35: a WebSocket also needs create. A get-only role fails both ways,
/// and the message says what each protocol needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_1_35_mode_a_get_only_role_fails_with_both_reasons() {
    let env = Env::new().await;
    env.server.set_websocket_create_check(true);
    env.server.set_role(Some(&[
        ("pods", &["get", "list"][..]),
        ("pods/portforward", &["get"][..]),
    ]));
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    assert!(roundtrip(local, b"x").await.is_err());
    kp.wait_stderr("no permission to port-forward to pod web (403 Forbidden): over WebSocket:")
        .await;
    kp.wait_stderr("cannot create resource \"pods/portforward\"")
        .await;
    kp.wait_stderr("needs get and create on pods/portforward")
        .await;
    // Granting create fixes it (over WebSocket: get and create).
    env.server.set_role(Some(&[
        ("pods", &["get", "list"][..]),
        ("pods/portforward", &["get", "create"][..]),
    ]));
    assert_eq!(roundtrip(local, b"y").await.unwrap(), b"y");
}

/// The API server has the pod, the kubelet says it does not exist: the
/// connection gives up after a few tries (it used to retry forever) with a
/// message saying so; the forward goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_unknown_to_the_kubelet_fails_the_connection_after_bounded_retries() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    env.server.set_unknown_to_kubelet("web", true);
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    let started = Instant::now();
    assert!(roundtrip(local, b"x").await.is_err());
    kp.wait_stderr("the kubelet says pod web does not exist (pod does not exist; 3 attempts")
        .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    // Each try went to the kubelet over WebSocket only (a 404 is no reason for SPDY).
    assert_eq!(env.server.port_forward_requests(), 3);
    assert!(kp.child.try_wait().unwrap().is_none(), "kproxy exited");
    env.server.set_unknown_to_kubelet("web", false);
    assert_eq!(roundtrip(local, b"y").await.unwrap(), b"y");
}

/// 429 Too Many Requests (API priority and fairness): the connection waits
/// for Retry-After and tries again, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_set_up_waits_for_retry_after() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    env.server.throttle_port_forwards(2);
    let started = Instant::now();
    assert_eq!(roundtrip(local, b"late").await.unwrap(), b"late");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1900), "{waited:?}");
    kp.wait_stderr("the API server is throttling port-forward requests (429 Too Many Requests")
        .await;
    kp.wait_stderr("retrying in 1s").await;
}

/// A server that keeps answering 429: the connection gives up after a
/// bounded number of tries with a message naming the cause and the remedy;
/// the forward goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_up_throttled_for_good_fails_that_connection_only() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
    let local = kp.local_port().await;
    env.server.throttle_port_forwards(1000);
    assert!(roundtrip(local, b"x").await.is_err());
    kp.wait_stderr("the API server kept refusing the port-forward with 429 Too Many Requests")
        .await;
    kp.wait_stderr("6 attempts").await;
    kp.wait_stderr("a lower --max-concurrent-setups").await;
    assert_eq!(env.server.port_forward_requests(), 6);
    assert!(kp.child.try_wait().unwrap().is_none(), "kproxy exited");
    env.server.throttle_port_forwards(0);
    assert_eq!(roundtrip(local, b"y").await.unwrap(), b"y");
}

/// A burst of local connections is set up at most --max-concurrent-setups
/// at a time (the rest queue), so it cannot flood the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_ups_are_bounded_and_queued() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    env.server
        .set_port_forward_setup_delay(Some(Duration::from_millis(50)));
    let mut kp = env.forward(&[
        "pod/web",
        &format!(":{port}"),
        "--max-concurrent-setups",
        "4",
    ]);
    let local = kp.local_port().await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40u8 {
        tasks.spawn(async move { roundtrip(local, &[i; 100]).await.map(|b| b == [i; 100]) });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(r.unwrap().unwrap());
    }
    let max = env.server.port_forward_max_in_flight();
    assert!((1..=4).contains(&max), "{max} set-ups at once");
    assert_eq!(env.server.port_forward_requests(), 40);
}

/// The watch cache: once it is filled, a new connection costs no API
/// request before its port-forward (no GET of the Service, no LIST of its
/// pods). (That a replaced pod is followed: `svc_follows_a_replaced_pod`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_resolve_from_the_watch_cache() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server
        .apply(pod("web-1", json!({"app": "web"}), &[]))
        .unwrap();
    env.server.apply(service("web", 80, json!(port))).unwrap();
    let mut kp = env.forward(&["svc/web", ":80"]);
    let local = kp.local_port().await;
    // API requests other than port-forwards (the watches count once each).
    let other = || env.server.requests() - env.server.port_forward_requests();
    // Until the watches have listed, connections ask the API server.
    let started = Instant::now();
    loop {
        let before = other();
        assert_eq!(roundtrip(local, b"warm").await.unwrap(), b"warm");
        if other() == before {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "every connection still makes API requests ({} so far)",
            other()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = other();
    for i in 0..50u8 {
        assert_eq!(roundtrip(local, &[i; 10]).await.unwrap(), vec![i; 10]);
    }
    assert_eq!(other(), before, "API requests for 50 connections");
}

/// The local port in a status line `NAME: [up] 127.0.0.1:PORT -> ...`.
fn up_port(line: &str) -> Option<u16> {
    line.split_once("[up] 127.0.0.1:")?
        .1
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// `-f`: forwards from a file. One has a target that does not exist yet:
/// the other serves all along; the broken one says why in its status line,
/// is retried, and comes up once its pod exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_forwards_keeps_the_others_up_when_one_is_broken() {
    let env = Env::new().await;
    let web_port = echo_server().await;
    let db_port = greeter("db-up").await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let file = env.dir.path().join("forwards.yaml");
    std::fs::write(
        &file,
        format!(
            "forwards:\n- target: pod/web\n  ports: [':{web_port}']\n- target: pod/db\n  ports: [':{db_port}']\n"
        ),
    )
    .unwrap();
    let mut kp = env.forward(&["-f", file.to_str().unwrap(), "--address", "127.0.0.1"]);
    let web: u16 = eventually(DEADLINE, "pod/web up", || {
        kp.stdout_lines()
            .iter()
            .find(|l| l.starts_with("pod/web: [up]"))
            .and_then(|l| up_port(l))
    })
    .await;
    assert_eq!(roundtrip(web, b"one").await.unwrap(), b"one");
    eventually(DEADLINE, "pod/db's error line", || {
        kp.stdout_lines()
            .iter()
            .any(|l| {
                l.starts_with("pod/db: [error] pod \"db\" in namespace \"default\" not found; trying again in")
            })
            .then_some(())
    })
    .await;
    assert!(kp.child.try_wait().unwrap().is_none(), "kproxy exited");
    // The good one is untouched by the other's retries.
    assert_eq!(roundtrip(web, b"two").await.unwrap(), b"two");
    env.server.apply(pod("db", json!({}), &[])).unwrap();
    let db: u16 = eventually(Duration::from_secs(60), "pod/db up", || {
        kp.stdout_lines()
            .iter()
            .find(|l| l.starts_with("pod/db: [up]"))
            .and_then(|l| up_port(l))
    })
    .await;
    assert_eq!(greeting(db, 5).await.unwrap(), "db-up");
    // A plain line per change (stdout is not a terminal here).
    let lines = kp.stdout_lines();
    assert!(lines.iter().all(|l| !l.contains('\x1b')), "{lines:?}");
    kp.signal(libc::SIGINT);
    assert!(kp.wait_exit().await.success());
    kp.wait_stderr("kproxy forward: pod/web: 2 connections, 6 bytes in, 6 bytes out, 0 errors")
        .await;
    kp.wait_stderr("kproxy forward: pod/db: 1 connections")
        .await;
}

// ---------------------------------------------------------------- bad input

/// Runs kproxy with bad input: exit code 1, one line on stderr naming the
/// cause, and nothing listening on `local`.
async fn refused(env: &Env, args: &[&str], cause: &str, local: Option<u16>) {
    let mut kp = env.forward_quiet(args);
    let status = kp.wait_exit().await;
    let stderr = kp.stderr_text();
    assert_eq!(status.code(), Some(1), "{args:?}: stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(cause),
        "{args:?}: {stderr:?} lacks {cause:?}"
    );
    // Said once: an error's text does not repeat its cause's.
    assert_eq!(lines[0].matches(cause).count(), 1, "{args:?}: {stderr:?}");
    assert!(kp.stdout_lines().is_empty(), "{:?}", kp.stdout_lines());
    if let Some(p) = local {
        assert!(!listening(p), "{args:?}: port {p} is listening");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_one_line_and_exit_code_1() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server
        .apply(pod("web", json!({}), &[("http", port)]))
        .unwrap();
    let free = closed_port();
    let pair = format!("{free}:{port}");
    refused(
        &env,
        &["foo/web", &pair],
        "unknown target kind \"foo\"",
        Some(free),
    )
    .await;
    refused(
        &env,
        &["pod/web", &format!("{free}:grpc")],
        "pod web has no container port named \"grpc\"",
        Some(free),
    )
    .await;
    refused(
        &env,
        &["pod/web", "0"],
        "port 0 in \"0\" is out of range",
        None,
    )
    .await;
    refused(
        &env,
        &["pod/web", "65536:80"],
        "port 65536 in \"65536:80\" is out of range",
        None,
    )
    .await;
    refused(
        &env,
        &["pod/nope", &pair],
        "pod \"nope\" in namespace \"default\" not found",
        Some(free),
    )
    .await;
    refused(
        &env,
        &["svc/nope", &pair],
        "service \"nope\" in namespace \"default\" not found",
        Some(free),
    )
    .await;
    refused(
        &env,
        &["pod/web", &pair, "--address", "nowhere"],
        "invalid --address",
        Some(free),
    )
    .await;
    // TEST-NET-1: no interface of this host has it.
    refused(
        &env,
        &["pod/web", &pair, "--address", "192.0.2.1"],
        &format!("cannot listen on 192.0.2.1:{free}: Cannot assign requested address (os error 99) (no interface has this address"),
        None,
    )
    .await;
    // An API server that is not there: one line (no log line of kube's),
    // naming the server and the cause.
    let dead = closed_port();
    let server = format!("http://127.0.0.1:{dead}");
    for cause in [
        format!("cannot reach the API server {server}/: "),
        "Connection refused".to_string(),
    ] {
        refused(&env, &["pod/web", &pair, "-s", &server], &cause, Some(free)).await;
    }
    // As kubectl: an empty --address is no address, not the default.
    refused(
        &env,
        &["pod/web", &pair, "--address="],
        "you must specify at least 1 address",
        Some(free),
    )
    .await;
    env.server.deny("pods");
    refused(
        &env,
        &["pod/web", &pair],
        "no permission (403 Forbidden)",
        Some(free),
    )
    .await;
    env.server.allow("pods");
    // In use: the test holds the port.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let used = held.local_addr().unwrap().port();
    refused(
        &env,
        &["pod/web", &format!("{used}:{port}")],
        &format!("local port {used} on 127.0.0.1 is already in use"),
        None,
    )
    .await;
    // Two pairs, the second bad: the first is not left listening either.
    refused(
        &env,
        &["pod/web", &pair, &format!("{used}:{port}")],
        "already in use",
        Some(free),
    )
    .await;
}

#[tokio::test]
async fn missing_arguments_are_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(["forward", "pod/web"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}

// ---------------------------------------------------------------- output

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prints_kubectls_forwarding_lines() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let free = closed_port();
    let mut kp = env.forward(&["pod/web", &format!("{free}:{port}"), &format!(":{port}")]);
    kp.local_port().await;
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let expected_lines = if ipv6 { 4 } else { 2 };
    eventually(DEADLINE, "the Forwarding lines", || {
        (kp.stdout_lines().len() >= expected_lines).then_some(())
    })
    .await;
    let lines = kp.stdout_lines();
    assert_eq!(
        lines[0],
        format!("Forwarding from 127.0.0.1:{free} -> {port}")
    );
    let mut i = 1;
    if ipv6 {
        assert_eq!(lines[1], format!("Forwarding from [::1]:{free} -> {port}"));
        i = 2;
    }
    // `:REMOTE`: a free local port, the same on both addresses, printed.
    let random: u16 = lines[i]
        .strip_prefix("Forwarding from 127.0.0.1:")
        .and_then(|r| r.strip_suffix(&format!(" -> {port}")))
        .unwrap_or_else(|| panic!("{lines:?}"))
        .parse()
        .unwrap();
    assert_ne!(random, 0);
    if ipv6 {
        assert_eq!(
            lines[i + 1],
            format!("Forwarding from [::1]:{random} -> {port}")
        );
    }
    assert_eq!(roundtrip(free, b"one").await.unwrap(), b"one");
    assert_eq!(roundtrip(random, b"two").await.unwrap(), b"two");
    if ipv6 {
        let mut s = TcpStream::connect(("::1", random)).await.unwrap();
        s.write_all(b"six").await.unwrap();
        let mut b = [0u8; 3];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"six");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svc_maps_the_service_port_to_the_target_port() {
    let env = Env::new().await;
    let named = greeter("named").await;
    let numbered = greeter("numbered").await;
    env.server
        .apply(pod("api-1", json!({"app": "api"}), &[("http", named)]))
        .unwrap();
    // Named targetPort, and the service port given by its name.
    env.server.apply(service("api", 80, json!("http"))).unwrap();
    let mut kp = env.forward(&["service/api", ":web", "--address", "127.0.0.1"]);
    let local = kp.local_port().await;
    assert_eq!(
        kp.stdout_lines()[0],
        format!("Forwarding from 127.0.0.1:{local} -> {named}")
    );
    assert_eq!(greeting(local, 5).await.unwrap(), "named");
    drop(kp);
    // Numeric targetPort.
    env.server
        .apply(service("api", 8080, json!(numbered)))
        .unwrap();
    let mut kp = env.forward(&["svc/api", ":8080", "--address", "127.0.0.1"]);
    let local = kp.local_port().await;
    assert_eq!(
        kp.stdout_lines()[0],
        format!("Forwarding from 127.0.0.1:{local} -> {numbered}")
    );
    assert_eq!(greeting(local, 8).await.unwrap(), "numbered");
    // A port the service does not have.
    let mut kp = env.forward(&["svc/api", ":81"]);
    assert_eq!(kp.wait_exit().await.code(), Some(1));
    kp.wait_stderr("error: service api has no port 81").await;
}

/// IPv6 listeners are IPv6 only, as Go's (kubectl's): `--address 0.0.0.0,::`
/// binds both (it was "already in use"), and `--address ::` does not take
/// IPv4 connections. Needs ::1 (the test fails if the host has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listeners_are_ipv6_only() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let mut kp = env.forward_quiet(&["pod/web", &format!(":{port}"), "--address", "0.0.0.0,::"]);
    let lines = eventually(DEADLINE, "two Forwarding lines", || {
        if let Ok(Some(status)) = kp.child.try_wait() {
            panic!("kproxy exited ({status}): {}", kp.stderr_text());
        }
        let lines = kp.stdout_lines();
        (lines.len() == 2).then_some(lines)
    })
    .await;
    let local: u16 = lines[0]
        .strip_prefix("Forwarding from 0.0.0.0:")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("{lines:?}"))
        .parse()
        .unwrap();
    assert_eq!(lines[1], format!("Forwarding from [::]:{local} -> {port}"));
    assert_eq!(roundtrip(local, b"v4").await.unwrap(), b"v4");
    let mut s = TcpStream::connect(("::1", local)).await.unwrap();
    s.write_all(b"v6").await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"v6");
    drop((s, kp));

    let mut kp = env.forward_quiet(&["pod/web", &format!(":{port}"), "--address", "::"]);
    let line = eventually(DEADLINE, "a Forwarding line", || {
        if let Ok(Some(status)) = kp.child.try_wait() {
            panic!("kproxy exited ({status}): {}", kp.stderr_text());
        }
        kp.stdout_lines().first().cloned()
    })
    .await;
    let local: u16 = line
        .strip_prefix("Forwarding from [::]:")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    let mut s = TcpStream::connect(("::1", local)).await.unwrap();
    s.write_all(b"v6").await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"v6");
    let v4 = TcpStream::connect(("127.0.0.1", local)).await;
    assert!(v4.is_err(), "--address :: took an IPv4 connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_printed_on_sigint_and_sigterm_over_websocket() {
    counters_are_printed_on_sigint_and_sigterm(Env::with("websocket").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_printed_on_sigint_and_sigterm_over_spdy() {
    counters_are_printed_on_sigint_and_sigterm(Env::with("spdy").await).await;
}

async fn counters_are_printed_on_sigint_and_sigterm(env: Env) {
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut kp = env.forward(&["pod/web", &format!(":{port}")]);
        let local = kp.local_port().await;
        assert_eq!(roundtrip(local, b"hello").await.unwrap(), b"hello");
        assert_eq!(roundtrip(local, b"world!").await.unwrap(), b"world!");
        // The counters are updated when a connection's bytes are written; wait for the log.
        kp.wait_stderr("connection closed").await;
        eventually(DEADLINE, "both connections closed", || {
            (kp.stderr_text().matches("connection closed").count() == 2).then_some(())
        })
        .await;
        kp.signal(sig);
        let status = kp.wait_exit().await;
        assert!(status.success(), "{status}: {}", kp.stderr_text());
        kp.wait_stderr("kproxy forward: 2 connections, 11 bytes in, 11 bytes out, 0 errors")
            .await;
        assert!(!listening(local));
    }
}

/// kubectl's kubeconfig selection flags: `--cluster` and `--user` override
/// the context's, and `--pod-running-timeout` is accepted as kubectl's name
/// for the pod wait. The context points at another server (without the
/// pod) and another user (a token the pod's server refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectls_cluster_and_user_flags_pick_the_server_and_credentials() {
    let env = Env::new().await;
    let other = TestApiServer::start().await.unwrap();
    let port = greeter("from-b").await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    env.server.require_port_forward_token(Some("token-b"));
    let kubeconfig = env.dir.path().join("two-clusters");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: a\n  cluster:\n    server: {}\n- name: b\n  cluster:\n    server: {}\ncontexts:\n- name: ctx\n  context:\n    cluster: a\n    user: ua\n    namespace: default\ncurrent-context: ctx\nusers:\n- name: ua\n  user:\n    token: token-a\n- name: ub\n  user:\n    token: token-b\n",
            other.url(),
            env.server.url()
        ),
    )
    .unwrap();
    let target = ["pod/web", &format!(":{port}")];
    // The controls: the context alone has no such pod; cluster b with the
    // context's user is refused.
    let mut kp = Kproxy::start(&kubeconfig, &target, false);
    assert!(!kp.wait_exit().await.success());
    assert!(kp.stderr_text().contains("web"), "{}", kp.stderr_text());
    let mut kp = Kproxy::start(
        &kubeconfig,
        &[&target[..], &["--cluster", "b"]].concat(),
        false,
    );
    let local = kp.local_port().await;
    assert!(greeting(local, 6).await.is_err());
    kp.wait_stderr("(401): Unauthorized").await;
    drop(kp);

    let args = [
        "--cluster",
        "b",
        "--user",
        "ub",
        "--pod-running-timeout",
        "1m",
    ];
    let mut kp = Kproxy::start(&kubeconfig, &[&target[..], &args].concat(), false);
    let local = kp.local_port().await;
    assert_eq!(greeting(local, 6).await.unwrap(), "from-b");
}

/// A target just applied, its pod not running yet, is waited for at start
/// (kubectl's `--pod-running-timeout`), not refused: the forward starts
/// once the pod runs. Past the timeout it is one error line and exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_not_running_yet_at_start_is_waited_for() {
    let env = Env::new().await;
    let port = echo_server().await;
    let mut pending = pod("web", json!({"app": "web"}), &[]);
    pending["status"] = json!({"phase": "Pending"});
    env.server.apply(pending.clone()).unwrap();
    env.server.apply(deployment("web")).unwrap();

    let mut kp = env.forward_quiet(&[
        "pod/web",
        &format!(":{port}"),
        "--pod-wait-timeout",
        "300ms",
    ]);
    assert_eq!(kp.wait_exit().await.code(), Some(1));
    let err = kp.stderr_text();
    assert!(
        err.contains(
            "error: pod web is not running (phase Pending) (waited --pod-wait-timeout 300ms)"
        ),
        "{err}"
    );

    let mut by_pod = env.forward_quiet(&["pod/web", &format!(":{port}")]);
    let mut by_deploy = env.forward_quiet(&["deploy/web", &format!(":{port}")]);
    by_pod
        .wait_stderr("waiting for pod web: pod web is not running (phase Pending)")
        .await;
    by_deploy.wait_stderr("waiting for deployment web: ").await;
    assert!(by_pod.stdout_lines().is_empty());
    env.server
        .apply(pod("web", json!({"app": "web"}), &[]))
        .unwrap();
    for kp in [&mut by_pod, &mut by_deploy] {
        let local = kp.local_port().await;
        assert_eq!(roundtrip(local, b"up").await.unwrap(), b"up");
    }
}

/// SIGINT and SIGTERM while the start waits for a pod that is not running
/// yet end it with exit 0 at once, as once it forwards; also SIGINT from a
/// shell's background job, which starts with SIGINT ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_end_the_start_up_wait_with_exit_0() {
    use std::os::unix::process::CommandExt;
    let env = Env::new().await;
    let mut pending = pod("web", json!({}), &[]);
    pending["status"] = json!({"phase": "Pending"});
    env.server.apply(pending).unwrap();
    for (sig, ignored) in [
        (libc::SIGINT, false),
        (libc::SIGTERM, false),
        (libc::SIGINT, true),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kproxy"));
        cmd.arg("forward")
            .arg("--kubeconfig")
            .arg(&env.kubeconfig)
            .args(["pod/web", ":8080", "--pod-wait-timeout", "5m"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if ignored {
            // SAFETY: signal(2) only, between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::signal(libc::SIGINT, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let mut kp = Kproxy {
            stdout: collect(child.stdout.take().unwrap()),
            stderr: collect(child.stderr.take().unwrap()),
            child,
        };
        kp.wait_stderr("waiting for pod web").await;
        let sent = Instant::now();
        kp.signal(sig);
        let status = kp.wait_exit().await;
        let what = format!("signal {sig} (SIGINT ignored: {ignored})");
        assert_eq!(status.code(), Some(0), "{what}: {}", kp.stderr_text());
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "{what}: took {:?}",
            sent.elapsed()
        );
        assert!(kp.stdout_lines().is_empty(), "{:?}", kp.stdout_lines());
    }
}

/// A `$KUBECONFIG` list with a file that does not exist, in either
/// position, works as with kubectl (client-go skips missing files).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_env_skips_missing_files() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    let missing = env.dir.path().join("missing");
    for paths in [[&missing, &env.kubeconfig], [&env.kubeconfig, &missing]] {
        let value = std::env::join_paths(paths).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kproxy"))
            .args(["forward", "pod/web", &format!(":{port}")])
            .env("KUBECONFIG", &value)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut kp = Kproxy {
            stdout: collect(child.stdout.take().unwrap()),
            stderr: collect(child.stderr.take().unwrap()),
            child,
        };
        let local = kp.local_port().await;
        assert_eq!(roundtrip(local, b"hi").await.unwrap(), b"hi", "{value:?}");
    }
}

/// kubectl's `--request-timeout` (seconds, a duration, or 0) and the
/// impersonation flags `--as`, `--as-group`, `--as-uid` are accepted (they
/// were a usage error) and the forward works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectls_request_timeout_and_impersonation_flags_are_accepted() {
    let env = Env::new().await;
    let port = echo_server().await;
    env.server.apply(pod("web", json!({}), &[])).unwrap();
    for timeout in ["0", "5", "5s"] {
        let mut kp = env.forward_quiet(&[
            "pod/web",
            &format!(":{port}"),
            "--request-timeout",
            timeout,
            "--as",
            "jane",
            "--as-group",
            "devs",
            "--as-group",
            "ops",
            "--as-uid",
            "1234",
        ]);
        let local = kp.local_port().await;
        assert_eq!(roundtrip(local, b"ok").await.unwrap(), b"ok", "{timeout}");
    }
}

/// kubectl's `-s/--server` and `--token`: the server and credentials
/// override the kubeconfig's, and work without any kubeconfig.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectls_server_and_token_flags_override_the_kubeconfig() {
    let env = Env::new().await;
    let other = TestApiServer::start().await.unwrap();
    let port = greeter("from-other").await;
    other.apply(pod("web", json!({}), &[])).unwrap();
    other.require_port_forward_token(Some("the-token"));
    let target = ["pod/web".to_string(), format!(":{port}")];

    // The kubeconfig names env's server, which has no such pod.
    let args = [
        &target[..],
        &[
            "--server".into(),
            other.url(),
            "--token".into(),
            "the-token".into(),
        ],
    ]
    .concat();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut kp = Kproxy::start(&env.kubeconfig, &args, false);
    let local = kp.local_port().await;
    assert_eq!(greeting(local, 10).await.unwrap(), "from-other");
    drop(kp);

    // No kubeconfig at all ($HOME without .kube, no $KUBECONFIG, not in a
    // cluster): -s and --token are enough, as with kubectl.
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kproxy"));
    child
        .arg("forward")
        .args(&target)
        .args([
            "-s",
            &other.url(),
            "--token",
            "the-token",
            "--address",
            "127.0.0.1",
        ])
        .env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = child.spawn().unwrap();
    let mut kp = Kproxy {
        stdout: collect(child.stdout.take().unwrap()),
        stderr: collect(child.stderr.take().unwrap()),
        child,
    };
    let local = kp.local_port().await;
    assert_eq!(greeting(local, 10).await.unwrap(), "from-other");
    drop(kp);

    // A wrong token is the server's 401; a server that is no URL, one line.
    let mut kp = Kproxy::start(
        &env.kubeconfig,
        &[
            &target[0],
            &target[1],
            "-s",
            &other.url(),
            "--token",
            "wrong",
        ],
        false,
    );
    let local = kp.local_port().await;
    assert!(greeting(local, 10).await.is_err());
    kp.wait_stderr("(401): Unauthorized").await;
    refused(
        &env,
        &[&target[0], &target[1], "-s", "ftp://x"],
        "invalid --server \"ftp://x\"",
        None,
    )
    .await;
}

/// A workload whose selector has `matchExpressions` as well as
/// `matchLabels`: only pods that meet both are forwarded to (here the one
/// sorted second by name; the first matches the labels only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workloads_match_expressions_are_honoured() {
    let env = Env::new().await;
    let (db, fe) = (greeter("db").await, greeter("fe").await);
    env.server
        .apply(pod(
            "a-db",
            json!({"app": "web", "tier": "db"}),
            &[("http", db)],
        ))
        .unwrap();
    env.server
        .apply(pod(
            "b-fe",
            json!({"app": "web", "tier": "fe"}),
            &[("http", fe)],
        ))
        .unwrap();
    let mut d = deployment("web");
    d["spec"]["selector"]["matchExpressions"] =
        json!([{"key": "tier", "operator": "In", "values": ["fe", "edge"]}]);
    env.server.apply(d).unwrap();
    for transport in ["websocket", "spdy"] {
        let mut kp = env.forward(&["deploy/web", ":http", "--transport", transport]);
        let local = kp.local_port().await;
        // The first connection resolves through the API, the next ones from
        // the watch cache: both honour the expression.
        for _ in 0..3 {
            assert_eq!(greeting(local, 2).await.unwrap(), "fe", "{transport}");
        }
    }
}

/// kubectl's other targets with a pod selector: `ds/` (a node agent's
/// metrics, say), `job/` and `rc/` forward to the pod their selector picks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_job_and_replicationcontroller_targets() {
    let env = Env::new().await;
    let (agent, batch, legacy) = (
        greeter("ds").await,
        greeter("jb").await,
        greeter("rc").await,
    );
    env.server
        .apply(pod(
            "agent-x1",
            json!({"app": "agent"}),
            &[("metrics", agent)],
        ))
        .unwrap();
    env.server
        .apply(pod(
            "migrate-x1",
            json!({"batch.kubernetes.io/controller-uid": "u1"}),
            &[("http", batch)],
        ))
        .unwrap();
    env.server
        .apply(pod("old-x1", json!({"app": "old"}), &[("http", legacy)]))
        .unwrap();
    let template =
        json!({"metadata": {"labels": {}}, "spec": {"containers": [{"name": "c", "image": "x"}]}});
    env.server
        .apply(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": template}}))
        .unwrap();
    env.server
        .apply(json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "migrate", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "u1"}}, "template": template}}))
        .unwrap();
    env.server
        .apply(json!({"apiVersion": "v1", "kind": "ReplicationController",
            "metadata": {"name": "old", "namespace": "default"},
            "spec": {"selector": {"app": "old"}, "template": template}}))
        .unwrap();
    for (target, port, greets) in [
        ("ds/agent", ":metrics", "ds"),
        ("job/migrate", ":http", "jb"),
        ("rc/old", ":http", "rc"),
    ] {
        let mut kp = env.forward(&[target, port]);
        let local = kp.local_port().await;
        for _ in 0..2 {
            assert_eq!(greeting(local, 2).await.unwrap(), greets, "{target}");
        }
    }
}
