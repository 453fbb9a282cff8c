//! Sources turn the outside world into Service, EndpointSlice and Node
//! objects and tell the sync loop about them one object at a time:
//! batches of [`Event`]s (an object upserted or deleted, the source's own
//! problems, "synced"), each object checked once, at the source. A batch
//! is applied whole, so a relist or a changed file is never seen half done.

pub mod kube;
pub mod manifest;

pub use manifest::{load_dir, ManifestSource, SourceError};

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::model::{Checked, ClusterObjects, Event, Object, ObjectKey, Rejection};

/// Where a source sends its event batches.
pub type EventSender = mpsc::UnboundedSender<Vec<Event>>;
/// Where the sync loop reads them.
pub type EventReceiver = mpsc::UnboundedReceiver<Vec<Event>>;

/// Everything a source has told, folded into one view (for `kproxy
/// render`, start-up look-ups and tests; the sync loop feeds the events to
/// the model's tracker instead).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The objects held, in key order.
    pub objects: Arc<ClusterObjects>,
    /// The source's own problems and those of the objects held, each
    /// naming file, document, object and field where the source knows.
    pub rejected: Vec<Rejection>,
    /// The source has told everything it had at start.
    pub synced: bool,
    held: BTreeMap<ObjectKey, Checked>,
    problems: Vec<Rejection>,
}

impl Snapshot {
    /// Applies a batch of events.
    pub fn apply(&mut self, events: impl IntoIterator<Item = Event>) {
        for ev in events {
            match ev {
                Event::Upsert(c) => {
                    self.held.insert(c.key().clone(), c);
                }
                Event::Delete(k) => {
                    self.held.remove(&k);
                }
                Event::Problems(p) => self.problems = p,
                Event::Synced => self.synced = true,
            }
        }
        let mut objects = ClusterObjects::default();
        let mut rejected = self.problems.clone();
        for c in self.held.values() {
            rejected.extend(c.rejections().iter().cloned());
            match c.object() {
                Some(Object::Service(s)) => objects.services.push(s.clone()),
                Some(Object::EndpointSlice(s)) => objects.endpoint_slices.push(s.clone()),
                Some(Object::Node(n)) => objects.nodes.push(n.clone()),
                None => {}
            }
        }
        rejected.sort();
        rejected.dedup();
        self.objects = Arc::new(objects);
        self.rejected = rejected;
    }
}

/// Folds a source's batches into a [`Snapshot`] published after each
/// batch (tests watch sources through it).
#[cfg(test)]
pub(crate) fn fold(mut rx: EventReceiver) -> tokio::sync::watch::Receiver<Snapshot> {
    let (tx, out) = tokio::sync::watch::channel(Snapshot::default());
    tokio::spawn(async move {
        loop {
            // Stops (dropping `rx`, which stops the source) when no one watches.
            let batch = tokio::select! {
                b = rx.recv() => b,
                _ = tx.closed() => return,
            };
            let Some(batch) = batch else { return };
            let mut snap = tx.borrow().clone();
            snap.apply(batch);
            if tx.send(snap).is_err() {
                return;
            }
        }
    });
    out
}
