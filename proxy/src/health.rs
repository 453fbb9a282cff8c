//! Proxy health, with kube-proxy's `/healthz` semantics.
//!
//! The sync loop calls [`HealthState::queued`] when a change is queued and
//! [`HealthState::updated`] after each successful sync. kproxy is healthy when
//! the first sync has completed and no queued change has waited longer than
//! the timeout (kube-proxy uses twice the sync period). Unlike kube-proxy,
//! which reports healthy before its first sync, kproxy reports 503 until the
//! dataplane has been programmed once: a load balancer should not send
//! traffic to a node whose rules are not there yet.

use std::fmt::{self, Display};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Why the proxy is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unhealthy {
    /// No sync has completed yet.
    NotYetSynced { last_error: Option<String> },
    /// A change has been queued since `since` and not programmed within the timeout.
    Stalled {
        since: SystemTime,
        last_error: Option<String>,
    },
    /// The Node is being deleted or drained by the cluster autoscaler.
    NodeNotEligible,
    /// No sync yet because the source has not read everything once (the
    /// Kubernetes API server is unreachable, for example).
    SourceNotReady { reason: String },
}

impl Display for Unhealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unhealthy::NotYetSynced { last_error } => {
                f.write_str("the dataplane has not been programmed yet")?;
                if let Some(err) = last_error {
                    write!(f, "; last sync error: {err}")?;
                }
                Ok(())
            }
            Unhealthy::Stalled { since, last_error } => {
                write!(
                    f,
                    "a queued change has not been programmed since {}",
                    format_rfc3339(Some(*since))
                )?;
                if let Some(err) = last_error {
                    write!(f, "; last sync error: {err}")?;
                }
                Ok(())
            }
            Unhealthy::NodeNotEligible => f.write_str("the node is being deleted or drained"),
            Unhealthy::SourceNotReady { reason } => {
                write!(f, "the dataplane has not been programmed yet: {reason}")
            }
        }
    }
}

/// A point-in-time view of the health, what `/healthz` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// `None` when healthy.
    pub unhealthy: Option<Unhealthy>,
    /// Last successful sync, `None` before the first.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
    pub node_eligible: bool,
}

impl HealthReport {
    pub fn is_healthy(&self) -> bool {
        self.unhealthy.is_none()
    }

    /// kube-proxy's `/healthz` body. As kube-proxy does, `lastUpdated` is the
    /// current time when healthy (older clients read it as "recently synced");
    /// `reason` is ours and only present when unhealthy.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            last_updated: String,
            current_time: String,
            node_eligible: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<String>,
        }
        let last_updated = if self.is_healthy() {
            Some(self.current_time)
        } else {
            self.last_updated
        };
        let body = Body {
            last_updated: format_rfc3339(last_updated),
            current_time: format_rfc3339(Some(self.current_time)),
            node_eligible: self.node_eligible,
            reason: self.unhealthy.as_ref().map(ToString::to_string),
        };
        // Serializing strings and bools cannot fail.
        serde_json::to_string(&body).unwrap_or_default()
    }
}

#[derive(Debug)]
struct Inner {
    last_updated: Option<SystemTime>,
    /// Oldest queued change not yet programmed.
    oldest_pending: Option<SystemTime>,
    last_error: Option<String>,
    /// Why the source has not delivered its first complete state.
    source_problem: Option<String>,
    node_eligible: bool,
}

/// Thread-safe proxy health, shared (in an `Arc`) by the sync loop and the
/// HTTP servers.
#[derive(Debug)]
pub struct HealthState {
    timeout: Duration,
    inner: Mutex<Inner>,
    /// Woken by every successful sync (see [`HealthState::synced_once`]).
    synced: tokio::sync::Notify,
}

impl HealthState {
    /// `timeout`: how long a queued change may wait before kproxy reports
    /// unhealthy (use 2x the sync period, as kube-proxy does).
    pub fn new(timeout: Duration) -> Self {
        HealthState {
            timeout,
            inner: Mutex::new(Inner {
                last_updated: None,
                oldest_pending: None,
                last_error: None,
                source_problem: None,
                // Eligible until a Node says otherwise, as in kube-proxy.
                node_eligible: true,
            }),
            synced: tokio::sync::Notify::new(),
        }
    }

