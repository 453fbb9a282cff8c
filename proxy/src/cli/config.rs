//! kube-proxy's `--config` file (`KubeProxyConfiguration`,
//! `kubeproxy.config.k8s.io/v1alpha1`), with kube-proxy's defaulting: an
//! absent, null, zero or empty value means "kube-proxy's default", except
//! where kube-proxy gives zero a meaning (`conntrack.maxPerCore: 0` and the
//! conntrack timeouts at `0s` leave the kernel's value as it is).
//!
//! Every field of v1alpha1 is accepted. Fields kproxy honours set the
//! matching `kproxy run` setting, unless that flag was given on the command
//! line (flags win, see docs/kube-proxy-comparison.md). Fields kproxy cannot
//! honour are named in one warning when they differ from kube-proxy's
//! default; fields removed from kube-proxy (still in older ConfigMaps, such
//! as `udpIdleTimeout`) are named in a warning too.
//!
//! kube-proxy decodes the file strictly and, when that fails on an unknown
//! field or a key given twice, decodes it again leniently and runs (its
//! `loadConfig` logs "Using lenient decoding as strict decoding failed").
//! kproxy does the same: a field kube-proxy never had is named in a warning
//! and ignored, and a repeated key is named in a warning with its last value
//! used. What lenient decoding refuses (apiVersion, kind, types, values)
//! stays an error naming the field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_yaml::Value;

use super::values::*;
use super::{parse_duration, RunArgs};

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

/// What applying a file produced besides the settings.
#[derive(Debug, Default)]
pub struct Applied {
    /// One line per kind of problem (fields without effect, removed fields).
    pub warnings: Vec<String>,
    /// `logging.verbosity`, when set.
    pub verbosity: Option<u8>,
}

/// Reads `path` and applies it to `args` (flags in `args.given` win).
pub fn apply_file(path: &Path, args: &mut RunArgs) -> Result<Applied, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    apply_str(&text, args).map_err(|message| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    })
}

/// Fields removed from kube-proxy's configuration that older ConfigMaps
/// still carry (EKS's has `udpIdleTimeout`).
const REMOVED: &[&str] = &["udpIdleTimeout", "resourceContainer", "conntrack.max"];

/// Leaves of a YAML document as (dotted path, value). Sequences, scalars and
/// empty mappings are leaves.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Mapping(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = lenient::key_name(k);
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

fn string(path: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        other => Err(format!("{path}: expected a string, got {}", show(other))),
    }
}

fn boolean(path: &str, v: &Value) -> Result<Option<bool>, String> {
    match v {
        Value::Bool(b) => Ok(Some(*b)),
        Value::Null => Ok(None),
        other => Err(format!(
            "{path}: expected true or false, got {}",
            show(other)
        )),
    }
}

fn integer(path: &str, v: &Value) -> Result<Option<i64>, String> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("{path}: expected an integer, got {n}")),
        Value::Null => Ok(None),
        other => Err(format!("{path}: expected an integer, got {}", show(other))),
    }
}

fn number(path: &str, v: &Value) -> Result<Option<f64>, String> {
    match v {
        Value::Number(n) => Ok(n.as_f64()),
        Value::Null => Ok(None),
        other => Err(format!("{path}: expected a number, got {}", show(other))),
    }
}

/// A `metav1.Duration` (a Go duration string); null or "" is `None`.
fn duration(path: &str, v: &Value) -> Result<Option<Duration>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => parse_duration(s)
            .map(Some)
            .map_err(|e| format!("{path}: {e}")),
        other => Err(format!(
            "{path}: expected a duration such as \"30s\", got {}",
            show(other)
        )),
    }
}

fn strings(path: &str, v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Sequence(items) => items.iter().map(|i| string(path, i)).collect(),
        other => Err(format!("{path}: expected a list, got {}", show(other))),
    }
}

fn show(v: &Value) -> String {
    serde_yaml::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{v:?}"))
}

