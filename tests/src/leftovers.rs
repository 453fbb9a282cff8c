//! Removes what earlier test processes left behind when they were killed
//! before their drop guards ran (SIGKILL, a timeout): their network
//! namespaces, empty cgroups and private bpffs mounts. Only names with the
//! harness prefix whose owning process is gone are touched.

use std::path::Path;

/// `kpt<pid>-...` of a process that no longer exists.
fn stale(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("kpt") else {
        return false;
    };
    let Some((pid, _)) = rest.split_once('-') else {
        return false;
    };
    match pid.parse::<u32>() {
        Ok(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        Err(_) => false,
    }
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Best effort; runs once per test process (see [`crate::netns::unique_id`]).
pub fn reap() {
    // Mounts first: bpffs instances live under the dead test's work dir.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for dir in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        let stale_mount = Path::new(dir)
            .ancestors()
            .filter_map(|a| a.file_name()?.to_str())
            .any(stale);
        if stale_mount && !dir.starts_with("/run/netns") {
            let _ = std::process::Command::new("umount").arg(dir).status();
        }
    }
    for name in names(Path::new("/run/netns"))
        .into_iter()
        .filter(|n| stale(n))
    {
        let _ = crate::netns::run("ip", &["netns", "del", &name]);
    }
    if let Ok(root) = crate::cgroup::cgroup2_mount() {
        for name in names(&root).into_iter().filter(|n| stale(n)) {
            // Child cgroups first (the bench nests them); each removal
            // fails while processes are still inside: those are left alone.
            let dir = root.join(name);
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.filter_map(|e| e.ok()) {
                    if child.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
    for name in names(&std::env::temp_dir())
        .into_iter()
        .filter(|n| stale(n))
    {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(name));
    }
}

#[cfg(test)]
mod tests {
    use super::stale;

    #[test]
    fn only_prefixed_names_of_dead_processes_are_stale() {
        assert!(!stale(&format!("kpt{}-0-lan", std::process::id())));
        assert!(!stale("kpt1-0-lan"), "pid 1 is alive");
        // Beyond pid_max: no such process.
        assert!(stale("kpt99999999-3-node1"));
        assert!(!stale("other-0-lan"));
        assert!(!stale("kptx-0-lan"));
        assert!(!stale("kpt123"));
    }
}
