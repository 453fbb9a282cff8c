//! Pure rendering of a [`DesiredState`] into `iptables-restore --noflush`
//! input. No I/O: the caller supplies what it knows about the kernel (stale
//! chains, missing jump rules) and what it wrote last time.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::names::*;
use crate::dataplane::{DataplaneConfig, LocalTraffic};
use crate::model::{
    ChangeSet, DesiredState, Endpoint, ServicePort, ServicePortName, TrafficPolicy,
};

/// A rule kproxy keeps in a built-in chain, jumping to one of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpRule {
    pub table: &'static str,
    pub chain: &'static str,
    /// Matches between the chain and `-j`.
    pub spec: &'static str,
    pub target: &'static str,
}

/// Every jump rule, in the order they should appear in each built-in chain.
pub const JUMP_RULES: &[JumpRule] = &[
    JumpRule { table: "nat", chain: "PREROUTING", spec: "-m comment --comment \"kproxy service portals\"", target: SERVICES },
    JumpRule { table: "nat", chain: "OUTPUT", spec: "-m comment --comment \"kproxy service portals\"", target: SERVICES },
    JumpRule { table: "nat", chain: "POSTROUTING", spec: "-m comment --comment \"kproxy postrouting rules\"", target: POSTROUTING },
    JumpRule { table: "filter", chain: "INPUT", spec: "-m conntrack --ctstate NEW -m comment --comment \"kproxy load balancer firewall\"", target: FIREWALL },
    JumpRule { table: "filter", chain: "INPUT", spec: "-m conntrack --ctstate NEW -m comment --comment \"kproxy externally-visible service portals\"", target: EXTERNAL_SERVICES },
    JumpRule { table: "filter", chain: "FORWARD", spec: "-m conntrack --ctstate NEW -m comment --comment \"kproxy load balancer firewall\"", target: FIREWALL },
    JumpRule { table: "filter", chain: "FORWARD", spec: "-m conntrack --ctstate NEW -m comment --comment \"kproxy service portals\"", target: SERVICES },
    JumpRule { table: "filter", chain: "FORWARD", spec: "-m conntrack --ctstate NEW -m comment --comment \"kproxy externally-visible service portals\"", target: EXTERNAL_SERVICES },
    JumpRule { table: "filter", chain: "FORWARD", spec: "-m comment --comment \"kproxy forwarding rules\"", target: FORWARD },
    JumpRule { table: "filter", chain: "OUTPUT", spec: "-m conntrack --ctstate NEW -m comment --comment \"kproxy load balancer firewall\"", target: FIREWALL },
    JumpRule { table: "filter", chain: "OUTPUT", spec: "-m conntrack --ctstate NEW -m comment --comment \"kproxy service portals\"", target: SERVICES },
    JumpRule { table: "filter", chain: "OUTPUT", spec: "-m conntrack --ctstate NEW -m comment --comment \"kproxy externally-visible service portals\"", target: EXTERNAL_SERVICES },
];

/// Fixed chains per table (always rewritten whole).
pub const NAT_FIXED: &[&str] = &[SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ];
pub const FILTER_FIXED: &[&str] = &[SERVICES, EXTERNAL_SERVICES, FORWARD, FIREWALL];

/// What one sync rendered for one Service port: its own chains and a hash
/// of their content, so the next partial sync can skip writing them when
/// unchanged, and its rules in the fixed chains, which a partial sync that
/// the port is not part of reuses as they are instead of rendering the port
/// again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortChains {
    pub hash: u64,
    pub chains: Vec<String>,
    /// Rules in the fixed chains, in [`Out::fixed`] order.
    fixed: [String; 5],
    /// Rules in the port's own chains.
    own_rules: usize,
    /// The node-wide inputs they were rendered with ([`ctx_key`]).
    ctx: u64,
}

/// Per Service port, what the last sync rendered.
pub type Ports = HashMap<ServicePortName, Arc<PortChains>>;

