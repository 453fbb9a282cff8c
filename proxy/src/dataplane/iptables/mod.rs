//! iptables mode: kube-proxy's chain design under the `KPROXY-` prefix,
//! applied with one `iptables-restore --noflush` per sync.
//!
//! - `render` turns a desired state into restore input (pure, snapshot
//!   tested under `testdata/`; `UPDATE_GOLDEN=1` regenerates).
//! - `exec` runs the save/restore tools and detects the backend.
//! - `readback` parses save output for `status`, cleanup and drift repair.
//! - `conntrack` clears stale UDP flows whose backend left (netlink).
//!
//! Chains (hash = 16 base32 chars of sha256 of the Service port name and
//! protocol, plus the endpoint for SEP):
//!
//! ```text
//! nat    PREROUTING, OUTPUT -> KPROXY-SERVICES   ClusterIP -> SVC, externalIP/LB -> EXT
//!                                                (LB with source ranges -> FW -> EXT),
//!                                                last: local addresses -> KPROXY-NODEPORTS -> EXT
//!        KPROXY-SVC-h  cluster_endpoints (masquerade ! --cluster-cidr, affinity, statistic)
//!        KPROXY-EXT-h  Cluster: mark masq, -> SVC (or SVL when the endpoint sets differ)
//!                      Local: pods -> SVC, node-local sources masq + SVC, rest -> SVL
//!        KPROXY-SVL-h  external_endpoints when they differ from cluster_endpoints
//!        KPROXY-SEP-h  hairpin masq, DNAT to the endpoint
//!        POSTROUTING -> KPROXY-POSTROUTING  MASQUERADE --random-fully for mark 0x4000
//! filter INPUT/FORWARD/OUTPUT (ctstate NEW) -> KPROXY-FIREWALL (LB source ranges: DROP),
//!        KPROXY-SERVICES (ClusterIP without endpoints: REJECT),
//!        KPROXY-EXTERNAL-SERVICES (external frontends without endpoints:
//!        REJECT, or DROP for policy Local); FORWARD -> KPROXY-FORWARD
//!        (drop INVALID, accept marked and established traffic).
//! ```
//!
//! Assumptions about the namespace kproxy runs in: forwarding
//! (`net.ipv4.ip_forward`) is the CNI's job; node ports are served on
//! 127.0.0.1 with `--iptables-localhost-nodeports` (default, as kube-proxy:
//! `kproxy run` sets `route_localnet`, and KPROXY-FIREWALL drops martians
//! that were not translated); IPv4 only (IPv6 addresses in the desired state
//! are skipped); stale UDP flows are cleared through ctnetlink.

pub mod conntrack;
mod exec;
pub mod kube_proxy;
mod names;
mod readback;
mod render;

#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod kernel_tests;

use std::collections::HashMap;

use tracing::{debug, info, warn};

pub use exec::Backend;
pub use render::render_full;

use super::{Dataplane, DataplaneConfig, DataplaneError, ProgrammedFrontend, ProxyMode, SyncStats};
use crate::model::{ChangeSet, DesiredState};
use render::{JumpRule, Mode, Ports, JUMP_RULES};

/// The iptables dataplane.
pub struct IptablesDataplane {
    config: DataplaneConfig,
    backend: Backend,
    /// Chains written per Service port by the last successful sync.
    ports: Ports,
    /// Clears UDP conntrack entries whose backend left.
    udp: conntrack::UdpReconciler,
    /// The canary chain was created (after the first full sync).
    canary: bool,
}

/// An empty chain in the small mangle table, as kube-proxy's
/// `KUBE-PROXY-CANARY`: a firewall reload that flushes the tables removes
/// it too, and checking it costs a save of mangle, not of nat (a full
/// fetch of 300,000 rules at 10,000 Services in legacy mode).
const CANARY: &str = "KPROXY-CANARY";

impl IptablesDataplane {
    /// Resolves the backend (see [`Backend::resolve`]) and checks that its
    /// tools run. Does not touch the ruleset.
    pub fn new(config: DataplaneConfig, backend: Backend) -> Result<Self, DataplaneError> {
        let backend = backend.resolve()?;
        // Fail early with a clear error when the tools are missing.
        exec::save(backend, "filter")?;
        info!(backend = backend.name(), "iptables backend chosen");
        Ok(IptablesDataplane {
            config,
            backend,
            ports: HashMap::new(),
            udp: conntrack::UdpReconciler::default(),
            canary: false,
        })
    }

