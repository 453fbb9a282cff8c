//! `kproxy run`'s flags: every flag of kube-proxy (`cmd/kube-proxy/app`),
//! with kube-proxy's names, value syntax and defaults, plus kproxy's own.
//! Flags kproxy cannot honour are accepted and named in one warning at
//! start ([`super::compat`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args};
use ipnet::IpNet;

use super::values::*;
use super::{parse_duration, ModeArgs};

/// Boolean flags take pflag's forms: `--flag`, `--flag=true|false|1|0|t|f`.
macro_rules! go_bool {
    () => {
        clap::builder::ValueParser::new(parse_go_bool)
    };
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub mode: ModeArgs,
    /// Read Services, EndpointSlices and Nodes from this directory of YAML manifests
    /// (watched for changes) instead of a Kubernetes API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// kubeconfig for the Kubernetes API server (without --manifests). Default: in-cluster config.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Address of the Kubernetes API server (overrides the kubeconfig's server).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// kube-proxy configuration file (KubeProxyConfiguration v1alpha1); flags given on the command line override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Write the effective configuration as a KubeProxyConfiguration to this file, then exit.
    #[arg(long, value_name = "PATH")]
    pub write_config_to: Option<PathBuf>,
    /// This node's name (decides which endpoints are local). Default: $NODE_NAME, else the hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// This node's primary IP (for --nodeport-addresses primary and the default server families).
    #[arg(long, value_name = "IP", value_parser = parse_bind_ip)]
    pub bind_address: Option<IpAddr>,
    /// Pod CIDR(s) of the cluster, comma-separated: with --detect-local-mode ClusterCIDR, traffic
    /// to a ClusterIP from outside them is masqueraded.
    #[arg(long, value_delimiter = ',', value_name = "CIDR", value_parser = parse_cidr_or_empty)]
    pub cluster_cidr: Vec<Option<IpNet>>,
    /// How traffic from this node's pods is recognised: ClusterCIDR, NodeCIDR (the Node's
    /// spec.podCIDRs), BridgeInterface or InterfaceNamePrefix.
    #[arg(long, value_name = "MODE", default_value = "ClusterCIDR", value_parser = parse_detect_local_mode)]
    pub detect_local_mode: DetectLocalModeName,
    /// With --detect-local-mode BridgeInterface: the pods' bridge.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub pod_bridge_interface: String,
    /// With --detect-local-mode InterfaceNamePrefix: the prefix of the pods' interfaces.
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub pod_interface_name_prefix: String,
    /// Node addresses that accept NodePort traffic: CIDRs, `primary` (the Node's primary IPs),
    /// `localhost`, `all`; comma-separated. Default: every local address.
    #[arg(long, value_name = "CIDR|primary", value_parser = parse_nodeport_addresses)]
    pub nodeport_addresses: Vec<Vec<NodePortAddress>>,
    /// SNAT all traffic sent through Service addresses.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set, value_parser = go_bool!())]
    pub masquerade_all: bool,
    /// The packet mark bit that asks for SNAT (0-31).
    #[arg(long, value_name = "BIT", default_value = "14", value_parser = parse_masquerade_bit)]
    pub iptables_masquerade_bit: u8,
    /// Serve node ports on 127.0.0.1 too, to the node's own processes (iptables mode sets net.ipv4.conf.all.route_localnet=1).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub iptables_localhost_nodeports: bool,
    /// Address of the /healthz server: ip:port, ip (port 10256), or empty to disable.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256", value_parser = parse_bind_spec)]
    pub healthz_bind_address: BindSpec,
    /// Deprecated: port of the /healthz server when --healthz-bind-address has none (0 disables).
    #[arg(long, value_name = "PORT")]
    pub healthz_port: Option<u16>,
    /// Address of the /metrics server: ip:port, ip (port 10249), or empty to disable.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249", value_parser = parse_bind_spec)]
    pub metrics_bind_address: BindSpec,
    /// Deprecated: port of the metrics server when --metrics-bind-address has none (0 disables).
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// Exit when the healthz or metrics server cannot listen (otherwise kproxy retries every 5s).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set, value_parser = go_bool!())]
    pub bind_address_hard_fail: bool,
    /// Period of full syncs that repair drift (Go duration, e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub iptables_sync_period: Duration,
    /// Minimum time between syncs: changes arriving faster are coalesced.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub iptables_min_sync_period: Duration,
    /// oom_score_adj of the kproxy process (-1000..1000).
    #[arg(long, value_name = "N", default_value = "-999", value_parser = parse_oom_score_adj, allow_hyphen_values = true)]
    pub oom_score_adj: i32,
    /// nf_conntrack_max = this × CPUs (at least --conntrack-min); 0 leaves it as is.
    #[arg(long, value_name = "N", default_value = "32768", value_parser = parse_non_negative)]
    pub conntrack_max_per_core: u32,
    /// Minimum nf_conntrack_max (with --conntrack-max-per-core > 0).
    #[arg(long, value_name = "N", default_value = "131072", value_parser = parse_non_negative)]
    pub conntrack_min: u32,
    /// nf_conntrack_tcp_timeout_established; 0 leaves it as is.
    #[arg(long, value_name = "DUR", default_value = "24h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,
    /// nf_conntrack_tcp_timeout_close_wait; 0 leaves it as is.
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,
    /// Set nf_conntrack_tcp_be_liberal=1 (out-of-window TCP packets are not INVALID).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set, value_parser = go_bool!())]
    pub conntrack_tcp_be_liberal: bool,
    /// nf_conntrack_udp_timeout (unreplied UDP); 0 leaves it as is.
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Duration,
    /// nf_conntrack_udp_timeout_stream (assured UDP); 0 leaves it as is.
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Duration,
    /// Apply the settings that need privileges (sysctls), then exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set, value_parser = go_bool!())]
    pub init_only: bool,
    /// Remove everything kproxy programmed (as `kproxy cleanup`) and kube-proxy's chains
    /// (as `kproxy cleanup-kube-proxy`), then exit; needs no cluster, sets no sysctl.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set, value_parser = go_bool!())]
    pub cleanup: bool,
    /// Loopback port of the UDP relay that `kproxy forward ... PORT/udp` reaches through the
    /// API's port-forward to this pod (datagrams go to --cluster-cidr only when set); 0: off.
    #[arg(long, value_name = "PORT", default_value_t = crate::server::udp_relay::DEFAULT_PORT)]
    pub udp_relay_port: u16,
    /// kube-proxy's feature gates (NAME=true,...): accepted; kproxy's behaviour is fixed.
    #[arg(long, value_name = "NAME=BOOL,...", value_parser = parse_feature_gates)]
    pub feature_gates: Vec<BTreeMap<String, bool>>,

    // ---- accepted for compatibility; named in a warning at start (see compat.rs)
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub profiling: Option<bool>,
    #[arg(long, hide = true)]
    pub show_hidden_metrics_for_version: Option<String>,
    #[arg(long, hide = true)]
    pub kube_api_content_type: Option<String>,
    #[arg(long, hide = true, allow_hyphen_values = true)]
    pub kube_api_burst: Option<i32>,
    #[arg(long, hide = true, allow_hyphen_values = true)]
    pub kube_api_qps: Option<f32>,
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub config_sync_period: Option<Duration>,
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub ipvs_sync_period: Option<Duration>,
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub ipvs_min_sync_period: Option<Duration>,
    #[arg(long, hide = true)]
    pub ipvs_scheduler: Option<String>,
    #[arg(long, hide = true, value_delimiter = ',')]
    pub ipvs_exclude_cidrs: Vec<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub ipvs_strict_arp: Option<bool>,
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub ipvs_tcp_timeout: Option<Duration>,
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub ipvs_tcpfin_timeout: Option<Duration>,
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub ipvs_udp_timeout: Option<Duration>,
    #[arg(long, hide = true)]
    pub vmodule: Option<String>,
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub log_flush_frequency: Option<Duration>,
    #[arg(long, hide = true)]
    pub logging_format: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub log_json_split_stream: Option<bool>,
    #[arg(long, hide = true)]
    pub log_json_info_buffer_size: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub log_text_split_stream: Option<bool>,
    #[arg(long, hide = true)]
    pub log_text_info_buffer_size: Option<String>,
    // klog flags kube-proxy had until 1.26, still in older DaemonSets.
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub logtostderr: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub alsologtostderr: Option<bool>,
    #[arg(long, hide = true)]
    pub log_dir: Option<String>,
    #[arg(long, hide = true)]
    pub log_file: Option<String>,
    #[arg(long, hide = true)]
    pub log_file_max_size: Option<String>,
    #[arg(long, hide = true)]
    pub log_backtrace_at: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub skip_headers: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub skip_log_headers: Option<bool>,
    #[arg(long, hide = true)]
    pub stderrthreshold: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub one_output: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool!())]
    pub add_dir_header: Option<bool>,
    // Flags removed from kube-proxy long ago, still in old manifests.
    #[arg(long, hide = true)]
    pub resource_container: Option<String>,
    #[arg(long, hide = true)]
    pub udp_timeout: Option<String>,
    #[arg(long, hide = true)]
    pub proxy_port_range: Option<String>,
    /// Arguments that are not flags: only empty ones are allowed (checked
    /// in `resolve_run`), as kube-proxy allows them.
    #[arg(hide = true, value_name = "ARGS")]
    pub positional: Vec<String>,

    /// Clap ids of the flags given on the command line (filled by [`super::parse`]).
    #[arg(skip)]
    pub given: BTreeSet<String>,
    /// `--v` was given on the command line (it beats `logging.verbosity`).
    #[arg(skip)]
    pub verbosity_given: bool,
    /// Clap ids of the settings the `--config` file set.
    #[arg(skip)]
    pub from_config: BTreeSet<String>,
}

