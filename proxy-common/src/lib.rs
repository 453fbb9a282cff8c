//! Map keys, values and constants shared by the kproxy userspace and its eBPF
//! programs. `no_std` and `#[repr(C)]` so both sides agree on the layout.
#![no_std]
