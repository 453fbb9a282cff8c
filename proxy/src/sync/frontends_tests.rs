//! The frontend status table on its own: what a sync's outcome does to each
//! frontend, when ports in error are retried, and what `kproxy status` gets.

use std::time::{Duration, Instant};

use super::*;
use crate::dataplane::ebpf::test_support::{ep, state, svc};
use crate::dataplane::{DataplaneError, FrontendKind, ServiceError};
use crate::model::{ChangeSet, DesiredState, Protocol, ServicePort};

fn port(name: &str, vip: &str) -> ServicePort {
    svc(
        "default",
        name,
        "http",
        Protocol::Tcp,
        vip,
        80,
        vec![ep("10.244.1.5", 8080, false)],
    )
}

/// `web` with a node port too: two frontends.
fn web() -> ServicePort {
    let mut sp = port("web", "10.96.0.10");
    sp.node_port = Some(30080);
    sp
}

fn full_error(sp: &ServicePort) -> ServiceError {
    ServiceError {
        port: sp.name.clone(),
        service: sp.name.to_string(),
        reason: "map_full".into(),
        message: format!(
            "Service {} (tcp) not fully programmed: BPF map SLOTS is full (3 entries); raise --bpf-backend-map-max",
            sp.name
        ),
        frontends: None,
    }
}

/// (applied, pending, error).
fn counts(applied: usize, pending: usize, error: usize) -> Counts {
    Counts {
        applied,
        pending,
        error,
    }
}

fn changes(old: &DesiredState, new: &DesiredState) -> ChangeSet {
    ChangeSet::between(old, new)
}

#[test]
fn a_port_in_error_keeps_its_message_others_are_applied_and_a_retry_applies_it() {
    let t0 = Instant::now();
    let mut t = FrontendTable::default();
    let s = state(vec![web(), port("api", "10.96.0.11")]);
    t.begin(&s, &changes(&state(vec![]), &s), &[], false, t0);
    assert_eq!(t.counts(), counts(0, 3, 0));
    let outcome = t.finish(Ok(&[full_error(&web())]), t0);
    assert_eq!(outcome.errors, vec![("map_full".to_string(), 2)]);
    assert_eq!(outcome.retried, 0);
    assert_eq!(t.counts(), counts(1, 0, 2));
    let r = t.report(false, t0);
    assert_eq!(r.frontends.len(), 2, "only the frontends not applied");
    let np = &r.frontends[0];
    assert_eq!(
        (np.service.as_str(), np.kind.as_str(), np.frontend.as_str()),
        ("default/web:http", "ClusterIP", "10.96.0.10:80/tcp")
    );
    assert_eq!(r.frontends[1].frontend, "*:30080/tcp");
    assert_eq!(np.status, Status::Error);
    assert_eq!(np.attempts, 1);
    assert_eq!(np.reason.as_deref(), Some("map_full"));
    assert!(np
        .error
        .as_deref()
        .unwrap()
        .contains("SLOTS is full (3 entries); raise --bpf-backend-map-max"));
    assert_eq!(np.retry_in_seconds, Some(1.0));
    assert_eq!(
        t.port_errors(),
        vec![("default/web:http".into(), "map_full".into())]
    );

    // Not before its backoff; then on its own, no change set.
    assert_eq!(t.due(t0 + Duration::from_millis(999)), vec![]);
    assert_eq!(t.next_retry(), Some(t0 + FIRST_BACKOFF));
    let t1 = t0 + Duration::from_secs(1);
    let due = t.due(t1);
    assert_eq!(due, vec![web().name]);
    t.begin(&s, &ChangeSet::default(), &due, false, t1);
    assert_eq!(t.counts().pending, 2);
    // Still full: the second wait is twice the first.
    t.finish(Ok(&[full_error(&web())]), t1);
    assert_eq!(t.next_retry(), Some(t1 + 2 * FIRST_BACKOFF));
    let t2 = t1 + Duration::from_secs(2);
    t.begin(&s, &ChangeSet::default(), &t.due(t2), false, t2);
    let outcome = t.finish(Ok(&[]), t2);
    assert_eq!(outcome.retried, 2);
    assert_eq!(t.counts(), counts(3, 0, 0));
    assert_eq!(t.report(false, t2).frontends, vec![]);
    assert_eq!(t.next_retry(), None);
    assert_eq!(t.port_errors(), vec![]);
    let all = t.report(true, t2);
    assert_eq!(all.frontends.len(), 3);
    let web_np = all.frontends.iter().find(|f| f.kind == "NodePort").unwrap();
    assert_eq!((web_np.status, web_np.attempts), (Status::Applied, 3));
}

#[test]
fn only_the_frontends_a_dataplane_names_fail() {
    let t0 = Instant::now();
    let mut t = FrontendTable::default();
    let s = state(vec![web()]);
    t.begin(&s, &changes(&state(vec![]), &s), &[], false, t0);
    let mut e = full_error(&web());
    e.frontends = Some(vec![FrontendRef {
        kind: FrontendKind::NodePort,
        ip: None,
        port: 30080,
    }]);
    t.finish(Ok(&[e]), t0);
    let r = t.report(true, t0);
    let status: Vec<(&str, Status)> = r
        .frontends
        .iter()
        .map(|f| (f.kind.as_str(), f.status))
        .collect();
    assert_eq!(
        status,
        [("ClusterIP", Status::Applied), ("NodePort", Status::Error)]
    );
    // A retry moves only the one in error.
    let t1 = t0 + FIRST_BACKOFF;
    t.begin(&s, &ChangeSet::default(), &t.due(t1), false, t1);
    assert_eq!(t.counts(), counts(1, 1, 0));
}

