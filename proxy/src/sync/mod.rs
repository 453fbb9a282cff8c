//! The sync loop: feeds the source's events to the model's change tracker
//! and hands the dataplane the tracker's change set. Changes are coalesced
//! by the minimum sync period; a periodic full sync repairs drift. The
//! loop alone decides when a sync is full, and when a Service port the
//! dataplane could not program is retried (`frontends`: each frontend's
//! status, with backoff).

mod changes;
pub mod frontends;
pub mod memory;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::dataplane::{Dataplane, ProxyMode};
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::model::{self, ChangeSet, ModelConfig, Rejection, Tracker};
use crate::server::HealthCheckServers;
use crate::source::EventReceiver;

/// Why the sync loop stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("every Service of this cluster is IPv6 ({count} of them, e.g. {example}): kproxy supports IPv4 only, so it would serve nothing on this node; keep kube-proxy on IPv6-only clusters")]
    Ipv6Only { count: usize, example: String },
}

/// How long after an incremental sync freed heap goes back to the kernel
/// (at most once per this period, however many syncs run). Each change
/// frees what its rescan and recomputation allocated, on whichever
/// thread's allocator arena ran them: without this, 1,000 endpoint changes
/// at 10,000 Services grew the RSS by 10 MiB until the next full sync.
/// A trim costs about a millisecond.
const IDLE_TRIM_AFTER: Duration = Duration::from_secs(1);

/// From this many changed Service ports on, the status table's bookkeeping
/// runs on a thread of its own beside the dataplane's sync.
const BEGIN_BESIDE_MIN: usize = 1024;

/// iptables mode rewrites every rule this often at least (kube-proxy's
/// `FullSyncPeriod`): at 10,000 Services a full restore takes 10 s, and a
/// change that arrives meanwhile waits for it.
const IPTABLES_FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Timing settings of the loop (kube-proxy's `--iptables-sync-period` and
/// `--iptables-min-sync-period`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTiming {
    pub full_sync_period: Duration,
    pub min_sync_period: Duration,
    /// How often the dataplane is asked whether its rules were removed
    /// behind kproxy's back ([`Dataplane::drifted`]); a periodic sync runs
    /// then too, which repairs them when they were.
    pub drift_check_period: Option<Duration>,
}

impl SyncTiming {
    /// The latency policy of each mode. iptables mode keeps kube-proxy's
    /// rate limit: every sync is an `iptables-restore`, so changes wait out
    /// `--iptables-min-sync-period` and go together. In ebpf mode a change
    /// costs a few map updates, so it is applied as soon as it arrives; a
    /// burst still coalesces, because the changes arriving while one sync
    /// runs are taken together by the next (the loop always reads the latest
    /// snapshot), with no fixed delay added.
    ///
    /// `sync_period` (`--iptables-sync-period`) is, as in kube-proxy: in
    /// iptables mode the period of a sync that writes only what changed
    /// after checking a canary chain (a firewall reload that flushed the
    /// tables makes it full), with a full rewrite once an hour; in ebpf
    /// mode the period of the full sync that repairs drift (it writes only
    /// what differs from the maps, read back in batches).
    pub fn for_mode(
        mode: ProxyMode,
        sync_period: Duration,
        min_sync_period: Duration,
    ) -> SyncTiming {
        match mode {
            ProxyMode::Iptables => SyncTiming {
                full_sync_period: sync_period.max(IPTABLES_FULL_SYNC_PERIOD),
                min_sync_period,
                drift_check_period: Some(sync_period),
            },
            ProxyMode::Ebpf => SyncTiming {
                full_sync_period: sync_period,
                min_sync_period: Duration::ZERO,
                drift_check_period: None,
            },
        }
    }
}

pub struct SyncLoop {
    dataplane: Box<dyn Dataplane>,
    timing: SyncTiming,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
    health_checks: HealthCheckServers,
    /// The model, kept up to date one event at a time.
    tracker: Tracker,
    /// The next sync must rewrite everything (start, after an error, drift
    /// repair): the only full-sync flag.
    need_full: bool,
    /// Rejections already logged, so each is logged once while it lasts.
    reported: BTreeSet<Rejection>,
    /// Objects changed since the last successful sync (the pending-change
    /// gauges and the network programming latency).
    pending: changes::Pending,
    /// `--detect-local-mode NodeCIDR`: whether the Node's pod CIDRs were
    /// missing at the last sync (`None` before the first, or in other modes).
    pod_cidrs_missing: Option<bool>,
    node_cidr_mode: bool,
}

