//! Command-line interface. `kproxy run` takes every kube-proxy flag (and
//! kube-proxy's `--config` file), so a kube-proxy DaemonSet runs kproxy by
//! changing only its image: invoked as `kube-proxy`, or with flags and no
//! subcommand, kproxy runs `run` (see [`argv`]).

pub mod argv;
pub mod compat;
pub mod config;
pub mod config_watch;
mod duration;
pub mod go_runner;
pub mod logging;
mod run_args;
pub mod values;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::dataplane::iptables::Backend;
use crate::dataplane::ProxyMode;
pub use duration::parse_duration;
pub use run_args::RunArgs;
use values::{parse_proxy_mode, ProxyModeArg};

#[derive(Debug, Parser)]
#[command(
    name = "kproxy",
    version,
    // pflag's rule, which kube-proxy's and kubectl's users rely on: a flag
    // given twice takes its last value (a DaemonSet patch that appends
    // `--v=4` to args holding `--v=2` must not crash-loop).
    args_override_self = true,
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
    Cleanup(CleanupArgs),
    /// Remove kube-proxy's iptables rules (its KUBE-* chains) after migrating to kproxy.
    CleanupKubeProxy(ModeArgs),
    /// Print the Services as the kernel has them programmed.
    Status(StatusArgs),
    /// Print what kproxy would program for a manifest directory: the
    /// iptables-restore input, or with --proxy-mode ebpf the BPF map entries.
    Render(RenderArgs),
    /// Forward local ports to a pod (as `kubectl port-forward`), surviving pod restarts and API drops.
    Forward(ForwardArgs),
    /// The UDP relay of `kproxy forward .../udp` on its own: what kproxy forward runs in an
    /// ephemeral container of the target pod where no kproxy agent runs on its node.
    UdpRelay(UdpRelayArgs),
}

/// `kproxy udp-relay`
#[derive(Debug, Args)]
pub struct UdpRelayArgs {
    /// Port to listen on, on loopback (127.0.0.1 and ::1): reached by a port-forward to the pod.
    #[arg(long, value_name = "PORT", default_value_t = crate::server::udp_relay::DEFAULT_PORT)]
    pub port: u16,
    /// Networks datagrams may be sent to, comma-separated CIDRs. Default: loopback (in an
    /// ephemeral container, the pod's own ports).
    #[arg(
        long,
        value_name = "CIDR",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1/128"
    )]
    pub allow: Vec<IpNet>,
    /// Exit once no forward has had a stream open for this long (0: never), so an ephemeral
    /// container ends when its forwards are gone.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub exit_after_idle: Duration,
}

/// `--request-timeout` as client-go reads it: seconds without a unit, else
/// a duration.
fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => parse_duration(s),
    }
}

