//! The interface detect-local modes in ebpf mode: which devices' traffic
//! comes from this node's pods, kept in the `LOCAL_IFS` map that the TC
//! ingress program checks against a packet's arrival device
//! (`FE_SNAT_NONLOCAL_IF`: traffic to a ClusterIP that did not arrive there
//! is masqueraded, as iptables mode's `! -i cbr0` / `! -i veth+` rules do).
//!
//! - `BridgeInterface`: the bridge, and every device enslaved to it. A pod's
//!   packet is seen first at the ingress of its bridge port (the TC programs
//!   are on every device), where iptables would see it arrive on the bridge.
//! - `InterfaceNamePrefix`: every device whose name starts with the prefix.
//!
//! Pods' devices come and go without any Service changing, so the set is not
//! tied to syncs: a thread listens to rtnetlink link events (RTNLGRP_LINK)
//! and, after each burst of them, lists the links again and reconciles the
//! map. Relisting instead of applying each event keeps it correct when
//! events are lost (a full socket buffer: ENOBUFS) or arrive out of order
//! with the listing, and covers renames and bridge (un)enslaving, which
//! arrive as plain RTM_NEWLINK. A relist also runs every [`RESCAN`] to
//! repair the map if something else changed it. Both netlink sockets are
//! opened by [`LocalIfs::start`], so they belong to the network namespace
//! kproxy starts in, whichever thread reads them.
//!
//! [`local_ifindexes`] and [`Follower`] are the logic, over the [`LinkSource`]
//! and [`IfSet`] traits; unit tests drive them with in-memory fakes.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use proxy_common::maps as names;
use tracing::{debug, info, warn};

use super::maps::{map_err, open};
use crate::dataplane::{DataplaneError, DetectLocalMode};

/// Safety-net relist period (events normally trigger one at once).
pub const RESCAN: Duration = Duration::from_secs(60);
/// How long the thread waits for events before looking at its stop flag.
const POLL: Duration = Duration::from_millis(200);

/// Which devices are local, from `--detect-local-mode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `BridgeInterface`: this bridge and its ports.
    Bridge(String),
    /// `InterfaceNamePrefix`: devices whose name starts with this.
    Prefix(String),
}

impl Rule {
    /// `None` for the CIDR modes (the map is kept empty).
    pub fn of(mode: &DetectLocalMode) -> Option<Rule> {
        match mode {
            DetectLocalMode::BridgeInterface(b) => Some(Rule::Bridge(b.clone())),
            DetectLocalMode::InterfaceNamePrefix(p) => Some(Rule::Prefix(p.clone())),
            DetectLocalMode::ClusterCidr | DetectLocalMode::NodeCidr => None,
        }
    }
}

/// A network device as rtnetlink lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// The device it is enslaved to (a bridge port's bridge).
    pub controller: Option<u32>,
}

/// The ifindexes `rule` counts as local among `links`.
pub fn local_ifindexes(rule: &Rule, links: &[Link]) -> BTreeSet<u32> {
    match rule {
        Rule::Prefix(p) => links
            .iter()
            .filter(|l| l.name.starts_with(p.as_str()))
            .map(|l| l.ifindex)
            .collect(),
        Rule::Bridge(b) => {
            let Some(bridge) = links.iter().find(|l| &l.name == b) else {
                return BTreeSet::new();
            };
            links
                .iter()
                .filter(|l| l.ifindex == bridge.ifindex || l.controller == Some(bridge.ifindex))
                .map(|l| l.ifindex)
                .collect()
        }
    }
}

/// Where the links come from (rtnetlink, or a fake).
pub trait LinkSource {
    fn links(&mut self) -> io::Result<Vec<Link>>;
}

/// The set of local ifindexes (the `LOCAL_IFS` map, or a fake).
pub trait IfSet {
    fn current(&self) -> Result<BTreeSet<u32>, DataplaneError>;
    fn add(&mut self, ifindex: u32) -> Result<(), DataplaneError>;
    fn remove(&mut self, ifindex: u32) -> Result<(), DataplaneError>;
}

/// What one rescan changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rescan {
    /// Local devices now, by ifindex (with their names, for logs and status).
    pub local: BTreeMap<u32, String>,
    pub added: Vec<u32>,
    pub removed: Vec<u32>,
    /// Devices that could not be added (a full map), with the error.
    pub failed: Vec<(u32, String)>,
}

