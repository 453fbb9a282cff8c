//! One change among 10,000 Services reaches traffic within a bound, in both
//! modes: kproxy on node1 runs over a manifest directory of 10,000
//! generated Services × 10 endpoints (the bench's, `kproxy_tests::generated`)
//! plus one probe Service, a client in pod-a loops on the probe's ClusterIP
//! (real TCP connections), and the probe's EndpointSlice file is switched
//! between pod-c and pod-b by a write and a rename, as a user's tool does.
//! Each switch is timed from the write to the first connection answered by
//! the new backend (the client's own clock: the attempt's start plus its
//! duration).
//!
//! Only node1 runs kproxy (a second one at this size would double the
//! machine's load for nothing the test looks at); pod-b's traffic crosses
//! the LAN to node2 by its route.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kproxy_tests::client::{now_ms, Attempt, ClientSpec};
use kproxy_tests::manifests::{self as m, ready, service, slice, Endpoint};
use kproxy_tests::{generated, poll, Mode, Topology};

const SERVICES: usize = 10_000;
/// Beside the generated ClusterIPs (10.96.0.1 upwards, 10.96.39.16 at 10,000).
const VIP: &str = "10.96.250.10";
const SWITCHES: usize = 8;

/// Switches the probe's slice back and forth and returns each switch's
/// latency; fails on a connection that failed or a switch not seen within
/// `give_up`.
fn switch_latencies(topo: &Topology, give_up: Duration) -> Result<Vec<Duration>> {
    let backends = [
        ("pod-c", ready("10.244.1.30", "node1")),
        ("pod-b", ready("10.244.2.10", "node2")),
    ];
    // Bounded: at most this many connections (a few minutes at this pace);
    // stopped by the test once the switches are done.
    let client = topo.start_from_pod(
        "pod-a",
        &ClientSpec::tcp(format!("{VIP}:80"), 100_000)
            .timeout_ms(3000)
            .interval_ms(2),
    )?;
    client.wait_until("traffic through the probe", Duration::from_secs(30), |a| {
        a.iter().any(|a| a.pod() == Some("pod-c"))
    })?;
    let mut latencies = Vec::new();
    for k in 0..SWITCHES {
        let (to, endpoint) = &backends[(k + 1) % 2];
        let seen = client.attempts_so_far().len();
        let t0 = now_ms();
        topo.write("probe-slice.yaml", &[probe_slice(endpoint)])?;
        let first = poll::until(&format!("switch {k}: traffic to {to}"), give_up, || {
            let attempts = client.attempts_so_far();
            match attempts[seen..]
                .iter()
                .find(|a| a.t >= t0 && a.pod() == Some(to))
            {
                Some(a) => Ok(a.t + a.ms),
                None => bail!("{} attempts since the write", attempts.len() - seen),
            }
        })?;
        latencies.push(Duration::from_secs_f64((first - t0).max(0.0) / 1000.0));
        let stale = client.attempts_so_far()[seen..]
            .iter()
            .filter(|a| a.t >= t0 && a.t <= first && a.pod() != Some(to))
            .count();
        println!(
            "switch {k} to {to}: written at {} UTC, first answer from it after {:.0} ms ({stale} answers from the old backend meanwhile)",
            time_of_day(t0),
            first - t0
        );
    }
    let outcome = client.stop()?;
    let failed: Vec<&Attempt> = outcome.failures();
    ensure!(
        failed.is_empty(),
        "{} connections failed while the endpoints switched (first: {:?}); {}",
        failed.len(),
        failed.first(),
        outcome.summary()
    );
    Ok(latencies)
}

