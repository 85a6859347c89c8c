//! Per-user behaviour histories: the `HistoryStore` seam the core talks to, the in-memory serving
//! copy, and the durable journal behind it.
//!
//! ```text
//! ingest ──▶ Histories (memory, newest `cap` per user) ──▶ Journal (fjall: every acknowledged event)
//!               ▲ snapshot/version for the batcher            │ recovered into memory at start;
//!               └──────── users evicted by the memory budget ◀─┘ read back on their next request
//! ```
//! Memory is what requests read; the journal is the truth on disk. Every change gives a user's
//! history a new, globally unique version, so anything derived from a history (the inference
//! cache) can tell whether it is still current.
pub mod journal;
mod memory;

use std::sync::Arc;

use tokio::sync::oneshot;

pub use journal::{EncodedEvents, FsyncPolicy, Journal, JournalConfig, LoggedEvent};
pub use memory::{Histories, MemoryBudget};

/// One event as memory holds it. `item` is the model's index, 0 when the model does not know the
/// item: such events are kept (a retrained model may know them) but are not model input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub item: u32,
    pub item_id: Arc<str>,
    pub timestamp: i64,
    pub event_type: u32,
}

/// Approximate resident bytes of one stored event (the id string is shared with the vocabulary
/// for known items, so it is not counted).
pub const EVENT_BYTES: usize = std::mem::size_of::<StoredEvent>();

/// An accepted event on its way in: what memory holds, plus the raw type the client sent (types
/// the model never saw read as "untyped" in memory but keep their name on disk, for retraining).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event: StoredEvent,
    pub type_id: Option<Arc<str>>,
}

/// What a reader gets: the model-input part of a history plus everything it needs to key caches.
#[derive(Debug, Clone, PartialEq)]
pub struct HistorySnapshot {
    pub version: u64,
    /// Known items only, oldest first, with their timestamps and types.
    pub items: Vec<u32>,
    pub timestamps: Vec<i64>,
    pub types: Vec<u32>,
    /// All events in memory, unknown items included (for `GET /v1/users/{id}/history`).
    pub events: Vec<StoredEvent>,
    /// Known items of the events that left memory for the cap, each once, ascending. Not model
    /// input, but the user had them: see [`HistorySnapshot::had_items`].
    pub earlier_items: Vec<u32>,
}

impl HistorySnapshot {
    /// Every known item the user had, each once, ascending: the items in memory and those that
    /// left it. What "seen" means when seen items are left out, and what a repeat term raises.
    pub fn had_items(&self) -> Vec<i64> {
        let mut had: Vec<i64> = self
            .items
            .iter()
            .chain(&self.earlier_items)
            .map(|&i| i64::from(i))
            .collect();
        had.sort_unstable();
        had.dedup();
        had
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StoreStats {
    pub users: usize,
    pub events: usize,
    /// Approximate bytes of the in-memory histories.
    pub bytes: usize,
    /// `None` for a store without a journal.
    pub journal: Option<JournalTotals>,
    pub memory: MemoryTotals,
}

/// Running totals of the memory budget (all zero without one).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MemoryTotals {
    /// Users that left memory for the budget.
    pub evictions: u64,
    /// Users read back from the store.
    pub reloads: u64,
    pub reload_seconds: f64,
}

/// Running totals of the durable journal.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct JournalTotals {
    pub batches: u64,
    pub events: u64,
    pub fsyncs: u64,
    pub fsync_seconds: f64,
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The journal could not write; the store refuses writes from then on (health turns off).
    #[error("the history journal failed: {0}")]
    Journal(String),
    #[error("the history journal has stopped")]
    Stopped,
}

/// A write's acknowledgement: resolves once the write is as durable as the store promises
/// (memory only: at once; journal: written to the OS, and fsynced first with `--fsync always`).
#[must_use = "a write is acknowledged only once its commit resolves"]
pub struct Commit(Option<oneshot::Receiver<Result<(), StoreError>>>);

impl Commit {
    pub fn done() -> Self {
        Self(None)
    }

    pub fn failed(error: StoreError) -> Self {
        let (sender, receiver) = oneshot::channel();
        let _ = sender.send(Err(error));
        Self(Some(receiver))
    }

    pub fn pending(receiver: oneshot::Receiver<Result<(), StoreError>>) -> Self {
        Self(Some(receiver))
    }

    /// [`Commit::wait`] for code outside an async runtime (the offline tools).
    pub fn wait_blocking(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(receiver) => receiver.blocking_recv().unwrap_or(Err(StoreError::Stopped)),
        }
    }

    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(receiver) => receiver.await.unwrap_or(Err(StoreError::Stopped)),
        }
    }
}

/// Where the core keeps histories. The in-process [`Histories`] is one backend; a shared store
/// (Redis) for several replicas is another.
pub trait HistoryStore: Send + Sync {
    /// Adds each user's events in timestamp order (ties keep arrival order, as file order does
    /// offline). Memory changes at once; the returned commit says when the write is durable.
    fn append(&self, writes: Vec<(Arc<str>, Vec<NewEvent>)>) -> Commit;
    /// The user's history; `Ok(None)` for a user with no events. A store that keeps only part of
    /// its users in memory reads the others back here (an `Err` when that read fails).
    fn snapshot(&self, user: &str) -> Result<Option<HistorySnapshot>, StoreError>;
    /// Forgets a user in memory and on disk. `None` when there was nothing to forget; otherwise
    /// the version the erasure took (later than every version the user's history had).
    fn remove(&self, user: &str) -> Option<(u64, Commit)>;
    fn stats(&self) -> StoreStats;
    /// `Err` once the store can no longer keep its promise (the journal failed).
    fn health(&self) -> Result<(), StoreError>;
    /// Retention: forgets every event older than `horizon` (Unix seconds), and users left with
    /// none. Durable stores drop them from disk at their next compaction.
    fn expire(&self, horizon: i64) -> Expired;
    /// Re-resolves every item in memory by its external id for another model's vocabulary:
    /// `item` gives the new index (and the vocabulary's shared id), `None` for an item the model
    /// does not know. Applying it twice is applying it once. Returns the events visited.
    fn remap_items(&self, item: &ItemIndex<'_>) -> usize;
}

/// An item's index (and shared id) in a model's vocabulary, by external id.
pub type ItemIndex<'a> = dyn Fn(&str) -> Option<(u32, Arc<str>)> + Sync + 'a;

/// The oldest event timestamp that a retention of `keep` keeps now.
pub fn retention_horizon(keep: std::time::Duration) -> i64 {
    crate::data::unix_now().saturating_sub(keep.as_secs().min(i64::MAX as u64) as i64)
}

/// What one expiry pass removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expired {
    pub events: usize,
    pub users: usize,
}
