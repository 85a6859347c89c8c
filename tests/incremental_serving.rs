//! Incremental inference in the server: with a model whose positions count from the window
//! start, answers computed from a user's cached keys and values equal a full forward over the
//! same window: through appends, queries at new moments without new events, out-of-order
//! events, erasure, histories that move the window many times, and concurrent requests whose
//! batches mix all of these.
mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{fixture, ranked, server_for, users};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reqwest::StatusCode;
use serde_json::json;
use tch::{Device, Kind, Tensor};
use xsrec::data::Event;
use xsrec::model::artifact::{copy_weights, Artifact};
use xsrec::model::{
    encode_window, events_to_keep, fresh_window_start, Batch, HistoryView, PositionOrigin, Scorer, SeqModel,
};

const K: usize = 10;

/// The shared fixture's weights, read with positions counted from the window start.
fn window_start_model(dir: &Path) -> Artifact {
    let mut artifact = Artifact::load(&fixture().model, Device::Cpu).unwrap();
    artifact.config.model.features.positions = PositionOrigin::WindowStart;
    artifact.save(dir).unwrap();
    Artifact::load(dir, Device::Cpu).unwrap()
}

/// The known items of `sent` (the events the server holds for a user) in time order, as the
/// store keeps them.
fn known_history(artifact: &Artifact, sent: &[Event]) -> (Vec<u32>, Vec<i64>, Vec<u32>) {
    let mut known: Vec<(i64, u32, u32)> = sent
        .iter()
        .filter_map(|e| {
            let item = artifact.items.get(&e.item_id)?;
            let kind = e
                .event_type
                .as_deref()
                .and_then(|t| artifact.event_types.get(t))
                .unwrap_or(1);
            Some((e.timestamp, item, kind))
        })
        .collect();
    known.sort_by_key(|&(timestamp, _, _)| timestamp); // stable: ties keep their arrival order
    (
        known.iter().map(|k| k.1).collect(),
        known.iter().map(|k| k.0).collect(),
        known.iter().map(|k| k.2).collect(),
    )
}

/// Scores of every item by one full forward pass over the window from `start`, predicting at `at`.
fn offline_scores(artifact: &Artifact, history: &(Vec<u32>, Vec<i64>, Vec<u32>), start: usize, at: i64) -> Vec<f32> {
    let config = &artifact.model.config;
    let view = HistoryView::new(&history.0, &history.1, &history.2);
    let row = encode_window(view, start, at, config.max_len, config.session_gap_secs);
    let scores: Tensor = artifact
        .model
        .score_next(&Batch::new(&[row], Device::Cpu), &[&history.0])
        .get(0);
    Vec::<f32>::try_from(scores).unwrap()
}

/// Whether the served top-k is the offline top-k: every served score is the offline score of
/// its item, and no item left out scores above the lowest served one (up to rounding, so that
/// near-ties may come in either order).
fn same_top_k(artifact: &Artifact, served: &[(String, f64)], offline: &[f32]) -> Result<(), String> {
    if served.len() != K {
        return Err(format!("{} items served", served.len()));
    }
    for (item, score) in served {
        let expected = f64::from(offline[artifact.items.get(item).unwrap() as usize]);
        if (score - expected).abs() >= 1e-4 {
            return Err(format!("{item} served {score}, offline {expected}"));
        }
    }
    let mut sorted: Vec<f32> = offline[1..].to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let lowest_served = served.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
    match lowest_served >= f64::from(sorted[K - 1]) - 1e-4 {
        true => Ok(()),
        false => Err(format!("not the top {K}")),
    }
}

