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
//! Layout (format 4): keyspace `events` holds per-user entries: the key is the user id (u16 BE
//! length, bytes) then a sequence number (u64 BE; that of the first log record the entry was
//! made from), the value that user's events. A user's
//! entries are therefore adjacent and in arrival order: recovery reads users one after another,
//! and a user who left memory (`--max-memory-bytes`) is read back with one prefix scan.
//! Writing an entry per user as calls come is what random keys cost most (a memtable search per
//! user and call), so each group commit goes to keyspace `log` as one record under a sequential
//! key, and an index step (at [`INDEX_BYTES`] of pending records or after [`INDEX_DELAY`], before
//! an erasure, a compaction, a stop, and when the memory budget asks) turns the pending records
//! into one entry per user, in key order, and deletes them (a step on the indexer commits its
//! entries in parts, the last of which deletes the records: see [`index_records`]). Steps due by size or
//! age run on a second thread (the indexer) while the writer goes on logging and acknowledging;
//! the others run on the writer, after the step in flight. The writer keeps no
//! per-user map of the pending appends: an index step groups the records' bytes by user as they
//! are, and until it has run, the user is still in memory (the memory budget evicts only users
//! whose appends are indexed), so readers need only the entries. A start indexes what a killed
//! writer left in the log. Keyspace `meta` holds the layout's format number and the next sequence
//! number (written in the same batch as the appends). An erasure deletes the user's entries
//! (after an index step, so no log record still holds the user);
//! compaction rewrites the live entries into a fresh store, so that no file keeps the erased
//! bytes.
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use byteview::ByteView;
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
    /// An index step starts once the pending log records hold this many bytes (or the oldest
    /// is [`INDEX_DELAY`] old): [`INDEX_BYTES`] unless a test wants many steps.
    pub index_bytes: usize,
    /// Nice value of the index steps' thread (0..=19). A step is minutes of CPU an hour of
    /// ingest, none of it owed to a waiting request: at the default priority its steps took the
    /// core from the request handlers (interval ingest p99 doubled, docs/RELIABILITY.md), so a
    /// server runs it at its HTTP threads' value.
    pub background_nice: i32,
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
            index_bytes: INDEX_BYTES,
            background_nice: 0,
        }
    }

    /// The oldest timestamp retention keeps now.
    pub fn retention_horizon(&self) -> Option<i64> {
        self.retention.map(super::retention_horizon)
    }

    /// How many entries a background index step commits at a time ([`index_records`]): 4,096 at
    /// the default step size, and proportionally fewer with the small steps of tests, so that
    /// their steps are split too.
    fn index_part_entries(&self) -> usize {
        (self.index_bytes >> 14).max(1)
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

/// One append's events as the journal writes them ([`put_event`] each): encoded by the caller, on
/// the caller's thread, so that the writer only copies bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedEvents {
    count: u32,
    bytes: Vec<u8>,
}

impl EncodedEvents {
    pub fn push(&mut self, timestamp: i64, event_type: Option<&str>, item_id: &str) {
        put_event(&mut self.bytes, timestamp, event_type, item_id);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Empty again, keeping the buffer (a caller encodes one user after another into it).
    pub fn clear(&mut self) {
        self.count = 0;
        self.bytes.clear();
    }

    /// Count (u32 BE), then the events.
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.bytes);
    }
}

impl From<&[LoggedEvent]> for EncodedEvents {
    fn from(events: &[LoggedEvent]) -> Self {
        let mut encoded = Self::default();
        for event in events {
            encoded.push(event.timestamp, event.event_type.as_deref(), &event.item_id);
        }
        encoded
    }
}

impl From<Vec<LoggedEvent>> for EncodedEvents {
    fn from(events: Vec<LoggedEvent>) -> Self {
        Self::from(&events[..])
    }
}

impl<'e> Extend<&'e NewEvent> for EncodedEvents {
    fn extend<I: IntoIterator<Item = &'e NewEvent>>(&mut self, events: I) {
        for new in events {
            self.push(new.event.timestamp, new.type_id.as_deref(), &new.event.item_id);
        }
    }
}

type Ack = oneshot::Sender<Result<(), StoreError>>;

enum JournalCommand {
    Appends(Appends),
    Erase {
        user: Arc<str>,
        ack: Ack,
    },
    /// Flush, fsync and merge everything on disk, dropping erased users' bytes from every file.
    Compact {
        ack: Ack,
    },
    /// An index step now (see [`Journal::index`]).
    Index {
        ack: Option<Ack>,
    },
}

/// Appends queued one after another, already as one log record's bytes: a sender encodes its
/// user into the record at the end of the queue (no allocation per append), and the writer takes
/// the record whole. Per appended user, a command of its own cost an allocation and a free, a
/// reference count and a copy on the writer (100 of each per call of 100 users).
#[derive(Default)]
struct Appends {
    record: RecordBuilder,
    /// Changes in it (one per [`Journal::append`], empty ones too): see [`Journal::queued`].
    changes: u64,
    events: u64,
    acks: Vec<Ack>,
}

impl Appends {
    fn push(&mut self, user: &str, events: &EncodedEvents, ack: Option<Ack>) {
        if !events.is_empty() {
            self.record.push(user, events);
            self.events += events.len() as u64;
        }
        self.changes += 1;
        self.acks.extend(ack);
    }
}

impl JournalCommand {
    /// How many queued changes it is.
    fn changes(&self) -> u64 {
        match self {
            JournalCommand::Appends(appends) => appends.changes,
            _ => 1,
        }
    }
}

#[derive(Debug, Default)]
struct JournalStats {
    batches: AtomicU64,
    events: AtomicU64,
    fsyncs: AtomicU64,
    fsync_micros: AtomicU64,
}

/// The open fjall database and its keyspaces (cheap handles; clones share them).
#[derive(Clone)]
struct Store {
    db: Database,
    events: Keyspace,
    log: Keyspace,
    meta: Keyspace,
}

/// The on-disk layout this build reads and writes (see the module docs). Format 3 is the same
/// but for how entries are keyed: by a fresh sequence number taken when the index step ran, so
/// a record still in its log may have a smaller one than an entry already indexed for the same
/// user, and keying its leftover log by the records' own numbers (format 4) would put that
/// user's later events first. Its log is indexed the way it was written (fresh numbers), then
/// it is marked 4. Format 2 (the same `events`, no `log`) is read as is and marked 4; format 1
/// (one keyspace of multi-user records) was never released beyond development builds.
const FORMAT: u8 = 4;
const FORMAT_FRESH_KEYS: u8 = 3;
const FORMAT_WITHOUT_LOG: u8 = 2;
const META_FORMAT: &[u8] = b"format";
const META_NEXT_SEQ: &[u8] = b"next_seq";
/// Present from an erasure's commit until the compaction that drops the erased bytes (whose
/// fresh store does not have it): a start that finds it owes that compaction, so that a process
/// killed in between still takes the user's bytes off the disk.
const META_COMPACTION_OWED: &[u8] = b"compaction_owed";

/// How the leftover log of an opened store is keyed when it is indexed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LogKeys {
    /// By each user's first record in the log (this build's format).
    FirstRecord,
    /// By fresh sequence numbers, as format 3 did; the format is then marked 4.
    Fresh,
}

impl Store {
    /// Opens the store and says how its leftover log must be indexed.
    fn open(path: &Path) -> Result<(Self, LogKeys), StoreError> {
        std::fs::create_dir_all(path).map_err(|e| io_error(path, e))?;
        let db = Database::builder(path)
            // Acknowledgement is ours to decide (see `FsyncPolicy`), batch by batch.
            .manual_journal_persist(true)
            .open()
            .map_err(|e| fjall_error(path, e))?;
        if db.keyspace_exists("records") {
            return Err(StoreError::Journal(format!(
                "{}: written by an older development build of xsrec (journal format 1), which this \
                 build cannot read; export it with that build and import the file with this one",
                path.display()
            )));
        }
        let uncompressed = || {
            // Compression would hide an erased user's id from a byte search of the files (the
            // erasure test's evidence), and costs CPU on the ingest path.
            KeyspaceCreateOptions::default()
                .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
                .manual_journal_persist(true)
        };
        let events = db.keyspace("events", uncompressed).map_err(|e| fjall_error(path, e))?;
        let log = db.keyspace("log", uncompressed).map_err(|e| fjall_error(path, e))?;
        let meta = db.keyspace("meta", uncompressed).map_err(|e| fjall_error(path, e))?;
        let store = Self { db, events, log, meta };
        match store.meta.get(META_FORMAT).map_err(|e| fjall_error(path, e))? {
            Some(format) if *format == [FORMAT] => {}
            // Marked 4 by the index step of its log (`index_log`), in the same batch.
            Some(format) if *format == [FORMAT_FRESH_KEYS] => return Ok((store, LogKeys::Fresh)),
            Some(format) if *format == [FORMAT_WITHOUT_LOG] => {
                store
                    .meta
                    .insert(META_FORMAT, [FORMAT])
                    .map_err(|e| fjall_error(path, e))?;
            }
            Some(format) => {
                return Err(StoreError::Journal(format!(
                    "{}: journal format {:?} is not this build's ({FORMAT}); use the xsrec that wrote it",
                    path.display(),
                    &*format
                )))
            }
            None if store.events.first_key_value().is_none() => {
                store
                    .meta
                    .insert(META_FORMAT, [FORMAT])
                    .map_err(|e| fjall_error(path, e))?;
            }
            None => return Err(corrupt(path, "the journal's format marker is missing")),
        }
        Ok((store, LogKeys::FirstRecord))
    }

    /// The next append's sequence number (kept in `meta` by every batch that appends).
    fn next_seq(&self, path: &Path) -> Result<u64, StoreError> {
        match self.meta.get(META_NEXT_SEQ).map_err(|e| fjall_error(path, e))? {
            None => Ok(0),
            Some(bytes) => decode_seq(&bytes).ok_or_else(|| corrupt(path, "the next sequence number is not 8 bytes")),
        }
    }
}

/// How often at most an fsync also renews the committed mark (two more fsyncs, of a small file
/// and the directory): what a start checks covers everything acknowledged up to this long
/// before a crash, and everything at a clean stop.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// The committed mark: the next sequence number as of the last fsync that renewed it, kept
/// beside the storage engine's files. The engine cuts its write-ahead log at the first record it
/// cannot read, which is right for a torn tail but silently drops every later record when the
/// damage is in the middle; a start that finds fewer records than the mark knows that happened,
/// and refuses instead of serving the part.
fn committed_mark(dir: &Path) -> PathBuf {
    dir.join("committed")
}

