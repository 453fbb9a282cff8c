//! eBPF mode: the same desired state programmed into BPF maps read by
//! kproxy's programs (proxy-ebpf): socket load balancing on a cgroup and a
//! TC packet path on the node's devices. No iptables rule for Service traffic.
//!
//! - `checks`: start-up checks (BTF, bpffs, cgroup2, TCX) and defaults for
//!   `--cgroup-root` and `--devices`.
//! - `loader`: load, attach, pin, adopt, clean up.
//! - `plan`: one Service port to map entries (pure).
//! - `writer`: map updates in an order that keeps lookups atomic.
//! - `local_ifs`: the pods' devices for the interface detect-local modes,
//!   followed through rtnetlink link events.
//! - `tables`: the maps under the writer (kernel, batched; in-memory fake).
//! - `readback`: the service table as the kernel holds it (`kproxy status`).
//! - `render`: the entries a desired state produces (`kproxy render`).
//!
//! Known differences from iptables mode: a flow SNATed to a backend on
//! *this* node needs the pod's device among `--devices` (the default takes
//! every device, and follows devices added or removed later, at each sync);
//! sessionAffinity from this node's sockets is keyed by network namespace,
//! not source address; SCTP is only balanced by the socket hooks; IPv4 only.

mod batch;
mod cgroupns;
pub mod checks;
pub mod conntrack;
pub mod ct_worker;
pub mod layout;
pub mod loader;
pub mod local_ifs;
mod maps;
pub mod owner;
pub mod plan;
pub mod readback;
pub mod render;
mod staged;
pub mod tables;
pub mod writer;

#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod kernel_tests;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod writer_tests;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use proxy_common::maps as names;
use tracing::{info, warn};

use super::{Dataplane, DataplaneConfig, DataplaneError, ProgrammedFrontend, ProxyMode, SyncStats};
use crate::model::{ChangeSet, DesiredState, ServicePortName};
use writer::{NodeSettings, PortError, Writer};

/// Entries per map. Defaults hold 10,000 Services (about 20,000
/// frontends, 100,000 endpoints counted once per distinct backend set)
/// with room to spare; see docs for the memory they lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// FRONTENDS and SVC_INFO (and SRC_RANGES).
    pub lb: u32,
    /// SLOTS and BACKENDS.
    pub backend: u32,
    /// Assured flows (CT, SOCK_REV); the other conntrack maps are sized
    /// from it (see [`MapSizes::by_map`]).
    pub ct: u32,
    /// AFFINITY.
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            lb: 65_536,
            backend: 262_144,
            ct: 262_144,
            affinity: 65_536,
        }
    }
}

impl MapSizes {
    pub fn by_map(&self) -> Vec<(&'static str, u32)> {
        vec![
            (names::FRONTENDS, self.lb),
            (names::SVC_INFO, self.lb),
            (names::SRC_RANGES, self.lb),
            (names::SLOTS, self.backend),
            (names::BACKENDS, self.backend),
            (names::CT, self.ct),
            // New flows churn here; a quarter of the assured tier holds
            // the embryonic ones of a busy node (they last a round trip).
            (names::CT_NEW, (self.ct / 4).max(1024)),
            // Up to two NAT keys per flow (SNAT flows have two).
            (names::NAT, self.ct.saturating_mul(2)),
            (names::NAT_NEW, (self.ct / 2).max(2048)),
            (names::DIRECT, (self.ct / 4).max(1024)),
            // A minute of connections that backends close first (HTTP/1.0
            // style): 131,072 by default, over 2,000 such connections a second.
            (names::TIME_WAIT, (self.ct / 2).max(1024)),
            (names::FRAGS, 8192),
            (names::SOCK_REV, self.ct),
            (names::AFFINITY, self.affinity),
        ]
    }
}

/// Settings of ebpf mode (from the command line).
#[derive(Debug, Clone)]
pub struct EbpfConfig {
    /// bpffs directory of this instance's pinned maps and links.
    pub pin_path: PathBuf,
    /// cgroup v2 directory for the socket hooks; `None`: the cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    /// Devices for the TC programs; empty: every device but lo.
    pub devices: Vec<String>,
    pub map_sizes: MapSizes,
    /// NAT source ports (`--bpf-nat-port-range`); `None`: above the node's
    /// ephemeral ports.
    pub nat_ports: Option<(u16, u16)>,
    /// Conntrack timeouts and the garbage collector's pace.
    pub gc: ct_worker::GcConfig,
}

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/kproxy";

/// The eBPF dataplane. [`EbpfDataplane::open`] touches nothing (for
/// `status` and `cleanup`); [`EbpfDataplane::start`] checks the kernel,
/// loads, attaches or adopts.
pub struct EbpfDataplane {
    config: DataplaneConfig,
    ebpf: EbpfConfig,
    writer: Option<Writer>,
    node: NodeSettings,
    /// The loaded programs, kept to attach them to devices that appear later.
    programs: Option<aya::Ebpf>,
    /// Devices the TC programs are attached to.
    devices: Vec<checks::Device>,
    /// The conntrack garbage collector (stopped on drop).
    gc: Option<ct_worker::GcHandle>,
    /// Follows the pods' devices (interface detect-local modes; stopped on drop).
    local_ifs: Option<local_ifs::LocalIfs>,
    /// The network namespace `start` ran in (its inode): devices are only
    /// followed from there, never from a thread that is elsewhere.
    netns: Option<u64>,
    /// `config` with `cluster_cidrs` replaced by the CIDRs whose sources are
    /// local (`--detect-local-mode`: the cluster CIDRs, or the Node's pod
    /// CIDRs; none in the interface modes), as the maps have them.
    effective: DataplaneConfig,
}

