//! The garbage collector's thread: the pinned maps as a [`CtStore`], the
//! sweep timer, the wake-up after a sync, map-pressure and datapath-event
//! metrics, and a once-a-minute warning when the datapath dropped packets
//! for want of room (naming the flag that gives more).

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, PerCpuArray};
use prometheus::core::Collector as _;
use prometheus::{GaugeVec, IntCounterVec, Opts};
use proxy_common::maps as names;
use proxy_common::*;
use tracing::{debug, warn};

use super::batch::{lookup_batch, Cursor};
use super::conntrack::{idx, Collector, CtStore, CtTimeouts, Tier};
use super::maps::{maps_dir, Maps};
use crate::dataplane::DataplaneError;

type FlowMap = HashMap<MapData, Tuple, Flow>;
type NatMap = HashMap<MapData, Tuple, NatValue>;

fn open<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    pin: &Path,
    name: &str,
) -> Result<T, DataplaneError> {
    let data =
        MapData::from_pin(maps_dir(pin).join(name)).map_err(|e| super::maps::map_err(name, e))?;
    let map = aya::maps::Map::from_map_data(data).map_err(|e| super::maps::map_err(name, e))?;
    T::try_from(map).map_err(|e| super::maps::map_err(name, e))
}

/// A second handle on a pinned map, for the batch syscalls.
fn raw_handle(pin: &Path, name: &str) -> Result<MapData, DataplaneError> {
    MapData::from_pin(maps_dir(pin).join(name)).map_err(|e| super::maps::map_err(name, e))
}

/// The pinned conntrack maps.
pub struct PinnedStore {
    ct: FlowMap,
    ct_new: FlowMap,
    nat: NatMap,
    nat_new: NatMap,
    /// CT, CT_NEW, NAT, NAT_NEW for batch lookups.
    raw: [MapData; 4],
    backends: HashMap<MapData, u32, Backend>,
    stats: PerCpuArray<MapData, u64>,
}

fn raw(m: &MapData) -> RawFd {
    m.fd().as_fd().as_raw_fd()
}

impl PinnedStore {
    pub fn open(pin: &Path) -> Result<PinnedStore, DataplaneError> {
        Ok(PinnedStore {
            ct: open(pin, names::CT)?,
            ct_new: open(pin, names::CT_NEW)?,
            nat: open(pin, names::NAT)?,
            nat_new: open(pin, names::NAT_NEW)?,
            raw: [
                raw_handle(pin, names::CT)?,
                raw_handle(pin, names::CT_NEW)?,
                raw_handle(pin, names::NAT)?,
                raw_handle(pin, names::NAT_NEW)?,
            ],
            backends: open(pin, names::BACKENDS)?,
            stats: open(pin, names::STATS)?,
        })
    }

    fn flows_of(&self, t: Tier) -> &FlowMap {
        match t {
            Tier::Assured => &self.ct,
            Tier::New => &self.ct_new,
        }
    }

    fn nats_of(&self, t: Tier) -> &NatMap {
        match t {
            Tier::Assured => &self.nat,
            Tier::New => &self.nat_new,
        }
    }

    /// The datapath's event counters, summed over CPUs.
    pub fn stats(&self) -> [u64; stats::COUNT as usize] {
        let mut out = [0u64; stats::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = self.stats.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }
}

impl CtStore for PinnedStore {
    fn flows(
        &mut self,
        tier: Tier,
        cursor: &mut Cursor,
        chunk: usize,
        out: &mut Vec<(Tuple, Flow)>,
    ) -> io::Result<bool> {
        let m = &self.raw[idx(tier)];
        lookup_batch(raw(m), cursor, chunk, out)
    }
    fn nats(
        &mut self,
        tier: Tier,
        cursor: &mut Cursor,
        chunk: usize,
        out: &mut Vec<(Tuple, NatValue)>,
    ) -> io::Result<bool> {
        let m = &self.raw[2 + idx(tier)];
        lookup_batch(raw(m), cursor, chunk, out)
    }
    fn flow(&self, tier: Tier, key: &Tuple) -> Option<Flow> {
        self.flows_of(tier).get(key, 0).ok()
    }
    fn nat(&self, tier: Tier, key: &Tuple) -> Option<NatValue> {
        self.nats_of(tier).get(key, 0).ok()
    }
    fn remove_flow(&mut self, tier: Tier, key: &Tuple) {
        let m = match tier {
            Tier::Assured => &mut self.ct,
            Tier::New => &mut self.ct_new,
        };
        let _ = m.remove(key);
    }
    fn remove_nat(&mut self, tier: Tier, key: &Tuple) {
        let m = match tier {
            Tier::Assured => &mut self.nat,
            Tier::New => &mut self.nat_new,
        };
        let _ = m.remove(key);
    }
    fn backends(&self) -> io::Result<HashSet<(u32, u16)>> {
        // In batches, as the sweeps read the conntrack maps: this runs
        // after every change to the backends, and a key-by-key walk of
        // 100,000 backends is 200,000 syscalls.
        let all = super::batch::dump_all::<u32, Backend>(raw(aya::maps::IterableMap::map(
            &self.backends,
        )))?;
        Ok(all.into_iter().map(|(_, b)| (b.ip, b.port)).collect())
    }
}

/// Settings of the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcConfig {
    pub timeouts: CtTimeouts,
    /// Time between sweeps.
    pub interval: Duration,
    /// Entries looked at per map per sweep.
    pub budget: usize,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            timeouts: CtTimeouts::default(),
            interval: Duration::from_secs(5),
            budget: 65_536,
        }
    }
}