fn write_committed_mark(dir: &Path, next_seq: u64) -> Result<(), StoreError> {
    let path = committed_mark(dir);
    crate::durable::replace(&path, io_error, |partial| {
        std::fs::write(partial, format!("{next_seq}\n")).map_err(|e| io_error(partial, e))
    })?;
    sync_dir(dir)
}

/// Refuses a store whose write-ahead log lost records that the committed mark says were on disk.
fn check_committed_mark(dir: &Path, next_seq: u64) -> Result<(), StoreError> {
    let path = committed_mark(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        // A store from before the mark, or one that never fsynced: nothing to check.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(&path, e)),
    };
    let marked: u64 = text
        .trim()
        .parse()
        .map_err(|_| corrupt(dir, "its committed mark (the file `committed`) is not a number"))?;
    if next_seq < marked {
        return Err(StoreError::Journal(format!(
            "{}: the storage engine's write-ahead log is damaged: changes up to sequence number {marked} \
             were on disk, and only those before {next_seq} could be read (the engine has cut the log \
             where it could not read on). Restore the directory from a backup; or, to serve what \
             was read, delete {} and start again",
            dir.display(),
            path.display()
        )));
    }
    Ok(())
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
    crate::durable::sync_dir(dir).map_err(|e| io_error(dir, e))
}

struct Shared {
    /// `None` only inside a compaction's swap (under the write lock), after it failed, or after
    /// [`Journal::close`].
    store: RwLock<Option<Store>>,
    next_seq: AtomicU64,
    /// Changes sent to the writer, changes it has committed, and changes in per-user entries
    /// (all three counts, in channel order).
    queued: AtomicU64,
    committed: AtomicU64,
    indexed: AtomicU64,
    /// An index step asked for by [`Journal::index_soon`] is queued.
    index_requested: AtomicBool,
    /// Held from reading `next_seq` until the batch that records it is committed, so that the
    /// writer's and the indexer's commits store it in increasing order (a smaller value
    /// committed last would make a restart reuse sequence numbers).
    commit_order: Mutex<()>,
    failure: OnceLock<StoreError>,
    /// Woken when `failure` is set (see [`Journal::failed`]).
    failed: tokio::sync::Notify,
    stats: JournalStats,
    config: JournalConfig,
}

/// Handle to the journal; clones share the one writer thread.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
    inbox: Arc<Inbox>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// The writer's queue. A sender chooses whether to wake the writer: a call that appends for 100
/// users queues 100 commands and wakes it once, with the last. With a channel that woke it per
/// command, the writer (on the same core as the handler) preempted the handler after each send
/// and committed one or two appends at a time: 422,915 fjall batches for 758,200 appends, and
/// most of the time went to context switches.
struct Inbox {
    state: Mutex<InboxState>,
    wake: Condvar,
}

struct InboxState {
    commands: Vec<JournalCommand>,
    /// The appends queued after the last command in `commands`.
    appends: Appends,
    /// False once [`Journal::close`] ran: sends fail, and the writer stops when it is empty.
    open: bool,
}

impl InboxState {
    /// Queues the appends gathered so far as a command, so that what is queued next comes after.
    fn close_appends(&mut self) {
        if self.appends.changes > 0 {
            let appends = std::mem::take(&mut self.appends);
            self.commands.push(JournalCommand::Appends(appends));
        }
    }
}

/// What the writer's wait ended with.
enum Received {
    Commands(Vec<JournalCommand>),
    Timeout,
    Closed,
}