/// Which chains to write.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// Everything. `stale_nat`/`stale_filter` are KPROXY-* chains found in the
    /// kernel; those the new ruleset does not use are deleted.
    Full {
        stale_nat: &'a [String],
        stale_filter: &'a [String],
        missing_jumps: &'a [JumpRule],
    },
    /// Fixed chains plus the chains of the Service ports in `changes`
    /// whose content differs from `previous`. Only those ports are
    /// rendered: the others' rules in the fixed chains come from `previous`.
    Partial {
        previous: &'a Ports,
        changes: &'a ChangeSet,
    },
}

/// The restore payload and the bookkeeping for the next sync.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub payload: String,
    /// Rules kproxy owns after this payload, per table (`nat`, `filter`):
    /// (total, written by this payload).
    pub rules: [(&'static str, usize, usize); 2],
    pub ports: Ports,
    pub chains_written: usize,
    pub chains_deleted: usize,
}

/// The full payload for a clean namespace (all jump rules inserted). Used by
/// `kproxy render` and the benchmarks.
pub fn render_full(desired: &DesiredState, config: &DataplaneConfig) -> String {
    render(
        desired,
        config,
        Mode::Full {
            stale_nat: &[],
            stale_filter: &[],
            missing_jumps: JUMP_RULES,
        },
    )
    .payload
}

/// How traffic to a ClusterIP from outside the pod network gets masqueraded.
enum Masq {
    None,
    All,
    /// Everything not matching this (`! -s CIDR`, `! -i br0`, `! -i veth+`).
    NotLocal(String),
    /// Several local CIDRs: through KPROXY-MASQ-NONCLUSTER, which returns
    /// for each of them.
    Chain,
}

/// iptables matches for traffic from this node's pods, per `--detect-local-mode`.
fn local_matches(local: &LocalTraffic) -> Vec<String> {
    match local {
        LocalTraffic::Unknown => Vec::new(),
        LocalTraffic::Cidrs(cidrs) => cidrs
            .iter()
            .filter(|c| matches!(c, IpNet::V4(_)))
            .map(|c| format!("-s {c}"))
            .collect(),
        LocalTraffic::Bridge(b) => vec![format!("-i {b}")],
        LocalTraffic::InterfacePrefix(p) => vec![format!("-i {p}+")],
    }
}

/// Per-table output buffers; assembled at the end.
struct Out {
    nat_decls: String,
    nat_services: String,
    nat_nodeports: String,
    nat_ports: String,
    filter_services: String,
    filter_external: String,
    filter_firewall: String,
}

impl Out {
    /// The fixed chains' text, in the order [`PortChains::fixed`] keeps.
    fn fixed(&mut self) -> [&mut String; 5] {
        [
            &mut self.nat_services,
            &mut self.nat_nodeports,
            &mut self.filter_services,
            &mut self.filter_external,
            &mut self.filter_firewall,
        ]
    }

    fn fixed_lens(&mut self) -> [usize; 5] {
        self.fixed().map(|s| s.len())
    }

    /// What was added to the fixed chains since `lens`.
    fn fixed_since(&mut self, lens: [usize; 5]) -> [String; 5] {
        let fixed = self.fixed();
        std::array::from_fn(|i| fixed[i][lens[i]..].to_string())
    }

    fn push_fixed(&mut self, text: &[String; 5]) {
        for (s, t) in self.fixed().into_iter().zip(text) {
            s.push_str(t);
        }
    }
}

/// A fingerprint of the node-wide inputs of a port's rules: a change of
/// them makes a partial sync render every port again.
fn ctx_key(masquerade_all: bool, local: &[String], nodeport_dsts: &[String]) -> u64 {
    let mut h = DefaultHasher::new();
    masquerade_all.hash(&mut h);
    local.hash(&mut h);
    nodeport_dsts.hash(&mut h);
    h.finish()
}

pub fn render(desired: &DesiredState, config: &DataplaneConfig, mode: Mode<'_>) -> Rendered {
    let n = desired.services.len();
    // Rough sizes: a few hundred bytes per port plus ~150 per endpoint.
    let eps: usize = desired
        .services
        .values()
        .map(|sp| sp.cluster_endpoints.len())
        .sum();
    let mut out = Out {
        nat_decls: String::with_capacity(n * 120 + eps * 40),
        nat_services: String::with_capacity(n * 150),
        nat_nodeports: String::new(),
        nat_ports: String::with_capacity(n * 250 + eps * 200),
        filter_services: String::new(),
        filter_external: String::new(),
        filter_firewall: String::new(),
    };
    let local = local_matches(&config.local_traffic(&desired.node.pod_cidrs));
    let masq = if config.masquerade_all {
        Masq::All
    } else {
        match local.as_slice() {
            [] => Masq::None,
            [one] => Masq::NotLocal(negate(one)),
            _ => Masq::Chain,
        }
    };
    let nodeport_dsts = nodeport_destinations(config);
    let ctx = Ctx {
        masq: &masq,
        local: &local,
        nodeport_dsts: &nodeport_dsts,
    };

    let changed: HashSet<&ServicePortName> = match mode {
        Mode::Partial { changes, .. } => changes.iter().map(|(name, _)| name).collect(),
        Mode::Full { .. } => HashSet::new(),
    };

    let ctx_key = ctx_key(config.masquerade_all, &local, &nodeport_dsts);
    let mut ports = HashMap::with_capacity(n);
    let mut chains_written = NAT_FIXED.len() + FILTER_FIXED.len();
    // Rules of port chains not written (unchanged in a partial sync).
    let mut unwritten_rules = 0;
    let mut scratch = String::with_capacity(4096);
    let mut chains: Vec<String> = Vec::new();
    for sp in desired.services.values() {
        if let Mode::Partial { previous, .. } = mode {
            let unchanged = previous
                .get(&sp.name)
                .filter(|p| p.ctx == ctx_key && !changed.contains(&sp.name));
            if let Some(p) = unchanged {
                out.push_fixed(&p.fixed);
                unwritten_rules += p.own_rules;
                ports.insert(sp.name.clone(), p.clone());
                continue;
            }
        }
        scratch.clear();
        chains.clear();
        let lens = out.fixed_lens();
        render_port(sp, &ctx, &mut out, &mut scratch, &mut chains);
        let fixed = out.fixed_since(lens);
        let mut hasher = DefaultHasher::new();
        scratch.hash(&mut hasher);
        chains.hash(&mut hasher);
        let hash = hasher.finish();
        let write = match mode {
            Mode::Full { .. } => true,
            Mode::Partial { previous, .. } => {
                changed.contains(&sp.name) || previous.get(&sp.name).map(|p| p.hash) != Some(hash)
            }
        };
        let own_rules = scratch.lines().count();
        if write {
            for c in &chains {
                let _ = writeln!(out.nat_decls, ":{c} - [0:0]");
            }
            out.nat_ports.push_str(&scratch);
            chains_written += chains.len();
        } else {
            unwritten_rules += own_rules;
        }
        ports.insert(
            sp.name.clone(),
            Arc::new(PortChains {
                hash,
                chains: chains.clone(),
                fixed,
                own_rules,
                ctx: ctx_key,
            }),
        );
    }

    // Chains to delete: anything we wrote before or found in the kernel that
    // the new ruleset does not contain.
    let mut delete_nat: Vec<String> = Vec::new();
    let mut delete_filter: Vec<String> = Vec::new();
    match mode {
        Mode::Full {
            stale_nat,
            stale_filter,
            ..
        } => {
            let mut live: HashSet<&str> = ports
                .values()
                .flat_map(|p| p.chains.iter().map(String::as_str))
                .collect();
            live.extend(NAT_FIXED.iter().copied());
            if matches!(masq, Masq::Chain) {
                live.insert(MASQ_NONCLUSTER);
            }
            delete_nat.extend(
                stale_nat
                    .iter()
                    .filter(|c| !live.contains(c.as_str()))
                    .cloned(),
            );
            drop(live);
            delete_filter.extend(
                stale_filter
                    .iter()
                    .filter(|c| !FILTER_FIXED.contains(&c.as_str()))
                    .cloned(),
            );
        }
        Mode::Partial { previous, .. } => {
            for (name, old) in previous {
                match ports.get(name) {
                    None => delete_nat.extend(old.chains.iter().cloned()),
                    Some(new) if Arc::ptr_eq(old, new) => {}
                    Some(new) => delete_nat.extend(
                        old.chains
                            .iter()
                            .filter(|c| !new.chains.contains(c))
                            .cloned(),
                    ),
                }
            }
        }
    }
    delete_nat.sort();
    delete_nat.dedup();
    delete_filter.sort();
    delete_filter.dedup();

    let missing_jumps: &[JumpRule] = match mode {
        Mode::Full { missing_jumps, .. } => missing_jumps,
        Mode::Partial { .. } => &[],
    };
    let payload = assemble(
        out,
        &masq,
        &local,
        &config.masquerade_mark(),
        config.serves_localhost_nodeports(),
        &nodeport_dsts,
        &delete_nat,
        &delete_filter,
        missing_jumps,
    );
    let (nat_written, filter_written) = count_rules(&payload);
    Rendered {
        rules: [
            ("nat", nat_written + unwritten_rules, nat_written),
            ("filter", filter_written, filter_written),
        ],
        payload,
        ports,
        chains_written,
        chains_deleted: delete_nat.len() + delete_filter.len(),
    }
}

/// Rules (`-A`, `-I`) in the nat and filter parts of a payload.
fn count_rules(payload: &str) -> (usize, usize) {
    let (mut nat, mut filter, mut table) = (0, 0, "");
    for line in payload.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = if t == "nat" { "nat" } else { "filter" };
        } else if line.starts_with("-A ") || line.starts_with("-I ") {
            if table == "nat" {
                nat += 1;
            } else {
                filter += 1;
            }
        }
    }
    (nat, filter)
}

