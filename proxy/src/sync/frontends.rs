//! The status of every frontend (Service port × address kind: ClusterIP,
//! NodePort, ExternalIP, LoadBalancer IP), as Cilium's load-balancer
//! reconciler keeps one per frontend: **pending** (in a sync that has not
//! finished), **applied**, or **error** (with the error, the number of
//! attempts, and when it is retried). Kept by the sync loop from the change
//! sets it hands the dataplane and what the dataplane reports back; read by
//! `/kproxy/frontends` (`kproxy status`) and the `kproxy_frontends` gauge.
//!
//! A port in error is retried on its own, with exponential backoff, without
//! a full sync; a sync that removes Service ports (which may free map room)
//! retries every port in error at once. Every operation costs the ports it
//! touches, not the table: the counts are kept as it goes, and the ports
//! not applied have their own index (`kproxy status` lists only those).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dataplane::{DataplaneError, FrontendRef, ServiceError};
use crate::hashing::HashMap;
use crate::model::{ChangeSet, DesiredState, ServicePortName};

/// The first retry of a port in error comes after this; each further one
/// after twice the last wait, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The reason recorded when a whole sync failed (an `iptables-restore`,
/// reading the BPF maps): the next sync is full and retries everything.
pub const SYNC_FAILED: &str = "sync_failed";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Applied,
    Error,
}

impl Status {
    pub const ALL: [Status; 3] = [Status::Applied, Status::Pending, Status::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Applied => "applied",
            Status::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One Service port's frontends and the outcome of writing its current
/// desired state.
#[derive(Debug)]
struct Port {
    frontends: Vec<(FrontendRef, Status)>,
    /// Writes of the current desired state tried so far (a new desired
    /// state starts again at 0).
    attempts: u32,
    /// (reason, message) of the last failure, while a frontend is in error.
    error: Option<(String, String)>,
    /// When the port's status last changed.
    since: Instant,
    /// When a port in error is retried; `None` while the loop's next full
    /// sync retries it (a whole sync failed).
    retry_at: Option<Instant>,
}

impl Port {
    fn settled(&self) -> bool {
        self.frontends.iter().all(|(_, s)| *s == Status::Applied)
    }

    fn has(&self, status: Status) -> bool {
        self.frontends.iter().any(|(_, s)| *s == status)
    }
}

/// Frontends by status, counted as they change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub applied: usize,
    pub pending: usize,
    pub error: usize,
}

impl Counts {
    pub fn get(&self, s: Status) -> usize {
        match s {
            Status::Applied => self.applied,
            Status::Pending => self.pending,
            Status::Error => self.error,
        }
    }
}

/// One frontend in a [`Report`] (`/kproxy/frontends`, `kproxy status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontendStatus {
    /// `ns/name:port`.
    pub service: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP`, `LoadBalancer`.
    pub kind: String,
    /// `10.96.0.10:80/tcp`, `*:30080/tcp` for a node port.
    pub frontend: String,
    pub status: Status,
    /// Writes of the current desired state tried (0: not tried yet).
    pub attempts: u32,
    /// Metrics label of the error (`map_full`, `map_error`, `sync_failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds in this status.
    pub for_seconds: f64,
    /// Seconds until the next retry (frontends in error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_seconds: Option<f64>,
}

/// What `/kproxy/frontends` answers: the counts, and the frontends not
/// applied (or all of them, when asked).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub counts: Counts,
    pub frontends: Vec<FrontendStatus>,
}

/// What one sync's outcome did to the table, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Frontend writes that failed, by reason.
    pub errors: Vec<(String, usize)>,
    /// Frontends written again after an error (retries).
    pub retried: usize,
}

#[derive(Debug, Default)]
pub struct FrontendTable {
    ports: HashMap<ServicePortName, Port>,
    /// Ports with a frontend pending or in error.
    unsettled: BTreeSet<ServicePortName>,
    /// Ports [`FrontendTable::begin`] handed to the dataplane, and whether
    /// each is a retry.
    in_flight: HashMap<ServicePortName, bool>,
    counts: [usize; 3],
    /// Bumped whenever what [`FrontendTable::port_errors`] returns may have
    /// changed, so that its per-Service metric is rebuilt only then (a full
    /// map can leave tens of thousands of ports in error).
    errors_generation: u64,
}

