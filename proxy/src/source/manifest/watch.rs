//! Watching the manifest directory with inotify and telling what changed.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{DirState, SourceError};
use crate::model::Event;
use crate::source::EventSender;

/// Quiet time that ends a burst of events. An editor's save or an atomic
/// rename is several events within a millisecond; a file caught half
/// written fails to parse, keeps its last good objects, and its next write
/// event brings a rescan.
const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(5);
/// A continuous stream of events still yields a scan this often, so changes
/// show up within a second even while something keeps writing.
const MAX_DELAY: Duration = Duration::from_millis(400);

/// Tells the objects of a manifest directory, and what changed after every change.
#[derive(Debug, Clone)]
pub struct ManifestSource {
    dir: PathBuf,
    debounce: Duration,
    keep_objects: bool,
}

impl ManifestSource {
    pub fn new(dir: PathBuf) -> Self {
        ManifestSource {
            dir,
            debounce: DEFAULT_DEBOUNCE,
            keep_objects: true,
        }
    }

    /// Tells and keeps only the checked parts of objects, not the objects
    /// (`kproxy run`: the model needs no more; see
    /// [`crate::model::Checked::without_object`]).
    pub fn without_objects(mut self) -> Self {
        self.keep_objects = false;
        self
    }

    /// Overrides the quiet time that coalesces bursts of file events.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Reads the directory and sends its objects (then `Synced`) as one
    /// batch; after every change, one batch with the objects of the changed
    /// files. Runs until the receiver of `tx` is dropped.
    ///
    /// Errors only if the directory cannot be read or watched at start (or
    /// the watcher dies); a directory deleted later keeps the last state
    /// (traffic keeps flowing) until it is recreated.
    pub async fn run(self, tx: EventSender) -> Result<(), SourceError> {
        // Absolute, so event paths compare with it and its parent is known.
        let dir = std::path::absolute(&self.dir).unwrap_or_else(|_| self.dir.clone());
        let mut state = DirState::new(dir.clone());
        if !self.keep_objects {
            state = state.without_objects();
        }
        // Fail early with a clear error if the directory is missing.
        super::list_files(&dir)?;

        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |ev| {
            // The receiver is gone only when run() returned.
            let _ = ev_tx.send(ev);
        })
        .map_err(|source| watch_error(&dir, source))?;
        // Watch before the first scan, so no change in between is missed.
        watcher
            .watch(&dir, RecursiveMode::Recursive)
            .map_err(|source| watch_error(&dir, source))?;
        // The parent tells us when the directory itself is removed or recreated.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Err(e) = watcher.watch(parent, RecursiveMode::NonRecursive) {
                warn!(dir = %parent.display(), error = %e, "cannot watch parent of manifest directory; its recreation will not be noticed");
            }
        }
        let mut watching = true;

        let mut first = state.scan()?;
        let count = |kind: crate::model::Kind| {
            first
                .iter()
                .filter(|e| matches!(e, Event::Upsert(c) if c.key().kind == kind))
                .count()
        };
        info!(
            dir = %dir.display(),
            services = count(crate::model::Kind::Service),
            endpoint_slices = count(crate::model::Kind::EndpointSlice),
            nodes = count(crate::model::Kind::Node),
            "manifests loaded"
        );
        first.push(Event::Synced);
        if tx.send(first).is_err() {
            return Ok(());
        }

        loop {
            // Wait for a relevant event (or for the consumer to go away).
            let mut rewatch = false;
            let mut writing = Writing::default();
            let mut touched = Touched::default();
            loop {
                tokio::select! {
                    _ = tx.closed() => return Ok(()),
                    ev = ev_rx.recv() => {
                        let ev = ev.ok_or_else(|| SourceError::WatcherStopped { path: dir.clone() })?;
                        writing.note(&dir, &ev);
                        touched.note(&dir, &ev);
                        let (relevant, dir_itself) = classify(&dir, ev);
                        rewatch |= dir_itself;
                        if relevant { break; }
                    }
                }
            }
            // Coalesce the rest of the burst: only relevant events extend
            // the quiet time (reads, ours included, and the parent's other
            // entries must not hold a change back).
            let start = Instant::now();
            let mut quiet_until = start + self.debounce;
            loop {
                let until = quiet_until.min(start + MAX_DELAY);
                match tokio::time::timeout_at(until, ev_rx.recv()).await {
                    Ok(Some(ev)) => {
                        let closed = writing.note(&dir, &ev);
                        touched.note(&dir, &ev);
                        let (relevant, dir_itself) = classify(&dir, ev);
                        rewatch |= dir_itself;
                        if relevant || closed {
                            quiet_until = Instant::now() + self.debounce;
                        }
                    }
                    Ok(None) => return Err(SourceError::WatcherStopped { path: dir.clone() }),
                    // A file written in place and not closed yet is read
                    // when its writer closes it (or at the cap).
                    Err(_) if !writing.is_empty() && Instant::now() < start + MAX_DELAY => {
                        quiet_until = start + MAX_DELAY;
                    }
                    Err(_) => break, // quiet, or at the cap
                }
            }

            if !dir.is_dir() {
                if watching {
                    warn!(dir = %dir.display(), "manifest directory disappeared; keeping the last state until it is back");
                    let _ = watcher.unwatch(&dir);
                    watching = false;
                }
                continue;
            }
            // Events about single files read those files alone.
            let files = touched.files().filter(|_| watching && !rewatch);
            if !watching || rewatch {
                // A recreated or renamed-over directory is a new inode: watch it afresh.
                let _ = watcher.unwatch(&dir);
                match watcher.watch(&dir, RecursiveMode::Recursive) {
                    Ok(()) => {
                        if !watching {
                            info!(dir = %dir.display(), "manifest directory is back");
                        }
                        watching = true;
                    }
                    Err(e) => {
                        warn!(dir = %dir.display(), error = %e, "cannot watch manifest directory again");
                        watching = false;
                    }
                }
            }
            let events = match files {
                Some(files) => state.rescan(files),
                None => match state.scan() {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(error = %e, "cannot rescan manifest directory; keeping the last state");
                        continue;
                    }
                },
            };
            if events.is_empty() {
                debug!("manifest event without effect on objects");
                continue;
            }
            debug!(events = events.len(), "manifests changed");
            if tx.send(events).is_err() {
                return Ok(());
            }
        }
    }
}