/// The collector's metrics (registered by `kproxy run`).
#[derive(Clone)]
pub struct GcMetrics {
    pressure: GaugeVec,
    events: IntCounterVec,
    removed: IntCounterVec,
}

impl GcMetrics {
    fn new() -> GcMetrics {
        GcMetrics {
            pressure: GaugeVec::new(
                Opts::new(
                    "kproxy_bpf_map_pressure",
                    "Fill ratio (entries / max entries) of the eBPF conntrack and NAT maps, as of the last complete garbage-collector walk",
                ),
                &["map"],
            )
            .expect("valid gauge"),
            events: IntCounterVec::new(
                Opts::new(
                    "kproxy_bpf_datapath_events_total",
                    "Events of the TC datapath: nat_port_exhausted, ct_insert_failed, nat_insert_failed, ct_promote_failed (packets dropped or flows kept embryonic for want of room), frag_unknown, port_translated, icmp_translated, time_wait_reused (a NAT port still in its backend's TIME_WAIT had to be reused: every other port was taken)",
                ),
                &["event"],
            )
            .expect("valid counter"),
            removed: IntCounterVec::new(
                Opts::new(
                    "kproxy_bpf_conntrack_removed_total",
                    "Flows and NAT entries the garbage collector removed, by reason (expired, stale_udp, orphan_nat)",
                ),
                &["reason"],
            )
            .expect("valid counter"),
        }
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.pressure.clone()),
            Box::new(self.events.clone()),
            Box::new(self.removed.clone()),
        ]
    }

    #[cfg(test)]
    pub fn pressure(&self, map: &str) -> f64 {
        self.pressure.with_label_values(&[map]).get()
    }

    /// Every metric's text, for tests.
    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut out = self.pressure.collect();
        out.extend(self.events.collect());
        out.extend(self.removed.collect());
        out
    }
}

const EVENT_NAMES: [&str; stats::COUNT as usize] = [
    "nat_port_exhausted",
    "ct_insert_failed",
    "nat_insert_failed",
    "ct_promote_failed",
    "frag_unknown",
    "port_translated",
    "icmp_translated",
    "time_wait_reused",
];

/// What the fix is when an event that drops packets (or, for TIME_WAIT
/// reuse, delays a connection) happens.
fn remedy(event: u32) -> Option<&'static str> {
    match event {
        stats::NAT_PORT_EXHAUSTED => Some(
            "every NAT port towards a backend is in use: widen --bpf-nat-port-range or shorten --bpf-ct-timeout-close",
        ),
        stats::CT_INSERT_FAILED => Some("map CT_NEW is full: raise --bpf-ct-map-max"),
        stats::NAT_INSERT_FAILED => Some("map NAT is full: raise --bpf-ct-map-max"),
        stats::CT_PROMOTE_FAILED => {
            Some("map CT (assured flows) is full: raise --bpf-ct-map-max")
        }
        stats::TIME_WAIT_REUSED => Some(
            "backends that close connections first still hold every other NAT port in TIME_WAIT: widen --bpf-nat-port-range",
        ),
        _ => None,
    }
}

struct Shared {
    stop: bool,
    backends_changed: bool,
}

