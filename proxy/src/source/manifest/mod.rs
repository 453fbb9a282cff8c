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

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use crate::model::{self, ClusterObjects, Rejection};

use super::Snapshot;
use parse::{Document, Kind, Object, ObjectKey, REASON_DUPLICATE_OBJECT, REASON_PARSE_ERROR};

pub use watch::ManifestSource;

/// How deep subdirectories are followed (guards against symlink loops).
const MAX_DEPTH: usize = 16;

/// Why the manifest source cannot work at all (problems inside files are
/// [`Rejection`]s, not errors).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("manifest directory {path} does not exist (check --manifests)")]
    DirNotFound { path: PathBuf },
    #[error("manifest path {path} is not a directory (--manifests takes a directory)")]
    NotADirectory { path: PathBuf },
    #[error("cannot read manifest directory {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("cannot watch manifest directory {path} for changes: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("the file watcher for manifest directory {path} stopped unexpectedly")]
    WatcherStopped { path: PathBuf },
}

/// Reads the directory once (for `kproxy render` and benchmarks).
pub fn load_dir(dir: &Path) -> Result<Snapshot, SourceError> {
    DirState::new(dir.to_path_buf()).scan()
}

/// What one file currently contributes.
#[derive(Debug, Clone, Default)]
struct FileState {
    /// Raw content last read; an unchanged file is not parsed again.
    content: Vec<u8>,
    /// Objects in effect from this file (last good versions included), unique keys.
    effective: Vec<Document>,
    /// Problems found in the current content.
    rejections: Vec<Rejection>,
}

/// The source's memory across scans: what every file contributes.
#[derive(Debug)]
struct DirState {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl DirState {
    fn new(dir: PathBuf) -> Self {
        DirState {
            dir,
            files: BTreeMap::new(),
        }
    }

    /// Re-reads the directory and returns the merged snapshot.
    fn scan(&mut self) -> Result<Snapshot, SourceError> {
        let paths = list_files(&self.dir)?;
        let mut next = BTreeMap::new();
        for rel in paths {
            let prev = self.files.remove(&rel);
            let content = match std::fs::read(self.dir.join(&rel)) {
                Ok(c) => c,
                // Deleted between listing and reading: gone, like its objects.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    let mut state = prev.unwrap_or_default();
                    state.content.clear(); // re-read next time
                    state.rejections = vec![parse::rejection(
                        "",
                        "",
                        "",
                        "",
                        REASON_PARSE_ERROR,
                        format!("cannot read file: {e}"),
                        &rel.display().to_string(),
                    )];
                    next.insert(rel, state);
                    continue;
                }
            };
            let state = match prev {
                Some(prev) if prev.content == content => prev,
                prev => process_file(&rel.display().to_string(), content, prev),
            };
            next.insert(rel, state);
        }
        self.files = next;
        Ok(self.snapshot())
    }

    /// Merges all files: later files in sorted order win over earlier ones.
    fn snapshot(&self) -> Snapshot {
        let mut rejected = Vec::new();
        let mut merged: BTreeMap<&ObjectKey, &Document> = BTreeMap::new();
        for state in self.files.values() {
            rejected.extend(state.rejections.iter().cloned());
            for doc in &state.effective {
                if let Some(old) = merged.insert(&doc.key, doc) {
                    rejected.push(duplicate(old, doc));
                }
            }
        }
        let mut objects = ClusterObjects::default();
        for doc in merged.into_values() {
            match &doc.object {
                Object::Service(s) => objects.services.push(s.clone()),
                Object::EndpointSlice(s) => objects.endpoint_slices.push(s.clone()),
                Object::Node(n) => objects.nodes.push(n.clone()),
            }
        }
        rejected.sort();
        rejected.dedup();
        Snapshot {
            objects: Arc::new(objects),
            rejected,
            synced: true,
        }
    }
}

/// Parses and validates a changed file, falling back to `prev` where the new
/// content is broken.
fn process_file(rel: &str, content: Vec<u8>, prev: Option<FileState>) -> FileState {
    let prev_effective = prev.map(|p| p.effective);
    let parsed = match std::str::from_utf8(&content) {
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

    let prev_by_key: HashMap<&ObjectKey, &Document> = prev_effective
        .iter()
        .flatten()
        .map(|d| (&d.key, d))
        .collect();
    // Within one file, a later document redefining an object wins (keyed so
    // files with thousands of objects stay linear).
    let mut slots: Vec<Option<Document>> = Vec::new();
    let mut index: HashMap<ObjectKey, usize> = HashMap::new();
    for doc in parsed.documents {
        let problems = validate(&doc.object);
        let chosen = if problems.is_empty() {
            Some(doc.clone())
        } else {
            let last_good = prev_by_key.get(&doc.key).copied();
            for mut r in problems {
                r.origin = Some(doc.origin.clone());
                if last_good.is_some() {
                    r.message
                        .push_str("; keeping the previous version of this object");
                }
                rejections.push(r);
            }
            match last_good {
                Some(good) => Some(good.clone()),
                // A new slice with a bad endpoint or port still carries good
                // ones: the model leaves out only the bad parts (as
                // kube-proxy does) instead of the whole slice.
                None if doc.key.kind == Kind::EndpointSlice => Some(doc.clone()),
                None => None,
            }
        };
        let Some(chosen) = chosen else { continue };
        if let Some(&i) = index.get(&doc.key) {
            if let Some(old) = slots[i].take() {
                rejections.push(duplicate(&old, &doc));
            }
        }
        index.insert(doc.key.clone(), slots.len());
        slots.push(Some(chosen));
    }
    let effective: Vec<Document> = slots.into_iter().flatten().collect();
    drop(prev_by_key);

    let effective = match (broken, prev_effective) {
        // Last good state: a broken file changes nothing that was programmed.
        (true, Some(prev)) => prev,
        // Never parsed cleanly before: use what did parse, nothing better exists.
        _ => effective,
    };
    FileState {
        content,
        effective,
        rejections,
    }
}

fn validate(object: &Object) -> Vec<Rejection> {
    match object {
        Object::Service(s) => model::validate_service(s),
        Object::EndpointSlice(s) => model::validate_endpoint_slice(s),
        Object::Node(n) => model::validate_node(n),
    }
}

/// A warning: `winner` replaces `loser`, defined earlier.
fn duplicate(loser: &Document, winner: &Document) -> Rejection {
    parse::rejection(
        winner.key.kind.as_str(),
        &winner.key.namespace,
        &winner.key.name,
        "metadata.name",
        REASON_DUPLICATE_OBJECT,
        format!(
            "{} is also defined in {}; this later definition wins",
            winner.key.kind.as_str(),
            loser.origin
        ),
        &winner.origin,
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
        Err(source) => {
            return Err(SourceError::ReadDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), 0, &mut out).map_err(|source| SourceError::ReadDir {
        path: dir.to_path_buf(),
        source,
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
