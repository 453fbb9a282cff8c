//! Command-line interface. `kproxy run` takes kube-proxy's flag names where
//! kube-proxy has the flag, so a DaemonSet's args can be reused as they are.

pub mod config;
mod duration;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::dataplane::iptables::Backend;
use crate::dataplane::ProxyMode;
pub use duration::parse_duration;

#[derive(Debug, Parser)]
#[command(
    name = "kproxy",
    version,
    about = "Kubernetes service proxy and port-forwarder"
)]
pub struct Cli {
    /// Log verbosity as kube-proxy's --v (0: info, 2: debug, 4+: trace). RUST_LOG overrides.
    #[arg(long = "v", short = 'v', global = true, default_value_t = 0)]
    pub verbosity: u8,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up and moved out right away: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: watch Services and EndpointSlices and program the dataplane.
    Run(RunArgs),
    /// Remove everything kproxy programmed on this node, then exit.
    Cleanup(ModeArgs),
    /// Remove kube-proxy's iptables rules (its KUBE-* chains) after migrating to kproxy.
    CleanupKubeProxy(ModeArgs),
    /// Print the Services as the kernel has them programmed.
    Status(StatusArgs),
    /// Print the iptables-restore input kproxy would apply for a manifest directory.
    Render(RenderArgs),
    /// Forward local ports to a pod (as `kubectl port-forward`), surviving pod restarts and API drops.
    Forward(ForwardArgs),
}

/// `kproxy forward TYPE/NAME [LOCAL:]REMOTE...`
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// What to forward to: pod/NAME, svc/NAME, deploy/NAME, statefulset/NAME or rs/NAME
    /// (kubectl's aliases work too; a bare NAME is a pod).
    #[arg(value_name = "TYPE/NAME", required_unless_present = "file")]
    pub target: Option<String>,
    /// Port pairs: LOCAL:REMOTE, :REMOTE (a free local port, printed) or PORT (the same both
    /// sides), with /udp for UDP (5353:53/udp). REMOTE may be a port name (a container port's,
    /// or for svc/ a Service port's).
    #[arg(value_name = "[LOCAL]:REMOTE", required_unless_present = "file", num_args = 1..)]
    pub ports: Vec<String>,
    /// Many forwards from a YAML file (a list of entries with target, ports, and optionally
    /// namespace, context, kubeconfig, address), with a status line per forward.
    #[arg(short = 'f', long = "file", value_name = "FILE", conflicts_with_all = ["target", "ports"])]
    pub file: Option<PathBuf>,
    /// Namespace of the target. Default: the kubeconfig context's namespace.
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// kubeconfig context to use.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// kubeconfig file. Default: $KUBECONFIG, ~/.kube/config, else in-cluster.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Local addresses to listen on, comma-separated (localhost: 127.0.0.1 and ::1 when available).
    #[arg(long, value_name = "ADDR", default_value = "localhost")]
    pub address: Vec<String>,
    /// How long to wait for a pod to come back (or for the API server) before giving up.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub pod_wait_timeout: Duration,
    /// Where the pod cannot be told that the local client half-closed (WebSocket v4), how long
    /// to wait for the pod's reply before closing (the container runtime's own grace is 1s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub half_close_timeout: Duration,
    /// Keepalive period on each forwarded connection: an empty data message, which resets the
    /// container runtime's stream idle timeout (a WebSocket ping does not) and proxies' timers.
    #[arg(long, alias = "ping-interval", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,
    /// How often the target is checked, so a vanished target is noticed without a connection.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub check_interval: Duration,
    /// Protocol to the API server: auto (WebSocket, then SPDY after a 403 or 400, as kubectl),
    /// websocket, or spdy.
    #[arg(long, value_enum, default_value_t = crate::forward::dial::Transport::Auto)]
    pub transport: crate::forward::dial::Transport,
    /// Connection set-ups (API requests) in flight at once; more connections wait their turn.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_concurrent_setups: usize,
    /// UDP: namespace of the kproxy agent pods that relay datagrams.
    #[arg(long, value_name = "NAMESPACE", default_value = "kube-system")]
    pub udp_relay_namespace: String,
    /// UDP: label selector of the kproxy agent pods.
    #[arg(
        long,
        value_name = "SELECTOR",
        default_value = "app.kubernetes.io/name=kproxy"
    )]
    pub udp_relay_selector: String,
    /// UDP: the agents' relay port (their `kproxy run --udp-relay-port`).
    #[arg(long, value_name = "PORT", default_value_t = crate::server::udp_relay::DEFAULT_PORT)]
    pub udp_relay_port: u16,
    /// UDP: a client address's session is closed after this long without datagrams.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub udp_idle_timeout: Duration,
}