impl Inbox {
    fn new() -> Self {
        Self {
            state: Mutex::new(InboxState {
                commands: Vec::new(),
                appends: Appends::default(),
                open: true,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses later sends and takes everything queued, the gathered appends last.
    fn close_and_take(&self) -> Vec<JournalCommand> {
        let mut state = self.lock();
        state.open = false;
        state.close_appends();
        std::mem::take(&mut state.commands)
    }

    /// Waits (until `deadline`, if any) for commands, and takes those of at most [`MAX_GROUP`]
    /// changes (at least one command).
    fn receive(&self, deadline: Option<Instant>) -> Received {
        let mut state = self.lock();
        loop {
            state.close_appends();
            if !state.commands.is_empty() {
                let mut changes = 0;
                let take = state
                    .commands
                    .iter()
                    .take_while(|command| {
                        let first = changes == 0;
                        changes += command.changes();
                        first || changes <= MAX_GROUP
                    })
                    .count();
                return Received::Commands(state.commands.drain(..take).collect());
            }
            if !state.open {
                return Received::Closed;
            }
            state = match deadline {
                None => self.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Received::Timeout;
                    }
                    self.wake.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }
}

const NO_TYPE: u16 = u16::MAX;
/// An index step runs once the pending log records hold this many bytes, or the oldest is this
/// old (and before an erasure, a compaction, a stop, and when the memory budget asks). Bounds
/// what the writer holds, and what a start has to index. Larger steps cost less per event: a
/// user's appends in one step share one entry (ingest at 100,000 users, docs/RELIABILITY.md).
pub const INDEX_BYTES: usize = 64 << 20;
pub(super) const INDEX_DELAY: Duration = Duration::from_secs(5);
/// The writer takes at most this many queued changes into one batch (and at least one command).
const MAX_GROUP: u64 = 4096;

impl Journal {
    /// Opens (or creates) the journal in `config.dir` and starts its writer thread. fjall replays
    /// its own write-ahead log here; a torn tail from a crash is cut at the last whole record.
    pub fn open(config: JournalConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| io_error(&config.dir, e))?;
        settle_interrupted_compaction(&config.dir)?;
        let path = live_dir(&config.dir);
        let (store, log_keys) = Store::open(&path)?;
        let next_seq = store.next_seq(&path)?;
        check_committed_mark(&config.dir, next_seq)?;
        let compaction_owed = store
            .meta
            .contains_key(META_COMPACTION_OWED)
            .map_err(|e| fjall_error(&path, e))?;
        let next_seq = AtomicU64::new(next_seq);
        index_log(&store, &path, &next_seq, log_keys)?;
        let shared = Arc::new(Shared {
            store: RwLock::new(Some(store)),
            next_seq,
            queued: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            indexed: AtomicU64::new(0),
            index_requested: AtomicBool::new(false),
            commit_order: Mutex::new(()),
            failure: OnceLock::new(),
            failed: tokio::sync::Notify::new(),
            stats: JournalStats::default(),
            config,
        });
        let inbox = Arc::new(Inbox::new());
        let indexer = Indexer::spawn(shared.clone())?;
        let (writer, writer_inbox) = (shared.clone(), inbox.clone());
        let writer = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || {
                crate::threads::batch_scheduling("journal writer's");
                let writing = std::panic::AssertUnwindSafe(|| {
                    JournalWriter::new(writer.clone(), indexer, compaction_owed).run(&writer_inbox)
                });
                if let Err(panic) = std::panic::catch_unwind(writing) {
                    // A bug rather than a disk: the journal fails (so the server stops), and what
                    // is queued is answered instead of waiting for a writer that is gone.
                    let message = crate::threads::panic_message(&*panic);
                    let error = StoreError::Journal(format!("the journal writer panicked: {message}"));
                    writer.fail(&error);
                    reply_all(writer_inbox.close_and_take(), &Err(error));
                }
            })
            .map_err(|e| StoreError::Journal(format!("spawning the journal writer: {e}")))?;
        Ok(Self {
            shared,
            inbox,
            writer: Arc::new(Mutex::new(Some(writer))),
        })
    }

    /// Whether another process has the store in `dir` open (the storage engine's lock is held).
    pub fn in_use(dir: &Path) -> Result<bool, StoreError> {
        let lock = live_dir(dir).join("lock");
        let file = match std::fs::File::open(&lock) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error(&lock, e)),
        };
        match file.try_lock() {
            Ok(()) => Ok(false),
            Err(std::fs::TryLockError::WouldBlock) => Ok(true),
            Err(std::fs::TryLockError::Error(e)) => Err(io_error(&lock, e)),
        }
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
        self.shared.health()
    }

    /// Queues a change with `queue`; with `wake`, the writer starts on everything queued.
    fn send(&self, wake: bool, queue: impl FnOnce(&mut InboxState)) -> bool {
        let mut inbox = self.inbox.lock();
        if !inbox.open {
            return false;
        }
        queue(&mut inbox);
        // Counted under the lock, so that the count follows the queue's order.
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        drop(inbox);
        if wake {
            self.inbox.wake.notify_one();
        }
        true
    }

    /// How many changes have been queued so far. A change queued before this call is readable
    /// from the store (by [`Journal::load`]) once [`Journal::committed`] reaches the value.
    pub fn queued(&self) -> u64 {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// How many of the queued changes are committed (fsynced or not).
    pub fn committed(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// How many of the queued changes are in per-user entries, where [`Journal::load`] and
    /// [`Journal::replay`] read them.
    pub fn indexed(&self) -> u64 {
        self.shared.indexed.load(Ordering::Acquire)
    }

    /// Queues `events` for `user`; with `acknowledge`, the returned commit resolves once they
    /// (and everything queued before them) are written. Only an acknowledged append wakes the
    /// writer: a caller queues its other appends first and acknowledges the last one. (Appends
    /// queued by a call that fails before its last one go with the next command; such a call
    /// fails only when the journal has, which fails every later batch anyway.)
    pub fn append(&self, user: &str, events: &EncodedEvents, acknowledge: bool) -> Option<Commit> {
        let (ack, commit) = match acknowledge {
            true => {
                let (sender, receiver) = oneshot::channel();
                (Some(sender), Some(Commit::pending(receiver)))
            }
            false => (None, None),
        };
        let queued = self.send(acknowledge, |inbox| {
            inbox.appends.push(user, events, ack);
            if inbox.appends.changes >= MAX_GROUP {
                inbox.close_appends();
            }
        });
        if !queued {
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

    /// An index step for everything queued so far; resolves once it is committed.
    pub fn index(&self) -> Commit {
        self.request(|ack| JournalCommand::Index { ack: Some(ack) })
    }

    /// Asks for an index step without waiting for it (what the memory budget does when the
    /// users it would evict are not indexed yet); at most one such request is queued.
    pub fn index_soon(&self) {
        if !self.shared.index_requested.swap(true, Ordering::AcqRel) {
            self.send(true, |inbox| {
                inbox.close_appends();
                inbox.commands.push(JournalCommand::Index { ack: None });
            });
        }
    }

    fn request(&self, command: impl FnOnce(Ack) -> JournalCommand) -> Commit {
        let (sender, receiver) = oneshot::channel();
        let queued = self.send(true, |inbox| {
            inbox.close_appends();
            inbox.commands.push(command(sender));
        });
        if !queued {
            return Commit::failed(StoreError::Stopped);
        }
        Commit::pending(receiver)
    }

    /// Stops the writer once everything queued is written and fsynced, and waits for it; later
    /// writes fail with [`StoreError::Stopped`].
    pub fn close(&self) {
        self.inbox.lock().open = false;
        self.inbox.wake.notify_one();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writer.join();
        }
        // Releases the files (and fjall's lock on them) for another process or a reopen.
        if let Some(store) = self.shared.store.write().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = store.db.persist(PersistMode::SyncAll);
        }
    }

    /// Every user's stored events, user after user, each user's in arrival order with the
    /// append's sequence number (later appends have larger ones): what
    /// [`Histories::recover`](super::Histories::recover) replays, and what export reads. Reads the
    /// entries, so it sees the changes counted by [`Journal::indexed`]: at a start, everything
    /// (opening indexes what the log holds); later, call [`Journal::index`] first. Events past
    /// retention are left out (a compaction may not have dropped them yet). Returns the number of
    /// entries read.
    pub fn replay(&self, mut apply: impl FnMut(&str, u64, Vec<LoggedEvent>)) -> Result<u64, StoreError> {
        let path = &self.shared.config.dir;
        let horizon = self.retention_horizon().unwrap_or(i64::MIN);
        self.shared.read(|store| {
            let mut entries = 0u64;
            for entry in store.events.iter() {
                let (key, value) = entry.into_inner().map_err(|e| fjall_error(path, e))?;
                let (user, seq, mut events) =
                    decode_entry(&key, &value).ok_or_else(|| corrupt(path, "a journal entry is malformed"))?;
                events.retain(|e| e.timestamp >= horizon);
                apply(user, seq, events);
                entries += 1;
            }
            Ok(entries)
        })
    }

    /// One user's stored events in arrival order, past retention left out (empty for a user the
    /// store does not hold): what memory reloads a user from. Sees the changes counted by
    /// [`Journal::indexed`] (memory keeps a user until then). A failed read fails the journal
    /// (health turns off).
    pub fn load(&self, user: &str) -> Result<Vec<LoggedEvent>, StoreError> {
        let path = &self.shared.config.dir;
        let horizon = self.retention_horizon().unwrap_or(i64::MIN);
        let read = |store: &Store| {
            let mut events = Vec::new();
            for entry in store.events.prefix(user_prefix(user)) {
                let (key, value) = entry.into_inner().map_err(|e| fjall_error(path, e))?;
                let (_, _, more) =
                    decode_entry(&key, &value).ok_or_else(|| corrupt(path, "a journal entry is malformed"))?;
                events.extend(more.into_iter().filter(|e| e.timestamp >= horizon));
            }
            Ok(events)
        };
        self.shared.read(read).inspect_err(|error| self.shared.fail(error))
    }

    /// Completes once the journal has failed (it then refuses every write): what the server
    /// waits on to stop and exit non-zero, for its orchestrator to replace it.
    pub async fn failed(&self) -> StoreError {
        loop {
            let notified = self.shared.failed.notified();
            if let Err(error) = self.health() {
                return error;
            }
            notified.await;
        }
    }
}

impl Shared {
    /// Records the journal's first failure, for good.
    fn fail(&self, error: &StoreError) {
        let _ = self.failure.set(error.clone());
        self.failed.notify_waiters();
    }

    fn health(&self) -> Result<(), StoreError> {
        self.failure.get().map_or(Ok(()), |error| Err(error.clone()))
    }

    /// Runs `f` on the store with the handle lock held, so that a compaction cannot rename the
    /// files away under the reader (it swaps stores under the write lock).
    fn read<T>(&self, f: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &*self.store.read().unwrap_or_else(|e| e.into_inner()) {
            Some(store) => f(store),
            None => Err(closed()),
        }
    }

    fn store(&self) -> Result<Store, StoreError> {
        self.store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(closed)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(store) = self.store() {
            let _ = store.db.persist(PersistMode::SyncAll);
        }
    }
}

/// Log records (sequence number and value; the value is shared with fjall's memtable), in
/// arrival order.
type LogRecords = Vec<(u64, fjall::Slice)>;

/// The thread that owns all writes.
struct JournalWriter {
    shared: Arc<Shared>,
    /// Written to the OS but not yet fsynced.
    dirty: bool,
    /// Commands committed so far (what `Shared::committed` publishes).
    processed: u64,
    last_sync: Instant,
    /// When [`write_committed_mark`] last ran.
    last_mark: Option<Instant>,
    /// When the compaction owed to an erasure is due.
    compaction_due: Option<Instant>,
    /// When the next retention compaction is due.
    retention_due: Option<Instant>,
    /// The log records not yet indexed (nor handed to the indexer), their bytes, and when the
    /// oldest was written.
    pending_records: LogRecords,
    pending_bytes: usize,
    pending_since: Option<Instant>,
    indexer: Indexer,
}

/// The thread that runs the index steps due by size or age, so that the writer goes on logging
/// (and acknowledging) meanwhile: run by the writer, a step of 5 s of ingest at 100,000 users
/// held every call behind it for up to 0.9 s (docs/RELIABILITY.md). Steps the writer needs done
/// before its next change (an erasure, a compaction, the memory budget's request, a stop) run on
/// the writer, after the one in flight.
struct Indexer {
    jobs: Option<mpsc::Sender<(Store, LogRecords)>>,
    done: mpsc::Receiver<Result<(), StoreError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// With a step in flight: the number of commands whose appends it puts into entries (what
    /// [`Journal::indexed`] becomes when it is committed).
    in_flight: Option<u64>,
}

impl Indexer {
    fn spawn(shared: Arc<Shared>) -> Result<Self, StoreError> {
        let (jobs, queued) = mpsc::channel::<(Store, LogRecords)>();
        let (finished, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("journal-indexer".into())
            .spawn(move || {
                crate::threads::lower_priority(shared.config.background_nice, "journal indexer's");
                for (store, records) in queued {
                    let outcome = index_in_background(&shared, &store, &records);
                    // Let go of the store before reporting: a compaction that follows closes it.
                    drop((store, records));
                    let _ = finished.send(outcome.map(drop));
                }
            })
            .map_err(|e| StoreError::Journal(format!("spawning the journal indexer: {e}")))?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: None,
        })
    }

    /// The step in flight's outcome and what it covers, once it has finished (`wait`: waits
    /// for it); `None` while it runs or with none in flight.
    fn finished(&mut self, wait: bool) -> Option<(u64, Result<(), StoreError>)> {
        let covers = self.in_flight?;
        let result = match wait {
            true => self.done.recv().map_err(|_| stopped_indexer()),
            false => match self.done.try_recv() {
                Err(mpsc::TryRecvError::Empty) => return None,
                outcome => outcome.map_err(|_| stopped_indexer()),
            },
        };
        self.in_flight = None;
        Some((covers, result.and_then(|indexed| indexed)))
    }
}

impl Drop for Indexer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped_indexer() -> StoreError {
    StoreError::Journal("the journal indexer stopped".into())
}

/// How often the writer looks whether the step in flight has finished, when nothing else wakes it.
const INDEXER_POLL: Duration = Duration::from_millis(5);

impl JournalWriter {
    fn new(shared: Arc<Shared>, indexer: Indexer, compaction_owed: bool) -> Self {
        let retention_due = shared.config.retention_every().map(|every| Instant::now() + every);
        let compaction_due = compaction_owed.then(|| Instant::now() + shared.config.erasure_compaction_delay);
        Self {
            shared,
            dirty: false,
            processed: 0,
            last_sync: Instant::now(),
            last_mark: None,
            compaction_due,
            retention_due,
            pending_records: Vec::new(),
            pending_bytes: 0,
            pending_since: None,
            indexer,
        }
    }

    fn run(mut self, inbox: &Inbox) {
        loop {
            match inbox.receive(self.next_deadline()) {
                Received::Commands(group) => self.execute(group),
                Received::Timeout => self.run_due_work(),
                Received::Closed => break,
            }
        }
        // Indexed now, so that the next start has nothing to index (after a failure, the next
        // start indexes what is left in the log).
        if let Err(error) = self
            .health()
            .and_then(|()| self.index_pending())
            .and_then(|()| self.sync())
            .and_then(|()| self.mark_committed())
        {
            self.fail(&error);
        }
    }

    /// The earliest of a pending fsync (`interval`), an index step, a pending erasure compaction
    /// and the next retention compaction.
    fn next_deadline(&self) -> Option<Instant> {
        // A failed journal has no due work (run_due_work), so it waits only for commands.
        self.health().ok()?;
        let config = &self.shared.config;
        let sync =
            (self.dirty && config.fsync == FsyncPolicy::Interval).then(|| self.last_sync + config.fsync_interval);
        // With a step in flight, a due step waits for it: polling, not the (past) due time.
        let index = match self.indexer.in_flight {
            Some(_) => Some(Instant::now() + INDEXER_POLL),
            None => self.pending_since.map(|since| since + INDEX_DELAY),
        };
        [sync, index, self.compaction_due, self.retention_due]
            .into_iter()
            .flatten()
            .min()
    }

    fn run_due_work(&mut self) {
        // A failed journal changes nothing more: what it had not indexed is still in the log on
        // disk, and a compaction now would copy the entries without it.
        if self.health().is_err() {
            return;
        }
        let now = Instant::now();
        let mut result = Ok(());
        let due = |at: Option<Instant>| at.is_some_and(|due| due <= now);
        if due(self.compaction_due) || due(self.retention_due) {
            result = self.compact();
        } else if self.indexer.in_flight.is_some() || self.pending_since.is_some_and(|since| since + INDEX_DELAY <= now)
        {
            result = self.index_in_background_when_due();
        }
        let sync_due = self.dirty
            && self.shared.config.fsync == FsyncPolicy::Interval
            && self.last_sync.elapsed() >= self.shared.config.fsync_interval;
        if result.is_ok() && sync_due {
            result = self.sync();
        }
        if let Err(error) = result {
            self.fail(&error);
        }
    }

    fn execute(&mut self, group: Vec<JournalCommand>) {
        let changes: u64 = group.iter().map(JournalCommand::changes).sum();
        let mut acks = Vec::new();
        let mut store = match self.shared.store() {
            Ok(store) => store,
            Err(error) => {
                self.fail(&error);
                return reply_all(group, &Err(error));
            }
        };
        let mut batch = store.db.batch();
        // This group's appends so far.
        let mut fresh = RecordBuilder::default();
        let mut result = self.health();
        for command in group {
            match command {
                JournalCommand::Appends(appends) => {
                    if result.is_ok() {
                        self.shared.stats.events.fetch_add(appends.events, Ordering::Relaxed);
                        fresh.extend(appends.record);
                    }
                    acks.extend(appends.acks);
                }
                JournalCommand::Erase { user, ack } => {
                    // Indexed and committed first: the log records that hold the user's events
                    // are gone, and the scan for the user's entries sees every append before
                    // the erasure.
                    result = result
                        .and_then(|()| self.index_now(&store, &mut batch, &mut fresh))
                        .and_then(|()| stage_erasure(&store, &mut batch, &user, &self.shared.config.dir));
                    batch.insert(&store.meta, META_COMPACTION_OWED, []);
                    let delay = self.shared.config.erasure_compaction_delay;
                    self.compaction_due.get_or_insert_with(|| Instant::now() + delay);
                    acks.push(ack);
                }
                JournalCommand::Compact { ack } => {
                    result = result
                        .and_then(|()| self.index_now(&store, &mut batch, &mut fresh))
                        .and_then(|()| self.compact());
                    // Later commands of this group go to the compacted store.
                    match self.shared.store() {
                        Ok(compacted) => store = compacted,
                        Err(error) => result = Err(error),
                    }
                    batch = store.db.batch();
                    acks.push(ack);
                }
                JournalCommand::Index { ack } => {
                    if ack.is_none() {
                        self.shared.index_requested.store(false, Ordering::Release);
                    }
                    result = result.and_then(|()| self.index_now(&store, &mut batch, &mut fresh));
                    acks.extend(ack);
                }
            }
        }
        let result =
            result
                .and_then(|()| self.write(&store, batch, fresh))
                .and_then(|()| match self.shared.config.fsync {
                    FsyncPolicy::Always => self.sync(),
                    FsyncPolicy::Interval if self.last_sync.elapsed() >= self.shared.config.fsync_interval => {
                        self.sync()
                    }
                    _ => Ok(()),
                });
        match &result {
            Ok(()) => {
                self.processed += changes;
                self.shared.committed.store(self.processed, Ordering::Release);
                self.publish_indexed();
            }
            Err(error) => self.fail(error),
        }
        for ack in acks {
            let _ = ack.send(result.clone());
        }
        if result.is_ok() {
            if let Err(error) = self.index_in_background_when_due() {
                self.fail(&error);
            }
        }
    }

    /// Collects the step in flight if it has finished, then hands the pending log records to
    /// the indexer if a step is due by size or age and none is in flight.
    fn index_in_background_when_due(&mut self) -> Result<(), StoreError> {
        if let Some((covers, result)) = self.indexer.finished(false) {
            self.indexed_in_background(covers, result)?;
        }
        let due = self.pending_bytes >= self.shared.config.index_bytes
            || self.pending_since.is_some_and(|since| since.elapsed() >= INDEX_DELAY);
        if !due || self.indexer.in_flight.is_some() {
            return Ok(());
        }
        let store = self.shared.store()?;
        let records = self.take_pending();
        let jobs = self.indexer.jobs.as_ref().ok_or_else(stopped_indexer)?;
        jobs.send((store, records)).map_err(|_| stopped_indexer())?;
        self.indexer.in_flight = Some(self.processed);
        Ok(())
    }

    /// The pending log records, handed to an index step (the writer then holds none).
    fn take_pending(&mut self) -> LogRecords {
        self.pending_bytes = 0;
        self.pending_since = None;
        std::mem::take(&mut self.pending_records)
    }

    /// Waits for the step in flight, if any (before a step on the writer, so that each user's
    /// entries keep arrival order).
    fn finish_background_index(&mut self) -> Result<(), StoreError> {
        match self.indexer.finished(true) {
            Some((covers, result)) => self.indexed_in_background(covers, result),
            None => Ok(()),
        }
    }

    fn indexed_in_background(&mut self, covers: u64, result: Result<(), StoreError>) -> Result<(), StoreError> {
        result?;
        // Its batch was written to the OS by the indexer; the next fsync covers it.
        self.dirty = true;
        self.shared.indexed.fetch_max(covers, Ordering::Release);
        self.publish_indexed();
        Ok(())
    }

    /// Commits `batch` with this group's appends as one log record (a sequential key, the cheap
    /// write); the index step turns log records into per-user entries later.
    fn write(
        &mut self,
        store: &Store,
        mut batch: fjall::OwnedWriteBatch,
        fresh: RecordBuilder,
    ) -> Result<(), StoreError> {
        if fresh.appends == 0 {
            return self.commit(store, batch);
        }
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let value = fjall::Slice::from(fresh.finish());
        batch.insert(&store.log, seq.to_be_bytes(), value.clone());
        self.commit(store, batch)?;
        self.pending_bytes += value.len();
        self.pending_records.push((seq, value));
        self.pending_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// An index step inside a group: commits what `batch` holds with the pending appends and
    /// `fresh`, and leaves both empty for the rest of the group.
    fn index_now(
        &mut self,
        store: &Store,
        batch: &mut fjall::OwnedWriteBatch,
        fresh: &mut RecordBuilder,
    ) -> Result<(), StoreError> {
        self.finish_background_index()?;
        let batch = std::mem::replace(batch, store.db.batch());
        self.index(store, batch, std::mem::take(fresh))
    }

    /// An index step on its own (due by time, before a compaction, at a stop).
    fn index_pending(&mut self) -> Result<(), StoreError> {
        self.finish_background_index()?;
        let store = self.shared.store()?;
        self.index(&store, store.db.batch(), RecordBuilder::default())?;
        self.publish_indexed();
        Ok(())
    }

    /// An index step on the writer ([`index_records`]): `batch` with the pending appends and
    /// `fresh` (this group's, not in the log).
    fn index(&mut self, store: &Store, batch: fjall::OwnedWriteBatch, fresh: RecordBuilder) -> Result<(), StoreError> {
        let records = self.take_pending();
        if index_records(&self.shared, store, batch, &records, fresh, usize::MAX)? {
            self.dirty = true;
        }
        Ok(())
    }

    /// With no log record pending, every committed change is indexed.
    fn publish_indexed(&self) {
        if self.pending_records.is_empty() && self.indexer.in_flight.is_none() {
            self.shared.indexed.store(self.processed, Ordering::Release);
        }
    }

    /// Writes the batch (with the next sequence number) to fjall's log and pushes it to the OS:
    /// it survives a killed process, and readers see it.
    fn commit(&mut self, store: &Store, batch: fjall::OwnedWriteBatch) -> Result<(), StoreError> {
        if commit_batch(&self.shared, store, batch)? {
            self.dirty = true;
        }
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
        if self.last_mark.is_none_or(|at| at.elapsed() >= MARK_EVERY) {
            self.mark_committed()?;
        }
        Ok(())
    }

    /// Records, durably, that everything committed so far is on disk (called after an fsync).
    fn mark_committed(&mut self) -> Result<(), StoreError> {
        write_committed_mark(&self.shared.config.dir, self.shared.next_seq.load(Ordering::Acquire))?;
        self.last_mark = Some(Instant::now());
        Ok(())
    }

    /// Rewrites the live entries into a fresh store without the events past retention, swaps it
    /// in and removes the old store whole: afterwards no file holds an erased user's bytes (nor
    /// the tombstones that name them). Costs one pass over the live data, during which writes
    /// wait (reads of memory go on; reloads read the old store).
    fn compact(&mut self) -> Result<(), StoreError> {
        self.index_pending()?;
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
            let (copy, _) = Store::open(&fresh)?;
            let mut batch = copy.db.batch();
            for entry in self.shared.store()?.events.iter() {
                let (key, value) = entry.into_inner().map_err(|e| fjall_error(&live, e))?;
                let (user, seq, events) =
                    decode_entry(&key, &value).ok_or_else(|| corrupt(&live, "a journal entry is malformed"))?;
                let kept: Vec<LoggedEvent> = events.iter().filter(|e| e.timestamp >= horizon).cloned().collect();
                if kept.len() == events.len() {
                    batch.insert(&copy.events, key, value);
                } else if !kept.is_empty() {
                    let (key, value) = encode_entry(user, seq, &kept);
                    batch.insert(&copy.events, key, value);
                }
                if batch.len() >= 1_000 {
                    batch.commit().map_err(|e| fjall_error(&fresh, e))?;
                    batch = copy.db.batch();
                }
            }
            let next_seq = self.shared.next_seq.load(Ordering::Relaxed);
            batch.insert(&copy.meta, META_NEXT_SEQ, next_seq.to_be_bytes());
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
        *store = Some(Store::open(&live)?.0);
        drop(store);
        std::fs::remove_dir_all(&retired).map_err(|e| io_error(&retired, e))?;
        Ok(())
    }

    fn health(&self) -> Result<(), StoreError> {
        self.shared.health()
    }

    fn fail(&self, error: &StoreError) {
        self.shared.fail(error);
    }
}

/// Writes `batch` (with the next sequence number) to fjall's log and pushes it to the OS: it
/// survives a killed process, and readers see it. False if there was nothing to write.
fn commit_batch(shared: &Shared, store: &Store, mut batch: fjall::OwnedWriteBatch) -> Result<bool, StoreError> {
    if batch.is_empty() {
        return Ok(false);
    }
    // A stalled disk (`sleep`) or a failed write (`return`), in tests of what waits on the
    // journal.
    fail::fail_point!("journal-commit", |_| Err(StoreError::Journal(
        "injected write failure".into()
    )));
    let _order = shared.commit_order.lock().unwrap_or_else(|e| e.into_inner());
    let next_seq = shared.next_seq.load(Ordering::Relaxed);
    batch.insert(&store.meta, META_NEXT_SEQ, next_seq.to_be_bytes());
    batch
        .durability(Some(PersistMode::Buffer))
        .commit()
        .map_err(|e| fjall_error(&shared.config.dir, e))?;
    shared.stats.batches.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

/// An index step on the indexer thread, committed in parts of [`JournalConfig::index_part_entries`]
/// entries. Tests make it fail in one journal (the fail point's argument is the end of its
/// directory's path), the others going on: before it writes anything (`journal-indexer`) or
/// after its first part (`journal-index-part`).
fn index_in_background(shared: &Shared, store: &Store, records: &[(u64, fjall::Slice)]) -> Result<bool, StoreError> {
    let parts = shared.config.index_part_entries();
    let step = || {
        index_records(
            shared,
            store,
            store.db.batch(),
            records,
            RecordBuilder::default(),
            parts,
        )
    };
    fail::fail_point!("journal-indexer", |only_in: Option<String>| match only_in {
        Some(dir) if shared.config.dir.ends_with(&dir) => Err(StoreError::Journal("an index step failed".into())),
        _ => step(),
    });
    step()
}

/// The index step: commits `batch` with the appends of `records` (log records, in arrival order)
/// and `fresh` (appends not in the log) as one entry per user, and without those log records.
/// One entry per user per step (not per append), written in key order, is what makes it
/// cheaper than writing entries as calls come.
///
/// The entries go in commits of at most `part_entries`, the log records' removal with the last:
/// fjall holds its journal lock through a commit, and one of a whole step (100,000 entries at
/// 100,000 users) held the writer's commits behind it for 120–160 ms. A crash between parts
/// leaves some entries written and every record still in the log; the next start indexes the
/// log again, and since an entry's key is its user and the sequence number of the first record
/// of the step that holds the user ([`stage_index`]), the same records give the same keys: it
/// overwrites those entries (with the same events, and any later ones), it does not add a
/// second copy. (If a commit fails, the journal fails, and the next start indexes the log.)
fn index_records(
    shared: &Shared,
    store: &Store,
    batch: fjall::OwnedWriteBatch,
    records: &[(u64, fjall::Slice)],
    fresh: RecordBuilder,
    part_entries: usize,
) -> Result<bool, StoreError> {
    // Appends not in the log are one more record, under a sequence number of their own.
    let fresh = (fresh.appends > 0).then(|| (shared.next_seq.fetch_add(1, Ordering::Relaxed), fresh.finish()));
    let values = records.iter().map(|(seq, value)| (*seq, &value[..]));
    let entries = stage_index(values.chain(fresh.iter().map(|(seq, value)| (*seq, &value[..]))))
        .ok_or_else(|| corrupt(&shared.config.dir, "a pending journal log record is malformed"))?;
    let mut first = true;
    write_step(store, batch, entries, records, part_entries, |part, last| {
        let wrote = commit_batch(shared, store, part)?;
        // Only between parts: after the last one the step is whole.
        if !last && std::mem::take(&mut first) {
            cut_after_first_part(shared)?;
        }
        Ok(wrote)
    })
}

/// Puts a step's `entries` into `batch` and removes its log `records`, handing the batch to
/// `commit_part` whenever it holds `part_entries` writes (what the caller put in it counts), and
/// with the removal last (`true`: the last part). True if a part wrote something.
fn write_step(
    store: &Store,
    mut batch: fjall::OwnedWriteBatch,
    entries: Vec<Entry>,
    records: &[(u64, fjall::Slice)],
    part_entries: usize,
    mut commit_part: impl FnMut(fjall::OwnedWriteBatch, bool) -> Result<bool, StoreError>,
) -> Result<bool, StoreError> {
    let mut wrote = false;
    for (key, value) in entries {
        if batch.len() >= part_entries {
            wrote |= commit_part(std::mem::replace(&mut batch, store.db.batch()), false)?;
        }
        batch.insert(&store.events, key, value);
    }
    for (seq, _) in records {
        batch.remove(&store.log, seq.to_be_bytes());
    }
    Ok(commit_part(batch, true)? | wrote)
}

/// A crash between an index step's parts, in tests: fails in the one journal whose directory
/// ends with the fail point's argument (the others go on).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn cut_after_first_part(shared: &Shared) -> Result<(), StoreError> {
    fail::fail_point!("journal-index-part", |only_in: Option<String>| match only_in {
        Some(dir) if shared.config.dir.ends_with(&dir) =>
            Err(StoreError::Journal("an index step failed after its first part".into())),
        _ => Ok(()),
    });
    Ok(())
}

fn reply_all(group: Vec<JournalCommand>, result: &Result<(), StoreError>) {
    for command in group {
        let acks = match command {
            JournalCommand::Appends(appends) => appends.acks,
            JournalCommand::Index { ack } => ack.into_iter().collect(),
            JournalCommand::Erase { ack, .. } | JournalCommand::Compact { ack } => vec![ack],
        };
        for ack in acks {
            let _ = ack.send(result.clone());
        }
    }
}

fn decode_seq(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_bytes(out, text.as_bytes());
}

/// Length (u16 BE), then the bytes.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The start of every key of `user`'s entries.
fn user_prefix(user: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + user.len() + 8);
    put_str(&mut key, user);
    key
}

/// One event as bytes: timestamp (i64 BE), type (length u16 BE, `u16::MAX` for none, then
/// bytes) and item id (length, bytes).
fn put_event(out: &mut Vec<u8>, timestamp: i64, event_type: Option<&str>, item_id: &str) {
    out.extend_from_slice(&timestamp.to_be_bytes());
    match event_type {
        Some(kind) => put_str(out, kind),
        None => out.extend_from_slice(&NO_TYPE.to_be_bytes()),
    }
    put_str(out, item_id);
}

/// One user's indexed events as an entry: key = user (u16 BE length, bytes) and sequence number
/// (u64 BE); value = the events (count, u32 BE, then each [`put_event`]). (Public for the
/// storage-engine bench, so that both engines store the very same bytes.)
pub fn encode_entry(user: &str, seq: u64, events: &[LoggedEvent]) -> (Vec<u8>, Vec<u8>) {
    let mut key = user_prefix(user);
    key.extend_from_slice(&seq.to_be_bytes());
    let mut value = Vec::with_capacity(4 + events.len() * 24);
    EncodedEvents::from(events).put(&mut value);
    (key, value)
}

/// A log record being built, one append at a time: append count (u32 BE), then per append the
/// user (u16 BE length, bytes) and its events (count, then the events).
struct RecordBuilder {
    appends: u32,
    value: Vec<u8>,
}

impl Default for RecordBuilder {
    fn default() -> Self {
        Self {
            appends: 0,
            value: vec![0; 4],
        }
    }
}

impl RecordBuilder {
    fn push(&mut self, user: &str, events: &EncodedEvents) {
        put_str(&mut self.value, user);
        events.put(&mut self.value);
        self.appends += 1;
    }

    /// `later`'s appends after these.
    fn extend(&mut self, later: RecordBuilder) {
        if self.appends == 0 {
            *self = later;
        } else {
            self.value.extend_from_slice(&later.value[4..]);
            self.appends += later.appends;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.value[..4].copy_from_slice(&self.appends.to_be_bytes());
        self.value
    }
}

/// One group commit's appends as a log record: key = sequence number (u64 BE), value as
/// [`RecordBuilder`] writes it. (Public for the fuzz target.)
pub fn encode_record<U: AsRef<str>>(seq: u64, appends: &[(U, Vec<LoggedEvent>)]) -> (Vec<u8>, Vec<u8>) {
    let mut record = RecordBuilder::default();
    for (user, events) in appends {
        record.push(user.as_ref(), &EncodedEvents::from(&events[..]));
    }
    (seq.to_be_bytes().to_vec(), record.finish())
}

/// One user's events, as a log record holds them.
pub type UserEvents<'v> = (&'v str, Vec<LoggedEvent>);

/// The entries (key, value) for the appends of `records` (sequence number and value of log
/// records, in arrival order): one per user, keyed by the user and the sequence number of the
/// first record that holds the user, each user's events in arrival order, in key order (in
/// order, fjall's memtable inserts are the cheap ones). Later records have larger sequence
/// numbers, so a later step's entry sorts after an earlier one's. The events' bytes are grouped
/// and copied as they are, not decoded. `None` if a record is malformed.
///
/// Grouped in two passes: the appends are first copied, in order, into partitions by their
/// user's hash, then grouped one partition at a time. A step of 64 MiB holds about 100,000
/// users; grouped in one table, every append missed the cache twice (its user's slot in the
/// table, then the slot's list of the user's appends), and the step was bound by those misses
/// (docs/RELIABILITY.md). A partition's appends, table and lists fit in the cache, and the
/// copying is sequential.
fn stage_index<'r>(records: impl IntoIterator<Item = (u64, &'r [u8])>) -> Option<Vec<Entry>> {
    stage_in_partitions(records.into_iter().collect(), |bytes| {
        (bytes / PARTITION_BYTES).clamp(1, MAX_PARTITIONS)
    })
}

