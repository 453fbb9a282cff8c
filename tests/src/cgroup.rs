//! cgroup v2 directories created by a test (socket hooks of ebpf mode attach
//! there, never to the root cgroup).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The cgroup2 mount point, read from /proc/mounts (it is
/// /sys/fs/cgroup on most systems, /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    for line in mounts.lines() {
        let mut parts = line.split_whitespace();
        let (_, Some(dir), Some(fstype)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if fstype == "cgroup2" {
            return Ok(PathBuf::from(dir));
        }
    }
    bail!("no cgroup2 file system is mounted (mount -t cgroup2 none /sys/fs/cgroup)")
}

/// A cgroup made by a test; processes left in it are killed and the
/// directory removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Cgroup> {
        let path = cgroup2_mount()?.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {} (needs root)", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes we started are killed by their owners first; a cgroup
        // with members cannot be removed, so retry briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
