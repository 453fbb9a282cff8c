//! Tests with real files in a temporary directory and real inotify.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::*;
use crate::model::Rejection;
use crate::source::EventReceiver;

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

fn svc(name: &str, port: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: 10.96.0.20\n  ports:\n  - name: http\n    port: {port}\n    protocol: TCP\n"
    )
}

fn names(snap: &Snapshot) -> Vec<String> {
    let o = &snap.objects;
    let mut v: Vec<String> = o
        .services
        .iter()
        .map(|s| {
            format!(
                "Service {}/{}",
                s.metadata.namespace.as_deref().unwrap_or(""),
                s.metadata.name.as_deref().unwrap_or("")
            )
        })
        .chain(o.endpoint_slices.iter().map(|s| {
            format!(
                "EndpointSlice {}/{}",
                s.metadata.namespace.as_deref().unwrap_or(""),
                s.metadata.name.as_deref().unwrap_or("")
            )
        }))
        .chain(
            o.nodes
                .iter()
                .map(|n| format!("Node {}", n.metadata.name.as_deref().unwrap_or(""))),
        )
        .collect();
    v.sort();
    v
}

fn service_port(snap: &Snapshot, name: &str) -> Option<i32> {
    snap.objects
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .and_then(|s| s.spec.as_ref()?.ports.as_ref()?.first().map(|p| p.port))
}

fn only_rejection(snap: &Snapshot) -> &Rejection {
    assert_eq!(snap.rejected.len(), 1, "rejections: {:#?}", snap.rejected);
    &snap.rejected[0]
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests")
}

// ------------------------------------------------------------- load_dir

#[test]
fn examples_load_cleanly_and_build() {
    let snap = load_dir(&examples_dir()).unwrap();
    assert!(snap.synced);
    assert!(snap.rejected.is_empty(), "{:#?}", snap.rejected);
    assert_eq!(snap.objects.services.len(), 3);
    assert_eq!(snap.objects.endpoint_slices.len(), 3);
    assert_eq!(snap.objects.nodes.len(), 2);
    let state = crate::model::build(
        &snap.objects,
        &crate::model::ModelConfig {
            node_name: "node1".into(),
        },
    );
    assert!(state.rejected.is_empty(), "{:#?}", state.rejected);
    assert_eq!(state.services.len(), 3);
    for port in state.services.values() {
        assert_eq!(port.port, 80);
        assert_eq!(port.all_endpoints.len(), 2, "{}", port.name);
        assert!(port.all_endpoints.iter().all(|e| e.port == 8080));
    }
}

#[test]
fn multi_document_files_lists_and_ignored_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(
        d,
        "a.yaml",
        &format!(
            "---\n# only a comment\n---\n{}---\n{}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\nspec: {{whatever: 1}}\n",
            svc("one", 80),
            svc("two", 81)
        ),
    );
    write(
        d,
        "sub/list.yml",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: node1}\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: one-1\n    namespace: prod\n    labels: {kubernetes.io/service-name: one}\n  addressType: IPv4\n  endpoints:\n  - addresses: [10.244.1.5]\n  ports:\n  - port: 8080\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: cm}\n",
    );
    write(
        d,
        "typed.json",
        r#"{"apiVersion": "v1", "kind": "ServiceList", "items": [{"metadata": {"name": "three"}, "spec": {"ports": [{"port": 82}]}}]}"#,
    );
    // Not manifests: ignored even though they would not parse.
    write(d, ".hidden.yaml", "{{{");
    write(d, ".#a.yaml", "{{{");
    write(d, "a.yaml~", "{{{");
    write(d, "a.yaml.swp", "{{{");
    write(d, "notes.txt", "{{{");
    write(d, "values.yaml", "replicas: 3\nimage: nginx\n");

    let snap = load_dir(d).unwrap();
    assert!(snap.rejected.is_empty(), "{:#?}", snap.rejected);
    assert_eq!(
        names(&snap),
        [
            "EndpointSlice prod/one-1",
            "Node node1",
            "Service default/one",
            "Service default/three",
            "Service default/two",
        ]
    );
    assert_eq!(service_port(&snap, "two"), Some(81));
    // The Node stays cluster-scoped.
    assert_eq!(snap.objects.nodes[0].metadata.namespace, None);
}

