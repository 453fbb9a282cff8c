//! kube-proxy flags that kproxy accepts but cannot honour, and why. They are
//! named in one warning at start, so a DaemonSet written for kube-proxy runs
//! unchanged and its owner learns what has no effect.

use super::RunArgs;

/// (clap id, why it has no effect).
const NO_EFFECT: &[(&str, &str)] = &[
    ("ipvs_sync_period", IPVS),
    ("ipvs_min_sync_period", IPVS),
    ("ipvs_scheduler", IPVS),
    ("ipvs_exclude_cidrs", IPVS),
    ("ipvs_strict_arp", IPVS),
    ("ipvs_tcp_timeout", IPVS),
    ("ipvs_tcpfin_timeout", IPVS),
    ("ipvs_udp_timeout", IPVS),
    ("profiling", "kproxy serves no /debug/pprof"),
    ("show_hidden_metrics_for_version", "kproxy hides no metrics"),
    ("kube_api_content_type", CLIENT),
    ("kube_api_burst", CLIENT),
    ("kube_api_qps", CLIENT),
    (
        "config_sync_period",
        "watches are not re-listed periodically; --iptables-sync-period repairs the dataplane",
    ),
    (
        "vmodule",
        "per-file verbosity does not exist in kproxy; use RUST_LOG",
    ),
    ("log_flush_frequency", LOGS),
    ("logging_format", LOGS),
    ("log_json_split_stream", LOGS),
    ("log_json_info_buffer_size", LOGS),
    ("log_text_split_stream", LOGS),
    ("log_text_info_buffer_size", LOGS),
    ("logtostderr", KLOG),
    ("alsologtostderr", KLOG),
    ("log_dir", KLOG),
    ("log_file", KLOG),
    ("log_file_max_size", KLOG),
    ("log_backtrace_at", KLOG),
    ("skip_headers", KLOG),
    ("skip_log_headers", KLOG),
    ("stderrthreshold", KLOG),
    ("one_output", KLOG),
    ("add_dir_header", KLOG),
    ("resource_container", REMOVED),
    ("udp_timeout", REMOVED),
    ("proxy_port_range", REMOVED),
];

const IPVS: &str = "ipvs mode is not implemented (kproxy runs iptables or ebpf mode)";
const CLIENT: &str = "kproxy's API client only watches (JSON, no client-side rate limit)";
const LOGS: &str = "kproxy logs text to stderr, unbuffered";
const KLOG: &str = "removed from kube-proxy in 1.26; kproxy logs to stderr";
const REMOVED: &str = "removed from kube-proxy with its userspace mode";

/// The clap ids of every flag accepted only for compatibility.
pub fn no_effect_ids() -> impl Iterator<Item = &'static str> {
    NO_EFFECT.iter().map(|(id, _)| *id)
}

/// One warning naming every flag given that has no effect, grouped by
/// reason; `None` when there is none. Feature gates are named too.
pub fn warning(args: &RunArgs) -> Option<String> {
    let mut groups: Vec<(&str, Vec<String>)> = Vec::new();
    for (id, why) in NO_EFFECT {
        if !args.given(id) {
            continue;
        }
        let flag = format!("--{}", id.replace('_', "-"));
        match groups.iter_mut().find(|(w, _)| w == why) {
            Some((_, flags)) => flags.push(flag),
            None => groups.push((why, vec![flag])),
        }
    }
    let gates = args.feature_gate_map();
    if !gates.is_empty() {
        let names: Vec<String> = gates.iter().map(|(k, v)| format!("{k}={v}")).collect();
        groups.push((
            "kproxy's behaviour does not depend on kube-proxy's feature gates (it is that of their GA state)",
            vec![format!("--feature-gates {}", names.join(","))],
        ));
    }
    if groups.is_empty() {
        return None;
    }
    let parts: Vec<String> = groups
        .into_iter()
        .map(|(why, flags)| format!("{} ({why})", flags.join(", ")))
        .collect();
    Some(format!(
        "kube-proxy flags accepted without effect: {}",
        parts.join("; ")
    ))
}
