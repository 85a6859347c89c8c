//! The journal's index step alone: the CPU time of turning a full step of log records (the
//! default 64 MiB, here 1.5 M appends of one event each for random users among 100,000, as
//! `xsrec bench load --mode ingest --users 100000` sends them) into one entry per user.
//! Appends go in with steps held off, then `Journal::index` runs the step; its wall time is
//! what is reported (min and median of `ROUNDS` steps in one store, as a server runs them;
//! fsync `never`, so the disk adds only page-cache writes).
//!
//!   cargo bench --bench journal_index          (results in docs/RELIABILITY.md)
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xsrec::history::journal::EncodedEvents;
use xsrec::history::{FsyncPolicy, Journal, JournalConfig};

const USERS: usize = 100_000;
const APPENDS: usize = 1_500_000;
const APPENDS_PER_CALL: usize = 100;
const ROUNDS: usize = 5;

/// `ROUNDS` index steps in one store, each over `APPENDS` fresh appends; their wall times.
fn steps() -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(JournalConfig {
        fsync: FsyncPolicy::Never,
        index_bytes: usize::MAX,
        ..JournalConfig::offline(dir.path().to_path_buf())
    })
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut events = EncodedEvents::default();
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let indexed = journal.indexed();
        for call in 0..APPENDS / APPENDS_PER_CALL {
            for i in 0..APPENDS_PER_CALL {
                let user = format!("user-{}", rng.gen_range(0..USERS));
                let item = format!("item-{}", rng.gen_range(0..20_000));
                let at = 1_700_000_000 + ((round * APPENDS + call * APPENDS_PER_CALL + i) as i64);
                events.clear();
                events.push(at, Some("view"), &item);
                if let Some(commit) = journal.append(&user, &events, i == APPENDS_PER_CALL - 1) {
                    commit.wait_blocking().unwrap();
                }
            }
        }
        assert_eq!(
            journal.indexed(),
            indexed,
            "a step ran before the timed one (the appends took over 5 s)"
        );
        let started = Instant::now();
        journal.index().wait_blocking().unwrap();
        times.push(started.elapsed());
    }
    journal.close();
    times
}

fn main() {
    let mut times = steps();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "index step of {APPENDS} appends for {USERS} users: min {:.1} ms, median {:.1} ms ({:.0} ns per append)",
        ms(times[0]),
        ms(times[ROUNDS / 2]),
        times[ROUNDS / 2].as_nanos() as f64 / APPENDS as f64,
    );
}