fn extra_nat_fixed(masq: &Masq) -> impl Iterator<Item = &'static str> {
    matches!(masq, Masq::Chain)
        .then_some(MASQ_NONCLUSTER)
        .into_iter()
}

/// `-s X` -> `! -s X`.
fn negate(m: &str) -> String {
    format!("! {m}")
}

/// Destination matches that select node-port traffic. 127.0.0.1 is one of
/// them with localhost node ports (kproxy then sets route_localnet=1, as
/// kube-proxy does); without, loopback is excluded.
fn nodeport_destinations(config: &DataplaneConfig) -> Vec<String> {
    let localhost = config.serves_localhost_nodeports();
    if config.nodeport_addresses.is_empty() {
        return vec![if localhost {
            "-m addrtype --dst-type LOCAL".to_string()
        } else {
            "! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL".to_string()
        }];
    }
    let mut ips: Vec<IpAddr> = config
        .node_ips
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() && config.nodeport_addresses.iter().any(|n| n.contains(ip)))
        .collect();
    if localhost {
        ips.push(IpAddr::from([127, 0, 0, 1]));
    }
    ips.sort();
    ips.dedup();
    ips.into_iter().map(|ip| format!("-d {ip}/32")).collect()
}

struct Ctx<'a> {
    masq: &'a Masq,
    /// Matches for traffic from this node's pods (`--detect-local-mode`).
    local: &'a [String],
    nodeport_dsts: &'a [String],
}

