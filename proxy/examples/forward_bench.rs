//! `kproxy forward` against the ceiling (a direct connection to the "pod"):
//! bulk throughput, connection set-up latency, and many concurrent
//! connections, over WebSocket and over SPDY; and UDP datagrams per second
//! and loss through the relay (the agent's relay runs in this process, as
//! the node agent would). With `kubectl` among the transports (the default
//! when `kubectl` is on PATH), `kubectl port-forward` through the same server
//! is measured too: the peer kproxy replaces, on the same server and pod. The API server is the in-process test server (its
//! port-forward plays the kubelet); the pod is an echo listener on loopback.
//!
//! ```text
//! cargo build --release -p kproxy --bin kproxy --example forward_bench
//! ./target/release/examples/forward_bench --mib 1024 --conns 1000 --concurrent 200
//! ```
//! Prints markdown tables, and the CPU seconds kproxy and this process
//! (test API server + clients + pod) used in each phase.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

struct Opts {
    mib: usize,
    conns: usize,
    concurrent: usize,
    each_kib: usize,
    transports: Vec<String>,
    datagrams: usize,
    kproxy: std::path::PathBuf,
}

fn opts() -> Opts {
    let mut o = Opts {
        mib: 1024,
        conns: 1000,
        concurrent: 200,
        each_kib: 1024,
        transports: ["websocket", "spdy"]
            .into_iter()
            .chain(on_path("kubectl").then_some("kubectl"))
            .map(str::to_string)
            .collect(),
        datagrams: 20_000,
        kproxy: std::env::current_exe()
            .unwrap()
            .parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("kproxy"))
            .unwrap(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--mib" => o.mib = v.parse().unwrap(),
            "--conns" => o.conns = v.parse().unwrap(),
            "--concurrent" => o.concurrent = v.parse().unwrap(),
            "--each-kib" => o.each_kib = v.parse().unwrap(),
            "--kproxy" => o.kproxy = v.into(),
            "--transports" => o.transports = v.split(',').map(str::to_string).collect(),
            "--datagrams" => o.datagrams = v.parse().unwrap(),
            other => panic!("unknown argument {other} (--mib N --conns M --concurrent C --each-kib K --transports websocket,spdy,kubectl --datagrams D --kproxy PATH)"),
        }
        i += 2;
    }
    o
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// CPU seconds (user + system) of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime); `after` starts at field 3.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (r, mut w) = s.split();
                // A large buffer: the direct path is the ceiling, not the echo.
                let mut r = tokio::io::BufReader::with_capacity(256 * 1024, r);
                let _ = tokio::io::copy_buf(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// Writes and reads back `total` bytes; returns the elapsed time. With
/// `half_close` the writer shuts its side down when done, as a request to
/// the pod would; without it the connection stays open until everything is
/// back (kubectl ends the whole forward when the local side half-closes).
async fn bulk(port: u16, total: usize, half_close: bool) -> std::io::Result<Duration> {
    let start = Instant::now();
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let buf = vec![0x5au8; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = buf.len().min(total - sent);
            w.write_all(&buf[..n]).await?;
            sent += n;
        }
        if half_close {
            w.shutdown().await?;
        }
        Ok::<_, std::io::Error>(w)
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < total {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other(format!("EOF after {got} bytes")));
        }
        got += n;
    }
    drop(writer.await.unwrap()?);
    Ok(start.elapsed())
}

/// Connect, one byte there and back, close.
async fn setup_latency(port: u16, n: usize) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        v.push(start.elapsed());
    }
    v.sort();
    v
}

async fn concurrent(port: u16, n: usize, each: usize, half_close: bool) -> (Duration, usize) {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        set.spawn(bulk(port, each, half_close));
    }
    let mut failures = 0;
    while let Some(r) = set.join_next().await {
        if !matches!(r, Ok(Ok(_))) {
            failures += 1;
            // The first few say why.
            if failures <= 3 {
                eprintln!("concurrent connection failed: {r:?}");
            }
        }
    }
    (start.elapsed(), failures)
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

struct Row {
    bulk_mibs: f64,
    p50: f64,
    p99: f64,
    conc_time: f64,
    conc_fail: usize,
    cpu: [f64; 3],
    self_cpu: [f64; 3],
}

