use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::cli::{parse_from, Command};
use crate::dataplane::ProxyMode;

/// Parses `kproxy run ARGS`, then applies `yaml` as `kproxy run` does.
fn run_with(argv: &[&str], yaml: &str) -> Result<(RunArgs, Applied), String> {
    let mut full = vec!["kproxy", "run"];
    full.extend_from_slice(argv);
    let cli = parse_from(full.iter().map(OsString::from).collect()).unwrap();
    let Command::Run(mut args) = cli.command else {
        panic!("run expected")
    };
    let applied = apply_str(yaml, &mut args)?;
    args.apply_dependent_defaults();
    Ok((args, applied))
}

const HEAD: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

const FULL: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: 10.244.0.0/16,10.245.0.0/16
hostnameOverride: node-a
bindAddress: 0.0.0.0
healthzBindAddress: 0.0.0.0:10266
metricsBindAddress: 127.0.0.1:10259
nodePortAddresses: ["192.168.0.0/24"]
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 50
iptables:
  masqueradeAll: true
  syncPeriod: 45s
  minSyncPeriod: 2s
conntrack:
  maxPerCore: 65536
ipvs:
  scheduler: rr
"#;

#[test]
fn supported_fields_apply() {
    let (args, applied) = run_with(&[], FULL).unwrap();
    assert_eq!(args.mode.mode(), ProxyMode::Iptables);
    assert_eq!(args.cluster_cidrs().len(), 2);
    assert_eq!(args.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(args.healthz_addr(), Some("0.0.0.0:10266".parse().unwrap()));
    assert_eq!(
        args.metrics_addr(),
        Some("127.0.0.1:10259".parse().unwrap())
    );
    assert_eq!(
        args.nodeport_address_list(),
        vec![NodePortAddress::Cidr("192.168.0.0/24".parse().unwrap())]
    );
    assert!(args.masquerade_all);
    assert_eq!(args.iptables_sync_period, Duration::from_secs(45));
    assert_eq!(args.iptables_min_sync_period, Duration::from_secs(2));
    assert_eq!(args.conntrack_max_per_core, 65536);
    assert_eq!(
        args.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    let w = applied.warnings.join("\n");
    for field in ["clientConnection.qps", "ipvs.scheduler"] {
        assert!(w.contains(field), "warning should name {field}: {w}");
    }
}

#[test]
fn flags_override_the_file() {
    let (args, _) = run_with(
        &[
            "--cluster-cidr",
            "10.1.0.0/16",
            "--iptables-min-sync-period",
            "0s",
            "--masquerade-all=false",
            "--hostname-override",
            "flag-node",
            "--kubeconfig",
            "/flag/kc",
        ],
        FULL,
    )
    .unwrap();
    assert_eq!(args.cluster_cidrs(), vec!["10.1.0.0/16".parse().unwrap()]);
    assert_eq!(args.iptables_min_sync_period, Duration::ZERO);
    assert!(!args.masquerade_all);
    assert_eq!(args.hostname_override.as_deref(), Some("flag-node"));
    assert_eq!(args.kubeconfig.as_deref(), Some(Path::new("/flag/kc")));
    // Not given on the command line: from the file.
    assert_eq!(args.iptables_sync_period, Duration::from_secs(45));
}

/// kube-proxy falls back to lenient decoding on unknown fields and runs.
#[test]
fn unknown_fields_are_named_in_one_warning_and_ignored() {
    let (args, applied) = run_with(
        &[],
        &format!(
            "{}\nbogusField: 1\nfuture:\n  a: 1\n",
            FULL.replace("  masqueradeAll: true", "  masqueradeAll: true\n  nope: 2")
        ),
    )
    .unwrap();
    let unknown: Vec<_> = applied
        .warnings
        .iter()
        .filter(|w| w.contains("bogusField"))
        .collect();
    assert_eq!(unknown.len(), 1, "{:?}", applied.warnings);
    for field in ["iptables.nope", "future.a", "ignored", "newer kube-proxy"] {
        assert!(unknown[0].contains(field), "{field}: {}", unknown[0]);
    }
    // The rest of the file applies.
    assert!(args.masquerade_all);
    assert_eq!(args.iptables_sync_period, Duration::from_secs(45));
}

/// Go's lenient YAML decoding keeps the last of a repeated key.
#[test]
fn a_repeated_key_warns_and_the_last_value_wins() {
    let (args, applied) = run_with(
        &[],
        &format!(
            "{HEAD}mode: ebpf\nmode: iptables\niptables:\n  syncPeriod: 10s\n  syncPeriod: 20s\n\
             conntrack:\n  min: 5\nconntrack:\n  maxPerCore: 7\n"
        ),
    )
    .unwrap();
    assert_eq!(args.mode.mode(), ProxyMode::Iptables);
    assert_eq!(args.iptables_sync_period, Duration::from_secs(20));
    // The whole second `conntrack` replaces the first, as in Go.
    assert_eq!(args.conntrack_max_per_core, 7);
    assert_eq!(args.conntrack_min, 131072);
    assert_eq!(applied.warnings.len(), 1, "{:?}", applied.warnings);
    let w = &applied.warnings[0];
    for key in ["mode", "iptables.syncPeriod", "conntrack", "last value"] {
        assert!(w.contains(key), "{key}: {w}");
    }
}

#[test]
fn a_byte_order_mark_is_skipped() {
    let (args, applied) = run_with(&[], &format!("\u{feff}{HEAD}mode: ipvs\n")).unwrap();
    assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
    assert_eq!(args.mode.mode(), ProxyMode::Iptables);
}

#[test]
fn bad_values_and_types_are_errors_naming_them() {
    let err = run_with(&[], &format!("{HEAD}mode:\n  a: 1\n")).unwrap_err();
    assert!(err.contains("mode") && err.contains("mapping"), "{err}");
    let err = run_with(&[], &format!("{HEAD}iptables: 5\n")).unwrap_err();
    assert!(err.contains("iptables") && err.contains("mapping"), "{err}");
    let err = run_with(&[], &format!("{HEAD}mode: [a]\nmode: [b]\n")).unwrap_err();
    assert!(err.contains("mode"), "{err}");
    let err = run_with(&[], "apiVersion: v1\nkind: KubeProxyConfiguration\n").unwrap_err();
    assert!(err.contains("apiVersion"), "{err}");
    let err = run_with(&[], &format!("{HEAD}iptables:\n  syncPeriod: 30\n")).unwrap_err();
    assert!(err.contains("iptables.syncPeriod"), "{err}");
    let err = run_with(&[], &format!("{HEAD}clusterCIDR: 10.0.0.0/33\n")).unwrap_err();
    assert!(err.contains("clusterCIDR"), "{err}");
    let err = run_with(&[], &format!("{HEAD}mode: userspace\n")).unwrap_err();
    assert!(err.contains("mode"), "{err}");
    let err = run_with(&[], &format!("{HEAD}oomScoreAdj: -2000\n")).unwrap_err();
    assert!(err.contains("oomScoreAdj"), "{err}");
    let err = run_with(&[], &format!("{HEAD}detectLocalMode: Pods\n")).unwrap_err();
    assert!(err.contains("detectLocalMode"), "{err}");
}

#[test]
fn zero_and_empty_values_mean_kube_proxys_defaults() {
    let (args, applied) = run_with(
        &[],
        &format!(
            "{HEAD}mode: \"\"\nclusterCIDR: \"\"\nhostnameOverride: \"\"\nnodePortAddresses: null\n\
             healthzBindAddress: \"\"\nmetricsBindAddress: \"\"\noomScoreAdj: null\n\
             iptables:\n  syncPeriod: 0s\n  minSyncPeriod: 0s\n  masqueradeBit: null\n  localhostNodePorts: null\n\
             conntrack:\n  maxPerCore: null\n  min: null\n  tcpEstablishedTimeout: null\n  tcpCloseWaitTimeout: null\n"
        ),
    )
    .unwrap();
    assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
    assert!(args.cluster_cidrs().is_empty());
    assert!(args.hostname_override.is_none());
    assert_eq!(args.iptables_sync_period, Duration::from_secs(30));
    assert_eq!(args.iptables_min_sync_period, Duration::from_secs(1));
    assert_eq!(args.healthz_addr(), Some("0.0.0.0:10256".parse().unwrap()));
    assert_eq!(
        args.metrics_addr(),
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert_eq!(args.oom_score_adj, -999);
    assert_eq!(args.iptables_masquerade_bit, 14);
    assert!(args.iptables_localhost_nodeports);
    assert_eq!(args.conntrack_max_per_core, 32768);
    assert_eq!(args.conntrack_min, 131072);
    assert_eq!(
        args.conntrack_tcp_timeout_established,
        Duration::from_secs(86400)
    );
    assert_eq!(
        args.conntrack_tcp_timeout_close_wait,
        Duration::from_secs(3600)
    );
}

#[test]
fn conntrack_zero_leaves_the_kernel_value() {
    let (args, _) = run_with(
        &[],
        &format!(
            "{HEAD}conntrack:\n  maxPerCore: 0\n  tcpEstablishedTimeout: 0s\n  tcpCloseWaitTimeout: 0s\n  udpTimeout: 0s\n"
        ),
    )
    .unwrap();
    assert_eq!(args.conntrack_max_per_core, 0);
    assert_eq!(args.conntrack_tcp_timeout_established, Duration::ZERO);
    assert_eq!(args.conntrack_tcp_timeout_close_wait, Duration::ZERO);
}

#[test]
fn logging_verbosity_and_feature_gates() {
    let (args, applied) = run_with(
        &[],
        &format!("{HEAD}logging:\n  verbosity: 4\nfeatureGates:\n  TopologyAwareHints: true\n"),
    )
    .unwrap();
    assert_eq!(applied.verbosity, Some(4));
    assert_eq!(
        args.feature_gate_map().get("TopologyAwareHints"),
        Some(&true)
    );
}

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/installers")
        .join(name)
        .join("config.conf");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn kubeadms_config_applies_cleanly() {
    let (args, applied) = run_with(&["--hostname-override=node1"], &fixture("kubeadm")).unwrap();
    assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
    assert_eq!(args.cluster_cidrs(), vec!["10.244.0.0/16".parse().unwrap()]);
    assert_eq!(args.healthz_addr(), Some("0.0.0.0:10256".parse().unwrap()));
    assert_eq!(
        args.metrics_addr(),
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert_eq!(args.iptables_min_sync_period, Duration::from_secs(1));
    assert_eq!(args.conntrack_max_per_core, 32768);
    assert_eq!(args.hostname_override.as_deref(), Some("node1"));
}

#[test]
fn kinds_config_skips_nf_conntrack_max() {
    let (args, applied) = run_with(&[], &fixture("kind")).unwrap();
    assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
    assert_eq!(args.conntrack_max_per_core, 0);
    assert_eq!(args.iptables_min_sync_period, Duration::from_secs(1));
}

#[test]
fn ekss_config_names_the_removed_field() {
    let (args, applied) = run_with(&[], &fixture("eks")).unwrap();
    assert_eq!(applied.warnings.len(), 1, "{:?}", applied.warnings);
    assert!(applied.warnings[0].contains("udpIdleTimeout"));
    assert_eq!(args.metrics_addr(), Some("0.0.0.0:10249".parse().unwrap()));
    assert_eq!(args.oom_score_adj, -998);
}

/// `--write-config-to` writes what `--config` reads back to the same settings.
#[test]
fn written_config_reads_back() {
    let (args, _) = run_with(
        &[
            "--proxy-mode=ebpf",
            "--cluster-cidr=10.1.0.0/16",
            "--nodeport-addresses=primary,10.0.0.0/8",
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=veth",
            "--conntrack-max-per-core=0",
            "--iptables-masquerade-bit=5",
            "--metrics-bind-address=0.0.0.0:9100",
            "--feature-gates=A=true",
        ],
        HEAD,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.yaml");
    write_effective(&path, &args).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let (back, applied) = run_with(&[], &text).unwrap();
    assert!(
        applied.warnings.is_empty(),
        "{:?}\n{text}",
        applied.warnings
    );
    assert_eq!(back.mode.mode(), ProxyMode::Ebpf);
    assert_eq!(back.cluster_cidrs(), args.cluster_cidrs());
    assert_eq!(back.nodeport_address_list(), args.nodeport_address_list());
    assert_eq!(back.pod_interface_name_prefix, "veth");
    assert_eq!(back.conntrack_max_per_core, 0);
    assert_eq!(back.iptables_masquerade_bit, 5);
    assert_eq!(back.metrics_addr(), args.metrics_addr());
    assert_eq!(back.feature_gate_map(), args.feature_gate_map());
    assert_eq!(
        back.conntrack_tcp_timeout_established,
        args.conntrack_tcp_timeout_established
    );
}

/// kube-proxy's ipvs and nftables modes run iptables mode, with a warning.
#[test]
fn ipvs_and_nftables_run_iptables_mode_with_a_warning() {
    for mode in ["ipvs", "nftables"] {
        let cli = parse_from(
            ["kube-proxy", &format!("--proxy-mode={mode}")]
                .iter()
                .map(OsString::from)
                .collect(),
        )
        .unwrap();
        let Command::Run(mut args) = cli.command else {
            panic!()
        };
        let warnings = crate::cli::resolve_run(&mut args).unwrap();
        assert_eq!(args.mode.mode(), ProxyMode::Iptables);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(mode) && w.contains("iptables mode")),
            "{warnings:?}"
        );
    }
    let (args, _) = run_with(&[], &format!("{HEAD}mode: ipvs\n")).unwrap();
    assert_eq!(args.mode.mode(), ProxyMode::Iptables);
}
