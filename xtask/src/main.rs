//! Developer tasks for kproxy: `cargo xtask <setup|build|test|demo|bench>`.
//!
//! Plain Rust with no dependencies beyond the workspace ones, so it builds on
//! a fresh machine before `setup` has installed anything.

mod disk;
mod run;
mod setup;

use std::path::PathBuf;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use crate::run::{cargo, workspace_root, ChildFailed};

/// Packages linted with clippy by `cargo xtask test`. Never `--workspace`:
/// `proxy-ebpf` only builds for the BPF target (proxy/build.rs does that).
const CLIPPY_PACKAGES: &[&str] = &[
    "kproxy",
    "kproxy-tests",
    "kproxy-test-apiserver",
    "xtask",
    "proxy-common",
    "kproxy-bench",
];
/// Packages whose tests `cargo xtask test` runs.
const TEST_PACKAGES: &[&str] = &[
    "kproxy",
    "proxy-common",
    "kproxy-tests",
    "kproxy-test-apiserver",
    "kproxy-bench",
    "xtask",
];
/// Binary-only packages: `cargo test --doc` refuses them.
const NO_LIBRARY: &[&str] = &["kproxy-bench", "xtask"];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "kproxy developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (packages, rust-src, bpf-linker). Idempotent; needs root.
    Setup,
    /// Release build of the kproxy binary.
    Build,
    /// setup, then fmt check, clippy and the test suites (the CI entry point).
    Test {
        /// Skip `setup` (for machines that are already set up and runs without root).
        #[arg(long)]
        no_setup: bool,
    },
    /// setup, build, then the sandbox demo: two nodes, pods and kproxy in network namespaces.
    Demo {
        /// Manifest directory handed to the sandbox [default: the workspace's examples/].
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// The dataplane kproxy runs on both nodes.
        #[arg(long, value_enum, default_value_t = ProxyMode::Iptables)]
        proxy_mode: ProxyMode,
    },
    /// The test Kubernetes API server on its own (prints a kubeconfig), to try cluster mode without a cluster.
    Apiserver {
        /// Arguments for kproxy-test-apiserver (--listen, --kubeconfig, --load FILE).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// setup, release build, then the benchmark sweep (kproxy-bench; see bench/README.md).
    Bench {
        /// kproxy-bench flags: --quick, --services 1000,5000, --modes ebpf,legacy,nft,nftables,direct,
        /// --repeat N, --connects N, --changes N, --nft-cap S, --out DIR (default bench/results).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProxyMode {
    Iptables,
    Ebpf,
}

impl ProxyMode {
    fn flag(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ebpf => "ebpf",
        }
    }
}

/// Errors are one line, whatever RUST_BACKTRACE says (returning an
/// `anyhow::Error` from `main` would print its backtrace). A child that
/// failed has printed its own error: only its exit code is passed on.
fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(child) = err.downcast_ref::<ChildFailed>() {
                if child.quiet {
                    return ExitCode::from(child.code);
                }
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Setup => setup::setup(),
        Command::Build => build(),
        Command::Test { no_setup } => test(no_setup),
        Command::Demo {
            manifests,
            proxy_mode,
        } => demo(manifests, proxy_mode),
        Command::Bench { args } => bench(&args),
        Command::Apiserver { args } => {
            let mut cmd = vec!["run", "-p", "kproxy-test-apiserver", "--"];
            cmd.extend(args.iter().map(String::as_str));
            cargo(&cmd)
        }
    }
}

fn build() -> Result<()> {
    cargo(&["build", "--release", "-p", "kproxy"])
}

fn test(no_setup: bool) -> Result<()> {
    if !no_setup {
        setup::setup()?;
    }
    cargo(&["fmt", "--all", "--check"])?;

    let mut clippy = vec!["clippy"];
    for p in CLIPPY_PACKAGES {
        clippy.extend(["-p", p]);
    }
    clippy.extend(["--all-targets", "--", "-D", "warnings"]);
    cargo(&clippy)?;

    // nextest when installed (parallel, per-test output), plain cargo test otherwise.
    let nextest = run::succeeds(&run::cargo_bin(), &["nextest", "--version"]);
    if nextest {
        // nextest does not run doctests: run them first, so the last summary
        // printed is the one of the real suite.
        let mut doc = vec!["test", "--doc"];
        for p in TEST_PACKAGES.iter().filter(|p| !NO_LIBRARY.contains(p)) {
            doc.extend(["-p", p]);
        }
        cargo(&doc)?;
    }
    // The namespace suite runs the kproxy binary: build it once, up front,
    // instead of from every test process.
    cargo(&["build", "-p", "kproxy", "--bin", "kproxy"])?;
    let kproxy_bin = run::target_dir().join("debug").join("kproxy");
    std::env::set_var("KPROXY_BIN", &kproxy_bin);
    let mut test = if nextest {
        vec!["nextest", "run", "--no-fail-fast"]
    } else {
        vec!["test", "--no-fail-fast"]
    };
    for p in TEST_PACKAGES {
        test.extend(["-p", p]);
    }
    cargo(&test)?;
    println!("xtask test: all checks passed");
    Ok(())
}

