//! kproxy: a Kubernetes service proxy. The pure [`model`] turns objects from a
//! [`source`] into a desired state that a [`dataplane`] programs.

pub mod dataplane;
pub mod model;
pub mod source;