#[derive(Debug, Args, Clone)]
pub struct ModeArgs {
    /// Which dataplane: iptables, or ebpf (socket load balancing + TC packet path).
    #[arg(long, value_enum, default_value_t = ProxyMode::Iptables)]
    pub proxy_mode: ProxyMode,
    /// iptables binaries to use; auto picks the backend the system already uses.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub iptables_backend: Backend,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

/// Flags of `--proxy-mode ebpf`.
#[derive(Debug, Args, Clone)]
pub struct EbpfArgs {
    /// bpffs directory where this instance pins its maps and links (a restarted kproxy adopts them).
    #[arg(long, value_name = "DIR", default_value = crate::dataplane::ebpf::DEFAULT_PIN_PATH)]
    pub bpf_pin_path: PathBuf,
    /// cgroup v2 directory for the socket load-balancing hooks. Default: the cgroup2 mount.
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    /// Devices for the TC programs, comma-separated. Default: every device but lo, followed as devices come and go.
    #[arg(long, value_delimiter = ',', value_name = "DEV")]
    pub devices: Vec<String>,
    /// Entries of the frontend and service maps (about 2 per Service port plus node ports).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub bpf_lb_map_max: u32,
    /// Entries of the backend and backend-slot maps (endpoints, counted per distinct backend set).
    #[arg(long, value_name = "N", default_value_t = 262_144)]
    pub bpf_backend_map_max: u32,
    /// Entries of the conntrack, NAT and socket reverse-NAT maps (LRU).
    #[arg(long, value_name = "N", default_value_t = 262_144)]
    pub bpf_ct_map_max: u32,
    /// Entries of the sessionAffinity map (LRU).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub bpf_affinity_map_max: u32,
}

impl EbpfArgs {
    pub fn config(&self) -> crate::dataplane::ebpf::EbpfConfig {
        crate::dataplane::ebpf::EbpfConfig {
            pin_path: self.bpf_pin_path.clone(),
            cgroup_root: self.cgroup_root.clone(),
            devices: self.devices.clone(),
            map_sizes: crate::dataplane::ebpf::MapSizes {
                lb: self.bpf_lb_map_max,
                backend: self.bpf_backend_map_max,
                ct: self.bpf_ct_map_max,
                affinity: self.bpf_affinity_map_max,
            },
        }
    }
}

#[derive(Debug, Args)]
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
    /// kube-proxy configuration file (KubeProxyConfiguration v1alpha1); flags override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// This node's name (decides which endpoints are local). Default: $NODE_NAME, else the hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// Pod CIDR(s) of the cluster, comma-separated: traffic to a ClusterIP from outside them is masqueraded.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub cluster_cidr: Vec<IpNet>,
    /// Node addresses (CIDRs, comma-separated) that accept NodePort traffic. Default: every local address.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub nodeport_addresses: Vec<IpNet>,
    /// SNAT all traffic sent through Service addresses.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub masquerade_all: bool,
    /// Address of the /healthz server (ip:port, or ip for port 10256).
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_healthz_addr)]
    pub healthz_bind_address: SocketAddr,
    /// Address of the /metrics and /proxyMode server (ip:port, or ip for port 10249).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_metrics_addr)]
    pub metrics_bind_address: SocketAddr,
    /// Period of full syncs that repair drift (Go duration, e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub iptables_sync_period: Duration,
    /// Minimum time between syncs: changes arriving faster are coalesced.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub iptables_min_sync_period: Duration,
    /// Remove everything kproxy programmed, then exit (as `kproxy cleanup`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub cleanup: bool,
    /// Loopback port of the UDP relay that `kproxy forward ... PORT/udp` reaches through the
    /// API's port-forward to this pod (datagrams go to --cluster-cidr only when set); 0: off.
    #[arg(long, value_name = "PORT", default_value_t = crate::server::udp_relay::DEFAULT_PORT)]
    pub udp_relay_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub mode: ModeArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Directory of manifests to render.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    /// Node name used to decide local endpoints. Default: $NODE_NAME, else the hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub cluster_cidr: Vec<IpNet>,
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub nodeport_addresses: Vec<IpNet>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub masquerade_all: bool,
}