#[test]
fn yaml_syntax_error_names_file_document_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "dir/bad.yaml",
        &format!("{}---\nkind: Service\n  bad: [\n", svc("one", 80)),
    );
    let snap = load_dir(tmp.path()).unwrap();
    let r = only_rejection(&snap);
    assert_eq!(r.reason, "parse_error");
    let origin = r.origin.as_deref().unwrap();
    assert!(
        origin.starts_with("dir/bad.yaml, document 2, line "),
        "{origin}"
    );
    // Nothing good before: what parsed is used.
    assert_eq!(names(&snap), ["Service default/one"]);
}

#[test]
fn wrong_api_version_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "s.yaml",
        "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s1, namespace: ns}\naddressType: IPv4\nendpoints: []\n",
    );
    let snap = load_dir(tmp.path()).unwrap();
    let r = only_rejection(&snap);
    assert_eq!(
        (
            r.kind.as_str(),
            r.namespace.as_str(),
            r.name.as_str(),
            r.field.as_str(),
            r.reason.as_str()
        ),
        (
            "EndpointSlice",
            "ns",
            "s1",
            "apiVersion",
            "invalid_api_version"
        )
    );
    assert_eq!(r.origin.as_deref(), Some("s.yaml, document 1"));
    assert!(r.message.contains("discovery.k8s.io/v1"), "{}", r.message);
    assert!(snap.objects.endpoint_slices.is_empty());
}

#[test]
fn unknown_fields_are_reported_with_their_path() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "s.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - port: 80\n    prot: 81\n",
    );
    write(
        tmp.path(),
        "t.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\n  nodename: node1\n",
    );
    let snap = load_dir(tmp.path()).unwrap();
    assert_eq!(snap.rejected.len(), 2, "{:#?}", snap.rejected);
    // Sorted: EndpointSlice before Service.
    let r = &snap.rejected[1];
    assert_eq!(
        (
            r.kind.as_str(),
            r.name.as_str(),
            r.field.as_str(),
            r.reason.as_str()
        ),
        ("Service", "web", "spec.ports[0].prot", "unknown_field")
    );
    assert_eq!(r.origin.as_deref(), Some("s.yaml, document 1"));
    let r = &snap.rejected[0];
    assert_eq!(
        (r.kind.as_str(), r.field.as_str(), r.reason.as_str()),
        ("EndpointSlice", "endpoints[0].nodename", "unknown_field")
    );
    assert!(snap.objects.services.is_empty() && snap.objects.endpoint_slices.is_empty());
}

#[test]
fn type_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "s.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec:\n  ports:\n  - port: eighty\n",
    );
    let snap = load_dir(tmp.path()).unwrap();
    let r = only_rejection(&snap);
    assert_eq!(
        (
            r.kind.as_str(),
            r.namespace.as_str(),
            r.name.as_str(),
            r.field.as_str(),
            r.reason.as_str()
        ),
        ("Service", "ns", "web", "spec.ports[0].port", "parse_error")
    );
}

#[test]
fn model_validation_errors_carry_origin() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "s.yaml",
        &format!("{}---\n{}", svc("ok", 80), svc("bad", 70000)),
    );
    let snap = load_dir(tmp.path()).unwrap();
    let r = only_rejection(&snap);
    assert_eq!(
        (r.kind.as_str(), r.name.as_str(), r.field.as_str()),
        ("Service", "bad", "spec.ports[0].port")
    );
    assert_eq!(r.origin.as_deref(), Some("s.yaml, document 2"));
    assert_eq!(names(&snap), ["Service default/ok"]);
}

