//! Cluster mode at scale: kproxy (`--mode iptables` or `ebpf`) against the
//! test API server holding N Services with E endpoints each, inside a network
//! namespace this program creates (and removes). In ebpf mode this process
//! and kproxy run in a cgroup of their own (the socket hooks attach there)
//! with a private bpffs for the pins; all removed at the end. Needs root.
//!
//! Measures: kproxy start to first complete sync (`/healthz` 200), kproxy's
//! memory (VmRSS / VmHWM), and the time from an EndpointSlice update accepted
//! by the API server until new connections to the Service's ClusterIP reach
//! the new endpoint (p50 / p99 over `--updates` updates).
//!
//! ```text
//! cargo build --release -p kproxy
//! cargo run --release -p kproxy --example cluster_scale -- \
//!     --kproxy target/release/kproxy --services 10000 --endpoints 10 --updates 100 \
//!     [--mode ebpf] [--kproxy-arg --iptables-backend=legacy]
//! ```

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kproxy_test_apiserver::TestApiServer;
use serde_json::{json, Value};

struct Args {
    kproxy: String,
    services: u32,
    endpoints: u32,
    updates: u32,
    min_sync: String,
    mode: String,
    /// Passed on to `kproxy run` as they are.
    kproxy_args: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        kproxy: "target/release/kproxy".into(),
        services: 10_000,
        endpoints: 10,
        updates: 100,
        min_sync: "1s".into(),
        mode: "iptables".into(),
        kproxy_args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--kproxy" => a.kproxy = val()?,
            "--services" => a.services = val()?.parse()?,
            "--endpoints" => a.endpoints = val()?.parse()?,
            "--updates" => a.updates = val()?.parse()?,
            "--min-sync-period" => a.min_sync = val()?,
            "--mode" => a.mode = val()?,
            "--kproxy-arg" => a.kproxy_args.push(val()?),
            other => bail!("unknown flag {other}"),
        }
    }
    if !["iptables", "ebpf"].contains(&a.mode.as_str()) {
        bail!("--mode is iptables or ebpf, not {:?}", a.mode);
    }
    Ok(a)
}

/// The namespace, removed on drop (even on failure).
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new(args[0]).args(&args[1..]).status()?;
    if !st.success() {
        bail!("{args:?} failed: {st}");
    }
    Ok(())
}

/// Moves this (still single-threaded) process into a new network namespace.
fn enter_new_netns() -> anyhow::Result<Netns> {
    let name = format!("kpscale-{}", std::process::id());
    sh(&["ip", "netns", "add", &name])?;
    let ns = Netns(name);
    let f = std::fs::File::open(format!("/run/netns/{}", ns.0))?;
    // SAFETY: setns on a valid namespace fd; no other threads exist yet.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    sh(&["ip", "link", "set", "lo", "up"])?;
    // A device with an address for ebpf mode's TC programs (both veth ends
    // stay in this namespace).
    sh(&[
        "ip", "link", "add", "kps0", "type", "veth", "peer", "name", "kps1",
    ])?;
    sh(&["ip", "addr", "add", "10.250.1.1/24", "dev", "kps0"])?;
    sh(&["ip", "link", "set", "kps0", "up"])?;
    sh(&["ip", "link", "set", "kps1", "up"])?;
    // Two local addresses for the probe Service's endpoints.
    // (on the namespace's own loopback: no dummy module needed)
    sh(&["ip", "addr", "add", "10.250.0.1/32", "dev", "lo"])?;
    sh(&["ip", "addr", "add", "10.250.0.2/32", "dev", "lo"])?;
    // A route for the Service range (no default route here): connect() needs
    // one before the nat OUTPUT chain rewrites the destination.
    sh(&["ip", "route", "add", "10.96.0.0/16", "dev", "lo"])?;
    Ok(ns)
}

/// ebpf mode's own cgroup (this process moves in, so its probes are
/// load-balanced; kproxy inherits it) and private bpffs. Drop undoes both:
/// kproxy's `cleanup`, unmount, move back, remove the cgroup.
struct EbpfSandbox {
    cgroup: std::path::PathBuf,
    home_cgroup: std::path::PathBuf,
    bpffs: tempfile::TempDir,
}