/// Keeps an [`IfSet`] equal to what [`Rule`] selects among the links of a
/// [`LinkSource`].
pub struct Follower<L, S> {
    pub rule: Option<Rule>,
    pub links: L,
    pub set: S,
}

impl<L: LinkSource, S: IfSet> Follower<L, S> {
    /// Lists the links and reconciles the set: removals first (they make
    /// room), then additions; a failed addition does not stop the others.
    pub fn rescan(&mut self) -> Result<Rescan, DataplaneError> {
        let local: BTreeMap<u32, String> = match &self.rule {
            Some(rule) => {
                let links = self.links.links()?;
                let want = local_ifindexes(rule, &links);
                links
                    .into_iter()
                    .filter(|l| want.contains(&l.ifindex))
                    .map(|l| (l.ifindex, l.name))
                    .collect()
            }
            None => BTreeMap::new(),
        };
        let have = self.set.current()?;
        let mut out = Rescan::default();
        for &i in have.iter().filter(|i| !local.contains_key(i)) {
            self.set.remove(i)?;
            out.removed.push(i);
        }
        for &i in local.keys().filter(|i| !have.contains(i)) {
            match self.set.add(i) {
                Ok(()) => out.added.push(i),
                Err(e) => out.failed.push((i, e.to_string())),
            }
        }
        out.local = local;
        Ok(out)
    }
}

/// rtnetlink link dumps on one socket.
pub struct NetlinkLinks {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// A dump sends batches of a few pages.
const RECV_BUF: usize = 64 * 1024;
/// Dumps interrupted by concurrent changes are retried this often.
const DUMP_TRIES: usize = 5;

impl NetlinkLinks {
    pub fn open() -> io::Result<NetlinkLinks> {
        Ok(NetlinkLinks {
            socket: crate::netlink::connected(NETLINK_ROUTE)?,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// One dump; `Ok(None)` when the kernel marked it interrupted.
    fn dump(&mut self) -> io::Result<Option<Vec<Link>>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_DUMP | NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
        );
        packet.finalize();
        let mut req = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut req);
        self.socket.send(&req, 0)?;
        let (seq, mut links, mut interrupted) = (self.seq, Vec::new(), false);
        crate::netlink::read_until(
            &self.socket,
            &mut self.buf,
            |msg: &NetlinkMessage<RouteNetlinkMessage>| {
                if msg.header.sequence_number != seq {
                    return Ok(false);
                }
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match &msg.payload {
                    NetlinkPayload::Done(_) => Ok(true),
                    NetlinkPayload::Error(e) => Err(match e.code {
                        Some(code) => io::Error::from_raw_os_error(-code.get()),
                        None => io::Error::other("unexpected netlink ACK to a link dump"),
                    }),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                        links.push(link_of(l));
                        Ok(false)
                    }
                    _ => Ok(false),
                }
            },
        )?;
        Ok((!interrupted).then_some(links))
    }
}

fn link_of(m: &LinkMessage) -> Link {
    let mut link = Link {
        ifindex: m.header.index,
        name: String::new(),
        controller: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Controller(c) if *c != 0 => link.controller = Some(*c),
            _ => {}
        }
    }
    link
}

impl LinkSource for NetlinkLinks {
    fn links(&mut self) -> io::Result<Vec<Link>> {
        for _ in 0..DUMP_TRIES {
            if let Some(links) = self.dump()? {
                return Ok(links);
            }
        }
        Err(io::Error::other(format!(
            "link dump interrupted by concurrent changes {DUMP_TRIES} times in a row"
        )))
    }
}

/// The pinned `LOCAL_IFS` map.
pub struct KernelIfSet(BpfHashMap<MapData, u32, u8>);

fn lerr(e: MapError) -> DataplaneError {
    map_err(names::LOCAL_IFS, e)
}

impl KernelIfSet {
    pub fn open(pin: &Path) -> Result<KernelIfSet, DataplaneError> {
        let map = open(pin, names::LOCAL_IFS)?.try_into().map_err(lerr)?;
        Ok(KernelIfSet(map))
    }
}

impl IfSet for KernelIfSet {
    fn current(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        self.0.keys().map(|k| k.map_err(lerr)).collect()
    }

    fn add(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.0.insert(ifindex, 1, 0).map_err(lerr)
    }

    fn remove(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        match self.0.remove(&ifindex) {
            Err(MapError::KeyNotFound) => Ok(()),
            r => r.map_err(lerr),
        }
    }
}

