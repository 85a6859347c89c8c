//! The in-memory serving copy: the newest `cap` events of every user, in time order, sharded so
//! that ingest and reads of different users rarely contend. With a journal attached, every change
//! is handed to the journal while its shard is still locked, so the journal sees each user's
//! changes in exactly the order memory applied them.
//!
//! With a memory budget (`--max-memory-bytes`), the least recently active users leave memory
//! (never the journal) once the histories' bytes pass it, and are read back from the journal on
//! their next request. A user may leave only once the journal has indexed every change memory
//! made to it (a reload reads the indexed entries), and an erased user is not read back before
//! its erasure is committed, so a reload always gives back exactly what memory held (less what
//! retention dropped since). Older items the served model did not know are kept by id too, at
//! most the cap's number of them per user (see `UserHistory::keep_earlier`), so that a reloaded
//! model that knows them leaves them out; past that bound the oldest are forgotten.
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::Instant;

use foldhash::fast::RandomState;
use hashbrown::hash_map::EntryRef;

use super::journal::{EncodedEvents, Journal, LoggedEvent};
use super::{
    Commit, Expired, HistorySnapshot, HistoryStore, ItemIndex, MemoryTotals, NewEvent, StoreError, StoreStats,
    StoredEvent, EVENT_BYTES,
};

#[derive(Debug, Default)]
struct UserHistory {
    events: VecDeque<StoredEvent>,
    /// The items of the events the cap pushed out of memory, by external id (so that another
    /// model's vocabulary can re-resolve them): the user still had them, so a recommendation
    /// that leaves seen items out must leave these out too. Items the served model does not
    /// know are kept as well (index 0), at most the cap's number of them (the newest), since a
    /// later model may know them.
    earlier: EarlierItems,
    /// `earlier`'s items the served model does not know, oldest first (by their newest time):
    /// the one to forget at the bound is found without a scan of every earlier item, which a
    /// client sending only new ids would otherwise make it do for each event.
    unknown_by_age: BTreeSet<(i64, Arc<str>)>,
    /// Their ids' bytes (not the vocabulary's strings: counted here) and their order's entries.
    unknown_earlier_bytes: usize,
    version: u64,
    /// The eviction clock when the user was last read or written.
    last_active: AtomicU64,
    /// [`Journal::queued`] just after the user's newest change: the user may leave memory once
    /// the journal has indexed that many changes.
    written: u64,
}

/// An item that left memory: its index in the served model's vocabulary and the newest time the
/// user had it among the events that left (retention forgets it after that).
#[derive(Debug, Clone, Copy)]
struct EarlierItem {
    item: u32,
    newest: i64,
}

type EarlierItems = hashbrown::HashMap<Arc<str>, EarlierItem, RandomState>;

/// Bytes an unknown earlier item's place in [`UserHistory::unknown_by_age`] costs (the entry;
/// the tree's nodes hold a few spare ones too, not counted).
const UNKNOWN_ORDER_BYTES: usize = std::mem::size_of::<(i64, Arc<str>)>();

/// Bytes a user costs beyond its events: the map entry and the id.
const USER_BYTES: usize = std::mem::size_of::<UserHistory>() + std::mem::size_of::<Arc<str>>();

impl UserHistory {
    fn bytes(&self, user: &str) -> usize {
        self.events.len() * EVENT_BYTES + self.earlier_bytes() + USER_BYTES + user.len()
    }

    /// The earlier items' table as allocated (its spare slots too; known items' id strings are
    /// the vocabulary's, shared), and the unknown items' ids.
    fn earlier_bytes(&self) -> usize {
        self.earlier.allocation_size() + self.unknown_earlier_bytes
    }

    /// Remembers the item of an event leaving memory. An item the model does not know counts
    /// against a bound of `cap` such items (the oldest goes): a client may invent ids without
    /// end, and they must not grow memory past the cap; a later model that knows one must
    /// still leave it out of the user's recommendations.
    fn keep_earlier(&mut self, event: StoredEvent, cap: usize) {
        if let Some((id, entry)) = self.earlier.get_key_value_mut(&event.item_id) {
            if entry.item == 0 && event.timestamp > entry.newest {
                let id = id.clone();
                self.unknown_by_age.remove(&(entry.newest, id.clone()));
                self.unknown_by_age.insert((event.timestamp, id));
            }
            entry.newest = entry.newest.max(event.timestamp);
            return;
        }
        if event.item == 0 {
            if self.unknown_by_age.len() >= cap {
                let Some((oldest_newest, oldest)) = self.unknown_by_age.first().cloned() else {
                    return;
                };
                if oldest_newest > event.timestamp {
                    return;
                }
                self.forget_earlier(&oldest);
            }
            self.unknown_by_age.insert((event.timestamp, event.item_id.clone()));
            self.unknown_earlier_bytes += event.item_id.len() + UNKNOWN_ORDER_BYTES;
        }
        self.earlier.insert(
            event.item_id,
            EarlierItem {
                item: event.item,
                newest: event.timestamp,
            },
        );
    }

