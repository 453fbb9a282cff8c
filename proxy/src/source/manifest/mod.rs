//! The embedded source: a directory of YAML manifests, watched for changes.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file under the directory (recursively,
//! sorted, hidden and editor temp files ignored) holds Kubernetes Services,
//! EndpointSlices and Nodes. A file that stops parsing keeps its last good
//! objects; an object that stops validating keeps its last good version; the
//! problems are reported as [`Rejection`]s naming file, document and field.

mod parse;
mod watch;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tracing::warn;

use crate::hashing::HashMap;
use crate::model::{Checked, Event, Kind, ObjectKey, Rejection};

use super::Snapshot;
use parse::{REASON_DUPLICATE_OBJECT, REASON_PARSE_ERROR};

pub use watch::ManifestSource;

/// How deep subdirectories are followed (guards against symlink loops).
const MAX_DEPTH: usize = 16;

fn digest(content: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(content).into()
}

/// Why the manifest source cannot work at all (problems inside files are
/// [`Rejection`]s, not errors).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("manifest directory {path} does not exist (check --manifests)")]
    DirNotFound { path: PathBuf },
    #[error("manifest path {path} is not a directory (--manifests takes a directory)")]
    NotADirectory { path: PathBuf },
    // The causes are fields, not `source`s: the text says them once (an
    // error chain would repeat them).
    #[error("cannot read manifest directory {path}: {error}")]
    ReadDir { path: PathBuf, error: io::Error },
    #[error("cannot watch manifest directory {path} for changes: {error}")]
    Watch { path: PathBuf, error: notify::Error },
    #[error("the file watcher for manifest directory {path} stopped unexpectedly")]
    WatcherStopped { path: PathBuf },
}

/// Reads the directory once (for `kproxy render` and start-up look-ups).
pub fn load_dir(dir: &Path) -> Result<Snapshot, SourceError> {
    let mut snap = Snapshot::default();
    snap.apply(load_events(dir)?);
    Ok(snap)
}

/// The events that tell a directory's objects from scratch, `Synced` last.
pub fn load_events(dir: &Path) -> Result<Vec<Event>, SourceError> {
    let mut events = DirState::new(dir.to_path_buf()).scan()?;
    events.push(Event::Synced);
    Ok(events)
}

/// One object in effect from a file.
#[derive(Debug, Clone)]
struct Effective {
    /// Checked once, when the file was read; its rejections name the document.
    checked: Checked,
    /// `path, document N`.
    origin: String,
}

impl Effective {
    fn key(&self) -> &ObjectKey {
        self.checked.key()
    }
}

/// What one file currently contributes.
#[derive(Debug, Clone, Default)]
struct FileState {
    /// SHA-256 of the content last read (`None`: read again next time); an
    /// unchanged file is not parsed again. A digest, not the bytes: a
    /// directory of 10,000 Services is 16 MB of YAML.
    digest: Option<[u8; 32]>,
    /// Objects in effect from this file (last good versions included), unique keys.
    effective: Vec<Effective>,
    /// Problems found in the current content, but those of the objects in
    /// effect (they travel with their object).
    rejections: Vec<Rejection>,
    /// Where each key is in `effective`.
    index: HashMap<ObjectKey, usize>,
}

impl FileState {
    fn new(digest: [u8; 32], effective: Vec<Effective>, rejections: Vec<Rejection>) -> Self {
        let index = effective
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key().clone(), i))
            .collect();
        FileState {
            digest: Some(digest),
            effective,
            rejections,
            index,
        }
    }

    fn get(&self, key: &ObjectKey) -> Option<&Effective> {
        self.effective.get(*self.index.get(key)?)
    }

    fn keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.effective.iter().map(Effective::key)
    }
}

/// The files defining one object, in path order (nearly always one: a
/// sorted `Vec` costs a fraction of a `BTreeSet` node per object).
#[derive(Debug, Default)]
struct Owners(Vec<PathBuf>);

impl Owners {
    fn insert(&mut self, path: PathBuf) {
        if let Err(i) = self.0.binary_search(&path) {
            self.0.insert(i, path);
        }
    }

    fn remove(&mut self, path: &Path) {
        if let Ok(i) = self.0.binary_search_by(|p| p.as_path().cmp(path)) {
            self.0.remove(i);
        }
    }

