//! Durable state over real HTTP: restarts, SIGKILLs, erasure down to the bytes on disk, a failing
//! inference worker, power cuts, and the inference cache's rules.
mod common;
mod lazyfs;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fixture, server, users, ServerProcess};
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn dir_arg(dir: &Path) -> &str {
    dir.to_str().unwrap()
}

/// `(item_id, timestamp, event_type)` of a user's history as the server returns it.
async fn history(client: &reqwest::Client, base: &str, user: &str) -> Vec<(String, i64, Option<String>)> {
    let response = client
        .get(format!("{base}/v1/users/{user}/history"))
        .send()
        .await
        .unwrap();
    if response.status() == StatusCode::NOT_FOUND {
        return Vec::new();
    }
    let body: Value = response.json().await.unwrap();
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["item_id"].as_str().unwrap().to_owned(),
                e["timestamp"].as_i64().unwrap(),
                e["event_type"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_survive_a_restart_and_the_journal_keeps_more_than_memory() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture();
    let by_user = users(&fx.events);
    let durable = ["--data-dir", dir_arg(dir.path()), "--fsync", "always"];
    let first = server(&[&durable[..], &["--history-cap", "1000"]].concat()).await;
    // Shuffled chunks, so events arrive out of order across calls; plus unknown items and types.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut all: Vec<&xsrec::data::Event> = fx.events.iter().collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.gen_range(0..=i));
    }
    first.ingest(&all).await;
    let extra = json!({"events": [
        {"user_id": "odd user, \"quoted\"", "item_id": "not in the catalogue", "timestamp": 5, "event_type": "never-seen-type"},
        {"user_id": "odd user, \"quoted\"", "item_id": "i1", "timestamp": 5}
    ]});
    let (status, reply) = first.post("/v1/events", &extra).await;
    assert_eq!((status, &reply["unknown_event_types"]), (StatusCode::OK, &json!(1)));
    let names: Vec<&str> = by_user.keys().copied().chain(["odd user, \"quoted\""]).collect();
    let mut before = BTreeMap::new();
    for user in &names {
        before.insert(*user, history(&first.client, &first.base, user).await);
    }
    let probe = json!({"user_id": names[0], "k": 10, "at": 10_000_000});
    let (_, expected) = first.post("/v1/recommend", &probe).await;
    first.shut_down().await.unwrap();

    // Same memory cap: the very same histories and answers.
    let second = server(&[&durable[..], &["--history-cap", "1000"]].concat()).await;
    for user in &names {
        assert_eq!(
            history(&second.client, &second.base, user).await,
            before[user],
            "{user}"
        );
    }
    assert_eq!(second.post("/v1/recommend", &probe).await.1["items"], expected["items"]);
    second.shut_down().await.unwrap();

    // A smaller memory cap keeps the newest events; the journal still has them all.
    let small = server(&[&durable[..], &["--history-cap", "3"]].concat()).await;
    for user in &names {
        let full = &before[user];
        assert_eq!(
            history(&small.client, &small.base, user).await,
            full[full.len().saturating_sub(3)..],
            "{user}"
        );
    }
    small.shut_down().await.unwrap();
    let again = server(&[&durable[..], &["--history-cap", "1000"]].concat()).await;
    assert_eq!(history(&again.client, &again.base, names[1]).await, before[names[1]]);
    // The type the model never saw is kept by name on disk (memory reads it as untyped).
    let exported = dir.path().join("export.inter");
    again.shut_down().await.unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_xsrec"))
        .args(["history", "export", "--data-dir", dir_arg(dir.path()), "--out"])
        .arg(&exported)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&exported).unwrap();
    assert!(text.contains("odd user, \"quoted\"\tnot in the catalogue\t5\tnever-seen-type"));
    let loaded = xsrec::data::formats::load_events(&exported, &Default::default()).unwrap();
    assert_eq!(loaded.events.len(), fx.events.len() + 2);
}

/// Every file under `dir` whose bytes contain `needle`. A compaction may rename or remove
/// folders during the search: what vanished is skipped (its files are gone with it).
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle)) {
                found.push(path);
            }
        }
    }
    found
}

