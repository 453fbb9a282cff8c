//! Developer tasks for kproxy: `cargo xtask <setup|build|test|demo|bench>`.
//!
//! Plain Rust with no dependencies beyond the workspace ones, so it builds on
//! a fresh machine before `setup` has installed anything.

mod run;
mod setup;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::run::{cargo, workspace_root};

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
    /// setup, then the sandbox demo: two nodes, pods and kproxy in network namespaces.
    Demo {
        /// Manifest directory handed to the sandbox.
        #[arg(long, default_value = "examples")]
        manifests: PathBuf,
    },
    /// The test Kubernetes API server on its own (prints a kubeconfig), to try cluster mode without a cluster.
    Apiserver {
        /// Arguments for kproxy-test-apiserver (--listen, --kubeconfig, --load FILE).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// setup, release build, then the benchmark harness (kproxy-bench).
    Bench {
        /// Comma-separated Service counts (each Service has 10 endpoints).
        #[arg(long, default_value = "1000,10000")]
        services: String,
        /// Where JSON results and the Markdown table go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::setup(),
        Command::Build => build(),
        Command::Test { no_setup } => test(no_setup),
        Command::Demo { manifests } => demo(&manifests),
        Command::Bench { services, out } => bench(&services, &out),
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

fn demo(manifests: &std::path::Path) -> Result<()> {
    setup::setup()?;
    let manifests = manifests.to_string_lossy();
    cargo(&[
        "run",
        "-p",
        "kproxy-tests",
        "--bin",
        "kproxy-sandbox",
        "--",
        "demo",
        "--manifests",
        &manifests,
    ])
}

fn bench(services: &str, out: &std::path::Path) -> Result<()> {
    setup::setup()?;
    build()?;
    let kproxy = run::target_dir().join("release").join("kproxy");
    let kproxy = kproxy.to_string_lossy();
    let out = if out.is_absolute() {
        out.to_path_buf()
    } else {
        workspace_root().join(out)
    };
    let out = out.to_string_lossy();
    cargo(&[
        "run",
        "--release",
        "-p",
        "kproxy-bench",
        "--",
        "--kproxy",
        &kproxy,
        "--services",
        services,
        "--out",
        &out,
    ])
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
        let cli = Cli::try_parse_from(["xtask", "bench", "--services", "10,20"]).unwrap();
        assert!(matches!(cli.command, Command::Bench { ref services, .. } if services == "10,20"));
        assert!(Cli::try_parse_from(["xtask", "test", "--no-setup"]).is_ok());
        let cli =
            Cli::try_parse_from(["xtask", "apiserver", "--listen", "127.0.0.1:7000"]).unwrap();
        assert!(matches!(cli.command, Command::Apiserver { ref args } if args.len() == 2));
    }
}