#[test]
fn duplicates_later_file_wins() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "a.yaml", &svc("web", 80));
    write(tmp.path(), "b/c.yaml", &svc("web", 81));
    let snap = load_dir(tmp.path()).unwrap();
    assert_eq!(service_port(&snap, "web"), Some(81));
    assert_eq!(snap.objects.services.len(), 1);
    let r = only_rejection(&snap);
    assert_eq!(r.reason, "duplicate_object");
    assert_eq!(r.origin.as_deref(), Some("b/c.yaml, document 1"));
    assert!(r.message.contains("a.yaml, document 1"), "{}", r.message);

    // Within one file: the later document wins.
    write(
        tmp.path(),
        "b/c.yaml",
        &format!("{}---\n{}", svc("web", 82), svc("web", 83)),
    );
    let snap = load_dir(tmp.path()).unwrap();
    assert_eq!(service_port(&snap, "web"), Some(83));
    assert_eq!(snap.objects.services.len(), 1);
    assert_eq!(snap.rejected.len(), 2, "{:#?}", snap.rejected);
    assert!(snap.rejected.iter().all(|r| r.reason == "duplicate_object"));
    assert!(snap
        .rejected
        .iter()
        .any(|r| r.origin.as_deref() == Some("b/c.yaml, document 2")
            && r.message.contains("b/c.yaml, document 1")));
}

#[test]
fn missing_directory_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let err = load_dir(&missing).unwrap_err();
    assert!(matches!(err, SourceError::DirNotFound { .. }));
    assert!(err.to_string().contains("nope"), "{err}");
    write(tmp.path(), "file.yaml", "");
    let err = load_dir(&tmp.path().join("file.yaml")).unwrap_err();
    assert!(matches!(err, SourceError::NotADirectory { .. }), "{err}");
}

#[test]
fn last_good_state_across_scans() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(
        d,
        "a.yaml",
        &format!("{}---\n{}", svc("one", 80), svc("two", 90)),
    );
    write(d, "other.yaml", &svc("other", 70));
    let mut state = DirState::new(d.to_path_buf());
    let mut snap = Snapshot::default();
    // Each scan tells what changed; folded, it is the whole state.
    let mut scan = |snap: &mut Snapshot| {
        let events = state.scan().unwrap();
        snap.apply(events.clone());
        events
    };
    let first = scan(&mut snap);
    assert_eq!(first.len(), 3, "one upsert per object: {first:#?}");
    assert!(snap.rejected.is_empty());

    // Broken edit: both objects of the file stay as they were.
    write(
        d,
        "a.yaml",
        &format!("{}---\n{}  oops: [\n", svc("one", 81), svc("two", 91)),
    );
    scan(&mut snap);
    assert_eq!(service_port(&snap, "one"), Some(80));
    assert_eq!(service_port(&snap, "two"), Some(90));
    assert_eq!(service_port(&snap, "other"), Some(70));
    let r = only_rejection(&snap);
    assert_eq!(r.reason, "parse_error");
    assert!(r
        .origin
        .as_deref()
        .unwrap()
        .starts_with("a.yaml, document 2"));
    assert!(r.message.contains("last good"), "{}", r.message);

    // An object that stops validating keeps its previous version; the rest updates.
    write(
        d,
        "a.yaml",
        &format!("{}---\n{}", svc("one", 82), svc("two", 0)),
    );
    let events = scan(&mut snap);
    // Only what changed is told: `one`, and the problems; `two` keeps the
    // version already told, `other` is in another file.
    let upserts: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Upsert(c) => Some(c.key().name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(upserts, ["one"]);
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(service_port(&snap, "one"), Some(82));
    assert_eq!(service_port(&snap, "two"), Some(90));
    assert_eq!(only_rejection(&snap).name, "two");

    // Fixed: the new versions, no more rejections.
    write(
        d,
        "a.yaml",
        &format!("{}---\n{}", svc("one", 83), svc("two", 93)),
    );
    scan(&mut snap);
    assert!(snap.rejected.is_empty(), "{:#?}", snap.rejected);
    assert_eq!(service_port(&snap, "one"), Some(83));
    assert_eq!(service_port(&snap, "two"), Some(93));

    // Deleted: its objects go, others stay.
    std::fs::remove_file(d.join("a.yaml")).unwrap();
    let events = scan(&mut snap);
    assert_eq!(names(&snap), ["Service default/other"]);
    assert!(
        events
            .iter()
            .all(|e| matches!(e, Event::Delete(k) if k.name != "other")),
        "only the deleted file's objects go: {events:#?}"
    );
    // Nothing changed: nothing told.
    assert!(scan(&mut snap).is_empty());
}