/// The demo runs three binaries: the sandbox, the pods' `kproxy-testpod` and
/// `kproxy`. All are built here (a fresh clone has none of them), and the
/// sandbox is told where kproxy is.
fn demo(manifests: Option<PathBuf>, mode: ProxyMode) -> Result<()> {
    // Relative to where the user stands; the children run in the workspace root.
    let manifests = match manifests {
        Some(dir) => std::path::absolute(&dir)?,
        None => workspace_root().join("examples"),
    };
    setup::setup()?;
    cargo(&["build", "-p", "kproxy", "--bin", "kproxy"])?;
    cargo(&["build", "-p", "kproxy-tests", "--bins"])?;
    let debug = run::target_dir().join("debug");
    std::env::set_var("KPROXY_BIN", debug.join("kproxy"));
    std::env::set_var("KPROXY_TESTPOD", debug.join("kproxy-testpod"));
    run::status_quiet(
        &debug.join("kproxy-sandbox").to_string_lossy(),
        &[
            "demo".as_ref(),
            "--manifests".as_ref(),
            manifests.as_os_str(),
            "--proxy-mode".as_ref(),
            mode.flag().as_ref(),
        ] as &[&std::ffi::OsStr],
    )
}

/// kproxy-bench on the release kproxy, results in bench/results unless `--out` says otherwise.
fn bench(args: &[String]) -> Result<()> {
    setup::setup()?;
    build()?;
    let kproxy = run::target_dir().join("release").join("kproxy");
    let mut cmd: Vec<String> = ["run", "--release", "-p", "kproxy-bench", "--", "--kproxy"]
        .map(String::from)
        .to_vec();
    cmd.push(kproxy.to_string_lossy().into_owned());
    if !args.iter().any(|a| a == "--out" || a.starts_with("--out=")) {
        cmd.push("--out".into());
        cmd.push(
            workspace_root()
                .join("bench/results")
                .to_string_lossy()
                .into_owned(),
        );
    }
    // kproxy-bench runs in the workspace root: a relative --out is taken
    // from where the user stands.
    let mut out_follows = false;
    for a in args {
        let a = match (out_follows, a.strip_prefix("--out=")) {
            (true, _) => std::path::absolute(a)?.to_string_lossy().into_owned(),
            (false, Some(dir)) => format!("--out={}", std::path::absolute(dir)?.display()),
            (false, None) => a.clone(),
        };
        out_follows = a == "--out";
        cmd.push(a);
    }
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    cargo(&cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebpf_crate_is_never_built_for_the_host() {
        assert!(!CLIPPY_PACKAGES.contains(&"proxy-ebpf"));
        assert!(!TEST_PACKAGES.contains(&"proxy-ebpf"));
    }

    #[test]
    fn cli_parses() {
        let cli =
            Cli::try_parse_from(["xtask", "bench", "--quick", "--services", "10,20"]).unwrap();
        assert!(matches!(cli.command, Command::Bench { ref args } if args.len() == 3));
        assert!(Cli::try_parse_from(["xtask", "test", "--no-setup"]).is_ok());
        let cli = Cli::try_parse_from(["xtask", "demo", "--proxy-mode", "ebpf"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Demo {
                proxy_mode: ProxyMode::Ebpf,
                manifests: None
            }
        ));
        assert!(Cli::try_parse_from(["xtask", "demo", "--proxy-mode", "ipvs"]).is_err());
        let cli =
            Cli::try_parse_from(["xtask", "apiserver", "--listen", "127.0.0.1:7000"]).unwrap();
        assert!(matches!(cli.command, Command::Apiserver { ref args } if args.len() == 2));
    }
}