/// Waits (at most 30 s) until no file under `dir` holds `user`'s id.
async fn erased_from_every_file(dir: &Path, user: &str) {
    let started = Instant::now();
    while !files_containing(dir, user.as_bytes()).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{user}'s bytes still on disk"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_user_is_in_no_file_after_compaction_and_stays_erased_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--data-dir",
        dir_arg(dir.path()),
        "--erasure-compaction-secs",
        "0",
        "--history-cap",
        "1000",
    ];
    let server = server(&args).await;
    let (gone, kept) = ("erase-me-5c1e0b9a", "keep-me-9d24e7f1");
    for user in [gone, kept] {
        let events: Vec<Value> = (0..50)
            .map(|i| json!({"user_id": user, "item_id": format!("i{}", i % 7 + 1), "timestamp": 1000 + i}))
            .collect();
        assert_eq!(
            server.post("/v1/events", &json!({ "events": events })).await.0,
            StatusCode::OK
        );
    }
    let (status, _) = server.post("/v1/recommend", &json!({"user_id": gone})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !files_containing(dir.path(), gone.as_bytes()).is_empty(),
        "the search must find a stored user before the erasure"
    );
    assert_eq!(
        server.delete(&format!("/v1/users/{gone}")).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(server.delete(&format!("/v1/users/{gone}")).await, StatusCode::NOT_FOUND);
    erased_from_every_file(dir.path(), gone).await;
    assert!(!files_containing(dir.path(), kept.as_bytes()).is_empty());
    assert_eq!(
        server.metric("xsrec_cached_states").await,
        0.0,
        "no cached state of anyone left"
    );
    // Writes after the compaction land in the new files.
    let late = json!({"events": [{"user_id": kept, "item_id": "i2", "timestamp": 5000}]});
    assert_eq!(server.post("/v1/events", &late).await.0, StatusCode::OK);
    server.shut_down().await.unwrap();

    let server = common::server(&args).await;
    assert_eq!(history(&server.client, &server.base, gone).await, Vec::new());
    let kept_history = history(&server.client, &server.base, kept).await;
    assert_eq!(kept_history.len(), 51);
    assert_eq!(kept_history.last().unwrap().1, 5000);
}

