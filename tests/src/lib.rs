//! The network-namespace test harness for kproxy.
//!
//! [`topo::Topology`] builds the test topology of ARCHITECTURE.md (an outside
//! client, two nodes on one LAN, pods on each node) entirely in network
//! namespaces it creates, runs one real `kproxy` process per node on a
//! shared manifest directory, and tears everything down on drop, also when a
//! test panics. Names carry the process id and a counter, so tests run in
//! parallel. Nothing is added to the root namespace.

pub mod cgroup;
pub mod client;
pub mod generated;
pub mod kproxy;
pub mod leftovers;
pub mod manifests;
pub mod netns;
pub mod poll;
pub mod topo;

pub use kproxy::Mode;
pub use topo::Topology;
