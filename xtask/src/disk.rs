//! Free space where cargo writes. A clean clone's builds take about 5 GB
//! (debug, release and the eBPF object); when the disk fills, the linker
//! fails with a long command line and the cause cut off below it.

use std::path::Path;
use std::process::Command;

/// Below this, `cargo xtask` warns before building.
const WARN_BELOW: u64 = 5 << 30;
/// Below this, a failed cargo run is blamed on the disk.
const BLAME_BELOW: u64 = 2 << 30;

/// Bytes available to us on the filesystem holding `path` (or its nearest
/// existing ancestor: a fresh clone has no target/ yet). `None` when `df`
/// cannot tell.
pub fn available(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let out = Command::new("df")
        .args(["-P", "-k"])
        .arg(existing)
        .output()
        .ok()?;
    parse_df_available(&String::from_utf8_lossy(&out.stdout))
}

/// The "Available" column (KiB) of `df -P -k`'s one data line, in bytes.
fn parse_df_available(out: &str) -> Option<u64> {
    let line = out.lines().nth(1)?;
    let kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib * 1024)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A warning before the first build of this run, when space is short.
pub fn warn_if_short(target: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| warn_now(target));
}

fn warn_now(target: &Path) {
    if let Some(free) = available(target) {
        if free < WARN_BELOW {
            eprintln!(
                "xtask: warning: only {} free for {}; a clean build needs about 5 GiB",
                gib(free),
                target.display()
            );
        }
    }
}

/// Why a cargo run may have failed, when the disk is (nearly) full.
pub fn blame(target: &Path) -> Option<String> {
    let free = available(target)?;
    (free < BLAME_BELOW).then(|| short_message(free, target))
}

fn short_message(free: u64, target: &Path) -> String {
    format!(
        "only {} left free for {}: a full disk makes the build fail (often at link time); free some space (`cargo clean` in other checkouts) and run again",
        gib(free),
        target.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_available_column() {
        let out = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n\
                   /dev/vda         264212084 37771784  57514104      40% /\n";
        assert_eq!(parse_df_available(out), Some(57514104 * 1024));
        assert_eq!(parse_df_available(""), None);
        assert_eq!(parse_df_available("header only\n"), None);
    }

    #[test]
    fn the_message_names_the_space_and_the_fix() {
        let m = short_message(300 << 20, Path::new("/x/target"));
        assert!(
            m.contains("0.3 GiB") && m.contains("/x/target") && m.contains("cargo clean"),
            "{m}"
        );
    }

    #[test]
    fn a_missing_target_is_measured_on_its_parent() {
        let dir = std::env::temp_dir().join("xtask-disk-none/target");
        assert!(available(&dir).is_some());
    }
}