/// The wait before retry number `attempts` (1: the first retry).
pub fn backoff(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

impl FrontendTable {
    pub fn counts(&self) -> Counts {
        Counts {
            applied: self.counts[Status::Applied.index()],
            pending: self.counts[Status::Pending.index()],
            error: self.counts[Status::Error.index()],
        }
    }

    fn count(&mut self, from: Option<Status>, to: Option<Status>) {
        if let Some(s) = from {
            self.counts[s.index()] -= 1;
        }
        if let Some(s) = to {
            self.counts[s.index()] += 1;
        }
    }

    fn remove(&mut self, name: &ServicePortName) {
        if let Some(port) = self.ports.remove(name) {
            if port.error.is_some() {
                self.errors_generation += 1;
            }
            for (_, s) in &port.frontends {
                self.count(Some(*s), None);
            }
        }
        self.unsettled.remove(name);
    }

    /// Sets the port's frontends from its desired state, all pending.
    fn replace(&mut self, name: &ServicePortName, frontends: Vec<FrontendRef>, now: Instant) {
        self.remove(name);
        for _ in &frontends {
            self.count(None, Some(Status::Pending));
        }
        self.ports.insert(
            name.clone(),
            Port {
                frontends: frontends
                    .into_iter()
                    .map(|f| (f, Status::Pending))
                    .collect(),
                attempts: 0,
                error: None,
                since: now,
                retry_at: None,
            },
        );
        self.unsettled.insert(name.clone());
    }

    /// The ports in error whose retry is due at `now`.
    pub fn due(&self, now: Instant) -> Vec<ServicePortName> {
        self.errored_where(|p| p.retry_at.is_some_and(|t| t <= now))
    }

    /// Every port in error that the sync loop retries itself.
    pub fn errored(&self) -> Vec<ServicePortName> {
        self.errored_where(|p| p.retry_at.is_some())
    }

    fn errored_where(&self, pred: impl Fn(&Port) -> bool) -> Vec<ServicePortName> {
        self.unsettled
            .iter()
            .filter(|n| {
                self.ports
                    .get(*n)
                    .is_some_and(|p| p.has(Status::Error) && pred(p))
            })
            .cloned()
            .collect()
    }

    /// The earliest retry scheduled.
    pub fn next_retry(&self) -> Option<Instant> {
        self.unsettled
            .iter()
            .filter_map(|n| self.ports.get(n)?.retry_at)
            .min()
    }

    /// A sync starts: the ports of `changes` take their new frontends, all
    /// pending (removed ones leave the table); the frontends in error of
    /// `retry` become pending again; with `full`, every port in error does
    /// (a full sync writes everything), and the table is reconciled with
    /// `desired`.
    pub fn begin(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        retry: &[ServicePortName],
        full: bool,
        now: Instant,
    ) {
        self.in_flight.clear();
        for (name, change) in changes.iter() {
            match &change.new {
                Some(sp) => {
                    self.replace(name, FrontendRef::of(sp), now);
                    self.in_flight.insert(name.clone(), false);
                }
                None => self.remove(name),
            }
        }
        let mut again: Vec<ServicePortName> = retry.to_vec();
        if full {
            let stale: Vec<ServicePortName> = self
                .ports
                .keys()
                .filter(|n| !desired.services.contains_key(*n))
                .cloned()
                .collect();
            for n in stale {
                self.remove(&n);
            }
            for (name, sp) in &desired.services {
                if !self.ports.contains_key(name) {
                    self.replace(name, FrontendRef::of(sp), now);
                    self.in_flight.insert(name.clone(), false);
                }
            }
            // Only the unsettled ports not already in flight: the loop
            // below skips those, and on a first sync that is every port
            // (no clone of each name).
            again.extend(
                self.unsettled
                    .iter()
                    .filter(|n| !self.in_flight.contains_key(*n))
                    .cloned(),
            );
        }
        for name in again {
            if self.in_flight.contains_key(&name) {
                continue;
            }
            let Some(port) = self.ports.get_mut(&name) else {
                continue;
            };
            let mut moved = 0;
            for (_, s) in port.frontends.iter_mut() {
                if *s == Status::Error {
                    *s = Status::Pending;
                    moved += 1;
                }
            }
            if moved == 0 {
                continue;
            }
            port.retry_at = None;
            self.errors_generation += 1;
            for _ in 0..moved {
                self.count(Some(Status::Error), Some(Status::Pending));
            }
            self.in_flight.insert(name, true);
        }
    }

    /// The sync [`FrontendTable::begin`] started ended: with `Ok(errors)`,
    /// the frontends `errors` name go to error (retried after a backoff),
    /// every other pending one is applied; with `Err`, every pending one
    /// goes to error until the loop's next (full) sync.
    pub fn finish(
        &mut self,
        result: Result<&[ServiceError], &DataplaneError>,
        now: Instant,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let mut failed: HashMap<&ServicePortName, &ServiceError> = HashMap::default();
        if let Ok(errors) = result {
            for e in errors {
                failed.insert(&e.port, e);
            }
        }
        let in_flight = std::mem::take(&mut self.in_flight);
        let mut errors_by_reason: HashMap<String, usize> = HashMap::default();
        let names = in_flight.keys().chain(
            // A full sync may report a port that was applied (a restart
            // over maps that do not fit, drift).
            failed
                .keys()
                .copied()
                .filter(|n| !in_flight.contains_key(*n)),
        );
        // What the loop moves between statuses, applied to the counts once
        // it lets go of the ports (one pass per port, no allocation: a
        // full sync settles every port).
        let mut moved = [0isize; 3];
        for name in names {
            let Some(port) = self.ports.get_mut(name) else {
                continue;
            };
            let flight = in_flight.get(name);
            let retried = flight.copied().unwrap_or(false);
            if flight.is_none() {
                // Applied, and failing now: a new run of attempts.
                port.attempts = 0;
            }
            let error = match result {
                Err(e) => Some((SYNC_FAILED.to_string(), e.to_string(), None)),
                Ok(_) => failed
                    .get(name)
                    .map(|e| (e.reason.clone(), e.message.clone(), e.frontends.as_deref())),
            };
            port.attempts += 1;
            let mut failed_here = 0;
            let mut changed = false;
            for (f, s) in port.frontends.iter_mut() {
                let before = *s;
                let fails = match &error {
                    Some((_, _, Some(which))) => which.contains(f),
                    Some((_, _, None)) => true,
                    None => false,
                };
                if fails {
                    *s = Status::Error;
                } else if *s == Status::Pending {
                    *s = Status::Applied;
                }
                if before == Status::Pending && retried {
                    outcome.retried += 1;
                }
                if *s == Status::Error {
                    failed_here += 1;
                }
                if before != *s {
                    moved[before.index()] -= 1;
                    moved[s.index()] += 1;
                    changed = true;
                }
            }
            if changed {
                port.since = now;
            }
            if port.error.is_some() || failed_here > 0 {
                self.errors_generation += 1;
            }
            match error {
                Some((reason, message, _)) if failed_here > 0 => {
                    *errors_by_reason.entry(reason.clone()).or_default() += failed_here;
                    port.retry_at = (reason != SYNC_FAILED).then(|| now + backoff(port.attempts));
                    port.error = Some((reason, message));
                }
                _ => {
                    port.error = None;
                    port.retry_at = None;
                }
            }
            if port.settled() {
                self.unsettled.remove(name);
            } else {
                self.unsettled.insert(name.clone());
            }
        }
        for (count, m) in self.counts.iter_mut().zip(moved) {
            *count = count.saturating_add_signed(m);
        }
        let mut errors: Vec<(String, usize)> = errors_by_reason.into_iter().collect();
        errors.sort();
        outcome.errors = errors;
        outcome
    }

    /// Changes whenever [`Self::port_errors`] may answer differently.
    pub fn errors_generation(&self) -> u64 {
        self.errors_generation
    }

    /// (service, reason) of the ports in error that the dataplane reported
    /// one by one (not the whole-sync failures, which name every port of a
    /// sync), for `kproxy_service_program_errors`.
    pub fn port_errors(&self) -> Vec<(String, String)> {
        self.unsettled
            .iter()
            .filter_map(|n| {
                let p = self.ports.get(n)?;
                let (reason, _) = p.error.as_ref()?;
                (reason != SYNC_FAILED && p.has(Status::Error))
                    .then(|| (n.to_string(), reason.clone()))
            })
            .collect()
    }

    /// The counts and the frontends not applied (`all`: every frontend),
    /// sorted by Service, kind and frontend.
    pub fn report(&self, all: bool, now: Instant) -> Report {
        let mut frontends = Vec::new();
        let mut add = |name: &ServicePortName, port: &Port| {
            for (f, s) in &port.frontends {
                if !all && *s == Status::Applied {
                    continue;
                }
                let error = (*s == Status::Error)
                    .then_some(port.error.as_ref())
                    .flatten();
                frontends.push(FrontendStatus {
                    service: name.to_string(),
                    kind: f.kind.name().to_string(),
                    frontend: f.display(name.protocol),
                    status: *s,
                    attempts: port.attempts,
                    reason: error.map(|(r, _)| r.clone()),
                    error: error.map(|(_, m)| m.clone()),
                    for_seconds: now.saturating_duration_since(port.since).as_secs_f64(),
                    retry_in_seconds: (*s == Status::Error)
                        .then_some(port.retry_at)
                        .flatten()
                        .map(|t| t.saturating_duration_since(now).as_secs_f64()),
                });
            }
        };
        if all {
            for (name, port) in &self.ports {
                add(name, port);
            }
        } else {
            for name in &self.unsettled {
                if let Some(port) = self.ports.get(name) {
                    add(name, port);
                }
            }
        }
        frontends.sort_by(|a, b| {
            (&a.service, &a.kind, &a.frontend).cmp(&(&b.service, &b.kind, &b.frontend))
        });
        Report {
            counts: self.counts(),
            frontends,
        }
    }
}

#[cfg(test)]
#[path = "frontends_tests.rs"]
mod tests;
