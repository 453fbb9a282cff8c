//! Dataplanes program a [`DesiredState`] into the kernel. Each is a small
//! adapter behind the [`Dataplane`] trait; the sync loop drives it.

pub mod ebpf;
pub mod iptables;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::{ChangeSet, DesiredState, Protocol, ServicePort, ServicePortName};

/// `--proxy-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Iptables,
    Ebpf,
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ebpf => "ebpf",
        })
    }
}

/// `--detect-local-mode`: how traffic from this node's pods is told from
/// other traffic (it decides masquerading, as in kube-proxy).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DetectLocalMode {
    /// Sources inside `--cluster-cidr`.
    #[default]
    ClusterCidr,
    /// Sources inside the Node's `spec.podCIDRs`.
    NodeCidr,
    /// Packets that arrive on this bridge.
    BridgeInterface(String),
    /// Packets that arrive on interfaces whose name starts with this.
    InterfaceNamePrefix(String),
}

/// What "local traffic" means for one sync, [`DetectLocalMode`] resolved
/// against the Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalTraffic {
    /// Nothing is known to be local (no CIDR yet): nothing is masqueraded
    /// for being non-local, as kube-proxy's no-op detector does.
    Unknown,
    Cidrs(Vec<IpNet>),
    Bridge(String),
    InterfacePrefix(String),
}

/// Node-level settings every dataplane needs, from the command line.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// `--cluster-cidr`: traffic from outside it to a ClusterIP is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--detect-local-mode` (with its interface).
    pub detect_local: DetectLocalMode,
    /// `--iptables-masquerade-bit`: the packet mark bit asking for SNAT.
    pub masquerade_bit: u8,
    /// `--iptables-localhost-nodeports`: node ports answer on 127.0.0.1
    /// (iptables mode; needs `route_localnet`).
    pub localhost_nodeports: bool,
    /// `--nodeport-addresses`: empty means every local address.
    pub nodeport_addresses: Vec<IpNet>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// Addresses of this node (for NodePort when `nodeport_addresses` is set,
    /// and for status). Discovered from the interfaces at start.
    pub node_ips: Vec<IpAddr>,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            cluster_cidrs: Vec::new(),
            detect_local: DetectLocalMode::ClusterCidr,
            masquerade_bit: 14,
            localhost_nodeports: true,
            nodeport_addresses: Vec::new(),
            masquerade_all: false,
            node_ips: Vec::new(),
        }
    }
}

impl DataplaneConfig {
    /// What counts as local traffic, given the Node's pod CIDRs (NodeCIDR mode).
    pub fn local_traffic(&self, node_pod_cidrs: &[IpNet]) -> LocalTraffic {
        let cidrs = match &self.detect_local {
            DetectLocalMode::ClusterCidr => &self.cluster_cidrs,
            DetectLocalMode::NodeCidr => node_pod_cidrs,
            DetectLocalMode::BridgeInterface(b) => return LocalTraffic::Bridge(b.clone()),
            DetectLocalMode::InterfaceNamePrefix(p) => {
                return LocalTraffic::InterfacePrefix(p.clone())
            }
        };
        if cidrs.is_empty() {
            LocalTraffic::Unknown
        } else {
            LocalTraffic::Cidrs(cidrs.to_vec())
        }
    }

    /// Node ports answer on 127.0.0.1: `--iptables-localhost-nodeports` and
    /// `--nodeport-addresses` admitting loopback (empty admits everything).
    pub fn serves_localhost_nodeports(&self) -> bool {
        self.localhost_nodeports
            && (self.nodeport_addresses.is_empty()
                || self
                    .nodeport_addresses
                    .iter()
                    .any(|n| n.contains(&IpAddr::from([127, 0, 0, 1]))))
    }

    /// The mark value of [`DataplaneConfig::masquerade_bit`], as iptables writes it.
    pub fn masquerade_mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }
}

/// What one sync did, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub full: bool,
    /// Chains (iptables) or map entries (ebpf) written.
    pub objects_written: usize,
    /// Chains or map entries deleted.
    pub objects_deleted: usize,
    /// Service ports that could not be programmed (e.g. a full BPF map);
    /// every other Service stays programmed.
    pub errors: Vec<ServiceError>,
    /// iptables: rules kproxy owns per table after the sync, and how many
    /// the sync wrote: (table, total, written).
    pub rules: Vec<(&'static str, usize, usize)>,
    /// The UDP conntrack reconcile this sync ran, if it ran.
    pub conntrack: Option<ConntrackReconcile>,
}

/// One pass over the conntrack table removing UDP flows whose backend left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConntrackReconcile {
    pub duration: std::time::Duration,
    /// Flows examined (UDP, this family).
    pub examined: usize,
    pub deleted: usize,
}