async fn measure(port: u16, o: &Opts, forwarder_pid: Option<u32>, half_close: bool) -> Row {
    let me = std::process::id();
    let cpu = || {
        (
            forwarder_pid.map(cpu_seconds).unwrap_or(0.0),
            cpu_seconds(me),
        )
    };
    let (k0, s0) = cpu();
    let d = bulk(port, o.mib << 20, half_close).await.unwrap();
    let (k1, s1) = cpu();
    let lat = setup_latency(port, o.conns).await;
    let (k2, s2) = cpu();
    let (ct, cf) = concurrent(port, o.concurrent, o.each_kib << 10, half_close).await;
    let (k3, s3) = cpu();
    Row {
        bulk_mibs: o.mib as f64 / d.as_secs_f64(),
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        conc_time: ct.as_secs_f64(),
        conc_fail: cf,
        cpu: [k1 - k0, k2 - k1, k3 - k2],
        self_cpu: [s1 - s0, s2 - s1, s3 - s2],
    }
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `kproxy forward ARGS` (or `kubectl port-forward ARGS` with
/// `program` kubectl); returns it and the local port of its first
/// `Forwarding from 127.0.0.1:PORT` line (both print the same).
async fn forward(o: &Opts, kc: &std::path::Path, args: &[&str]) -> (Guard, u16) {
    forward_with(Command::new(&o.kproxy).arg("forward"), kc, args).await
}

async fn forward_with(cmd: &mut Command, kc: &std::path::Path, args: &[&str]) -> (Guard, u16) {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .arg("--kubeconfig")
        .arg(kc)
        .args(args)
        .args(["--address", "127.0.0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(child);
    let mut lines = BufReader::new(tokio::process::ChildStdout::from_std(stdout).unwrap()).lines();
    let line = lines.next_line().await.unwrap().expect("a Forwarding line");
    let local: u16 = line
        .strip_prefix("Forwarding from 127.0.0.1:")
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {line:?}"));
    // Keep reading: kubectl prints a line per connection and, being Go,
    // dies of SIGPIPE when its stdout is closed.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (guard, local)
}

async fn udp_echo() -> u16 {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = s.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], peer).await;
        }
    });
    port
}

struct UdpRow {
    per_s: f64,
    lost: usize,
    reordered: usize,
    cpu: f64,
}

/// `n` numbered datagrams of 512 bytes to `port` and back, at most 256 in
/// flight (a lost one frees its slot after 50 ms): echoed per second, lost,
/// and out of order.
async fn udp_measure(port: u16, n: usize, pid: Option<u32>) -> UdpRow {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let cpu0 = pid.map(cpu_seconds).unwrap_or(0.0);
    let s = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    s.connect(("127.0.0.1", port)).await.unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let receiver = {
        let (s, got) = (s.clone(), got.clone());
        tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(n);
            let mut buf = [0u8; 2048];
            while seqs.len() < n {
                match tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf)).await {
                    Ok(Ok(len)) if len >= 4 => {
                        seqs.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            seqs
        })
    };
    let start = Instant::now();
    let mut d = vec![0xabu8; 512];
    for seq in 0..n {
        let wait = Instant::now();
        while seq >= got.load(Ordering::Relaxed) + 256 && wait.elapsed() < Duration::from_millis(50)
        {
            tokio::task::yield_now().await;
        }
        d[..4].copy_from_slice(&(seq as u32).to_be_bytes());
        let _ = s.send(&d).await;
    }
    let seqs = receiver.await.unwrap();
    // The receiver ends 1s after the last datagram when some are lost.
    let elapsed = if seqs.len() < n {
        start.elapsed() - Duration::from_secs(1)
    } else {
        start.elapsed()
    };
    UdpRow {
        per_s: seqs.len() as f64 / elapsed.as_secs_f64(),
        lost: n - seqs.len(),
        reordered: seqs.windows(2).filter(|w| w[1] < w[0]).count(),
        cpu: pid.map(cpu_seconds).unwrap_or(0.0) - cpu0,
    }
}