/// The ifindexes in the pinned `LOCAL_IFS` map (`kproxy status`).
pub fn pinned(pin: &Path) -> Result<BTreeSet<u32>, DataplaneError> {
    KernelIfSet::open(pin)?.current()
}

/// `kproxy status`'s line for the local devices (names as this network
/// namespace has them now).
pub fn status_line(set: &BTreeSet<u32>) -> String {
    let names: Vec<String> = set
        .iter()
        .map(|&i| {
            let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname needs.
            let p = unsafe { libc::if_indextoname(i, buf.as_mut_ptr()) };
            if p.is_null() {
                format!("#{i} (gone)")
            } else {
                // SAFETY: if_indextoname wrote a NUL-terminated name.
                let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
                format!("{} (#{i})", name.to_string_lossy())
            }
        })
        .collect();
    format!(
        "Local devices (detect-local; ClusterIP traffic arriving elsewhere is masqueraded): {}",
        names.join(", ")
    )
}

fn log_rescan(r: &Rescan) {
    if !r.added.is_empty() || !r.removed.is_empty() {
        debug!(
            local = ?r.local.values().collect::<Vec<_>>(),
            added = ?r.added,
            removed = ?r.removed,
            "detect-local: local devices changed"
        );
    }
    for (i, e) in &r.failed {
        let name = r.local.get(i).map_or("?", String::as_str);
        warn!(device = name, ifindex = i, error = %e, "detect-local: device not counted as local (its traffic to ClusterIPs is masqueraded); LOCAL_IFS holds 4,096 devices");
    }
}

/// The running follower: a thread fed by link events. Stopped on drop.
pub struct LocalIfs {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl LocalIfs {
    /// Fills `LOCAL_IFS` under `pin` for `mode` (empties it for the CIDR
    /// modes) and, for the interface modes, starts following link events.
    /// Errors here are start-up errors; later ones are logged and retried.
    pub fn start(pin: &Path, mode: &DetectLocalMode) -> Result<Option<LocalIfs>, DataplaneError> {
        let rule = Rule::of(mode);
        let set = KernelIfSet::open(pin)?;
        let events = match &rule {
            Some(_) => Some(subscribe().map_err(|e| {
                DataplaneError::Other(format!(
                    "detect-local: cannot listen to rtnetlink link events: {e}"
                ))
            })?),
            None => None,
        };
        let links = NetlinkLinks::open().map_err(|e| {
            DataplaneError::Other(format!(
                "detect-local: cannot open an rtnetlink socket: {e}"
            ))
        })?;
        let mut follower = Follower { rule, links, set };
        let first = follower.rescan()?;
        log_rescan(&first);
        let Some(events) = events else {
            return Ok(None);
        };
        info!(
            mode = ?mode,
            local = ?first.local.values().collect::<Vec<_>>(),
            "detect-local: following devices (traffic to ClusterIPs arriving elsewhere is masqueraded)"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("kproxy-local-ifs".into())
            .spawn(move || follow(follower, events, flag))
            .map_err(DataplaneError::Io)?;
        Ok(Some(LocalIfs {
            stop,
            handle: Some(handle),
        }))
    }
}

impl Drop for LocalIfs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A socket subscribed to link events (non-blocking, polled).
fn subscribe() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.add_membership(libc::RTNLGRP_LINK)?;
    socket.set_non_blocking(true)?;
    // Bursts (many pods at once) fit; an overflow only costs a relist.
    let _ = socket.set_rx_buf_sz(1024 * 1024);
    Ok(socket)
}

/// Waits up to `timeout` for events, then reads all that are queued.
/// `true` when there was anything (or the queue overflowed).
fn drain_events(socket: &Socket, buf: &mut [u8], timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) } <= 0 {
        return false;
    }
    loop {
        match socket.recv(&mut &mut buf[..], 0) {
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            // ENOBUFS: events were lost; the relist covers them.
            Err(_) => return true,
        }
    }
}

