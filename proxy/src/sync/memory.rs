//! Giving freed heap back to the kernel after a sync.
//!
//! Every sync builds a whole new desired state and drops the previous one;
//! at 10,000 Services that is tens of MiB per sync, freed on whichever
//! thread ran it. glibc keeps freed pages in per-thread arenas, so without
//! this the resident size of a long-running agent climbed to twice its
//! working set after a hundred updates (docs/cluster-mode.md has numbers).

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
