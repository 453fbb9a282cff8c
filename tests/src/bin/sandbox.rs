//! `kproxy-sandbox demo [--manifests DIR] [--mode iptables|ebpf]`: builds the
//! namespace topology (two nodes, pods, an outside client), runs kproxy on
//! each node on the given manifests, sends traffic through a ClusterIP, a
//! NodePort on either node and a LoadBalancer IP, prints which pod answered
//! each request and what client address it saw, then tears everything down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kproxy_tests::client::{ClientSpec, Outcome};
use kproxy_tests::{Mode, Topology};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("demo") {
        bail!("usage: kproxy-sandbox demo [--manifests DIR] [--mode iptables|ebpf]");
    }
    let flag = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let manifests = PathBuf::from(flag("--manifests").unwrap_or_else(|| "examples".into()));
    let mode = match flag("--mode").as_deref() {
        None | Some("iptables") => Mode::Iptables,
        Some("ebpf") => Mode::Ebpf,
        Some(other) => bail!("--mode {other}: expected iptables or ebpf"),
    };
    demo(&manifests, mode)
}

fn demo(manifests: &Path, mode: Mode) -> Result<()> {
    println!("building the sandbox: lan bridge, ext 172.30.0.100, node1 172.30.0.11 (pod-a 10.244.1.10, pod-c 10.244.1.30), node2 172.30.0.12 (pod-b 10.244.2.10)");
    let topo = Topology::start(mode)?;
    copy_manifests(manifests, topo.manifests())?;
    println!(
        "kproxy --proxy-mode {} running on node1 and node2 with {}",
        mode.flag(),
        manifests.display()
    );
    topo.wait_backends(
        "default/web:http",
        "ClusterIP",
        &["10.244.1.10:8080", "10.244.2.10:8080"],
    )
    .context("waiting for the example Service default/web (examples/manifests/web.yaml)")?;
    topo.wait_for("every Service programmed", |_, fs| {
        ["default/web-nodeport:http", "default/web-local:http"]
            .iter()
            .all(|s| fs.iter().any(|f| &f.service == s))
    })?;
    println!("both nodes have programmed the Services:\n");
    for (i, node) in topo.nodes.iter().enumerate() {
        println!("$ kproxy status   # on {}", node.name);
        let out = kproxy_tests::kproxy::run_command(&node.ns, &node.config, &["status"])?;
        print!("{out}");
        let _ = i;
        println!();
    }

    report(
        "pod-c -> ClusterIP 10.96.0.10:80 (web)",
        &topo.from_pod("pod-c", &ClientSpec::tcp("10.96.0.10:80", 10))?,
    );
    for (i, node) in topo.nodes.iter().enumerate() {
        report(
            &format!(
                "ext -> NodePort {}:30080 (web-nodeport, externalTrafficPolicy Cluster)",
                node.ip
            ),
            &topo.from_ext(&ClientSpec::tcp(format!("{}:30080", node.ip), 6))?,
        );
        report(
            &format!(
                "ext -> NodePort {}:30081 (web-local, externalTrafficPolicy Local)",
                node.ip
            ),
            &topo.from_ext(&ClientSpec::tcp(format!("{}:30081", node.ip), 6))?,
        );
        let _ = i;
    }
    topo.route_from_ext("203.0.113.10/32", 1)?;
    report(
        "ext -> LoadBalancer 203.0.113.10:80 (web-local, routed to node2)",
        &topo.from_ext(&ClientSpec::tcp("203.0.113.10:80", 6))?,
    );
    for node in &topo.nodes {
        let (code, body) = Topology::http_get(&node.ns, &format!("{}:30256", node.ip), "/healthz")?;
        println!(
            "healthCheckNodePort {}:30256/healthz -> {code} {}",
            node.ip,
            body.trim()
        );
    }
    println!("\ntearing the sandbox down");
    Ok(())
}

fn report(what: &str, outcome: &Outcome) {
    println!("{what}");
    let mut seen: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for a in &outcome.attempts {
        match (a.pod(), a.seen_client_ip()) {
            (Some(pod), Some(ip)) => {
                *seen
                    .entry(pod.into())
                    .or_default()
                    .entry(ip.into())
                    .or_default() += 1
            }
            _ => {
                *seen
                    .entry(format!("(failed: {})", a.error.as_deref().unwrap_or("?")))
                    .or_default()
                    .entry("-".into())
                    .or_default() += 1
            }
        }
    }
    for (pod, clients) in seen {
        for (client, n) in clients {
            println!("    {n:>3} x answered by {pod:<8} client address seen: {client}");
        }
    }
}

/// Copies every manifest file under `from` (recursively) into `to`.
fn copy_manifests(from: &Path, to: &Path) -> Result<()> {
    let entries = std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            copy_manifests(&path, to)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            let name = path
                .file_name()
                .context("file name")?
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path)?;
            kproxy_tests::manifests::write_raw(to, &name, &text)?;
        }
    }
    Ok(())
}
