//! The control plane's cost per Service (criterion), from parsed objects to
//! the eBPF writer's map operations, over tables that keep nothing (the
//! kernel's map writes are not counted; see `tables::discard`). The
//! Services are the bench's (`kproxy_tests::generated`: 10 endpoints each,
//! every 10th a NodePort), read from a temporary directory.
//!
//! - `full_sync/N`: N Services' events applied to a new change tracker,
//!   the first change set taken, and a new writer's full sync of it.
//! - `endpoint_change/N`: one EndpointSlice changed among N Services
//!   (checked, applied, change set taken, the writer's partial sync).
//! - `parse/N`: the manifest source reading, parsing and checking N
//!   Services' files (`load_events`).
//!
//! Criterion prints the time per iteration and the Services per second
//! (`thrpt`); the cost per Service is the former divided by N.
//!
//! ```text
//! cargo bench -p kproxy --bench control_plane
//! cargo bench -p kproxy --bench control_plane -- endpoint_change
//! ```
//!
//! No root needed.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use kproxy::dataplane::ebpf::tables::discard;
use kproxy::dataplane::ebpf::writer::Writer;
use kproxy::dataplane::DataplaneConfig;
use kproxy::model::{Event, ModelConfig, Object, Tracker};
use kproxy::source::manifest::load_events;
use kproxy_tests::generated;

const SIZES: [usize; 2] = [1_000, 10_000];

/// The generated manifests of `services` Services, in a directory that
/// lives as long as the returned guard.
fn manifests(services: usize) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kproxy-bench-cp-")
        .tempdir()
        .expect("temporary directory");
    generated::generate(dir.path(), services).expect("generated manifests");
    dir
}

fn configs() -> (ModelConfig, DataplaneConfig) {
    let model = ModelConfig {
        node_name: generated::NODE_NAME.into(),
    };
    let dataplane = DataplaneConfig {
        cluster_cidrs: vec![generated::CLUSTER_CIDR.parse().expect("cluster CIDR")],
        ..DataplaneConfig::default()
    };
    (model, dataplane)
}

/// From events to a programmed (discarding) writer, as kproxy's first sync.
fn first_sync(events: Vec<Event>, model: &ModelConfig, dp: &DataplaneConfig) -> (Tracker, Writer) {
    let mut tracker = Tracker::new(model.clone());
    for ev in events {
        tracker.apply(ev);
    }
    let changes = tracker.take_changes();
    let mut writer = Writer::over(discard::tables(), None).expect("writer");
    writer
        .sync(tracker.state(), &changes, &[], true, dp)
        .expect("full sync");
    (tracker, writer)
}

fn full_sync(c: &mut Criterion) {
    let (model, dp) = configs();
    let mut group = c.benchmark_group("full_sync");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for n in SIZES {
        let dir = manifests(n);
        let events = load_events(dir.path()).expect("manifests load");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &events, |b, events| {
            // The state built is dropped outside the timing.
            b.iter_batched(
                || events.clone(),
                |events| first_sync(events, &model, &dp),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn endpoint_change(c: &mut Criterion) {
    let (model, dp) = configs();
    let mut group = c.benchmark_group("endpoint_change");
    for n in SIZES {
        let dir = manifests(n);
        let events = load_events(dir.path()).expect("manifests load");
        let (mut tracker, mut writer) = first_sync(events, &model, &dp);
        // Two versions of one Service's slice: its first endpoint replaced
        // by another address and back, as a pod replaced.
        let before = tracker.objects().endpoint_slices[n / 2].clone();
        let mut after = (*before).clone();
        let endpoint = after
            .endpoints
            .iter_mut()
            .flatten()
            .next()
            .expect("a generated slice has endpoints");
        endpoint.addresses = vec!["10.200.0.1".into()];
        let versions = [Arc::new(after), before];
        let mut k = 0;
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let slice = versions[k % 2].clone();
                k += 1;
                tracker.apply(Event::upsert(Object::EndpointSlice(slice)));
                let changes = tracker.take_changes();
                assert_eq!(changes.len(), 1, "one Service port changed");
                let (counts, errors) = writer
                    .sync(tracker.state(), &changes, &[], false, &dp)
                    .expect("partial sync");
                black_box((counts, errors))
            })
        });
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.sample_size(10);
    let n = 1_000;
    let dir = manifests(n);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter(|| load_events(dir.path()).expect("manifests load"))
    });
    group.finish();
}

criterion_group!(benches, full_sync, endpoint_change, parse);
criterion_main!(benches);
