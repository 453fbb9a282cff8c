//! The `--config` file, watched while kproxy runs. kube-proxy exits when
//! its configuration file changes, so that the kubelet restarts it with the
//! new settings; kproxy does the same (its rules stay in place, and the
//! restarted kproxy adopts them). Only a change of content counts: the
//! kubelet rewrites ConfigMap volumes (a `..data` symlink swap in the
//! file's directory) on every sync, mostly with the same bytes.

use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Resolves with the file's new content once it differs from `initial`.
/// The directory is watched, not the file: a ConfigMap update replaces
/// the file by renaming a symlink next to it, which a watch on the old
/// file never sees. A file that is missing for a moment (mid-swap) is
/// waited for.
pub async fn changed(path: PathBuf, initial: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    // A change between the read that was applied and the watch start.
    if let Some(now) = content_if_changed(&path, &initial) {
        return Ok(now);
    }
    while let Some(event) = rx.recv().await {
        if let Err(err) = event {
            tracing::debug!(%err, "watching --config");
            continue;
        }
        if let Some(now) = content_if_changed(&path, &initial) {
            return Ok(now);
        }
    }
    anyhow::bail!("watching --config {} stopped", path.display())
}

fn content_if_changed(path: &Path, initial: &[u8]) -> Option<Vec<u8>> {
    std::fs::read(path).ok().filter(|now| now != initial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_same_bytes_rewritten_are_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.conf");
        std::fs::write(&path, "mode: iptables\n").unwrap();
        let watch = tokio::spawn(changed(path.clone(), b"mode: iptables\n".to_vec()));
        // Rewritten as it was, then changed: the content returned is the
        // changed one, so the rewrite did not end the wait.
        std::fs::write(&path, "mode: iptables\n").unwrap();
        std::fs::write(&path, "mode: ebpf\n").unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), watch)
            .await
            .expect("a change is seen")
            .unwrap()
            .unwrap();
        assert_eq!(got, b"mode: ebpf\n");
    }

    /// A ConfigMap volume: `config.conf -> ..data/config.conf`, `..data ->
    /// ..2026_v1`; an update makes `..2026_v2` and renames a new `..data`
    /// symlink over the old one.
    #[tokio::test]
    async fn a_configmap_swap_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..v1")).unwrap();
        std::fs::write(d.join("..v1/config.conf"), "a: 1\n").unwrap();
        std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/config.conf", d.join("config.conf")).unwrap();
        let watch = tokio::spawn(changed(d.join("config.conf"), b"a: 1\n".to_vec()));
        std::fs::create_dir(d.join("..v2")).unwrap();
        std::fs::write(d.join("..v2/config.conf"), "a: 2\n").unwrap();
        std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), watch)
            .await
            .expect("the swap is seen")
            .unwrap()
            .unwrap();
        assert_eq!(got, b"a: 2\n");
    }
}
