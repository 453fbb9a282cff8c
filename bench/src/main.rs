//! kproxy-bench: kproxy's modes against each other, against the floors of
//! their kernel interfaces and against direct pod-to-pod traffic, swept
//! over the number of Services. Run it through `cargo xtask bench` (root;
//! it creates network namespaces and cgroups and removes them).

mod floor;
mod nftables;
mod plot;
mod point;
mod probe;
mod report;
mod stats;
mod sys;
mod topo;

// The generated Services are shared with the namespace suite's scale test.
use kproxy_tests::generated as manifests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::floor::{Backend, Timed};
use crate::point::{Line, Plan, Setup};
use crate::report::{FloorRun, Sweep};

#[derive(Parser)]
#[command(name = "kproxy-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand)]
enum Sub {
    /// A backend of the measured node (answers `NAME\n`).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        /// Wait for the client to close instead of closing first.
        #[arg(long)]
        client_closes: bool,
    },
    /// Writes the Markdown report and the plots again from a sweep's JSON
    /// (into the JSON's directory unless --out says otherwise).
    Report {
        json: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Writes the sweep's synthetic Services (10 endpoints each, files of
    /// 1,000) into DIR, to load them elsewhere (the test API server,
    /// `kproxy --manifests`).
    Manifests {
        dir: PathBuf,
        #[arg(long)]
        services: usize,
    },
    /// A client of the measured node: connect | flood | follow.
    #[command(hide = true)]
    Probe {
        kind: String,
        #[arg(long = "target", required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long, default_value = "A")]
        expect: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 60.0)]
        secs: f64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

#[derive(Args, Clone)]
struct BenchArgs {
    /// The kproxy binary to measure (a release build).
    #[arg(long)]
    kproxy: Option<PathBuf>,
    /// Service counts, comma-separated (10 endpoints each)
    /// [default: 1000,5000,10000,20000,50000; --quick: 100,1000].
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<usize>>,
    /// Lines to measure, comma-separated: ebpf, legacy (iptables-legacy),
    /// nft (iptables-nft), nftables (kube-proxy's ruleset shape, nft -f), direct.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ebpf,legacy,nft,nftables,direct"
    )]
    modes: Vec<String>,
    /// Runs of every point; min / median / max are reported [default: 3; --quick: 1].
    #[arg(long)]
    repeat: Option<usize>,
    /// Connections per connect-latency series, per client and target
    /// [default: 10000; --quick: 2000].
    #[arg(long)]
    connects: Option<usize>,
    /// EndpointSlice switches per point [default: 50; --quick: 10].
    #[arg(long)]
    changes: Option<usize>,
    /// Seconds of each new-connection flood [default: 5; --quick: 2].
    #[arg(long)]
    flood_secs: Option<f64>,
    /// Seconds of new connections from outside through a NodePort that
    /// needs SNAT, per kproxy line [default: 30; --quick: 2; 0 skips].
    #[arg(long)]
    sustain_secs: Option<f64>,
    /// Longest wait, in seconds, for the connection-tracking tables to
    /// drain after the sustained phase [default: 150 (netfilter's
    /// TIME_WAIT is 120 s); --quick: 20].
    #[arg(long)]
    drain_cap: Option<u64>,
    /// iptables-nft: seconds after which a sync (kproxy's or the restore
    /// floor's) is given up and marked capped; larger counts are then
    /// skipped [default: 300; --quick: 120].
    #[arg(long)]
    nft_cap: Option<u64>,
    /// Seconds the endpoint changes of one point may take in all
    /// [default: 900; --quick: 120].
    #[arg(long)]
    change_budget: Option<u64>,
    /// The backend closes each connection first, as an HTTP/1.0 server
    /// does (TIME_WAIT on the backend). By default the client closes first
    /// (TIME_WAIT on the client, as with a keep-alive HTTP client), so the
    /// numbers measure the datapath, not TIME_WAIT collisions: with the
    /// backend closing, tens of thousands of connections from one client
    /// keep landing on 4-tuples still in TIME_WAIT on the backend, where a
    /// Service connection and a direct one can also meet.
    #[arg(long)]
    backend_closes_first: bool,
    /// Few samples and small counts, for a check in minutes; flags given
    /// explicitly still apply.
    #[arg(long)]
    quick: bool,
    /// Directory for the JSON, the Markdown report, the SVG plots and kproxy's logs.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Sub::Serve {
            name,
            port,
            client_closes,
        }) => probe::serve(&name, port, client_closes),
        Some(Sub::Probe {
            kind,
            targets,
            expect,
            count,
            secs,
            threads,
        }) => probe::run(
            &kind,
            &targets,
            &probe::ProbeArgs {
                expect,
                count,
                secs,
                threads,
            },
        ),
        Some(Sub::Report { json, out }) => report_again(&json, out),
        Some(Sub::Manifests { dir, services }) => manifests::generate(&dir, services),
        None => bench(cli.bench),
    };
    // One line, whatever RUST_BACKTRACE says.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The sweep after defaults (and `--quick`) are applied.
