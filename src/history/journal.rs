//! The durable journal: every acknowledged event, kept in fjall (an LSM storage engine with its
//! own write-ahead log) until the user is erased. One writer thread turns whatever queued while it
//! was busy into one write batch, so concurrent requests share one write and, with
//! `--fsync always`, one fsync (group commit).
//!
//! Why fjall and not redb (docs/RELIABILITY.md has the measurements): fjall separates "written to
//! the OS" from "fsynced" (`PersistMode::Buffer` vs `SyncData`), which is exactly Redis's
//! appendfsync contract — with `interval` a killed process loses nothing and a power cut at most
//! the interval. A redb commit without fsync is rolled back by its crash recovery, so `interval`
//! would lose acknowledged events on a plain kill.
//!
//! Layout: one keyspace, `records`, keyed by a sequence number (u64 BE), so iteration order is
//! arrival order. A record is either a run of appends — everything one group commit wrote, as
//! (user, events) groups in the order memory applied them — or an erasure marker for one user.
//! One fjall insert per group commit (not per event) keeps the journal's cost per event small.
//! Recovery replays the records in order, which rebuilds exactly the histories the live appends
//! built; compaction rewrites the records without what erasures removed.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::oneshot;

use super::{Commit, JournalTotals, NewEvent, StoreError};

/// When acknowledged events reach the disk itself (they always reach the OS before the ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncPolicy {
    /// Acknowledge only after an fsync; concurrent writers share one.
    Always,
    /// fsync at most every `--fsync-interval-ms`: a power cut loses at most that window.
    Interval,
    /// Leave flushing to the OS.
    Never,
}

#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub fsync_interval: Duration,
    /// How soon after an erasure the files are compacted, so that the erased user's bytes leave
    /// the disk (erasures in the meantime share the compaction).
    pub erasure_compaction_delay: Duration,
    /// Events older than this (by their timestamp, against the clock) are dropped at recovery and
    /// by compactions, which then run every quarter of it (between 1 s and 1 h). `None`: kept
    /// until erased.
    pub retention: Option<Duration>,
}

impl JournalConfig {
    /// For offline tools (import, export, compact): fsync at the end, compact when asked.
    pub fn offline(dir: PathBuf) -> Self {
        Self {
            dir,
            fsync: FsyncPolicy::Never,
            fsync_interval: Duration::from_secs(1),
            erasure_compaction_delay: Duration::from_secs(60),
            retention: None,
        }
    }

    /// The oldest timestamp retention keeps now.
    pub fn retention_horizon(&self) -> Option<i64> {
        self.retention.map(super::retention_horizon)
    }

    /// How often retention compactions run.
    fn retention_every(&self) -> Option<Duration> {
        self.retention
            .map(|keep| (keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600)))
    }
}

/// An event as the journal keeps it: external ids only, so it outlives any model's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub item_id: Arc<str>,
    pub timestamp: i64,
    pub event_type: Option<Arc<str>>,
}

impl From<&NewEvent> for LoggedEvent {
    fn from(new: &NewEvent) -> Self {
        Self {
            item_id: new.event.item_id.clone(),
            timestamp: new.event.timestamp,
            event_type: new.type_id.clone(),
        }
    }
}

type Ack = oneshot::Sender<Result<(), StoreError>>;

enum JournalCommand {
    Append {
        user: Arc<str>,
        events: Vec<LoggedEvent>,
        ack: Option<Ack>,
    },
    Erase {
        user: Arc<str>,
        ack: Ack,
    },
    /// Flush, fsync and merge everything on disk, dropping erased users' bytes from every file.
    Compact {
        ack: Ack,
    },
}

#[derive(Debug, Default)]
struct JournalStats {
    batches: AtomicU64,
    events: AtomicU64,
    fsyncs: AtomicU64,
    fsync_micros: AtomicU64,
}

/// The open fjall database and its two keyspaces (cheap handles; clones share them).
#[derive(Clone)]
struct Store {
    db: Database,
    records: Keyspace,
}

