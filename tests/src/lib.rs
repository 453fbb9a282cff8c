//! The network-namespace test harness for kproxy.
