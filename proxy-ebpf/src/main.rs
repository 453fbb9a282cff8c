//! kproxy's eBPF programs.
//!
//! - Socket load balancing (cgroup `connect4`, `sendmsg4`, `recvmsg4`,
//!   `getpeername4`, and `connect6`, `recvmsg6`, `getpeername6` for
//!   v4-mapped destinations; in [`sock`]).
//! - TC packet path (clsact ingress/egress on the node's devices) for traffic
//!   that no hooked socket made: connection tracking, NAT, fragments and
//!   ICMP errors; in [`tc`].
//!
//! Maps are described in `proxy-common`; userspace fills the frontend, slot
//! and backend maps, the programs fill conntrack, NAT and affinity state.
#![no_std]
#![no_main]

use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap};
use proxy_common::*;

mod sock;
mod tc;

// Sizes here are placeholders: userspace sets every size from its flags.
#[map]
static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::with_max_entries(1024, 0);
#[map]
static SLOTS: HashMap<SlotKey, u32> = HashMap::with_max_entries(1024, 0);
#[map]
static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(1024, 0);
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::with_max_entries(1024, 0);
#[map]
static SRC_RANGES: LpmTrie<SrcRangeKey, u8> = LpmTrie::with_max_entries(1024, 0);
#[map]
static CLUSTER_CIDRS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(64, 0);
#[map]
static NODE_IPS: HashMap<u32, u8> = HashMap::with_max_entries(256, 0);
#[map]
static IF_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);
/// Devices whose traffic is a local pod's (interface detect-local modes).
#[map]
static LOCAL_IFS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);
#[map]
static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::with_max_entries(1024, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Only read by userspace (`kproxy status`); not preallocated.
#[map]
static SVC_INFO: HashMap<u32, SvcInfo> = HashMap::with_max_entries(1024, 1);

const NS_PER_SEC: u64 = 1_000_000_000;

/// Picks a backend for a new connection: the affinity entry when it is
/// fresh and its backend still exists, else a random slot.
#[inline(always)]
fn select(fe: &Frontend, client: u64, now: u64) -> Option<(u32, Backend)> {
    let akey = AffinityKey {
        svc_id: fe.svc_id,
        _pad: 0,
        client,
    };
    if fe.affinity_secs != 0 {
        // SAFETY: the value is copied out at once.
        if let Some(a) = unsafe { AFFINITY.get(&akey) } {
            let a = *a;
            if now.wrapping_sub(a.last_ns) < fe.affinity_secs as u64 * NS_PER_SEC {
                if let Some(b) = unsafe { BACKENDS.get(&a.backend_id) } {
                    let b = *b;
                    let _ = AFFINITY.insert(
                        &akey,
                        &AffinityValue {
                            backend_id: a.backend_id,
                            _pad: 0,
                            last_ns: now,
                        },
                        0,
                    );
                    return Some((a.backend_id, b));
                }
            }
        }
    }
    if fe.count == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % fe.count;
    let id = *unsafe {
        SLOTS.get(&SlotKey {
            group: fe.group,
            slot,
        })
    }?;
    let b = *unsafe { BACKENDS.get(&id) }?;
    if fe.affinity_secs != 0 {
        let _ = AFFINITY.insert(
            &akey,
            &AffinityValue {
                backend_id: id,
                _pad: 0,
                last_ns: now,
            },
            0,
        );
    }
    Some((id, b))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