/// The inode of the calling thread's network namespace.
fn current_netns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

impl EbpfDataplane {
    pub fn open(config: DataplaneConfig, ebpf: EbpfConfig) -> EbpfDataplane {
        EbpfDataplane {
            effective: config_for_local(&config, &[]),
            config,
            ebpf,
            writer: None,
            node: NodeSettings::default(),
            programs: None,
            devices: Vec::new(),
            gc: None,
            local_ifs: None,
            netns: None,
        }
    }

    /// Checks the kernel, loads the programs (reusing pinned maps), attaches
    /// them (replacing pinned links) and programs the node settings.
    pub fn start(config: DataplaneConfig, ebpf: EbpfConfig) -> Result<Self, DataplaneError> {
        checks::check_btf()?;
        checks::check_bpffs(&ebpf.pin_path)?;
        let cgroup = match &ebpf.cgroup_root {
            Some(c) => c.clone(),
            None => checks::detect_cgroup2().ok_or_else(|| {
                DataplaneError::MissingFeature(
                    "cgroup2: no cgroup2 mount in /proc/mounts; mount one (`mount -t cgroup2 none /sys/fs/cgroup`) or pass --cgroup-root".into(),
                )
            })?,
        };
        checks::check_cgroup(&cgroup)?;
        cgroupns::check_host_cgroup(&cgroup)?;
        checks::check_tcx()?;
        let devices = checks::resolve_devices(&ebpf.devices)?;
        let stamp = layout::stamp_of(loader::object())?;
        let take_over = match layout::inspect(&ebpf.pin_path, stamp)? {
            layout::Pinned::Other(pinned) => {
                warn!(
                    pin = %ebpf.pin_path.display(),
                    pinned_layout = %pinned.map_or("none (a kproxy before layout stamps)".into(), |p| format!("{p:016x}")),
                    layout = %format!("{stamp:016x}"),
                    "the pinned maps have another layout (another kproxy version): replacing them and their programs with fresh ones; conntrack, NAT and affinity state starts empty"
                );
                layout::retire(&ebpf.pin_path)?;
                true
            }
            layout::Pinned::Same | layout::Pinned::Nothing => false,
        };
        let adopting = layout::inspect(&ebpf.pin_path, stamp)? == layout::Pinned::Same;
        let mut obj = loader::load(&ebpf.pin_path, &ebpf.map_sizes)?;
        layout::write(&ebpf.pin_path, stamp)?;
        loader::attach_cgroup(&mut obj, &ebpf.pin_path, &cgroup)?;
        loader::attach_tc(&mut obj, &ebpf.pin_path, &devices)?;
        // The old programs are gone (their links now run ours): drop the
        // old maps' pins. Also the leftovers of an interrupted take-over.
        layout::remove_retired(&ebpf.pin_path)?;
        let nodeport_ips = config
            .node_ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) if !v4.is_loopback() => Some(*v4),
                _ => None,
            })
            .filter(|ip| {
                config.nodeport_addresses.is_empty()
                    || config
                        .nodeport_addresses
                        .iter()
                        .any(|n| n.contains(&IpAddr::V4(*ip)))
            })
            .collect();
        let node_ip = config.node_ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) if !v4.is_loopback() => Some(*v4),
            _ => None,
        });
        // Localhost node ports: the sockets of this (the node's) network
        // namespace reach node ports on 127.0.0.1, no one else's.
        let localhost_netns = if config.serves_localhost_nodeports() {
            checks::netns_cookie().unwrap_or_else(|e| {
                warn!(error = %e, "localhost node ports are off: no network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14)");
                0
            })
        } else {
            0
        };
        let node = NodeSettings {
            node_ip,
            nodeport_ips,
            if_addrs: if_addrs(&devices),
            snat_ports: match ebpf.nat_ports {
                Some((lo, hi)) => (lo, hi, None),
                None => checks::snat_port_range(),
            },
            localhost_netns,
        };
        let mut writer = Writer::open(&ebpf.pin_path)?;
        writer.sync_node(&node, &config_for_local(&config, &[]))?;
        let local_ifs = local_ifs::LocalIfs::start(&ebpf.pin_path, &config.detect_local)?;
        let gc = ct_worker::spawn(&ebpf.pin_path, ebpf.gc)?;
        info!(
            pin = %ebpf.pin_path.display(),
            adopted = adopting,
            replaced_other_layout = take_over,
            snat_ports = ?node.snat_ports,
            "ebpf dataplane ready"
        );
        Ok(EbpfDataplane {
            effective: config_for_local(&config, &[]),
            config,
            ebpf,
            writer: Some(writer),
            node,
            programs: Some(obj),
            devices,
            gc: Some(gc),
            local_ifs,
            netns: current_netns(),
        })
    }

    /// Without `--devices`, every device is hooked, including pod devices
    /// created after start: attach to new ones, release removed ones. Done
    /// at each sync (a new pod's device exists before its endpoint is
    /// synced); listing devices costs two cheap calls.
    fn follow_devices(&mut self) -> Result<(), DataplaneError> {
        if !self.ebpf.devices.is_empty() {
            return Ok(());
        }
        if self.netns.is_none() || current_netns() != self.netns {
            return Ok(());
        }
        let Some(obj) = self.programs.as_mut() else {
            return Ok(());
        };
        let now = checks::resolve_devices(&[])?;
        if now == self.devices {
            return Ok(());
        }
        loader::attach_tc(obj, &self.ebpf.pin_path, &now)?;
        self.node.if_addrs = if_addrs(&now);
        if let Some(writer) = self.writer.as_mut() {
            writer.sync_node(&self.node, &self.effective)?;
        }
        self.devices = now;
        Ok(())
    }

    pub fn pin_path(&self) -> &Path {
        &self.ebpf.pin_path
    }
}