/// `kproxy forward TYPE/NAME [LOCAL:]REMOTE...`
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// What to forward to: pod/NAME, svc/NAME, deploy/NAME, statefulset/NAME, rs/NAME, ds/NAME,
    /// job/NAME or rc/NAME (kubectl's aliases work too; a bare NAME is a pod).
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
    /// kubeconfig cluster to use (instead of the context's), as kubectl's --cluster.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// kubeconfig user to use (instead of the context's), as kubectl's --user.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// The API server's URL, overriding the kubeconfig's (as kubectl's -s; works without a
    /// kubeconfig). Without a scheme, https.
    #[arg(short = 's', long, value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token for the API server, instead of the kubeconfig user's credentials (as
    /// kubectl's --token).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Do not check the API server's certificate (as kubectl's flag; insecure).
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
    /// User to impersonate (as kubectl's --as).
    #[arg(long = "as", value_name = "USER")]
    pub as_user: Option<String>,
    /// Group to impersonate, repeatable (as kubectl's --as-group).
    #[arg(long = "as-group", value_name = "GROUP")]
    pub as_group: Vec<String>,
    /// UID to impersonate (as kubectl's --as-uid).
    #[arg(long = "as-uid", value_name = "UID")]
    pub as_uid: Option<String>,
    /// kubectl's global --request-timeout (a duration, seconds without a unit, 0 for none):
    /// accepted so kubectl command lines work, not applied (kproxy's API requests have their
    /// own timeouts and retries; a forward's streams have none).
    #[arg(long, value_name = "DURATION", value_parser = parse_request_timeout)]
    pub request_timeout: Option<Duration>,
    /// kubeconfig file. Default: $KUBECONFIG, ~/.kube/config, else in-cluster.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Local addresses to listen on, comma-separated (localhost: 127.0.0.1 and ::1 when available).
    #[arg(long, value_name = "ADDR", default_value = "localhost")]
    pub address: Vec<String>,
    /// How long to wait for a running pod (at start, and when it is replaced) or for the API
    /// server before giving up. kubectl's --pod-running-timeout is the same flag.
    #[arg(long, alias = "pod-running-timeout", default_value = "5m", value_parser = parse_duration)]
    pub pod_wait_timeout: Duration,
    /// Where the pod cannot be told that the local client half-closed (WebSocket v4), how long
    /// the pod may send nothing before the connection is closed (the runtime's own grace is 1s).
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
    /// UDP: which relay carries the datagrams: auto (the kproxy agent on the pod's node; where
    /// none runs, or the agents cannot be listed, an ephemeral container in the target pod),
    /// agent, or ephemeral.
    #[arg(long, value_enum, default_value_t = crate::forward::udp::RelayMode::Auto)]
    pub udp_relay: crate::forward::udp::RelayMode,
    /// UDP: the image of the ephemeral relay container (kproxy's own image, which runs
    /// `kproxy udp-relay`).
    #[arg(long, value_name = "IMAGE", default_value = concat!("ghcr.io/kproxy/kproxy:", env!("CARGO_PKG_VERSION")))]
    pub udp_relay_image: String,
    /// UDP: how long the ephemeral relay container may take to start (its image pull).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub udp_relay_start_timeout: Duration,
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
    /// UDP: the relay's port (the agents' `kproxy run --udp-relay-port`; the ephemeral relay
    /// container listens there too, on the pod's loopback).
    #[arg(long, value_name = "PORT", default_value_t = crate::server::udp_relay::DEFAULT_PORT)]
    pub udp_relay_port: u16,
    /// UDP: a client address's session is closed after this long without datagrams.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub udp_idle_timeout: Duration,
}

#[derive(Debug, Args, Clone)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub mode: ModeArgs,
    /// ebpf mode: clean up even while a kproxy runs on --bpf-pin-path (its Services stop being served).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ModeArgs {
    /// Which dataplane: iptables, or ebpf (socket load balancing + TC packet path).
    /// kube-proxy's ipvs and nftables run as iptables, with a warning.
    #[arg(long, value_name = "MODE", default_value = "iptables", value_parser = parse_proxy_mode)]
    pub proxy_mode: ProxyModeArg,
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
    /// Entries of the map of assured TC-path flows (and of the socket
    /// reverse-NAT map); the NAT index gets twice as many, the maps of new
    /// flows a quarter and a half.
    #[arg(long, value_name = "N", default_value_t = 262_144)]
    pub bpf_ct_map_max: u32,
    /// Source ports for NAT on the TC path (SNAT, and translation around
    /// 4-tuple clashes), as MIN-MAX. Default: the ports above the node's
    /// ip_local_port_range (61000-65535 with Linux's default).
    #[arg(long, value_name = "MIN-MAX", value_parser = parse_port_range)]
    pub bpf_nat_port_range: Option<(u16, u16)>,
    /// Idle time after which a TCP flow whose handshake did not complete is forgotten.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub bpf_ct_timeout_syn: Duration,
    /// Time a TCP flow is kept after both FINs or a RST (its NAT port is
    /// reused sooner when the range runs short).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub bpf_ct_timeout_close: Duration,
    /// Time between two sweeps of the conntrack garbage collector.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub bpf_ct_gc_interval: Duration,
    /// Entries of the sessionAffinity map (LRU).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub bpf_affinity_map_max: u32,
}

impl ModeArgs {
    /// The dataplane that runs.
    pub fn mode(&self) -> ProxyMode {
        self.proxy_mode.mode()
    }
}