/// The manifest files a burst of events is about, when it is only about
/// such files: those are read again alone, so a change to one file of a
/// large directory costs that file. Anything else (a directory, a symlink
/// that may stand for many files, a queue overflow, an error) asks for a
/// full scan.
#[derive(Default)]
struct Touched {
    all: bool,
    paths: BTreeSet<PathBuf>,
}

impl Touched {
    fn note(&mut self, dir: &Path, ev: &notify::Result<notify::Event>) {
        let Ok(ev) = ev else {
            self.all = true;
            return;
        };
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        if ev.paths.is_empty() {
            self.all = true;
        }
        for p in &ev.paths {
            // The parent watch's other entries.
            let Ok(rel) = p.strip_prefix(dir) else {
                continue;
            };
            let names: Option<Vec<&str>> =
                rel.components().map(|c| c.as_os_str().to_str()).collect();
            let Some((file, parents)) = names.as_ref().and_then(|n| n.split_last()) else {
                // The directory itself, or a name that is not UTF-8.
                self.all = true;
                continue;
            };
            let plain =
                parents.len() < super::MAX_DEPTH && !parents.iter().any(|n| super::is_ignored(n));
            let meta = std::fs::symlink_metadata(p);
            if plain && super::is_read(file) && !meta.as_ref().is_ok_and(|m| m.is_dir()) {
                // A manifest file (or one gone): read again alone.
                self.paths.insert(rel.to_path_buf());
            } else if meta.is_err() && super::is_ignored(file) {
                // A temporary file gone (an editor's, an atomic rename's).
            } else if plain && meta.is_ok_and(|m| m.is_file()) {
                // A file the scan does not read (an editor's swap file, a README).
            } else {
                self.all = true;
            }
        }
    }

    /// The files to read again, `None` for a full scan.
    fn files(&self) -> Option<&BTreeSet<PathBuf>> {
        (!self.all).then_some(&self.paths)
    }
}

/// Files written in place whose writer has not closed them yet (a write
/// seen, its close-after-write not), so a slow writer's half-written file
/// (which may parse, with objects missing) is not read.
#[derive(Default)]
struct Writing(HashSet<PathBuf>);

impl Writing {
    /// Records `ev`; true when it closed the last file being written.
    fn note(&mut self, dir: &Path, ev: &notify::Result<notify::Event>) -> bool {
        let Ok(ev) = ev else { return false };
        match ev.kind {
            EventKind::Modify(ModifyKind::Data(_)) => {
                // Only files the scan reads: an editor's swap file stays open.
                let read = |p: &&PathBuf| {
                    p.starts_with(dir)
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(super::is_read)
                };
                self.0.extend(ev.paths.iter().filter(read).cloned());
                false
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_)) => {
                let before = self.0.len();
                for p in &ev.paths {
                    self.0.remove(p);
                }
                before > 0 && self.0.is_empty()
            }
            _ => false,
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn watch_error(dir: &Path, error: notify::Error) -> SourceError {
    SourceError::Watch {
        path: dir.to_path_buf(),
        error,
    }
}

/// (worth a rescan, concerns the directory itself). Events from the parent
/// watch about siblings are not relevant.
fn classify(dir: &Path, ev: notify::Result<notify::Event>) -> (bool, bool) {
    match ev {
        Ok(ev) => {
            // Opening and reading files (our own scans, other readers) is
            // no change; counting it would make every scan trigger the next.
            if matches!(ev.kind, notify::EventKind::Access(_)) {
                return (false, false);
            }
            if ev.paths.is_empty() {
                // Queue overflow or rescan request: look at everything.
                return (true, true);
            }
            let dir_itself = ev.paths.iter().any(|p| p == dir);
            let inside = ev.paths.iter().any(|p| p.starts_with(dir));
            (inside, dir_itself)
        }
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "file watcher error; rescanning");
            (true, true)
        }
    }
}