fn v4(ips: &[IpAddr]) -> impl Iterator<Item = &IpAddr> {
    ips.iter().filter(|ip| ip.is_ipv4())
}

/// Renders one Service port: rules for the fixed chains go straight into
/// `out`, the port's own chains into `scratch` (names into `chains`).
fn render_port(
    sp: &ServicePort,
    ctx: &Ctx<'_>,
    out: &mut Out,
    scratch: &mut String,
    chains: &mut Vec<String>,
) {
    let proto = sp.name.protocol.as_str();
    let port_text = sp.name.to_string();
    let label = name_label(&port_text);
    let h = port_hash(&sp.name);
    let svc = format!("{SVC}{h}");
    let svl = format!("{SVL}{h}");
    let ext = format!("{EXT}{h}");
    let fw = format!("{FW}{h}");

    let has_cluster = !sp.cluster_endpoints.is_empty();
    let ext_same = sp.external_endpoints == sp.cluster_endpoints;
    let local = sp.external_policy == TrafficPolicy::Local;
    let external_ips: Vec<&IpAddr> = v4(&sp.external_ips).collect();
    let lb_ips: Vec<&IpAddr> = v4(&sp.load_balancer_ips).collect();
    let has_ext_frontends =
        sp.node_port.is_some() || !external_ips.is_empty() || !lb_ips.is_empty();
    let ext_target: Option<&str> = if sp.external_endpoints.is_empty() {
        None
    } else if ext_same {
        Some(&svc)
    } else {
        Some(&svl)
    };
    let write_ext = has_ext_frontends && (ext_target.is_some() || (local && has_cluster));
    // With no endpoint for external traffic, the filter table rejects (or,
    // for policy Local, drops) what the EXT chain did not DNAT: pods and
    // the node itself may still be short-circuited to cluster endpoints.
    let write_fw = write_ext && !lb_ips.is_empty() && !sp.load_balancer_source_ranges.is_empty();
    let (no_ep_target, no_ep_text) = if local {
        ("DROP", "has no local endpoints")
    } else {
        (
            "REJECT --reject-with icmp-port-unreachable",
            "has no endpoints",
        )
    };

    // ClusterIP frontends.
    for vip in v4(&sp.cluster_ips) {
        if has_cluster {
            let _ = writeln!(
                out.nat_services,
                "-A {SERVICES} -d {vip}/32 -p {proto} -m comment --comment \"{label} cluster IP\" -m {proto} --dport {} -j {svc}",
                sp.port
            );
        } else {
            let _ = writeln!(
                out.filter_services,
                "-A {SERVICES} -d {vip}/32 -p {proto} -m comment --comment \"{label} cluster IP has no endpoints\" -m {proto} --dport {} -j REJECT --reject-with icmp-port-unreachable",
                sp.port
            );
        }
    }

    // External frontends: externalIPs, LB IPs, node port.
    for ip in &external_ips {
        if write_ext {
            let _ = writeln!(
                out.nat_services,
                "-A {SERVICES} -d {ip}/32 -p {proto} -m comment --comment \"{label} external IP\" -m {proto} --dport {} -j {ext}",
                sp.port
            );
        }
        if ext_target.is_none() {
            let _ = writeln!(
                out.filter_external,
                "-A {EXTERNAL_SERVICES} -d {ip}/32 -p {proto} -m comment --comment \"{label} external IP {no_ep_text}\" -m {proto} --dport {} -j {no_ep_target}",
                sp.port
            );
        }
    }
    for ip in &lb_ips {
        if write_ext {
            let target = if write_fw { &fw } else { &ext };
            let _ = writeln!(
                out.nat_services,
                "-A {SERVICES} -d {ip}/32 -p {proto} -m comment --comment \"{label} loadbalancer IP\" -m {proto} --dport {} -j {target}",
                sp.port
            );
            if write_fw {
                let _ = writeln!(
                    out.filter_firewall,
                    "-A {FIREWALL} -d {ip}/32 -p {proto} -m comment --comment \"{label} loadbalancer IP traffic not accepted by {fw}\" -m {proto} --dport {} -j DROP",
                    sp.port
                );
            }
        }
        if ext_target.is_none() {
            let _ = writeln!(
                out.filter_external,
                "-A {EXTERNAL_SERVICES} -d {ip}/32 -p {proto} -m comment --comment \"{label} loadbalancer IP {no_ep_text}\" -m {proto} --dport {} -j {no_ep_target}",
                sp.port
            );
        }
    }
    if let Some(np) = sp.node_port {
        if write_ext {
            let _ = writeln!(
                out.nat_nodeports,
                "-A {NODEPORTS} -p {proto} -m comment --comment \"{label} node port\" -m {proto} --dport {np} -j {ext}"
            );
        }
        if ext_target.is_none() {
            for dst in ctx.nodeport_dsts {
                let _ = writeln!(
                    out.filter_external,
                    "-A {EXTERNAL_SERVICES} {dst} -p {proto} -m comment --comment \"{label} node port {no_ep_text}\" -m {proto} --dport {np} -j {no_ep_target}"
                );
            }
        }
    }

    // Endpoint chain names, hashed once per endpoint (the hot path at scale).
    let svl_used = write_ext && ext_target == Some(svl.as_str());
    let mut seps: Vec<(&Endpoint, String)> = Vec::new();
    let used = sp
        .cluster_endpoints
        .iter()
        .chain(sp.external_endpoints.iter().filter(|_| svl_used));
    for ep in used.filter(|e| e.ip.is_ipv4()) {
        if !seps.iter().any(|(s, _)| s.ip == ep.ip && s.port == ep.port) {
            seps.push((ep, sep_chain_for(&port_text, sp.name.protocol, ep)));
        }
    }

    // The port's own chains.
    if has_cluster {
        chains.push(svc.clone());
        for vip in v4(&sp.cluster_ips) {
            let m = match ctx.masq {
                Masq::None => continue,
                Masq::All => String::new(),
                Masq::NotLocal(m) => format!("{m} "),
                Masq::Chain => String::new(),
            };
            let target = if matches!(ctx.masq, Masq::Chain) {
                MASQ_NONCLUSTER
            } else {
                MARK_MASQ
            };
            let _ = writeln!(
                scratch,
                "-A {svc} {m}-d {vip}/32 -p {proto} -m comment --comment \"{label} cluster IP\" -m {proto} --dport {} -j {target}",
                sp.port
            );
        }
        endpoint_jumps(
            scratch,
            &svc,
            &sp.cluster_endpoints,
            &seps,
            sp.session_affinity_seconds,
        );
    }
    if write_ext {
        chains.push(ext.clone());
        if local {
            if has_cluster {
                for m in ctx.local {
                    let _ = writeln!(
                        scratch,
                        "-A {ext} {m} -m comment --comment \"pod traffic for {label} external destinations\" -j {svc}"
                    );
                }
                let _ = writeln!(
                    scratch,
                    "-A {ext} -m addrtype --src-type LOCAL -m comment --comment \"masquerade LOCAL traffic for {label} external destinations\" -j {MARK_MASQ}"
                );
                let _ = writeln!(
                    scratch,
                    "-A {ext} -m addrtype --src-type LOCAL -m comment --comment \"route LOCAL traffic for {label} external destinations\" -j {svc}"
                );
            }
        } else {
            let _ = writeln!(
                scratch,
                "-A {ext} -m comment --comment \"masquerade traffic for {label} external destinations\" -j {MARK_MASQ}"
            );
        }
        if let Some(t) = ext_target {
            let _ = writeln!(scratch, "-A {ext} -j {t}");
        }
        if ext_target == Some(svl.as_str()) {
            chains.push(svl.clone());
            endpoint_jumps(
                scratch,
                &svl,
                &sp.external_endpoints,
                &seps,
                sp.session_affinity_seconds,
            );
        }
        if write_fw {
            chains.push(fw.clone());
            for net in sp
                .load_balancer_source_ranges
                .iter()
                .filter(|n| matches!(n, IpNet::V4(_)))
            {
                let _ = writeln!(
                    scratch,
                    "-A {fw} -s {net} -m comment --comment \"{label} loadbalancer IP\" -j {ext}"
                );
            }
            // Anything else falls through un-NATed and is dropped by KPROXY-FIREWALL.
        }
    }

    // Endpoint chains: one per distinct endpoint used by SVC or SVL.
    for (ep, sep) in &seps {
        let _ = writeln!(scratch, "-A {sep} -s {}/32 -j {MARK_MASQ}", ep.ip);
        match sp.session_affinity_seconds {
            Some(_) => {
                let _ = writeln!(
                    scratch,
                    "-A {sep} -p {proto} -m recent --name {sep} --set -j DNAT --to-destination {ep}"
                );
            }
            None => {
                let _ = writeln!(scratch, "-A {sep} -p {proto} -j DNAT --to-destination {ep}");
            }
        }
        chains.push(sep.clone());
    }
}

