//! Map keys, values and constants shared by the kproxy userspace and its eBPF
//! programs. `no_std` and `#[repr(C)]` so both sides agree on the layout.
//!
//! Conventions: IPv4 addresses and ports are stored in network byte order,
//! exactly as they appear in packets and in `bpf_sock_addr` (an address is
//! the `u32` whose in-memory bytes are the four octets). Explicit padding
//! fields keep every byte initialised, so keys hash the same on both sides.
#![no_std]

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Frontend scope: which backend set a lookup wants.
/// Internal: traffic from this node's sockets and to ClusterIPs (cluster endpoints).
pub const SCOPE_INTERNAL: u8 = 0;
/// External: node ports, externalIPs and LB IPs reached from outside (external endpoints).
pub const SCOPE_EXTERNAL: u8 = 1;

/// Frontend kinds (for `kproxy status` and for ClusterIP-only decisions).
pub const KIND_CLUSTER_IP: u8 = 0;
pub const KIND_NODE_PORT: u8 = 1;
pub const KIND_EXTERNAL_IP: u8 = 2;
pub const KIND_LOAD_BALANCER: u8 = 3;

/// externalTrafficPolicy Local: no backend means drop (not reject), no SNAT.
pub const FE_LOCAL: u8 = 1;
/// SNAT to the node address when the backend is on another node.
pub const FE_SNAT: u8 = 2;
/// SNAT only when the client is outside the cluster CIDRs (ClusterIP, like
/// iptables mode's `! -s <cluster-cidr> -j MARK-MASQ`).
pub const FE_SNAT_NONCLUSTER: u8 = 4;
/// loadBalancerSourceRanges apply: sources not in `SRC_RANGES` are dropped.
pub const FE_SRC_RANGES: u8 = 8;
/// SNAT only when the packet did not arrive on one of `LOCAL_IFS` (ClusterIP,
/// `--detect-local-mode BridgeInterface` / `InterfaceNamePrefix`, like
/// iptables mode's `! -i cbr0 -j MARK-MASQ`).
pub const FE_SNAT_NONLOCAL_IF: u8 = 16;

/// Backend runs on this node.
pub const BE_LOCAL: u8 = 1;

/// Key of the frontend map: the address a client dials. A node port uses
/// `ip == 0` (any address in `NODE_IPS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub ip: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// A frontend: which slot group holds its backends. Userspace switches a
/// frontend to a new backend set by writing a new group first and then this
/// record, so a lookup sees either the old set or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Frontend {
    /// Slot group id (key of `SLOTS` together with a slot number).
    pub group: u32,
    /// Number of backends; 0 means reject (or drop with `FE_LOCAL`).
    pub count: u32,
    /// Stable id of the Service port (affinity, source ranges, status).
    pub svc_id: u32,
    /// sessionAffinity ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_secs: u32,
    pub flags: u8,
    pub kind: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub group: u32,
    pub slot: u32,
}

/// A backend address (value of `BACKENDS`, keyed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: u32,
    pub port: u16,
    pub flags: u8,
    pub _pad: u8,
}

/// Client of a sessionAffinity entry: an IPv4 address (TC path), or a
/// network-namespace cookie with the top bit set (socket path).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub _pad: u32,
    pub client: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_ns: u64,
}

/// Data of a `SRC_RANGES` LPM key: prefix length = 32 + range prefix, so
/// the Service id always matches in full.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SrcRangeKey {
    /// Big-endian so the LPM trie compares it byte by byte like an address.
    pub svc_id_be: u32,
    pub ip: u32,
}

/// A 5-tuple as seen in a packet (conntrack, SNAT and reverse-NAT keys).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl Tuple {
    /// A flow's NAT key as its backend sees it: (backend, client, backend
    /// port, nat port). The eBPF programs and the garbage collector both
    /// build NAT keys here, so they always agree.
    pub const fn nat_out(
        client: u32,
        backend_ip: u32,
        backend_port: u16,
        nat_port: u16,
        proto: u8,
    ) -> Tuple {
        Tuple {
            src: backend_ip,
            dst: client,
            sport: backend_port,
            dport: nat_port,
            proto,
            _pad: [0; 3],
        }
    }

    /// The SNAT key of a NAT key: the client left out (replies arrive at
    /// the node address).
    pub const fn nat_in(self) -> Tuple {
        Tuple { dst: 0, ..self }
    }
}