/// The windows a served answer may have been computed on: from the whole history (or its
/// newest `max_len` events) to the newest `max_len − append_slack(max_len)`, where a window
/// computed afresh starts (where the worker's window stands depends on when the user asked
/// before).
fn allowed_window_starts(len: usize, max_len: usize) -> Vec<usize> {
    (len.saturating_sub(max_len)..=fresh_window_start(len, max_len)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_cached_keys_and_values_equal_the_full_forward_pass() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = window_start_model(dir.path());
    let (server, asked) = serve_and_check(&artifact, dir.path(), &[]).await;
    let appends = server.metric("xsrec_cache_appends_total").await;
    assert!(
        appends > asked as f64 / 3.0,
        "{appends} of {asked} answers came from cached keys and values"
    );
    assert!(server.metric("xsrec_cached_state_bytes").await > 0.0);
}

/// Room for the keys and values of 5 users where 16 ask at once: each batch mixes appends,
/// fresh windows and full passes of the rows that found no slot, and users are evicted and
/// recomputed on their return. None of it may change an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_value_budget_too_small_for_every_user_evicts_without_changing_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = window_start_model(dir.path());
    let config = &artifact.model.config;
    let slot_bytes = config.n_layers * config.max_len * config.d_model * 2 * 4;
    let budget = (5 * slot_bytes).to_string();
    let (server, asked) = serve_and_check(&artifact, dir.path(), &["--cache-bytes", &budget]).await;
    let evictions = server.metric("xsrec_cache_evictions_total").await;
    let appends = server.metric("xsrec_cache_appends_total").await;
    assert!(evictions > 0.0, "no user was evicted");
    assert!(
        appends > 0.0 && appends < asked as f64 / 3.0,
        "{appends} appends of {asked} answers"
    );
    let bytes = server.metric("xsrec_cached_state_bytes").await;
    let hidden = 16 * config.d_model * 4;
    assert!(bytes <= (5 * slot_bytes + hidden) as f64, "{bytes} bytes held");
}

/// The clock readout is added after the cache: a user asked again an hour later (the same gap
/// bucket, another hour of the week) is answered from the cached state, and the answer is the
/// full forward pass at the new moment, which the readout (its weights made strong here) moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_later_the_cached_state_answers_with_that_hours_clock_readout() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = Artifact::load(&fixture().model, Device::Cpu).unwrap();
    let features = &artifact.model.config.features;
    assert!(features.clock_readout && !features.calendar);
    tch::no_grad(|| {
        for (name, mut t) in artifact.model.vs.variables() {
            if name.starts_with("clock_readout") {
                t.copy_(&Tensor::randn_like(&t));
            }
        }
    });
    artifact.save(dir.path()).unwrap();
    let artifact = Artifact::load(dir.path(), Device::Cpu).unwrap();
    let max_len = artifact.model.config.max_len;
    let server = server_for(dir.path(), &[]).await;
    let streams = longest_streams(8);
    for stream in &streams {
        server.ingest(&stream.iter().collect::<Vec<_>>()).await;
    }
    let mut moved = 0;
    for stream in &streams {
        let history = known_history(&artifact, stream);
        let user = &stream[0].user_id;
        // A minute into the first hour that starts 40,000 s after the newest event, and each
        // hour after: one log2 gap bucket (32,768–65,535 s).
        let first = ((stream.last().unwrap().timestamp + 40_000) / 3_600 + 1) * 3_600 + 60;
        let mut answers = Vec::new();
        // Three hours, then the third hour again (its readout then comes from the cache too).
        for (asked, at) in [first, first + 3_600, first + 7_200, first + 7_260]
            .into_iter()
            .enumerate()
        {
            let counts = (
                server.metric("xsrec_cache_hits_total").await,
                server.metric("xsrec_cache_misses_total").await,
            );
            let ask = json!({"user_id": user, "k": K, "at": at, "exclude_seen": false});
            let (status, reply) = server.post("/v1/recommend", &ask).await;
            assert_eq!(status, StatusCode::OK, "{reply}");
            let served = ranked(&reply);
            let start = history.0.len().saturating_sub(max_len);
            same_top_k(&artifact, &served, &offline_scores(&artifact, &history, start, at))
                .unwrap_or_else(|e| panic!("{user} at {at}: {e}"));
            let expected = match asked {
                0 => (counts.0, counts.1 + 1.0),
                _ => (counts.0 + 1.0, counts.1),
            };
            assert_eq!(
                (
                    server.metric("xsrec_cache_hits_total").await,
                    server.metric("xsrec_cache_misses_total").await
                ),
                expected,
                "question {asked}: the first computes, the later ones are hits"
            );
            answers.push(served);
        }
        assert_eq!(answers[2], answers[3], "the same hour's answer again");
        moved += usize::from(answers[..3].windows(2).any(|pair| pair[0] != pair[1]));
    }
    assert!(
        moved > 0,
        "the hour never changed an answer: the clock readout was not at work"
    );
}

