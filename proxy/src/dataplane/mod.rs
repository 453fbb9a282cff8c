//! Dataplanes program a [`DesiredState`] into the kernel. Each is a small
//! adapter behind the [`Dataplane`] trait; the sync loop drives it.

pub mod ebpf;
pub mod iptables;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::{Changes, DesiredState};

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

/// Node-level settings every dataplane needs, from the command line.
#[derive(Debug, Clone, Default)]
pub struct DataplaneConfig {
    /// `--cluster-cidr`: traffic from outside it to a ClusterIP is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses`: empty means every local address.
    pub nodeport_addresses: Vec<IpNet>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// Addresses of this node (for NodePort when `nodeport_addresses` is set,
    /// and for status). Discovered from the interfaces at start.
    pub node_ips: Vec<IpAddr>,
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
}

/// One Service port a sync could not program, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    /// `ns/name:port`.
    pub service: String,
    /// Metrics label, e.g. `map_full`.
    pub reason: String,
    pub message: String,
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

    /// Programs `desired`. `changes` lists the Service ports that differ from
    /// the last successful sync; with `full` the dataplane rewrites everything
    /// (first sync, periodic resync, after an error) and repairs drift.
    fn sync(
        &mut self,
        desired: &DesiredState,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncStats, DataplaneError>;

    /// Removes everything this dataplane ever programmed.
    fn cleanup(&mut self) -> Result<(), DataplaneError>;

    /// What the kernel has programmed now, read back from it.
    fn programmed(&self) -> Result<Vec<ProgrammedFrontend>, DataplaneError>;
}