impl Store {
    fn open(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| io_error(path, e))?;
        let db = Database::builder(path)
            // Acknowledgement is ours to decide (see `FsyncPolicy`), batch by batch.
            .manual_journal_persist(true)
            .open()
            .map_err(|e| fjall_error(path, e))?;
        let uncompressed = || {
            // Compression would hide an erased user's id from a byte search of the files (the
            // erasure test's evidence), and costs CPU on the ingest path.
            KeyspaceCreateOptions::default()
                .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
                .manual_journal_persist(true)
        };
        let records = db.keyspace("records", uncompressed).map_err(|e| fjall_error(path, e))?;
        Ok(Self { db, records })
    }

    /// One past the newest record's sequence number.
    fn next_seq(&self, path: &Path) -> Result<u64, StoreError> {
        match self.records.last_key_value() {
            None => Ok(0),
            Some(entry) => {
                let key = entry.key().map_err(|e| fjall_error(path, e))?;
                Ok(decode_seq(&key).ok_or_else(|| corrupt(path, "a record key is not 8 bytes"))? + 1)
            }
        }
    }
}

/// The store's directories inside the data directory: the live one, a compaction's copy being
/// written, and the copy it replaced. Only a finished, fsynced copy is ever renamed to live.
fn live_dir(dir: &Path) -> PathBuf {
    dir.join("journal")
}
fn fresh_dir(dir: &Path) -> PathBuf {
    dir.join("journal.compacting")
}
fn retired_dir(dir: &Path) -> PathBuf {
    dir.join("journal.retired")
}

/// Finishes or undoes a compaction that a crash interrupted.
fn settle_interrupted_compaction(dir: &Path) -> Result<(), StoreError> {
    let (live, fresh, retired) = (live_dir(dir), fresh_dir(dir), retired_dir(dir));
    if !live.exists() && fresh.exists() {
        // The crash fell between the two renames: the copy is complete.
        std::fs::rename(&fresh, &live).map_err(|e| io_error(&fresh, e))?;
    }
    for leftover in [fresh, retired] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover).map_err(|e| io_error(&leftover, e))?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

struct Shared {
    /// `None` only inside a compaction's swap (under the write lock), after it failed, or after
    /// [`Journal::close`].
    store: RwLock<Option<Store>>,
    next_seq: AtomicU64,
    failure: OnceLock<String>,
    stats: JournalStats,
    config: JournalConfig,
}

/// Handle to the journal; clones share the one writer thread.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
    commands: Arc<Mutex<Option<mpsc::Sender<JournalCommand>>>>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

const NO_TYPE: u16 = u16::MAX;
/// The writer takes at most this many queued commands into one batch.
const MAX_GROUP: usize = 4096;

