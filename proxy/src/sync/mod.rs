//! The sync loop: takes source snapshots, runs the pure model, diffs against
//! what was applied last, and drives the dataplane. Changes are coalesced by
//! the minimum sync period; a periodic full sync repairs drift.

mod changes;
mod memory;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::dataplane::{Dataplane, ProxyMode};
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::model::{self, Changes, DesiredState, ModelConfig, Rejection};
use crate::server::HealthCheckServers;
use crate::source::Snapshot;

/// Timing settings of the loop (kube-proxy's `--iptables-sync-period` and
/// `--iptables-min-sync-period`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTiming {
    pub full_sync_period: Duration,
    pub min_sync_period: Duration,
}

impl SyncTiming {
    /// The latency policy of each mode. iptables mode keeps kube-proxy's
    /// rate limit: every sync is an `iptables-restore`, so changes wait out
    /// `--iptables-min-sync-period` and go together. In ebpf mode a change
    /// costs a few map updates, so it is applied as soon as it arrives; a
    /// burst still coalesces, because the changes arriving while one sync
    /// runs are taken together by the next (the loop always reads the latest
    /// snapshot), with no fixed delay added.
    pub fn for_mode(
        mode: ProxyMode,
        full_sync_period: Duration,
        min_sync_period: Duration,
    ) -> SyncTiming {
        SyncTiming {
            full_sync_period,
            min_sync_period: match mode {
                ProxyMode::Iptables => min_sync_period,
                ProxyMode::Ebpf => Duration::ZERO,
            },
        }
    }
}

pub struct SyncLoop {
    dataplane: Box<dyn Dataplane>,
    model_config: ModelConfig,
    timing: SyncTiming,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
    health_checks: HealthCheckServers,
    /// What the dataplane has programmed after the last successful sync.
    applied: DesiredState,
    /// The next sync must rewrite everything (start, after an error).
    need_full: bool,
    /// Rejections already logged, so each is logged once while it lasts.
    reported: BTreeSet<Rejection>,
    /// The source's objects as of the last successful sync (for the
    /// pending-change gauges and the network programming latency).
    synced_objects: Arc<crate::model::ClusterObjects>,
}

impl SyncLoop {
    pub fn new(
        dataplane: Box<dyn Dataplane>,
        model_config: ModelConfig,
        timing: SyncTiming,
        metrics: Arc<Metrics>,
        health: Arc<HealthState>,
        health_checks: HealthCheckServers,
    ) -> Self {
        SyncLoop {
            dataplane,
            model_config,
            timing,
            metrics,
            health,
            health_checks,
            applied: DesiredState::default(),
            need_full: true,
            reported: BTreeSet::new(),
            synced_objects: Arc::default(),
        }
    }