/// The watcher's answer to events about single files: only those files are
/// read again.
#[test]
fn rescan_reads_only_the_files_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(d, "a.yaml", &svc("one", 80));
    write(d, "b.yaml", &svc("two", 90));
    let mut state = DirState::new(d.to_path_buf());
    let mut snap = Snapshot::default();
    snap.apply(state.scan().unwrap());
    write(d, "a.yaml", &svc("one", 81));
    write(d, "b.yaml", &svc("two", 91));
    let only_a: BTreeSet<PathBuf> = [PathBuf::from("a.yaml")].into();
    let events = state.rescan(&only_a);
    assert_eq!(events.len(), 1, "{events:#?}");
    snap.apply(events);
    assert_eq!(service_port(&snap, "one"), Some(81));
    assert_eq!(service_port(&snap, "two"), Some(90), "b.yaml is not read");
    // A file named and gone: its objects go.
    std::fs::remove_file(d.join("a.yaml")).unwrap();
    let events = state.rescan(&only_a);
    assert!(
        matches!(&events[..], [Event::Delete(k)] if k.name == "one"),
        "{events:#?}"
    );
    // A full scan catches up with the rest.
    snap.apply(events);
    snap.apply(state.scan().unwrap());
    assert_eq!(names(&snap), ["Service default/two"]);
    assert_eq!(service_port(&snap, "two"), Some(91));
}

// ------------------------------------------------------------- watching

/// Waits until the latest snapshot satisfies `pred`, at most `within`.
async fn wait_for(
    rx: &mut watch::Receiver<Snapshot>,
    within: Duration,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = Instant::now() + within;
    loop {
        {
            let snap = rx.borrow_and_update();
            if snap.synced && pred(&snap) {
                return snap.clone();
            }
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("source stopped while waiting for {what}"),
            Err(_) => panic!(
                "timed out after {within:?} waiting for {what}; last snapshot: {:?} {:#?}",
                names(&rx.borrow()),
                rx.borrow().rejected
            ),
        }
    }
}

fn start(
    dir: &Path,
) -> (
    watch::Receiver<Snapshot>,
    tokio::task::JoinHandle<Result<(), SourceError>>,
) {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::spawn(ManifestSource::new(dir.to_path_buf()).run(tx));
    (crate::source::fold(events), handle)
}

async fn stop(
    rx: watch::Receiver<Snapshot>,
    handle: tokio::task::JoinHandle<Result<(), SourceError>>,
) {
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("source did not stop after its receiver was dropped")
        .unwrap()
        .unwrap();
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn watch_publishes_changes_within_a_second() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(d, "a.yaml", &svc("web", 80));
    let (mut rx, handle) = start(d);
    wait_for(&mut rx, 5 * SECOND, "first snapshot", |s| {
        service_port(s, "web") == Some(80)
    })
    .await;

    // In-place write.
    write(d, "a.yaml", &svc("web", 81));
    wait_for(&mut rx, SECOND, "in-place edit", |s| {
        service_port(s, "web") == Some(81)
    })
    .await;

    // Atomic save: write a temp file and rename it over.
    write(d, ".a.yaml.tmp", &svc("web", 82));
    std::fs::rename(d.join(".a.yaml.tmp"), d.join("a.yaml")).unwrap();
    wait_for(&mut rx, SECOND, "rename-over save", |s| {
        service_port(s, "web") == Some(82)
    })
    .await;

    // Delete + create, in a new subdirectory.
    std::fs::remove_file(d.join("a.yaml")).unwrap();
    write(d, "new/b.yaml", &svc("web", 83));
    wait_for(&mut rx, SECOND, "new subdirectory", |s| {
        service_port(s, "web") == Some(83)
    })
    .await;

    // Broken edit: reported, last good objects kept.
    write(d, "new/b.yaml", "kind: [\n");
    let snap = wait_for(&mut rx, SECOND, "broken edit reported", |s| {
        !s.rejected.is_empty()
    })
    .await;
    assert_eq!(service_port(&snap, "web"), Some(83));
    assert!(snap.rejected[0]
        .origin
        .as_deref()
        .unwrap()
        .starts_with("new/b.yaml, document 1"));

    // Deletion removes the objects and the report.
    std::fs::remove_file(d.join("new/b.yaml")).unwrap();
    wait_for(&mut rx, SECOND, "deletion", |s| {
        s.objects.services.is_empty() && s.rejected.is_empty()
    })
    .await;
    stop(rx, handle).await;
}

