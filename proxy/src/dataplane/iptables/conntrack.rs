//! Clearing stale UDP conntrack entries, as kube-proxy does. UDP has no
//! teardown, so a client keeps sending to a removed endpoint (or keeps
//! hitting a REJECT cached before the first endpoint came) until its entry
//! times out. After a sync that changed UDP Services, and at every full
//! sync (the periodic reconcile), kproxy lists the UDP flows and deletes
//! those addressed to a Service frontend (ClusterIP, externalIP, LB IP, or a
//! node port on a node address) whose reply source is not a serving
//! endpoint of that port: exactly the flows whose backend left, never the
//! flows of backends that stay.
//!
//! All through one netlink socket (ctnetlink): a dump, then the deletions
//! batched in as few messages as the socket buffer holds; no process per
//! frontend. [`stale_flows`] is the pure decision, [`Netlink`] the kernel.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as CtProtocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use tracing::{debug, warn};

use crate::dataplane::{ConntrackReconcile, DataplaneConfig};
use crate::model::{ChangeSet, DesiredState, Protocol, ServicePort};

/// One UDP conntrack entry: its original tuple (what identifies it for
/// deletion) and the source of its reply direction (the endpoint it was
/// translated to, or the original destination when it was not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UdpFlow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub reply_src: Ipv4Addr,
}

/// The UDP frontends of a desired state and the serving endpoint IPs
/// behind each (kube-proxy does not look at traffic policies here: a flow
/// is stale only when its endpoint stopped serving).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpFrontends {
    /// (frontend IP, port) -> serving endpoint IPs.
    by_ip: HashMap<(Ipv4Addr, u16), HashSet<Ipv4Addr>>,
    /// node port -> serving endpoint IPs.
    by_node_port: HashMap<u16, HashSet<Ipv4Addr>>,
    /// Addresses node ports answer on.
    node_addrs: HashSet<Ipv4Addr>,
}

impl UdpFrontends {
    pub fn of(desired: &DesiredState, config: &DataplaneConfig) -> Self {
        let mut f = UdpFrontends::default();
        for sp in desired.services.values() {
            if sp.name.protocol != Protocol::Udp {
                continue;
            }
            let serving: HashSet<Ipv4Addr> = sp
                .all_endpoints
                .iter()
                .filter(|e| e.serving)
                .filter_map(|e| v4(e.ip))
                .collect();
            for ip in sp
                .cluster_ips
                .iter()
                .chain(&sp.external_ips)
                .chain(&sp.load_balancer_ips)
                .filter_map(|ip| v4(*ip))
            {
                f.by_ip
                    .entry((ip, sp.port))
                    .or_default()
                    .extend(serving.iter().copied());
            }
            if let Some(np) = sp.node_port {
                f.by_node_port
                    .entry(np)
                    .or_default()
                    .extend(serving.iter().copied());
            }
        }
        f.node_addrs = config
            .node_ips
            .iter()
            .filter_map(|ip| v4(*ip))
            .filter(|ip| {
                config.nodeport_addresses.is_empty()
                    || config
                        .nodeport_addresses
                        .iter()
                        .any(|n| n.contains(&IpAddr::V4(*ip)))
            })
            .collect();
        if config.serves_localhost_nodeports() {
            f.node_addrs.insert(Ipv4Addr::LOCALHOST);
        }
        f
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty() && self.by_node_port.is_empty()
    }
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

/// The flows of `flows` whose backend left (see the module doc).
pub fn stale_flows(frontends: &UdpFrontends, flows: &[UdpFlow]) -> Vec<UdpFlow> {
    flows
        .iter()
        .filter(|f| {
            let via_ip = frontends
                .by_ip
                .get(&(f.dst, f.dport))
                .is_some_and(|eps| !eps.contains(&f.reply_src));
            let via_node_port = frontends.node_addrs.contains(&f.dst)
                && frontends
                    .by_node_port
                    .get(&f.dport)
                    .is_some_and(|eps| !eps.contains(&f.reply_src));
            via_ip || via_node_port
        })
        .copied()
        .collect()
}

/// Where UDP flows are listed and deleted (the kernel, or a fake in tests).
pub trait FlowTable {
    fn udp_flows(&mut self) -> io::Result<Vec<UdpFlow>>;
    /// Deletes `flows`; returns how many existed and were deleted.
    fn delete(&mut self, flows: &[UdpFlow]) -> io::Result<usize>;
}

/// Tracks the UDP frontends between syncs and reconciles when needed.
#[derive(Debug, Default)]
pub struct UdpReconciler {
    /// The last reconcile did not happen or failed: the next sync tries again.
    retry: bool,
    socket: Option<Netlink>,
    warned: bool,
}

/// What decides a UDP port's stale flows: its frontend addresses, port
/// and node port, and the addresses of its serving endpoints.
type UdpView<'a> = (Vec<&'a IpAddr>, u16, Option<u16>, Vec<IpAddr>);

