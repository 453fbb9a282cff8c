use std::process::ExitCode;

use anyhow::Context;

use kproxy::cli::{Command, OutputFormat};
use kproxy::dataplane::ProxyMode;
use kproxy::{model, run, source, status};

/// Errors are one line, whatever RUST_BACKTRACE says (returning the error
/// from `main` would print its backtrace).
fn main() -> ExitCode {
    // The image installs this binary as /go-runner too (kops' wrapper).
    if let Some(code) = kproxy::cli::go_runner::run_if_invoked() {
        return code;
    }
    let cli = kproxy::cli::parse();
    // `kproxy forward -f` on a terminal: its status lines say what logs would.
    let status_lines = matches!(&cli.command, Command::Forward(f) if f.file.is_some())
        && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let forward = matches!(&cli.command, Command::Forward(_));
    kproxy::cli::logging::init(cli.verbosity, status_lines, forward);
    let kernel = !matches!(
        cli.command,
        Command::Forward(_) | Command::Render(_) | Command::UdpRelay(_)
    );
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let hint = if kernel {
                capability_hint(effective_capabilities())
            } else {
                None
            };
            match hint {
                Some(hint) => eprintln!("error: {err:#} ({hint})"),
                None => eprintln!("error: {err:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capability set (`CapEff` in /proc/self/status).
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// When a command that programs the kernel fails without the privileges it
/// needs, the kernel's answer (EPERM, often buried in a library's error)
/// is not the message a user needs: say what is missing.
fn capability_hint(caps: Option<u64>) -> Option<&'static str> {
    let has = |cap: u32| caps.is_some_and(|c| c & (1 << cap) != 0);
    if !has(CAP_NET_ADMIN) {
        Some("kproxy lacks CAP_NET_ADMIN: run it as root, or in a privileged container as kube-proxy runs")
    } else if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        Some(
            "kproxy lacks CAP_BPF: ebpf mode needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON",
        )
    } else {
        None
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Forward(args) => Ok(tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(kproxy::forward::run(args))?),
        Command::UdpRelay(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(kproxy::server::udp_relay::run_standalone(args)),
        Command::Run(args) => {
            // Before any thread allocates: glibc gives each new thread an
            // arena of its own (see one_arena).
            if args.manifests.is_none() {
                kproxy::sync::memory::one_arena();
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run::run(args))
        }
        Command::Cleanup(args) => {
            let mode = args.mode;
            run::cleanup(&mode, args.force)?;
            eprintln!(
                "removed everything kproxy programmed ({} mode)",
                mode.mode()
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
            let asked = !args.metrics_bind_address.is_empty();
            let rejected = asked
                .then(|| status::rejections(&args.metrics_bind_address))
                .flatten();
            let agent = asked
                .then(|| status::frontends(&args.metrics_bind_address, args.all))
                .flatten();
            if args.summary {
                match args.output {
                    OutputFormat::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "frontends": agent,
                            "rejected": rejected,
                        }))?
                    ),
                    OutputFormat::Table => {
                        print!("{}", status::summary(rejected.as_deref(), agent.as_ref()))
                    }
                }
                return Ok(());
            }
            let config = run::dataplane_config(&[], &[], false)?;
            let dataplane = run::open_dataplane(&args.mode, config)?;
            let frontends = dataplane.programmed()?;
            match args.output {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&status::json(
                        &frontends,
                        rejected.as_deref().unwrap_or_default(),
                        agent.as_ref(),
                    ))?
                ),
                OutputFormat::Table => {
                    print!(
                        "{}",
                        status::report(&frontends, rejected.as_deref(), agent.as_ref())
                    );
                    for line in dataplane.node_notes() {
                        println!("\n{line}");
                    }
                }
            }
            Ok(())
        }
        Command::Render(args) => {
            let events = source::manifest::load_events(&args.manifests)
                .with_context(|| format!("reading {}", args.manifests.display()))?;
            let node_name = kproxy::cli::node_name(args.hostname_override.as_deref());
            // The model as `kproxy run` keeps it, fed the same events.
            let mut tracker = model::Tracker::new(model::ModelConfig { node_name });
            for ev in events {
                tracker.apply(ev);
            }
            tracker.take_changes();
            let desired = tracker.state();
            for r in &desired.rejected {
                eprintln!("rejected: {r}");
            }
            let config = run::dataplane_config(
                &args.cluster_cidr,
                &args.nodeport_addresses,
                args.masquerade_all,
            )?;
            match args.proxy_mode {
                ProxyMode::Iptables => print!(
                    "{}",
                    kproxy::dataplane::iptables::render_full(desired, &config)
                ),
                ProxyMode::Ebpf => print!(
                    "{}",
                    kproxy::dataplane::ebpf::render::render_maps(desired, &config)?
                ),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_names_the_missing_capability() {
        assert!(capability_hint(Some(0)).unwrap().contains("CAP_NET_ADMIN"));
        assert!(capability_hint(None).unwrap().contains("CAP_NET_ADMIN"));
        let net_admin = 1 << CAP_NET_ADMIN;
        assert!(capability_hint(Some(net_admin))
            .unwrap()
            .contains("CAP_BPF"));
        assert_eq!(capability_hint(Some(net_admin | 1 << CAP_BPF)), None);
        assert_eq!(capability_hint(Some(net_admin | 1 << CAP_SYS_ADMIN)), None);
        // root: every bit.
        assert_eq!(capability_hint(Some(0x1ff_ffff_ffff)), None);
    }
}