struct Resolved {
    services: Vec<usize>,
    repeat: usize,
    plan: Plan,
}

impl BenchArgs {
    fn resolved(&self) -> Resolved {
        let q = self.quick;
        let pick = |given: Option<u64>, full: u64, quick: u64| {
            given.unwrap_or(if q { quick } else { full })
        };
        Resolved {
            services: self.services.clone().unwrap_or_else(|| {
                if q {
                    vec![100, 1000]
                } else {
                    vec![1000, 5000, 10_000, 20_000, 50_000]
                }
            }),
            repeat: pick(self.repeat.map(|v| v as u64), 3, 1) as usize,
            plan: Plan {
                connects: pick(self.connects.map(|v| v as u64), 10_000, 2000) as usize,
                changes: pick(self.changes.map(|v| v as u64), 50, 10) as usize,
                flood_secs: self.flood_secs.unwrap_or(if q { 2.0 } else { 5.0 }),
                flood_threads: 2,
                nft_cap: Duration::from_secs(pick(self.nft_cap, 300, 120)),
                sync_deadline: Duration::from_secs(3600),
                change_budget: Duration::from_secs(pick(self.change_budget, 900, 120)),
                client_closes_first: !self.backend_closes_first,
                sustain_secs: self.sustain_secs.unwrap_or(if q { 2.0 } else { 30.0 }),
                drain_cap: Duration::from_secs(pick(self.drain_cap, 150, 20)),
            },
        }
    }
}