#[tokio::test]
async fn watch_coalesces_bursts() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    write(&d, "a.yaml", &svc("web", 1000));
    let (mut rx, handle) = start(&d);
    wait_for(&mut rx, 5 * SECOND, "first snapshot", |s| {
        service_port(s, "web") == Some(1000)
    })
    .await;

    // Count every snapshot published from here on.
    let mut counter_rx = rx.clone();
    counter_rx.borrow_and_update();
    let counter = tokio::spawn(async move {
        let mut n = 0u32;
        while counter_rx.changed().await.is_ok() {
            n += 1;
            if service_port(&counter_rx.borrow_and_update(), "web") == Some(1100) {
                break;
            }
        }
        n
    });
    for i in 1..=100 {
        write(&d, "a.yaml", &svc("web", 1000 + i));
    }
    let snap = wait_for(&mut rx, 2 * SECOND, "last write of the burst", |s| {
        service_port(s, "web") == Some(1100)
    })
    .await;
    assert!(snap.rejected.is_empty());
    let n = tokio::time::timeout(SECOND, counter)
        .await
        .unwrap()
        .unwrap();
    // Without coalescing every write is a snapshot; a loaded machine may
    // pause the writer past the quiet time a few times.
    assert!(n <= 20, "a burst of 100 writes gave {n} snapshots");
    stop(rx, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_settles_in_milliseconds_but_never_reads_a_file_half_written() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    write(&d, "a.yaml", &svc("web", 80));
    let (mut rx, handle) = start(&d);
    wait_for(&mut rx, 5 * SECOND, "first snapshot", |s| {
        service_port(s, "web") == Some(80)
    })
    .await;

    // An atomic save is picked up long before the 400 ms cap.
    let t0 = Instant::now();
    write(&d, ".a.yaml.tmp", &svc("web", 81));
    std::fs::rename(d.join(".a.yaml.tmp"), d.join("a.yaml")).unwrap();
    wait_for(&mut rx, SECOND, "rename-over save", |s| {
        service_port(s, "web") == Some(81)
    })
    .await;
    let settled = t0.elapsed();
    assert!(
        settled < Duration::from_millis(300),
        "a rename took {settled:?} to show"
    );

    // Record every snapshot published from here on.
    let mut seen_rx = rx.clone();
    seen_rx.borrow_and_update();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen_rx.changed().await.is_ok() {
            let names = names(&seen_rx.borrow_and_update());
            let done = names.len() == 3;
            seen.push(names);
            if done {
                break;
            }
        }
        seen
    });
    // A slow writer: the first document is complete (it parses on its
    // own), the second comes well after the quiet time.
    let mut f = std::fs::File::create(d.join("b.yaml")).unwrap();
    f.write_all(format!("{}---\n", svc("one", 80)).as_bytes())
        .unwrap();
    f.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.write_all(
        svc("two", 80)
            .replace("10.96.0.20", "10.96.0.21")
            .as_bytes(),
    )
    .unwrap();
    drop(f);
    let seen = tokio::time::timeout(2 * SECOND, seen)
        .await
        .expect("the finished file never showed")
        .unwrap();
    assert_eq!(
        seen,
        [[
            "Service default/one",
            "Service default/two",
            "Service default/web"
        ]],
        "a half-written file was read"
    );
    stop(rx, handle).await;
}

