//! Giving freed heap back to the kernel after a sync.
//!
//! A full sync (the first, the periodic drift repair) allocates and frees
//! tens of MiB at 10,000 Services (the dataplane rewrites everything), on
//! whichever thread ran it. glibc keeps freed pages in per-thread arenas,
//! so without this the resident size of a long-running agent climbed to
//! twice its working set (docs/cluster-mode.md has numbers). An
//! incremental sync frees only what its few changed Services held, so it
//! does not pay for a trim.

use std::time::{Duration, Instant};

/// Returns free heap pages to the kernel; how long it took.
pub fn release_freed() -> Duration {
    let started = Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
    started.elapsed()
}
