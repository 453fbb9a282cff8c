//! One UDP conntrack cleanup of 1,000 stale flows: kproxy's netlink
//! reconcile (one dump, batched deletions on one socket) against the
//! `conntrack` CLI, in a network namespace this benchmark creates (root
//! needed; it removes the namespace when done, also on failure).
//!
//! Two shapes: 1,000 stale flows of one Service (the CLI needs one process
//! with a filter), and one stale flow in each of 1,000 Services (the CLI
//! needs one process per frontend, as kproxy did before). Each measurement
//! is repeated; min and median are printed.
//!
//!     cargo bench -p kproxy --bench conntrack_cleanup
//!
//! Entries are inserted with `conntrack -I` (not measured): NATed UDP flows
//! whose reply source is an endpoint that left.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kproxy::dataplane::iptables::conntrack::{reconcile, Netlink, UdpFrontends};
use kproxy::dataplane::DataplaneConfig;
use kproxy::model::{self, ClusterObjects, ModelConfig};

const FLOWS: usize = 1000;
const REPEAT: usize = 5;

struct NetNs(String);

impl NetNs {
    fn new() -> NetNs {
        let name = format!("kpt{}-ctbench", std::process::id());
        run("ip", &["netns", "add", &name]);
        NetNs(name)
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Runs a shell script (given on stdin: it can be long) in the namespace.
    fn script(&self, text: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-s"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("ip netns exec sh");
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())
            .expect("script written");
        child.wait_with_output().expect("sh")
    }

    /// Runs `f` on a thread inside the namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).expect("netns file");
                // SAFETY: plain syscall on a valid fd; only this thread moves.
                assert_eq!(
                    unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                    0
                );
                f()
            })
            .join()
            .expect("bench thread")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `services` UDP Services 10.96.x.y:53, each with the serving endpoint 10.244.1.1.
fn frontends(services: usize) -> UdpFrontends {
    let mut objects = ClusterObjects::default();
    let (mut svcs, mut slices) = (Vec::new(), Vec::new());
    for i in 0..services {
        let vip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        svcs.push(serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("dns-{i}"), "namespace": "default"},
            "spec": {"clusterIP": vip, "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]},
        })).unwrap());
        slices.push(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("dns-{i}"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": format!("dns-{i}")}},
                "addressType": "IPv4",
                "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
                "endpoints": [{"addresses": ["10.244.1.1"], "conditions": {"ready": true}}],
            }))
            .unwrap(),
        );
    }
    objects.services = svcs.into_iter().map(Arc::new).collect();
    objects.endpoint_slices = slices.into_iter().map(Arc::new).collect();
    let desired = model::build(
        &objects,
        &ModelConfig {
            node_name: "n".into(),
        },
    );
    UdpFrontends::of(&desired, &DataplaneConfig::default())
}

/// Inserts `FLOWS` stale flows spread over `services` Services.
fn insert(ns: &NetNs, services: usize) {
    let mut script = String::new();
    for f in 0..FLOWS {
        let svc = f % services;
        let vip = format!("10.96.{}.{}", svc / 250, svc % 250 + 1);
        let client = format!("10.244.9.{}", f % 250 + 1);
        let sport = 20000 + f;
        script.push_str(&format!(
            "conntrack -I -p udp -s {client} -d {vip} --sport {sport} --dport 53 \
             -r 10.244.5.5 -q {client} --reply-port-src 5353 --reply-port-dst {sport} \
             -t 600 -u SEEN_REPLY 2>/dev/null\n"
        ));
    }
    let out = ns.script(&script);
    assert!(out.status.success());
    let count = ns.exec(&["sh", "-c", "conntrack -L -p udp 2>/dev/null | wc -l"]);
    let n: usize = String::from_utf8_lossy(&count.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(n, FLOWS, "flows inserted");
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2])
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("conntrack_cleanup needs root (it creates a network namespace)");
        std::process::exit(1);
    }
    if Command::new("conntrack").arg("--version").output().is_err() {
        eprintln!("the conntrack tool is missing: cargo xtask setup");
        std::process::exit(1);
    }
    let ns = NetNs::new();
    println!("UDP conntrack cleanup of {FLOWS} stale flows ({REPEAT} runs each; min / median)");
    for services in [1, FLOWS] {
        let fe = frontends(services);
        let mut netlink = Vec::new();
        let mut cli = Vec::new();
        for _ in 0..REPEAT {
            insert(&ns, services);
            let (took, deleted) = ns.enter(|| {
                let mut table = Netlink::open().expect("netlink socket");
                let started = Instant::now();
                let r = reconcile(&mut table, &fe).expect("reconcile");
                (started.elapsed(), r.deleted)
            });
            assert_eq!(deleted, FLOWS);
            netlink.push(took);

            insert(&ns, services);
            // The CLI: one process per stale (frontend, endpoint), as a
            // proxy without netlink runs it.
            let mut script = String::new();
            for s in 0..services {
                let vip = format!("10.96.{}.{}", s / 250, s % 250 + 1);
                script.push_str(&format!(
                    "conntrack -D -p udp --orig-dst {vip} --orig-port-dst 53 --reply-src 10.244.5.5 >/dev/null 2>&1\n"
                ));
            }
            let started = Instant::now();
            let out = ns.script(&script);
            cli.push(started.elapsed());
            assert!(out.status.success() || services > 1);
            let left = ns.exec(&["sh", "-c", "conntrack -L -p udp 2>/dev/null | wc -l"]);
            assert_eq!(
                String::from_utf8_lossy(&left.stdout).trim(),
                "0",
                "CLI deleted all"
            );
        }
        let (nl_min, nl_med) = stats(netlink);
        let (cli_min, cli_med) = stats(cli);
        println!(
            "{services:>5} Service(s): netlink {:.1} / {:.1} ms; conntrack CLI ({services} process{}) {:.1} / {:.1} ms; ratio (median) {:.1}x",
            nl_min.as_secs_f64() * 1e3,
            nl_med.as_secs_f64() * 1e3,
            if services == 1 { "" } else { "es" },
            cli_min.as_secs_f64() * 1e3,
            cli_med.as_secs_f64() * 1e3,
            cli_med.as_secs_f64() / nl_med.as_secs_f64()
        );
    }
}