/// A model with a repeat term, served with seen items allowed: the top-k merges the catalogue's
/// ranking of the items a user never had with the exact scores of those they had, and equals
/// offline scoring, through appends and cached states; candidate lists get the offsets too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_repeat_term_served_rankings_and_candidates_equal_offline_scoring() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = repeat_term_model(dir.path());
    let (server, _) = serve_and_check(&artifact, dir.path(), &[]).await;
    assert!(server.metric("xsrec_cache_appends_total").await > 0.0);
    // A fresh server with the whole streams: top-k and candidates (held items and others). Its
    // memory holds only the newest events the model needs; the term still raises every item the
    // user had, as offline scoring of the whole history does.
    let cap = events_to_keep(artifact.model.config.max_len, true);
    let server = server_for(dir.path(), &["--history-cap", &cap.to_string()]).await;
    let streams = longest_streams(16);
    assert!(
        streams.iter().all(|stream| stream.len() > cap),
        "every history must overflow memory"
    );
    for stream in &streams {
        server.ingest(&stream.iter().collect::<Vec<_>>()).await;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut held_served, mut served_total) = (0, 0);
    for stream in streams {
        let history = known_history(&artifact, &stream);
        let at = stream.last().unwrap().timestamp + 600;
        let user = &stream[0].user_id;
        let mut candidates: Vec<String> = (0..12)
            .map(|_| stream[rng.gen_range(0..stream.len())].item_id.clone())
            .collect();
        candidates.extend((0..12).map(|_| {
            artifact
                .items
                .id(rng.gen_range(1..artifact.items.len() as u32))
                .to_owned()
        }));
        let top = json!({"user_id": user, "k": K, "at": at, "exclude_seen": false});
        let unseen = json!({"user_id": user, "k": K, "at": at, "exclude_seen": true});
        let listed = json!({"user_id": user, "k": 8, "at": at, "candidates": candidates});
        let (top, unseen, listed) = tokio::join!(
            server.post("/v1/recommend", &top),
            server.post("/v1/recommend", &unseen),
            server.post("/v1/recommend", &listed)
        );
        assert_eq!(
            (top.0, unseen.0, listed.0),
            (StatusCode::OK, StatusCode::OK, StatusCode::OK),
            "{top:?} {unseen:?} {listed:?}"
        );
        let (top, unseen, listed) = (ranked(&top.1), ranked(&unseen.1), ranked(&listed.1));
        // Each answer against a full pass over a window it may have been computed on (the two
        // requests may be computed on different ones: one extends the user's cached keys and
        // values while the other, in the same batch, finds them taken).
        let offline: Vec<Vec<f32>> = allowed_window_starts(history.0.len(), artifact.model.config.max_len)
            .into_iter()
            .map(|start| offline_scores(&artifact, &history, start, at))
            .collect();
        assert!(
            offline.iter().any(|scores| same_top_k(&artifact, &top, scores).is_ok()),
            "user {user}: {top:?}"
        );
        assert!(
            offline
                .iter()
                .any(|scores| same_listed_top(&artifact, &listed, &candidates, scores)),
            "user {user}: {listed:?}"
        );
        // Seen items left out: the offline ranking of the items the user never had.
        let never_had = |scores: &Vec<f32>| {
            let mut scores = scores.clone();
            for &item in &history.0 {
                scores[item as usize] = f32::NEG_INFINITY;
            }
            scores
        };
        assert!(
            offline
                .iter()
                .any(|scores| same_top_k(&artifact, &unseen, &never_had(scores)).is_ok()),
            "user {user}: {unseen:?}"
        );
        let held: std::collections::HashSet<u32> = history.0.iter().copied().collect();
        held_served += top
            .iter()
            .filter(|(item, _)| held.contains(&artifact.items.get(item).unwrap()))
            .count();
        served_total += top.len();
    }
    // The merge is exercised both ways: held items enter some top-k lists, and not all of them.
    assert!(
        0 < held_served && held_served < served_total,
        "{held_served} of {served_total} served items were held"
    );
}