#[test]
fn a_failed_sync_marks_its_ports_until_the_next_full_sync() {
    let t0 = Instant::now();
    let mut t = FrontendTable::default();
    let s1 = state(vec![port("api", "10.96.0.11")]);
    t.begin(&s1, &changes(&state(vec![]), &s1), &[], true, t0);
    t.finish(Ok(&[]), t0);
    // An iptables-restore fails: the changed port is in error, the other
    // one stays applied (its rules are still there).
    let s2 = state(vec![port("api", "10.96.0.11"), web()]);
    t.begin(&s2, &changes(&s1, &s2), &[], false, t0);
    let err = DataplaneError::Command {
        tool: "iptables-restore".into(),
        message: "line 7 failed".into(),
    };
    let outcome = t.finish(Err(&err), t0);
    assert_eq!(outcome.errors, vec![(SYNC_FAILED.to_string(), 2)]);
    assert_eq!(t.counts(), counts(1, 0, 2));
    let r = t.report(false, t0);
    assert_eq!(
        r.frontends[0].error.as_deref(),
        Some("iptables-restore failed: line 7 failed")
    );
    // The loop's own full sync retries them, not the backoff.
    assert_eq!(t.next_retry(), None);
    assert_eq!(t.errored(), vec![]);
    assert_eq!(t.port_errors(), vec![], "not one metric series per port");
    let t1 = t0 + Duration::from_secs(1);
    t.begin(&s2, &ChangeSet::default(), &[], true, t1);
    t.finish(Ok(&[]), t1);
    assert_eq!(t.counts(), counts(3, 0, 0));
}

#[test]
fn a_changed_port_starts_again_and_a_removed_one_leaves() {
    let t0 = Instant::now();
    let mut t = FrontendTable::default();
    let s1 = state(vec![web(), port("api", "10.96.0.11")]);
    t.begin(&s1, &changes(&state(vec![]), &s1), &[], false, t0);
    t.finish(Ok(&[full_error(&web())]), t0);
    // web loses its node port: a new desired state, attempts from 0.
    let s2 = state(vec![port("web", "10.96.0.10"), port("api", "10.96.0.11")]);
    t.begin(&s2, &changes(&s1, &s2), &[], false, t0);
    let r = t.report(false, t0);
    assert_eq!(r.frontends.len(), 1);
    assert_eq!(
        (r.frontends[0].status, r.frontends[0].attempts),
        (Status::Pending, 0)
    );
    t.finish(Ok(&[]), t0);
    let s3 = state(vec![port("api", "10.96.0.11")]);
    t.begin(&s3, &changes(&s2, &s3), &[], false, t0);
    t.finish(Ok(&[]), t0);
    assert_eq!(t.counts(), counts(1, 0, 0));
}

#[test]
fn a_full_sync_can_put_an_applied_port_in_error() {
    // A restart over maps that no longer hold everything.
    let t0 = Instant::now();
    let mut t = FrontendTable::default();
    let s = state(vec![port("api", "10.96.0.11")]);
    t.begin(&s, &changes(&state(vec![]), &s), &[], false, t0);
    t.finish(Ok(&[]), t0);
    t.begin(&s, &ChangeSet::default(), &[], true, t0);
    t.finish(Ok(&[full_error(&port("api", "10.96.0.11"))]), t0);
    assert_eq!(t.counts().error, 1);
    assert_eq!(t.next_retry(), Some(t0 + FIRST_BACKOFF));
}

#[test]
fn backoff_doubles_up_to_a_minute() {
    let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
}

/// The per-Service error metric is rebuilt only when the ports in error may
/// have changed: a sync of another port leaves the generation alone (with
/// tens of thousands of ports in a full map, rebuilding it cost every sync
/// tens of milliseconds).
#[test]
fn the_errors_generation_moves_only_with_the_ports_in_error() {
    let t0 = Instant::now();
    let mut t = FrontendTable::default();
    let s = state(vec![web(), port("api", "10.96.0.11")]);
    t.begin(&s, &changes(&state(vec![]), &s), &[], false, t0);
    t.finish(Ok(&[full_error(&web())]), t0);
    let after_error = t.errors_generation();
    assert_ne!(after_error, 0);

    // Another port changes and is applied: the errors are as they were.
    let mut api = port("api", "10.96.0.11");
    api.port = 81;
    let s2 = state(vec![web(), api]);
    t.begin(&s2, &changes(&s, &s2), &[], false, t0);
    t.finish(Ok(&[]), t0);
    assert_eq!(t.errors_generation(), after_error);
    assert_eq!(t.port_errors().len(), 1);

    // The port in error is retried and applied: the generation moves.
    let t1 = t0 + Duration::from_secs(1);
    t.begin(&s2, &ChangeSet::default(), &t.due(t1), false, t1);
    t.finish(Ok(&[]), t1);
    assert_ne!(t.errors_generation(), after_error);
    assert_eq!(t.port_errors(), vec![]);
}