/// TC-path connection states (`Flow::state`). Userspace's garbage collector
/// turns a state and the time of the last packet into an expiry.
pub mod ct_state {
    /// A client SYN was seen (retransmissions keep the flow).
    pub const TCP_SYN_SENT: u8 = 1;
    /// The backend answered the SYN.
    pub const TCP_SYN_RECV: u8 = 2;
    /// The client acknowledged the backend's SYN-ACK: an assured flow.
    pub const TCP_ESTABLISHED: u8 = 3;
    /// One side sent a FIN.
    pub const TCP_CLOSE_WAIT: u8 = 4;
    /// Both sides sent a FIN, or one a RST: only late packets are left.
    pub const TCP_CLOSED: u8 = 5;
    /// UDP (or SCTP), no reply yet.
    pub const UDP_NEW: u8 = 6;
    /// The backend replied.
    pub const UDP_REPLIED: u8 = 7;
    /// The client sent again after a reply: an assured stream.
    pub const UDP_STREAM: u8 = 8;
}

/// How long a backend that closed a connection first keeps its 4-tuple in
/// TIME_WAIT: Linux's fixed `TCP_TIMEWAIT_LEN`. A SYN on that 4-tuple from
/// another client socket (whose timestamps and sequence numbers are
/// unrelated) is answered with an ACK instead of a SYN-ACK, so the NAT
/// port search leaves such 4-tuples alone this long.
pub const BACKEND_TIME_WAIT_NS: u64 = 60_000_000_000;

/// `Flow::flags`: SNAT to a node address (decided at ingress, the address
/// itself on the first packet out).
pub const FLOW_SNAT: u8 = 1;
/// The client sent a FIN.
pub const FLOW_FIN_CLIENT: u8 = 2;
/// The backend sent a FIN.
pub const FLOW_FIN_BACKEND: u8 = 4;
/// A connection to no frontend whose 4-tuple clashed with a Service flow
/// at the same backend: only its source port is translated.
pub const FLOW_PASSTHROUGH: u8 = 8;

/// Conntrack entry of a TC-path flow, keyed by the tuple the client sent
/// (client -> frontend). It carries the backend itself, so a backend that
/// leaves its Service keeps its established flows (as netfilter does).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub backend_ip: u32,
    pub backend_port: u16,
    /// Source port towards the backend: the client's own unless it clashed.
    pub nat_port: u16,
    /// SNAT source address, 0 until the first packet leaves (or no SNAT).
    pub snat_ip: u32,
    pub svc_id: u32,
    /// `bpf_ktime_get_ns` of the last packet (refreshed at most once a second).
    pub last_ns: u64,
    /// One of [`ct_state`].
    pub state: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
    /// The sequence number just past the client's FIN, once one was seen:
    /// a backend FIN that acknowledges it is a passive close (no TIME_WAIT
    /// at the backend).
    pub client_fin_end: u32,
}

/// NAT index: a tuple on the backend side leads to its flow. Two kinds of
/// key exist per flow, both with the backend as `src`:
/// - (backend, client, backend port, nat port): every flow; the reply
///   towards the client on egress, and (swapped) the forward packet there;
/// - (backend, 0, backend port, nat port): SNAT flows; the reply to the node
///   address on ingress. It also makes the nat port unique per backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatValue {
    /// The flow's key in `CT` / `CT_NEW`.
    pub flow: Tuple,
    /// When the entry was made: the garbage collector removes orphans only
    /// after a grace period (the flow is written after its NAT entries).
    pub created_ns: u64,
}