    /// The definition in effect: the last file in path order.
    fn last(&self) -> Option<&PathBuf> {
        self.0.last()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = &PathBuf> {
        self.0.iter()
    }
}

/// The source's memory across scans: what every file contributes, who
/// defines each object, and what was told about it.
#[derive(Debug)]
struct DirState {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The files defining each object; the last one (in path order) wins.
    owners: HashMap<ObjectKey, Owners>,
    /// Objects defined by more than one file.
    duplicated: BTreeSet<ObjectKey>,
    /// The version of each object last told.
    told: HashMap<ObjectKey, Checked>,
    told_problems: Vec<Rejection>,
    /// Keep each object beside its checked parts (see [`Checked::without_object`]).
    keep_objects: bool,
}

impl DirState {
    fn new(dir: PathBuf) -> Self {
        DirState {
            dir,
            files: BTreeMap::new(),
            owners: HashMap::default(),
            duplicated: BTreeSet::new(),
            told: HashMap::default(),
            told_problems: Vec::new(),
            keep_objects: true,
        }
    }

    /// Keeps only the checked parts of objects (`kproxy run`).
    fn without_objects(mut self) -> Self {
        self.keep_objects = false;
        self
    }

    /// Re-reads the directory and returns what changed since the last
    /// scan: upserts and deletes of the objects that the changed, new and
    /// removed files held, and the source's problems when they changed.
    /// An unchanged file costs one read and a comparison.
    fn scan(&mut self) -> Result<Vec<Event>, SourceError> {
        let paths = list_files(&self.dir)?;
        let mut changed: Vec<(PathBuf, Vec<ObjectKey>)> = Vec::new();
        let mut gone = std::mem::take(&mut self.files);
        let to_read: Vec<(PathBuf, Option<FileState>)> = paths
            .into_iter()
            .map(|rel| {
                let prev = gone.remove(&rel);
                (rel, prev)
            })
            .collect();
        self.read(to_read, &mut changed);
        // Files gone since the last scan.
        for (rel, state) in gone {
            changed.push((rel, state.keys().cloned().collect()));
        }
        Ok(self.tell(changed))
    }

    /// Reads again only the files at `paths` (relative to the directory),
    /// as a scan would: the watcher's answer to events about single files.
    fn rescan(&mut self, paths: &BTreeSet<PathBuf>) -> Vec<Event> {
        let mut changed: Vec<(PathBuf, Vec<ObjectKey>)> = Vec::new();
        let mut to_read = Vec::new();
        for rel in paths {
            let prev = self.files.remove(rel);
            let is_file = std::fs::metadata(self.dir.join(rel)).is_ok_and(|m| m.is_file());
            if is_file {
                to_read.push((rel.clone(), prev));
            } else if let Some(prev) = prev {
                changed.push((rel.clone(), prev.keys().cloned().collect()));
            }
        }
        self.read(to_read, &mut changed);
        self.tell(changed)
    }

