//! What the control plane costs per Service, stage by stage: the manifest
//! source's state, the change tracker, the first change set, the eBPF
//! writer's mirror, the sync loop's frontend status table. Heap bytes held after each stage (a counting global
//! allocator: the bytes the process asked for and has not freed) and the
//! time each took. No root needed: the writer writes into tables that keep
//! nothing (the kernel's maps are not this process's heap).
//!
//! ```text
//! cargo run --release -p kproxy-bench -- manifests /tmp/m10k --services 10000
//! cargo run --release -p kproxy --example control_plane_cost -- /tmp/m10k [--updates 1000]
//! ```
//!
//! `--updates N` then switches the endpoints of N Services one at a time
//! (as the bench's endpoint changes do) and reports the heap again.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use kproxy::dataplane::ebpf::tables::discard;
use kproxy::dataplane::ebpf::writer::Writer;
use kproxy::dataplane::DataplaneConfig;
use kproxy::model::{Event, Kind, ModelConfig, Object, Tracker};
use kproxy::source::ManifestSource;
use kproxy::sync::frontends::FrontendTable;

struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; the
// counter only adds and subtracts the sizes of what it returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HELD.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HELD.fetch_sub(layout.size(), Ordering::Relaxed);
            HELD.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn held() -> usize {
    HELD.load(Ordering::Relaxed)
}

/// CPU time this process has used, in ms (the stages run on one thread,
/// so a stage's CPU time does not depend on how loaded the machine is,
/// unlike its wall time).
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
}

struct Report {
    services: usize,
    last: usize,
    cpu: f64,
}

impl Report {
    fn stage(&mut self, what: &str, started: Instant) {
        let now = held();
        let delta = now as i64 - self.last as i64;
        let cpu = cpu_ms();
        println!(
            "{what:<44} {:>8.1} ms ({:>7.1} ms CPU)  heap {:>7.1} MiB  {:>+8.1} MiB  {:>+7} B/Service",
            started.elapsed().as_secs_f64() * 1000.0,
            cpu - self.cpu,
            now as f64 / 1048576.0,
            delta as f64 / 1048576.0,
            delta / self.services.max(1) as i64,
        );
        self.last = now;
        self.cpu = cpu;
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .context("usage: control_plane_cost DIR [--updates N]")?,
    );
    let updates: usize = match (args.next().as_deref(), args.next()) {
        (Some("--updates"), Some(n)) => n.parse()?,
        _ => 0,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut r = Report {
        services: 0,
        last: held(),
        cpu: cpu_ms(),
    };

    // The source keeps its state while it runs (it is kept running here).
    let t = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // As `kproxy run` has it: only the checked parts of objects.
    let source = ManifestSource::new(dir.clone()).without_objects();
    rt.spawn(async move { source.run(tx).await });
    let events = rt.block_on(rx.recv()).context("the source sent nothing")?;
    r.services = events
        .iter()
        .filter(|e| matches!(e, Event::Upsert(c) if c.key().kind == Kind::Service))
        .count();
    r.stage(
        &format!("source: read and check ({} Services)", r.services),
        t,
    );

    let t = Instant::now();
    let mut tracker = Tracker::new(ModelConfig {
        node_name: "node1".into(),
    });
    for ev in events {
        tracker.apply(ev);
    }
    r.stage("tracker: events applied", t);
    let t = Instant::now();
    let changes = tracker.take_changes();
    r.stage("tracker: first take_changes (with its ChangeSet)", t);

    let t = Instant::now();
    let config = DataplaneConfig {
        cluster_cidrs: vec!["10.128.0.0/9".parse()?],
        ..DataplaneConfig::default()
    };
    let mut writer = Writer::over(discard::tables(), None)?;
    writer.sync(tracker.state(), &changes, &[], true, &config)?;
    r.stage("writer: first full sync (its mirror)", t);
    let t = Instant::now();
    let mut status = FrontendTable::default();
    status.begin(tracker.state(), &changes, &[], true, Instant::now());
    status.finish(Ok(&[]), Instant::now());
    r.stage("frontend status: first full sync", t);
    let t = Instant::now();
    drop(changes);
    r.stage("first ChangeSet dropped", t);

    if updates > 0 {
        // The tracker keeps no objects: the slices to change are read
        // again (freed before the stage is measured).
        let slices: Vec<_> = kproxy::source::manifest::load_dir(&dir)?
            .objects
            .endpoint_slices
            .iter()
            .take(updates)
            .cloned()
            .collect();
        r.cpu = cpu_ms();
        let t = Instant::now();
        let mut in_status = std::time::Duration::ZERO;
        for (i, slice) in slices.iter().take(updates).enumerate() {
            let mut s = (**slice).clone();
            // Another address for the first endpoint, as a pod replaced.
            if let Some(e) = s.endpoints.iter_mut().flatten().next() {
                e.addresses = vec![format!("10.200.{}.{}", i / 250, i % 250 + 1)];
            }
            tracker.apply(Event::Upsert(
                Object::EndpointSlice(std::sync::Arc::new(s)).check_keeping(false),
            ));
            let changes = tracker.take_changes();
            writer.sync(tracker.state(), &changes, &[], false, &config)?;
            let s = Instant::now();
            status.begin(tracker.state(), &changes, &[], false, Instant::now());
            status.finish(Ok(&[]), Instant::now());
            in_status += s.elapsed();
        }
        drop(slices);
        r.stage(&format!("{updates} endpoint updates, one sync each"), t);
        println!(
            "  of which the frontend status table: {:.1} ms ({:.2} us per sync)",
            in_status.as_secs_f64() * 1000.0,
            in_status.as_secs_f64() * 1e6 / updates as f64
        );
    }
    Ok(())
}