/// `MIN-MAX` with 1 <= MIN <= MAX <= 65535.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected MIN-MAX, e.g. 40000-65535"))?;
    let lo: u16 = lo
        .trim()
        .parse()
        .map_err(|_| format!("{lo:?} is not a port"))?;
    let hi: u16 = hi
        .trim()
        .parse()
        .map_err(|_| format!("{hi:?} is not a port"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: expected 1 <= MIN <= MAX <= 65535"));
    }
    Ok((lo, hi))
}

impl EbpfArgs {
    /// The settings of ebpf mode; the conntrack timeouts kube-proxy has
    /// flags for come from the `--conntrack-*` flags (0: the default).
    pub fn config_with(&self, run: &RunArgs) -> crate::dataplane::ebpf::EbpfConfig {
        let mut c = self.config();
        let t = &mut c.gc.timeouts;
        let or = |d: Duration, default: Duration| if d.is_zero() { default } else { d };
        t.established = or(run.conntrack_tcp_timeout_established, t.established);
        t.close_wait = or(run.conntrack_tcp_timeout_close_wait, t.close_wait);
        t.udp = or(run.conntrack_udp_timeout, t.udp);
        t.udp_stream = or(run.conntrack_udp_timeout_stream, t.udp_stream);
        c
    }

    pub fn config(&self) -> crate::dataplane::ebpf::EbpfConfig {
        let mut gc = crate::dataplane::ebpf::ct_worker::GcConfig::default();
        if !self.bpf_ct_timeout_syn.is_zero() {
            gc.timeouts.syn = self.bpf_ct_timeout_syn;
        }
        if !self.bpf_ct_timeout_close.is_zero() {
            gc.timeouts.closed = self.bpf_ct_timeout_close;
        }
        if !self.bpf_ct_gc_interval.is_zero() {
            gc.interval = self.bpf_ct_gc_interval;
        }
        crate::dataplane::ebpf::EbpfConfig {
            nat_ports: self.bpf_nat_port_range,
            gc,
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
    /// Metrics address of the running `kproxy run`, asked what it left out
    /// (IPv6 parts, invalid objects, lost frontends); empty: do not ask.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// List every frontend's status (applied ones too), not only the
    /// frontends pending or in error.
    #[arg(long)]
    pub all: bool,
    /// Only what the running kproxy reports (the counts of frontends by
    /// status, the frontends not applied, what it left out), without the
    /// table read back from the kernel: short at any number of Services.
    #[arg(long)]
    pub summary: bool,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Directory of manifests to render.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    /// iptables: the iptables-restore input; ebpf: the BPF map entries a
    /// fresh kproxy writes.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = ProxyMode::Iptables)]
    pub proxy_mode: ProxyMode,
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

/// Parses the process's command line (see [`argv`]); exits with clap's
/// message on a usage error, as any CLI does.
pub fn parse() -> Cli {
    match parse_from(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    }
}

/// [`parse`] for a given `argv` (program name first).
pub fn parse_from(argv: Vec<std::ffi::OsString>) -> Result<Cli, clap::Error> {
    let matches = Cli::command().try_get_matches_from(argv::normalize(argv))?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Run(run), Some(sub)) = (&mut cli.command, matches.subcommand_matches("run")) {
        run.given = given_ids(sub);
        run.verbosity_given = matches.value_source("verbosity")
            == Some(clap::parser::ValueSource::CommandLine)
            || sub.value_source("verbosity") == Some(clap::parser::ValueSource::CommandLine);
    }
    Ok(cli)
}

/// The ids of the arguments given on the command line.
fn given_ids(m: &clap::ArgMatches) -> std::collections::BTreeSet<String> {
    m.ids()
        .map(|id| id.as_str().to_string())
        .filter(|id| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        .collect()
}

/// Prepares `run`'s settings: applies `--config` (flags given on the command
/// line win), kube-proxy's dependent defaults, and returns the warnings to
/// log at start (fields and flags without effect, a substituted mode).
pub fn resolve_run(args: &mut RunArgs) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    // kube-proxy ignores empty arguments on purpose (templated args such as
    // "$(EXTRA_ARGS)" with an empty value) and refuses any other.
    if let Some(arg) = args.positional.iter().find(|a| !a.is_empty()) {
        anyhow::bail!(
            "kproxy run takes no arguments, got {arg:?} (a flag's value needs `=`, as in --masquerade-all=true)"
        );
    }
    if let Some(name) = &args.hostname_override {
        if !name.is_empty() && name.trim().is_empty() {
            anyhow::bail!("--hostname-override {name:?} is blank: give the node's name, or leave the flag out to use the hostname");
        }
    }
    if let Some(path) = args.config.clone() {
        let applied = config::apply_file(&path, args)?;
        warnings.extend(applied.warnings);
        if let Some(v) = applied.verbosity {
            if !args.verbosity_given {
                logging::set_verbosity(v);
            }
        }
    }
    args.apply_dependent_defaults();
    if let Some(w) = compat::warning(args) {
        warnings.push(w);
    }
    if let Some(w) = args.mode.proxy_mode.substitution() {
        warnings.push(w);
    }
    Ok(warnings)
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
    use std::ffi::OsString;

    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        match parse_from(argv)?.command {
            Command::Run(run) => Ok(run),
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn accepts_kube_proxy_style_args() {
        let run = run_args(&[
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
        assert_eq!(run.cluster_cidrs().len(), 2);
        assert!(run.masquerade_all);
        assert_eq!(run.healthz_addr(), Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(run.iptables_min_sync_period, Duration::ZERO);
        assert_eq!(run.metrics_addr(), Some("127.0.0.1:10249".parse().unwrap()));
        assert!(run.given("masquerade_all") && !run.given("metrics_bind_address"));
    }

    #[test]
    fn refuses_bad_cidr_with_a_message() {
        let err = run_args(&["kproxy", "run", "--cluster-cidr", "10.0.0.0/40"]).unwrap_err();
        assert!(err.to_string().contains("--cluster-cidr"), "{err}");
    }

    #[test]
    fn no_subcommand_and_kube_proxy_name_run() {
        let run =
            run_args(&["/usr/local/bin/kube-proxy", "--v=2", "--oom-score-adj=-998"]).unwrap();
        assert_eq!(run.oom_score_adj, -998);
        let run = run_args(&["kproxy", "--hostname-override=n"]).unwrap();
        assert_eq!(run.hostname_override.as_deref(), Some("n"));
    }

    #[test]
    fn addresses_accept_kube_proxy_forms() {
        let run = run_args(&[
            "kproxy",
            "--metrics-bind-address=",
            "--healthz-bind-address=127.0.0.1",
        ])
        .unwrap();
        assert_eq!(
            run.metrics_addr(),
            None,
            "empty disables the metrics server"
        );
        assert_eq!(run.healthz_addr(), Some("127.0.0.1:10256".parse().unwrap()));
        let run = run_args(&["kproxy", "--metrics-port=0"]).unwrap();
        assert_eq!(run.metrics_addr(), None);
        let run = run_args(&["kproxy", "--nodeport-addresses", "primary"]).unwrap();
        assert_eq!(
            run.nodeport_address_list(),
            vec![values::NodePortAddress::Primary]
        );
        let mut run = run_args(&["kproxy", "--bind-address=fd00::1"]).unwrap();
        run.apply_dependent_defaults();
        assert_eq!(run.healthz_addr(), Some("[::]:10256".parse().unwrap()));
        assert_eq!(run.metrics_addr(), Some("[::1]:10249".parse().unwrap()));
    }

    #[test]
    fn go_booleans() {
        let run = run_args(&["kproxy", "--masquerade-all"]).unwrap();
        assert!(run.masquerade_all);
        let run = run_args(&["kproxy", "--iptables-localhost-nodeports=false"]).unwrap();
        assert!(!run.iptables_localhost_nodeports);
        let run = run_args(&["kproxy", "--conntrack-tcp-be-liberal=1"]).unwrap();
        assert!(run.conntrack_tcp_be_liberal);
        assert!(run_args(&["kproxy", "--masquerade-all=yes"]).is_err());
    }

    #[test]
    fn a_flag_given_twice_takes_its_last_value_as_pflag() {
        let run = run_args(&[
            "kube-proxy",
            "--hostname-override=a",
            "--masquerade-all",
            "--proxy-mode=ipvs",
            "--hostname-override=b",
            "--masquerade-all=false",
            "--proxy-mode=iptables",
        ])
        .unwrap();
        assert_eq!(run.hostname_override.as_deref(), Some("b"));
        assert!(!run.masquerade_all);
        let cli = parse_from(["kube-proxy", "--v=2", "--v=4"].map(OsString::from).into()).unwrap();
        assert_eq!(cli.verbosity, 4);
        // List flags still add up.
        let run = run_args(&[
            "kproxy",
            "--nodeport-addresses=10.0.0.0/8",
            "--nodeport-addresses=primary",
        ])
        .unwrap();
        assert_eq!(run.nodeport_address_list().len(), 2);
    }

    #[test]
    fn empty_arguments_are_ignored_and_others_refused() {
        let mut run = run_args(&["kube-proxy", "", "--hostname-override=n", ""]).unwrap();
        assert!(resolve_run(&mut run).is_ok());
        assert_eq!(run.hostname_override.as_deref(), Some("n"));
        let mut run = run_args(&["kube-proxy", "--masquerade-all", "true"]).unwrap();
        let err = resolve_run(&mut run).unwrap_err().to_string();
        assert!(
            err.contains("\"true\"") && err.contains("--masquerade-all=true"),
            "{err}"
        );
    }

    #[test]
    fn nftables_mode_keeps_its_node_port_defaults() {
        let mut run = run_args(&["kube-proxy", "--proxy-mode=nftables"]).unwrap();
        let warnings = resolve_run(&mut run).unwrap();
        assert_eq!(
            run.nodeport_address_list(),
            vec![values::NodePortAddress::Primary]
        );
        assert!(!run.iptables_localhost_nodeports);
        assert!(
            warnings.iter().any(|w| w.contains("primary")),
            "{warnings:?}"
        );
        // Set explicitly, the addresses are kept.
        let mut run = run_args(&[
            "kube-proxy",
            "--proxy-mode=nftables",
            "--nodeport-addresses=10.0.0.0/8",
        ])
        .unwrap();
        resolve_run(&mut run).unwrap();
        assert_ne!(
            run.nodeport_address_list(),
            vec![values::NodePortAddress::Primary]
        );
        // iptables mode keeps kube-proxy's iptables defaults.
        let mut run = run_args(&["kube-proxy", "--proxy-mode=ipvs"]).unwrap();
        resolve_run(&mut run).unwrap();
        assert!(run.nodeport_address_list().is_empty() && run.iptables_localhost_nodeports);
    }

    #[test]
    fn a_blank_hostname_override_is_refused() {
        let mut run = run_args(&["kube-proxy", "--hostname-override= "]).unwrap();
        let err = resolve_run(&mut run).unwrap_err().to_string();
        assert!(err.contains("--hostname-override"), "{err}");
        // Empty means "not given", as kube-proxy.
        let mut run = run_args(&["kube-proxy", "--hostname-override="]).unwrap();
        assert!(resolve_run(&mut run).is_ok());
    }

    /// Every flag of kube-proxy's `options.go` (and the logging flags it
    /// registers), with a value of the right kind, parses; and each one is
    /// either honoured or named in the no-effect warning.
    #[test]
    fn every_kube_proxy_flag_parses() {
        let list = include_str!("testdata/kube-proxy-flags.txt");
        let mut seen = 0;
        for line in list.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            seen += 1;
            let mut argv = vec!["kube-proxy"];
            argv.extend(line.split(' '));
            let run = run_args(&argv).unwrap_or_else(|e| panic!("{line}: {e}"));
            let flag = line.split(['=', ' ']).next().unwrap().replace('_', "-");
            let flag = flag.as_str();
            let id = flag.trim_start_matches("--").replace('-', "_");
            // `--v` is a global flag, not one of run's.
            let id = if id == "v" {
                "verbosity".to_string()
            } else {
                id
            };
            assert!(
                run.given(&id),
                "{line}: not recorded as given ({:?})",
                run.given
            );
            let no_effect = compat::no_effect_ids().any(|i| i == id) || id == "feature_gates";
            let warned = compat::warning(&run).is_some_and(|w| w.contains(flag));
            assert_eq!(
                no_effect,
                warned,
                "{line}: warning {:?}",
                compat::warning(&run)
            );
        }
        assert!(seen >= 60, "only {seen} flags in the list");
    }
}