/// [`stage_index`] with as many partitions as `partitions_for` gives for the records' bytes.
fn stage_in_partitions(records: Vec<(u64, &[u8])>, partitions_for: impl FnOnce(usize) -> usize) -> Option<Vec<Entry>> {
    let bytes: usize = records.iter().map(|(_, record)| record.len()).sum();
    let partitions = partitions_for(bytes);
    let spread = foldhash::fast::RandomState::default();
    // Per append: sequence number (u64 BE), user (u16 BE length, bytes), event count (u32 BE),
    // the events' length in bytes (u32 BE) and the events.
    // (Not `vec![…; partitions]`: a cloned Vec does not keep the capacity.)
    let mut partitioned: Vec<Vec<u8>> = (0..partitions)
        .map(|_| Vec::with_capacity(bytes / partitions * 5 / 4))
        .collect();
    for (seq, record) in records {
        for (user, count, events) in split_record(record)? {
            if count > 0 {
                let partition = &mut partitioned[(spread.hash_one(user) >> 32) as usize % partitions];
                partition.extend_from_slice(&seq.to_be_bytes());
                put_bytes(partition, user);
                partition.extend_from_slice(&count.to_be_bytes());
                partition.extend_from_slice(&(events.len() as u32).to_be_bytes());
                partition.extend_from_slice(events);
            }
        }
    }
    /// The first record's sequence number, the event count and the events' bytes.
    type ByUser<'p> = HashMap<&'p [u8], (u64, u32, Vec<&'p [u8]>), foldhash::fast::RandomState>;
    let mut entries = Vec::new();
    let mut key = Vec::new();
    for partition in &partitioned {
        let mut by_user = ByUser::default();
        let mut appends = Reader(partition);
        while !appends.0.is_empty() {
            let seq = decode_seq(appends.take(8)?)?;
            let len = appends.u16()?;
            let user = appends.take(len as usize)?;
            let count = appends.u32()?;
            let len = appends.u32()?;
            let events = appends.take(len as usize)?;
            let (_, total, parts) = by_user.entry(user).or_insert_with(|| (seq, 0, Vec::new()));
            *total = total.checked_add(count)?;
            parts.push(events);
        }
        for (user, (seq, count, parts)) in by_user {
            key.clear();
            put_bytes(&mut key, user);
            key.extend_from_slice(&seq.to_be_bytes());
            let count = count.to_be_bytes();
            let len = count.len() + parts.iter().map(|part| part.len()).sum::<usize>();
            let value = ByteView::from_reader(&mut Concat::new(&count, &parts), len)
                .expect("the count and parts hold `len` bytes");
            entries.push((fjall::Slice::from(&key[..]), value.into()));
        }
    }
    // A key's bytes sort as fjall orders them: user length, user, sequence number.
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Some(entries)
}

/// An entry of the `events` keyspace, key and value, built straight into fjall's own byte type:
/// built as vectors, each was allocated, copied into fjall's type and freed, 100,000 of each
/// per step at 100,000 users (docs/RELIABILITY.md).
type Entry = (fjall::Slice, fjall::Slice);

/// Reads a head and then parts, as one run of bytes (an entry's value without an interim copy).
struct Concat<'p> {
    current: &'p [u8],
    parts: std::slice::Iter<'p, &'p [u8]>,
}

