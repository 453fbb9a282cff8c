//! kproxy: a Kubernetes service proxy. The pure [`model`] turns objects from a
//! [`source`] into a desired state that a [`dataplane`] programs; the [`sync`]
//! loop drives it.

pub mod cli;
pub mod dataplane;
pub mod forward;
pub mod hashing;
pub mod health;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod node_addrs;
pub mod parallel;
pub mod process;
pub mod run;
pub mod server;
pub mod source;
pub mod status;
pub mod sync;
pub mod sysctl;
