//! Whether `--cgroup-root` is the host's cgroup2 hierarchy or only a
//! container's own cgroup namespace.
//!
//! In a pod with a private cgroup namespace (the default of container
//! runtimes on cgroup v2), the container's /sys/fs/cgroup is mounted from
//! the namespace's root, which is the container's own cgroup: socket hooks
//! attached there balance the sockets of kproxy's container and of nobody
//! else, and every other pod's traffic silently takes the TC path or none.
//! The host's hierarchy mounted into the pod (a hostPath of /sys/fs/cgroup)
//! shows in /proc/self/mountinfo with a root outside the namespace
//! (`/../../..`), the namespace's own mount with root `/`.

use std::path::{Path, PathBuf};

use crate::dataplane::DataplaneError;

/// Inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`).
const INITIAL_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// Refuses a cgroup root that is only this container's cgroup namespace.
pub fn check_host_cgroup(root: &Path) -> Result<(), DataplaneError> {
    use std::os::unix::fs::MetadataExt;
    // No cgroup namespaces (or no /proc): nothing to tell apart.
    let Ok(ns) = std::fs::metadata("/proc/self/ns/cgroup") else {
        return Ok(());
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    match own_namespace_mount(&mountinfo, &root, ns.ino() == INITIAL_CGROUP_NS_INO) {
        Some(mount) => Err(refusal(&root, &mount)),
        None => Ok(()),
    }
}

fn refusal(root: &Path, mount: &Path) -> DataplaneError {
    DataplaneError::MissingFeature(format!(
        "cgroup2: --cgroup-root {} (on the cgroup2 mount {}) is this container's own cgroup namespace, not the host's, so only kproxy's own sockets would be balanced; mount the host's /sys/fs/cgroup into the pod (a hostPath volume, e.g. at /run/kproxy/cgroupv2) and pass --cgroup-root=/run/kproxy/cgroupv2",
        root.display(),
        mount.display()
    ))
}

/// The cgroup2 mount holding `root` when it is mounted from this process's
/// own (non-initial) cgroup namespace root; `None` when `root` is fine (the
/// initial namespace, a mount of the host's hierarchy, or not found).
pub fn own_namespace_mount(mountinfo: &str, root: &Path, initial_ns: bool) -> Option<PathBuf> {
    if initial_ns {
        return None;
    }
    // mountinfo: id parent major:minor root mount-point options... - fstype source super-options
    let (mount_root, point) = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = left.split_whitespace();
            let (_, _, _) = (f.next()?, f.next()?, f.next()?);
            Some((unescape(f.next()?), PathBuf::from(unescape(f.next()?))))
        })
        .filter(|(_, point)| root.starts_with(point))
        // The innermost mount holding `root` is the one it is on.
        .max_by_key(|(_, point)| point.components().count())?;
    (mount_root == "/").then_some(point)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod with a private cgroup namespace: its own /sys/fs/cgroup, and
    /// the host's hierarchy through a hostPath volume.
    const POD: &str = "\
1301 1290 0:380 / / rw,relatime master:600 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
1310 1301 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw,nsdelegate
1311 1301 0:30 /../../../.. /run/kproxy/cgroupv2 rw,nosuid,nodev,noexec,relatime master:9 - cgroup2 cgroup2 rw,nsdelegate
1312 1301 0:31 / /sys/fs/bpf rw,relatime master:10 - bpf bpf rw
1313 1301 0:30 / /mnt/with\\040space rw - cgroup2 cgroup2 rw
";

    /// A node (initial cgroup namespace), hybrid layout.
    const HOST: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn the_containers_own_namespace_is_refused() {
        let p = Path::new;
        assert_eq!(
            own_namespace_mount(POD, p("/sys/fs/cgroup"), false),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // A directory below it is just as much the container's own.
        assert_eq!(
            own_namespace_mount(POD, p("/sys/fs/cgroup/kubepods"), false),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            own_namespace_mount(POD, p("/mnt/with space/x"), false),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn the_hosts_hierarchy_and_the_initial_namespace_are_accepted() {
        let p = Path::new;
        assert_eq!(
            own_namespace_mount(POD, p("/run/kproxy/cgroupv2"), false),
            None
        );
        assert_eq!(
            own_namespace_mount(POD, p("/run/kproxy/cgroupv2/kubepods.slice"), false),
            None
        );
        // Same text in the initial namespace: root `/` is the host's root.
        assert_eq!(own_namespace_mount(POD, p("/sys/fs/cgroup"), true), None);
        assert_eq!(
            own_namespace_mount(HOST, p("/sys/fs/cgroup/unified/kpt1-node1"), true),
            None
        );
        // Not on any cgroup2 mount: check_cgroup reports that.
        assert_eq!(own_namespace_mount(POD, p("/sys/fs/bpf"), false), None);
        // A prefix of a mount point's name is not inside it.
        assert_eq!(own_namespace_mount(POD, p("/sys/fs/cgroupx"), false), None);
    }

    #[test]
    fn the_message_says_what_to_mount() {
        let msg = refusal(Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/cgroup")).to_string();
        for want in [
            "hostPath",
            "host's /sys/fs/cgroup",
            "--cgroup-root=",
            "own cgroup namespace",
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
        assert!(!msg.contains('\n'));
    }
}