#[tokio::test]
async fn watch_survives_directory_removal_and_recreation() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("manifests");
    write(&d, "a.yaml", &svc("web", 80));
    let (mut rx, handle) = start(&d);
    wait_for(&mut rx, 5 * SECOND, "first snapshot", |s| {
        service_port(s, "web") == Some(80)
    })
    .await;

    std::fs::remove_dir_all(&d).unwrap();
    write(&d, "b.yaml", &svc("web2", 90));
    wait_for(&mut rx, 2 * SECOND, "recreated directory", |s| {
        names(s) == ["Service default/web2"]
    })
    .await;
    // And the new directory is watched.
    write(&d, "b.yaml", &svc("web2", 91));
    wait_for(&mut rx, SECOND, "edit in recreated directory", |s| {
        service_port(s, "web2") == Some(91)
    })
    .await;
    stop(rx, handle).await;
}

#[tokio::test]
async fn watch_missing_directory_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (tx, _rx): (_, EventReceiver) = tokio::sync::mpsc::unbounded_channel();
    let err = ManifestSource::new(tmp.path().join("absent"))
        .run(tx)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::DirNotFound { .. }), "{err}");
    assert!(err.to_string().contains("absent"));
}

/// ConfigMap volumes: `a.yaml -> ..data/a.yaml`, `..data -> ..v1`, updated by
/// renaming a new `..data` symlink over the old one.
#[tokio::test]
async fn watch_follows_configmap_style_symlink_swaps() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(d, "..v1/a.yaml", &svc("web", 80));
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/a.yaml", d.join("a.yaml")).unwrap();
    let (mut rx, handle) = start(d);
    let snap = wait_for(&mut rx, 5 * SECOND, "first snapshot", |s| {
        service_port(s, "web") == Some(80)
    })
    .await;
    // The hidden real directory is not read a second time.
    assert!(snap.rejected.is_empty(), "{:#?}", snap.rejected);

    write(d, "..v2/a.yaml", &svc("web", 81));
    symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    wait_for(&mut rx, SECOND, "symlink swap", |s| {
        service_port(s, "web") == Some(81)
    })
    .await;
    stop(rx, handle).await;
}

#[test]
fn large_file_loads_quickly() {
    let tmp = tempfile::tempdir().unwrap();
    let text: Vec<String> = (0..5000).map(|i| svc(&format!("s{i}"), 80)).collect();
    write(tmp.path(), "big.yaml", &text.join("---\n"));
    let start = std::time::Instant::now();
    let snap = load_dir(tmp.path()).unwrap();
    let took = start.elapsed();
    assert_eq!(snap.objects.services.len(), 5000);
    assert!(snap.rejected.is_empty());
    println!("5000 services loaded in {took:?}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn new_slice_with_one_bad_endpoint_keeps_the_good_ones() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "s.yaml", &svc("web", 80));
    write(
        tmp.path(),
        "t.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {name: http, port: 8080, protocol: TCP}\nendpoints:\n- addresses: [10.0.0.1]\n- addresses: [10.0.0.300]\n",
    );
    let snap = load_dir(tmp.path()).unwrap();
    let r = snap
        .rejected
        .iter()
        .find(|r| r.kind == "EndpointSlice")
        .expect("the bad address is reported");
    assert_eq!(r.origin.as_deref(), Some("t.yaml, document 1"));
    assert!(r.field.contains("endpoints[1]"), "{r}");
    let desired = crate::model::build(
        &snap.objects,
        &crate::model::ModelConfig {
            node_name: "node1".into(),
        },
    );
    let port = desired.services.values().next().expect("web is programmed");
    let eps: Vec<String> = port.all_endpoints.iter().map(|e| e.to_string()).collect();
    assert_eq!(eps, ["10.0.0.1:8080"]);
}

/// The unknown fields `parse_file` reports for a one-document file.
fn unknown_of(text: &str) -> Vec<String> {
    let parsed = parse::parse_file("t.yaml", text);
    let mut out: Vec<String> = parsed
        .rejections
        .iter()
        .filter(|r| r.reason == "unknown_field")
        .map(|r| r.field.clone())
        .collect();
    out.sort();
    out
}

#[test]
fn every_unknown_field_is_reported_and_null_ones_are_not() {
    let doc = |nulls: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nextraTop: x\nmetadata: {{name: web{nulls}}}\nspec:\n  bogus: 1\n  ports:\n  - {{port: 80, prot: 81}}\n  - {{name: b, port: 81, xyz: {{a: 1}}}}\nstatus:\n  loadBalancer:\n    ingress:\n    - {{ip: 1.2.3.4, foo: bar}}\n"
        )
    };
    let want = [
        "extraTop",
        "spec.bogus",
        "spec.ports[0].prot",
        "spec.ports[1].xyz",
        "status.loadBalancer.ingress[0].foo",
    ];
    // Without a null, and with nulls (an unknown one among them: "not set").
    assert_eq!(unknown_of(&doc("")), want);
    assert_eq!(unknown_of(&doc(", labels: null, extra: null")), want);
    let parsed = parse::parse_file("t.yaml", &doc(""));
    assert!(parsed.documents.is_empty());
    let r = &parsed.rejections[0];
    assert_eq!(r.message, "unknown field \"extraTop\": not a field of Service at this place (check the spelling; kproxy validates strictly, like kubectl apply)");
}