fn udp_view(sp: Option<&ServicePort>) -> Option<UdpView<'_>> {
    let sp = sp.filter(|sp| sp.name.protocol == Protocol::Udp)?;
    let frontends = sp
        .cluster_ips
        .iter()
        .chain(&sp.external_ips)
        .chain(&sp.load_balancer_ips)
        .collect();
    let mut serving: Vec<IpAddr> = sp
        .all_endpoints
        .iter()
        .filter(|e| e.serving)
        .map(|e| e.ip)
        .collect();
    serving.sort_unstable();
    serving.dedup();
    Some((frontends, sp.port, sp.node_port, serving))
}

/// A UDP port's frontends or serving endpoints changed.
fn udp_changed(changes: &ChangeSet) -> bool {
    changes
        .iter()
        .any(|(_, c)| udp_view(c.old.as_deref()) != udp_view(c.new.as_deref()))
}

impl UdpReconciler {
    /// After a successful sync: reconciles when the change set shows UDP
    /// frontends or their endpoints changed, or on a full sync. Failures
    /// are logged (the next sync tries again), never fatal.
    pub fn after_sync(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        config: &DataplaneConfig,
        full: bool,
    ) -> Option<ConntrackReconcile> {
        if !(full || self.retry || udp_changed(changes)) {
            return None;
        }
        let now = UdpFrontends::of(desired, config);
        // No UDP frontend: no flow can be stale.
        if now.is_empty() {
            self.retry = false;
            return None;
        }
        self.retry = true;
        if self.socket.is_none() {
            match Netlink::open() {
                Ok(s) => self.socket = Some(s),
                Err(e) => {
                    if !self.warned {
                        warn!(error = %e, "cannot open a conntrack netlink socket; stale UDP flows stay until they time out");
                        self.warned = true;
                    }
                    return None;
                }
            }
        }
        let table = self.socket.as_mut().expect("opened above");
        match reconcile(table, &now) {
            Ok(r) => {
                self.retry = false;
                self.warned = false;
                if r.deleted > 0 {
                    debug!(
                        deleted = r.deleted,
                        examined = r.examined,
                        ms = r.duration.as_secs_f64() * 1e3,
                        "deleted stale UDP conntrack entries"
                    );
                }
                Some(r)
            }
            Err(e) => {
                warn!(error = %e, "UDP conntrack reconcile failed; retried at the next sync");
                // A broken socket is reopened next time.
                self.socket = None;
                None
            }
        }
    }
}

/// One reconcile pass over `table`.
pub fn reconcile(
    table: &mut dyn FlowTable,
    frontends: &UdpFrontends,
) -> io::Result<ConntrackReconcile> {
    let started = Instant::now();
    let flows = table.udp_flows()?;
    let stale = stale_flows(frontends, &flows);
    let deleted = if stale.is_empty() {
        0
    } else {
        table.delete(&stale)?
    };
    Ok(ConntrackReconcile {
        duration: started.elapsed(),
        examined: flows.len(),
        deleted,
    })
}

/// ctnetlink over one netlink socket, in the calling thread's network namespace.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

/// Receive buffer: the kernel sends dump batches of up to a few pages.
const RECV_BUF: usize = 256 * 1024;
/// Deletion messages sent per batch (each ~100 bytes).
const DELETE_BATCH: usize = 512;

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let socket = crate::netlink::connected(NETLINK_NETFILTER)?;
        // Large dumps and delete batches need room; ignore if capped.
        let _ = socket.set_rx_buf_sz(4 * 1024 * 1024);
        Ok(Netlink { socket, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn message(&mut self, flags: u16, msg: ConntrackMessage) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.next_seq();
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                msg,
            )),
        );
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        buf
    }

    /// Reads replies until `done` says the exchange is over; calls
    /// `each` for every message.
    fn read_until(
        &mut self,
        each: impl FnMut(&NetlinkMessage<NetfilterMessage>) -> io::Result<bool>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; RECV_BUF];
        crate::netlink::read_until(&self.socket, &mut buf, each)
    }
}

fn tuple_of(tuples: &[Tuple]) -> (Option<Ipv4Addr>, Option<Ipv4Addr>, Option<u8>, u16, u16) {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for t in tuples {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(IpAddr::V4(a)) => src = Some(*a),
                        IPTuple::DestinationAddress(IpAddr::V4(a)) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(p) => proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => sport = *p,
                        ProtoTuple::DestinationPort(p) => dport = *p,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (src, dst, proto, sport, dport)
}

fn flow_of(attrs: &[ConntrackAttribute]) -> Option<UdpFlow> {
    let mut orig = None;
    let mut reply = None;
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(tuple_of(t)),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(tuple_of(t)),
            _ => {}
        }
    }
    let (src, dst, proto, sport, dport) = orig?;
    if proto != Some(u8::from(CtProtocol::Udp)) {
        return None;
    }
    let (reply_src, ..) = reply?;
    Some(UdpFlow {
        src: src?,
        dst: dst?,
        sport,
        dport,
        reply_src: reply_src?,
    })
}

fn netlink_error(code: i32) -> Option<io::Error> {
    (code != 0).then(|| io::Error::from_raw_os_error(-code))
}