fn parse_bind_addr(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("{s:?} is not an address: expected ip:port or ip"))
}

fn parse_healthz_addr(s: &str) -> Result<SocketAddr, String> {
    parse_bind_addr(s, 10256)
}

fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    parse_bind_addr(s, 10249)
}

/// Whether the `run` flag with clap id `id` (the field name) was given on
/// the command line, rather than coming from its default.
pub fn given_on_command_line(run_matches: &clap::ArgMatches, id: &str) -> bool {
    matches!(
        run_matches
            .try_get_raw(id)
            .ok()
            .flatten()
            .map(|_| run_matches.value_source(id)),
        Some(Some(clap::parser::ValueSource::CommandLine))
    )
}

/// Applies `--config` to `args` (flags given in `argv` win) and returns the
/// warnings to log. `argv` is the full command line, re-parsed to learn which
/// flags were explicit.
pub fn apply_config_file(
    args: &mut RunArgs,
    argv: impl IntoIterator<Item = std::ffi::OsString>,
) -> anyhow::Result<Vec<String>> {
    use clap::CommandFactory;
    let Some(path) = args.config.clone() else {
        return Ok(Vec::new());
    };
    let matches = Cli::command().try_get_matches_from(argv)?;
    let run = matches
        .subcommand_matches("run")
        .cloned()
        .unwrap_or_default();
    let given = move |id: &str| given_on_command_line(&run, id);
    Ok(config::apply_file(&path, args, &given)?.warnings)
}

/// The node name: the flag, else `$NODE_NAME` (downward API), else the hostname.
pub fn node_name(flag: Option<&str>) -> String {
    if let Some(name) = flag.filter(|n| !n.is_empty()) {
        return name.trim().to_lowercase();
    }
    if let Ok(name) = std::env::var("NODE_NAME") {
        if !name.is_empty() {
            return name.trim().to_lowercase();
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kube_proxy_style_args() {
        let cli = Cli::try_parse_from([
            "kproxy",
            "run",
            "--proxy-mode",
            "iptables",
            "--hostname-override",
            "node1",
            "--cluster-cidr",
            "10.244.0.0/16,10.245.0.0/16",
            "--masquerade-all=true",
            "--healthz-bind-address",
            "0.0.0.0",
            "--iptables-min-sync-period",
            "0s",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(run.cluster_cidr.len(), 2);
        assert!(run.masquerade_all);
        assert_eq!(run.healthz_bind_address.port(), 10256);
        assert_eq!(run.iptables_min_sync_period, Duration::ZERO);
        assert_eq!(run.metrics_bind_address, "127.0.0.1:10249".parse().unwrap());
    }

    #[test]
    fn refuses_bad_cidr_with_a_message() {
        let err =
            Cli::try_parse_from(["kproxy", "run", "--cluster-cidr", "10.0.0.0/40"]).unwrap_err();
        assert!(err.to_string().contains("--cluster-cidr"), "{err}");
    }
}