/// A process killed after an erasure was acknowledged and before its compaction: the erased
/// user's bytes stayed on disk for good (found by a hostile probe), since only the memory of the
/// killed process knew a compaction was owed. The next start now owes it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_killed_before_its_compaction_is_compacted_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (gone, kept) = ("erase-me-killed-0e7a4c", "keep-me-killed-61b2d9");
    let client = reqwest::Client::new();
    let start = |delay: &str| {
        ServerProcess::spawn(
            &fixture().model,
            &["--data-dir", dir_arg(dir.path()), "--erasure-compaction-secs", delay],
            &[],
        )
    };
    let mut server = start("3600");
    server.wait_ready(&client, Duration::from_secs(60)).await;
    for user in [gone, kept] {
        let events = json!({"events": [{"user_id": user, "item_id": "i1", "timestamp": 1000}]});
        let sent = server.post(&client, "/v1/events", &events).await;
        assert_eq!(sent.status(), StatusCode::OK);
    }
    let erased = client.delete(format!("{}/v1/users/{gone}", server.base)).send().await;
    assert_eq!(erased.unwrap().status(), StatusCode::NO_CONTENT);
    server.kill();
    assert!(
        !files_containing(dir.path(), gone.as_bytes()).is_empty(),
        "the kill came before the compaction (an hour away), so the bytes are still there"
    );

    let server = start("0");
    server.wait_ready(&client, Duration::from_secs(60)).await;
    erased_from_every_file(dir.path(), gone).await;
    assert!(!files_containing(dir.path(), kept.as_bytes()).is_empty());
    assert_eq!(history(&client, &server.base, gone).await, Vec::new());
    assert_eq!(history(&client, &server.base, kept).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_events_from_memory_at_once_and_from_disk_at_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--data-dir",
        dir_arg(dir.path()),
        "--fsync",
        "always",
        "--retention",
        "8s",
    ];
    let server = common::server(&args).await;
    let now = xsrec::data::unix_now();
    let events = json!({"events": [
        {"user_id": "mixed", "item_id": "old-item-3c1f", "timestamp": now - 1000},
        // An hour ahead, so that the test can take its time without this one expiring too.
        {"user_id": "mixed", "item_id": "i1", "timestamp": now + 3600},
        {"user_id": "only-old", "item_id": "old-item-3c1f", "timestamp": now - 2000},
    ]});
    assert_eq!(server.post("/v1/events", &events).await.0, StatusCode::OK);
    let started = std::time::Instant::now();
    while history(&server.client, &server.base, "mixed").await.len() > 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "memory kept events past retention"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(history(&server.client, &server.base, "only-old").await, Vec::new());
    assert!(server.metric("xsrec_expired_events_total").await >= 2.0);
    // Retention compactions run every quarter of the retention: then no file has the old item.
    while !files_containing(dir.path(), b"old-item-3c1f").is_empty() {
        assert!(started.elapsed() < Duration::from_secs(20), "old events still on disk");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shut_down().await.unwrap();

    let server = common::server(&args).await;
    let kept = history(&server.client, &server.base, "mixed").await;
    assert_eq!(kept, vec![("i1".to_owned(), now + 3600, None)]);
    assert_eq!(history(&server.client, &server.base, "only-old").await, Vec::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_before_an_erasure_does_not_put_the_user_back_into_the_cache() {
    // The recommend waits 300 ms in the batcher; the erasure lands meanwhile.
    let server = server(&["--max-batch-delay-us", "300000"]).await;
    let user = "racing-user";
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"user_id": user, "item_id": format!("i{}", i + 1), "timestamp": 100 + i}))
        .collect();
    assert_eq!(
        server.post("/v1/events", &json!({ "events": events })).await.0,
        StatusCode::OK
    );
    let queued = tokio::spawn({
        let client = server.client.clone();
        let url = format!("{}/v1/recommend", server.base);
        async move {
            client
                .post(url)
                .json(&json!({"user_id": user}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    // Erase as soon as the request is queued (the queue-depth gauge shows it).
    let started = std::time::Instant::now();
    while server.metric("xsrec_queue_depth").await < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        server.delete(&format!("/v1/users/{user}")).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        queued.await.unwrap(),
        StatusCode::OK,
        "the queued request is still answered"
    );
    assert_eq!(server.metric("xsrec_cached_states").await, 0.0);
}

async fn cache_counts(server: &common::Server) -> (f64, f64) {
    (
        server.metric("xsrec_cache_hits_total").await,
        server.metric("xsrec_cache_misses_total").await,
    )
}

async fn ask_at(server: &common::Server, user: &str, at: i64) -> Value {
    let (status, reply) = server.post("/v1/recommend", &json!({"user_id": user, "at": at})).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    reply["items"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_answers_only_while_history_and_gap_bucket_are_unchanged() {
    let server = server(&[]).await;
    let user = "cached-user";
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"user_id": user, "item_id": format!("i{}", i + 1), "timestamp": 1000 + i}))
        .collect();
    assert_eq!(
        server.post("/v1/events", &json!({ "events": events })).await.0,
        StatusCode::OK
    );
    let (h0, m0) = cache_counts(&server).await;
    // The newest event is at 1004: gaps of 5 and 6 s share a log2 bucket, 3,600 s does not.
    let first = ask_at(&server, user, 1009).await;
    assert_eq!(cache_counts(&server).await, (h0, m0 + 1.0), "first answer computes");
    assert_eq!(
        ask_at(&server, user, 1010).await,
        first,
        "a hit returns the same answer"
    );
    assert_eq!(
        cache_counts(&server).await,
        (h0 + 1.0, m0 + 1.0),
        "same history, same gap bucket: hit"
    );
    ask_at(&server, user, 1004 + 3600).await;
    assert_eq!(
        cache_counts(&server).await,
        (h0 + 1.0, m0 + 2.0),
        "a new session's gap bucket: miss"
    );
    let more = json!({"events": [{"user_id": user, "item_id": "i9", "timestamp": 1006}]});
    assert_eq!(server.post("/v1/events", &more).await.0, StatusCode::OK);
    ask_at(&server, user, 1010).await;
    assert_eq!(cache_counts(&server).await, (h0 + 1.0, m0 + 3.0), "a new event: miss");
}

/// One crash round's driver: four clients ingest batches for 40 users at a steady pace and record
/// what was acknowledged, until the server is killed.
#[derive(Default)]
struct Ledger {
    /// Per user: every event sent (item id → timestamp) and the acknowledged ones (item id → when
    /// the acknowledgement came).
    sent: HashMap<String, HashMap<String, i64>>,
    acked: HashMap<String, HashMap<String, Instant>>,
    next_event: u64,
}

/// How a crash round ends.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Crash {
    /// SIGKILL: what the process wrote stays in the OS, fsynced or not.
    Kill,
    /// SIGKILL, then everything not fsynced is dropped (the data directory is a [`lazyfs`] mount).
    PowerCut,
}

/// `--fsync-interval-ms` of the power-cut rounds with `interval`, and the slack a sync may take
/// beyond it on a busy machine: an event acknowledged longer than both before a cut must survive
/// it. A power-cut round runs 1.0–1.6 s, so that most of its events are older than that when the
/// cut comes (with `--fsync never` they are lost, and the test fails).
const CUT_INTERVAL_MS: u64 = 200;
const CUT_SLACK: Duration = Duration::from_millis(500);

async fn drive(base: String, ledger: Arc<Mutex<Ledger>>, seed: u64) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    loop {
        let mut batch = Vec::new();
        {
            let mut ledger = ledger.lock().unwrap();
            for _ in 0..rng.gen_range(1..=20) {
                let user = format!("crash-user-{}", rng.gen_range(0..40));
                ledger.next_event += 1;
                let (item, timestamp) = (format!("ev{}", ledger.next_event), ledger.next_event as i64);
                ledger
                    .sent
                    .entry(user.clone())
                    .or_default()
                    .insert(item.clone(), timestamp);
                batch.push((user, item, timestamp));
            }
        }
        let events: Vec<Value> = batch
            .iter()
            .map(|(user, item, timestamp)| json!({"user_id": user, "item_id": item, "timestamp": timestamp}))
            .collect();
        let response = client
            .post(format!("{base}/v1/events"))
            .json(&json!({ "events": events }))
            .send()
            .await;
        match response {
            Ok(r) if r.status() == StatusCode::OK => {
                let mut ledger = ledger.lock().unwrap();
                let now = Instant::now();
                for (user, item, _) in batch {
                    ledger.acked.entry(user).or_default().insert(item, now);
                }
            }
            _ => return, // the server is gone
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Rounds of ingest and a crash; `extra` flags for the server. After a power cut with
/// `interval`, the events acknowledged within the last interval (and a slack) before it may be
/// gone; every other acknowledged event must be back.
async fn crash_rounds(fsync: &str, kills: usize, seed: u64, extra: &[&str], crash: Crash) {
    let dir = tempfile::tempdir().unwrap();
    // A power cut needs the data directory on the lazy mount, the real one beside it.
    let backing = tempfile::tempdir().unwrap();
    let fx = fixture();
    let cut_interval = CUT_INTERVAL_MS.to_string();
    let mut args = vec![
        "--data-dir",
        dir_arg(dir.path()),
        "--fsync",
        fsync,
        "--history-cap",
        "1000000",
    ];
    if crash == Crash::PowerCut {
        args.extend(["--fsync-interval-ms", cut_interval.as_str()]);
    }
    args.extend(extra);
    let client = reqwest::Client::new();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut last_cut, mut lost_bytes, mut lost_in_window, mut fsyncs) = (None, 0, 0, 0);
    for round in 0..=kills {
        let lazy = (crash == Crash::PowerCut).then(|| {
            lazyfs::LazyFs::mount(backing.path(), dir.path())
                .unwrap_or_else(|e| panic!("mounting the power-cut file system (FUSE, needs root): {e}"))
        });
        let mut server = ServerProcess::spawn(&fx.model, &args, &[]);
        server.wait_ready(&client, Duration::from_secs(60)).await;
        // Everything acknowledged before the last crash is back (but what a power cut may take),
        // once, in order, and nothing appears that was never sent.
        let (sent, acked) = {
            let ledger = ledger.lock().unwrap();
            (ledger.sent.clone(), ledger.acked.clone())
        };
        for (user, acked) in &acked {
            let events = history(&client, &server.base, user).await;
            let items: Vec<&String> = events.iter().map(|e| &e.0).collect();
            let unique: HashSet<&String> = items.iter().copied().collect();
            assert_eq!(
                unique.len(),
                items.len(),
                "{fsync} {crash:?} round {round}: duplicates for {user}"
            );
            for (item, &at) in acked {
                if unique.contains(item) {
                    continue;
                }
                let may_lose =
                    |cut: Instant| fsync == "interval" && at + Duration::from_millis(CUT_INTERVAL_MS) + CUT_SLACK > cut;
                assert!(
                    last_cut.is_some_and(may_lose),
                    "{fsync} {crash:?} round {round}: acknowledged {item} of {user} lost \
                     ({:?} before the crash)",
                    last_cut.map(|cut: Instant| cut.saturating_duration_since(at))
                );
                ledger.lock().unwrap().acked.get_mut(user).unwrap().remove(item);
                lost_in_window += 1;
            }
            for (item, timestamp, _) in &events {
                assert_eq!(
                    sent[user].get(item),
                    Some(timestamp),
                    "{fsync}: phantom {item} for {user}"
                );
            }
            assert!(
                events.windows(2).all(|w| w[0].1 < w[1].1),
                "{fsync}: {user} out of order"
            );
        }
        if round == kills {
            let metrics = server.metrics(&client).await;
            let count = |name: &str| common::metric_value(&metrics, name);
            if extra.contains(&"--max-memory-bytes") {
                // The check above read most users back from the store.
                assert!(count("xsrec_history_evictions_total") > 0.0, "{metrics}");
                assert!(count("xsrec_history_reloads_total") > 0.0, "{metrics}");
            }
            server.kill(); // before its file system goes
            break;
        }
        let drivers: Vec<_> = (0..4)
            .map(|d| {
                tokio::spawn(drive(
                    server.base.clone(),
                    ledger.clone(),
                    seed * 100 + round as u64 * 10 + d,
                ))
            })
            .collect();
        let round_ms = match crash {
            Crash::Kill => rng.gen_range(200..800),
            Crash::PowerCut => rng.gen_range(1000..1600),
        };
        tokio::time::sleep(Duration::from_millis(round_ms)).await;
        server.kill();
        if let Some(lazy) = lazy {
            lost_bytes += lazy.cut();
            fsyncs += lazy.fsyncs();
            last_cut = Some(Instant::now());
        }
        for driver in drivers {
            driver.await.unwrap();
        }
    }
    let ledger = ledger.lock().unwrap();
    let acked: usize = ledger.acked.values().map(HashMap::len).sum();
    eprintln!(
        "{fsync} {crash:?}: {kills} crashes, {acked} acknowledged events kept, {lost_in_window} lost \
         within the interval, {lost_bytes} unsynced bytes dropped, {fsyncs} fsyncs"
    );
    assert!(
        acked > 100,
        "the driver acknowledged too little to mean anything: {acked}"
    );
    if crash == Crash::PowerCut && fsync == "interval" {
        // The cuts had something to take (with `always` a cut only finds bytes between a write
        // and its fsync, which no acknowledgement has covered yet).
        assert!(
            lost_bytes > 0 && fsyncs > 0,
            "{lost_bytes} bytes dropped, {fsyncs} fsyncs"
        );
    }
}

/// `XSREC_CRASH_KILLS` sets the kills per mode (3 in `make test`; the long run in
/// docs/RELIABILITY.md uses 25). The third mode keeps only a few users in memory, so that users
/// keep leaving memory and coming back from the store while the kills land; the fourth runs an
/// index step on the indexer thread after nearly every call, so that kills land in the middle of
/// steps that race the writer's own commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_event_with_fsync_always_or_interval() {
    let kills = std::env::var("XSREC_CRASH_KILLS").map_or(3, |k| k.parse().unwrap());
    crash_rounds("always", kills, 1, &[], Crash::Kill).await;
    crash_rounds("interval", kills, 2, &[], Crash::Kill).await;
    crash_rounds("interval", kills, 3, &["--max-memory-bytes", "8K"], Crash::Kill).await;
    crash_rounds("interval", kills, 6, &["--journal-index-bytes", "256"], Crash::Kill).await;
}

/// A power cut (SIGKILL, then every write not fsynced dropped): with `always` no acknowledged
/// event may go, with `interval` only those acknowledged within the last interval. Needs root
/// and /dev/fuse for the lazy file system; `XSREC_CRASH_KILLS` sets the cuts per mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_nothing_acknowledged_with_always_and_at_most_the_interval_with_interval() {
    let cuts = std::env::var("XSREC_CRASH_KILLS").map_or(3, |k| k.parse().unwrap());
    crash_rounds("always", cuts, 4, &[], Crash::PowerCut).await;
    crash_rounds("interval", cuts, 5, &[], Crash::PowerCut).await;
}