    /// Completes once a sync has succeeded (at once if one already has):
    /// for work that needs the dataplane programmed first.
    pub async fn synced_once(&self) {
        loop {
            let notified = self.synced.notified();
            if self.lock().last_updated.is_some() {
                return;
            }
            notified.await;
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere must not take health reporting down with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change was queued for the dataplane. Only the oldest pending one counts.
    pub fn queued(&self, now: SystemTime) {
        let mut inner = self.lock();
        if inner.oldest_pending.is_none() {
            inner.oldest_pending = Some(now);
        }
    }

    /// A sync completed successfully: everything queued so far is programmed.
    pub fn updated(&self, now: SystemTime) {
        let mut inner = self.lock();
        inner.oldest_pending = None;
        inner.last_updated = Some(now);
        inner.last_error = None;
        drop(inner);
        self.synced.notify_waiters();
    }

    /// A sync failed. Health is unaffected until the pending change is older
    /// than the timeout; the error is kept to explain the 503 then.
    pub fn sync_failed(&self, error: impl Display) {
        self.lock().last_error = Some(error.to_string());
    }

    /// The source cannot deliver its first complete state, and why (`None`
    /// once it can). Reported by `/healthz` until the first sync.
    pub fn set_source_problem(&self, problem: Option<String>) {
        self.lock().source_problem = problem;
    }

    /// The Node is (not) being deleted / drained. Affects `/healthz` only,
    /// not the healthCheckNodePort answers (as in kube-proxy).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// Proxy health ignoring node eligibility (kube-proxy's `IsHealthy`,
    /// used by `/livez` and healthCheckNodePort servers).
    pub fn is_healthy(&self, now: SystemTime) -> bool {
        self.proxy_unhealthy(&self.lock(), now).is_none()
    }

    fn proxy_unhealthy(&self, inner: &Inner, now: SystemTime) -> Option<Unhealthy> {
        if inner.last_updated.is_none() {
            if let Some(reason) = &inner.source_problem {
                return Some(Unhealthy::SourceNotReady {
                    reason: reason.clone(),
                });
            }
            return Some(Unhealthy::NotYetSynced {
                last_error: inner.last_error.clone(),
            });
        }
        let since = inner.oldest_pending?;
        // A clock stepping backwards makes the change look fresh, not late.
        let waited = now.duration_since(since).unwrap_or_default();
        if waited < self.timeout {
            return None;
        }
        Some(Unhealthy::Stalled {
            since,
            last_error: inner.last_error.clone(),
        })
    }

    /// Full report for `/healthz` (node eligibility included).
    pub fn report(&self, now: SystemTime) -> HealthReport {
        let inner = self.lock();
        let mut unhealthy = self.proxy_unhealthy(&inner, now);
        if unhealthy.is_none() && !inner.node_eligible {
            unhealthy = Some(Unhealthy::NodeNotEligible);
        }
        HealthReport {
            unhealthy,
            last_updated: inner.last_updated,
            current_time: now,
            node_eligible: inner.node_eligible,
        }
    }

    /// Report for `/livez`: like [`HealthState::report`] but ignoring the Node.
    pub fn live_report(&self, now: SystemTime) -> HealthReport {
        let inner = self.lock();
        HealthReport {
            unhealthy: self.proxy_unhealthy(&inner, now),
            last_updated: inner.last_updated,
            current_time: now,
            node_eligible: inner.node_eligible,
        }
    }
}

/// RFC 3339 UTC timestamp with second precision; `None` is Go's zero time
/// (`0001-01-01T00:00:00Z`), what kube-proxy reports before any sync.
pub fn format_rfc3339(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01T00:00:00Z".to_string();
    };
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (the classic
/// era-based conversion: 400-year eras of 146097 days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // month from March [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn unhealthy_before_first_sync_even_without_pending() {
        let h = HealthState::new(Duration::from_secs(60));
        assert!(!h.is_healthy(at(1000)));
        let r = h.report(at(1000));
        assert_eq!(
            r.unhealthy,
            Some(Unhealthy::NotYetSynced { last_error: None })
        );
        h.queued(at(1000));
        h.sync_failed("iptables-restore: exit status 1");
        let r = h.report(at(1001));
        assert!(r
            .to_json()
            .contains("not been programmed yet; last sync error: iptables-restore"));
    }

    #[test]
    fn healthy_after_sync_and_while_pending_is_young() {
        let h = HealthState::new(Duration::from_secs(60));
        h.queued(at(1000));
        h.updated(at(1001));
        assert!(
            h.is_healthy(at(5000)),
            "nothing pending: healthy however long ago"
        );
        h.queued(at(5000));
        assert!(h.is_healthy(at(5059)));
        // Later queues do not move the oldest pending time.
        h.queued(at(5050));
        assert!(
            !h.is_healthy(at(5060)),
            "pending for exactly the timeout is late"
        );
        match h.report(at(5070)).unhealthy {
            Some(Unhealthy::Stalled { since, .. }) => assert_eq!(since, at(5000)),
            other => panic!("expected stalled, got {other:?}"),
        }
        h.updated(at(5071));
        assert!(h.is_healthy(at(5071)));
    }

    #[test]
    fn failed_syncs_become_unhealthy_after_timeout_with_error() {
        let h = HealthState::new(Duration::from_secs(10));
        h.updated(at(100));
        h.queued(at(200));
        h.sync_failed("boom");
        assert!(h.is_healthy(at(205)), "a failure alone is not unhealthy");
        let r = h.report(at(211));
        assert!(!r.is_healthy());
        assert_eq!(
            r.unhealthy.unwrap().to_string(),
            "a queued change has not been programmed since 1970-01-01T00:03:20Z; last sync error: boom"
        );
    }

    #[test]
    fn clock_going_backwards_is_not_late() {
        let h = HealthState::new(Duration::from_secs(10));
        h.updated(at(100));
        h.queued(at(200));
        assert!(h.is_healthy(at(150)));
    }

    #[test]
    fn node_eligibility_affects_report_not_proxy_health() {
        let h = HealthState::new(Duration::from_secs(10));
        h.updated(at(100));
        h.set_node_eligible(false);
        assert!(h.is_healthy(at(101)));
        let r = h.report(at(101));
        assert_eq!(r.unhealthy, Some(Unhealthy::NodeNotEligible));
        assert!(!r.node_eligible);
        assert!(h.live_report(at(101)).is_healthy());
    }

    #[test]
    fn source_problem_explains_the_503_until_first_sync() {
        let h = HealthState::new(Duration::from_secs(10));
        h.set_source_problem(Some(
            "waiting for the Kubernetes API server (connection refused)".into(),
        ));
        let r = h.report(at(100));
        assert!(
            r.to_json().contains("connection refused"),
            "{}",
            r.to_json()
        );
        h.set_source_problem(None);
        assert_eq!(
            h.report(at(100)).unhealthy,
            Some(Unhealthy::NotYetSynced { last_error: None })
        );
        h.updated(at(101));
        h.set_source_problem(Some("later trouble".into()));
        assert!(
            h.is_healthy(at(102)),
            "after the first sync the dataplane keeps serving"
        );
    }

    #[test]
    fn json_body_shape() {
        let h = HealthState::new(Duration::from_secs(10));
        let v: serde_json::Value = serde_json::from_str(&h.report(at(86_400)).to_json()).unwrap();
        assert_eq!(v["lastUpdated"], "0001-01-01T00:00:00Z");
        assert_eq!(v["currentTime"], "1970-01-02T00:00:00Z");
        assert_eq!(v["nodeEligible"], true);
        assert!(v["reason"].is_string());

        h.updated(at(100));
        let v: serde_json::Value =
            serde_json::from_str(&h.report(at(1_700_000_000)).to_json()).unwrap();
        // Healthy: lastUpdated is reported as now, like kube-proxy.
        assert_eq!(v["lastUpdated"], "2023-11-14T22:13:20Z");
        assert_eq!(v["currentTime"], "2023-11-14T22:13:20Z");
        assert!(v.get("reason").is_none());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(format_rfc3339(Some(at(0))), "1970-01-01T00:00:00Z");
        // 2000-02-29 (leap day in a 400-year leap year) 12:34:56.
        assert_eq!(
            format_rfc3339(Some(at(951_827_696))),
            "2000-02-29T12:34:56Z"
        );
        assert_eq!(
            format_rfc3339(Some(at(4_102_444_799))),
            "2099-12-31T23:59:59Z"
        );
    }
}