    fn forget_earlier(&mut self, id: &str) {
        if let Some((id, earlier)) = self.earlier.remove_entry(id) {
            if earlier.item == 0 {
                self.unknown_earlier_bytes -= id.len() + UNKNOWN_ORDER_BYTES;
                self.unknown_by_age.remove(&(earlier.newest, id));
            }
        }
    }

    /// Keeps the earlier items `keep` accepts (each with its id, as the map now holds it).
    fn retain_earlier(&mut self, mut keep: impl FnMut(&Arc<str>, &EarlierItem) -> bool) {
        let forgotten: Vec<Arc<str>> = self
            .earlier
            .iter()
            .filter(|(id, earlier)| !keep(id, earlier))
            .map(|(id, _)| id.clone())
            .collect();
        for id in forgotten {
            self.forget_earlier(&id);
        }
    }
}

type UserMap = hashbrown::HashMap<Arc<str>, UserHistory, RandomState>;

#[derive(Debug, Default)]
struct Shard {
    /// hashbrown's map for `entry_ref`: a user is found, or inserted, with one hash lookup.
    users: UserMap,
    /// With a budget: users erased in memory whose erasure the journal has not committed yet,
    /// with the commit count that covers it (a reload before then would read them back).
    erasing: HashMap<Arc<str>, u64>,
}

/// `--max-memory-bytes`: how much the histories may hold, and how to read a user back.
pub struct MemoryBudget {
    pub max_bytes: usize,
    /// Maps a stored event to the model's indices, as recovery does.
    pub resolve: Arc<dyn Fn(&LoggedEvent) -> StoredEvent + Send + Sync>,
}

