//! Golden tests: `testdata/<case>.yaml` (Kubernetes objects, many documents)
//! is built for node `node-a` and compared with `testdata/<case>.json`.
//! Regenerate after an intended change with
//! `UPDATE_GOLDEN=1 cargo test -p kproxy model::golden` and review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::*;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/testdata")
}

/// Parses every document by its `kind`.
fn load(path: &Path) -> ClusterObjects {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut objects = ClusterObjects::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{} document {i}: {e}", path.display()));
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let ctx = |e: serde_yaml::Error| format!("{} document {i} ({kind}): {e}", path.display());
        match kind.as_str() {
            "Service" => objects.services.push(Arc::new(
                serde_yaml::from_value(value).map_err(ctx).unwrap(),
            )),
            "EndpointSlice" => objects.endpoint_slices.push(Arc::new(
                serde_yaml::from_value(value).map_err(ctx).unwrap(),
            )),
            "Node" => objects.nodes.push(Arc::new(
                serde_yaml::from_value(value).map_err(ctx).unwrap(),
            )),
            other => panic!("{} document {i}: unexpected kind {other:?}", path.display()),
        }
    }
    objects
}

#[test]
fn golden_cases() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<PathBuf> = fs::read_dir(testdata())
        .expect("testdata directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(
        !cases.is_empty(),
        "no golden cases in {}",
        testdata().display()
    );
    let mut failed = Vec::new();
    for yaml in &cases {
        let config = ModelConfig {
            node_name: "node-a".into(),
        };
        let state = build(&load(yaml), &config);
        let got = serde_json::to_string_pretty(&state).unwrap() + "\n";
        let json = yaml.with_extension("json");
        if update {
            fs::write(&json, &got).unwrap();
            continue;
        }
        let want = fs::read_to_string(&json).unwrap_or_default();
        if got != want {
            eprintln!("--- {} differs; got:\n{got}", json.display());
            failed.push(json.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "golden files differ: {failed:?} (UPDATE_GOLDEN=1 to regenerate, then review the diff)"
    );
}