fn follow<L: LinkSource, S: IfSet>(
    mut follower: Follower<L, S>,
    events: Socket,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut last = Instant::now();
    let mut dirty = false;
    while !stop.load(Ordering::Relaxed) {
        dirty |= drain_events(&events, &mut buf, POLL) || last.elapsed() >= RESCAN;
        if !dirty {
            continue;
        }
        match follower.rescan() {
            Ok(r) => {
                log_rescan(&r);
                dirty = false;
                last = Instant::now();
            }
            // Retried at the next event or poll tick.
            Err(e) => warn!(error = %e, "detect-local: relisting devices failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeLinks(Vec<Link>);

    impl LinkSource for FakeLinks {
        fn links(&mut self) -> io::Result<Vec<Link>> {
            Ok(self.0.clone())
        }
    }

    #[derive(Default)]
    struct FakeSet {
        set: BTreeSet<u32>,
        cap: usize,
    }

    impl IfSet for FakeSet {
        fn current(&self) -> Result<BTreeSet<u32>, DataplaneError> {
            Ok(self.set.clone())
        }
        fn add(&mut self, i: u32) -> Result<(), DataplaneError> {
            if self.set.len() >= self.cap {
                return Err(DataplaneError::Other("map full".into()));
            }
            self.set.insert(i);
            Ok(())
        }
        fn remove(&mut self, i: u32) -> Result<(), DataplaneError> {
            self.set.remove(&i);
            Ok(())
        }
    }

    fn link(ifindex: u32, name: &str, controller: Option<u32>) -> Link {
        Link {
            ifindex,
            name: name.into(),
            controller,
        }
    }

    fn node() -> Vec<Link> {
        vec![
            link(1, "lo", None),
            link(2, "eth0", None),
            link(3, "cbr0", None),
            link(4, "veth1a2b", Some(3)),
            link(5, "veth9f00", Some(3)),
            link(6, "vethx", None),
            link(7, "cbr0x", None),
        ]
    }

    #[test]
    fn prefix_selects_by_name_and_bridge_selects_the_bridge_and_its_ports() {
        let set = |r: Rule| local_ifindexes(&r, &node()).into_iter().collect::<Vec<_>>();
        assert_eq!(set(Rule::Prefix("veth".into())), vec![4, 5, 6]);
        assert_eq!(set(Rule::Prefix("eth".into())), vec![2]);
        assert_eq!(set(Rule::Bridge("cbr0".into())), vec![3, 4, 5]);
        // An exact name, not a prefix; a missing bridge selects nothing.
        assert_eq!(set(Rule::Bridge("cbr".into())), Vec::<u32>::new());
        // A device that is not a bridge still counts itself (as `-i eth0`).
        assert_eq!(set(Rule::Bridge("eth0".into())), vec![2]);
    }

    #[test]
    fn rescans_follow_pods_coming_and_going() {
        let mut f = Follower {
            rule: Some(Rule::Bridge("cbr0".into())),
            links: FakeLinks(node()),
            set: FakeSet {
                // Left by a previous kproxy: a device that is gone.
                set: [2, 99].into(),
                cap: 100,
            },
        };
        let r = f.rescan().unwrap();
        assert_eq!(r.added, vec![3, 4, 5]);
        assert_eq!(r.removed, vec![2, 99]);
        assert_eq!(f.set.set, [3, 4, 5].into());
        assert_eq!(r.local.get(&4).map(String::as_str), Some("veth1a2b"));

        // A pod starts (a new port), another stops.
        f.links.0.retain(|l| l.ifindex != 4);
        f.links.0.push(link(8, "vethnew", Some(3)));
        let r = f.rescan().unwrap();
        assert_eq!((r.added, r.removed), (vec![8], vec![4]));
        assert_eq!(f.set.set, [3, 5, 8].into());

        // Nothing changed: nothing written.
        let r = f.rescan().unwrap();
        assert!(r.added.is_empty() && r.removed.is_empty());

        // The bridge goes away: so do its ports' entries.
        f.links.0.retain(|l| l.ifindex != 3);
        f.rescan().unwrap();
        assert!(f.set.set.is_empty());
    }

    #[test]
    fn cidr_modes_empty_the_set() {
        let mut f = Follower {
            rule: Rule::of(&DetectLocalMode::NodeCidr),
            links: FakeLinks(node()),
            set: FakeSet {
                set: [4, 5].into(),
                cap: 100,
            },
        };
        f.rescan().unwrap();
        assert!(f.set.set.is_empty());
    }

    #[test]
    fn a_full_set_keeps_the_other_devices_and_reports_the_rest() {
        let mut f = Follower {
            rule: Some(Rule::Prefix("veth".into())),
            links: FakeLinks(node()),
            set: FakeSet {
                // Stale entries are removed first, making room.
                set: [1, 2].into(),
                cap: 2,
            },
        };
        let r = f.rescan().unwrap();
        assert_eq!(r.added, vec![4, 5]);
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, 6);
        assert_eq!(f.set.set, [4, 5].into());
    }
}
