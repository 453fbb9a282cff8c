//! `cargo xtask setup`: make a fresh Debian machine (as root) able to build
//! and test kproxy. Every step checks first and is skipped when already done.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::run::{output, status, succeeds};

/// (command that proves the package is there, Debian package providing it).
const PACKAGES: &[(&str, &str)] = &[
    ("iptables", "iptables"),
    ("iptables-legacy", "iptables"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    ("bpftool", "bpftool"),
    ("ethtool", "ethtool"),
    ("ip", "iproute2"),
    ("curl", "curl"),
];

/// bpf-linker is built against the LLVM shipped inside the nightly toolchain,
/// so its LLVM matches the one rustc emits bitcode for.
const BPF_LINKER_INSTALL: &str = r#"set -eu
L=$(ls "$(rustc +nightly --print sysroot)"/lib/libLLVM.so.22*)
mkdir -p /opt/rust-llvm/lib
ln -sf "$L" /opt/rust-llvm/lib/libLLVM.so
ln -sf "$L" /opt/rust-llvm/lib/$(basename "$L")
LLVM_PREFIX=/opt/rust-llvm cargo install bpf-linker --no-default-features --features llvm-22
"#;

pub fn setup() -> Result<()> {
    if !is_root()? {
        bail!(
            "cargo xtask setup must run as root (it installs packages and bpf-linker, \
             and the tests create network namespaces); re-run it with sudo or as root"
        );
    }
    packages()?;
    lint_components()?;
    nightly_rust_src()?;
    bpf_linker()?;
    println!("setup: done");
    Ok(())
}

fn is_root() -> Result<bool> {
    // Read the effective uid from /proc so xtask needs no libc dependency.
    let st = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status to check for root")?;
    let uid_line = st
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("no Uid line in /proc/self/status")?;
    let euid = uid_line.split_whitespace().nth(2).unwrap_or("");
    Ok(euid == "0")
}

fn have_command(cmd: &str) -> bool {
    // root's PATH normally has the sbin directories, but `sudo -E` may not.
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .filter(|d| !d.is_empty())
        .any(|d| Path::new(d).join(cmd).is_file());
    found
}

fn packages() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have_command(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        println!("setup: packages: all present, skipped apt-get");
        return Ok(());
    }
    if !have_command("apt-get") {
        bail!(
            "missing packages {} and no apt-get on this machine: install them with your package manager",
            missing.join(" ")
        );
    }
    println!("setup: packages: installing {}", missing.join(" "));
    std::env::set_var("DEBIAN_FRONTEND", "noninteractive");
    status("apt-get", &["update"]).context("apt-get update failed")?;
    let mut args = vec!["install", "-y"];
    args.extend(&missing);
    status("apt-get", &args).context("apt-get install failed")?;
    Ok(())
}

/// `cargo xtask test` runs rustfmt and clippy on the default toolchain; a
/// minimal rustup profile has neither.
fn lint_components() -> Result<()> {
    let cargo = crate::run::cargo_bin();
    for (component, probe) in [("rustfmt", "fmt"), ("clippy", "clippy")] {
        if succeeds(&cargo, &[probe, "--version"]) {
            println!("setup: {component}: present, skipped");
            continue;
        }
        println!("setup: {component}: installing");
        status("rustup", &["component", "add", component])
            .with_context(|| format!("rustup component add {component} failed"))?;
    }
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    if !succeeds("rustc", &["+nightly", "--version"]) {
        println!("setup: nightly toolchain: installing");
        status(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )
        .context("could not install the nightly toolchain with rustup")?;
    } else {
        println!("setup: nightly toolchain: present, skipped");
    }
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src (nightly): present, skipped");
        return Ok(());
    }
    println!("setup: rust-src (nightly): installing");
    status(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )
    .context("rustup component add rust-src failed")
}

fn bpf_linker() -> Result<()> {
    if succeeds("bpf-linker", &["--version"]) {
        println!("setup: bpf-linker: present, skipped");
        return Ok(());
    }
    println!("setup: bpf-linker: building against the nightly's LLVM (takes a few minutes)");
    status("sh", &["-c", BPF_LINKER_INSTALL])
        .context("installing bpf-linker failed (see the cargo install output above)")?;
    if !succeeds("bpf-linker", &["--version"]) {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` does not run: \
             is ~/.cargo/bin in PATH?"
        );
    }
    Ok(())
}