impl Journal {
    /// Opens (or creates) the journal in `config.dir` and starts its writer thread. fjall replays
    /// its own write-ahead log here; a torn tail from a crash is cut at the last whole record.
    pub fn open(config: JournalConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| io_error(&config.dir, e))?;
        settle_interrupted_compaction(&config.dir)?;
        let path = live_dir(&config.dir);
        let store = Store::open(&path)?;
        let next_seq = store.next_seq(&path)?;
        let shared = Arc::new(Shared {
            store: RwLock::new(Some(store)),
            next_seq: AtomicU64::new(next_seq),
            failure: OnceLock::new(),
            stats: JournalStats::default(),
            config,
        });
        let (sender, receiver) = mpsc::channel();
        let writer = shared.clone();
        let writer = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || JournalWriter::new(writer).run(receiver))
            .map_err(|e| StoreError::Journal(format!("spawning the journal writer: {e}")))?;
        Ok(Self {
            shared,
            commands: Arc::new(Mutex::new(Some(sender))),
            writer: Arc::new(Mutex::new(Some(writer))),
        })
    }

    pub fn retention_horizon(&self) -> Option<i64> {
        self.shared.config.retention_horizon()
    }

    pub fn config(&self) -> &JournalConfig {
        &self.shared.config
    }

    pub fn totals(&self) -> JournalTotals {
        let stats = &self.shared.stats;
        JournalTotals {
            batches: stats.batches.load(Ordering::Relaxed),
            events: stats.events.load(Ordering::Relaxed),
            fsyncs: stats.fsyncs.load(Ordering::Relaxed),
            fsync_seconds: stats.fsync_micros.load(Ordering::Relaxed) as f64 / 1e6,
            disk_bytes: self.shared.store().map_or(0, |s| s.db.disk_space().unwrap_or(0)),
        }
    }

    pub fn health(&self) -> Result<(), StoreError> {
        match self.shared.failure.get() {
            Some(message) => Err(StoreError::Journal(message.clone())),
            None => Ok(()),
        }
    }

    fn send(&self, command: JournalCommand) -> bool {
        let commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        commands.as_ref().is_some_and(|c| c.send(command).is_ok())
    }

    /// Queues `events` for `user`; with `acknowledge`, the returned commit resolves once they
    /// (and everything queued before them) are written.
    pub fn append(&self, user: Arc<str>, events: Vec<LoggedEvent>, acknowledge: bool) -> Option<Commit> {
        let (ack, commit) = match acknowledge {
            true => {
                let (sender, receiver) = oneshot::channel();
                (Some(sender), Some(Commit::pending(receiver)))
            }
            false => (None, None),
        };
        if !self.send(JournalCommand::Append { user, events, ack }) {
            return Some(Commit::failed(StoreError::Stopped));
        }
        commit
    }

    pub fn erase(&self, user: Arc<str>) -> Commit {
        self.request(|ack| JournalCommand::Erase { user, ack })
    }

    /// Merges the files so that erased users leave no byte behind (see [`JournalCommand::Compact`]).
    pub fn compact(&self) -> Commit {
        self.request(|ack| JournalCommand::Compact { ack })
    }

    fn request(&self, command: impl FnOnce(Ack) -> JournalCommand) -> Commit {
        let (sender, receiver) = oneshot::channel();
        if !self.send(command(sender)) {
            return Commit::failed(StoreError::Stopped);
        }
        Commit::pending(receiver)
    }

    /// Stops the writer once everything queued is written and fsynced, and waits for it; later
    /// writes fail with [`StoreError::Stopped`].
    pub fn close(&self) {
        self.commands.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writer.join();
        }
        // Releases the files (and fjall's lock on them) for another process or a reopen.
        if let Some(store) = self.shared.store.write().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = store.db.persist(PersistMode::SyncAll);
        }
    }

    /// Every record in arrival order: what [`Histories::recover`](super::Histories::recover)
    /// replays, and what export reads.
    pub fn replay(&self, mut apply: impl FnMut(Replayed<'_>)) -> Result<u64, StoreError> {
        let path = &self.shared.config.dir;
        let mut records = 0u64;
        for entry in self.shared.store()?.records.iter() {
            let (_, value) = entry.into_inner().map_err(|e| fjall_error(path, e))?;
            decode_record(&value, &mut apply).ok_or_else(|| corrupt(path, "a journal record is malformed"))?;
            records += 1;
        }
        Ok(records)
    }
}

/// One replayed change.
pub enum Replayed<'a> {
    Append(&'a str, Vec<LoggedEvent>),
    Erase(&'a str),
}

impl Shared {
    fn store(&self) -> Result<Store, StoreError> {
        self.store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Journal("the store is closed (shut down, or a compaction failed)".into()))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(store) = self.store() {
            let _ = store.db.persist(PersistMode::SyncAll);
        }
    }
}

/// The thread that owns all writes.
struct JournalWriter {
    shared: Arc<Shared>,
    /// Written to the OS but not yet fsynced.
    dirty: bool,
    last_sync: Instant,
    /// When the compaction owed to an erasure is due.
    compaction_due: Option<Instant>,
    /// When the next retention compaction is due.
    retention_due: Option<Instant>,
}

impl JournalWriter {
    fn new(shared: Arc<Shared>) -> Self {
        let retention_due = shared.config.retention_every().map(|every| Instant::now() + every);
        Self {
            shared,
            dirty: false,
            last_sync: Instant::now(),
            compaction_due: None,
            retention_due,
        }
    }