#[tokio::main]
async fn main() {
    let o = opts();
    let server = kproxy_test_apiserver::TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kc).unwrap();
    let port = echo_server().await;
    server
        .apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "bench", "namespace": "default"},
            "spec": {"nodeName": "bench-node", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1"}}))
        .unwrap();

    let direct = measure(port, &o, None, true).await;
    let mut rows = vec![("direct (ceiling)".to_string(), direct)];
    for t in &o.transports {
        let target = ["pod/bench", &format!(":{port}")];
        let ((guard, local), name) = if t == "kubectl" {
            // kubectl 1.31+ tries the WebSocket tunnel first; the test
            // server answers it 400 (as a server before 1.30 does) and
            // kubectl falls back to SPDY, as on such a cluster.
            let mut cmd = Command::new("kubectl");
            cmd.arg("port-forward");
            (
                forward_with(&mut cmd, &kc, &target).await,
                "kubectl port-forward (SPDY)".to_string(),
            )
        } else {
            let args = [target[0], target[1], "--transport", t];
            (
                forward(&o, &kc, &args).await,
                format!("kproxy forward, {t}"),
            )
        };
        let row = measure(local, &o, Some(guard.0.id()), t != "kubectl").await;
        rows.push((name, row));
    }

    // UDP: the node agent's relay, here in this process, reached through a
    // port-forward to its "pod" (a hostNetwork agent at 127.0.0.1).
    let relay = kproxy::server::udp_relay::bind(0).await.unwrap();
    let relay_port = relay[0].local_addr().unwrap().port();
    tokio::spawn(kproxy::server::udp_relay::serve(relay, Default::default()));
    server
        .apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "kproxy-bench-node", "namespace": "kube-system",
                "labels": {"app.kubernetes.io/name": "kproxy"}},
            "spec": {"nodeName": "bench-node", "hostNetwork": true, "containers": [{"name": "kproxy", "image": "kproxy"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1"}}))
        .unwrap();
    let udp_port = udp_echo().await;
    let udp_direct = udp_measure(udp_port, o.datagrams, None).await;
    let (guard, local) = forward(
        &o,
        &kc,
        &[
            "pod/bench",
            &format!(":{udp_port}/udp"),
            "--udp-relay-port",
            &relay_port.to_string(),
        ],
    )
    .await;
    let udp_fwd = udp_measure(local, o.datagrams, Some(guard.0.id())).await;
    drop(guard);

    println!(
        "bulk: {} MiB each way on one connection; set-up: {} sequential connections (connect, 1 byte echoed); concurrent: {} connections x {} KiB each way\n",
        o.mib, o.conns, o.concurrent, o.each_kib
    );
    println!("| path | bulk MiB/s (each way) | ratio | set-up p50 ms | set-up p99 ms | {}x{}KiB time s | failures |", o.concurrent, o.each_kib);
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let ceiling = rows[0].1.bulk_mibs;
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} | {:.2} | {:.3} | {:.3} | {:.2} | {} |",
            r.bulk_mibs,
            r.bulk_mibs / ceiling,
            r.p50,
            r.p99,
            r.conc_time,
            r.conc_fail
        );
    }
    println!("\nCPU seconds per phase (bulk / set-up / concurrent):");
    for (name, r) in &rows[1..] {
        println!(
            "- {name}: forwarder {:.2} / {:.2} / {:.2}; bench process (test API server + clients + pod) {:.2} / {:.2} / {:.2}",
            r.cpu[0], r.cpu[1], r.cpu[2], r.self_cpu[0], r.self_cpu[1], r.self_cpu[2]
        );
    }
    println!(
        "- direct: bench process {:.2} / {:.2} / {:.2}",
        rows[0].1.self_cpu[0], rows[0].1.self_cpu[1], rows[0].1.self_cpu[2]
    );
    println!(
        "\nUDP: {} datagrams of 512 bytes echoed, at most 256 in flight\n",
        o.datagrams
    );
    println!("| path | datagrams/s (each way) | lost | out of order | kproxy CPU s |");
    println!("|---|---:|---:|---:|---:|");
    for (name, r) in [
        ("direct (ceiling)", &udp_direct),
        ("kproxy forward, relay", &udp_fwd),
    ] {
        println!(
            "| {name} | {:.0} | {} | {} | {:.2} |",
            r.per_s, r.lost, r.reordered, r.cpu
        );
    }
}
