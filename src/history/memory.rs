//! The in-memory serving copy: the newest `cap` events of every user, in time order, sharded so
//! that ingest and reads of different users rarely contend. With a journal attached, every change
//! is handed to the journal while its shard is still locked, so the journal sees each user's
//! changes in exactly the order memory applied them.
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use super::journal::{Journal, LoggedEvent, Replayed};
use super::{
    Commit, Expired, HistorySnapshot, HistoryStore, NewEvent, StoreError, StoreStats, StoredEvent, EVENT_BYTES,
};

#[derive(Debug, Default)]
struct UserHistory {
    events: VecDeque<StoredEvent>,
    version: u64,
}

pub struct Histories {
    shards: Vec<RwLock<HashMap<Arc<str>, UserHistory>>>,
    hasher: RandomState,
    capacity: usize,
    next_version: AtomicU64,
    users: AtomicUsize,
    events: AtomicUsize,
    key_bytes: AtomicUsize,
    journal: Option<Journal>,
}

impl Histories {
    /// Memory only: a restart forgets everything. `capacity`: events kept per user (the oldest
    /// are dropped first).
    pub fn new(shards: usize, capacity: usize) -> Self {
        Self::with_journal(shards, capacity, None)
    }

    /// Memory backed by `journal`: call [`Histories::recover`] before serving.
    pub fn with_journal(shards: usize, capacity: usize, journal: Option<Journal>) -> Self {
        assert!(shards > 0 && capacity > 0, "shards and capacity must be positive");
        Self {
            shards: (0..shards).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            capacity,
            next_version: AtomicU64::new(1),
            users: AtomicUsize::new(0),
            events: AtomicUsize::new(0),
            key_bytes: AtomicUsize::new(0),
            journal,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    fn shard(&self, user: &str) -> &RwLock<HashMap<Arc<str>, UserHistory>> {
        &self.shards[self.hasher.hash_one(user) as usize % self.shards.len()]
    }

    /// Memory only, no journal: the one place events enter a user's history.
    fn apply(&self, user: &str, events: impl IntoIterator<Item = StoredEvent>) -> u64 {
        let mut shard = self.shard(user).write().unwrap_or_else(|e| e.into_inner());
        self.apply_locked(&mut shard, user, events)
    }

    fn apply_locked(
        &self,
        shard: &mut HashMap<Arc<str>, UserHistory>,
        user: &str,
        events: impl IntoIterator<Item = StoredEvent>,
    ) -> u64 {
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

    /// Rebuilds memory from the journal (start-up) by replaying its records in arrival order —
    /// the very appends and erasures that built the live histories — and then drops what is past
    /// the journal's retention (a compaction may not have removed it from disk yet). `resolve`
    /// maps a logged event to the model's indices. Returns the number of events read.
    pub fn recover(&self, resolve: impl Fn(&LoggedEvent) -> StoredEvent) -> Result<u64, StoreError> {
        let Some(journal) = &self.journal else { return Ok(0) };
        let horizon = journal.retention_horizon();
        let mut read = 0u64;
        journal.replay(|change| match change {
            Replayed::Append(user, events) => {
                read += events.len() as u64;
                self.apply(user, events.iter().map(&resolve));
            }
            Replayed::Erase(user) => {
                self.forget_in_memory(user);
            }
        })?;
        if let Some(horizon) = horizon {
            self.expire_in_memory(horizon);
        }
        Ok(read)
    }

    /// Drops every event older than `horizon` (Unix seconds) from memory, and the users left
    /// with none; each changed history gets a new version, so no cached state outlives it.
    fn expire_in_memory(&self, horizon: i64) -> Expired {
        let mut expired = Expired::default();
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(|e| e.into_inner());
            let mut emptied = Vec::new();
            for (user, history) in shard.iter_mut() {
                let old = history.events.partition_point(|e| e.timestamp < horizon);
                if old == 0 {
                    continue;
                }
                history.events.drain(..old);
                self.events.fetch_sub(old, Ordering::Relaxed);
                expired.events += old;
                history.version = self.next_version.fetch_add(1, Ordering::Relaxed);
                if history.events.is_empty() {
                    emptied.push(user.clone());
                }
            }
            expired.users += emptied.len();
            for user in emptied {
                self.remove_locked(&mut shard, &user);
            }
        }
        expired
    }

    fn forget_in_memory(&self, user: &str) -> Option<UserHistory> {
        let mut shard = self.shard(user).write().unwrap_or_else(|e| e.into_inner());
        self.remove_locked(&mut shard, user)
    }

    fn remove_locked(&self, shard: &mut HashMap<Arc<str>, UserHistory>, user: &str) -> Option<UserHistory> {
        let history = shard.remove(user)?;
        self.users.fetch_sub(1, Ordering::Relaxed);
        self.events.fetch_sub(history.events.len(), Ordering::Relaxed);
        self.key_bytes.fetch_sub(user.len(), Ordering::Relaxed);
        Some(history)
    }
}

impl HistoryStore for Histories {
    fn append(&self, writes: Vec<(Arc<str>, Vec<NewEvent>)>) -> Commit {
        let Some(journal) = &self.journal else {
            for (user, events) in writes {
                self.apply(&user, events.into_iter().map(|e| e.event));
            }
            return Commit::done();
        };
        if let Err(error) = journal.health() {
            return Commit::failed(error);
        }
        let last = writes.len().saturating_sub(1);
        let mut commit = Commit::done();
        for (i, (user, events)) in writes.into_iter().enumerate() {
            let logged: Vec<LoggedEvent> = events.iter().map(LoggedEvent::from).collect();
            let mut shard = self.shard(&user).write().unwrap_or_else(|e| e.into_inner());
            self.apply_locked(&mut shard, &user, events.into_iter().map(|e| e.event));
            // The journal keeps order, so the last write's acknowledgement covers the others.
            let ticket = journal.append(user.clone(), logged, i == last);
            drop(shard);
            if let Some(ticket) = ticket {
                commit = ticket;
            }
        }
        commit
    }

    fn snapshot(&self, user: &str) -> Option<HistorySnapshot> {
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

    fn remove(&self, user: &str) -> Option<(u64, Commit)> {
        let mut shard = self.shard(user).write().unwrap_or_else(|e| e.into_inner());
        self.remove_locked(&mut shard, user)?;
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        // Still under the shard lock: the journal sees the erasure where memory did.
        let commit = match &self.journal {
            Some(journal) => journal.erase(Arc::from(user)),
            None => Commit::done(),
        };
        Some((version, commit))
    }

    fn stats(&self) -> StoreStats {
        let (users, events) = (self.users.load(Ordering::Relaxed), self.events.load(Ordering::Relaxed));
        let per_user = std::mem::size_of::<UserHistory>() + std::mem::size_of::<Arc<str>>();
        StoreStats {
            users,
            events,
            bytes: events * EVENT_BYTES + users * per_user + self.key_bytes.load(Ordering::Relaxed),
            journal: self.journal.as_ref().map(Journal::totals),
        }
    }

    fn health(&self) -> Result<(), StoreError> {
        self.journal.as_ref().map_or(Ok(()), Journal::health)
    }

    fn expire(&self, horizon: i64) -> Expired {
        // Memory only: the journal drops the same events from disk at its retention compactions.
        self.expire_in_memory(horizon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(item: u32, ts: i64) -> NewEvent {
        NewEvent {
            event: StoredEvent {
                item,
                item_id: Arc::from(format!("i{item}")),
                timestamp: ts,
                event_type: 1,
            },
            type_id: None,
        }
    }

    /// The old single-user call shape, for brevity.
    fn append<const N: usize>(store: &Histories, user: &str, events: [NewEvent; N]) -> u64 {
        let _ = store.append(vec![(Arc::from(user), events.to_vec())]);
        store.snapshot(user).unwrap().version
    }

    #[test]
    fn out_of_order_events_are_inserted_in_time_order_and_ties_keep_arrival_order() {
        let store = Histories::new(4, 10);
        append(&store, "u", [ev(1, 100), ev(2, 300)]);
        append(&store, "u", [ev(3, 200), ev(4, 300), ev(5, 50)]);
        let snap = store.snapshot("u").unwrap();
        assert_eq!(snap.items, [5, 1, 3, 2, 4]);
        assert_eq!(snap.timestamps, [50, 100, 200, 300, 300]);
    }

    #[test]
    fn capacity_keeps_the_newest_and_unknown_items_are_stored_but_not_model_input() {
        let store = Histories::new(2, 3);
        append(&store, "u", [ev(1, 1), ev(0, 2), ev(3, 3), ev(4, 4)]);
        let snap = store.snapshot("u").unwrap();
        assert_eq!(snap.events.len(), 3);
        assert_eq!(snap.items, [3, 4]);
        assert_eq!(snap.events[0].item, 0);
        assert_eq!(store.stats().events, 3);
    }

    #[test]
    fn expiry_drops_old_events_then_emptied_users_and_renews_versions() {
        let store = Histories::new(2, 10);
        let kept = append(&store, "kept", [ev(1, 100), ev(2, 200), ev(3, 300)]);
        append(&store, "gone", [ev(1, 50), ev(2, 150)]);
        let expired = store.expire(200);
        assert_eq!(expired, Expired { events: 3, users: 1 });
        let snap = store.snapshot("kept").unwrap();
        assert_eq!(snap.timestamps, [200, 300]);
        assert!(snap.version > kept);
        assert_eq!(store.snapshot("gone"), None);
        let stats = store.stats();
        assert_eq!((stats.users, stats.events), (1, 2));
        assert_eq!(store.expire(200), Expired::default(), "nothing left to expire");
    }

    #[test]
    fn versions_change_on_every_write_and_removal_forgets_everything() {
        let store = Histories::new(2, 5);
        let v1 = append(&store, "a", [ev(1, 1)]);
        let v2 = append(&store, "b", [ev(1, 1)]);
        let v3 = append(&store, "a", [ev(2, 2)]);
        assert!(v1 != v2 && v2 != v3 && v1 != v3);
        assert_eq!(store.snapshot("a").unwrap().version, v3);
        assert_eq!(store.stats().users, 2);
        assert!(store.remove("a").is_some_and(|(version, _)| version > v3));
        assert!(store.remove("a").is_none());
        assert_eq!(store.snapshot("a"), None);
        let stats = store.stats();
        assert_eq!((stats.users, stats.events), (1, 1));
        // A re-created user never reuses an old version.
        assert!(append(&store, "a", [ev(1, 1)]) > v3);
    }
}