/// Key of `FRAGS`: the first fragment's ports are found by IP id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: u32,
    pub dst: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Ports of a fragmented datagram (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Indexes of the per-CPU `STATS` counters.
pub mod stats {
    /// No free NAT port for a flow towards its backend: the packet was dropped.
    pub const NAT_PORT_EXHAUSTED: u32 = 0;
    /// A flow could not be recorded (CT_NEW full and not evictable): dropped.
    pub const CT_INSERT_FAILED: u32 = 1;
    /// A NAT entry could not be written (NAT map full).
    pub const NAT_INSERT_FAILED: u32 = 2;
    /// Established flows could not be promoted to `CT` (full): they stay in `CT_NEW`.
    pub const CT_PROMOTE_FAILED: u32 = 3;
    /// A later fragment whose first fragment was not seen: passed untranslated.
    pub const FRAG_UNKNOWN: u32 = 4;
    /// Flows whose source port was translated around a clash.
    pub const PORT_TRANSLATED: u32 = 5;
    /// ICMP errors translated for a flow.
    pub const ICMP_TRANSLATED: u32 = 6;
    /// Every port towards a backend was in use or still in TIME_WAIT there:
    /// one in TIME_WAIT was reused (the backend may answer the SYN with an
    /// ACK, and the client retries).
    pub const TIME_WAIT_REUSED: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// Socket reverse-NAT key: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Global settings (index 0 of `CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    /// NAT source ports (SNAT, and translation around clashes) are taken
    /// from [snat_port_min, snat_port_max] (host order) except
    /// [skip_min, skip_max] (the node's ephemeral ports, which its own
    /// untracked connections use; skip_min == 0: nothing skipped).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// SNAT source on a device without an address of its own (a pod's)
    /// when the client did not dial a node address.
    pub node_ip: u32,
    pub skip_min: u16,
    pub skip_max: u16,
    pub _pad: u32,
    /// Network namespace cookie of the node (kproxy's own): its sockets
    /// reach node ports on 127.0.0.1 (kube-proxy's localhost node ports).
    /// A pod's 127.0.0.1 is its own. 0: off.
    pub localhost_netns: u64,
}

/// Name of a Service port for status read-back (`ns/name:port`, NUL padded).
pub const SVC_NAME_LEN: usize = 124;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcInfo {
    pub len: u32,
    pub name: [u8; SVC_NAME_LEN],
}

/// Map names, shared so userspace can pin and size them by name.
pub mod maps {
    pub const FRONTENDS: &str = "FRONTENDS";
    pub const SLOTS: &str = "SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SRC_RANGES: &str = "SRC_RANGES";
    pub const CLUSTER_CIDRS: &str = "CLUSTER_CIDRS";
    pub const NODE_IPS: &str = "NODE_IPS";
    pub const IF_ADDRS: &str = "IF_ADDRS";
    /// ifindex -> 1 for the devices whose traffic comes from this node's
    /// pods (`--detect-local-mode BridgeInterface` / `InterfaceNamePrefix`).
    pub const LOCAL_IFS: &str = "LOCAL_IFS";
    /// Assured flows (hash: never evicted; the garbage collector expires them).
    pub const CT: &str = "CT";
    /// Flows not yet assured (LRU: a flood evicts only its own kind).
    pub const CT_NEW: &str = "CT_NEW";
    /// NAT index of assured flows (hash).
    pub const NAT: &str = "NAT";
    /// NAT index of flows not yet assured (LRU).
    pub const NAT_NEW: &str = "NAT_NEW";
    /// Recent connections to no frontend (LRU), so a Service flow never
    /// reuses their 4-tuple at a backend.
    pub const DIRECT: &str = "DIRECT";
    /// Backend-side 4-tuples of flows the backend closed first (LRU): the
    /// backend holds them in TIME_WAIT, so no new flow takes them for
    /// [`super::BACKEND_TIME_WAIT_NS`].
    pub const TIME_WAIT: &str = "TIME_WAIT";
    /// First-fragment ports by IP id (LRU).
    pub const FRAGS: &str = "FRAGS";
    /// Per-CPU counters, see [`super::stats`].
    pub const STATS: &str = "STATS";
    pub const SOCK_REV: &str = "SOCK_REV";
    pub const CONFIG: &str = "CONFIG";
    pub const SVC_INFO: &str = "SVC_INFO";
    /// Every map, for pinning and cleanup.
    pub const ALL: &[&str] = &[
        FRONTENDS,
        SLOTS,
        BACKENDS,
        AFFINITY,
        SRC_RANGES,
        CLUSTER_CIDRS,
        NODE_IPS,
        IF_ADDRS,
        LOCAL_IFS,
        CT,
        CT_NEW,
        NAT,
        NAT_NEW,
        DIRECT,
        TIME_WAIT,
        FRAGS,
        STATS,
        SOCK_REV,
        CONFIG,
        SVC_INFO,
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)], made only of integers, with explicit padding.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SrcRangeKey {}
    unsafe impl aya::Pod for Tuple {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for NatValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SvcInfo {}
}
