//! The objects the model reads, each validated once: a source turns what it
//! sees into [`Event`]s carrying [`Checked`] objects (the object, its
//! checked parts and what is wrong with it), and the [`Tracker`] keeps them
//! as they are. Nothing is validated twice.
//!
//! [`Tracker`]: super::Tracker

use std::fmt;
use std::sync::Arc;

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
        Checked {
            key,
            object: self,
            parsed,
            rejections,
        }
    }
}

/// The checked parts of an object; `None` where the object is left out.
#[derive(Debug, Clone)]
pub(crate) enum Parsed {
    Service(Option<Arc<ParsedService>>),
    Slice(Option<Arc<ParsedSlice>>),
    Node(Option<Arc<ParsedNode>>),
}

/// An object with the result of its one validation.
#[derive(Debug, Clone)]
pub struct Checked {
    key: ObjectKey,
    object: Object,
    pub(crate) parsed: Parsed,
    rejections: Vec<Rejection>,
}

impl Checked {
    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    pub fn object(&self) -> &Object {
        &self.object
    }

    /// What is wrong with the object; empty when it is valid. A Service
    /// with any problem is left out whole; an EndpointSlice or Node loses
    /// only its bad parts (see [`super::validate_endpoint_slice`]).
    pub fn rejections(&self) -> &[Rejection] {
        &self.rejections
    }

    /// Says where the object came from in each of its rejections
    /// (`path/to/file.yaml, document 2`).
    pub fn with_origin(mut self, origin: &str) -> Checked {
        for r in &mut self.rejections {
            r.origin = Some(origin.to_string());
        }
        self
    }
}

impl PartialEq for Checked {
    /// The same object with the same problems (the parsed parts follow
    /// from the object).
    fn eq(&self, other: &Checked) -> bool {
        self.key == other.key
            && (self.object.same(&other.object) || self.object == other.object)
            && self.rejections == other.rejections
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
