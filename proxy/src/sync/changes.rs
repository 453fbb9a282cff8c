//! What changed in the source's objects since the last successful sync,
//! for kube-proxy's metrics: the `*_changes_pending` gauges (Services and
//! EndpointSlices changed but not yet programmed) and the network
//! programming latency, measured from each changed EndpointSlice's
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation (set by
//! the EndpointSlice controller when a pod or Service change triggered it),
//! as kube-proxy measures it.
//!
//! Sources share objects by `Arc`, and replace an object's `Arc` when it
//! changes, so pointer comparison finds the changed ones cheaply.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::ClusterObjects;

/// The annotation the EndpointSlice controller sets.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

type Key<'a> = (&'a str, &'a str);

fn key(meta: &ObjectMeta) -> Key<'_> {
    (
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// Objects of `new` that are not in `old` (same key, same `Arc`), plus
/// objects of `old` gone from `new`.
fn changed<'a, T>(
    old: &'a [Arc<T>],
    new: &'a [Arc<T>],
    meta: impl Fn(&T) -> &ObjectMeta,
) -> (Vec<&'a Arc<T>>, usize) {
    let before: HashMap<Key<'_>, &Arc<T>> = old.iter().map(|o| (key(meta(o)), o)).collect();
    let mut seen = 0;
    let mut out = Vec::new();
    for o in new {
        match before.get(&key(meta(o))) {
            Some(prev) => {
                seen += 1;
                if !Arc::ptr_eq(prev, o) {
                    out.push(o);
                }
            }
            None => out.push(o),
        }
    }
    (out, old.len() - seen)
}

/// (Services, EndpointSlices) changed between `old` and `new`, deletions included.
pub fn pending(old: &ClusterObjects, new: &ClusterObjects) -> (usize, usize) {
    let (svc, svc_gone) = changed(&old.services, &new.services, |s| &s.metadata);
    let (eps, eps_gone) = changed(&old.endpoint_slices, &new.endpoint_slices, |s| &s.metadata);
    (svc.len() + svc_gone, eps.len() + eps_gone)
}

/// The trigger times of the EndpointSlices that changed between `old` and
/// `new` and carry the annotation.
pub fn trigger_times(old: &ClusterObjects, new: &ClusterObjects) -> Vec<SystemTime> {
    let (eps, _) = changed(&old.endpoint_slices, &new.endpoint_slices, |s| &s.metadata);
    eps.iter()
        .filter_map(|s| s.metadata.annotations.as_ref()?.get(TRIGGER_TIME))
        .filter_map(|t| parse_time(t))
        .collect()
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = s.parse().ok()?;
    Some(SystemTime::from(ts))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;

    fn slice(name: &str, trigger: Option<&str>) -> Arc<EndpointSlice> {
        let mut s = EndpointSlice::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("default".into());
        if let Some(t) = trigger {
            s.metadata.annotations = Some([(TRIGGER_TIME.to_string(), t.to_string())].into());
        }
        Arc::new(s)
    }

    fn service(name: &str) -> Arc<Service> {
        let mut s = Service::default();
        s.metadata.name = Some(name.into());
        Arc::new(s)
    }

    #[test]
    fn counts_and_trigger_times_of_changed_objects_only() {
        let a = slice("a", Some("2024-01-01T00:00:01Z"));
        let b = slice("b", Some("2024-01-01T00:00:02.5Z"));
        let web = service("web");
        let old = ClusterObjects {
            services: vec![web.clone(), service("gone")],
            endpoint_slices: vec![a.clone(), b],
            nodes: vec![],
        };
        let new = ClusterObjects {
            services: vec![web],
            endpoint_slices: vec![
                a,
                slice("b", Some("2024-01-01T00:00:03.25Z")),
                slice("c", None),
            ],
            nodes: vec![],
        };
        assert_eq!(pending(&old, &new), (1, 2));
        assert_eq!(pending(&new, &new), (0, 0));
        let t = trigger_times(&old, &new);
        assert_eq!(
            t,
            vec![UNIX_EPOCH + Duration::from_millis(1_704_067_203_250)]
        );
    }
}