/// The unknown-field check before fields were tracked during
/// deserialization: the typed object serialized back and compared with
/// the document. The property test below holds the new check to it.
fn unknown_by_round_trip(doc: &serde_json::Value) -> Option<Vec<String>> {
    fn walk(
        orig: &serde_json::Value,
        typed: &serde_json::Value,
        path: &str,
        out: &mut Vec<String>,
    ) {
        use serde_json::Value;
        match (orig, typed) {
            (Value::Object(o), Value::Object(t)) => {
                for (k, v) in o {
                    if v.is_null() {
                        continue;
                    }
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match t.get(k) {
                        None => out.push(p),
                        Some(tv) => walk(v, tv, &p, out),
                    }
                }
            }
            (Value::Array(o), Value::Array(t)) => {
                for (i, (v, tv)) in o.iter().zip(t).enumerate() {
                    walk(v, tv, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut doc = doc.clone();
    // As parse_file does before the typed step.
    doc["metadata"]["namespace"] = "default".into();
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(doc.clone()).ok()?;
    let back = serde_json::to_value(&svc).unwrap();
    let mut out = Vec::new();
    walk(&doc, &back, "", &mut out);
    out.sort();
    Some(out)
}

mod unknown_fields_prop {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::{unknown_by_round_trip, unknown_of};

    fn base() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "clusterIP": "10.96.0.1",
                "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81, "targetPort": 8081}],
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}},
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}},
        })
    }

    /// Every mapping of `v` (as a path of keys and indexes).
    fn mappings(v: &Value, at: Vec<Value>, out: &mut Vec<Vec<Value>>) {
        match v {
            Value::Object(o) => {
                out.push(at.clone());
                // Labels take any key.
                for (k, c) in o.iter().filter(|(k, _)| *k != "labels") {
                    let mut p = at.clone();
                    p.push(k.as_str().into());
                    mappings(c, p, out);
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    let mut p = at.clone();
                    p.push(i.into());
                    mappings(c, p, out);
                }
            }
            _ => {}
        }
    }

    fn at<'v>(v: &'v mut Value, path: &[Value]) -> &'v mut Value {
        path.iter().fold(v, |v, p| match p {
            Value::String(k) => &mut v[k.as_str()],
            Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
            _ => unreachable!(),
        })
    }

    fn extra() -> impl Strategy<Value = (usize, String, Value)> {
        (
            any::<usize>(),
            prop::sample::select(vec!["prot", "xyz", "Port", "name2", "a.b", "clusterIp"]),
            prop::sample::select(vec![
                Value::Null,
                json!(1),
                json!("s"),
                json!({"a": 1, "b": null}),
                json!([1, null]),
            ]),
        )
            .prop_map(|(i, k, v)| (i, k.to_string(), v))
    }

    proptest! {
        /// Whatever unknown keys (null-valued or not) a Service gets, at
        /// whatever depth, the check in the typed pass reports exactly the
        /// fields the round-trip check did.
        #[test]
        fn tracked_check_equals_round_trip(extras in prop::collection::vec(extra(), 0..6)) {
            let mut doc = base();
            for (i, key, value) in extras {
                let mut maps = Vec::new();
                mappings(&doc, Vec::new(), &mut maps);
                let path = maps[i % maps.len()].clone();
                // Only new keys: a known field given a wrong type is a type error.
                if let Value::Object(o) = at(&mut doc, &path) {
                    o.entry(key).or_insert(value);
                }
            }
            let want = unknown_by_round_trip(&doc).expect("only unknown keys were added");
            let text = serde_json::to_string(&doc).unwrap();
            prop_assert_eq!(unknown_of(&text), want, "{}", text);
        }
    }
}