/// Applies the YAML text (see [`apply_file`]).
pub fn apply_str(text: &str, args: &mut RunArgs) -> Result<Applied, String> {
    // Some Windows editors start a UTF-8 file with a byte order mark, which
    // the YAML parser would read as content before the document.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (doc, duplicates) = lenient::parse(text).map_err(|e| format!("not YAML: {e}"))?;
    let Value::Mapping(_) = &doc else {
        return Err(format!("expected a {KIND} object"));
    };
    let mut fields = Vec::new();
    flatten("", &doc, &mut fields);

    let mut file = FileSettings {
        duplicates,
        ..FileSettings::default()
    };
    for (path, value) in &fields {
        match file.read(path, value) {
            Ok(()) => {}
            Err(FieldError::Unknown) => {
                if let Some(msg) = not_a_mapping(path) {
                    return Err(msg);
                }
                file.unknown.push(path.clone());
            }
            Err(FieldError::Invalid(msg)) => return Err(msg),
        }
    }
    if file.api_version.as_deref() != Some(API_VERSION) {
        return Err(format!(
            "apiVersion {:?} is not supported; expected {API_VERSION}",
            file.api_version.unwrap_or_default()
        ));
    }
    if file.kind.as_deref() != Some(KIND) {
        return Err(format!(
            "kind {:?}: expected {KIND}",
            file.kind.unwrap_or_default()
        ));
    }
    file.apply(args)
}

/// When `path` is unknown because a known field that holds a value was
/// given a mapping (`mode: {a: 1}` reads as `mode.a`): a type error, which
/// kube-proxy's lenient decoding refuses too.
fn not_a_mapping(path: &str) -> Option<String> {
    let mut probe = FileSettings::default();
    path.match_indices('.')
        .map(|(i, _)| &path[..i])
        .filter(|prefix| !SECTIONS.contains(prefix))
        .find(|prefix| !matches!(probe.read(prefix, &Value::Null), Err(FieldError::Unknown)))
        .map(|field| format!("{field}: expected a single value, got a mapping"))
}

/// kube-proxy's sections (objects in KubeProxyConfiguration).
const SECTIONS: &[&str] = &[
    "clientConnection",
    "logging",
    "logging.options",
    "iptables",
    "ipvs",
    "nftables",
    "winkernel",
    "conntrack",
    "detectLocal",
];

enum FieldError {
    Unknown,
    Invalid(String),
}

impl From<String> for FieldError {
    fn from(s: String) -> Self {
        FieldError::Invalid(s)
    }
}

/// What the file says, before it is merged with the command line. `None`
/// means "absent or kube-proxy's default".
#[derive(Debug, Default)]
struct FileSettings {
    api_version: Option<String>,
    kind: Option<String>,
    mode: Option<ProxyModeArg>,
    cluster_cidr: Option<Vec<Option<ipnet::IpNet>>>,
    hostname_override: Option<String>,
    bind_address: Option<std::net::IpAddr>,
    healthz_bind_address: Option<BindSpec>,
    metrics_bind_address: Option<BindSpec>,
    bind_address_hard_fail: Option<bool>,
    kubeconfig: Option<PathBuf>,
    verbosity: Option<u8>,
    masquerade_bit: Option<u8>,
    masquerade_all: Option<bool>,
    localhost_nodeports: Option<bool>,
    sync_period: Option<Duration>,
    min_sync_period: Option<Duration>,
    detect_local_mode: Option<DetectLocalModeName>,
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
    nodeport_addresses: Option<Vec<NodePortAddress>>,
    oom_score_adj: Option<i32>,
    ct_max_per_core: Option<u32>,
    ct_min: Option<u32>,
    ct_tcp_established: Option<Duration>,
    ct_tcp_close_wait: Option<Duration>,
    ct_tcp_be_liberal: Option<bool>,
    ct_udp_timeout: Option<Duration>,
    ct_udp_stream_timeout: Option<Duration>,
    feature_gates: std::collections::BTreeMap<String, bool>,
    /// Fields set away from kube-proxy's default that kproxy does not honour.
    no_effect: Vec<String>,
    removed: Vec<String>,
    /// Fields kube-proxy does not have (ignored, as its lenient decoding does).
    unknown: Vec<String>,
    /// Keys given more than once (the last value is used).
    duplicates: Vec<String>,
}

impl FileSettings {
    fn no_effect_if(&mut self, cond: bool, path: &str, value: &Value) {
        if cond {
            self.no_effect
                .push(format!("{path}: {}", show(value).replace('\n', " ")));
        }
    }