fn parse_bind_ip(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address"))
}

/// One `--cluster-cidr` item; empty items (`--cluster-cidr=""`) are dropped later.
fn parse_cidr_or_empty(s: &str) -> Result<Option<IpNet>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| format!("{s:?} is not a CIDR: {e}"))
}

impl RunArgs {
    /// Whether the flag with clap id `id` (its field name) was given on the command line.
    pub fn given(&self, id: &str) -> bool {
        self.given.contains(id)
    }

    /// `--cluster-cidr`, without empty items.
    pub fn cluster_cidrs(&self) -> Vec<IpNet> {
        self.cluster_cidr.iter().flatten().copied().collect()
    }

    /// `--nodeport-addresses`, flattened.
    pub fn nodeport_address_list(&self) -> Vec<NodePortAddress> {
        self.nodeport_addresses.iter().flatten().copied().collect()
    }

    /// `--feature-gates`, merged (later values win).
    pub fn feature_gate_map(&self) -> BTreeMap<String, bool> {
        self.feature_gates
            .iter()
            .flat_map(|m| m.iter().map(|(k, v)| (k.clone(), *v)))
            .collect()
    }

    /// The healthz address, `None` when disabled.
    pub fn healthz_addr(&self) -> Option<std::net::SocketAddr> {
        self.healthz_bind_address.resolve(self.healthz_port, 10256)
    }