/// `HH:MM:SS.mmm` of a time in ms since the epoch (UTC, as kproxy logs).
fn time_of_day(ms: f64) -> String {
    let ms = ms as u64 % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

fn probe_slice(endpoint: &Endpoint) -> serde_json::Value {
    slice(
        "probe-1",
        "probe",
        &[("http", "TCP", 8080)],
        std::slice::from_ref(endpoint),
    )
}

/// Everything up to a serving probe at 10,000 Services; returns how long
/// kproxy took from its start to healthy.
fn start(mode: Mode, extra: &[&str]) -> Result<(Topology, Duration)> {
    let mut topo = Topology::build(mode)?;
    for i in 0..topo.pods.len() {
        topo.serve(i, &["--tcp", "8080"])?;
    }
    generated::generate(topo.manifests(), SERVICES)?;
    topo.write(
        "probe.yaml",
        &[service("probe", VIP, vec![m::tcp("http", 80, 8080)]).to_json()],
    )?;
    topo.write(
        "probe-slice.yaml",
        &[probe_slice(&ready("10.244.1.30", "node1"))],
    )?;
    // The periodic drift repair is a full sync (at this size in a debug
    // build: ~5 s in ebpf mode, ~25 s in iptables-legacy mode); a switch
    // that lands behind it measures the full sync, not the change.
    let mut args = vec!["--iptables-sync-period=1h"];
    args.extend(extra);
    topo.nodes[0].config.extra_args = args.iter().map(|a| a.to_string()).collect();
    let started = Instant::now();
    topo.start_kproxy(0)?;
    // Healthy: the first sync is done, bookkeeping included (a change
    // arriving earlier waits for the start, which is not what is measured
    // here). Polling `kproxy status` instead would read back 10,000
    // Services each time.
    poll::until("kproxy healthy", Duration::from_secs(600), || {
        let (code, body) = Topology::http_get(&topo.nodes[0].ns, "127.0.0.1:10256", "/healthz")?;
        ensure!(code == 200, "/healthz answered {code}: {body}");
        Ok(())
    })
    .with_context(|| topo.logs())?;
    let healthy = started.elapsed();
    poll::until("the probe answering", Duration::from_secs(30), || {
        let out = topo.from_pod("pod-a", &ClientSpec::tcp(format!("{VIP}:80"), 1))?;
        ensure!(out.all_ok(), "{}", out.summary());
        Ok(())
    })
    .with_context(|| topo.logs())?;
    Ok((topo, healthy))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn one_change_reaches_traffic(mode: Mode, extra: &[&str], bound: Duration) -> Result<()> {
    let (topo, start_up) = start(mode, extra)?;
    // Past the bound, keep waiting a while: a failure then says how late.
    let mut l = switch_latencies(&topo, bound * 4 + Duration::from_secs(10))
        .with_context(|| topo.logs())?;
    // kproxy's own account of the switches (model and sync times).
    let log = topo.log(0);
    let syncs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("synced") || l.contains("manifests changed"))
        .collect();
    for line in &syncs[syncs.len().saturating_sub(2 * SWITCHES)..] {
        println!("{line}");
    }
    l.sort();
    println!(
        "{} mode, {SERVICES} Services: start to healthy {:.1} s; {} endpoint switches, write to first answer from the new backend: p50 {:.0} ms, max {:.0} ms (bound {} ms); all: {:?}",
        mode.flag(),
        start_up.as_secs_f64(),
        l.len(),
        percentile(&l, 0.5).as_secs_f64() * 1e3,
        l[l.len() - 1].as_secs_f64() * 1e3,
        bound.as_millis(),
        l.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
    );
    ensure!(
        l[l.len() - 1] <= bound,
        "a switch took {:?}, over the bound of {bound:?} (all: {l:?})",
        l[l.len() - 1]
    );
    Ok(())
}

mod ebpf {
    use super::*;

    /// A change costs milliseconds (measured in a debug build at a load
    /// average of 7: p50 18 ms, max 24 ms); a change that waits for a
    /// rebuild of everything, or for bookkeeping over every Service,
    /// takes seconds here.
    #[test]
    fn one_change_among_10k_services_reaches_traffic() -> Result<()> {
        one_change_reaches_traffic(Mode::Ebpf, &[], Duration::from_millis(500))
    }
}

mod iptables {
    use super::*;

    /// One partial `iptables-legacy-restore`: the kernel replaces the whole
    /// nat table (seconds at this size; measured in a debug build under
    /// load: p50 3.0 s, max 4.5 s). iptables-nft cannot load 10,000
    /// Services in a test's time (README: prefer legacy or ebpf).
    #[test]
    fn one_change_among_10k_services_reaches_traffic() -> Result<()> {
        one_change_reaches_traffic(
            Mode::Iptables,
            &["--iptables-backend", "legacy"],
            Duration::from_secs(10),
        )
    }
}
