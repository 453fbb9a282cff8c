use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use kproxy::cli::{Cli, Command, OutputFormat};
use kproxy::{model, run, source, status};

fn init_logging(verbosity: u8) {
    let default = match verbosity {
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbosity);
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Forward(args) => Ok(tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(kproxy::forward::run(args))?),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run::run(args)),
        Command::Cleanup(mode) => {
            let config = run::dataplane_config(&[], &[], false)?;
            run::open_dataplane(&mode, config)?.cleanup()?;
            eprintln!(
                "removed everything kproxy programmed ({} mode)",
                mode.proxy_mode
            );
            Ok(())
        }
        Command::CleanupKubeProxy(mode) => {
            let n =
                kproxy::dataplane::iptables::kube_proxy::cleanup_kube_proxy(mode.iptables_backend)?;
            eprintln!("removed {n} kube-proxy iptables chains");
            Ok(())
        }
        Command::Status(args) => {
            let config = run::dataplane_config(&[], &[], false)?;
            let frontends = run::open_dataplane(&args.mode, config)?.programmed()?;
            match args.output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&frontends)?),
                OutputFormat::Table => print!("{}", status::table(&frontends)),
            }
            Ok(())
        }
        Command::Render(args) => {
            let snapshot = source::manifest::load_dir(&args.manifests)
                .with_context(|| format!("reading {}", args.manifests.display()))?;
            for r in &snapshot.rejected {
                eprintln!("rejected: {r}");
            }
            let node_name = kproxy::cli::node_name(args.hostname_override.as_deref());
            let desired = model::build(&snapshot.objects, &model::ModelConfig { node_name });
            for r in &desired.rejected {
                eprintln!("rejected: {r}");
            }
            let config = run::dataplane_config(
                &args.cluster_cidr,
                &args.nodeport_addresses,
                args.masquerade_all,
            )?;
            print!(
                "{}",
                kproxy::dataplane::iptables::render_full(&desired, &config)
            );
            Ok(())
        }
    }
}