/// The shared fixture's weights with positions counted from the window start and a repeat term
/// of random weights and a negative bias: some held items keep their place in a top-k, others
/// leave it (with a bias of 0 every served item was held, with -4 none).
fn repeat_term_model(dir: &Path) -> Artifact {
    let base = Artifact::load(&fixture().model, Device::Cpu).unwrap();
    let mut config = base.model.config.clone();
    config.features.positions = PositionOrigin::WindowStart;
    config.features.repeat_term = true;
    let model = SeqModel::new(config, Device::Cpu);
    tch::manual_seed(5);
    let mut weights: HashMap<String, Tensor> = base.model.vs.variables().into_iter().collect();
    weights.insert(
        "repeat_term.gate.weight".into(),
        Tensor::randn([1, 16], (Kind::Float, Device::Cpu)),
    );
    weights.insert("repeat_term.gate.bias".into(), Tensor::from_slice(&[-2f32]));
    copy_weights(&model.vs, weights).unwrap();
    let artifact = Artifact::new(
        model,
        base.items.clone(),
        base.event_types.clone(),
        base.item_counts.clone(),
        base.item_categories.clone(),
        base.config.info.clone(),
    );
    artifact.save(dir).unwrap();
    Artifact::load(dir, Device::Cpu).unwrap()
}

/// Whether the served best of `candidates` is their offline best: each served score is the
/// offline one, and no candidate left out scores above the lowest served one (up to rounding).
fn same_listed_top(artifact: &Artifact, served: &[(String, f64)], candidates: &[String], offline: &[f32]) -> bool {
    let score = |item: &str| f64::from(offline[artifact.items.get(item).unwrap() as usize]);
    let lowest = served.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
    served.len() == 8
        && served.iter().all(|(item, served)| (served - score(item)).abs() < 1e-4)
        && candidates
            .iter()
            .filter(|c| served.iter().all(|(item, _)| item != *c))
            .all(|c| score(c) <= lowest + 1e-4)
}