    /// `nft` or `legacy`.
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    fn sync_inner(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        full: bool,
    ) -> Result<SyncStats, DataplaneError> {
        let rendered = if full {
            let nat = readback::Table::parse(&exec::save(self.backend, "nat")?);
            let filter = readback::Table::parse(&exec::save(self.backend, "filter")?);
            let missing: Vec<JumpRule> = JUMP_RULES
                .iter()
                .filter(|j| {
                    let t = if j.table == "nat" { &nat } else { &filter };
                    !t.jump_lines.iter().any(|l| {
                        l.starts_with(&format!("-A {} ", j.chain))
                            && l.ends_with(&format!("-j {}", j.target))
                    })
                })
                .copied()
                .collect();
            render::render(
                desired,
                &self.config,
                Mode::Full {
                    stale_nat: &nat.our_chains(),
                    stale_filter: &filter.our_chains(),
                    missing_jumps: &missing,
                },
            )
        } else {
            render::render(
                desired,
                &self.config,
                Mode::Partial {
                    previous: &self.ports,
                    changes,
                },
            )
        };
        debug!(
            bytes = rendered.payload.len(),
            full, "applying iptables-restore payload"
        );
        exec::restore(self.backend, &rendered.payload)?;
        self.ports = rendered.ports;
        if full {
            match exec::restore(
                self.backend,
                &format!("*mangle\n:{CANARY} - [0:0]\nCOMMIT\n"),
            ) {
                Ok(()) => self.canary = true,
                Err(e) => {
                    warn!(error = %e, "cannot create the canary chain {CANARY} in mangle: a firewall reload is repaired only by the hourly full sync")
                }
            }
        }
        let conntrack = self.udp.after_sync(desired, changes, &self.config, full);
        Ok(SyncStats {
            full,
            objects_written: rendered.chains_written,
            objects_deleted: rendered.chains_deleted,
            rules: rendered.rules.to_vec(),
            conntrack,
            ..SyncStats::default()
        })
    }
}

impl Dataplane for IptablesDataplane {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Iptables
    }

    fn sync(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        full: bool,
    ) -> Result<SyncStats, DataplaneError> {
        // After an error the kernel may differ from what we remember: the
        // sync loop makes the next sync full.
        self.sync_inner(desired, changes, full)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        // Clean both backends: an earlier run may have used the other one.
        let mut result = Ok(());
        for backend in [self.backend, other(self.backend)] {
            match cleanup_backend(backend) {
                Ok(()) => {}
                Err(e) if backend == self.backend => result = Err(e),
                Err(e) => {
                    debug!(backend = backend.name(), error = %e, "cleanup of other backend skipped")
                }
            }
        }
        self.ports.clear();
        self.udp = conntrack::UdpReconciler::default();
        result
    }

    fn drifted(&mut self) -> bool {
        if !self.canary {
            return false;
        }
        match exec::save(self.backend, "mangle") {
            Ok(mangle) => {
                let gone = !readback::Table::parse(&mangle)
                    .chains
                    .iter()
                    .any(|c| c == CANARY);
                if gone {
                    self.canary = false;
                }
                gone
            }
            Err(e) => {
                warn!(error = %e, "cannot check the canary chain {CANARY}");
                false
            }
        }
    }

    fn programmed(&self) -> Result<Vec<ProgrammedFrontend>, DataplaneError> {
        let nat = exec::save(self.backend, "nat")?;
        let filter = exec::save(self.backend, "filter")?;
        Ok(readback::programmed(&nat, &filter))
    }
}

fn other(b: Backend) -> Backend {
    match b {
        Backend::Legacy => Backend::Nft,
        _ => Backend::Legacy,
    }
}

/// Removes our jump rules and every KPROXY-* chain of one backend, in one restore.
fn cleanup_backend(backend: Backend) -> Result<(), DataplaneError> {
    let mut payload = String::new();
    let mut anything = false;
    for table in ["nat", "filter", "mangle"] {
        let saved = match exec::save(backend, table) {
            Ok(saved) => saved,
            // Only the canary lives there; a node without the table has none.
            Err(e) if table == "mangle" => {
                debug!(backend = backend.name(), error = %e, "mangle table not read");
                continue;
            }
            Err(e) => return Err(e),
        };
        let t = readback::Table::parse(&saved);
        let chains = t.our_chains();
        if chains.is_empty() && t.jump_lines.is_empty() {
            continue;
        }
        anything = true;
        payload.push_str(&format!("*{table}\n"));
        for c in &chains {
            payload.push_str(&format!(":{c} - [0:0]\n"));
        }
        for l in &t.jump_lines {
            payload.push_str("-D");
            payload.push_str(&l[2..]);
            payload.push('\n');
        }
        for c in &chains {
            payload.push_str(&format!("-X {c}\n"));
        }
        payload.push_str("COMMIT\n");
    }
    if anything {
        exec::restore(backend, &payload)?;
        info!(backend = backend.name(), "removed kproxy iptables rules");
    }
    Ok(())
}
