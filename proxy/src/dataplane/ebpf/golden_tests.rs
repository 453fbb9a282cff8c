//! YAML → map entries: each case under `testdata/` is a manifest directory
//! and the entries a fresh kproxy writes for it (`maps.txt`), the eBPF
//! counterpart of the iptables goldens. `examples/manifests` is a case too.
//! Regenerate with `UPDATE_GOLDEN=1 cargo test -p kproxy ebpf::golden`.

use std::path::{Path, PathBuf};

use super::render::render_maps;
use super::test_support::config;
use crate::model::{self, ModelConfig};
use crate::source::manifest::load_dir;

fn check(manifests: &Path, golden: &Path) {
    let snap = load_dir(manifests).unwrap();
    assert!(snap.rejected.is_empty(), "{:?}", snap.rejected);
    let desired = model::build(
        &snap.objects,
        &ModelConfig {
            node_name: "node1".into(),
        },
    );
    let got = render_maps(&desired, &config()).unwrap();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(golden, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(golden)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display()));
    assert_eq!(got, want, "{} differs", golden.display());
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/dataplane/ebpf/testdata")
}

#[test]
fn golden_lb_local_ranges_affinity() {
    let dir = testdata().join("lb_local_ranges_affinity");
    check(&dir, &dir.join("maps.txt"));
}

#[test]
fn golden_examples() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
    check(&examples, &testdata().join("examples.maps.txt"));
}