/// `config` with `cluster_cidrs` set to the local-source CIDRs the maps and
/// frontend flags use (`--detect-local-mode ClusterCIDR` or `NodeCIDR`;
/// the interface modes use `LOCAL_IFS` instead, see [`local_ifs`]).
fn config_for_local(config: &DataplaneConfig, node_pod_cidrs: &[ipnet::IpNet]) -> DataplaneConfig {
    let cluster_cidrs = match config.local_traffic(node_pod_cidrs) {
        super::LocalTraffic::Cidrs(c) => c,
        _ => Vec::new(),
    };
    DataplaneConfig {
        cluster_cidrs,
        ..config.clone()
    }
}

fn if_addrs(devices: &[checks::Device]) -> Vec<(u32, std::net::Ipv4Addr)> {
    devices
        .iter()
        .filter_map(|d| d.ipv4.map(|ip| (d.ifindex, ip)))
        .collect()
}

pub(crate) fn to_stats(full: bool, c: writer::Counts, errors: Vec<PortError>) -> SyncStats {
    SyncStats {
        full,
        objects_written: c.written,
        objects_deleted: c.deleted,
        errors: errors
            .into_iter()
            .map(|e| super::ServiceError {
                port: e.port,
                service: e.service,
                reason: e.reason.to_string(),
                message: e.message,
                frontends: e.frontends,
            })
            .collect(),
        ..SyncStats::default()
    }
}

impl Dataplane for EbpfDataplane {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Ebpf
    }

    fn sync(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        full: bool,
    ) -> Result<SyncStats, DataplaneError> {
        self.sync_retrying(desired, changes, &[], full)
    }

    fn sync_retrying(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        retry: &[ServicePortName],
        full: bool,
    ) -> Result<SyncStats, DataplaneError> {
        let mut full = full;
        // Local sources decide SNAT of ClusterIP traffic: a change (the
        // Node's pod CIDRs in NodeCIDR mode) rewrites every frontend.
        let effective = config_for_local(&self.config, &desired.node.pod_cidrs);
        if effective.cluster_cidrs != self.effective.cluster_cidrs {
            full = true;
        }
        self.effective = effective;
        // A device problem must not hold back the Services: retried next sync.
        if let Err(e) = self.follow_devices() {
            warn!(error = %e, "following devices; TC programs stay on the devices they had");
        }
        let Some(writer) = self.writer.as_mut() else {
            return Err(DataplaneError::Other(
                "ebpf dataplane opened without start()".into(),
            ));
        };
        if full {
            writer.sync_node(&self.node, &self.effective)?;
        }
        match writer.sync(desired, changes, retry, full, &self.effective) {
            Ok((counts, errors)) => {
                if full || !changes.is_empty() || !retry.is_empty() {
                    // UDP flows to backends that left go now, as kube-proxy
                    // clears their conntrack entries.
                    if let Some(gc) = &self.gc {
                        gc.backends_changed();
                    }
                }
                Ok(to_stats(full, counts, errors))
            }
            // The sync loop makes the next sync full (the writer re-reads the maps).
            Err(e) => Err(e),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        self.gc
            .as_ref()
            .map(|gc| gc.metrics.collectors())
            .unwrap_or_default()
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.gc = None;
        self.local_ifs = None;
        self.writer = None;
        self.programs = None;
        layout::remove_retired(&self.ebpf.pin_path)?;
        loader::cleanup(&self.ebpf.pin_path)
    }

    fn programmed(&self) -> Result<Vec<ProgrammedFrontend>, DataplaneError> {
        readback::programmed(&self.ebpf.pin_path)
    }

    fn node_notes(&self) -> Vec<String> {
        match local_ifs::pinned(&self.ebpf.pin_path) {
            Ok(set) if !set.is_empty() => vec![local_ifs::status_line(&set)],
            _ => Vec::new(),
        }
    }
}
