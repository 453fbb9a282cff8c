//! One kproxy per pin path: `kproxy run` holds an exclusive `flock` on the
//! pin directory itself for as long as it lives, taken before it touches
//! anything else; `kproxy cleanup` takes it too (or, with `--force`, goes
//! on without it).
//!
//! The lock is on the directory, not on a file in it: bpffs holds only
//! pinned objects and directories, and the directory is exactly what two
//! instances share (two pods of a DaemonSet see the same bpffs through
//! their hostPath mounts, where a lock file under /run would need a mount of
//! its own). The kernel releases the lock when the process dies, however
//! it dies. The holder's PID comes from /proc/locks, which shows it only to
//! a process in the same PID namespace (or an ancestor's).

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::dataplane::DataplaneError;

/// The held lock; released on drop (and by the kernel when the process exits).
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
}

/// Another process holds the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    pub pin: PathBuf,
    /// `None` when /proc/locks does not show it (another PID namespace).
    pub pid: Option<u32>,
}

impl Busy {
    fn holder(&self) -> String {
        match self.pid {
            Some(pid) => format!("another kproxy (pid {pid})"),
            None => {
                "another kproxy (in another PID namespace: a second pod or container on this node?)"
                    .to_string()
            }
        }
    }

    /// The error of a second `kproxy run`.
    pub fn for_run(&self) -> DataplaneError {
        DataplaneError::Other(format!(
            "{} owns --bpf-pin-path {}; stop it first, or give this instance its own --bpf-pin-path (and --cgroup-root)",
            self.holder(),
            self.pin.display()
        ))
    }

    /// The error of `kproxy cleanup` without `--force`.
    pub fn for_cleanup(&self) -> DataplaneError {
        DataplaneError::Other(format!(
            "{} is running on --bpf-pin-path {}; stop it first, or pass --force to remove its programs and maps anyway (its Services stop being served)",
            self.holder(),
            self.pin.display()
        ))
    }
}

/// Takes the lock on `pin` (created if missing), or says who holds it.
pub fn lock(pin: &Path) -> Result<Result<PinLock, Busy>, DataplaneError> {
    std::fs::create_dir_all(pin).map_err(|e| {
        DataplaneError::Other(format!("creating --bpf-pin-path {}: {e}", pin.display()))
    })?;
    try_lock(pin)
}

/// Takes the lock on an existing `pin`; `Ok(None)` when there is no such
/// directory (nothing pinned, nothing to own).
pub fn lock_existing(pin: &Path) -> Result<Option<Result<PinLock, Busy>>, DataplaneError> {
    if !pin.is_dir() {
        return Ok(None);
    }
    try_lock(pin).map(Some)
}

fn try_lock(pin: &Path) -> Result<Result<PinLock, Busy>, DataplaneError> {
    let dir = File::open(pin)
        .map_err(|e| DataplaneError::Other(format!("opening {}: {e}", pin.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Ok(PinLock { _dir: dir }));
    }
    let err = std::io::Error::last_os_error();
    if err.kind() != ErrorKind::WouldBlock {
        return Err(DataplaneError::Other(format!(
            "locking {}: {err}",
            pin.display()
        )));
    }
    let meta = dir.metadata()?;
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let dev = meta.dev();
    let pid = flock_holder(
        &locks,
        libc::major(dev) as u64,
        libc::minor(dev) as u64,
        meta.ino(),
    );
    Ok(Err(Busy {
        pin: pin.to_path_buf(),
        pid,
    }))
}

/// The PID holding a granted FLOCK on (major, minor, inode), from the text
/// of /proc/locks:
/// `1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF` (device numbers in hex;
/// a waiter's line has `->` after the index; PID 0 means "not visible").
pub fn flock_holder(locks: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let mut f = line.split_whitespace().skip(1);
        if f.next()? != "FLOCK" {
            return None;
        }
        let (_, _, pid, id) = (f.next()?, f.next()?, f.next()?, f.next()?);
        let mut parts = id.split(':');
        let maj = u64::from_str_radix(parts.next()?, 16).ok()?;
        let min = u64::from_str_radix(parts.next()?, 16).ok()?;
        let i: u64 = parts.next()?.parse().ok()?;
        let pid: u32 = pid.parse().ok()?;
        (maj == major && min == minor && i == ino && pid != 0).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS: &str = "\
1: POSIX  ADVISORY  WRITE 900 00:2d:77 0 EOF
2: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF
2: -> FLOCK  ADVISORY  WRITE 4321 00:2d:5678 0 EOF
3: FLOCK  ADVISORY  WRITE 0 fd:01:99 0 EOF
4: FLOCK  ADVISORY  WRITE 77 fd:01:5678 0 EOF
";

    #[test]
    fn finds_the_granted_flock_of_the_inode() {
        assert_eq!(flock_holder(LOCKS, 0, 0x2d, 5678), Some(1234));
        // Same inode number on another device.
        assert_eq!(flock_holder(LOCKS, 0xfd, 1, 5678), Some(77));
        // POSIX locks are not ours.
        assert_eq!(flock_holder(LOCKS, 0, 0x2d, 77), None);
        // Holder in another PID namespace shows as 0.
        assert_eq!(flock_holder(LOCKS, 0xfd, 1, 99), None);
        assert_eq!(flock_holder("", 0, 0x2d, 5678), None);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_with_our_pid() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        let held = lock(&pin).unwrap().expect("first lock");
        let busy = lock(&pin).unwrap().expect_err("second lock");
        assert_eq!(busy.pid, Some(std::process::id()));
        let msg = busy.for_run().to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("--bpf-pin-path"),
            "{msg}"
        );
        assert!(busy.for_cleanup().to_string().contains("--force"));
        drop(held);
        lock(&pin).unwrap().expect("free again");
        assert!(lock_existing(&dir.path().join("none")).unwrap().is_none());
    }
}
