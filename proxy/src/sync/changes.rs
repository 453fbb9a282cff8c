//! What changed in the source's objects since the last successful sync,
//! for kube-proxy's metrics: the `*_changes_pending` gauges (Services and
//! EndpointSlices changed but not yet programmed) and the network
//! programming latency, measured from each changed EndpointSlice's
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation (set by
//! the EndpointSlice controller when a pod or Service change triggered it),
//! as kube-proxy measures it. Counted from the source's events as they
//! arrive.

use std::time::SystemTime;

use crate::hashing::{HashMap, HashSet};
use crate::model::{Event, Kind, ObjectKey};

/// Objects changed (deletions included) since the last successful sync.
#[derive(Debug, Default)]
pub struct Pending {
    services: HashSet<ObjectKey>,
    slices: HashSet<ObjectKey>,
    /// The trigger time of each changed slice that carries one.
    triggers: HashMap<ObjectKey, SystemTime>,
}

impl Pending {
    pub fn note(&mut self, ev: &Event) {
        let key = match ev {
            Event::Upsert(c) => c.key(),
            Event::Delete(k) => k,
            Event::Problems(_) | Event::Synced => return,
        };
        match key.kind {
            Kind::Service => {
                self.services.insert(key.clone());
            }
            Kind::EndpointSlice => {
                self.slices.insert(key.clone());
                let time = match ev {
                    Event::Upsert(c) => c.trigger_time(),
                    _ => None,
                };
                match time {
                    Some(t) => self.triggers.insert(key.clone(), t),
                    None => self.triggers.remove(key),
                };
            }
            Kind::Node => {}
        }
    }

    /// (Services, EndpointSlices) changed.
    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }

    /// The trigger times of the changed EndpointSlices that carry one.
    pub fn trigger_times(&self) -> impl Iterator<Item = SystemTime> + '_ {
        self.triggers.values().copied()
    }

    /// All programmed.
    pub fn clear(&mut self) {
        self.services.clear();
        self.slices.clear();
        self.triggers.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;
    use crate::model::{Object, TRIGGER_TIME};

    fn slice(name: &str, trigger: Option<&str>) -> Event {
        let mut s = EndpointSlice::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("default".into());
        if let Some(t) = trigger {
            s.metadata.annotations = Some([(TRIGGER_TIME.to_string(), t.to_string())].into());
        }
        Event::upsert(Object::EndpointSlice(Arc::new(s)))
    }

    fn service(name: &str) -> Event {
        let mut s = Service::default();
        s.metadata.name = Some(name.into());
        Event::upsert(Object::Service(Arc::new(s)))
    }

    #[test]
    fn counts_and_trigger_times_of_changed_objects_only() {
        let mut p = Pending::default();
        for ev in [
            service("web"),
            Event::Delete(ObjectKey {
                kind: Kind::Service,
                namespace: "default".into(),
                name: "gone".into(),
            }),
            slice("b", Some("2024-01-01T00:00:02.5Z")),
            slice("b", Some("2024-01-01T00:00:03.25Z")),
            slice("c", None),
            Event::Synced,
        ] {
            p.note(&ev);
        }
        assert_eq!(p.counts(), (2, 2));
        let t: Vec<_> = p.trigger_times().collect();
        assert_eq!(
            t,
            vec![UNIX_EPOCH + Duration::from_millis(1_704_067_203_250)]
        );
        p.clear();
        assert_eq!(p.counts(), (0, 0));
        assert_eq!(p.trigger_times().count(), 0);
    }
}