impl<'p> Concat<'p> {
    fn new(head: &'p [u8], parts: &'p [&'p [u8]]) -> Self {
        Self {
            current: head,
            parts: parts.iter(),
        }
    }
}

impl std::io::Read for Concat<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.parts.next() {
                Some(part) => self.current = part,
                None => return Ok(0),
            }
        }
        self.current.read(out)
    }
}

/// About how many bytes of log records an index step groups per partition ([`stage_index`]),
/// and at most how many partitions.
const PARTITION_BYTES: usize = 256 << 10;
const MAX_PARTITIONS: usize = 1024;

/// Indexes what a writer left in the log when it stopped without indexing it (a crash, a kill),
/// so that the new writer starts with an empty log and readers need only the entries.
fn index_log(store: &Store, path: &Path, next_seq: &AtomicU64, keys: LogKeys) -> Result<(), StoreError> {
    let malformed = || corrupt(path, "a journal log record is malformed");
    let mut records = Vec::new();
    for record in store.log.iter() {
        let (key, value) = record.into_inner().map_err(|e| fjall_error(path, e))?;
        // Read back from disk, so checked whole, text included, before anything is written:
        // a damaged store is refused as it is found.
        if !record_is_whole(&value) {
            return Err(malformed());
        }
        records.push((decode_seq(&key).ok_or_else(malformed)?, value));
    }
    let mut batch = store.db.batch();
    if keys == LogKeys::Fresh {
        batch.insert(&store.meta, META_FORMAT, [FORMAT]);
    } else if records.is_empty() {
        return Ok(());
    }
    let mut entries = stage_index(records.iter().map(|(seq, value)| (*seq, &value[..]))).ok_or_else(malformed)?;
    if keys == LogKeys::Fresh {
        for (key, _) in &mut entries {
            let mut fresh = key.to_vec();
            let seq = fresh.len() - 8;
            fresh[seq..].copy_from_slice(&next_seq.fetch_add(1, Ordering::Relaxed).to_be_bytes());
            *key = fresh.into();
        }
    }
    // One commit (no parts): nothing else writes before the store is open.
    write_step(store, batch, entries, &records, usize::MAX, |mut batch, _| {
        let next = next_seq.load(Ordering::Relaxed);
        batch.insert(&store.meta, META_NEXT_SEQ, next.to_be_bytes());
        batch.commit().map_err(|e| fjall_error(path, e))?;
        Ok(true)
    })?;
    store.db.persist(PersistMode::SyncAll).map_err(|e| fjall_error(path, e))
}