impl FlowTable for Netlink {
    fn udp_flows(&mut self) -> io::Result<Vec<UdpFlow>> {
        let req = self.message(NLM_F_REQUEST | NLM_F_DUMP, ConntrackMessage::Get(vec![]));
        self.socket.send(&req, 0)?;
        let mut flows = Vec::new();
        self.read_until(|msg| match &msg.payload {
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) => match e.code {
                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                None => Ok(true),
            },
            NetlinkPayload::InnerMessage(m) => {
                if let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = &m.inner {
                    flows.extend(flow_of(attrs));
                }
                Ok(false)
            }
            _ => Ok(false),
        })?;
        Ok(flows)
    }

    fn delete(&mut self, flows: &[UdpFlow]) -> io::Result<usize> {
        let mut deleted = 0;
        for batch in flows.chunks(DELETE_BATCH) {
            let mut buf = Vec::with_capacity(batch.len() * 112);
            for f in batch {
                let msg = ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(vec![
                    Tuple::Ip(vec![
                        IPTuple::SourceAddress(IpAddr::V4(f.src)),
                        IPTuple::DestinationAddress(IpAddr::V4(f.dst)),
                    ]),
                    Tuple::Proto(vec![
                        ProtoTuple::Protocol(CtProtocol::Udp),
                        ProtoTuple::SourcePort(f.sport),
                        ProtoTuple::DestinationPort(f.dport),
                    ]),
                ])]);
                buf.extend(self.message(NLM_F_REQUEST | NLM_F_ACK, msg));
            }
            self.socket.send(&buf, 0)?;
            // One acknowledgement per message: 0, or ENOENT when the flow
            // ended on its own in the meantime.
            let mut acked = 0;
            let mut failure = None;
            self.read_until(|msg| {
                if let NetlinkPayload::Error(e) = &msg.payload {
                    acked += 1;
                    match e.code.map(|c| c.get()).and_then(netlink_error) {
                        None => deleted += 1,
                        Some(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                        Some(err) => failure = Some(err),
                    }
                }
                Ok(acked == batch.len())
            })?;
            if let Some(err) = failure {
                return Err(err);
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::iptables::golden_tests::{config, ep, state, svc};
    use crate::model::{Endpoint, Protocol};

    fn flow(src: &str, dst: &str, dport: u16, reply_src: &str) -> UdpFlow {
        UdpFlow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: 40000,
            dport,
            reply_src: reply_src.parse().unwrap(),
        }
    }

    fn dns(endpoints: Vec<Endpoint>) -> crate::model::ServicePort {
        let mut p = svc(
            "kube-system",
            "dns",
            "dns",
            Protocol::Udp,
            "10.96.0.10",
            53,
            endpoints,
        );
        p.node_port = Some(30053);
        p
    }

    #[test]
    fn only_flows_whose_endpoint_left_are_stale() {
        let desired = state(vec![dns(vec![ep("10.244.1.5", 53, true)])]);
        let f = UdpFrontends::of(&desired, &config());
        let staying = flow("10.244.2.9", "10.96.0.10", 53, "10.244.1.5");
        let gone = flow("10.244.2.9", "10.96.0.10", 53, "10.244.3.3");
        let rejected = flow("10.244.2.9", "10.96.0.10", 53, "10.96.0.10");
        let other_port = flow("10.244.2.9", "10.96.0.10", 54, "10.244.3.3");
        let unrelated = flow("10.244.2.9", "8.8.8.8", 53, "8.8.8.8");
        let node_port_gone = flow("172.30.0.100", "192.168.1.10", 30053, "10.244.3.3");
        let node_port_staying = flow("172.30.0.100", "192.168.1.10", 30053, "10.244.1.5");
        // Forwarded traffic that happens to use the node port number elsewhere.
        let passing_through = flow("10.244.2.9", "198.51.100.1", 30053, "198.51.100.1");
        let stale = stale_flows(
            &f,
            &[
                staying,
                gone,
                rejected,
                other_port,
                unrelated,
                node_port_gone,
                node_port_staying,
                passing_through,
            ],
        );
        assert_eq!(stale, vec![gone, rejected, node_port_gone]);
    }

    struct Fake {
        flows: Vec<UdpFlow>,
    }

    impl FlowTable for Fake {
        fn udp_flows(&mut self) -> io::Result<Vec<UdpFlow>> {
            Ok(self.flows.clone())
        }
        fn delete(&mut self, flows: &[UdpFlow]) -> io::Result<usize> {
            let before = self.flows.len();
            self.flows.retain(|f| !flows.contains(f));
            Ok(before - self.flows.len())
        }
    }

    #[test]
    fn reconcile_deletes_what_is_stale() {
        let desired = state(vec![dns(vec![ep("10.244.1.5", 53, true)])]);
        let f = UdpFrontends::of(&desired, &config());
        let mut table = Fake {
            flows: vec![
                flow("10.244.2.9", "10.96.0.10", 53, "10.244.1.5"),
                flow("10.244.2.8", "10.96.0.10", 53, "10.244.3.3"),
            ],
        };
        let r = reconcile(&mut table, &f).unwrap();
        assert_eq!((r.examined, r.deleted), (2, 1));
        assert_eq!(table.flows.len(), 1);
    }
}