/// Streams the 16 longest fixture histories to a server of `artifact` (with `extra` flags)
/// over 60 rounds, asking for every user each round, and holds every answer to a full forward
/// over an allowed window. Returns the server and the answers checked.
async fn serve_and_check(artifact: &Artifact, dir: &Path, extra: &[&str]) -> (common::Server, usize) {
    let max_len = artifact.model.config.max_len;
    let mut flags = vec!["--history-cap", "1000", "--max-batch-delay-us", "3000"];
    flags.extend(extra);
    let server = server_for(dir, &flags).await;
    let mut streams = longest_streams(16);
    let mut sent: Vec<Vec<Event>> = vec![Vec::new(); streams.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (mut asked, mut longest) = (0usize, 0usize);
    for round in 0..60 {
        // Each user gets 0–3 new events; one goes back in time, one user is erased.
        for (user, stream) in streams.iter_mut().enumerate() {
            let count = rng.gen_range(0..=3).min(stream.len());
            // User 0 gets only the late event of round 12.
            let count = if round == 12 && user == 0 { 0 } else { count };
            let new: Vec<Event> = stream.drain(..count).collect();
            if !new.is_empty() {
                server.ingest(&new.iter().collect::<Vec<_>>()).await;
                sent[user].extend(new);
            }
        }
        if round == 12 {
            // Between the two newest events: the cached positions are still the history's first
            // ones, but the newest of them now predicts another moment (its next event's time).
            let user = 0;
            let mut times: Vec<i64> = sent[user].iter().map(|e| e.timestamp).collect();
            times.sort_unstable();
            let (second, newest) = (times[times.len() - 2], times[times.len() - 1]);
            assert!(newest - second > 1, "{second} {newest}");
            let mut late = sent[user][0].clone();
            late.timestamp = (second + newest) / 2;
            server.ingest(&[&late]).await;
            sent[user].push(late);
        }
        if round == 20 {
            let user = 1;
            let status = server.delete(&format!("/v1/users/{}", sent[user][0].user_id)).await;
            assert!(status.is_success(), "{status}");
            sent[user].clear();
        }
        // All users at once, at a moment that sometimes moves without new events.
        let asking: Vec<usize> = (0..sent.len()).filter(|&u| !sent[u].is_empty()).collect();
        let moments: Vec<i64> = asking
            .iter()
            .map(|&u| sent[u].iter().map(|e| e.timestamp).max().unwrap() + [60, 4_000, 200_000][rng.gen_range(0..3)])
            .collect();
        let bodies: Vec<_> = asking
            .iter()
            .zip(&moments)
            .map(|(&u, at)| json!({"user_id": sent[u][0].user_id, "k": K, "at": at, "exclude_seen": false}))
            .collect();
        let replies = futures_util::future::join_all(bodies.iter().map(|b| server.post("/v1/recommend", b))).await;
        for ((&user, &at), (status, reply)) in asking.iter().zip(&moments).zip(&replies) {
            assert_eq!(*status, StatusCode::OK, "{reply}");
            let history = known_history(artifact, &sent[user]);
            let served = ranked(reply);
            let outcomes: Vec<_> = allowed_window_starts(history.0.len(), max_len)
                .into_iter()
                .map(|start| same_top_k(artifact, &served, &offline_scores(artifact, &history, start, at)))
                .collect();
            assert!(
                outcomes.iter().any(Result::is_ok),
                "round {round}, user {user} with {} events: {outcomes:?}",
                history.0.len()
            );
            longest = longest.max(history.0.len());
            asked += 1;
        }
    }
    assert!(
        longest > 2 * max_len,
        "the window must move several times ({longest} events at most)"
    );
    (server, asked)
}

/// The `count` fixture users with the most events, each user's events in time order.
fn longest_streams(count: usize) -> Vec<Vec<Event>> {
    let by_user = users(&fixture().events);
    let mut longest_first: Vec<_> = by_user.values().collect();
    longest_first.sort_by_key(|events| std::cmp::Reverse(events.len()));
    longest_first
        .into_iter()
        .take(count)
        .map(|events| {
            let mut events: Vec<Event> = events.iter().map(|&e| e.clone()).collect();
            events.sort_by_key(|e| e.timestamp);
            events
        })
        .collect()
}

/// A reload to other weights drops every user's cached keys and values with the old model: the
/// answers after it, appends included, are the new model's full forward pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_answers_come_from_the_new_models_keys_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let (first_dir, second_dir) = (dir.path().join("first"), dir.path().join("second"));
    let first = window_start_model(&first_dir);
    let second = {
        let artifact = window_start_model(&second_dir);
        tch::no_grad(|| {
            for (_, mut weights) in artifact.model.vs.variables() {
                let _ = weights.g_add_(&(weights.randn_like() * 0.05));
            }
        });
        artifact.save(&second_dir).unwrap();
        Artifact::load(&second_dir, Device::Cpu).unwrap()
    };
    let server = server_for(&first_dir, &["--history-cap", "1000"]).await;
    let streams = longest_streams(8);
    let max_len = first.model.config.max_len;
    for (round, end) in [20usize, 21, 22, 23].into_iter().enumerate() {
        if round == 2 {
            let (status, reply) = server.post("/admin/v1/model", &json!({"path": second_dir})).await;
            assert_eq!(status, StatusCode::OK, "{reply}");
        }
        let serving = if round < 2 { &first } else { &second };
        let from = if round == 0 { 0 } else { end - 1 };
        for stream in &streams {
            server.ingest(&stream[from..end].iter().collect::<Vec<_>>()).await;
        }
        for stream in &streams {
            let at = stream[end - 1].timestamp + 60;
            let body = json!({"user_id": stream[0].user_id, "k": K, "at": at, "exclude_seen": false});
            let (status, reply) = server.post("/v1/recommend", &body).await;
            assert_eq!(status, StatusCode::OK, "{reply}");
            let history = known_history(serving, &stream[..end]);
            let served = ranked(&reply);
            let outcomes: Vec<_> = allowed_window_starts(history.0.len(), max_len)
                .into_iter()
                .map(|start| same_top_k(serving, &served, &offline_scores(serving, &history, start, at)))
                .collect();
            assert!(outcomes.iter().any(Result::is_ok), "round {round}: {outcomes:?}");
        }
    }
    assert!(server.metric("xsrec_cache_appends_total").await > 0.0);
}
