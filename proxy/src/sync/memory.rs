//! Giving freed heap back to the kernel after a sync, and keeping it in
//! one arena where threads would otherwise strand it.
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

/// Every thread started from now on allocates from one glibc arena (for
/// the kube source; call it before the runtime starts its workers).
/// glibc gives each new thread an arena of its own (up to 8 per core), and
/// pages freed in one arena are not reused by another. In
/// cluster mode the reflectors decode their lists on one runtime worker
/// while the sync loop applies the events on another, so the first sync's
/// 50 MiB at 10,000 Services came from a second arena while the decoded
/// lists' freed pages sat in the first: RSS 157 MiB after the first sync,
/// peak 225 MiB, against 133 and 143 MiB on one arena, with the same start
/// time (`cluster_scale`, docs/cluster-mode.md). Not for the manifest
/// source: its parse threads allocate at the same time, and on one arena
/// its first parse took 1.3-1.8 s instead of 0.75-0.86 s.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's own tuning.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