/// What to log when the Node's pod CIDRs appear or go missing in NodeCIDR
/// mode (kube-proxy waits for them and exits; kproxy runs on, treating no
/// traffic as local, and says so once per change).
fn pod_cidr_notice(was_missing: Option<bool>, node: &model::NodeInfo) -> Option<(bool, String)> {
    let missing = node.pod_cidrs.is_empty();
    if was_missing == Some(missing) || (was_missing.is_none() && !missing) {
        return None;
    }
    Some(if missing {
        (
            true,
            format!(
                "--detect-local-mode NodeCIDR: Node {:?} has no spec.podCIDRs (or no such Node was seen): \
                 no traffic is treated as local until it has; check --hostname-override, and that the \
                 cluster allocates node CIDRs (kube-controller-manager --allocate-node-cidrs), or use ClusterCIDR",
                node.name
            ),
        )
    } else {
        (
            false,
            format!(
                "--detect-local-mode NodeCIDR: Node {:?} has pod CIDRs {:?}: traffic from them is local",
                node.name,
                node.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>()
            ),
        )
    })
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
            timing,
            metrics,
            health,
            health_checks,
            tracker: Tracker::new(model_config),
            need_full: true,
            reported: BTreeSet::new(),
            pending: changes::Pending::default(),
            pod_cidrs_missing: None,
            node_cidr_mode: false,
        }
    }

    /// Local traffic is told by the Node's pod CIDRs (`--detect-local-mode
    /// NodeCIDR`): their absence is logged.
    pub fn with_node_cidr_detection(mut self, yes: bool) -> Self {
        self.node_cidr_mode = yes;
        self
    }

    fn apply(&mut self, batch: Vec<model::Event>) {
        for ev in batch {
            self.pending.note(&ev);
            self.tracker.apply(ev);
        }
    }

    /// Applies every batch already waiting; false when the source is gone.
    fn drain(&mut self, events: &mut EventReceiver) -> bool {
        loop {
            match events.try_recv() {
                Ok(batch) => self.apply(batch),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return true,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Runs until the source stops or `shutdown` fires. Never removes what
    /// was programmed: a stopped kproxy leaves traffic flowing. Fails only
    /// when the source's complete state shows an IPv6-only cluster (kproxy
    /// would serve nothing, and must not look healthy).
    pub async fn run(
        mut self,
        mut events: EventReceiver,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SyncError> {
        // The first sync waits until the source has told everything once, so a
        // restart never programs a partial state over a complete one.
        while !self.tracker.synced() {
            tokio::select! {
                batch = events.recv() => match batch {
                    Some(batch) => self.apply(batch),
                    None => return Ok(()),
                },
                _ = shutdown.changed() => return Ok(()),
            }
        }
        self.drain(&mut events);
        let families = self.tracker.service_families();
        if families.ipv6_only > 0 && families.ipv4 == 0 {
            return Err(SyncError::Ipv6Only {
                count: families.ipv6_only,
                example: families.example.unwrap_or_default(),
            });
        }
        let mut queued_at = Some(Instant::now());
        self.mark_queued();
        let mut last_sync: Option<Instant> = None;
        let mut next_full = Instant::now();
        let mut next_check = self.timing.drift_check_period.map(|p| Instant::now() + p);
        let mut open = true;
        // When freed heap goes back to the kernel after incremental syncs.
        let mut trim_at: Option<Instant> = None;

        loop {
            if let Some(queued) = queued_at {
                // Coalesce: wait out the minimum period since the last sync.
                if let Some(last) = last_sync {
                    let ready_at = last + self.timing.min_sync_period;
                    if ready_at > Instant::now() {
                        tokio::select! {
                            _ = tokio::time::sleep_until(ready_at.into()) => {}
                            _ = shutdown.changed() => return Ok(()),
                        }
                    }
                }
                // Everything that arrived meanwhile goes in this sync.
                open = self.drain(&mut events) && open;
                let full = self.need_full || Instant::now() >= next_full;
                let ok = self.sync_once(full);
                if ok && !full && trim_at.is_none() {
                    trim_at = Some(Instant::now() + IDLE_TRIM_AFTER);
                }
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
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
                continue;
            }
            if !open {
                tracing::info!("source closed; stopping the sync loop (rules stay in place)");
                return Ok(());
            }
            let next_retry = self.metrics.frontend_table().next_retry();
            let next_bind = self.health_checks.next_retry();
            tokio::select! {
                batch = events.recv() => {
                    let Some(batch) = batch else {
                        tracing::info!("source closed; stopping the sync loop (rules stay in place)");
                        return Ok(());
                    };
                    self.apply(batch);
                    queued_at = Some(Instant::now());
                    self.mark_queued();
                    let (services, slices) = self.pending.counts();
                    self.metrics.set_pending(services, slices);
                }
                _ = tokio::time::sleep_until(next_full.into()) => {
                    queued_at = Some(Instant::now());
                    self.need_full = true;
                    self.mark_queued();
                }
                // The periodic sync; full when the rules were removed.
                _ = sleep_until_some(next_check) => {
                    next_check = self.timing.drift_check_period.map(|p| Instant::now() + p);
                    let dataplane = &mut self.dataplane;
                    if tokio::task::block_in_place(|| dataplane.drifted()) {
                        tracing::warn!("kproxy's rules were removed behind its back (a firewall reload?): rewriting all of them");
                        self.need_full = true;
                        self.mark_queued();
                    }
                    queued_at = Some(Instant::now());
                }
                // Ports in error, retried on their own (no full sync).
                _ = sleep_until_some(next_retry) => {
                    queued_at = Some(Instant::now());
                }
                // healthCheckNodePort addresses not bound yet (a tentative
                // IPv6 address, a port taken): a sync with nothing to write
                // does not reach the servers, so they are retried here.
                _ = sleep_until_some(next_bind) => {
                    self.health_checks.retry_due(Instant::now());
                }
                _ = sleep_until_some(trim_at) => {
                    trim_at = None;
                    let took = memory::release_freed();
                    tracing::debug!(trim_ms = took.as_secs_f64() * 1000.0, "returned freed heap after incremental syncs");
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// One sync: the tracker's changes to the dataplane, then metrics.
    /// Returns whether it succeeded.
    fn sync_once(&mut self, full: bool) -> bool {
        let started = Instant::now();
        let changes = {
            let _span = tracing::debug_span!("model").entered();
            self.tracker.take_changes()
        };
        let model_time = started.elapsed();
        let desired = self.tracker.state();
        report_rejections(&mut self.reported, &desired.rejected);
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
        if self.node_cidr_mode {
            match pod_cidr_notice(self.pod_cidrs_missing, &desired.node) {
                Some((true, notice)) => tracing::warn!("{notice}"),
                Some((false, notice)) => tracing::info!("{notice}"),
                None => {}
            }
            self.pod_cidrs_missing = Some(desired.node.pod_cidrs.is_empty());
        }

        // Ports in error whose backoff is over; all of them when Service
        // ports go away (their map entries may have made room). A full sync
        // writes everything anyway.
        let retry = {
            let table = self.metrics.frontend_table();
            if full {
                Vec::new()
            } else if changes.removed().next().is_some() {
                table.errored()
            } else {
                table.due(Instant::now())
            }
        };
        if !full && changes.is_empty() && retry.is_empty() {
            self.metrics.set_rejected(&desired.rejected);
            self.health.updated(SystemTime::now());
            self.pending.clear();
            self.metrics.set_pending(0, 0);
            return true;
        }
        let (service_changes, endpoint_changes) = count_changes(&changes);
        self.metrics.add_service_changes(service_changes);
        self.metrics.add_endpoint_changes(endpoint_changes);

        // The status table's bookkeeping does not wait for the dataplane's
        // result until `finish`: for a large change set (a first or full
        // sync: 25 ms at 10,000 Services) it runs on another core meanwhile.
        let metrics = &self.metrics;
        let begin = || {
            metrics
                .frontend_table()
                .begin(desired, &changes, &retry, full, Instant::now());
            metrics.observe_frontends(None);
        };
        let beside = changes.len() >= BEGIN_BESIDE_MIN;
        if !beside {
            begin();
        }
        // iptables-restore blocks; keep the runtime's other tasks (healthz) answering.
        let dataplane = &mut self.dataplane;
        let result = tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let begun = beside.then(|| scope.spawn(begin));
                let result = dataplane.sync_retrying(desired, &changes, &retry, full);
                if let Some(Err(panic)) = begun.map(|b| b.join()) {
                    std::panic::resume_unwind(panic);
                }
                result
            })
        });
        let elapsed = started.elapsed();
        let outcome = self
            .metrics
            .frontend_table()
            .finish(result.as_ref().map(|s| s.errors.as_slice()), Instant::now());
        self.metrics.observe_frontends(Some(&outcome));
        match result {
            Ok(stats) => {
                self.metrics.observe_sync(full, elapsed, true);
                let now = SystemTime::now();
                for t in self.pending.trigger_times() {
                    self.metrics
                        .observe_network_programming(now.duration_since(t).unwrap_or_default());
                }
                self.pending.clear();
                self.metrics.set_pending(0, 0);
                for (table, total, written) in &stats.rules {
                    self.metrics.set_iptables_rules(table, *total);
                    self.metrics.set_iptables_rules_last(table, *written);
                }
                if let Some(ct) = &stats.conntrack {
                    self.metrics
                        .observe_conntrack_reconcile(ct.duration, ct.deleted);
                }
                if full {
                    self.metrics.observe_desired(desired);
                } else {
                    self.metrics.observe_changes(desired, &changes);
                }
                self.metrics.count_service_errors(&stats.errors);
                for e in &stats.errors {
                    tracing::error!(service = %e.service, reason = %e.reason, "{}", e.message);
                }
                let (added, updated, removed) = (
                    changes.added().count(),
                    changes.updated().count(),
                    changes.removed().count(),
                );
                self.need_full = false;
                // A full sync (its change set included) may free much: it
                // goes back to the kernel before `/healthz` says the sync
                // is done, so the RSS seen then is the settled one.
                // Incremental syncs free little; they are trimmed when
                // idle ([`IDLE_TRIM_AFTER`]).
                let changes = if full {
                    drop(changes);
                    let trim = memory::release_freed();
                    tracing::debug!(trim_ms = trim.as_secs_f64() * 1000.0, "returned freed heap");
                    None
                } else {
                    Some(changes)
                };
                // Before the health-check servers, which report proxy health.
                self.health.updated(SystemTime::now());
                match &changes {
                    None => self.health_checks.sync(desired),
                    Some(changes) => self.health_checks.sync_changes(desired, changes),
                }
                tracing::info!(
                    full,
                    services = desired.services.len(),
                    added,
                    updated,
                    removed,
                    retried = retry.len(),
                    errors = stats.errors.len(),
                    recomputed = self.tracker.recomputed(),
                    written = stats.objects_written,
                    deleted = stats.objects_deleted,
                    model_ms = model_time.as_secs_f64() * 1000.0,
                    elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                    "synced {} dataplane",
                    self.dataplane.mode()
                );
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
}

/// Sleeps until `t`; forever without one.
async fn sleep_until_some(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Logs each rejection once while it lasts, and when it goes.
fn report_rejections(reported: &mut BTreeSet<Rejection>, rejected: &[Rejection]) {
    if rejected.len() == reported.len() && rejected.iter().zip(reported.iter()).all(|(a, b)| a == b)
    {
        return;
    }
    let current: BTreeSet<Rejection> = rejected.iter().cloned().collect();
    for r in current.difference(reported) {
        tracing::warn!(reason = %r.reason, "rejected: {r}");
    }
    for r in reported.difference(&current) {
        tracing::info!("no longer rejected: {r}");
    }
    *reported = current;
}

/// (service changes, endpoint changes), as kube-proxy's change counters count
/// them: a Service port added, removed or with other frontends is a service
/// change; one whose endpoints changed is an endpoint change.
fn count_changes(changes: &ChangeSet) -> (u64, u64) {
    let (mut services, mut endpoints) = (0, 0);
    for (_, c) in changes.iter() {
        let (Some(a), Some(b)) = (&c.old, &c.new) else {
            services += 1;
            continue;
        };
        if a.all_endpoints != b.all_endpoints {
            endpoints += 1;
        }
        if !c.endpoints_only() {
            services += 1;
        }
    }
    (services, endpoints)
}

#[cfg(test)]
mod tests;
