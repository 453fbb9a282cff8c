//! kube-proxy's `--config` file (`KubeProxyConfiguration`,
//! `kubeproxy.config.k8s.io/v1alpha1`). Supported fields set the matching
//! `kproxy run` flag unless that flag was given on the command line (flags
//! override the file, as in kube-proxy). Fields kube-proxy knows but kproxy
//! does not implement are named in a warning; fields kube-proxy does not
//! know are an error, as kube-proxy's strict decoding makes them.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::{parse_duration, parse_healthz_addr, parse_metrics_addr, RunArgs};
use crate::dataplane::ProxyMode;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read --config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Fields kube-proxy has and kproxy ignores (prefix match on the dotted path).
const UNSUPPORTED: &[&str] = &[
    "clientConnection.acceptContentTypes",
    "clientConnection.contentType",
    "clientConnection.qps",
    "clientConnection.burst",
    "configSyncPeriod",
    "conntrack",
    "detectLocal",
    "detectLocalMode",
    "enableProfiling",
    "featureGates",
    "iptables.localhostNodePorts",
    "iptables.masqueradeBit",
    "ipvs",
    "linux",
    "logging",
    "nftables",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "udpIdleTimeout",
    "winkernel",
    "windowsRunAsService",
];

/// Fields that exist but are no-ops in kproxy, with why.
const NO_OP: &[(&str, &str)] = &[(
    "bindAddress",
    "kproxy serves Services on every address; use nodePortAddresses to restrict NodePorts",
)];

/// What the file said, applied to `args`; `warnings` name ignored fields.
#[derive(Debug, Default)]
pub struct Applied {
    pub warnings: Vec<String>,
}

/// Reads `path` and applies it to `args`. `given(flag)` says whether the
/// flag (clap id, e.g. `cluster_cidr`) was on the command line.
pub fn apply_file(
    path: &Path,
    args: &mut RunArgs,
    given: &dyn Fn(&str) -> bool,
) -> Result<Applied, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    apply_str(&text, args, given).map_err(|message| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    })
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Mapping(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = k
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{k:?}"));
                let path = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, v, out);
            }
        }
        _ => out.push((prefix.to_string(), v.clone())),
    }
}

fn as_string(path: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        other => Err(format!("{path}: expected a string, got {other:?}")),
    }
}

