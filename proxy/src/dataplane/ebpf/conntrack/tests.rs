use std::collections::BTreeMap;

use super::*;

type Key = (u32, u32, u16, u16, u8);

/// In-memory maps, walked in key order; the cursor is the next key's
/// source address (unique in these tests), so removals do not shift it.
#[derive(Default)]
struct Fake {
    flows: [BTreeMap<Key, Flow>; 2],
    nats: [BTreeMap<Key, NatValue>; 2],
    backends: HashSet<(u32, u16)>,
    batches: usize,
}

fn k(t: &Tuple) -> (u32, u32, u16, u16, u8) {
    (t.src, t.dst, t.sport, t.dport, t.proto)
}

fn t(k: (u32, u32, u16, u16, u8)) -> Tuple {
    Tuple {
        src: k.0,
        dst: k.1,
        sport: k.2,
        dport: k.3,
        proto: k.4,
        _pad: [0; 3],
    }
}

fn walk<V: Copy>(
    m: &BTreeMap<Key, V>,
    cursor: &mut Cursor,
    chunk: usize,
    out: &mut Vec<(Tuple, V)>,
) -> bool {
    let start = cursor.0.unwrap_or(0) as u32;
    let mut it = m.iter().filter(|(a, _)| a.0 >= start);
    out.extend(it.by_ref().take(chunk).map(|(a, v)| (t(*a), *v)));
    match it.next() {
        None => {
            *cursor = Cursor::default();
            true
        }
        Some((next, _)) => {
            *cursor = Cursor(Some(next.0 as u64));
            false
        }
    }
}

impl CtStore for Fake {
    fn flows(
        &mut self,
        tier: Tier,
        cursor: &mut Cursor,
        chunk: usize,
        out: &mut Vec<(Tuple, Flow)>,
    ) -> io::Result<bool> {
        self.batches += 1;
        Ok(walk(&self.flows[idx(tier)], cursor, chunk.min(2), out))
    }
    fn nats(
        &mut self,
        tier: Tier,
        cursor: &mut Cursor,
        chunk: usize,
        out: &mut Vec<(Tuple, NatValue)>,
    ) -> io::Result<bool> {
        Ok(walk(&self.nats[idx(tier)], cursor, chunk.min(2), out))
    }
    fn flow(&self, tier: Tier, key: &Tuple) -> Option<Flow> {
        self.flows[idx(tier)].get(&k(key)).copied()
    }
    fn nat(&self, tier: Tier, key: &Tuple) -> Option<NatValue> {
        self.nats[idx(tier)].get(&k(key)).copied()
    }
    fn remove_flow(&mut self, tier: Tier, key: &Tuple) {
        self.flows[idx(tier)].remove(&k(key));
    }
    fn remove_nat(&mut self, tier: Tier, key: &Tuple) {
        self.nats[idx(tier)].remove(&k(key));
    }
    fn backends(&self) -> io::Result<HashSet<(u32, u16)>> {
        Ok(self.backends.clone())
    }
}

const SEC: u64 = 1_000_000_000;

fn flow(n: u32, state: u8, last_s: u64, snat: bool) -> (Tuple, Flow) {
    let proto = if state >= UDP_NEW {
        PROTO_UDP
    } else {
        PROTO_TCP
    };
    (
        t((100 + n, 10, 40000 + n as u16, 80, proto)),
        Flow {
            backend_ip: 7,
            backend_port: 8080,
            nat_port: 61000 + n as u16,
            snat_ip: if snat { 5 } else { 0 },
            svc_id: 1,
            last_ns: last_s * SEC,
            state,
            flags: if snat { FLOW_SNAT } else { 0 },
            _pad: [0; 2],
            client_fin_end: 0,
        },
    )
}

impl Fake {
    fn add(&mut self, tier: Tier, (key, f): (Tuple, Flow)) {
        for nk in nat_keys(&key, &f) {
            self.nats[idx(tier)].insert(
                k(&nk),
                NatValue {
                    flow: key,
                    created_ns: f.last_ns,
                },
            );
        }
        self.flows[idx(tier)].insert(k(&key), f);
    }
}

#[test]
fn expired_flows_go_with_their_nat_entries_and_live_ones_stay() {
    let mut s = Fake::default();
    let timeouts = CtTimeouts::default();
    s.add(Tier::Assured, flow(1, TCP_CLOSED, 100, true)); // closed 20 s ago: expired
    s.add(Tier::Assured, flow(2, TCP_ESTABLISHED, 100, true)); // idle 20 s: alive
    s.add(Tier::New, flow(3, TCP_SYN_SENT, 50, false)); // SYN 70 s ago: expired
    s.add(Tier::New, flow(4, UDP_NEW, 110, false)); // 10 s: alive
    let mut c = Collector::new(timeouts, 1000);
    let r = c.sweep(&mut s, 120 * SEC, None).unwrap();
    assert_eq!(r.removed.expired, 2);
    assert_eq!(s.flows[0].len() + s.flows[1].len(), 2);
    // Flow 2 keeps two NAT keys (SNAT), flow 4 one; flows 1 and 3 none left.
    assert_eq!(s.nats[0].len(), 2);
    assert_eq!(s.nats[1].len(), 1);
    assert!(s
        .nats
        .iter()
        .flat_map(|m| m.values())
        .all(|v| v.flow.src == 102 || v.flow.src == 104));
}