/// A server whose inference batches fail as `fault` says (a `fail` crate action), with user `u`.
async fn server_with_faults(fault: &str) -> (ServerProcess, reqwest::Client) {
    let fault = format!("inference-batch={fault}");
    let server = ServerProcess::spawn(&fixture().model, &[], &[("FAILPOINTS", fault.as_str())]);
    let client = reqwest::Client::new();
    server.wait_ready(&client, Duration::from_secs(60)).await;
    let events = json!({"events": [{"user_id": "u", "item_id": "i1", "timestamp": 1}]});
    let ingested = server.post(&client, "/v1/events", &events).await;
    assert_eq!(ingested.status(), StatusCode::OK);
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_its_requests_and_the_worker_goes_on() {
    let (server, client) = server_with_faults("1*panic(injected)").await;
    let ask = || {
        client
            .post(format!("{}/v1/recommend", server.base))
            .json(&json!({"user_id": "u"}))
            .send()
    };
    let failed = ask().await.unwrap();
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = failed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "inference_failed", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("injected"),
        "{body}"
    );
    assert_eq!(
        ask().await.unwrap().status(),
        StatusCode::OK,
        "the next batch is served"
    );
    let ready = client
        .get(format!("{}/health/ready", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let metrics = server.metrics(&client).await;
    assert!(metrics.contains("xsrec_inference_failures_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_keeps_failing_turns_readiness_off_and_the_process_exits_non_zero() {
    let (mut server, client) = server_with_faults("panic(broken device)").await;
    for _ in 0..xsrec::infer::worker::MAX_CONSECUTIVE_FAILURES {
        let response = client
            .post(format!("{}/v1/recommend", server.base))
            .json(&json!({"user_id": "u"}))
            .send()
            .await;
        if let Ok(response) = response {
            assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status}");
    let log = server.stderr_to_end().join("\n");
    assert!(log.contains("failed 3 batches in a row"), "{log}");
}

/// A journal that cannot write (a failed commit, injected), or whose writer panics (a bug),
/// fails the call that waited for it with 500 `storage_failed`, refuses later writes, turns
/// readiness off, and the server stops and exits non-zero, so that its orchestrator replaces
/// it: liveness alone kept it up and unready for good (and a panicked writer left calls waiting
/// for their deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_cannot_write_stops_the_server_with_a_non_zero_exit() {
    for (fault, said) in [
        ("return", "injected write failure"),
        ("panic(bug)", "the journal writer panicked"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        let mut server = ServerProcess::spawn(
            &fixture().model,
            &[
                "--data-dir",
                data_dir,
                "--fsync",
                "interval",
                "--shutdown-grace-secs",
                "5",
            ],
            &[("FAILPOINTS", &format!("journal-commit={fault}"))],
        );
        let client = reqwest::Client::new();
        server.wait_ready(&client, Duration::from_secs(60)).await;
        let events = json!({"events": [{"user_id": "u", "item_id": "i1", "timestamp": 1}]});
        let failed = server.post(&client, "/v1/events", &events).await;
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR, "{fault}");
        let body: Value = failed.json().await.unwrap();
        assert_eq!(body["error"]["code"], "storage_failed", "{fault}: {body}");
        let status = server.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{fault}: {status}");
        let log = server.stderr_to_end().join("\n");
        assert!(
            log.contains("the history store failed") && log.contains(said),
            "{fault}: {log}"
        );
    }
}

/// A second process on a data directory a running server holds is refused as "in use", not
/// called damaged: that message told the operator to move a healthy store away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_held_by_a_running_server_is_refused_as_in_use_not_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::spawn(&fixture().model, &["--data-dir", dir_arg(dir.path())], &[]);
    let client = reqwest::Client::new();
    server.wait_ready(&client, Duration::from_secs(60)).await;
    let out = dir.path().join("export.inter");
    let export = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_xsrec"))
            .args(["history", "export", "--data-dir", dir_arg(dir.path()), "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let refused = export();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("in use by another process") && !said.contains("damaged"),
        "{said}"
    );
    server.kill();
    let exported = export();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
}
