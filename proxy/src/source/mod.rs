//! Sources turn the outside world into Service, EndpointSlice and Node
//! objects and publish snapshots of them to the sync loop.

pub mod kube;
pub mod manifest;

pub use manifest::{load_dir, ManifestSource, SourceError};

use std::sync::Arc;

use crate::model::{ClusterObjects, Rejection};

/// Everything a source knows at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub objects: Arc<ClusterObjects>,
    /// Problems found by the source itself (files that do not parse, objects
    /// that do not validate), each naming file, document, object and field.
    pub rejected: Vec<Rejection>,
    /// The source has read everything once (the first sync may start).
    pub synced: bool,
}
