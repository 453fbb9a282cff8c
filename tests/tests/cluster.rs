//! Cluster mode end to end: kproxy on both nodes watches the test API server
//! (listening in the LAN namespace), `kubectl` edits objects there, and the
//! traffic follows. Run once per dataplane mode.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kproxy_test_apiserver::{Options, TestApiServer};
use kproxy_tests::client::ClientSpec;
use kproxy_tests::manifests::{self as m, ready, service, slice, Endpoint};
use kproxy_tests::topo::{LAN_IP, NODE_IPS};
use kproxy_tests::{Mode, Topology};
use serde_json::Value;

const A: &str = "10.244.1.10"; // pod-a on node1
const B: &str = "10.244.2.10"; // pod-b on node2
const VIP: &str = "10.96.0.10";
const SVC: &str = "default/web:http";
/// The outage the issue asks the dataplane to ride out unchanged.
const OUTAGE: Duration = Duration::from_secs(30);

fn ep(ip: &str) -> String {
    format!("{ip}:8080")
}

fn web(endpoints: &[Endpoint]) -> Vec<Value> {
    vec![
        service("web", VIP, vec![m::tcp("http", 80, 8080).node_port(30080)]).to_json(),
        slice("web-1", "web", &[("http", "TCP", 8080)], endpoints),
    ]
}

/// The test API server, bound inside the LAN namespace (reachable from
/// both nodes, and from nowhere outside the test's namespaces).
struct Cluster {
    rt: tokio::runtime::Runtime,
    server: TestApiServer,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn start(topo: &Topology) -> Result<Cluster> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let opts = Options {
            addr: format!("{LAN_IP}:0").parse()?,
            bind: Some(topo.lan_binder()),
            ..Options::default()
        };
        let server = rt.block_on(TestApiServer::start_with(opts))?;
        let kubeconfig = topo.workdir().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        Ok(Cluster {
            rt,
            server,
            kubeconfig,
        })
    }

    /// `kubectl ARGS` from the LAN namespace (where the server is).
    fn kubectl(&self, topo: &Topology, args: &[&str]) -> Result<String> {
        let mut cmd = topo.lan.command("kubectl", None);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        kproxy_tests::netns::output(&mut cmd, &format!("kubectl {}", args.join(" ")))
    }

    fn apply(&self, topo: &Topology, file: &str, docs: &[Value]) -> Result<String> {
        m::write(topo.workdir(), file, docs)?;
        let path = topo.workdir().join(file);
        self.kubectl(topo, &["apply", "-f", path_str(&path)?])
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

/// Topology with both kproxies in cluster mode, watching `cluster`.
fn start(mode: Mode) -> Result<(Topology, Cluster)> {
    let mut topo = Topology::build(mode)?;
    for i in 0..topo.pods.len() {
        topo.serve(i, &["--tcp", "8080"])?;
    }
    let cluster = Cluster::start(&topo)?;
    for i in 0..topo.nodes.len() {
        topo.nodes[i].config.kubeconfig = Some(cluster.kubeconfig.clone());
        topo.start_kproxy(i)?;
    }
    Ok((topo, cluster))
}

fn only(out: &kproxy_tests::client::Outcome, pod: &str, what: &str) -> Result<()> {
    out.expect_all_ok(what)?;
    ensure!(
        out.by_pod().keys().all(|p| p == pod),
        "{what}: want only {pod}, got {}",
        out.summary()
    );
    Ok(())
}

fn cluster_mode_end_to_end(mode: Mode) -> Result<()> {
    let (topo, cluster) = start(mode)?;

    // kubectl apply makes traffic flow.
    cluster.apply(&topo, "web.yaml", &web(&[ready(A, "node1")]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(A)])?;
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 20))?;
    only(&out, "pod-a", "ClusterIP after kubectl apply")?;

    // Editing the EndpointSlice moves traffic.
    cluster.apply(&topo, "web.yaml", &web(&[ready(B, "node2")]))?;
    topo.wait_backends(SVC, "ClusterIP", &[&ep(B)])?;
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 20))?;
    only(&out, "pod-b", "ClusterIP after editing the slice")?;

    // The API server goes away for 30 s: nothing changes in the dataplane
    // and traffic keeps flowing, to a pod and through a NodePort.
    let before: Vec<_> = (0..2).map(|i| topo.programmed(i)).collect::<Result<_>>()?;
    cluster.server.stop();
    let outage = Instant::now();
    let count = (OUTAGE.as_millis() / 250) as usize;
    let in_pod = topo.start_from_pod(
        "pod-c",
        &ClientSpec::tcp(format!("{VIP}:80"), count).interval_ms(250),
    )?;
    let from_ext = topo.start_from_ext(
        &ClientSpec::tcp(format!("{}:30080", NODE_IPS[0]), count).interval_ms(250),
    )?;
    // Meanwhile the cluster changes and forgets its history: on return the
    // kproxies' watches are too old (410 Gone) and must relist.
    let both = web(&[ready(A, "node1"), ready(B, "node2")]);
    for doc in &both {
        cluster.server.apply(doc.clone())?;
    }
    cluster.server.compact();
    only(&in_pod.wait()?, "pod-b", "ClusterIP during the outage")?;
    only(&from_ext.wait()?, "pod-b", "NodePort during the outage")?;
    ensure!(
        outage.elapsed() >= OUTAGE - Duration::from_secs(2),
        "the outage lasted only {:?}",
        outage.elapsed()
    );
    for (i, was) in before.iter().enumerate() {
        let now = topo.programmed(i)?;
        ensure!(
            &now == was,
            "node{} changed its dataplane while the API server was down:\nbefore {was:#?}\nnow {now:#?}",
            i + 1
        );
        ensure!(
            topo.nodes[i].kproxy.as_ref().is_some(),
            "kproxy on node{} is gone",
            i + 1
        );
    }

    // Back, with a compacted history: relist, and the state is right. The
    // watchers find the server within their longest backoff (8 s, jittered),
    // and 410 Gone relists at once.
    cluster.rt.block_on(cluster.server.restart())?;
    let back = Instant::now();
    topo.wait_backends_within(SVC, "ClusterIP", &[&ep(A), &ep(B)], Duration::from_secs(30))?;
    eprintln!(
        "{mode:?}: relisted and programmed {:?} after the API server came back",
        back.elapsed()
    );
    ensure!(
        cluster.server.expired_watches() > 0,
        "no watch was answered 410 Gone: the relist path was not exercised"
    );
    let out = topo.from_pod("pod-c", &ClientSpec::tcp(format!("{VIP}:80"), 60))?;
    out.expect_all_ok("ClusterIP after the relist")?;
    ensure!(
        out.by_pod().len() == 2,
        "after the relist only {:?} answered",
        out.by_pod()
    );

    // Deleting the Service removes its rules and its traffic.
    cluster.kubectl(&topo, &["delete", "service", "web"])?;
    topo.wait_gone(SVC)?;
    let out = topo.from_pod(
        "pod-c",
        &ClientSpec::tcp(format!("{VIP}:80"), 3).timeout_ms(500),
    )?;
    if out.attempts.iter().any(|a| a.ok) {
        bail!("the deleted Service still answers: {}", out.summary());
    }
    Ok(())
}

#[test]
fn cluster_mode_end_to_end_iptables() -> Result<()> {
    cluster_mode_end_to_end(Mode::Iptables)
}

#[test]
fn cluster_mode_end_to_end_ebpf() -> Result<()> {
    cluster_mode_end_to_end(Mode::Ebpf)
}
