//! The journal's write path on fjall (the engine the store uses) beside redb, on issue 9's ingest
//! shape: 16 clients each sending calls of 100 events for random users among 10,000 and waiting
//! for the acknowledgement. fjall runs through the real `Journal` (one writer thread, group
//! commit); redb gets the same design — one writer thread that commits every waiting call in one
//! write transaction — and stores the very same entries (one per user and call, keyed by user
//! and sequence number). Modes as `--fsync`: `always` (the
//! acknowledgement waits for an fsync) and `interval` (written at once, fsynced every second).
//!
//!   cargo bench --bench journal_engines          (results in docs/RELIABILITY.md)
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use redb::{Database, Durability, TableDefinition};
use xsrec::history::journal::encode_entry;
use xsrec::history::{FsyncPolicy, Journal, JournalConfig, LoggedEvent};

const CLIENTS: usize = 16;
const EVENTS_PER_CALL: usize = 100;
const USERS: usize = 10_000;
const SECONDS: u64 = 8;
const EVENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("events");

type Call = Vec<(Arc<str>, Vec<LoggedEvent>)>;

fn call(rng: &mut ChaCha8Rng) -> Call {
    let mut groups: Vec<(Arc<str>, Vec<LoggedEvent>)> = Vec::new();
    for _ in 0..EVENTS_PER_CALL {
        let user: Arc<str> = format!("user-{}", rng.gen_range(0..USERS)).into();
        let event = LoggedEvent {
            item_id: format!("item-{}", rng.gen_range(0..20_000)).into(),
            timestamp: 1_700_000_000 + rng.gen_range(0..10_000_000),
            event_type: Some(Arc::from("view")),
        };
        match groups.iter_mut().find(|(u, _)| *u == user) {
            Some((_, events)) => events.push(event),
            None => groups.push((user, vec![event])),
        }
    }
    groups
}

/// Runs `CLIENTS` threads calling `send` for `SECONDS`; events per second.
fn drive(send: impl Fn(Call) + Sync) -> f64 {
    let calls = AtomicUsize::new(0);
    let until = Instant::now() + Duration::from_secs(SECONDS);
    std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let (send, calls) = (&send, &calls);
            scope.spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(client as u64);
                while Instant::now() < until {
                    send(call(&mut rng));
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (calls.into_inner() * EVENTS_PER_CALL) as f64 / SECONDS as f64
}

fn fjall(fsync: FsyncPolicy) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(JournalConfig {
        fsync,
        fsync_interval: Duration::from_secs(1),
        ..JournalConfig::offline(dir.path().to_path_buf())
    })
    .unwrap();
    let rate = drive(|call| {
        let last = call.len() - 1;
        for (i, (user, events)) in call.into_iter().enumerate() {
            if let Some(commit) = journal.append(&user, &events.into(), i == last) {
                commit.wait_blocking().unwrap();
            }
        }
    });
    journal.close();
    rate
}

fn redb(fsync: FsyncPolicy) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Database::create(dir.path().join("journal.redb")).unwrap());
    let (queue, calls) = mpsc::channel::<(Call, mpsc::Sender<()>)>();
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || {
            let (mut seq, mut last_sync) = (0u64, Instant::now());
            while let Ok(first) = calls.recv() {
                let group: Vec<_> = std::iter::once(first).chain(calls.try_iter().take(63)).collect();
                let sync = fsync == FsyncPolicy::Always || last_sync.elapsed() >= Duration::from_secs(1);
                let mut txn = db.begin_write().unwrap();
                txn.set_durability(if sync { Durability::Immediate } else { Durability::None });
                {
                    let mut table = txn.open_table(EVENTS).unwrap();
                    for (user, events) in group.iter().flat_map(|(call, _)| call) {
                        let (key, value) = encode_entry(user, seq, events);
                        table.insert(key.as_slice(), value.as_slice()).unwrap();
                        seq += 1;
                    }
                }
                txn.commit().unwrap();
                if sync {
                    last_sync = Instant::now();
                }
                for (_, ack) in group {
                    let _ = ack.send(());
                }
            }
        })
    };
    let rate = drive(|call| {
        let (ack, acked) = mpsc::channel();
        queue.send((call, ack)).unwrap();
        acked.recv().unwrap();
    });
    drop(queue);
    writer.join().unwrap();
    rate
}

fn main() {
    println!("| engine | fsync | events/s |");
    println!("|---|---|---:|");
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Interval] {
        for (engine, run) in [("fjall", fjall as fn(FsyncPolicy) -> f64), ("redb", redb)] {
            println!("| {engine} | {fsync:?} | {:.0} |", run(fsync));
        }
    }
}
