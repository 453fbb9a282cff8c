//! kproxy: a Kubernetes service proxy. The pure [`model`] turns objects from a
//! [`source`] into a desired state that a [`dataplane`] programs.

pub mod dataplane;
pub mod health;
pub mod metrics;
pub mod model;
pub mod server;
pub mod source;
