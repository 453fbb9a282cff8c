//! The objects the model reads, each validated once: a source turns what it
//! sees into [`Event`]s carrying [`Checked`] objects (the object, its
//! checked parts and what is wrong with it), and the [`Tracker`] keeps them
//! as they are. Nothing is validated twice.
//!
//! [`Tracker`]: super::Tracker

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::types::Rejection;
use super::validate::{self, ParsedNode, ParsedService, ParsedSlice};

/// The object kinds kproxy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }
}

/// Identity of an object: one object per key at a time. A missing namespace
/// is `default` (as the API server and kubectl have it); empty for Nodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn of(kind: Kind, meta: &ObjectMeta) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: if kind.namespaced() {
                meta.namespace.as_deref().unwrap_or("default").to_string()
            } else {
                String::new()
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.namespaced() {
            write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        } else {
            write!(f, "{} {}", self.kind.as_str(), self.name)
        }
    }
}

/// One object as a source has it (shared, never copied).
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Node(Arc<Node>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        ObjectKey::of(self.kind(), self.meta())
    }

    /// The same object (the same `Arc`).
    pub fn same(&self, other: &Object) -> bool {
        match (self, other) {
            (Object::Service(a), Object::Service(b)) => Arc::ptr_eq(a, b),
            (Object::EndpointSlice(a), Object::EndpointSlice(b)) => Arc::ptr_eq(a, b),
            (Object::Node(a), Object::Node(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Validates the object: the one check it gets.
    pub fn check(self) -> Checked {
        let key = self.key();
        let (parsed, rejections) = match &self {
            Object::Service(s) => {
                let (p, r) = validate::parse_service(s);
                (Parsed::Service(p.map(Arc::new)), r)
            }
            Object::EndpointSlice(s) => {
                let (p, r) = validate::parse_slice(s);
                (Parsed::Slice(p.map(Arc::new)), r)
            }
            Object::Node(n) => {
                let (p, r) = validate::parse_node(n);
                (Parsed::Node(p.map(Arc::new)), r)
            }
        };
        let trigger_time = match &self {
            Object::EndpointSlice(s) => trigger_time(s),
            _ => None,
        };
        Checked(Arc::new(CheckedParts {
            key,
            object: Some(self),
            parsed,
            rejections,
            trigger_time,
        }))
    }

    /// [`Object::check`], keeping the object beside its checked parts only
    /// when asked (sources serving whole objects; `kproxy run` does not).
    pub fn check_keeping(self, keep_object: bool) -> Checked {
        let checked = self.check();
        if keep_object {
            checked
        } else {
            checked.without_object()
        }
    }
}

/// The annotation the EndpointSlice controller sets: when the pod or
/// Service change that led to this version of the slice happened.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let value = slice.metadata.annotations.as_ref()?.get(TRIGGER_TIME)?;
    let ts: jiff::Timestamp = value.parse().ok()?;
    Some(SystemTime::from(ts))
}

/// The checked parts of an object; `None` where the object is left out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Parsed {
    Service(Option<Arc<ParsedService>>),
    Slice(Option<Arc<ParsedSlice>>),
    Node(Option<Arc<ParsedNode>>),
}

/// An object with the result of its one validation.
///
/// The checked parts are all the model reads. `kproxy run` drops the
/// object itself once checked ([`Checked::without_object`]): at 10,000
/// Services the typed objects were most of the agent's heap. Sources that
/// serve whole objects (`kproxy render`, tests) keep it. Shared: the
/// source's copy, the event and the tracker's copy are one allocation.
#[derive(Debug, Clone)]
pub struct Checked(Arc<CheckedParts>);

#[derive(Debug, Clone)]
struct CheckedParts {
    key: ObjectKey,
    object: Option<Object>,
    parsed: Parsed,
    rejections: Vec<Rejection>,
    /// An EndpointSlice's trigger-time annotation ([`TRIGGER_TIME`]).
    trigger_time: Option<SystemTime>,
}

impl Checked {
    pub fn key(&self) -> &ObjectKey {
        &self.0.key
    }

    /// The object, unless it was dropped after the check.
    pub fn object(&self) -> Option<&Object> {
        self.0.object.as_ref()
    }

    pub(crate) fn parsed(&self) -> &Parsed {
        &self.0.parsed
    }

    /// The same checked parts without the object (which is freed when no
    /// one else holds it).
    pub fn without_object(mut self) -> Checked {
        if self.0.object.is_some() {
            Arc::make_mut(&mut self.0).object = None;
        }
        self
    }

    /// An EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`.
    pub fn trigger_time(&self) -> Option<SystemTime> {
        self.0.trigger_time
    }

    /// What is wrong with the object; empty when it is valid. A Service
    /// with any problem is left out whole; an EndpointSlice or Node loses
    /// only its bad parts (see [`super::validate_endpoint_slice`]).
    pub fn rejections(&self) -> &[Rejection] {
        &self.0.rejections
    }

    /// Says where the object came from in each of its rejections
    /// (`path/to/file.yaml, document 2`).
    pub fn with_origin(mut self, origin: &str) -> Checked {
        if !self.0.rejections.is_empty() {
            for r in &mut Arc::make_mut(&mut self.0).rejections {
                r.origin = Some(origin.to_string());
            }
        }
        self
    }
}

impl PartialEq for Checked {
    /// The same object with the same problems (the parsed parts follow
    /// from the object); without objects, the same checked parts: what the
    /// model reads is the same.
    fn eq(&self, other: &Checked) -> bool {
        if Arc::ptr_eq(&self.0, &other.0) {
            return true;
        }
        let (a, b) = (&*self.0, &*other.0);
        if a.key != b.key || a.rejections != b.rejections || a.trigger_time != b.trigger_time {
            return false;
        }
        match (&a.object, &b.object) {
            (Some(x), Some(y)) => x.same(y) || x == y,
            (None, None) => a.parsed == b.parsed,
            _ => false,
        }
    }
}

/// What a source tells the model, one object at a time.
#[derive(Debug, Clone)]
pub enum Event {
    /// An object was created or changed (replaces the one with its key).
    Upsert(Checked),
    /// The object with this key is gone.
    Delete(ObjectKey),
    /// The source's own problems (files that do not parse, duplicates),
    /// replacing the ones it reported before.
    Problems(Vec<Rejection>),
    /// The source has told everything it had at start: the first sync may
    /// run without programming a partial state.
    Synced,
}

impl Event {
    pub fn upsert(object: Object) -> Event {
        Event::Upsert(object.check())
    }
}