    /// Runs until `snapshots` closes or `shutdown` fires. Never removes what
    /// was programmed: a stopped kproxy leaves traffic flowing.
    pub async fn run(
        mut self,
        mut snapshots: watch::Receiver<Snapshot>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // The first sync waits until the source has read everything once, so a
        // restart never programs a partial state over a complete one.
        loop {
            if snapshots.borrow_and_update().synced {
                break;
            }
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
        let mut queued_at = Some(Instant::now());
        self.mark_queued();
        let mut last_sync: Option<Instant> = None;
        let mut next_full = Instant::now();

        loop {
            if let Some(queued) = queued_at {
                // Coalesce: wait out the minimum period since the last sync.
                if let Some(last) = last_sync {
                    let ready_at = last + self.timing.min_sync_period;
                    if ready_at > Instant::now() {
                        tokio::select! {
                            _ = tokio::time::sleep_until(ready_at.into()) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
                let snapshot = snapshots.borrow_and_update().clone();
                let full = self.need_full || Instant::now() >= next_full;
                let ok = self.sync_once(&snapshot, full);
                last_sync = Some(Instant::now());
                if full && ok {
                    next_full = Instant::now() + self.timing.full_sync_period;
                }
                queued_at = if ok {
                    None
                } else {
                    // Retry after the minimum period, as kube-proxy does.
                    Some(queued)
                };
                if !ok {
                    tokio::select! {
                        _ = tokio::time::sleep(self.timing.min_sync_period.max(Duration::from_secs(1))) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                continue;
            }
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        tracing::info!("source closed; stopping the sync loop (rules stay in place)");
                        return;
                    }
                    queued_at = Some(Instant::now());
                    self.mark_queued();
                    let (services, slices) =
                        changes::pending(&self.synced_objects, &snapshots.borrow().objects);
                    self.metrics.set_pending(services, slices);
                }
                _ = tokio::time::sleep_until(next_full.into()) => {
                    queued_at = Some(Instant::now());
                    self.need_full = true;
                    self.mark_queued();
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One sync: model, diff, dataplane, metrics. Returns whether it succeeded.
    fn sync_once(&mut self, snapshot: &Snapshot, full: bool) -> bool {
        let started = Instant::now();
        let mut desired = model::build(&snapshot.objects, &self.model_config);
        desired.rejected.extend(snapshot.rejected.iter().cloned());
        desired.rejected.sort();
        // The source and the model may report the same problem (a slice
        // passed on with a bad endpoint); keep one, with the source's origin.
        desired.rejected.dedup_by(|later, kept| {
            let same = Rejection {
                origin: kept.origin.clone(),
                ..later.clone()
            } == *kept;
            if same && kept.origin.is_none() {
                kept.origin = later.origin.take();
            }
            same
        });
        self.report_rejections(&desired.rejected);
        if desired.node.eligible != self.health.report(SystemTime::now()).node_eligible {
            tracing::info!(
                eligible = desired.node.eligible,
                "this Node is {}: /healthz follows",
                if desired.node.eligible {
                    "eligible again"
                } else {
                    "being deleted or drained (deletion timestamp or ToBeDeletedByClusterAutoscaler)"
                }
            );
        }
        self.health.set_node_eligible(desired.node.eligible);

        let changes = if full {
            full_changes(&self.applied, &desired)
        } else {
            model::diff(&self.applied, &desired)
        };
        if !full && changes.is_empty() {
            self.metrics.set_rejected(&desired.rejected);
            self.health.updated(SystemTime::now());
            return true;
        }
        let (service_changes, endpoint_changes) = count_changes(&self.applied, &desired, &changes);
        self.metrics.add_service_changes(service_changes);
        self.metrics.add_endpoint_changes(endpoint_changes);

        // iptables-restore blocks; keep the runtime's other tasks (healthz) answering.
        let result = tokio::task::block_in_place(|| self.dataplane.sync(&desired, &changes, full));
        let elapsed = started.elapsed();
        match result {
            Ok(stats) => {
                self.metrics.observe_sync(full, elapsed, true);
                let now = SystemTime::now();
                for t in changes::trigger_times(&self.synced_objects, &snapshot.objects) {
                    self.metrics
                        .observe_network_programming(now.duration_since(t).unwrap_or_default());
                }
                self.synced_objects = snapshot.objects.clone();
                self.metrics.set_pending(0, 0);
                for (table, total, written) in &stats.rules {
                    self.metrics.set_iptables_rules(table, *total);
                    self.metrics.set_iptables_rules_last(table, *written);
                }
                if let Some(ct) = &stats.conntrack {
                    self.metrics
                        .observe_conntrack_reconcile(ct.duration, ct.deleted);
                }
                self.metrics.observe_desired(&desired);
                self.metrics.set_service_errors(&stats.errors);
                for e in &stats.errors {
                    tracing::error!(service = %e.service, reason = %e.reason, "{}", e.message);
                }
                // Before the health-check servers, which report proxy health.
                self.health.updated(SystemTime::now());
                self.health_checks.sync(&desired);
                tracing::info!(
                    full,
                    services = desired.services.len(),
                    added = changes.added.len(),
                    updated = changes.updated.len(),
                    removed = changes.removed.len(),
                    written = stats.objects_written,
                    deleted = stats.objects_deleted,
                    elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                    "synced {} dataplane",
                    self.dataplane.mode()
                );
                self.applied = desired;
                self.need_full = false;
                let trim = memory::release_freed();
                tracing::debug!(trim_ms = trim.as_secs_f64() * 1000.0, "returned freed heap");
                true
            }
            Err(err) => {
                self.metrics.observe_sync(full, elapsed, false);
                if err.is_restore_failure() {
                    self.metrics.inc_iptables_restore_failures();
                    if !full {
                        self.metrics.inc_iptables_partial_restore_failures();
                    }
                }
                self.health.sync_failed(&err);
                tracing::error!(full, error = %err, "sync failed; the next sync rewrites everything");
                self.need_full = true;
                false
            }
        }
    }

    fn mark_queued(&self) {
        let now = SystemTime::now();
        self.health.queued(now);
        self.metrics.observe_queued(now);
    }

    fn report_rejections(&mut self, rejected: &[Rejection]) {
        let current: BTreeSet<Rejection> = rejected.iter().cloned().collect();
        for r in current.difference(&self.reported) {
            tracing::warn!(reason = %r.reason, "rejected: {r}");
        }
        for r in self.reported.difference(&current) {
            tracing::info!("no longer rejected: {r}");
        }
        self.reported = current;
    }
}

/// For a full sync every Service port counts as written, and every one that
/// disappeared as removed.
fn full_changes(old: &DesiredState, new: &DesiredState) -> Changes {
    let diff = model::diff(old, new);
    Changes {
        added: diff.added,
        updated: new
            .services
            .keys()
            .filter(|k| old.services.contains_key(*k))
            .cloned()
            .collect(),
        removed: diff.removed,
    }
}

/// (service changes, endpoint changes), as kube-proxy's change counters count
/// them: a Service port whose frontends changed is a service change, one whose
/// endpoints changed is an endpoint change.
fn count_changes(old: &DesiredState, new: &DesiredState, changes: &Changes) -> (u64, u64) {
    let mut services = (changes.added.len() + changes.removed.len()) as u64;
    let mut endpoints = 0u64;
    for key in &changes.updated {
        let (Some(a), Some(b)) = (old.services.get(key), new.services.get(key)) else {
            continue;
        };
        if a.all_endpoints != b.all_endpoints {
            endpoints += 1;
        }
        let mut a_front = a.clone();
        a_front.all_endpoints.clone_from(&b.all_endpoints);
        a_front.cluster_endpoints.clone_from(&b.cluster_endpoints);
        a_front.external_endpoints.clone_from(&b.external_endpoints);
        a_front.local_endpoint_count = b.local_endpoint_count;
        if &a_front != b {
            services += 1;
        }
    }
    (services, endpoints)
}

#[cfg(test)]
mod tests;