pub struct Histories {
    shards: Vec<RwLock<Shard>>,
    hasher: RandomState,
    capacity: usize,
    next_version: AtomicU64,
    users: AtomicUsize,
    events: AtomicUsize,
    earlier_bytes: AtomicUsize,
    key_bytes: AtomicUsize,
    journal: Option<Journal>,
    budget: Option<MemoryBudget>,
    /// Ticks on every read and write of a user (only with a budget).
    clock: AtomicU64,
    /// Set while one caller runs an eviction pass; the others go on.
    evicting: AtomicBool,
    evictions: AtomicU64,
    reloads: AtomicU64,
    reload_micros: AtomicU64,
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
            shards: (0..shards).map(|_| RwLock::default()).collect(),
            hasher: RandomState::default(),
            capacity,
            next_version: AtomicU64::new(1),
            users: AtomicUsize::new(0),
            events: AtomicUsize::new(0),
            earlier_bytes: AtomicUsize::new(0),
            key_bytes: AtomicUsize::new(0),
            journal,
            budget: None,
            clock: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
            evictions: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            reload_micros: AtomicU64::new(0),
        }
    }

    /// Bounds memory by `budget`; evicted users are read back from the journal, which is
    /// therefore required.
    pub fn with_budget(mut self, budget: MemoryBudget) -> Result<Self, StoreError> {
        if self.journal.is_none() {
            return Err(StoreError::Journal(
                "a memory budget needs a durable store to read evicted users back from (--data-dir)".into(),
            ));
        }
        self.budget = Some(budget);
        Ok(self)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    fn shard(&self, user: &str) -> &RwLock<Shard> {
        &self.shards[self.hasher.hash_one(user) as usize % self.shards.len()]
    }

    fn write_shard(&self, user: &str) -> RwLockWriteGuard<'_, Shard> {
        self.shard(user).write().unwrap_or_else(|e| e.into_inner())
    }

    /// The eviction clock's next reading; without a budget nothing reads it, so it stays put
    /// (one shared atomic less on every read and write).
    fn tick(&self) -> u64 {
        match self.budget {
            Some(_) => self.clock.fetch_add(1, Ordering::Relaxed),
            None => 0,
        }
    }

    fn touch(&self, history: &UserHistory) {
        if self.budget.is_some() {
            history.last_active.fetch_max(self.tick(), Ordering::Relaxed);
        }
    }

    /// The user's history, created empty if absent.
    fn entry<'s>(&self, users: &'s mut UserMap, user: &str) -> &'s mut UserHistory {
        users.entry_ref(user).or_insert_with(|| self.new_user(user))
    }

    /// An empty history for `user`, counted.
    fn new_user(&self, user: &str) -> UserHistory {
        self.users.fetch_add(1, Ordering::Relaxed);
        self.key_bytes.fetch_add(user.len(), Ordering::Relaxed);
        UserHistory::default()
    }

    /// The one place events enter a user's history; `active` is the user's recency.
    fn apply(&self, history: &mut UserHistory, events: impl IntoIterator<Item = StoredEvent>, active: u64) {
        let (before, earlier_before) = (history.events.len(), history.earlier_bytes());
        for event in events {
            // Events mostly come in time order: then the end is the place, found without a search.
            let at = match history.events.back() {
                Some(last) if last.timestamp > event.timestamp => {
                    history.events.partition_point(|e| e.timestamp <= event.timestamp)
                }
                _ => history.events.len(),
            };
            history.events.insert(at, event);
        }
        while history.events.len() > self.capacity {
            let oldest = history.events.pop_front().expect("over the capacity");
            history.keep_earlier(oldest, self.capacity);
        }
        self.events.fetch_add(history.events.len(), Ordering::Relaxed);
        self.events.fetch_sub(before, Ordering::Relaxed);
        self.earlier_resized(earlier_before, history.earlier_bytes());
        history.version = self.next_version.fetch_add(1, Ordering::Relaxed);
        history.last_active.fetch_max(active, Ordering::Relaxed);
    }

    /// The user's history in memory, read back from the journal first if the budget evicted it;
    /// for a user with no events, a new empty history with `create`, else `None`.
    fn resident<'s>(
        &self,
        shard: &'s mut Shard,
        user: &str,
        create: bool,
    ) -> Result<Option<&'s mut UserHistory>, StoreError> {
        let Shard { users, erasing } = shard;
        let absent = match users.entry_ref(user) {
            EntryRef::Occupied(found) => return Ok(Some(found.into_mut())),
            EntryRef::Vacant(absent) => absent,
        };
        let mut logged = Vec::new();
        let mut erased_lately = false;
        if let (Some(_), Some(journal)) = (&self.budget, &self.journal) {
            if let Some(&covered) = erasing.get(user) {
                erased_lately = journal.committed() < covered;
                if !erased_lately {
                    erasing.remove(user);
                }
            }
            if !erased_lately {
                let started = Instant::now();
                logged = journal.load(user)?;
                if !logged.is_empty() {
                    self.reloads.fetch_add(1, Ordering::Relaxed);
                    self.reload_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
            }
        }
        if logged.is_empty() && !create {
            return Ok(None);
        }
        let history = absent.insert(self.new_user(user));
        if let Some(budget) = &self.budget {
            self.apply(history, logged.iter().map(|e| (budget.resolve)(e)), self.tick());
        }
        Ok(Some(history))
    }

    /// Rebuilds memory from the journal (start-up): every user's stored appends, replayed in
    /// arrival order, build the very histories the live appends built (retention already
    /// applied). With a budget, the users written most recently are the ones kept. `resolve`
    /// maps a logged event to the model's indices. Returns the number of events read.
    pub fn recover(&self, resolve: impl Fn(&LoggedEvent) -> StoredEvent) -> Result<u64, StoreError> {
        let Some(journal) = &self.journal else { return Ok(0) };
        let (mut read, mut newest) = (0u64, 0u64);
        let mut previous = String::new();
        journal.replay(|user, seq, events| {
            read += events.len() as u64;
            newest = newest.max(seq);
            // Only between users: a user evicted halfway through its entries would come back
            // with the rest of them only.
            if user != previous {
                self.evict_over_budget();
                previous = user.to_owned();
            }
            if !events.is_empty() {
                let mut shard = self.write_shard(user);
                let history = self.entry(&mut shard.users, user);
                self.apply(history, events.iter().map(&resolve), seq);
            }
        })?;
        self.evict_over_budget();
        // Live activity is newer than anything recovered.
        self.clock.fetch_max(newest + 1, Ordering::Relaxed);
        Ok(read)
    }

    fn bytes(&self) -> usize {
        let (users, events) = (self.users.load(Ordering::Relaxed), self.events.load(Ordering::Relaxed));
        events * EVENT_BYTES
            + self.earlier_bytes.load(Ordering::Relaxed)
            + users * USER_BYTES
            + self.key_bytes.load(Ordering::Relaxed)
    }

    /// Past the budget, evicts the least recently active users whose changes the journal has
    /// indexed (a user read back reads only the indexed entries) until the histories hold 90% of
    /// it; when those are not enough, asks the journal for an index step. One pass at a time: it
    /// reads every shard's recency, picks the cut-off, then removes the users before it.
    fn evict_over_budget(&self) {
        let (Some(budget), Some(journal)) = (&self.budget, &self.journal) else {
            return;
        };
        if self.bytes() <= budget.max_bytes || self.evicting.swap(true, Ordering::Acquire) {
            return;
        }
        let indexed = journal.indexed();
        let mut candidates: Vec<(u64, usize)> = Vec::new();
        for shard in &self.shards {
            let shard = shard.read().unwrap_or_else(|e| e.into_inner());
            candidates.extend(
                shard
                    .users
                    .iter()
                    .filter(|(_, h)| h.written <= indexed)
                    .map(|(user, h)| (h.last_active.load(Ordering::Relaxed), h.bytes(user))),
            );
        }
        candidates.sort_unstable();
        let excess = self.bytes().saturating_sub(budget.max_bytes / 10 * 9);
        let (mut freed, mut cutoff) = (0usize, 0u64);
        for (active, bytes) in candidates {
            if freed >= excess {
                break;
            }
            freed += bytes;
            cutoff = active + 1;
        }
        if freed < excess {
            journal.index_soon();
        }
        let mut evicted = 0;
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(|e| e.into_inner());
            let leaving: Vec<Arc<str>> = shard
                .users
                .iter()
                .filter(|(_, h)| h.written <= indexed && h.last_active.load(Ordering::Relaxed) < cutoff)
                .map(|(user, _)| user.clone())
                .collect();
            evicted += leaving.len();
            for user in leaving {
                self.remove_locked(&mut shard, &user);
            }
        }
        self.evictions.fetch_add(evicted as u64, Ordering::Relaxed);
        self.evicting.store(false, Ordering::Release);
    }

    /// Drops every event older than `horizon` (Unix seconds) from memory, and the users left
    /// with none; each changed history gets a new version, so no cached state outlives it.
    fn expire_in_memory(&self, horizon: i64) -> Expired {
        let mut expired = Expired::default();
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(|e| e.into_inner());
            let mut emptied = Vec::new();
            for (user, history) in shard.users.iter_mut() {
                let old = history.events.partition_point(|e| e.timestamp < horizon);
                let (earlier_before, bytes_before) = (history.earlier.len(), history.earlier_bytes());
                history.retain_earlier(|_, earlier| earlier.newest >= horizon);
                let forgotten = earlier_before - history.earlier.len();
                if forgotten > 0 {
                    history.earlier.shrink_to_fit();
                    self.earlier_resized(bytes_before, history.earlier_bytes());
                }
                if old == 0 && forgotten == 0 {
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

    fn earlier_resized(&self, before: usize, after: usize) {
        if after >= before {
            self.earlier_bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.earlier_bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    fn remove_locked(&self, shard: &mut Shard, user: &str) -> Option<UserHistory> {
        let history = shard.users.remove(user)?;
        self.users.fetch_sub(1, Ordering::Relaxed);
        self.events.fetch_sub(history.events.len(), Ordering::Relaxed);
        self.earlier_bytes.fetch_sub(history.earlier_bytes(), Ordering::Relaxed);
        self.key_bytes.fetch_sub(user.len(), Ordering::Relaxed);
        Some(history)
    }
}

fn snapshot_of(history: &UserHistory) -> HistorySnapshot {
    let known = history.events.iter().filter(|e| e.item != 0);
    let known_earlier = history.earlier.values().filter(|e| e.item != 0);
    let mut earlier_items: Vec<u32> = known_earlier.map(|e| e.item).collect();
    earlier_items.sort_unstable();
    HistorySnapshot {
        earlier_items,
        version: history.version,
        items: known.clone().map(|e| e.item).collect(),
        timestamps: known.clone().map(|e| e.timestamp).collect(),
        types: known.map(|e| e.event_type).collect(),
        events: history.events.iter().cloned().collect(),
    }
}

impl HistoryStore for Histories {
    fn append(&self, writes: Vec<(Arc<str>, Vec<NewEvent>)>) -> Commit {
        let Some(journal) = &self.journal else {
            for (user, events) in writes {
                let mut shard = self.write_shard(&user);
                let history = self.entry(&mut shard.users, &user);
                self.apply(history, events.into_iter().map(|e| e.event), 0);
            }
            return Commit::done();
        };
        if let Err(error) = journal.health() {
            return Commit::failed(error);
        }
        let last = writes.len().saturating_sub(1);
        let mut commit = Commit::done();
        let mut logged = EncodedEvents::default();
        for (i, (user, events)) in writes.into_iter().enumerate() {
            logged.clear();
            logged.extend(&events);
            let mut shard = self.write_shard(&user);
            // An evicted user comes back first: the new events join the whole history.
            let history = match self.resident(&mut shard, &user, true) {
                Ok(history) => history.expect("created when absent"),
                Err(error) => return Commit::failed(error),
            };
            self.apply(history, events.into_iter().map(|e| e.event), self.tick());
            // The journal keeps order, so the last write's acknowledgement covers the others.
            let ticket = journal.append(&user, &logged, i == last);
            history.written = journal.queued();
            drop(shard);
            if let Some(ticket) = ticket {
                commit = ticket;
            }
        }
        self.evict_over_budget();
        commit
    }

    fn snapshot(&self, user: &str) -> Result<Option<HistorySnapshot>, StoreError> {
        {
            let shard = self.shard(user).read().unwrap_or_else(|e| e.into_inner());
            if let Some(history) = shard.users.get(user) {
                self.touch(history);
                return Ok(Some(snapshot_of(history)));
            }
            if self.budget.is_none() {
                return Ok(None);
            }
        }
        let mut shard = self.write_shard(user);
        let snapshot = self
            .resident(&mut shard, user, false)?
            .map(|history| snapshot_of(history));
        drop(shard);
        self.evict_over_budget();
        Ok(snapshot)
    }

    fn remove(&self, user: &str) -> Option<(u64, Commit)> {
        let mut shard = self.write_shard(user);
        // An evicted user is still on disk: read back so that its erasure is known and counted.
        let found = self.resident(&mut shard, user, false);
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        match found {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(error) => return Some((version, Commit::failed(error))),
        }
        self.remove_locked(&mut shard, user);
        // Still under the shard lock: the journal sees the erasure where memory did.
        let commit = match &self.journal {
            Some(journal) => {
                let commit = journal.erase(Arc::from(user));
                if self.budget.is_some() {
                    let committed = journal.committed();
                    shard.erasing.retain(|_, covered| *covered > committed);
                    shard.erasing.insert(Arc::from(user), journal.queued());
                }
                commit
            }
            None => Commit::done(),
        };
        Some((version, commit))
    }

    fn remap_items(&self, item: &ItemIndex<'_>) -> usize {
        let mut visited = 0;
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(|e| e.into_inner());
            for history in shard.users.values_mut() {
                for event in &mut history.events {
                    match item(&event.item_id) {
                        Some((index, id)) => (event.item, event.item_id) = (index, id),
                        None => event.item = 0,
                    }
                }
                // The map is rebuilt so that known items' keys are the new vocabulary's strings:
                // the old model's would otherwise stay alive, uncounted. Items the new model
                // does not know stay as unknown ones, within the bound.
                let before = history.earlier_bytes();
                let earlier = std::mem::take(&mut history.earlier);
                history.unknown_by_age.clear();
                history.unknown_earlier_bytes = 0;
                let mut by_age: Vec<(Arc<str>, EarlierItem)> = earlier
                    .into_iter()
                    .map(|(id, earlier)| match item(&id) {
                        Some((item, id)) => (id, EarlierItem { item, ..earlier }),
                        None => (id, EarlierItem { item: 0, ..earlier }),
                    })
                    .collect();
                by_age.sort_unstable_by_key(|(_, earlier)| earlier.newest);
                for (item_id, earlier) in by_age {
                    let event = StoredEvent {
                        item: earlier.item,
                        item_id,
                        timestamp: earlier.newest,
                        event_type: 0,
                    };
                    history.keep_earlier(event, self.capacity);
                }
                self.earlier_resized(before, history.earlier_bytes());
                visited += history.events.len();
            }
        }
        visited
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            users: self.users.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            bytes: self.bytes(),
            journal: self.journal.as_ref().map(Journal::totals),
            memory: MemoryTotals {
                evictions: self.evictions.load(Ordering::Relaxed),
                reloads: self.reloads.load(Ordering::Relaxed),
                reload_seconds: self.reload_micros.load(Ordering::Relaxed) as f64 / 1e6,
            },
        }
    }

    fn health(&self) -> Result<(), StoreError> {
        self.journal.as_ref().map_or(Ok(()), Journal::health)
    }

    fn expire(&self, horizon: i64) -> Expired {
        // Memory only: the journal drops the same events from disk at its retention compactions
        // (and leaves them out of reloads until then).
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
        store
            .append(vec![(Arc::from(user), events.to_vec())])
            .wait_blocking()
            .unwrap();
        // As after the next index step: the budget evicts only indexed users.
        if let Some(journal) = store.journal() {
            journal.index().wait_blocking().unwrap();
            store.evict_over_budget();
        }
        snap(store, user).version
    }

    fn snap(store: &Histories, user: &str) -> HistorySnapshot {
        store.snapshot(user).unwrap().expect("the user has a history")
    }

    #[test]
    fn out_of_order_events_are_inserted_in_time_order_and_ties_keep_arrival_order() {
        let store = Histories::new(4, 10);
        append(&store, "u", [ev(1, 100), ev(2, 300)]);
        append(&store, "u", [ev(3, 200), ev(4, 300), ev(5, 50)]);
        let snap = snap(&store, "u");
        assert_eq!(snap.items, [5, 1, 3, 2, 4]);
        assert_eq!(snap.timestamps, [50, 100, 200, 300, 300]);
    }

    #[test]
    fn capacity_keeps_the_newest_and_unknown_items_are_stored_but_not_model_input() {
        let store = Histories::new(2, 3);
        append(&store, "u", [ev(1, 1), ev(0, 2), ev(3, 3), ev(4, 4)]);
        let snap = snap(&store, "u");
        assert_eq!(snap.events.len(), 3);
        assert_eq!(snap.items, [3, 4]);
        assert_eq!(snap.events[0].item, 0);
        assert_eq!(store.stats().events, 3);
    }

    /// The bytes of an earlier-items table holding `n` items, as inserts grow it.
    fn earlier_table(n: u32) -> usize {
        let mut table = EarlierItems::default();
        for item in 0..n {
            table.insert(Arc::from(format!("i{item}")), EarlierItem { item, newest: 0 });
        }
        assert!(table.allocation_size() >= n as usize * std::mem::size_of::<(Arc<str>, EarlierItem)>());
        table.allocation_size()
    }

    #[test]
    fn items_pushed_out_by_the_cap_are_remembered_until_retention_forgets_them() {
        let store = Histories::new(2, 2);
        append(
            &store,
            "u",
            [ev(1, 10), ev(2, 20), ev(1, 30), ev(0, 35), ev(3, 40), ev(4, 50)],
        );
        let snap1 = snap(&store, "u");
        assert_eq!(snap1.items, [3, 4]);
        // Item 1 left twice (newest at 30), item 2 once; the unknown item ("i0") is kept by id
        // but is no index.
        assert_eq!(snap1.earlier_items, [1, 2]);
        assert_eq!(snap1.had_items(), [1, 2, 3, 4]);
        let unknown_id = "i0".len() + UNKNOWN_ORDER_BYTES;
        assert_eq!(
            store.stats().bytes,
            2 * EVENT_BYTES + earlier_table(3) + unknown_id + USER_BYTES + 1
        );
        // An event older than memory's goes straight to the earlier items.
        append(&store, "u", [ev(5, 5)]);
        assert_eq!(snap(&store, "u").earlier_items, [1, 2, 5]);
        // Another model's vocabulary re-resolves them by id; item 2 is unknown to it, so it
        // stays as an unknown one, like "i0".
        let vocabulary: HashMap<&str, Arc<str>> = ["i1", "i3", "i4", "i5"].map(|id| (id, Arc::from(id))).into();
        let remap = |id: &str| {
            let new = vocabulary.get(id)?;
            Some((new[1..].parse::<u32>().unwrap() + 10, new.clone()))
        };
        store.remap_items(&remap);
        assert_eq!(snap(&store, "u").earlier_items, [11, 15]);
        let keys_are_the_new_vocabularys = store.write_shard("u").users["u"]
            .earlier
            .iter()
            .filter(|(_, earlier)| earlier.item != 0)
            .all(|(id, _)| Arc::ptr_eq(id, &vocabulary[&**id]));
        assert!(
            keys_are_the_new_vocabularys,
            "the old model's strings are not kept alive"
        );
        let unknown_ids = "i0".len() + "i2".len() + 2 * UNKNOWN_ORDER_BYTES;
        assert_eq!(
            store.stats().bytes,
            2 * EVENT_BYTES + earlier_table(4) + unknown_ids + USER_BYTES + 1
        );
        // Retention forgets an item once its newest event is past the horizon: item 1's
        // newest (30) and "i0"'s (35) are kept at 25, item 5's (5) and item 2's (20) are not.
        let version = snap(&store, "u").version;
        store.expire(25);
        let after = snap(&store, "u");
        assert_eq!(
            (after.earlier_items.as_slice(), after.items.len()),
            ([11].as_slice(), 2)
        );
        assert!(after.version > version, "what is excluded changed");
        assert_eq!(
            store.stats().bytes,
            2 * EVENT_BYTES + earlier_table(2) + unknown_id + USER_BYTES + 1,
            "the table shrinks with what it forgot"
        );
        store.expire(36);
        assert_eq!(snap(&store, "u").earlier_items, [] as [u32; 0]);
        assert_eq!(store.stats().bytes, 2 * EVENT_BYTES + USER_BYTES + 1);
        store.remove("u");
        assert_eq!(store.stats().bytes, 0);
    }

    proptest::proptest! {
        /// The ordered set finds the same item to forget as a scan of every earlier item would
        /// (the oracle below, the rule written the slow way): for any sequence of items leaving
        /// memory, known and unknown, repeated, in any time order, the same items remain with
        /// the same newest times, and the bytes counted match what is held.
        #[test]
        fn the_bound_on_unknown_earlier_items_keeps_the_newest_as_a_scan_would(
            cap in 1usize..5,
            leaving in proptest::collection::vec((0u32..12, proptest::bool::ANY, 0i64..40), 0..60),
        ) {
            let mut history = UserHistory::default();
            let mut oracle: HashMap<String, (u32, i64)> = HashMap::new();
            for (n, known, timestamp) in leaving {
                let (item, id) = match known {
                    true => (n + 1, format!("k{n}")),
                    false => (0, format!("new-{n}")),
                };
                history.keep_earlier(StoredEvent { item, item_id: Arc::from(id.as_str()), timestamp, event_type: 1 }, cap);
                if let Some(kept) = oracle.get_mut(&id) {
                    kept.1 = kept.1.max(timestamp);
                    continue;
                }
                let unknown = oracle.iter().filter(|(_, (item, _))| *item == 0);
                if item == 0 && unknown.clone().count() >= cap {
                    // Ties on time: the set orders by id next, so the oracle does too.
                    let (oldest, newest) = unknown
                        .map(|(id, (_, newest))| (id.clone(), *newest))
                        .min_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)))
                        .unwrap();
                    if newest > timestamp {
                        continue;
                    }
                    oracle.remove(&oldest);
                }
                oracle.insert(id, (item, timestamp));
            }
            let held: HashMap<String, (u32, i64)> = history
                .earlier
                .iter()
                .map(|(id, earlier)| (id.to_string(), (earlier.item, earlier.newest)))
                .collect();
            proptest::prop_assert_eq!(&held, &oracle);
            let unknown: Vec<&String> = oracle.iter().filter(|(_, (item, _))| *item == 0).map(|(id, _)| id).collect();
            proptest::prop_assert_eq!(history.unknown_by_age.len(), unknown.len());
            let bytes: usize = unknown.iter().map(|id| id.len() + UNKNOWN_ORDER_BYTES).sum();
            proptest::prop_assert_eq!(history.unknown_earlier_bytes, bytes);
        }
    }

    /// Items a model did not know when the cap pushed them out (new items, ingested before a
    /// retrained model knew them) are left out once a reloaded model knows them: a hostile probe
    /// got them back with `exclude_seen` after such a reload. At most the cap's number of them
    /// is kept, the newest.
    #[test]
    fn unknown_items_pushed_out_are_left_out_once_a_new_model_knows_them() {
        let cap = 2;
        let store = Histories::new(1, cap);
        let unknown = |id: &str, ts: i64| NewEvent {
            event: StoredEvent {
                item: 0,
                item_id: Arc::from(id),
                timestamp: ts,
                event_type: 1,
            },
            type_id: None,
        };
        let news = ["new-a", "new-b", "new-c", "new-d", "new-e"];
        let mut events: Vec<NewEvent> = news.iter().zip(1..).map(|(id, ts)| unknown(id, ts)).collect();
        events.extend([ev(1, 10), ev(2, 11)]);
        store.append(vec![(Arc::from("u"), events)]).wait_blocking().unwrap();
        assert_eq!(
            snap(&store, "u").earlier_items,
            [] as [u32; 0],
            "not items of this model"
        );
        let knows_all = |id: &str| {
            let index = news.iter().position(|n| *n == id).map(|i| 100 + i as u32);
            index.map(|i| (i, Arc::from(id)))
        };
        store.remap_items(&knows_all);
        // new-d and new-e are the newest two of the five that left.
        assert_eq!(snap(&store, "u").earlier_items, [103, 104]);
        store.remove("u");
        assert_eq!(store.stats().bytes, 0, "every byte counted comes back");
    }

    #[test]
    fn expiry_drops_old_events_then_emptied_users_and_renews_versions() {
        let store = Histories::new(2, 10);
        let kept = append(&store, "kept", [ev(1, 100), ev(2, 200), ev(3, 300)]);
        append(&store, "gone", [ev(1, 50), ev(2, 150)]);
        let expired = store.expire(200);
        assert_eq!(expired, Expired { events: 3, users: 1 });
        let snap = snap(&store, "kept");
        assert_eq!(snap.timestamps, [200, 300]);
        assert!(snap.version > kept);
        assert_eq!(store.snapshot("gone"), Ok(None));
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
        assert_eq!(snap(&store, "a").version, v3);
        assert_eq!(store.stats().users, 2);
        assert!(store.remove("a").is_some_and(|(version, _)| version > v3));
        assert!(store.remove("a").is_none());
        assert_eq!(store.snapshot("a"), Ok(None));
        let stats = store.stats();
        assert_eq!((stats.users, stats.events), (1, 1));
        // A re-created user never reuses an old version.
        assert!(append(&store, "a", [ev(1, 1)]) > v3);
    }

    fn budgeted(dir: &std::path::Path, max_bytes: usize) -> Histories {
        let journal = Journal::open(super::super::JournalConfig::offline(dir.to_path_buf())).unwrap();
        let resolve = |logged: &LoggedEvent| StoredEvent {
            item: logged.item_id.trim_start_matches('i').parse().unwrap(),
            item_id: logged.item_id.clone(),
            timestamp: logged.timestamp,
            event_type: 1,
        };
        let store = Histories::with_journal(2, 4, Some(journal))
            .with_budget(MemoryBudget {
                max_bytes,
                resolve: Arc::new(resolve),
            })
            .unwrap();
        store.recover(resolve).unwrap();
        store
    }

    #[test]
    fn past_the_budget_the_least_recently_active_leave_memory_and_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let one_user = 4 * EVENT_BYTES + earlier_table(1) + USER_BYTES + 2;
        let store = budgeted(dir.path(), 3 * one_user);
        for user in 0..3 {
            append(
                &store,
                &format!("u{user}"),
                [ev(1, 10), ev(2, 20), ev(3, 30), ev(4, 40), ev(5, 50)],
            );
        }
        assert_eq!(store.stats().users, 3, "three fit");
        snap(&store, "u0"); // u0 is now more recently active than u1
        append(&store, "u3", [ev(7, 70)]);
        let stats = store.stats();
        assert!(stats.bytes <= 3 * one_user, "{stats:?}");
        assert!(stats.memory.evictions >= 1);
        // u1 was the least recently active: it left, u0 did not.
        let resident = |user: &str| store.write_shard(user).users.contains_key(user);
        assert!(!resident("u1") && resident("u0"));
        // Read back on its next request, exactly as it was (capped to the newest 4).
        let back = snap(&store, "u1");
        assert_eq!(back.timestamps, [20, 30, 40, 50]);
        assert_eq!(back.items, [2, 3, 4, 5]);
        assert_eq!(store.stats().memory.reloads, 1);
        // An evicted user's new events join its whole history.
        for _ in 0..5 {
            snap(&store, "u0");
            snap(&store, "u1");
            append(&store, "u3", [ev(8, 80)]);
        }
        assert!(!resident("u2"), "the least recently active");
        append(&store, "u2", [ev(6, 25)]);
        assert_eq!(snap(&store, "u2").timestamps, [25, 30, 40, 50]);
    }

    #[test]
    fn only_indexed_users_leave_memory_and_the_budget_asks_for_the_index_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = budgeted(dir.path(), 1);
        let journal = store.journal().unwrap().clone();
        store
            .append(vec![(Arc::from("u"), vec![ev(1, 10), ev(2, 20)])])
            .wait_blocking()
            .unwrap();
        let resident = |user: &str| store.write_shard(user).users.contains_key(user);
        assert!(resident("u"), "committed, not indexed: a reload would miss the events");
        // Asked for by that append's eviction pass, well before the index step's own delay.
        let asked = Instant::now();
        while journal.indexed() < journal.queued() {
            assert!(
                asked.elapsed() < super::super::journal::INDEX_DELAY / 2,
                "no index step was asked for"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        store.evict_over_budget();
        assert!(!resident("u"));
        assert_eq!(snap(&store, "u").timestamps, [10, 20], "read back whole");
    }

    #[test]
    fn an_evicted_user_can_be_erased_and_is_never_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = budgeted(dir.path(), 1); // nothing may stay once committed
        append(&store, "gone", [ev(1, 10)]);
        append(&store, "other", [ev(2, 20)]);
        snap(&store, "other");
        let (_, commit) = store.remove("gone").expect("on disk though not in memory");
        commit.wait_blocking().unwrap();
        assert_eq!(store.snapshot("gone"), Ok(None));
        assert!(store.remove("gone").is_none());
        assert_eq!(store.journal().unwrap().load("gone").unwrap(), []);
    }

    #[test]
    fn a_budget_without_a_journal_is_refused() {
        let refused = Histories::new(1, 1).with_budget(MemoryBudget {
            max_bytes: 1,
            resolve: Arc::new(|_| unreachable!()),
        });
        assert!(refused.err().unwrap().to_string().contains("--data-dir"));
    }
}