/// Deletes every entry of `user` (in the batch).
fn stage_erasure(store: &Store, batch: &mut fjall::OwnedWriteBatch, user: &str, path: &Path) -> Result<(), StoreError> {
    for entry in store.events.prefix(user_prefix(user)) {
        batch.remove(&store.events, entry.key().map_err(|e| fjall_error(path, e))?);
    }
    Ok(())
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
    fn event(&mut self) -> Option<(i64, Option<&'a str>, &'a str)> {
        let timestamp = self.i64()?;
        let event_type = match self.u16()? {
            NO_TYPE => None,
            len => Some(self.str_of(len)?),
        };
        Some((timestamp, event_type, self.str()?))
    }
    /// Past an event, checking only that its lengths fit.
    fn skip_event(&mut self) -> Option<()> {
        self.take(8)?;
        match self.u16()? {
            NO_TYPE => {}
            len => _ = self.take(len as usize)?,
        }
        let len = self.u16()?;
        self.take(len as usize).map(drop)
    }
    fn events(&mut self) -> Option<Vec<LoggedEvent>> {
        let count = self.u32()?;
        self.events_of(count)
    }
    fn events_of(&mut self, count: u32) -> Option<Vec<LoggedEvent>> {
        // Each event takes at least 12 bytes: a garbled count cannot make us reserve gigabytes.
        let mut events = Vec::with_capacity((count as usize).min(self.0.len() / 12));
        for _ in 0..count {
            let (timestamp, event_type, item_id) = self.event()?;
            events.push(LoggedEvent {
                item_id: Arc::from(item_id),
                timestamp,
                event_type: event_type.map(Arc::from),
            });
        }
        Some(events)
    }
}

/// The user, sequence number and events of one entry; `None` if either part is malformed or has bytes left
/// over. (Public for the fuzz target that feeds it arbitrary bytes.)
pub fn decode_entry<'k>(key: &'k [u8], value: &[u8]) -> Option<(&'k str, u64, Vec<LoggedEvent>)> {
    let mut key = Reader(key);
    let user = key.str()?;
    let seq = decode_seq(key.take(8)?)?;
    if !key.0.is_empty() {
        return None;
    }
    let mut value = Reader(value);
    let events = value.events()?;
    value.0.is_empty().then_some((user, seq, events))
}

/// One append of a log record: its user's bytes, event count and the events' bytes.
type RawAppend<'v> = (&'v [u8], u32, &'v [u8]);

/// A log record's appends, each as its user's bytes, event count and the events' bytes (what
/// follows the count); `None` if the lengths do not add up or bytes are left over. The text is
/// not checked here: a running writer's index steps move its own records' bytes into entries as
/// they are (checking every id's UTF-8 on the way was a sixth of a step's time,
/// docs/RELIABILITY.md); records read back from disk are checked whole first
/// ([`record_is_whole`]), and entries are checked where they are decoded ([`decode_entry`]).
fn split_record(value: &[u8]) -> Option<Vec<RawAppend<'_>>> {
    let mut reader = Reader(value);
    let count = reader.u32()? as usize;
    // Each append takes at least 6 bytes (user length and event count).
    let mut appends = Vec::with_capacity(count.min(reader.0.len() / 6));
    for _ in 0..count {
        let len = reader.u16()?;
        let user = reader.take(len as usize)?;
        let events = reader.u32()?;
        let start = reader.0;
        for _ in 0..events {
            reader.skip_event()?;
        }
        appends.push((user, events, &start[..start.len() - reader.0.len()]));
    }
    reader.0.is_empty().then_some(appends)
}

/// Whether a log record is whole, its text included, which [`split_record`] leaves unchecked.
fn record_is_whole(value: &[u8]) -> bool {
    split_record(value).is_some_and(|appends| {
        appends.into_iter().all(|(user, count, events)| {
            let mut reader = Reader(events);
            std::str::from_utf8(user).is_ok() && (0..count).all(|_| reader.event().is_some())
        })
    })
}

/// The sequence number and appends of one log record; `None` if malformed or with bytes left
/// over. (Public for the fuzz target.)
pub fn decode_record<'v>(key: &[u8], value: &'v [u8]) -> Option<(u64, Vec<UserEvents<'v>>)> {
    let seq = decode_seq(key)?;
    let appends = split_record(value)?
        .into_iter()
        .map(|(user, count, events)| Some((std::str::from_utf8(user).ok()?, Reader(events).events_of(count)?)))
        .collect::<Option<_>>()?;
    Some((seq, appends))
}

