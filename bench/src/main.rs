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
    /// iptables backends to measure, comma-separated (legacy, nft). The first
    /// one is also used for the endpoint-change run.
    #[arg(long, default_value = "legacy,nft", value_delimiter = ',')]
    backends: Vec<String>,
    /// Largest Service count measured with the nft backend: iptables-nft-restore
    /// grows superlinearly (seen: 6.7 s at 1,000 Services, still running after
    /// 22 min at 10,000), so larger counts are skipped unless raised.
    #[arg(long, default_value_t = 2000)]
    nft_max_services: usize,
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
            if b.name() == "nft" && n > args.nft_max_services {
                eprintln!(
                    "bench: {n} Services, iptables-nft skipped (above --nft-max-services {})",
                    args.nft_max_services
                );
                continue;
            }
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
        // At every count: request latency through the Service against
        // direct, then the endpoint change.
        for &n in &args.services {
            // The first backend asked for: auto would pick nft here, whose
            // full restore at 10,000 Services takes tens of minutes.
            let backend = backends.first().copied();
            let mut modes = vec![(Mode::Iptables(backend), "iptables")];
            if !args.skip_ebpf {
                modes.push((Mode::Ebpf, "ebpf"));
            }
            for (mode, name) in modes {
                eprintln!("bench: datapath and endpoint change at {n} Services, {name}");
                let dir = work.0.join(format!("latency-{name}-{n}"));
                manifests::generate(&dir, n)?;
                let log = args.out.join(format!("kproxy-latency-{n}-{name}.log"));
                match measure::endpoint_change(&kproxy, &dir, n, mode, &log) {
                    Ok(r) if mode == Mode::Ebpf => report.ebpf_endpoint_change.push(r),
                    Ok(r) => report.endpoint_change.push(r),
                    Err(e) => {
                        eprintln!("error: {name} endpoint change: {e:#}");
                        report
                            .errors
                            .push(format!("{name} endpoint change at {n} Services: {e:#}"));
                    }
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