fn report_again(json: &std::path::Path, out: Option<PathBuf>) -> Result<()> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let sweep: Sweep = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a sweep's JSON", json.display()))?;
    let out = match out {
        Some(dir) => dir,
        None => json.parent().map(PathBuf::from).unwrap_or_default(),
    };
    std::fs::create_dir_all(&out)?;
    let plots = plot::draw_all(&sweep, &out)?;
    println!("{}", sweep.markdown(&plots));
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let Resolved {
        services,
        repeat: repeats,
        plan,
    } = args.resolved();
    kproxy_tests::topo::preflight()?;
    let kproxy = args
        .kproxy
        .clone()
        .context("--kproxy PATH is required (cargo xtask bench passes target/release/kproxy)")?;
    let kproxy = std::fs::canonicalize(&kproxy).with_context(|| {
        format!(
            "kproxy binary {} not found: run `cargo xtask build`",
            kproxy.display()
        )
    })?;
    let mut lines = args
        .modes
        .iter()
        .map(|m| Line::parse(m))
        .collect::<Result<Vec<_>>>()?;
    lines.sort();
    lines.dedup();
    if services.is_empty() || lines.is_empty() || repeats == 0 {
        bail!("nothing to measure: give --services, --modes and a --repeat of at least 1");
    }
    if let Some(&n) = services.iter().find(|&&n| n >= 65_000) {
        bail!("--services {n}: at most 64,999 Services fit in the 10.96.0.0/16 Service range");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let work = sys::TempDir::new("work")?;
    let mut sweep = Sweep::new(&kproxy, &services, &lines, repeats, &plan);
    if sweep.machine.busy() {
        eprintln!(
            "warning: the machine is busy (load average {:.2} on {} CPUs): numbers will be noisy",
            sweep.machine.load_start[0], sweep.machine.cpus
        );
    }
    let started = Instant::now();
    let mut services = services;
    services.sort_unstable();
    // Lines that hit their cap (iptables-nft, nftables): superlinear, so a
    // larger count would not finish either.
    let mut capped: Vec<Line> = Vec::new();
    let mut nft_floor_capped_at: Option<usize> = None;
    for &n in &services {
        let dir = work.0.join(format!("manifests-{n}"));
        manifests::generate(&dir, n)?;
        let rules = work.0.join(format!("rules-{n}.txt"));
        let needs_render = lines.iter().any(|l| matches!(l, Line::Legacy | Line::Nft));
        let rendered = if needs_render {
            match floor::render(&kproxy, &dir, &rules) {
                Ok(r) => Some(r),
                Err(e) => {
                    sweep.errors.push(format!("render at {n} Services: {e:#}"));
                    None
                }
            }
        } else {
            None
        };
        for repeat in 0..repeats {
            for (line, backend) in [(Line::Legacy, Backend::Legacy), (Line::Nft, Backend::Nft)] {
                if !lines.contains(&line) || rendered.is_none() {
                    continue;
                }
                let cap = if backend == Backend::Nft {
                    plan.nft_cap
                } else {
                    plan.sync_deadline
                };
                let mut f = FloorRun::new(n, &backend.tool("restore"), repeat, rendered);
                if backend == Backend::Nft && nft_floor_capped_at.is_some() {
                    f.capped = true;
                } else {
                    eprintln!("bench: {n} Services, floor {} (run {})", f.tool, repeat + 1);
                    match floor::restore(&rules, backend, cap) {
                        Ok(Timed::Done(s)) => f.seconds = Some(s),
                        Ok(Timed::Capped(_)) => {
                            f.capped = true;
                            nft_floor_capped_at = Some(n);
                            // kproxy's first sync is one such restore: it
                            // cannot finish within the cap either.
                            if !capped.contains(&Line::Nft) {
                                capped.push(Line::Nft);
                            }
                        }
                        Err(e) => f.error = Some(format!("{e:#}")),
                    }
                }
                sweep.floors.push(f);
            }
            for &line in &lines {
                if capped.contains(&line) {
                    sweep.runs.push(point::Run::skipped(n, line, repeat));
                    continue;
                }
                eprintln!("bench: {n} Services, {} (run {})", line.name(), repeat + 1);
                let setup = Setup {
                    kproxy: &kproxy,
                    manifests: &dir,
                    services: n,
                    logs: &logs,
                    work: &work.0,
                };
                let run = point::measure(&setup, line, repeat, &plan);
                for e in &run.errors {
                    eprintln!("error: {e}");
                }
                if run.capped {
                    capped.push(line);
                }
                eprintln!("bench: {}", report::one_line(&run));
                sweep.runs.push(run);
            }
        }
        // Results so far survive a later failure or Ctrl-C.
        sweep.duration_s = started.elapsed().as_secs_f64();
        sweep.write(&args.out)?;
    }
    sweep.finish(started.elapsed());
    let paths = sweep.write(&args.out)?;
    let plots = plot::draw_all(&sweep, &args.out)?;
    println!("{}", sweep.markdown(&plots));
    println!("results: {}", paths.join(", "));
    let failures = sweep.failures();
    if failures > 0 {
        bail!(
            "{failures} measurement(s) failed; see the errors above and kproxy's logs in {}",
            logs.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_shrinks_the_sweep() {
        let cli = Cli::try_parse_from(["kproxy-bench", "--quick", "--kproxy", "k"]).unwrap();
        let a = cli.bench.resolved();
        assert_eq!(a.services, vec![100, 1000]);
        assert_eq!(a.repeat, 1);
        // Explicit flags win over --quick.
        let cli = Cli::try_parse_from(["kproxy-bench", "--quick", "--services", "100"]).unwrap();
        assert_eq!(cli.bench.resolved().services, vec![100]);
        let cli = Cli::try_parse_from([
            "kproxy-bench",
            "--services",
            "10,20",
            "--modes",
            "ebpf,direct",
        ])
        .unwrap();
        let a = cli.bench.resolved();
        assert_eq!(a.services, vec![10, 20]);
        assert_eq!(a.repeat, 3);
        // What the issue asks of a full point.
        assert!(a.plan.connects >= 10_000);
        assert!(a.plan.changes >= 50);
        let cli = Cli::try_parse_from([
            "kproxy-bench",
            "probe",
            "connect",
            "--target",
            "10.97.0.10:80",
            "--target",
            "10.244.1.10:8080",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Sub::Probe { ref targets, .. }) if targets.len() == 2));
    }
}