/// Applies the YAML text (see [`apply_file`]).
pub fn apply_str(
    text: &str,
    args: &mut RunArgs,
    given: &dyn Fn(&str) -> bool,
) -> Result<Applied, String> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let Value::Mapping(_) = &doc else {
        return Err("expected a KubeProxyConfiguration object".into());
    };
    let mut fields = Vec::new();
    flatten("", &doc, &mut fields);

    let mut applied = Applied::default();
    let mut unknown = Vec::new();
    let mut ignored = Vec::new();
    for (path, value) in &fields {
        if path.is_empty() {
            continue;
        }
        let set = |flag: &str| !given(flag);
        match path.as_str() {
            "apiVersion" => {
                if value.as_str() != Some(API_VERSION) {
                    return Err(format!(
                        "apiVersion {value:?} is not supported; expected {API_VERSION}"
                    ));
                }
            }
            "kind" => {
                if value.as_str() != Some(KIND) {
                    return Err(format!("kind {value:?}: expected {KIND}"));
                }
            }
            "mode" => {
                let mode = as_string(path, value)?;
                let mode = match mode.as_str() {
                    "" | "iptables" => ProxyMode::Iptables,
                    "ebpf" => ProxyMode::Ebpf,
                    other => {
                        return Err(format!(
                            "mode {other:?} is not supported by kproxy (supported: iptables, ebpf)"
                        ))
                    }
                };
                if set("proxy_mode") {
                    args.mode.proxy_mode = mode;
                }
            }
            "clusterCIDR" => {
                let s = as_string(path, value)?;
                let cidrs = s
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| c.parse().map_err(|e| format!("clusterCIDR {c:?}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                if set("cluster_cidr") {
                    args.cluster_cidr = cidrs;
                }
            }
            "hostnameOverride" => {
                let s = as_string(path, value)?;
                if set("hostname_override") && !s.is_empty() {
                    args.hostname_override = Some(s);
                }
            }
            "healthzBindAddress" => {
                let s = as_string(path, value)?;
                if !s.is_empty() {
                    let addr = parse_healthz_addr(&s).map_err(|e| format!("{path}: {e}"))?;
                    if set("healthz_bind_address") {
                        args.healthz_bind_address = addr;
                    }
                }
            }
            "metricsBindAddress" => {
                let s = as_string(path, value)?;
                if !s.is_empty() {
                    let addr = parse_metrics_addr(&s).map_err(|e| format!("{path}: {e}"))?;
                    if set("metrics_bind_address") {
                        args.metrics_bind_address = addr;
                    }
                }
            }
            "nodePortAddresses" => {
                let list = match value {
                    Value::Sequence(s) => s.clone(),
                    Value::Null => Vec::new(),
                    other => return Err(format!("{path}: expected a list, got {other:?}")),
                };
                let mut nets = Vec::new();
                for item in &list {
                    let s = as_string(path, item)?;
                    if s == "primary" {
                        return Err(
                            "nodePortAddresses: \"primary\" is not supported by kproxy; list CIDRs"
                                .into(),
                        );
                    }
                    nets.push(
                        s.parse()
                            .map_err(|e| format!("nodePortAddresses {s:?}: {e}"))?,
                    );
                }
                if set("nodeport_addresses") {
                    args.nodeport_addresses = nets;
                }
            }
            "iptables.masqueradeAll" => {
                let b = value
                    .as_bool()
                    .ok_or_else(|| format!("{path}: expected true or false"))?;
                if set("masquerade_all") {
                    args.masquerade_all = b;
                }
            }
            "iptables.syncPeriod" | "iptables.minSyncPeriod" => {
                let s = as_string(path, value)?;
                if s.is_empty() {
                    continue;
                }
                let d = parse_duration(&s).map_err(|e| format!("{path}: {e}"))?;
                if path == "iptables.syncPeriod" {
                    if set("iptables_sync_period") {
                        args.iptables_sync_period = d;
                    }
                } else if set("iptables_min_sync_period") {
                    args.iptables_min_sync_period = d;
                }
            }
            "clientConnection.kubeconfig" => {
                let s = as_string(path, value)?;
                if set("kubeconfig") && !s.is_empty() {
                    args.kubeconfig = Some(PathBuf::from(s));
                }
            }
            p => {
                if let Some((_, why)) = NO_OP.iter().find(|(f, _)| *f == p) {
                    applied
                        .warnings
                        .push(format!("--config field {p} has no effect: {why}"));
                } else if UNSUPPORTED
                    .iter()
                    .any(|u| p == *u || p.starts_with(&format!("{u}.")))
                {
                    ignored.push(p.to_string());
                } else {
                    unknown.push(p.to_string());
                }
            }
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "unknown field(s) {} (not in {KIND} {API_VERSION})",
            unknown.join(", ")
        ));
    }
    if !ignored.is_empty() {
        applied.warnings.push(format!(
            "--config fields not supported by kproxy, ignored: {}",
            ignored.join(", ")
        ));
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::cli::{Cli, Command};

    /// Parses `kproxy run ARGS`, then applies `yaml` as the real CLI does.
    fn run_with(argv: &[&str], yaml: &str) -> Result<(RunArgs, Applied), String> {
        let mut full = vec!["kproxy", "run"];
        full.extend_from_slice(argv);
        let matches = Cli::command().try_get_matches_from(&full).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        let Command::Run(mut args) = cli.command else {
            panic!("run expected")
        };
        let sub = matches.subcommand_matches("run").unwrap().clone();
        let given = move |id: &str| super::super::given_on_command_line(&sub, id);
        let applied = apply_str(yaml, &mut args, &given)?;
        Ok((args, applied))
    }

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
  qps: 5
iptables:
  masqueradeAll: true
  syncPeriod: 45s
  minSyncPeriod: 2s
conntrack:
  maxPerCore: 32768
ipvs:
  scheduler: rr
"#;

    #[test]
    fn supported_fields_apply() {
        let (args, applied) = run_with(&[], FULL).unwrap();
        assert_eq!(args.mode.proxy_mode, ProxyMode::Iptables);
        assert_eq!(args.cluster_cidr.len(), 2);
        assert_eq!(args.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(args.healthz_bind_address, "0.0.0.0:10266".parse().unwrap());
        assert_eq!(
            args.metrics_bind_address,
            "127.0.0.1:10259".parse().unwrap()
        );
        assert_eq!(
            args.nodeport_addresses,
            vec!["192.168.0.0/24".parse().unwrap()]
        );
        assert!(args.masquerade_all);
        assert_eq!(args.iptables_sync_period, Duration::from_secs(45));
        assert_eq!(args.iptables_min_sync_period, Duration::from_secs(2));
        assert_eq!(
            args.kubeconfig.as_deref(),
            Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        let w = applied.warnings.join("\n");
        for field in [
            "clientConnection.qps",
            "conntrack.maxPerCore",
            "ipvs.scheduler",
            "bindAddress",
        ] {
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
        assert_eq!(args.cluster_cidr, vec!["10.1.0.0/16".parse().unwrap()]);
        assert_eq!(args.iptables_min_sync_period, Duration::ZERO);
        assert!(!args.masquerade_all);
        assert_eq!(args.hostname_override.as_deref(), Some("flag-node"));
        assert_eq!(args.kubeconfig.as_deref(), Some(Path::new("/flag/kc")));
        // Not given on the command line: from the file.
        assert_eq!(args.iptables_sync_period, Duration::from_secs(45));
    }

    #[test]
    fn unknown_and_unsupported_values_are_errors_naming_them() {
        let err = run_with(
            &[],
            &format!(
                "{}\nbogusField: 1\n",
                FULL.replace("  masqueradeAll: true", "  masqueradeAll: true\n  nope: 2")
            ),
        )
        .unwrap_err();
        assert!(
            err.contains("bogusField") && err.contains("iptables.nope"),
            "{err}"
        );
        let err = run_with(&[], "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\n").unwrap_err();
        assert!(err.contains("ipvs"), "{err}");
        let err = run_with(&[], "apiVersion: v1\nkind: KubeProxyConfiguration\n").unwrap_err();
        assert!(err.contains("apiVersion"), "{err}");
        let err = run_with(
            &[],
            "kind: KubeProxyConfiguration\niptables:\n  syncPeriod: 30\n",
        )
        .unwrap_err();
        assert!(err.contains("iptables.syncPeriod"), "{err}");
        let err = run_with(
            &[],
            "kind: KubeProxyConfiguration\nclusterCIDR: 10.0.0.0/33\n",
        )
        .unwrap_err();
        assert!(err.contains("clusterCIDR"), "{err}");
    }

    #[test]
    fn empty_values_keep_defaults() {
        let (args, applied) = run_with(
            &[],
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: \"\"\nclusterCIDR: \"\"\nhostnameOverride: \"\"\nnodePortAddresses: null\n",
        )
        .unwrap();
        assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
        assert!(args.cluster_cidr.is_empty());
        assert!(args.hostname_override.is_none());
        assert_eq!(args.iptables_sync_period, Duration::from_secs(30));
    }
}
