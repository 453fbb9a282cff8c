//! Builds the eBPF programs (proxy-ebpf) for the BPF target with the nightly
//! toolchain, so a plain `cargo build -p kproxy` yields a binary that carries
//! them. `AYA_BUILD_SKIP=1` skips this for pure-userspace checks.

use std::path::Path;

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest).join("../proxy-ebpf");
    let root = root.to_str().expect("UTF-8 path");
    // proxy-common is part of the programs too.
    println!("cargo:rerun-if-changed={manifest}/../proxy-common/src");
    let package = aya_build::Package {
        name: "proxy-ebpf",
        root_dir: root,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!("building the eBPF programs failed: {e:#}");
    }
}