/// The running collector; stopping it (drop) joins its thread.
pub struct GcHandle {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    pub metrics: GcMetrics,
}

impl GcHandle {
    /// Backends were removed: UDP flows to them go at the next sweep, now.
    pub fn backends_changed(&self) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut s) = lock.lock() {
            s.backends_changed = true;
            cv.notify_all();
        }
    }
}

impl Drop for GcHandle {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            if let Ok(mut s) = lock.lock() {
                s.stop = true;
            }
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `bpf_ktime_get_ns`'s clock.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Starts the collector on the maps pinned under `pin`.
pub fn spawn(pin: &Path, config: GcConfig) -> Result<GcHandle, DataplaneError> {
    let mut store = PinnedStore::open(pin)?;
    let capacity: Vec<(&'static str, u32)> = [names::CT, names::CT_NEW, names::NAT, names::NAT_NEW]
        .into_iter()
        .map(|n| Ok((n, Maps::capacity(pin, n)?)))
        .collect::<Result<_, DataplaneError>>()?;
    let shared = Arc::new((
        Mutex::new(Shared {
            stop: false,
            backends_changed: false,
        }),
        Condvar::new(),
    ));
    let metrics = GcMetrics::new();
    let thread = {
        let shared = shared.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("kproxy-ct-gc".into())
            .spawn(move || run(&mut store, config, &capacity, &shared, &metrics))
            .map_err(DataplaneError::Io)?
    };
    Ok(GcHandle {
        shared,
        thread: Some(thread),
        metrics,
    })
}

fn run(
    store: &mut PinnedStore,
    config: GcConfig,
    capacity: &[(&'static str, u32)],
    shared: &(Mutex<Shared>, Condvar),
    metrics: &GcMetrics,
) {
    let mut collector = Collector::new(config.timeouts, config.budget);
    let mut last_stats = store.stats();
    let mut reported = last_stats;
    let mut last_report = Instant::now();
    for (i, name) in EVENT_NAMES.iter().enumerate() {
        metrics
            .events
            .with_label_values(&[name])
            .inc_by(last_stats[i]);
    }
    loop {
        let backends_changed = {
            let (lock, cv) = shared;
            let Ok(guard) = lock.lock() else { return };
            let Ok((mut guard, _)) =
                cv.wait_timeout_while(guard, config.interval, |s| !s.stop && !s.backends_changed)
            else {
                return;
            };
            if guard.stop {
                return;
            }
            std::mem::take(&mut guard.backends_changed)
        };
        let backends = if backends_changed {
            match store.backends() {
                Ok(b) => Some(b),
                Err(e) => {
                    warn!(error = %e, "reading the backend map for stale UDP flows");
                    None
                }
            }
        } else {
            None
        };
        let started = Instant::now();
        match collector.sweep(store, monotonic_ns(), backends.as_ref()) {
            Ok(report) => {
                let r = report.removed;
                for (reason, n) in [
                    ("expired", r.expired),
                    ("stale_udp", r.stale_udp),
                    ("orphan_nat", r.orphan_nat),
                ] {
                    metrics.removed.with_label_values(&[reason]).inc_by(n);
                }
                for (map, n) in &report.counted {
                    if let Some((_, cap)) = capacity.iter().find(|(m, _)| m == map) {
                        metrics
                            .pressure
                            .with_label_values(&[map])
                            .set(*n as f64 / (*cap).max(1) as f64);
                    }
                }
                debug!(?r, took = ?started.elapsed(), "conntrack sweep");
            }
            Err(e) => {
                warn!(error = %e, "conntrack garbage collection failed; retried at the next sweep")
            }
        }
        let now = store.stats();
        for (i, name) in EVENT_NAMES.iter().enumerate() {
            let delta = now[i].saturating_sub(last_stats[i]);
            if delta > 0 {
                metrics.events.with_label_values(&[name]).inc_by(delta);
            }
        }
        last_stats = now;
        if last_report.elapsed() >= Duration::from_secs(60) {
            for (i, name) in EVENT_NAMES.iter().enumerate() {
                let delta = now[i].saturating_sub(reported[i]);
                if delta > 0 {
                    if let Some(fix) = remedy(i as u32) {
                        warn!(
                            event = name,
                            count = delta,
                            "eBPF datapath dropped or delayed connections in the last minute: {fix}"
                        );
                    }
                }
            }
            reported = now;
            last_report = Instant::now();
        }
    }
}
