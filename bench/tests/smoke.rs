//! The bench cannot rot: a small sweep (100 Services, every line, few
//! samples, bounded in time) must run to the end, measure every metric of
//! every line, and write its JSON, Markdown report and plots. Needs root,
//! like the namespace suite (it fails loudly without it).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn quick_sweep_measures_every_line() {
    let kproxy = kproxy_tests::kproxy::binary().expect("kproxy binary");
    let out = tempfile::Builder::new()
        .prefix("kproxy-bench-smoke")
        .tempdir()
        .unwrap();
    let start = Instant::now();
    let res = Command::new(env!("CARGO_BIN_EXE_kproxy-bench"))
        .arg("--kproxy")
        .arg(&kproxy)
        .args([
            "--quick",
            "--services",
            "100",
            "--connects",
            "300",
            "--changes",
            "3",
        ])
        .args([
            "--flood-secs",
            "1",
            "--nft-cap",
            "60",
            "--change-budget",
            "60",
            "--sustain-secs",
            "1",
            "--drain-cap",
            "5",
        ])
        .args(["--modes", "ebpf,legacy,nft,nftables,direct"])
        .arg("--out")
        .arg(out.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("running kproxy-bench");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "kproxy-bench failed:\n{stderr}");
    assert!(
        start.elapsed() < Duration::from_secs(300),
        "took {:?}",
        start.elapsed()
    );

    let json = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a JSON result");
    let sweep: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(sweep["machine"]["cpu_model"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(sweep["machine"]["load_start"][0].is_number());
    let runs = sweep["runs"].as_array().unwrap();
    let run = |line: &str| {
        runs.iter()
            .find(|r| r["line"] == line)
            .unwrap_or_else(|| panic!("no run of {line}"))
    };
    for r in runs {
        assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r:#}");
        assert_eq!(r["capped"], false, "{r:#}");
    }
    for line in ["ebpf", "legacy", "nft"] {
        let r = run(line);
        assert!(r["sync"]["full_sync_s"].as_f64().unwrap() > 0.0, "{line}");
        assert!(
            r["sync"]["start_to_healthy_s"].as_f64().unwrap() > 0.0,
            "{line}"
        );
        assert!(r["sync"]["rss_kib"].as_u64().unwrap() > 0, "{line}");
        let changes = r["changes"]["latency_ms"].as_array().unwrap();
        assert_eq!(changes.len(), 3, "{line}");
        assert!(r["rss_after_changes_kib"].as_u64().unwrap() > 0, "{line}");
        // Every connection through the SNAT NodePort reached pod D.
        let s = &r["sustained"];
        assert!(s["ok"].as_u64().unwrap() > 0, "{line}: {s:#}");
        assert_eq!(s["failed"], 0, "{line}: {s:#}");
        assert_eq!(s["wrong_backend"], 0, "{line}: {s:#}");
        assert!(!s["fill_after"].as_object().unwrap().is_empty(), "{line}");
    }
    assert!(run("ebpf")["sync"]["bpf_memlock_bytes"].as_u64().unwrap() > 0);
    assert!(run("nftables")["sync"]["full_sync_s"].as_f64().unwrap() > 0.0);
    for line in ["ebpf", "legacy", "nft", "nftables", "direct"] {
        let r = run(line);
        let series = r["connect"].as_array().unwrap();
        // Both clients; Service and direct except for the direct line.
        let want = if line == "direct" { 2 } else { 4 };
        assert_eq!(series.len(), want, "{line}");
        for s in series {
            assert_eq!(s["connect"]["count"], 300, "{line}: {s:#}");
            assert!(s["connect"]["p50"].as_f64().unwrap() > 0.0);
            assert_eq!(s["wrong_backend"], 0, "{line}: {s:#}");
        }
        for f in r["floods"].as_array().unwrap() {
            assert!(f["conns_per_s"].as_f64().unwrap() > 0.0, "{line}: {f:#}");
            assert!(f["cpu_ms_per_1k"].as_f64().unwrap() > 0.0, "{line}: {f:#}");
        }
    }
    let floors = sweep["floors"].as_array().unwrap();
    assert_eq!(floors.len(), 2);
    assert!(floors.iter().all(|f| f["seconds"].as_f64().unwrap() > 0.0));

    let md = std::fs::read_to_string(out.path().join("latest.md")).unwrap();
    for heading in [
        "## Headline",
        "## Sync",
        "## Endpoint change",
        "## Connect latency",
        "## New connections",
        "## Sustained NodePort with SNAT",
        "## Memory",
        "## Published anchors",
        "## Plots",
    ] {
        assert!(md.contains(heading), "{heading} missing from the report");
    }
    let stem = json.file_stem().unwrap();
    for plot in [
        "full-sync.svg",
        "connect-p99.svg",
        "endpoint-change-p50.svg",
        "connections-per-second.svg",
        "memory.svg",
    ] {
        let svg = std::fs::read_to_string(out.path().join(stem).join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("ebpf"), "{plot}");
    }
}