impl EbpfSandbox {
    fn new() -> anyhow::Result<EbpfSandbox> {
        let mount = std::fs::read_to_string("/proc/mounts")?
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
            })
            .context("no cgroup2 file system is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("this process is in no cgroup2 cgroup")?;
        let home_cgroup = mount.join(own.trim_start_matches('/'));
        let cgroup = mount.join(format!("kpscale-{}", std::process::id()));
        std::fs::create_dir(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let bpffs = tempfile::Builder::new().prefix("kpscale-bpffs").tempdir()?;
        let sandbox = EbpfSandbox {
            cgroup,
            home_cgroup,
            bpffs,
        };
        let mount_point = sandbox.bpffs.path().display().to_string();
        sh(&["mount", "-t", "bpf", "bpf", &mount_point])?;
        std::fs::write(
            sandbox.cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .context("moving into the benchmark's cgroup")?;
        Ok(sandbox)
    }

    /// A directory inside the mount: `kproxy cleanup` removes it.
    fn pin_path(&self) -> String {
        self.bpffs.path().join("kproxy").display().to_string()
    }

    fn kproxy_args(&self) -> Vec<String> {
        vec![
            "--proxy-mode".into(),
            "ebpf".into(),
            "--cgroup-root".into(),
            self.cgroup.display().to_string(),
            "--bpf-pin-path".into(),
            self.pin_path(),
        ]
    }
}

impl Drop for EbpfSandbox {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home_cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = Command::new("umount").arg(self.bpffs.path()).status();
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn service(name: &str, ip: Ipv4Addr) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip.to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

fn slice(name: &str, svc: &str, addrs: &[Ipv4Addr]) -> Value {
    let eps: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}, "nodeName": "node1"}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

fn mem_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Which endpoint answers a new connection to the probe ClusterIP (None: no answer).
fn probe(vip: SocketAddr) -> Option<u8> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).ok()?;
    Some(b[0])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let _ns =
        enter_new_netns().context("needs root: creating the benchmark's network namespace")?;
    // Declared after the namespace: dropped (cleaned up) before it.
    let ebpf = if args.mode == "ebpf" {
        Some(EbpfSandbox::new().context("setting up ebpf mode's cgroup and bpffs")?)
    } else {
        None
    };
    let mode_args = ebpf
        .as_ref()
        .map(EbpfSandbox::kproxy_args)
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(run(&args, &mode_args));
    if ebpf.is_some() {
        // Maps and links are pinned: remove them as a user would.
        let _ = Command::new(&args.kproxy)
            .arg("cleanup")
            .args(&mode_args)
            .stdout(Stdio::null())
            .status();
    }
    result
}

async fn run(args: &Args, mode_args: &[String]) -> anyhow::Result<()> {
    let server = TestApiServer::start().await?;
    let t = Instant::now();
    server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}))?;
    for i in 0..args.services {
        let name = format!("svc-{i}");
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 10 + i);
        server.apply(service(&name, ip))?;
        let addrs: Vec<Ipv4Addr> = (0..args.endpoints)
            .map(|e| {
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * args.endpoints + e)
            })
            .collect();
        server.apply(slice(&format!("{name}-1"), &name, &addrs))?;
    }
    let vip = SocketAddr::from(([10, 96, 255, 250], 80));
    let targets = [Ipv4Addr::new(10, 250, 0, 1), Ipv4Addr::new(10, 250, 0, 2)];
    server.apply(service("probe", Ipv4Addr::new(10, 96, 255, 250)))?;
    server.apply(slice("probe-1", "probe", &targets[..1]))?;
    eprintln!(
        "loaded {} Services / {} endpoints into the test API server in {:?}",
        args.services,
        args.services * args.endpoints,
        t.elapsed()
    );
    // Endpoint listeners answer with their number.
    for (n, ip) in targets.iter().enumerate() {
        let l = tokio::net::TcpListener::bind((*ip, 8080)).await?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(&[n as u8]).await;
            }
        });
    }

    let started = Instant::now();
    let child = Command::new(&args.kproxy)
        .args([
            "run",
            "--master",
            &server.url(),
            "--hostname-override",
            "node1",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--iptables-min-sync-period",
            &args.min_sync,
        ])
        .args(mode_args)
        .args(&args.kproxy_args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(
            "/tmp/cluster_scale-kproxy.log",
        )?))
        .spawn()
        .with_context(|| format!("starting {}", args.kproxy))?;
    let pid = child.id();
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(st) = child.0.try_wait()? {
            bail!("kproxy exited ({st}) before its first sync; see /tmp/cluster_scale-kproxy.log");
        }
        let st = tokio::task::spawn_blocking(|| http_status("127.0.0.1:10256", "/healthz")).await?;
        if st == Some(200) {
            break;
        }
        if Instant::now() > deadline {
            bail!("kproxy not healthy after 600 s (see /tmp/cluster_scale-kproxy.log)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_sync = started.elapsed();
    let (rss, hwm) = mem_kib(pid);
    println!(
        "services={} endpoints={} start_to_first_sync_ms={:.0} rss_mib={:.1} peak_rss_mib={:.1}",
        args.services,
        args.services * args.endpoints,
        first_sync.as_secs_f64() * 1000.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // Traffic must reach the first endpoint before updates are timed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::task::spawn_blocking(move || probe(vip)).await? != Some(0) {
        if Instant::now() > deadline {
            bail!("no traffic through the probe Service after the first sync");
        }
    }
    let mut lat = Vec::new();
    for u in 1..=args.updates {
        let want = (u % 2) as u8;
        // Spread the updates so the min sync period is not what is measured every time.
        tokio::time::sleep(Duration::from_millis(200 + (u as u64 * 37) % 800)).await;
        server.apply(slice("probe-1", "probe", &[targets[want as usize]]))?;
        let t = Instant::now();
        let deadline = t + Duration::from_secs(60);
        loop {
            if tokio::task::spawn_blocking(move || probe(vip)).await? == Some(want) {
                break;
            }
            if Instant::now() > deadline {
                bail!("update {u}: traffic never followed");
            }
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let (rss2, hwm2) = mem_kib(pid);
    println!(
        "update_to_traffic updates={} p50_ms={:.0} p99_ms={:.0} max_ms={:.0} rss_after_mib={:.1} peak_rss_mib={:.1}",
        lat.len(),
        percentile(&lat, 0.5).as_secs_f64() * 1000.0,
        percentile(&lat, 0.99).as_secs_f64() * 1000.0,
        lat.last().unwrap().as_secs_f64() * 1000.0,
        rss2 as f64 / 1024.0,
        hwm2 as f64 / 1024.0
    );
    Ok(())
}