fn closed() -> StoreError {
    StoreError::Journal("the store is closed (shut down, or a compaction failed)".into())
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
        (".{1,12}", any::<i64>(), proptest::option::of(".{0,8}")).prop_map(|(item, timestamp, kind)| LoggedEvent {
            item_id: Arc::from(item),
            timestamp,
            event_type: kind.map(Arc::from),
        })
    }

    proptest! {
        /// Recovery reads whatever bytes the disk gives back: garbage is refused, never a panic.
        #[test]
        fn any_bytes_are_decoded_or_refused_without_panicking(
            key in prop::collection::vec(any::<u8>(), 0..40),
            value in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let _ = decode_entry(&key, &value);
            let _ = decode_record(&key, &value);
        }

        /// Log records decode to what was encoded, and a cut anywhere never reads as whole.
        #[test]
        fn records_decode_to_what_was_encoded_and_cuts_are_refused(
            seq in any::<u64>(),
            appends in prop::collection::vec((".{0,10}", prop::collection::vec(logged_event(), 0..4)), 0..5),
        ) {
            let (key, value) = encode_record(seq, &appends);
            let (decoded_seq, decoded) = decode_record(&key, &value).expect("decodes");
            prop_assert_eq!(decoded_seq, seq);
            let decoded: Vec<(String, Vec<LoggedEvent>)> =
                decoded.into_iter().map(|(user, events)| (user.to_owned(), events)).collect();
            prop_assert_eq!(&decoded, &appends);
            for cut in 0..value.len() {
                prop_assert!(decode_record(&key, &value[..cut]).is_none(), "value cut at {}", cut);
            }
        }

        /// Grouped in any number of partitions, an index step's entries are those of a plain
        /// grouping by user (the oracle): one per user with events, keyed by the first record
        /// that holds the user, the events in arrival order, in key order.
        #[test]
        fn an_index_step_in_partitions_groups_as_one_table_would(
            records in prop::collection::vec(
                prop::collection::vec(("[a-e]{0,3}", prop::collection::vec(logged_event(), 0..3)), 0..6),
                0..12,
            ),
            first_seq in 0u64..1 << 60,
            partitions in 1usize..40,
        ) {
            let encoded: Vec<(u64, Vec<u8>)> = records
                .iter()
                .enumerate()
                .map(|(i, appends)| (first_seq + i as u64, encode_record(0, appends).1))
                .collect();
            let mut oracle: HashMap<&str, (u64, Vec<LoggedEvent>)> = HashMap::new();
            for ((seq, _), appends) in encoded.iter().zip(&records) {
                for (user, events) in appends.iter().filter(|(_, events)| !events.is_empty()) {
                    oracle.entry(user).or_insert((*seq, Vec::new())).1.extend(events.iter().cloned());
                }
            }
            let mut expected: Vec<_> =
                oracle.into_iter().map(|(user, (seq, events))| encode_entry(user, seq, &events)).collect();
            expected.sort();
            let records = encoded.iter().map(|(seq, value)| (*seq, &value[..])).collect();
            let staged = stage_in_partitions(records, |_| partitions)
                .map(|entries| entries.iter().map(|(key, value)| (key.to_vec(), value.to_vec())).collect::<Vec<_>>());
            prop_assert_eq!(staged, Some(expected));
        }

        /// Entries decode to what was encoded, and a cut anywhere never reads as whole.
        #[test]
        fn entries_decode_to_what_was_encoded_and_cuts_are_refused(
            user in ".{1,16}",
            seq in any::<u64>(),
            events in prop::collection::vec(logged_event(), 0..6),
        ) {
            let (key, value) = encode_entry(&user, seq, &events);
            let (decoded_user, decoded_seq, decoded) = decode_entry(&key, &value).expect("decodes");
            prop_assert_eq!(decoded_user, user.as_str());
            prop_assert_eq!(decoded_seq, seq);
            prop_assert_eq!(&decoded, &events);
            prop_assert!(key.starts_with(&user_prefix(&user)));
            for cut in 0..value.len() {
                prop_assert!(decode_entry(&key, &value[..cut]).is_none(), "value cut at {}", cut);
            }
            for cut in 0..key.len() {
                prop_assert!(decode_entry(&key[..cut], &value).is_none(), "key cut at {}", cut);
            }
        }
    }

    /// The writer waits for the core rather than preempting the handler that woke it (see
    /// `threads::batch_scheduling`): the policy is field 41 of the thread's `stat`.
    #[test]
    fn the_writer_runs_under_batch_scheduling() {
        let dir = tempfile::tempdir().unwrap();
        let _journal = Journal::open(JournalConfig::offline(dir.path().to_path_buf())).unwrap();
        let writer_policies = || -> Vec<String> {
            let tasks = std::fs::read_dir("/proc/self/task").unwrap().flatten();
            tasks
                .filter(|task| {
                    std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == "journal-writer")
                })
                .filter_map(|task| {
                    let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                    let after_name = &stat[stat.rfind(')')? + 2..];
                    after_name.split_whitespace().nth(41 - 3).map(str::to_owned)
                })
                .collect()
        };
        let started = Instant::now();
        // The thread sets its policy first thing; give it the moment to start.
        while !writer_policies().contains(&libc::SCHED_BATCH.to_string()) {
            assert!(started.elapsed() < Duration::from_secs(10), "{:?}", writer_policies());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn one_users_prefix_never_matches_another_user() {
        for (a, b) in [("ab", "abc"), ("a", "a\u{0}"), ("", "x")] {
            let (key, _) = encode_entry(b, 7, &[]);
            assert!(!key.starts_with(&user_prefix(a)), "{a:?} vs {b:?}");
        }
    }

    fn event(item: &str, timestamp: i64, kind: Option<&str>) -> LoggedEvent {
        LoggedEvent {
            item_id: Arc::from(item),
            timestamp,
            event_type: kind.map(Arc::from),
        }
    }

    /// Every user replay gives back, with the events in order.
    fn logged(journal: &Journal) -> Vec<(String, Vec<LoggedEvent>)> {
        let mut all: Vec<(String, Vec<LoggedEvent>)> = Vec::new();
        journal
            .replay(|user, _, events| match all.last_mut() {
                Some((last, kept)) if last == user => kept.extend(events),
                _ => all.push((user.to_owned(), events)),
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
                let _ = journal.append(user, &events.into(), false);
            }
        }
        journal
            .append(kept, &vec![event("last", 5, None)].into(), true)
            .unwrap()
            .wait_blocking()
            .unwrap();
        journal.index().wait_blocking().unwrap();
        assert_eq!(journal.load(gone).unwrap().len(), 3);
        journal.erase(Arc::from(gone)).wait_blocking().unwrap();
        assert_eq!(journal.load(gone).unwrap(), [], "erased at once for readers");
        assert_eq!(journal.committed(), journal.queued());
        journal.compact().wait_blocking().unwrap();
        journal.close();

        let reopened = Journal::open(config).unwrap();
        let users = logged(&reopened);
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].0, kept);
        let items: Vec<&str> = users[0].1.iter().map(|e| &*e.item_id).collect();
        assert_eq!(items, ["item-0", "item-1", "item-2", "last"], "arrival order");
        assert_eq!(reopened.load(kept).unwrap(), users[0].1);
        // New events go after the recovered ones (the sequence number survived the compaction).
        reopened
            .append(kept, &vec![event("after", 1, None)].into(), true)
            .unwrap()
            .wait_blocking()
            .unwrap();
        reopened.index().wait_blocking().unwrap();
        assert_eq!(logged(&reopened)[0].1.last().unwrap().item_id.as_ref(), "after");
        reopened.close();
    }

    /// Format 3 keyed entries by numbers taken when the index step ran, so a record still in
    /// the log (11) can be older than an entry indexed for the same user (12): what a build
    /// before 68a95cc killed just after a background step leaves.
    #[test]
    fn a_format_3_log_is_indexed_after_its_entries_and_the_store_is_marked_4() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = (event("older", 1, None), event("newer", 2, None));
        {
            let (store, _) = Store::open(&live_dir(dir.path())).unwrap();
            let (key, value) = encode_entry("a", 12, std::slice::from_ref(&older));
            store.events.insert(key, value).unwrap();
            let (key, value) = encode_record(11, &[("a", vec![newer.clone()])]);
            store.log.insert(key, value).unwrap();
            store.meta.insert(META_NEXT_SEQ, 13u64.to_be_bytes()).unwrap();
            store.meta.insert(META_FORMAT, [FORMAT_FRESH_KEYS]).unwrap();
            store.db.persist(PersistMode::SyncAll).unwrap();
        }
        let journal = Journal::open(JournalConfig::offline(dir.path().to_path_buf())).unwrap();
        assert_eq!(logged(&journal), vec![("a".to_string(), vec![older, newer])]);
        let format = journal
            .shared
            .read(|store| Ok(store.meta.get(META_FORMAT).unwrap()))
            .unwrap();
        assert_eq!(format.as_deref(), Some(&[FORMAT][..]));
        journal.close();
    }

    /// Text the index steps of a running writer do not check (its records are its own) is
    /// checked in records read back from disk: damage is refused at the start that finds it,
    /// before anything is written.
    #[test]
    fn a_start_refuses_a_log_record_with_damaged_text_and_writes_nothing() {
        // The first byte of the user id, then of the item id: after the append count (4), the
        // id's length (2), "user" (4), the event count (4), the timestamp (8) and the absent
        // type (2), the item id's length (2).
        for damaged in [6, 26] {
            let dir = tempfile::tempdir().unwrap();
            let (key, mut value) = encode_record(5, &[("user", vec![event("item", 1, None)])]);
            assert_eq!(value[damaged], if damaged == 6 { b'u' } else { b'i' });
            value[damaged] = 0xFF;
            {
                let (store, _) = Store::open(&live_dir(dir.path())).unwrap();
                store.log.insert(&key, &value).unwrap();
                store.meta.insert(META_NEXT_SEQ, 6u64.to_be_bytes()).unwrap();
                store.db.persist(PersistMode::SyncAll).unwrap();
            }
            let refused = Journal::open(JournalConfig::offline(dir.path().to_path_buf()))
                .err()
                .expect("a damaged record is refused");
            assert!(refused.to_string().contains("log record is malformed"), "{refused}");
            let (store, _) = Store::open(&live_dir(dir.path())).unwrap();
            assert_eq!(
                store.log.get(&key).unwrap().as_deref(),
                Some(&value[..]),
                "kept as it was"
            );
            assert!(store.events.is_empty().unwrap(), "nothing indexed");
        }
    }

    #[test]
    fn appends_are_read_once_indexed_and_a_start_indexes_what_a_killed_writer_left() {
        let dir = tempfile::tempdir().unwrap();
        let config = JournalConfig::offline(dir.path().to_path_buf());
        let (a1, a2, b1, b2, c1) = (
            event("a1", 1, None),
            event("a2", 2, None),
            event("b1", 1, Some("view")),
            event("b2", 2, None),
            event("c1", 1, None),
        );
        {
            // What a writer killed before its index step leaves: a log record and its seq.
            let (store, _) = Store::open(&live_dir(dir.path())).unwrap();
            let appends = [
                ("b", vec![b1.clone()]),
                ("a", vec![a1.clone()]),
                ("b", vec![b2.clone()]),
            ];
            let (key, value) = encode_record(5, &appends);
            store.log.insert(key, value).unwrap();
            store.meta.insert(META_NEXT_SEQ, 6u64.to_be_bytes()).unwrap();
            store.db.persist(PersistMode::SyncAll).unwrap();
        }
        let journal = Journal::open(config.clone()).unwrap();
        assert!(
            journal.shared.read(|store| Ok(store.log.is_empty().unwrap())).unwrap(),
            "indexed at open"
        );
        assert_eq!(journal.load("b").unwrap(), [b1.clone(), b2.clone()]);
        // Committed but pending (the index step is seconds away): not read yet.
        for (user, new) in [("c", &c1), ("a", &a2)] {
            let commit = journal.append(user, &vec![new.clone()].into(), true).unwrap();
            commit.wait_blocking().unwrap();
        }
        assert_eq!(journal.committed(), journal.queued());
        assert!(journal.indexed() < journal.committed(), "not indexed yet");
        assert_eq!(journal.load("a").unwrap(), std::slice::from_ref(&a1));
        journal.index().wait_blocking().unwrap();
        assert_eq!(journal.indexed(), journal.queued());
        assert_eq!(journal.load("a").unwrap(), [a1.clone(), a2.clone()]);
        let expected = vec![
            ("a".to_owned(), vec![a1, a2]),
            ("b".to_owned(), vec![b1, b2]),
            ("c".to_owned(), vec![c1]),
        ];
        assert_eq!(logged(&journal), expected, "each user once, in key order");
        journal.close();
        let reopened = Journal::open(config).unwrap();
        assert_eq!(logged(&reopened), expected);
        reopened.close();
    }

    /// With an index step due after every group (a tiny `index_bytes`), steps run on the
    /// indexer while the writer goes on logging, and meet the writer's own steps (before an
    /// erasure, on `index()`, at the stop): every user's events still read back exactly, in
    /// arrival order, erased users stay empty, `indexed` reaches `queued`, and after a reopen
    /// new entries never overwrite old ones (the stored sequence number only grows).
    #[test]
    fn index_steps_beside_the_writer_keep_every_users_events_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = JournalConfig {
            index_bytes: 1,
            background_nice: 0,
            ..JournalConfig::offline(dir.path().to_path_buf())
        };
        let users: Vec<String> = (0..23).map(|u| format!("user-{u}")).collect();
        let mut expected: std::collections::BTreeMap<String, Vec<LoggedEvent>> = Default::default();
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for session in 0..2 {
            let journal = Journal::open(config.clone()).unwrap();
            for call in 0..400 {
                let mut commits = Vec::new();
                for _ in 0..1 + next(6) {
                    let user = &users[next(users.len() as u64) as usize];
                    let events: Vec<LoggedEvent> = (0..1 + next(3))
                        .map(|i| event(&format!("s{session}-c{call}-{i}"), next(50) as i64, None))
                        .collect();
                    expected.entry(user.clone()).or_default().extend(events.iter().cloned());
                    commits.extend(journal.append(user, &events.into(), next(4) == 0));
                }
                if call % 97 == 13 {
                    let gone = &users[next(users.len() as u64) as usize];
                    commits.push(journal.erase(Arc::from(gone.as_str())));
                    expected.remove(gone);
                }
                if call % 50 == 0 {
                    for commit in commits.drain(..) {
                        commit.wait_blocking().unwrap();
                    }
                }
            }
            journal.index().wait_blocking().unwrap();
            assert_eq!(journal.indexed(), journal.queued());
            for user in &users {
                let want = expected.get(user).cloned().unwrap_or_default();
                assert_eq!(journal.load(user).unwrap(), want, "session {session}: {user}");
            }
            journal.close();
        }
        let reopened = Journal::open(config).unwrap();
        let replayed: std::collections::BTreeMap<String, Vec<LoggedEvent>> = logged(&reopened).into_iter().collect();
        assert_eq!(replayed, expected);
        reopened.close();
    }

    /// A failed background step leaves its records in the log on disk; the failed journal must
    /// then change nothing more: a compaction falling due would copy the entries without them.
    /// The next start indexes them.
    #[cfg(feature = "failpoints")]
    #[test]
    fn after_a_failed_index_step_nothing_acknowledged_is_lost_and_a_start_indexes_it() {
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let config = JournalConfig {
            erasure_compaction_delay: Duration::from_millis(200),
            ..failing_in("journal-indexer", dir.path())
        };
        let journal = Journal::open(config.clone()).unwrap();
        // An erasure makes a compaction due soon.
        journal.erase(Arc::from("someone")).wait_blocking().unwrap();
        let kept = vec![event("a", 1, None), event("b", 2, Some("click"))];
        // Acknowledged, then handed to the indexer, which fails.
        journal
            .append("u", &kept.clone().into(), true)
            .unwrap()
            .wait_blocking()
            .unwrap();
        wait_until_failed(&journal);
        // Past the compaction's due time.
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            journal.indexed() < journal.queued(),
            "a failed step's appends counted as indexed"
        );
        journal.close();
        fail::remove("journal-indexer");
        let reopened = Journal::open(config).unwrap();
        assert_eq!(logged(&reopened), vec![("u".to_string(), kept)]);
        reopened.close();
        scenario.teardown();
    }

    /// A journal in `dir` whose fail point `point` fails there (not in other tests' journals),
    /// with an index step on the indexer after every group (one entry per part).
    #[cfg(feature = "failpoints")]
    fn failing_in(point: &str, dir: &Path) -> JournalConfig {
        let name = dir.file_name().unwrap().to_str().unwrap();
        fail::cfg(point, &format!("return({name})")).unwrap();
        JournalConfig {
            index_bytes: 1,
            background_nice: 0,
            ..JournalConfig::offline(dir.to_path_buf())
        }
    }

    #[cfg(feature = "failpoints")]
    fn wait_until_failed(journal: &Journal) {
        let started = Instant::now();
        while journal.health().is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the failed step was not noticed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The step's first part (one user's entry) is committed, then the step stops with its log
    /// records still on disk, as a kill there would leave them.
    #[cfg(feature = "failpoints")]
    #[test]
    fn a_step_cut_between_its_parts_is_indexed_again_at_the_next_start_without_copies() {
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let config = failing_in("journal-index-part", dir.path());
        let journal = Journal::open(config.clone()).unwrap();
        let users = ["ann", "bob", "cat"];
        let events = |user: &str| {
            vec![
                event(&format!("{user}-1"), 1, None),
                event(&format!("{user}-2"), 2, None),
            ]
        };
        // Queued together, they make one record, so one step of three entries.
        for (i, user) in users.iter().enumerate() {
            if let Some(commit) = journal.append(user, &events(user).into(), i == users.len() - 1) {
                commit.wait_blocking().unwrap();
            }
        }
        wait_until_failed(&journal);
        assert_eq!(
            journal.load("ann").unwrap(),
            events("ann"),
            "the first part was not committed"
        );
        journal.close();
        fail::remove("journal-index-part");
        let reopened = Journal::open(config).unwrap();
        let expected: Vec<_> = users.iter().map(|user| (user.to_string(), events(user))).collect();
        assert_eq!(logged(&reopened), expected);
        reopened.close();
        scenario.teardown();
    }

    /// What a panicked writer leaves queued is answered, the appends gathered after the last
    /// command included (their callers would otherwise wait for good).
    #[test]
    fn closing_the_inbox_hands_over_every_queued_acknowledgement() {
        let inbox = Inbox::new();
        let mut receivers = Vec::new();
        let mut ack = || {
            let (sender, receiver) = oneshot::channel();
            receivers.push(receiver);
            sender
        };
        let events = EncodedEvents::from(vec![event("i", 1, None)]);
        {
            let mut state = inbox.lock();
            state.appends.push("a", &events, Some(ack()));
            state.close_appends();
            state.commands.push(JournalCommand::Index { ack: Some(ack()) });
            state.appends.push("b", &events, Some(ack()));
        }
        reply_all(inbox.close_and_take(), &Err(StoreError::Stopped));
        for mut receiver in receivers {
            assert!(matches!(receiver.try_recv(), Ok(Err(StoreError::Stopped))));
        }
        assert!(!inbox.lock().open);
    }

    #[test]
    fn a_record_extended_by_another_holds_both_records_appends_in_order() {
        let record = |appends: &[(&str, Vec<LoggedEvent>)]| {
            let mut builder = RecordBuilder::default();
            for (user, events) in appends {
                builder.push(user, &events.as_slice().into());
            }
            builder
        };
        let first = [
            ("a", vec![event("1", 1, None)]),
            ("b", vec![event("2", 2, Some("buy"))]),
        ];
        let second = [("a", vec![event("3", 3, None), event("4", 4, None)])];
        let all: Vec<_> = first.iter().chain(&second).cloned().collect();
        for (before, after, expected) in [(&first[..], &second[..], &all[..]), (&[], &second, &second)] {
            let mut extended = record(before);
            extended.extend(record(after));
            assert_eq!(extended.finish(), encode_record(0, expected).1);
        }
    }

    #[test]
    fn appends_past_one_group_are_written_once_in_order_and_each_counted() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(JournalConfig::offline(dir.path().to_path_buf())).unwrap();
        let appends = 2 * MAX_GROUP + 3;
        let mut expected: std::collections::BTreeMap<String, Vec<LoggedEvent>> = Default::default();
        let mut last = None;
        for i in 0..appends {
            let user = format!("u{}", i % 3);
            // Empty appends are changes too (queued and committed), with nothing to write.
            let events = match i % 1000 {
                7 => Vec::new(),
                _ => vec![event(&format!("item-{i}"), i as i64, None)],
            };
            expected.entry(user.clone()).or_default().extend(events.iter().cloned());
            last = journal.append(&user, &events.into(), i == appends - 1);
        }
        last.unwrap().wait_blocking().unwrap();
        assert_eq!((journal.queued(), journal.committed()), (appends, appends));
        journal.index().wait_blocking().unwrap();
        assert_eq!(logged(&journal), expected.into_iter().collect::<Vec<_>>());
        journal.close();
    }

    #[test]
    fn an_erasure_in_the_same_group_as_appends_removes_them_and_later_appends_stay() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(JournalConfig::offline(dir.path().to_path_buf())).unwrap();
        // Queued back to back, these share the writer's group (or not: the outcome is the same).
        let _ = journal.append("u", &vec![event("before", 1, None)].into(), false);
        let erased = journal.erase(Arc::from("u"));
        let after = journal.append("u", &vec![event("after", 2, None)].into(), true);
        erased.wait_blocking().unwrap();
        after.unwrap().wait_blocking().unwrap();
        journal.index().wait_blocking().unwrap();
        let items: Vec<String> = journal
            .load("u")
            .unwrap()
            .iter()
            .map(|e| e.item_id.to_string())
            .collect();
        assert_eq!(items, ["after"]);
        journal.close();
    }

    #[test]
    fn a_store_of_another_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(JournalConfig::offline(dir.path().to_path_buf())).unwrap();
        journal.close();
        let db = Database::builder(live_dir(dir.path())).open().unwrap();
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
        meta.insert(META_FORMAT, [9]).unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
        drop((meta, db));
        let refused = Journal::open(JournalConfig::offline(dir.path().to_path_buf()))
            .err()
            .unwrap();
        assert!(refused.to_string().contains("journal format [9]"), "{refused}");
    }

    #[test]
    fn odd_ids_round_trip_and_malformed_entries_are_refused() {
        let events = vec![
            event("Toy Story (1995)", -5, None),
            event("é,\"x\"", i64::MAX, Some("")),
        ];
        let (key, value) = encode_entry("Toy Story fan, \"x\"", 3, &events);
        assert_eq!(decode_entry(&key, &value), Some(("Toy Story fan, \"x\"", 3, events)));
        let mut longer = value.clone();
        longer.push(0);
        assert_eq!(decode_entry(&key, &longer), None, "bytes left over");
        assert_eq!(decode_entry(&key, &[0, 0, 0, 9]), None, "count larger than the events");
    }
}