/// Affinity checks, then random selection: endpoint i of n is taken with
/// probability 1/(n-i), which makes the overall choice uniform.
fn endpoint_jumps(
    out: &mut String,
    chain: &str,
    endpoints: &[Endpoint],
    sep_names: &[(&Endpoint, String)],
    affinity: Option<u32>,
) {
    let seps: Vec<&str> = endpoints
        .iter()
        .filter(|e| e.ip.is_ipv4())
        .filter_map(|ep| {
            sep_names
                .iter()
                .find(|(s, _)| s.ip == ep.ip && s.port == ep.port)
                .map(|(_, n)| n.as_str())
        })
        .collect();
    if let Some(secs) = affinity {
        for sep in &seps {
            let _ = writeln!(
                out,
                "-A {chain} -m recent --name {sep} --rcheck --seconds {secs} --reap -j {sep}"
            );
        }
    }
    let n = seps.len();
    for (i, sep) in seps.iter().enumerate() {
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(
                out,
                "-A {chain} -m statistic --mode random --probability {p:.10} -j {sep}"
            );
        } else {
            let _ = writeln!(out, "-A {chain} -j {sep}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn assemble(
    out: Out,
    masq: &Masq,
    local: &[String],
    mark: &str,
    localhost_nodeports: bool,
    nodeport_dsts: &[String],
    delete_nat: &[String],
    delete_filter: &[String],
    missing_jumps: &[JumpRule],
) -> String {
    let mut s = String::with_capacity(
        out.nat_decls.len()
            + out.nat_services.len()
            + out.nat_nodeports.len()
            + out.nat_ports.len()
            + out.filter_services.len()
            + out.filter_external.len()
            + out.filter_firewall.len()
            + (delete_nat.len() + delete_filter.len()) * 64
            + 4096,
    );

    // nat: declarations (which also flush), rules, deletions.
    s.push_str("*nat\n");
    for c in NAT_FIXED.iter().copied().chain(extra_nat_fixed(masq)) {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    s.push_str(&out.nat_decls);
    for c in delete_nat {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    push_jumps(&mut s, "nat", missing_jumps);
    let _ = writeln!(
        s,
        "-A {POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    // Clear the mark so a re-routed packet is not masqueraded twice.
    let _ = writeln!(s, "-A {POSTROUTING} -j MARK --xor-mark {mark}");
    let _ = writeln!(
        s,
        "-A {POSTROUTING} -m comment --comment \"kproxy service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    let _ = writeln!(s, "-A {MARK_MASQ} -j MARK --or-mark {mark}");
    if matches!(masq, Masq::Chain) {
        for m in local {
            let _ = writeln!(s, "-A {MASQ_NONCLUSTER} {m} -j RETURN");
        }
        let _ = writeln!(s, "-A {MASQ_NONCLUSTER} -j {MARK_MASQ}");
    }
    s.push_str(&out.nat_services);
    // Node ports must stay the last rules of KPROXY-SERVICES: specific
    // VIP matches win over "any local address".
    for dst in nodeport_dsts {
        let _ = writeln!(
            s,
            "-A {SERVICES} {dst} -m comment --comment \"kproxy service nodeports\" -j {NODEPORTS}"
        );
    }
    s.push_str(&out.nat_nodeports);
    s.push_str(&out.nat_ports);
    for c in delete_nat {
        let _ = writeln!(s, "-X {c}");
    }
    s.push_str("COMMIT\n");

    // filter: only packets that were not DNATed reach these rules.
    s.push_str("*filter\n");
    for c in FILTER_FIXED {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for c in delete_filter {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    push_jumps(&mut s, "filter", missing_jumps);
    s.push_str(&out.filter_services);
    s.push_str(&out.filter_external);
    s.push_str(&out.filter_firewall);
    if localhost_nodeports {
        // route_localnet lets packets to 127.0.0.0/8 arrive from outside;
        // only those node ports translated may pass (CVE-2020-8558).
        let _ = writeln!(
            s,
            "-A {FIREWALL} -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -m comment --comment \"block incoming localnet connections\" -j DROP"
        );
    }
    let _ = writeln!(s, "-A {FORWARD} -m conntrack --ctstate INVALID -j DROP");
    let _ = writeln!(
        s,
        "-A {FORWARD} -m mark --mark {mark}/{mark} -m comment --comment \"kproxy forwarding rules\" -j ACCEPT"
    );
    let _ = writeln!(
        s,
        "-A {FORWARD} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"kproxy forwarding conntrack rule\" -j ACCEPT"
    );
    for c in delete_filter {
        let _ = writeln!(s, "-X {c}");
    }
    s.push_str("COMMIT\n");
    s
}

fn push_jumps(s: &mut String, table: &str, missing: &[JumpRule]) {
    // `-I` puts a rule first, so insert in reverse to keep the listed order.
    for j in JUMP_RULES.iter().rev() {
        if j.table == table && missing.contains(j) {
            let _ = writeln!(s, "-I {} {} -j {}", j.chain, j.spec, j.target);
        }
    }
}