    fn read(&mut self, path: &str, v: &Value) -> Result<(), FieldError> {
        let p = path;
        if let Some(gate) = p.strip_prefix("featureGates.") {
            let on = boolean(p, v)?.unwrap_or(false);
            self.feature_gates.insert(gate.to_string(), on);
            return Ok(());
        }
        if p.starts_with("logging.options.") {
            // Output routing and buffering of Go's log backends: no meaning here.
            return Ok(());
        }
        if p.starts_with("winkernel.") {
            let default = matches!(v, Value::Null | Value::Bool(false))
                || v.as_str().is_some_and(str::is_empty);
            self.no_effect_if(!default, p, v);
            return Ok(());
        }
        if REMOVED.contains(&p) {
            self.removed.push(p.to_string());
            return Ok(());
        }
        match p {
            "apiVersion" => self.api_version = Some(string(p, v)?),
            "kind" => self.kind = Some(string(p, v)?),
            "featureGates" => match v {
                // `{}`, null; the string form is from long-gone releases.
                Value::Mapping(_) | Value::Null => {}
                _ => self.removed.push("featureGates (as a string)".into()),
            },
            "mode" => {
                self.mode = Some(parse_proxy_mode(&string(p, v)?).map_err(|e| format!("{p}: {e}"))?)
            }
            "clusterCIDR" => {
                let s = string(p, v)?;
                let cidrs = s
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| {
                        c.parse()
                            .map(Some)
                            .map_err(|e| format!("clusterCIDR {c:?}: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.cluster_cidr = Some(cidrs);
            }
            "hostnameOverride" => {
                let s = string(p, v)?;
                self.hostname_override = (!s.trim().is_empty()).then(|| s.trim().to_lowercase());
            }
            "bindAddress" => {
                let s = string(p, v)?;
                if !s.is_empty() {
                    self.bind_address = Some(
                        s.parse()
                            .map_err(|_| format!("{p}: {s:?} is not an IP address"))?,
                    );
                }
            }
            "healthzBindAddress" | "metricsBindAddress" => {
                let s = string(p, v)?;
                if !s.is_empty() {
                    let spec = parse_bind_spec(&s).map_err(|e| format!("{p}: {e}"))?;
                    if p == "healthzBindAddress" {
                        self.healthz_bind_address = Some(spec);
                    } else {
                        self.metrics_bind_address = Some(spec);
                    }
                }
            }
            "bindAddressHardFail" => self.bind_address_hard_fail = boolean(p, v)?,
            "enableProfiling" => {
                let on = boolean(p, v)?.unwrap_or(false);
                self.no_effect_if(on, p, v);
            }
            "showHiddenMetricsForVersion" | "portRange" => {
                let s = string(p, v)?;
                self.no_effect_if(!s.is_empty(), p, v);
            }
            "windowsRunAsService" => {
                let on = boolean(p, v)?.unwrap_or(false);
                self.no_effect_if(on, p, v);
            }
            "configSyncPeriod" => {
                let d = duration(p, v)?;
                self.no_effect_if(
                    d.is_some_and(|d| !d.is_zero() && d != Duration::from_secs(900)),
                    p,
                    v,
                );
            }
            "clientConnection.kubeconfig" => {
                let s = string(p, v)?;
                self.kubeconfig = (!s.is_empty()).then(|| PathBuf::from(s));
            }
            "clientConnection.acceptContentTypes" => {
                let s = string(p, v)?;
                self.no_effect_if(!s.is_empty(), p, v);
            }
            "clientConnection.contentType" => {
                let s = string(p, v)?;
                self.no_effect_if(
                    !s.is_empty() && s != "application/vnd.kubernetes.protobuf",
                    p,
                    v,
                );
            }
            "clientConnection.qps" => {
                let q = number(p, v)?.unwrap_or(0.0);
                self.no_effect_if(q != 0.0 && q != 5.0, p, v);
            }
            "clientConnection.burst" => {
                let b = integer(p, v)?.unwrap_or(0);
                self.no_effect_if(b != 0 && b != 10, p, v);
            }
            "logging.verbosity" => {
                if let Some(n) = integer(p, v)? {
                    self.verbosity = Some(n.clamp(0, 255) as u8);
                }
            }
            "logging.format" => {
                let s = string(p, v)?;
                self.no_effect_if(!s.is_empty() && s != "text", p, v);
            }
            "logging.vmodule" => {
                let empty = matches!(v, Value::Null)
                    || v.as_sequence().is_some_and(|s| s.is_empty())
                    || v.as_str().is_some_and(str::is_empty);
                self.no_effect_if(!empty, p, v);
            }
            "logging.flushFrequency" => {}
            "iptables.masqueradeBit" => {
                if let Some(b) = integer(p, v)? {
                    self.masquerade_bit = Some(
                        parse_masquerade_bit(&b.to_string()).map_err(|e| format!("{p}: {e}"))?,
                    );
                }
            }
            "iptables.masqueradeAll" => self.masquerade_all = boolean(p, v)?,
            "iptables.localhostNodePorts" => self.localhost_nodeports = boolean(p, v)?,
            "iptables.snatNodeInternalIP" => {
                let on = boolean(p, v)?.unwrap_or(false);
                self.no_effect_if(on, p, v);
            }
            "iptables.syncPeriod" => self.sync_period = duration(p, v)?.filter(|d| !d.is_zero()),
            "iptables.minSyncPeriod" => {
                self.min_sync_period = duration(p, v)?.filter(|d| !d.is_zero())
            }
            "ipvs.syncPeriod" => {
                let d = duration(p, v)?;
                self.no_effect_if(
                    d.is_some_and(|d| !d.is_zero() && d != Duration::from_secs(30)),
                    p,
                    v,
                );
            }
            "ipvs.minSyncPeriod" | "ipvs.tcpTimeout" | "ipvs.tcpFinTimeout" | "ipvs.udpTimeout" => {
                let d = duration(p, v)?;
                self.no_effect_if(d.is_some_and(|d| !d.is_zero()), p, v);
            }
            "ipvs.scheduler" => {
                let s = string(p, v)?;
                self.no_effect_if(!s.is_empty(), p, v);
            }
            "ipvs.excludeCIDRs" => {
                let l = strings(p, v)?;
                self.no_effect_if(!l.is_empty(), p, v);
            }
            "ipvs.strictARP" => {
                let on = boolean(p, v)?.unwrap_or(false);
                self.no_effect_if(on, p, v);
            }
            "nftables.masqueradeBit" => {
                let b = integer(p, v)?;
                self.no_effect_if(b.is_some_and(|b| b != 14), p, v);
            }
            "nftables.masqueradeAll" => {
                let on = boolean(p, v)?.unwrap_or(false);
                self.no_effect_if(on, p, v);
            }
            "nftables.syncPeriod" | "nftables.minSyncPeriod" => {
                let d = duration(p, v)?;
                let default = if p.ends_with("minSyncPeriod") { 1 } else { 30 };
                self.no_effect_if(
                    d.is_some_and(|d| !d.is_zero() && d != Duration::from_secs(default)),
                    p,
                    v,
                );
            }
            "detectLocalMode" => {
                self.detect_local_mode =
                    Some(parse_detect_local_mode(&string(p, v)?).map_err(|e| format!("{p}: {e}"))?)
            }
            "detectLocal.bridgeInterface" => self.bridge_interface = Some(string(p, v)?),
            "detectLocal.interfaceNamePrefix" => self.interface_name_prefix = Some(string(p, v)?),
            "nodePortAddresses" => {
                let mut all = Vec::new();
                for item in strings(p, v)? {
                    all.extend(
                        NodePortAddress::parse_list(&item).map_err(|e| format!("{p}: {e}"))?,
                    );
                }
                self.nodeport_addresses = Some(all);
            }
            "oomScoreAdj" => {
                if let Some(n) = integer(p, v)? {
                    self.oom_score_adj =
                        Some(parse_oom_score_adj(&n.to_string()).map_err(|e| format!("{p}: {e}"))?);
                }
            }
            "conntrack.maxPerCore" | "conntrack.min" => {
                if let Some(n) = integer(p, v)? {
                    let n = parse_non_negative(&n.to_string()).map_err(|e| format!("{p}: {e}"))?;
                    if p == "conntrack.min" {
                        self.ct_min = Some(n);
                    } else {
                        self.ct_max_per_core = Some(n);
                    }
                }
            }
            // Pointers in v1alpha1: null is the default, "0s" leaves the kernel's value.
            "conntrack.tcpEstablishedTimeout" => self.ct_tcp_established = null_or_duration(p, v)?,
            "conntrack.tcpCloseWaitTimeout" => self.ct_tcp_close_wait = null_or_duration(p, v)?,
            "conntrack.tcpBeLiberal" => self.ct_tcp_be_liberal = boolean(p, v)?,
            "conntrack.udpTimeout" => self.ct_udp_timeout = duration(p, v)?,
            "conntrack.udpStreamTimeout" => self.ct_udp_stream_timeout = duration(p, v)?,
            // A section given as null or `{}` (an empty mapping is a leaf):
            // kube-proxy's defaults; anything else is the wrong type.
            _ if SECTIONS.contains(&p) => match v {
                Value::Null => {}
                Value::Mapping(m) if m.is_empty() => {}
                other => {
                    return Err(FieldError::Invalid(format!(
                        "{p}: expected a mapping, got {}",
                        show(other)
                    )))
                }
            },
            _ => return Err(FieldError::Unknown),
        }
        Ok(())
    }

    /// Merges into `args`: a setting the command line gave is kept.
    fn apply(self, args: &mut RunArgs) -> Result<Applied, String> {
        macro_rules! take {
            ($value:expr, $id:literal, $field:ident) => {
                if let Some(v) = $value {
                    if !args.given($id) {
                        args.$field = v;
                        args.from_config.insert($id.to_string());
                    }
                }
            };
        }
        if let Some(m) = self.mode {
            if !args.given("proxy_mode") {
                args.mode.proxy_mode = m;
                args.from_config.insert("proxy_mode".into());
            }
        }
        take!(self.cluster_cidr, "cluster_cidr", cluster_cidr);
        take!(
            self.hostname_override.map(Some),
            "hostname_override",
            hostname_override
        );
        take!(self.bind_address.map(Some), "bind_address", bind_address);
        take!(
            self.healthz_bind_address,
            "healthz_bind_address",
            healthz_bind_address
        );
        take!(
            self.metrics_bind_address,
            "metrics_bind_address",
            metrics_bind_address
        );
        take!(
            self.bind_address_hard_fail,
            "bind_address_hard_fail",
            bind_address_hard_fail
        );
        take!(self.kubeconfig.map(Some), "kubeconfig", kubeconfig);
        take!(
            self.masquerade_bit,
            "iptables_masquerade_bit",
            iptables_masquerade_bit
        );
        take!(self.masquerade_all, "masquerade_all", masquerade_all);
        take!(
            self.localhost_nodeports,
            "iptables_localhost_nodeports",
            iptables_localhost_nodeports
        );
        take!(
            self.sync_period,
            "iptables_sync_period",
            iptables_sync_period
        );
        take!(
            self.min_sync_period,
            "iptables_min_sync_period",
            iptables_min_sync_period
        );
        take!(
            self.detect_local_mode,
            "detect_local_mode",
            detect_local_mode
        );
        take!(
            self.bridge_interface,
            "pod_bridge_interface",
            pod_bridge_interface
        );
        take!(
            self.interface_name_prefix,
            "pod_interface_name_prefix",
            pod_interface_name_prefix
        );
        take!(
            self.nodeport_addresses.map(|v| vec![v]),
            "nodeport_addresses",
            nodeport_addresses
        );
        take!(self.oom_score_adj, "oom_score_adj", oom_score_adj);
        take!(
            self.ct_max_per_core,
            "conntrack_max_per_core",
            conntrack_max_per_core
        );
        take!(self.ct_min, "conntrack_min", conntrack_min);
        take!(
            self.ct_tcp_established,
            "conntrack_tcp_timeout_established",
            conntrack_tcp_timeout_established
        );
        take!(
            self.ct_tcp_close_wait,
            "conntrack_tcp_timeout_close_wait",
            conntrack_tcp_timeout_close_wait
        );
        take!(
            self.ct_tcp_be_liberal,
            "conntrack_tcp_be_liberal",
            conntrack_tcp_be_liberal
        );
        take!(
            self.ct_udp_timeout,
            "conntrack_udp_timeout",
            conntrack_udp_timeout
        );
        take!(
            self.ct_udp_stream_timeout,
            "conntrack_udp_timeout_stream",
            conntrack_udp_timeout_stream
        );
        if !self.feature_gates.is_empty() && !args.given("feature_gates") {
            args.feature_gates = vec![self.feature_gates];
        }

        let mut applied = Applied {
            verbosity: self.verbosity,
            ..Applied::default()
        };
        if !self.no_effect.is_empty() {
            applied.warnings.push(format!(
                "--config fields kproxy does not implement, ignored: {}",
                self.no_effect.join(", ")
            ));
        }
        if !self.removed.is_empty() {
            applied.warnings.push(format!(
                "--config fields removed from kube-proxy's configuration, ignored: {}",
                self.removed.join(", ")
            ));
        }
        if !self.unknown.is_empty() {
            applied.warnings.push(format!(
                "--config fields not in {KIND} {API_VERSION}, ignored (a typo, or a field of a newer kube-proxy; kube-proxy's lenient decoding ignores them too): {}",
                self.unknown.join(", ")
            ));
        }
        if !self.duplicates.is_empty() {
            applied.warnings.push(format!(
                "--config keys given more than once, the last value used (as kube-proxy's lenient decoding does): {}",
                self.duplicates.join(", ")
            ));
        }
        Ok(applied)
    }
}

/// Writes the effective settings of `args` as a `KubeProxyConfiguration`
/// (`--write-config-to`), in the form `--config` reads back.
pub fn write_effective(path: &Path, args: &RunArgs) -> anyhow::Result<()> {
    use serde_json::json;
    let secs = |d: Duration| format!("{}s", d.as_secs_f64());
    let bind = |b: BindSpec, port: Option<u16>, default: u16| {
        b.resolve(port, default)
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    let nodeports: Vec<String> = args
        .nodeport_address_list()
        .iter()
        .map(|a| match a {
            NodePortAddress::Cidr(c) => c.to_string(),
            NodePortAddress::Primary => "primary".into(),
        })
        .collect();
    let (bridge, prefix, mode_name) = match args.detect_local_mode {
        DetectLocalModeName::ClusterCidr => ("", "", "ClusterCIDR"),
        DetectLocalModeName::NodeCidr => ("", "", "NodeCIDR"),
        DetectLocalModeName::BridgeInterface => {
            (args.pod_bridge_interface.as_str(), "", "BridgeInterface")
        }
        DetectLocalModeName::InterfaceNamePrefix => (
            "",
            args.pod_interface_name_prefix.as_str(),
            "InterfaceNamePrefix",
        ),
    };
    let doc = json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "bindAddress": args.bind_address.map(|i| i.to_string()).unwrap_or_else(|| "0.0.0.0".into()),
        "bindAddressHardFail": args.bind_address_hard_fail,
        "clientConnection": {
            "kubeconfig": args.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        },
        "clusterCIDR": args.cluster_cidrs().iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "conntrack": {
            "maxPerCore": args.conntrack_max_per_core,
            "min": args.conntrack_min,
            "tcpEstablishedTimeout": secs(args.conntrack_tcp_timeout_established),
            "tcpCloseWaitTimeout": secs(args.conntrack_tcp_timeout_close_wait),
            "tcpBeLiberal": args.conntrack_tcp_be_liberal,
            "udpTimeout": secs(args.conntrack_udp_timeout),
            "udpStreamTimeout": secs(args.conntrack_udp_timeout_stream),
        },
        "detectLocalMode": mode_name,
        "detectLocal": {"bridgeInterface": bridge, "interfaceNamePrefix": prefix},
        "featureGates": args.feature_gate_map(),
        "healthzBindAddress": bind(args.healthz_bind_address, args.healthz_port, 10256),
        "hostnameOverride": args.hostname_override.clone().unwrap_or_default(),
        "iptables": {
            "localhostNodePorts": args.iptables_localhost_nodeports,
            "masqueradeAll": args.masquerade_all,
            "masqueradeBit": args.iptables_masquerade_bit,
            "minSyncPeriod": secs(args.iptables_min_sync_period),
            "syncPeriod": secs(args.iptables_sync_period),
        },
        "metricsBindAddress": bind(args.metrics_bind_address, args.metrics_port, 10249),
        "mode": args.mode.proxy_mode.to_string(),
        "nodePortAddresses": nodeports,
        "oomScoreAdj": args.oom_score_adj,
    });
    let text = serde_yaml::to_string(&doc)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A duration where null means "absent" but `0s` is a value.
fn null_or_duration(path: &str, v: &Value) -> Result<Option<Duration>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        _ => duration(path, v),
    }
}

mod lenient;

#[cfg(test)]
mod tests;
