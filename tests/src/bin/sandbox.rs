//! `kproxy-sandbox demo [--manifests DIR] [--proxy-mode iptables|ebpf]`: builds the
//! namespace topology (two nodes, pods, an outside client), runs kproxy on
//! each node on the given manifests, sends traffic through a ClusterIP, a
//! NodePort on either node and a LoadBalancer IP, prints which pod answered
//! each request and what client address it saw, then tears everything down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kproxy_tests::client::{ClientSpec, Outcome};
use kproxy_tests::{Mode, Topology};

const USAGE: &str = "usage: kproxy-sandbox demo [--manifests DIR] [--proxy-mode iptables|ebpf]";

/// Errors are one line (what failed and the fix), whatever RUST_BACKTRACE
/// says: returning the error from `main` would print its backtrace.
fn main() -> ExitCode {
    match parse(std::env::args().skip(1).collect()).and_then(|(m, mode)| demo(&m, mode)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: Vec<String>) -> Result<(PathBuf, Mode)> {
    if args.first().map(String::as_str) != Some("demo") {
        bail!("{USAGE}");
    }
    let flag = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let manifests = PathBuf::from(flag("--manifests").unwrap_or_else(|| "examples".into()));
    // `--mode` is the older spelling.
    let mode = match flag("--proxy-mode").or_else(|| flag("--mode")).as_deref() {
        None | Some("iptables") => Mode::Iptables,
        Some("ebpf") => Mode::Ebpf,
        Some(other) => bail!("--proxy-mode {other}: expected iptables or ebpf"),
    };
    Ok((manifests, mode))
}

fn demo(manifests: &Path, mode: Mode) -> Result<()> {
    // Before anything is printed or built: not root, no ip/ethtool.
    kproxy_tests::topo::preflight()?;
    if !manifests.is_dir() {
        bail!(
            "manifest directory {} not found: pass --manifests DIR (the repository's examples/ by default)",
            manifests.display()
        );
    }
    println!("building the sandbox: lan bridge, ext 172.30.0.100, node1 172.30.0.11 (pod-a 10.244.1.10, pod-c 10.244.1.30), node2 172.30.0.12 (pod-b 10.244.2.10)");
    let mut topo = Topology::start(mode)?;
    copy_manifests(manifests, topo.manifests())?;
    println!(
        "kproxy --proxy-mode {} running on node1 and node2 with {}",
        mode.flag(),
        manifests.display()
    );
    wait_programmed(&mut topo)?;
    println!("both nodes have programmed the Services:\n");
    for node in &topo.nodes {
        println!("$ kproxy status   # on {}", node.name);
        let out = kproxy_tests::kproxy::run_command(&node.ns, &node.config, &["status"])?;
        println!("{out}");
    }

    // Every request of the demo is expected to be answered: a failure makes
    // the demo (and CI, which runs it) fail, after everything was shown.
    let mut failed = Vec::new();
    let mut report = |what: String, outcome: Outcome| {
        let n = show(&what, &outcome);
        if n > 0 {
            failed.push(format!("{n} of {} to {what}", outcome.attempts.len()));
        }
    };
    report(
        "pod-c -> ClusterIP 10.96.0.10:80 (web)".into(),
        topo.from_pod("pod-c", &ClientSpec::tcp("10.96.0.10:80", 10))?,
    );
    for node in &topo.nodes {
        report(
            format!(
                "ext -> NodePort {}:30080 (web-nodeport, externalTrafficPolicy Cluster)",
                node.ip
            ),
            topo.from_ext(&ClientSpec::tcp(format!("{}:30080", node.ip), 6))?,
        );
        report(
            format!(
                "ext -> NodePort {}:30081 (web-local, externalTrafficPolicy Local)",
                node.ip
            ),
            topo.from_ext(&ClientSpec::tcp(format!("{}:30081", node.ip), 6))?,
        );
    }
    topo.route_from_ext("203.0.113.10/32", 1)?;
    report(
        "ext -> LoadBalancer 203.0.113.10:80 (web-local, routed to node2)".into(),
        topo.from_ext(&ClientSpec::tcp("203.0.113.10:80", 6))?,
    );
    for node in &topo.nodes {
        let (code, body) = Topology::http_get(&node.ns, &format!("{}:30256", node.ip), "/healthz")?;
        println!(
            "healthCheckNodePort {}:30256/healthz -> {code} {}",
            node.ip,
            body.trim()
        );
        if code != 200 {
            failed.push(format!(
                "healthCheckNodePort on {} answered {code}",
                node.name
            ));
        }
    }
    println!("\ntearing the sandbox down");
    if !failed.is_empty() {
        bail!(
            "the demo saw failures: {} (kproxy's last line on node1: {})",
            failed.join("; "),
            last_error(&topo.log(0))
        );
    }
    Ok(())
}

/// The example Services, as `kproxy status` reads them back from each
/// node's kernel. A kproxy that exits (no root, a kernel feature missing, a
/// port in use) ends the wait at once with its own error line.
fn wait_programmed(topo: &mut Topology) -> Result<()> {
    const WANT: [&str; 3] = [
        "default/web:http",
        "default/web-nodeport:http",
        "default/web-local:http",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for i in 0..topo.nodes.len() {
            let exited = topo.nodes[i]
                .kproxy
                .as_mut()
                .is_some_and(|k| !k.is_running());
            if exited {
                bail!(
                    "kproxy on {} exited: {}",
                    topo.nodes[i].name,
                    last_error(&topo.log(i))
                );
            }
        }
        let missing: Vec<String> = (0..topo.nodes.len())
            .flat_map(|i| {
                let got = topo.programmed(i).unwrap_or_default();
                WANT.iter()
                    .filter(move |s| !got.iter().any(|f| &f.service == *s))
                    .map(move |s| format!("{s} on {}", NODE_NAMES[i]))
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after 30 s kproxy has not programmed {} (the demo sends traffic to examples/' Services; kproxy's last line: {})",
                missing.join(", "),
                last_error(&topo.log(0))
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const NODE_NAMES: [&str; 2] = kproxy_tests::topo::NODE_NAMES;

/// kproxy's own error line (its last `error:` line), else its last line.
fn last_error(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("error: "))
        .or(lines.last().copied())
        .unwrap_or("(no output)")
        .to_string()
}

/// Prints which pod answered and what client address it saw; returns the
/// number of failed requests.
fn show(what: &str, outcome: &Outcome) -> usize {
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
    outcome.failures().len()
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