#[test]
fn files_parsed_on_several_threads_come_back_in_order_and_as_on_one() {
    let files = || -> Vec<ChangedFile> {
        (0..23)
            .map(|i| {
                let mut text = String::new();
                for j in 0..(1 + i % 4) {
                    text.push_str(&svc(&format!("s{i}-{j}"), 80 + j as u32));
                    text.push_str("---\n");
                }
                if i % 7 == 3 {
                    text.push_str("kind: Service\napiVersion: v1\nmetadata: {name: bad}\nspec: {ports: [{prot: 1}]}\n");
                }
                let content = text.into_bytes();
                ChangedFile {
                    rel: PathBuf::from(format!("f{i:02}.yaml")),
                    digest: digest(&content),
                    content,
                    prev: None,
                    keep_objects: true,
                }
            })
            .collect()
    };
    let summary =
        |out: Vec<(PathBuf, FileState)>| -> Vec<(PathBuf, Vec<ObjectKey>, Vec<Rejection>)> {
            out.into_iter()
                .map(|(rel, state)| (rel, state.keys().cloned().collect(), state.rejections))
                .collect()
        };
    let one = summary(parse_files_on(files(), 1, 0));
    let three = summary(parse_files_on(files(), 3, 0));
    assert_eq!(one.len(), 23);
    assert!(one.windows(2).all(|w| w[0].0 < w[1].0), "in file order");
    assert!(
        one.iter().any(|(_, _, r)| !r.is_empty()),
        "a bad document is reported"
    );
    assert_eq!(one, three);
}

/// `kproxy run` keeps only the checked parts: an edit the model cannot see
/// (a label it does not read) tells nothing, an edit it reads (a port, an
/// endpoint, a trigger time) tells the object again, and the events carry
/// no objects.
#[test]
fn without_objects_an_edit_is_told_only_when_the_checked_parts_change() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let slice = |ip: &str, trigger: &str, team: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels: {{kubernetes.io/service-name: web, team: {team}}}\n  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}\naddressType: IPv4\nendpoints:\n- addresses: [{ip}]\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n"
        )
    };
    let t1 = "2026-01-01T00:00:01Z";
    let t2 = "2026-01-01T00:00:02Z";
    write(d, "svc.yaml", &svc("web", 80));
    write(d, "slice.yaml", &slice("10.244.1.10", t1, "a"));
    let mut state = DirState::new(d.to_path_buf()).without_objects();
    let upserts = |events: Vec<Event>| -> Vec<Checked> {
        events
            .into_iter()
            .filter_map(|e| match e {
                Event::Upsert(c) => Some(c),
                _ => None,
            })
            .collect()
    };
    let first = upserts(state.scan().unwrap());
    assert_eq!(first.len(), 2);
    assert!(
        first.iter().all(|c| c.object().is_none()),
        "no objects kept"
    );
    let slice_told = first
        .iter()
        .find(|c| c.key().kind == Kind::EndpointSlice)
        .unwrap();
    assert!(slice_told.trigger_time().is_some());

    // A label the model does not read: nothing to tell.
    write(d, "slice.yaml", &slice("10.244.1.10", t1, "b"));
    assert_eq!(upserts(state.scan().unwrap()), Vec::<Checked>::new());
    // Another trigger time: told (the programming-latency metric reads it).
    write(d, "slice.yaml", &slice("10.244.1.10", t2, "b"));
    assert_eq!(upserts(state.scan().unwrap()).len(), 1);
    // Another endpoint: told.
    write(d, "slice.yaml", &slice("10.244.1.11", t2, "b"));
    assert_eq!(upserts(state.scan().unwrap()).len(), 1);
    // Another Service port: told.
    write(d, "svc.yaml", &svc("web", 81));
    let told = upserts(state.scan().unwrap());
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].key().kind, Kind::Service);
}