/// One Service port a sync could not program (entirely or some of its
/// frontends), and why. What it had programmed before stays in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub port: ServicePortName,
    /// `ns/name:port`.
    pub service: String,
    /// Metrics label, e.g. `map_full`.
    pub reason: String,
    pub message: String,
    /// The frontends that failed; `None`: all of the port's.
    pub frontends: Option<Vec<FrontendRef>>,
}

/// The kind of a frontend, as `kproxy status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }
}

/// One frontend of a Service port: what a client dials. The unit of
/// per-frontend status (`kproxy status`, `kproxy_frontends`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendRef {
    pub kind: FrontendKind,
    /// `None`: a node port, on every node-port address.
    pub ip: Option<Ipv4Addr>,
    pub port: u16,
}

impl FrontendRef {
    /// The IPv4 frontends of a Service port, in the order the dataplanes
    /// program them (IPv6 parts are rejected by the model, not programmed).
    pub fn of(sp: &ServicePort) -> Vec<FrontendRef> {
        let v4 = |ips: &[IpAddr], kind| {
            ips.iter()
                .filter_map(move |ip| match ip {
                    IpAddr::V4(ip) => Some(FrontendRef {
                        kind,
                        ip: Some(*ip),
                        port: sp.port,
                    }),
                    IpAddr::V6(_) => None,
                })
                .collect::<Vec<_>>()
        };
        let mut out = v4(&sp.cluster_ips, FrontendKind::ClusterIp);
        out.extend(v4(&sp.external_ips, FrontendKind::ExternalIp));
        out.extend(v4(&sp.load_balancer_ips, FrontendKind::LoadBalancer));
        if let Some(np) = sp.node_port {
            out.push(FrontendRef {
                kind: FrontendKind::NodePort,
                ip: None,
                port: np,
            });
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// `10.96.0.10:80/tcp`, or `*:30080/tcp` for a node port, as
    /// [`ProgrammedFrontend::frontend`] spells it.
    pub fn display(&self, protocol: Protocol) -> String {
        match self.ip {
            Some(ip) => format!("{ip}:{}/{}", self.port, protocol.as_str()),
            None => format!("*:{}/{}", self.port, protocol.as_str()),
        }
    }
}

/// One frontend as the kernel has it programmed, read back for `kproxy status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgrammedFrontend {
    /// `ns/name:port`.
    pub service: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP`, `LoadBalancer`.
    pub kind: String,
    /// `10.96.0.10:53/udp`, or `*:30080/tcp` for a node port on every local address.
    pub frontend: String,
    /// `10.244.1.5:8080`, in programmed order; empty when traffic is rejected.
    pub backends: Vec<String>,
}

impl DataplaneError {
    /// An `iptables-restore` that failed (kube-proxy counts these in
    /// `sync_proxy_rules_iptables_restore_failures_total`).
    pub fn is_restore_failure(&self) -> bool {
        matches!(self, DataplaneError::Command { tool, .. } if tool.contains("-restore"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{tool} failed: {message}")]
    Command { tool: String, message: String },
    #[error("kernel feature missing: {0}")]
    MissingFeature(String),
    #[error("{0}")]
    Other(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A dataplane: apply changes, full sync, clean up, report what is programmed.
pub trait Dataplane: Send {
    fn mode(&self) -> ProxyMode;

    /// Programs `desired`. `changes` holds the Service ports that differ
    /// from the last sync, old and new; with `full` the dataplane rewrites
    /// everything and repairs drift. The sync loop decides when a sync is
    /// full (the first one, the periodic resync, the one after an error).
    fn sync(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        full: bool,
    ) -> Result<SyncStats, DataplaneError>;

    /// [`Dataplane::sync`], also writing again `retry`: ports a earlier
    /// sync reported in [`SyncStats::errors`], whose retry the sync loop
    /// decided (backoff). A dataplane that only fails whole syncs (iptables:
    /// one restore) has nothing to retry: after a failed sync the loop
    /// makes the next one full.
    fn sync_retrying(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        retry: &[ServicePortName],
        full: bool,
    ) -> Result<SyncStats, DataplaneError> {
        let _ = retry;
        self.sync(desired, changes, full)
    }

    /// Removes everything this dataplane ever programmed.
    fn cleanup(&mut self) -> Result<(), DataplaneError>;

    /// Whether what it programmed was removed behind its back (iptables: a
    /// firewall reload flushed the tables), so the next sync must be full.
    fn drifted(&mut self) -> bool {
        false
    }

    /// What the kernel has programmed now, read back from it.
    fn programmed(&self) -> Result<Vec<ProgrammedFrontend>, DataplaneError>;

    /// Node-wide state read back from the kernel that `kproxy status` shows
    /// under the table, one line each (ebpf mode: the devices counted as
    /// local by the interface detect-local modes).
    fn node_notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// Metrics of the dataplane's own (registered by `kproxy run`).
    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        Vec::new()
    }
}
