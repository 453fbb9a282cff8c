//! kproxy-bench: how long kproxy takes to program N Services compared with a
//! bare `iptables-restore` of the same rules, how fast an endpoint change
//! reaches traffic, and how much memory kproxy holds. Run it through
//! `cargo xtask bench` (root; it creates network namespaces and removes them).

mod manifests;
mod measure;
mod report;
mod sys;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::measure::{Backend, Mode};
use crate::report::{EbpfRow, Report, SyncRow};

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
    /// Backend used inside the latency topology (answers `NAME\n` per TCP connection).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// The kproxy binary to measure (a release build).
    #[arg(long)]
    kproxy: Option<PathBuf>,
    /// Comma-separated Service counts, 10 endpoints each.
    #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
    services: Vec<usize>,
    /// iptables backends to measure, comma-separated (nft, legacy).
    #[arg(long, default_value = "nft,legacy", value_delimiter = ',')]
    backends: Vec<String>,
    /// Directory for the JSON results and the Markdown table.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Skip the endpoint-change latency run (done at the largest Service count).
    #[arg(long)]
    skip_latency: bool,
    /// Skip the ebpf-mode runs (measured next to iptables mode by default).
    #[arg(long)]
    skip_ebpf: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Sub::Serve { name, port }) = cli.command {
        return measure::serve(&name, port);
    }
    bench(cli.bench)
}

fn bench(args: BenchArgs) -> Result<()> {
    let kproxy = args
        .kproxy
        .context("--kproxy PATH is required (cargo xtask bench passes target/release/kproxy)")?;
    let kproxy = std::fs::canonicalize(&kproxy).with_context(|| {
        format!(
            "kproxy binary {} not found: run `cargo xtask build`",
            kproxy.display()
        )
    })?;
    let backends = args
        .backends
        .iter()
        .map(|b| Backend::parse(b))
        .collect::<Result<Vec<_>>>()?;
    if args.services.is_empty() || backends.is_empty() {
        bail!("nothing to measure: give at least one --services count and one --backends entry");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let work = sys::TempDir::new("work")?;
    let mut report = Report::new(&kproxy);

    for &n in &args.services {
        let dir = work.0.join(format!("manifests-{n}"));
        manifests::generate(&dir, n)?;
        let rules = work.0.join(format!("rules-{n}.txt"));
        let rendered = measure::render(&kproxy, &dir, &rules);
        if let Err(e) = &rendered {
            eprintln!("error: {e:#}");
        }
        for &b in &backends {
            eprintln!("bench: {n} Services, iptables-{}", b.name());
            let mut row = SyncRow::new(n, b);
            row.rendered_rules = rendered.as_ref().ok().copied();
            match &rendered {
                Ok(_) => match measure::restore_floor(&rules, b) {
                    Ok(s) => row.floor_restore_s = Some(s),
                    Err(e) => row.errors.push(format!("floor: {e:#}")),
                },
                Err(e) => row.errors.push(format!("render: {e:#}")),
            }
            let log = args.out.join(format!("kproxy-{n}-{}.log", b.name()));
            match measure::kproxy_sync(&kproxy, &dir, Mode::Iptables(Some(b)), &log) {
                Ok(r) => row.kproxy = Some(r),
                Err(e) => row.errors.push(format!("kproxy: {e:#}")),
            }
            for e in &row.errors {
                eprintln!("error: {e}");
            }
            report.sync.push(row);
        }
        if !args.skip_ebpf {
            eprintln!("bench: {n} Services, ebpf");
            let log = args.out.join(format!("kproxy-{n}-ebpf.log"));
            let mut row = EbpfRow {
                services: n,
                kproxy: None,
                errors: Vec::new(),
            };
            match measure::kproxy_sync(&kproxy, &dir, Mode::Ebpf, &log) {
                Ok(r) => row.kproxy = Some(r),
                Err(e) => row.errors.push(format!("kproxy ebpf: {e:#}")),
            }
            for e in &row.errors {
                eprintln!("error: {e}");
            }
            report.ebpf_sync.push(row);
        }
    }

    if !args.skip_latency {
        let n = *args.services.iter().max().expect("checked non-empty");
        eprintln!("bench: endpoint change at {n} Services");
        let dir = work.0.join(format!("latency-{n}"));
        manifests::generate(&dir, n)?;
        let log = args.out.join(format!("kproxy-latency-{n}.log"));
        match measure::endpoint_change(&kproxy, &dir, n, Mode::Iptables(None), &log) {
            Ok(r) => report.endpoint_change = Some(r),
            Err(e) => {
                eprintln!("error: endpoint change: {e:#}");
                report
                    .errors
                    .push(format!("endpoint change at {n} Services: {e:#}"));
            }
        }
        if !args.skip_ebpf {
            eprintln!("bench: endpoint change at {n} Services, ebpf");
            let dir = work.0.join(format!("latency-ebpf-{n}"));
            manifests::generate(&dir, n)?;
            let log = args.out.join(format!("kproxy-latency-{n}-ebpf.log"));
            match measure::endpoint_change(&kproxy, &dir, n, Mode::Ebpf, &log) {
                Ok(r) => report.ebpf_endpoint_change = Some(r),
                Err(e) => {
                    eprintln!("error: ebpf endpoint change: {e:#}");
                    report
                        .errors
                        .push(format!("ebpf endpoint change at {n} Services: {e:#}"));
                }
            }
        }
    }

    let (json, md) = report.write(&args.out)?;
    println!("{}", report.markdown());
    println!("results: {} and {}", json.display(), md.display());
    let failures = report.failures();
    if failures > 0 {
        bail!(
            "{failures} measurement(s) failed; see the errors above and the kproxy logs in {}",
            args.out.display()
        );
    }
    Ok(())
}