#[test]
fn a_flow_refreshed_since_the_batch_read_is_kept() {
    // The batch shows it expired, the re-read shows a fresh packet.
    struct Refreshing(Fake);
    impl CtStore for Refreshing {
        fn flows(
            &mut self,
            tier: Tier,
            c: &mut Cursor,
            n: usize,
            out: &mut Vec<(Tuple, Flow)>,
        ) -> io::Result<bool> {
            let done = self.0.flows(tier, c, n, out)?;
            for f in self.0.flows[idx(tier)].values_mut() {
                f.last_ns = 119 * SEC;
            }
            Ok(done)
        }
        fn nats(
            &mut self,
            tier: Tier,
            c: &mut Cursor,
            n: usize,
            out: &mut Vec<(Tuple, NatValue)>,
        ) -> io::Result<bool> {
            self.0.nats(tier, c, n, out)
        }
        fn flow(&self, tier: Tier, key: &Tuple) -> Option<Flow> {
            self.0.flow(tier, key)
        }
        fn nat(&self, tier: Tier, key: &Tuple) -> Option<NatValue> {
            self.0.nat(tier, key)
        }
        fn remove_flow(&mut self, tier: Tier, key: &Tuple) {
            self.0.remove_flow(tier, key)
        }
        fn remove_nat(&mut self, tier: Tier, key: &Tuple) {
            self.0.remove_nat(tier, key)
        }
        fn backends(&self) -> io::Result<HashSet<(u32, u16)>> {
            self.0.backends()
        }
    }
    let mut s = Refreshing(Fake::default());
    s.0.add(Tier::Assured, flow(1, TCP_CLOSED, 100, false));
    let r = Collector::new(CtTimeouts::default(), 1000)
        .sweep(&mut s, 120 * SEC, None)
        .unwrap();
    assert_eq!(r.removed.expired, 0);
    assert_eq!(s.0.flows[0].len(), 1);
}

#[test]
fn orphan_nat_entries_go_after_the_grace_period() {
    let mut s = Fake::default();
    let (key, f) = flow(1, TCP_SYN_SENT, 100, true);
    s.add(Tier::New, (key, f));
    // The LRU tier evicted the flow, not its NAT entries.
    s.flows[1].clear();
    let mut c = Collector::new(CtTimeouts::default(), 1000);
    let r = c.sweep(&mut s, 102 * SEC, None).unwrap();
    assert_eq!(r.removed.orphan_nat, 0, "within the grace period");
    let r = c.sweep(&mut s, 106 * SEC, None).unwrap();
    assert_eq!(r.removed.orphan_nat, 2);
    assert!(s.nats[1].is_empty());
}

#[test]
fn udp_flows_to_a_removed_backend_go_at_once_tcp_flows_stay() {
    let mut s = Fake::default();
    s.add(Tier::Assured, flow(1, UDP_STREAM, 119, false));
    s.add(Tier::Assured, flow(2, TCP_ESTABLISHED, 119, false));
    let mut other = flow(3, UDP_NEW, 119, false);
    other.1.backend_ip = 9;
    s.add(Tier::New, other);
    let backends: HashSet<(u32, u16)> = [(9, 8080)].into();
    let r = Collector::new(CtTimeouts::default(), 1000)
        .sweep(&mut s, 120 * SEC, Some(&backends))
        .unwrap();
    assert_eq!(r.removed.stale_udp, 1);
    assert_eq!(s.flows[0].len(), 1, "the TCP flow drains");
    assert_eq!(s.flows[1].len(), 1, "UDP to a remaining backend stays");
}

#[test]
fn a_stale_udp_pass_reports_the_fill_too() {
    // Syncs faster than the sweep interval make every sweep a stale-UDP
    // pass: the fill must still be reported.
    let mut s = Fake::default();
    for n in 0..5 {
        s.add(Tier::Assured, flow(n, TCP_ESTABLISHED, 119, false));
    }
    let backends: HashSet<(u32, u16)> = HashSet::new();
    let r = Collector::new(CtTimeouts::default(), 2)
        .sweep(&mut s, 120 * SEC, Some(&backends))
        .unwrap();
    let ct = r.counted.iter().find(|(m, _)| *m == maps::CT);
    assert_eq!(ct, Some(&(maps::CT, 5)), "{:?}", r.counted);
}

#[test]
fn a_sweep_is_bounded_and_the_next_one_continues() {
    let mut s = Fake::default();
    for n in 0..10 {
        s.add(Tier::Assured, flow(n, TCP_CLOSED, 1, false));
    }
    let mut c = Collector::new(CtTimeouts::default(), 4);
    let mut sweeps = 0;
    let mut counted = None;
    while !s.flows[0].is_empty() {
        let before = s.flows[0].len();
        let r = c.sweep(&mut s, 1000 * SEC, None).unwrap();
        assert!(
            before - s.flows[0].len() <= 4,
            "at most the budget per sweep"
        );
        if let Some((_, n)) = r.counted.iter().find(|(m, _)| *m == maps::CT) {
            counted.get_or_insert(*n);
        }
        sweeps += 1;
        assert!(sweeps < 10);
    }
    assert!(sweeps >= 3);
    assert_eq!(counted, Some(10), "a completed walk reports what it saw");
}

#[test]
fn timeouts_by_state() {
    let t = CtTimeouts::default();
    assert_eq!(t.of(TCP_SYN_SENT), Duration::from_secs(60));
    assert_eq!(t.of(TCP_ESTABLISHED), Duration::from_secs(86400));
    assert_eq!(t.of(TCP_CLOSE_WAIT), Duration::from_secs(3600));
    assert_eq!(t.of(UDP_NEW), Duration::from_secs(30));
    assert_eq!(t.of(UDP_STREAM), Duration::from_secs(120));
    assert_eq!(t.shortest(), Duration::from_secs(10));
}