    /// Reads files into `self.files`, parsing those whose content changed
    /// (on several threads when there is enough of it); a changed file goes
    /// into `changed` with the keys it held before.
    fn read(
        &mut self,
        files: Vec<(PathBuf, Option<FileState>)>,
        changed: &mut Vec<(PathBuf, Vec<ObjectKey>)>,
    ) {
        let mut to_parse = Vec::new();
        for (rel, prev) in files {
            let content = match std::fs::read(self.dir.join(&rel)) {
                Ok(c) => c,
                // Deleted between listing and reading: gone, like its objects.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if let Some(prev) = prev {
                        changed.push((rel, prev.keys().cloned().collect()));
                    }
                    continue;
                }
                Err(e) => {
                    let mut state = prev.unwrap_or_default();
                    state.digest = None; // re-read next time
                    state.rejections = vec![parse::rejection(
                        "",
                        "",
                        "",
                        "",
                        REASON_PARSE_ERROR,
                        format!("cannot read file: {e}"),
                        &rel.display().to_string(),
                    )];
                    changed.push((rel.clone(), state.keys().cloned().collect()));
                    self.files.insert(rel, state);
                    continue;
                }
            };
            let digest = digest(&content);
            match prev {
                Some(prev) if prev.digest == Some(digest) => {
                    self.files.insert(rel, prev);
                }
                prev => {
                    let old = prev.iter().flat_map(|p| p.keys().cloned()).collect();
                    changed.push((rel.clone(), old));
                    to_parse.push(ChangedFile {
                        rel,
                        content,
                        digest,
                        prev,
                        keep_objects: self.keep_objects,
                    });
                }
            }
        }
        for (rel, state) in parse_files(to_parse) {
            self.files.insert(rel, state);
        }
    }

    /// The events for the objects of the changed files (and the problems).
    fn tell(&mut self, changed: Vec<(PathBuf, Vec<ObjectKey>)>) -> Vec<Event> {
        let mut touched: BTreeSet<ObjectKey> = BTreeSet::new();
        for (rel, old) in changed {
            for key in old {
                if let Some(owners) = self.owners.get_mut(&key) {
                    owners.remove(&rel);
                }
                touched.insert(key);
            }
            if let Some(state) = self.files.get(&rel) {
                for key in state.keys() {
                    self.owners
                        .entry(key.clone())
                        .or_default()
                        .insert(rel.clone());
                    touched.insert(key.clone());
                }
            }
        }
        let mut events = Vec::new();
        for key in touched {
            let winner = self
                .owners
                .get(&key)
                .and_then(|o| o.last())
                .and_then(|path| self.files.get(path)?.get(&key));
            match winner {
                None => {
                    self.owners.remove(&key);
                    self.duplicated.remove(&key);
                    if self.told.remove(&key).is_some() {
                        events.push(Event::Delete(key));
                    }
                }
                Some(e) => {
                    if self.owners.get(&key).is_some_and(|o| o.len() > 1) {
                        self.duplicated.insert(key.clone());
                    } else {
                        self.duplicated.remove(&key);
                    }
                    if self.told.get(&key) != Some(&e.checked) {
                        self.told.insert(key, e.checked.clone());
                        events.push(Event::Upsert(e.checked.clone()));
                    }
                }
            }
        }
        let problems = self.problems();
        if problems != self.told_problems {
            self.told_problems = problems.clone();
            events.push(Event::Problems(problems));
        }
        events
    }

    /// The files' own problems, and for each object defined in several
    /// files a warning per overridden definition (with that definition's
    /// own problems: it is not in effect, so nothing else reports them).
    fn problems(&self) -> Vec<Rejection> {
        let mut out: Vec<Rejection> = self
            .files
            .values()
            .flat_map(|f| f.rejections.iter().cloned())
            .collect();
        for key in &self.duplicated {
            let defs: Vec<&Effective> = self.owners[key]
                .iter()
                .filter_map(|path| self.files.get(path)?.get(key))
                .collect();
            for pair in defs.windows(2) {
                out.push(duplicate(&pair[0].origin, key, &pair[1].origin));
                out.extend(pair[0].checked.rejections().iter().cloned());
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// A file whose content changed since it was last parsed.
struct ChangedFile {
    rel: PathBuf,
    content: Vec<u8>,
    digest: [u8; 32],
    prev: Option<FileState>,
    keep_objects: bool,
}

impl ChangedFile {
    fn process(self) -> (PathBuf, FileState) {
        let state = process_file(
            &self.rel.display().to_string(),
            &self.content,
            self.digest,
            self.prev,
            self.keep_objects,
        );
        (self.rel, state)
    }
}

/// Below this much changed YAML, one thread parses: a thread costs more
/// than it saves on an edit of a few files.
const PARALLEL_PARSE_MIN_BYTES: usize = 1 << 20;

/// Parses and checks changed files, in their order. Parsing is most of a
/// start at scale (about 0.1 ms of CPU per object, mostly the YAML
/// scanner), and files are independent: with enough to share, the cores
/// take the next file until none is left. Every core: what runs beside the
/// first parse (the eBPF programs' load, 0.2 s) is shorter than it.
fn parse_files(files: Vec<ChangedFile>) -> Vec<(PathBuf, FileState)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    parse_files_on(files, threads, PARALLEL_PARSE_MIN_BYTES)
}

fn parse_files_on(
    files: Vec<ChangedFile>,
    threads: usize,
    min_bytes: usize,
) -> Vec<(PathBuf, FileState)> {
    let bytes: usize = files.iter().map(|f| f.content.len()).sum();
    let threads = threads.min(files.len());
    if threads <= 1 || bytes < min_bytes {
        return files.into_iter().map(ChangedFile::process).collect();
    }
    let count = files.len();
    let todo: Vec<Mutex<Option<ChangedFile>>> =
        files.into_iter().map(|f| Mutex::new(Some(f))).collect();
    let done: Vec<Mutex<Option<(PathBuf, FileState)>>> =
        (0..count).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = todo.get(i) else { return };
        let file = lock(slot).take();
        if let Some(file) = file {
            *lock(&done[i]) = Some(file.process());
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            // A thread that cannot start leaves its share to the others.
            let _ = std::thread::Builder::new()
                .name("manifest-parse".into())
                .spawn_scoped(scope, work);
        }
        work();
    });
    done.into_iter()
        .filter_map(|d| d.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// A slot's lock (a parser that panics ends the scope with its panic, as
/// it would on one thread; the slots need no poisoning of their own).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Parses and checks a changed file, falling back to `prev` where the new
/// content is broken.
fn process_file(
    rel: &str,
    content: &[u8],
    digest: [u8; 32],
    prev: Option<FileState>,
    keep_objects: bool,
) -> FileState {
    let prev_effective = prev.map(|p| p.effective);
    let parsed = match std::str::from_utf8(content) {
        Ok(text) => parse::parse_file(rel, text),
        Err(e) => parse::ParsedFile {
            documents: Vec::new(),
            rejections: vec![parse::rejection(
                "",
                "",
                "",
                "",
                REASON_PARSE_ERROR,
                format!("file is not valid UTF-8 text: {e}"),
                rel,
            )],
        },
    };
    let broken = !parsed.rejections.is_empty();
    let mut rejections = parsed.rejections;
    if broken && prev_effective.is_some() {
        for r in &mut rejections {
            r.message
                .push_str("; keeping the objects from the last good version of this file");
        }
    }

    let prev_by_key: HashMap<&ObjectKey, &Effective> = prev_effective
        .iter()
        .flatten()
        .map(|e| (e.key(), e))
        .collect();
    // Within one file, a later document redefining an object wins (keyed so
    // files with thousands of objects stay linear).
    let mut slots: Vec<Option<Effective>> = Vec::new();
    let mut index: HashMap<ObjectKey, usize> = HashMap::default();
    for doc in parsed.documents {
        let checked = doc
            .object
            .check_keeping(keep_objects)
            .with_origin(&doc.origin);
        let chosen = if checked.rejections().is_empty() {
            Some(Effective {
                checked,
                origin: doc.origin.clone(),
            })
        } else {
            let last_good = prev_by_key.get(&doc.key).copied();
            match last_good {
                Some(good) => {
                    for r in checked.rejections() {
                        let mut r = r.clone();
                        r.message
                            .push_str("; keeping the previous version of this object");
                        rejections.push(r);
                    }
                    Some(good.clone())
                }
                // A new slice with a bad endpoint or port still carries good
                // ones: the model leaves out only the bad parts (as
                // kube-proxy does) instead of the whole slice. Its
                // rejections go with it.
                None if doc.key.kind == Kind::EndpointSlice => Some(Effective {
                    checked,
                    origin: doc.origin.clone(),
                }),
                None => {
                    rejections.extend(checked.rejections().iter().cloned());
                    None
                }
            }
        };
        let Some(chosen) = chosen else { continue };
        if let Some(&i) = index.get(&doc.key) {
            if let Some(old) = slots[i].take() {
                rejections.push(duplicate(&old.origin, &doc.key, &doc.origin));
            }
        }
        index.insert(doc.key.clone(), slots.len());
        slots.push(Some(chosen));
    }
    let effective: Vec<Effective> = slots.into_iter().flatten().collect();
    drop(prev_by_key);

    let effective = match (broken, prev_effective) {
        // Last good state: a broken file changes nothing that was programmed.
        (true, Some(prev)) => prev,
        // Never parsed cleanly before: use what did parse, nothing better exists.
        _ => effective,
    };
    FileState::new(digest, effective, rejections)
}

/// A warning: the definition of `key` at `winner_origin` replaces the one
/// at `loser_origin`.
fn duplicate(loser_origin: &str, key: &ObjectKey, winner_origin: &str) -> Rejection {
    parse::rejection(
        key.kind.as_str(),
        &key.namespace,
        &key.name,
        "metadata.name",
        REASON_DUPLICATE_OBJECT,
        format!(
            "{} is also defined in {}; this later definition wins",
            key.kind.as_str(),
            loser_origin
        ),
        winner_origin,
    )
}

/// Manifest files under `dir`, relative to it, sorted.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SourceError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SourceError::DirNotFound {
                path: dir.to_path_buf(),
            })
        }
        Err(error) => {
            return Err(SourceError::ReadDir {
                path: dir.to_path_buf(),
                error,
            })
        }
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), 0, &mut out).map_err(|error| SourceError::ReadDir {
        path: dir.to_path_buf(),
        error,
    })?;
    out.sort();
    Ok(out)
}

fn walk(root: &Path, rel: &Path, depth: usize, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            continue;
        };
        if is_ignored(name_str) {
            continue;
        }
        let rel_path = rel.join(&name);
        // Follow symlinks (ConfigMap volumes are symlink farms); dangling ones are skipped.
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if meta.is_dir() {
            if depth >= MAX_DEPTH {
                warn!(dir = %root.join(&rel_path).display(), "manifest directory nesting too deep, not read");
                continue;
            }
            if let Err(e) = walk(root, &rel_path, depth + 1, out) {
                // A vanished or unreadable subdirectory must not hide the others.
                warn!(dir = %root.join(&rel_path).display(), error = %e, "cannot read manifest subdirectory");
            }
        } else if meta.is_file() && is_manifest(name_str) {
            out.push(rel_path);
        }
    }
    Ok(())
}

/// Hidden files and editor leftovers (`.#x`, `x~`, `x.swp`).
fn is_ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~') || name.ends_with(".swp")
}

/// A file the scan reads, by its name (the directories on its way aside).
fn is_read(name: &str) -> bool {
    !is_ignored(name) && is_manifest(name)
}

fn is_manifest(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml") || lower.ends_with(".json")
}