    fn run(mut self, commands: mpsc::Receiver<JournalCommand>) {
        loop {
            let received = match self.next_deadline() {
                Some(deadline) => commands.recv_timeout(deadline.saturating_duration_since(Instant::now())),
                None => commands.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(first) => {
                    let mut group = vec![first];
                    group.extend(commands.try_iter().take(MAX_GROUP - 1));
                    self.execute(group);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.run_due_work(),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Err(error) = self.sync() {
            self.fail(&error);
        }
    }

    /// The earliest of a pending fsync (`interval`), a pending erasure compaction and the next
    /// retention compaction.
    fn next_deadline(&self) -> Option<Instant> {
        let config = &self.shared.config;
        let sync =
            (self.dirty && config.fsync == FsyncPolicy::Interval).then(|| self.last_sync + config.fsync_interval);
        [sync, self.compaction_due, self.retention_due]
            .into_iter()
            .flatten()
            .min()
    }

    fn run_due_work(&mut self) {
        let now = Instant::now();
        let mut result = Ok(());
        let due = |at: Option<Instant>| at.is_some_and(|due| due <= now);
        if due(self.compaction_due) || due(self.retention_due) {
            result = self.compact();
        } else if self.dirty && self.shared.config.fsync == FsyncPolicy::Interval {
            result = self.sync();
        }
        if let Err(error) = result {
            self.fail(&error);
        }
    }

    fn execute(&mut self, group: Vec<JournalCommand>) {
        let mut acks = Vec::new();
        let mut store = match self.shared.store() {
            Ok(store) => store,
            Err(error) => {
                self.fail(&error);
                return reply_all(group, &Err(error));
            }
        };
        let mut batch = store.db.batch();
        let mut appends = Vec::new();
        let mut result = self.health();
        for command in group {
            match command {
                JournalCommand::Append { user, events, ack } => {
                    if result.is_ok() {
                        encode_group(&mut appends, &user, &events);
                        self.shared
                            .stats
                            .events
                            .fetch_add(events.len() as u64, Ordering::Relaxed);
                        if appends.len() >= MAX_RECORD_BYTES {
                            self.stage(&store, &mut batch, RECORD_APPEND, &mut appends);
                        }
                    }
                    acks.extend(ack);
                }
                JournalCommand::Erase { user, ack } => {
                    // After the appends before it, so that replay removes exactly what was there.
                    self.stage(&store, &mut batch, RECORD_APPEND, &mut appends);
                    let mut marker = Vec::new();
                    put_str(&mut marker, &user);
                    self.stage(&store, &mut batch, RECORD_ERASE, &mut marker);
                    let delay = self.shared.config.erasure_compaction_delay;
                    self.compaction_due.get_or_insert_with(|| Instant::now() + delay);
                    acks.push(ack);
                }
                JournalCommand::Compact { ack } => {
                    self.stage(&store, &mut batch, RECORD_APPEND, &mut appends);
                    result = result
                        .and_then(|()| self.commit(std::mem::replace(&mut batch, store.db.batch())))
                        .and_then(|()| self.compact());
                    // Later commands of this group go to the compacted store.
                    match self.shared.store() {
                        Ok(compacted) => store = compacted,
                        Err(error) => result = Err(error),
                    }
                    batch = store.db.batch();
                    acks.push(ack);
                }
            }
        }
        self.stage(&store, &mut batch, RECORD_APPEND, &mut appends);
        let result = result
            .and_then(|()| self.commit(batch))
            .and_then(|()| match self.shared.config.fsync {
                FsyncPolicy::Always => self.sync(),
                FsyncPolicy::Interval if self.last_sync.elapsed() >= self.shared.config.fsync_interval => self.sync(),
                _ => Ok(()),
            });
        if let Err(error) = &result {
            self.fail(error);
        }
        for ack in acks {
            let _ = ack.send(result.clone());
        }
    }

    /// Adds `body` (emptied) to the batch as the next record, unless it is empty.
    fn stage(&self, store: &Store, batch: &mut fjall::OwnedWriteBatch, kind: u8, body: &mut Vec<u8>) {
        if body.is_empty() {
            return;
        }
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut record = Vec::with_capacity(1 + body.len());
        record.push(kind);
        record.append(body);
        batch.insert(&store.records, seq.to_be_bytes().to_vec(), record);
    }

    /// Writes the batch to fjall's log and pushes it to the OS (survives a killed process).
    fn commit(&mut self, batch: fjall::OwnedWriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let path = &self.shared.config.dir;
        batch
            .durability(Some(PersistMode::Buffer))
            .commit()
            .map_err(|e| fjall_error(path, e))?;
        self.shared.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.dirty = true;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if !self.dirty {
            return Ok(());
        }
        let started = Instant::now();
        self.shared
            .store()?
            .db
            .persist(PersistMode::SyncData)
            .map_err(|e| fjall_error(&self.shared.config.dir, e))?;
        let stats = &self.shared.stats;
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        stats
            .fsync_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Rewrites the records into a fresh store without the events that erasures removed (nor the
    /// markers) or that are past retention, swaps it in and removes the old store whole: afterwards no file holds an erased
    /// user's bytes. Costs one pass over the
    /// live data, during which writes wait (reads are served from memory).
    fn compact(&mut self) -> Result<(), StoreError> {
        self.compaction_due = None;
        self.retention_due = self.shared.config.retention_every().map(|every| Instant::now() + every);
        let horizon = self.shared.config.retention_horizon().unwrap_or(i64::MIN);
        self.dirty = true;
        self.sync()?;
        let dir = self.shared.config.dir.clone();
        let (live, fresh, retired) = (live_dir(&dir), fresh_dir(&dir), retired_dir(&dir));
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh).map_err(|e| io_error(&fresh, e))?;
        }
        {
            let copy = Store::open(&fresh)?;
            let mut batch = copy.db.batch();
            // Newest first: an erasure marker is met before the events it removes.
            let mut erased: std::collections::HashSet<Arc<str>> = std::collections::HashSet::new();
            for entry in self.shared.store()?.records.iter().rev() {
                let (key, value) = entry.into_inner().map_err(|e| fjall_error(&live, e))?;
                let mut kept = Vec::new();
                let mut changed = false;
                decode_record(&value, &mut |change| match change {
                    Replayed::Erase(user) => {
                        erased.insert(Arc::from(user));
                        changed = true;
                    }
                    Replayed::Append(user, events) if !erased.contains(user) => {
                        let before = events.len();
                        let events: Vec<LoggedEvent> = events.into_iter().filter(|e| e.timestamp >= horizon).collect();
                        changed |= events.len() < before;
                        if !events.is_empty() {
                            encode_group(&mut kept, user, &events);
                        }
                    }
                    Replayed::Append(..) => changed = true,
                })
                .ok_or_else(|| corrupt(&live, "a journal record is malformed"))?;
                match (changed, kept.is_empty()) {
                    (false, _) => batch.insert(&copy.records, key, value),
                    (true, true) => {}
                    (true, false) => {
                        kept.insert(0, RECORD_APPEND);
                        batch.insert(&copy.records, key, kept);
                    }
                }
                if batch.len() >= 1_000 {
                    batch.commit().map_err(|e| fjall_error(&fresh, e))?;
                    batch = copy.db.batch();
                }
            }
            batch.commit().map_err(|e| fjall_error(&fresh, e))?;
            copy.db
                .persist(PersistMode::SyncAll)
                .map_err(|e| fjall_error(&fresh, e))?;
        }
        let mut store = self.shared.store.write().unwrap_or_else(|e| e.into_inner());
        // Readers only clone the handles under the read lock, so none sees the gap.
        drop(store.take()); // fjall joins its threads when the last handle goes
        std::fs::rename(&live, &retired).map_err(|e| io_error(&live, e))?;
        // From here a crash leaves the copy complete and `live` missing: open() finishes the swap.
        std::fs::rename(&fresh, &live).map_err(|e| io_error(&fresh, e))?;
        sync_dir(&dir)?;
        *store = Some(Store::open(&live)?);
        drop(store);
        std::fs::remove_dir_all(&retired).map_err(|e| io_error(&retired, e))?;
        Ok(())
    }

    fn health(&self) -> Result<(), StoreError> {
        match self.shared.failure.get() {
            Some(message) => Err(StoreError::Journal(message.clone())),
            None => Ok(()),
        }
    }

    fn fail(&self, error: &StoreError) {
        let _ = self.shared.failure.set(error.to_string());
    }
}

fn reply_all(group: Vec<JournalCommand>, result: &Result<(), StoreError>) {
    for command in group {
        let ack = match command {
            JournalCommand::Append { ack, .. } => ack,
            JournalCommand::Erase { ack, .. } | JournalCommand::Compact { ack } => Some(ack),
        };
        if let Some(ack) = ack {
            let _ = ack.send(result.clone());
        }
    }
}

const RECORD_APPEND: u8 = 0;
const RECORD_ERASE: u8 = 1;
/// A run of appends is cut into records of about this size.
const MAX_RECORD_BYTES: usize = 1 << 20;

fn decode_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// One user's events of an append record: user, count (u32 BE), then per event timestamp
/// (i64 BE), type (length u16 BE, `u16::MAX` for none, then bytes) and item id (length, bytes).
/// (Public for the storage-engine bench, so that both engines store the very same bytes.)
pub fn encode_group(out: &mut Vec<u8>, user: &str, events: &[LoggedEvent]) {
    put_str(out, user);
    out.extend_from_slice(&(events.len() as u32).to_be_bytes());
    for event in events {
        out.extend_from_slice(&event.timestamp.to_be_bytes());
        match &event.event_type {
            Some(kind) => put_str(out, kind),
            None => out.extend_from_slice(&NO_TYPE.to_be_bytes()),
        }
        put_str(out, &event.item_id);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str_of(&mut self, len: u16) -> Option<&'a str> {
        std::str::from_utf8(self.take(len as usize)?).ok()
    }
    fn str(&mut self) -> Option<&'a str> {
        let len = self.u16()?;
        self.str_of(len)
    }
}

/// Calls `apply` for each change in the record; `None` if it is malformed. (Public for the fuzz
/// target that feeds it arbitrary bytes.)
pub fn decode_record(record: &[u8], apply: &mut impl FnMut(Replayed<'_>)) -> Option<()> {
    let (&kind, body) = record.split_first()?;
    let mut reader = Reader(body);
    match kind {
        RECORD_ERASE => {
            let user = reader.str()?;
            reader.0.is_empty().then(|| apply(Replayed::Erase(user)))
        }
        RECORD_APPEND => {
            while !reader.0.is_empty() {
                let user = reader.str()?;
                let count = reader.u32()? as usize;
                let mut events = Vec::with_capacity(count.min(reader.0.len() / 12));
                for _ in 0..count {
                    let timestamp = reader.i64()?;
                    let event_type = match reader.u16()? {
                        NO_TYPE => None,
                        len => Some(Arc::from(reader.str_of(len)?)),
                    };
                    let item_id = Arc::from(reader.str()?);
                    events.push(LoggedEvent {
                        item_id,
                        timestamp,
                        event_type,
                    });
                }
                apply(Replayed::Append(user, events));
            }
            Some(())
        }
        _ => None,
    }
}

fn io_error(path: &Path, error: std::io::Error) -> StoreError {
    StoreError::Journal(format!("{}: {error}", path.display()))
}

fn fjall_error(path: &Path, error: fjall::Error) -> StoreError {
    StoreError::Journal(format!("{}: {error}", path.display()))
}

fn corrupt(path: &Path, what: &str) -> StoreError {
    StoreError::Journal(format!(
        "{}: {what}; the data directory is damaged (restore it from a backup, or move it away to start empty)",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn logged_event() -> impl Strategy<Value = LoggedEvent> {
        (".{1,12}", any::<i64>(), proptest::option::of(".{1,8}")).prop_map(|(item, timestamp, kind)| LoggedEvent {
            item_id: Arc::from(item),
            timestamp,
            event_type: kind.map(Arc::from),
        })
    }

    proptest! {
        /// Recovery reads whatever bytes the disk gives back: garbage is refused, never a panic.
        #[test]
        fn any_bytes_are_decoded_or_refused_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let mut changes = 0;
            let _ = decode_record(&bytes, &mut |_| changes += 1);
        }

        #[test]
        fn append_records_decode_to_what_was_encoded(
            groups in prop::collection::vec((".{1,16}", prop::collection::vec(logged_event(), 0..6)), 1..5)
        ) {
            let mut record = vec![RECORD_APPEND];
            for (user, events) in &groups {
                encode_group(&mut record, user, events);
            }
            let mut decoded = Vec::new();
            let outcome = decode_record(&record, &mut |change| match change {
                Replayed::Append(user, events) => decoded.push((user.to_owned(), events)),
                Replayed::Erase(_) => panic!("an append record holds no erasure"),
            });
            prop_assert!(outcome.is_some());
            prop_assert_eq!(&decoded, &groups);
            // Cut anywhere, the record never reads as complete (cut between two groups it reads
            // as fewer: fjall's checksum on every value is what catches that).
            for cut in 1..record.len() {
                let mut tail_groups = 0;
                let whole = decode_record(&record[..cut], &mut |_| tail_groups += 1).is_some();
                prop_assert!(!whole || tail_groups < groups.len(), "cut at {} read as complete", cut);
            }
        }
    }

    fn event(item: &str, timestamp: i64, kind: Option<&str>) -> LoggedEvent {
        LoggedEvent {
            item_id: Arc::from(item),
            timestamp,
            event_type: kind.map(Arc::from),
        }
    }

    /// Per user, what replay leaves: appends in order, erasures removing.
    fn logged(journal: &Journal) -> Vec<(String, Vec<LoggedEvent>)> {
        let mut all: Vec<(String, Vec<LoggedEvent>)> = Vec::new();
        journal
            .replay(|change| match change {
                Replayed::Append(user, events) => match all.iter_mut().find(|(u, _)| u == user) {
                    Some((_, kept)) => kept.extend(events),
                    None => all.push((user.to_owned(), events)),
                },
                Replayed::Erase(user) => all.retain(|(u, _)| u != user),
            })
            .unwrap();
        all
    }

    #[test]
    fn appends_survive_reopening_in_order_and_erasures_survive_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let config = JournalConfig::offline(dir.path().to_path_buf());
        let (gone, kept) = ("erase-me-7f3a9c", "keep-me-41d0e2");
        let journal = Journal::open(config.clone()).unwrap();
        for round in 0..3 {
            for user in [gone, kept] {
                let events = vec![event(&format!("item-{round}"), 100 - round, Some("view"))];
                let _ = journal.append(Arc::from(user), events, false);
            }
        }
        journal
            .append(Arc::from(kept), vec![event("last", 5, None)], true)
            .unwrap()
            .wait_blocking()
            .unwrap();
        journal.erase(Arc::from(gone)).wait_blocking().unwrap();
        journal.compact().wait_blocking().unwrap();
        journal.close();

        let reopened = Journal::open(config).unwrap();
        let users = logged(&reopened);
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].0, kept);
        let items: Vec<&str> = users[0].1.iter().map(|e| &*e.item_id).collect();
        assert_eq!(items, ["item-0", "item-1", "item-2", "last"], "arrival order");
        // New events go after the recovered ones.
        reopened
            .append(Arc::from(kept), vec![event("after", 1, None)], true)
            .unwrap()
            .wait_blocking()
            .unwrap();
        assert_eq!(logged(&reopened)[0].1.last().unwrap().item_id.as_ref(), "after");
        reopened.close();
    }

    #[test]
    fn records_round_trip_including_odd_ids_and_malformed_ones_are_refused() {
        let groups = vec![
            (
                "Toy Story fan, \"x\"".to_owned(),
                vec![event("Toy Story (1995)", -5, None), event("i", i64::MAX, Some(""))],
            ),
            ("é".to_owned(), vec![event("é,\"x\"", 0, Some("purchase"))]),
        ];
        let mut record = vec![RECORD_APPEND];
        for (user, events) in &groups {
            encode_group(&mut record, user, events);
        }
        let mut seen = Vec::new();
        decode_record(&record, &mut |change| match change {
            Replayed::Append(user, events) => seen.push((user.to_owned(), events)),
            Replayed::Erase(_) => panic!("no erasure here"),
        })
        .unwrap();
        assert_eq!(seen, groups);
        // A cut record is refused, unless it falls between groups: then it reads as fewer groups.
        for cut in 1..record.len() {
            let mut prefix = Vec::new();
            let decoded = decode_record(&record[..cut], &mut |change| {
                if let Replayed::Append(user, events) = change {
                    prefix.push((user.to_owned(), events));
                }
            });
            if decoded.is_some() {
                assert!(
                    prefix.len() < groups.len() && groups.starts_with(&prefix),
                    "cut at {cut}"
                );
            }
        }
        let mut marker = vec![RECORD_ERASE];
        put_str(&mut marker, "gone");
        let mut erased = None;
        decode_record(&marker, &mut |change| {
            if let Replayed::Erase(user) = change {
                erased = Some(user.to_owned());
            }
        })
        .unwrap();
        assert_eq!(erased.as_deref(), Some("gone"));
        assert!(decode_record(&[7, 0, 0], &mut |_| {}).is_none(), "unknown kind");
    }
}