    /// The metrics address, `None` when disabled.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_bind_address.resolve(self.metrics_port, 10249)
    }

    /// Applies kube-proxy's defaults that depend on other settings (the
    /// servers' address family follows `--bind-address`).
    pub fn apply_dependent_defaults(&mut self) {
        let (healthz_ip, metrics_ip) = default_bind_ips(self.bind_address);
        let set = |id: &str| self.given(id) || self.from_config.contains(id);
        let (healthz_set, metrics_set) = (set("healthz_bind_address"), set("metrics_bind_address"));
        if !healthz_set {
            if let BindSpec::Addr { ip, .. } = &mut self.healthz_bind_address {
                if ip.is_unspecified() {
                    *ip = healthz_ip;
                }
            }
        }
        if !metrics_set {
            if let BindSpec::Addr { ip, .. } = &mut self.metrics_bind_address {
                if ip.is_loopback() {
                    *ip = metrics_ip;
                }
            }
        }
        // kube-proxy's nftables mode (run here as iptables mode) serves node
        // ports on the primary IPs by default and never on localhost: a
        // cluster that swaps the image keeps its node ports where they were.
        if self.mode.proxy_mode == ProxyModeArg::Nftables {
            if !(self.given("nodeport_addresses")
                || self.from_config.contains("nodeport_addresses"))
            {
                self.nodeport_addresses = vec![vec![NodePortAddress::Primary]];
            }
            self.iptables_localhost_nodeports = false;
        }
    }
}
