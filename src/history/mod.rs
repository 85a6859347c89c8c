//! Per-user behaviour histories held in memory: the newest `capacity` events of every user, in
//! time order, sharded so that ingest and reads of different users rarely contend.
//!
//! Every change gives the user's history a new, globally unique version, so anything derived from
//! a history (the inference cache) can tell whether it is still current.
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// One stored event. `item` is the model's index, 0 when the model does not know the item: such
/// events are kept (a retrained model may know them) but are not model input.
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

#[derive(Debug, Default)]
struct UserHistory {
    events: VecDeque<StoredEvent>,
    version: u64,
}

/// What a reader gets: the model-input part of a history plus everything it needs to key caches.
#[derive(Debug, Clone, PartialEq)]
pub struct HistorySnapshot {
    pub version: u64,
    /// Known items only, oldest first, with their timestamps and types.
    pub items: Vec<u32>,
    pub timestamps: Vec<i64>,
    pub types: Vec<u32>,
    /// All stored events, unknown items included (for `GET /v1/users/{id}/history`).
    pub events: Vec<StoredEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub users: usize,
    pub events: usize,
    pub bytes: usize,
}

pub struct HistoryStore {
    shards: Vec<RwLock<HashMap<Arc<str>, UserHistory>>>,
    hasher: RandomState,
    capacity: usize,
    next_version: AtomicU64,
    users: AtomicUsize,
    events: AtomicUsize,
    key_bytes: AtomicUsize,
}

impl HistoryStore {
    /// `capacity`: events kept per user (the oldest are dropped first).
    pub fn new(shards: usize, capacity: usize) -> Self {
        assert!(shards > 0 && capacity > 0, "shards and capacity must be positive");
        Self {
            shards: (0..shards).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            capacity,
            next_version: AtomicU64::new(1),
            users: AtomicUsize::new(0),
            events: AtomicUsize::new(0),
            key_bytes: AtomicUsize::new(0),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn shard(&self, user: &str) -> &RwLock<HashMap<Arc<str>, UserHistory>> {
        &self.shards[self.hasher.hash_one(user) as usize % self.shards.len()]
    }

    /// Inserts `events` into `user`'s history in timestamp order (an event goes after stored
    /// events with the same timestamp, so arrival order breaks ties, as file order does offline).
    /// Returns the history's new version.
    pub fn append(&self, user: &str, events: impl IntoIterator<Item = StoredEvent>) -> u64 {
        let mut shard = self.shard(user).write().unwrap_or_else(|e| e.into_inner());
        let history = match shard.get_mut(user) {
            Some(history) => history,
            None => {
                self.users.fetch_add(1, Ordering::Relaxed);
                self.key_bytes.fetch_add(user.len(), Ordering::Relaxed);
                shard.entry(Arc::from(user)).or_default()
            }
        };
        let before = history.events.len();
        for event in events {
            let at = history.events.partition_point(|e| e.timestamp <= event.timestamp);
            history.events.insert(at, event);
        }
        while history.events.len() > self.capacity {
            history.events.pop_front();
        }
        let after = history.events.len();
        self.events.fetch_add(after, Ordering::Relaxed);
        self.events.fetch_sub(before, Ordering::Relaxed);
        history.version = self.next_version.fetch_add(1, Ordering::Relaxed);
        history.version
    }

    pub fn snapshot(&self, user: &str) -> Option<HistorySnapshot> {
        let shard = self.shard(user).read().unwrap_or_else(|e| e.into_inner());
        let history = shard.get(user)?;
        let known = history.events.iter().filter(|e| e.item != 0);
        Some(HistorySnapshot {
            version: history.version,
            items: known.clone().map(|e| e.item).collect(),
            timestamps: known.clone().map(|e| e.timestamp).collect(),
            types: known.map(|e| e.event_type).collect(),
            events: history.events.iter().cloned().collect(),
        })
    }

    /// Forgets a user entirely. Returns whether there was anything to forget.
    pub fn remove(&self, user: &str) -> bool {
        let mut shard = self.shard(user).write().unwrap_or_else(|e| e.into_inner());
        match shard.remove(user) {
            Some(history) => {
                self.users.fetch_sub(1, Ordering::Relaxed);
                self.events.fetch_sub(history.events.len(), Ordering::Relaxed);
                self.key_bytes.fetch_sub(user.len(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    pub fn stats(&self) -> StoreStats {
        let (users, events) = (self.users.load(Ordering::Relaxed), self.events.load(Ordering::Relaxed));
        let per_user = std::mem::size_of::<UserHistory>() + std::mem::size_of::<Arc<str>>();
        StoreStats {
            users,
            events,
            bytes: events * EVENT_BYTES + users * per_user + self.key_bytes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(item: u32, ts: i64) -> StoredEvent {
        StoredEvent {
            item,
            item_id: Arc::from(format!("i{item}")),
            timestamp: ts,
            event_type: 1,
        }
    }

    #[test]
    fn out_of_order_events_are_inserted_in_time_order_and_ties_keep_arrival_order() {
        let store = HistoryStore::new(4, 10);
        store.append("u", [ev(1, 100), ev(2, 300)]);
        store.append("u", [ev(3, 200), ev(4, 300), ev(5, 50)]);
        let snap = store.snapshot("u").unwrap();
        assert_eq!(snap.items, [5, 1, 3, 2, 4]);
        assert_eq!(snap.timestamps, [50, 100, 200, 300, 300]);
    }

    #[test]
    fn capacity_keeps_the_newest_and_unknown_items_are_stored_but_not_model_input() {
        let store = HistoryStore::new(2, 3);
        store.append("u", [ev(1, 1), ev(0, 2), ev(3, 3), ev(4, 4)]);
        let snap = store.snapshot("u").unwrap();
        assert_eq!(snap.events.len(), 3);
        assert_eq!(snap.items, [3, 4]);
        assert_eq!(snap.events[0].item, 0);
        assert_eq!(store.stats().events, 3);
    }

    #[test]
    fn versions_change_on_every_write_and_removal_forgets_everything() {
        let store = HistoryStore::new(2, 5);
        let v1 = store.append("a", [ev(1, 1)]);
        let v2 = store.append("b", [ev(1, 1)]);
        let v3 = store.append("a", [ev(2, 2)]);
        assert!(v1 != v2 && v2 != v3 && v1 != v3);
        assert_eq!(store.snapshot("a").unwrap().version, v3);
        assert_eq!(store.stats().users, 2);
        assert!(store.remove("a"));
        assert!(!store.remove("a"));
        assert_eq!(store.snapshot("a"), None);
        let stats = store.stats();
        assert_eq!((stats.users, stats.events), (1, 1));
        // A re-created user never reuses an old version.
        assert!(store.append("a", [ev(1, 1)]) > v3);
    }
}
