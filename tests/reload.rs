//! Hot model reload: under concurrent load no request fails and every answer is the very answer
//! of one model version (the one its response names); histories survive, their items mapped by
//! id to a new vocabulary exactly as a server started on the new model would hold them; a model
//! with other event types is refused while the served one goes on; SIGHUP rereads the model's
//! directory.
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{fixture, ranked, server_for, users, ServerProcess};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tch::Device;
use xsrec::data::vocab::Vocab;
use xsrec::model::artifact::Artifact;
use xsrec::model::SeqModel;

/// What a sibling model changes besides its weights.
#[derive(Clone, Copy)]
enum Vocabulary {
    Same,
    /// Every `n`-th item gets a new id: the old id is retired, the new one is new.
    RenameEveryNthItem(usize),
    /// The first event type gets another id.
    RenameEventType,
}

fn renamed(vocab: &Vocab, every: usize) -> Vocab {
    let ids = vocab.ids().iter().enumerate();
    Vocab::from_ids(ids.map(|(i, id)| match i % every {
        0 => format!("{id}-new"),
        _ => id.clone(),
    }))
}

/// The fixture's model with fresh random weights from `seed`: other answers, and the given
/// vocabulary.
fn sibling_model(dir: &Path, seed: i64, vocabulary: Vocabulary) {
    let base = Artifact::load(&fixture().model, Device::Cpu).unwrap();
    tch::manual_seed(seed);
    let model = SeqModel::new(base.config.model.clone(), Device::Cpu);
    let (items, event_types) = match vocabulary {
        Vocabulary::Same => (base.items.clone(), base.event_types.clone()),
        Vocabulary::RenameEveryNthItem(n) => (renamed(&base.items, n), base.event_types.clone()),
        Vocabulary::RenameEventType => (base.items.clone(), renamed(&base.event_types, usize::MAX)),
    };
    let artifact = Artifact::new(
        model,
        items,
        event_types,
        base.item_counts.clone(),
        base.item_categories.clone(),
        json!({}),
    );
    artifact.save(dir).unwrap();
}

fn copy_files(from: &Path, to: &Path) {
    for file in std::fs::read_dir(from).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
    }
}

/// Every user's answer: (item, score) pairs, best first.
type Answers = HashMap<String, Vec<(String, f64)>>;

fn recommend_body(user: &str, at: i64) -> Value {
    json!({"user_id": user, "k": 10, "at": at})
}

fn same_answer(got: &[(String, f64)], expected: &[(String, f64)]) -> bool {
    got.len() == expected.len()
        && got
            .iter()
            .zip(expected)
            .all(|((a, x), (b, y))| a == b && (x - y).abs() <= 1e-4 * y.abs().max(1.0))
}

async fn reload(server: &common::Server, path: Option<&Path>) -> (StatusCode, Value) {
    let body = match path {
        Some(path) => json!({"path": path}),
        None => json!({}),
    };
    server.post("/admin/v1/model", &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_reloads_under_concurrent_load_fail_no_request_and_every_answer_is_one_models() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    sibling_model(&other, 7, Vocabulary::Same);
    let first = fixture().model.clone();
    let server = server_for(&first, &["--max-batch-delay-us", "500"]).await;
    let by_user = users(&fixture().events);
    let chosen: Vec<&str> = by_user.keys().copied().take(24).collect();
    let events: Vec<_> = chosen.iter().flat_map(|u| by_user[u].iter().copied()).collect();
    server.ingest(&events).await;
    let at = events.iter().map(|e| e.timestamp).max().unwrap() + 600;

    // Each model's own answers, asked while it alone serves.
    let mut expected: HashMap<String, Answers> = HashMap::new();
    for model in [&other, &first] {
        let (status, info) = reload(&server, Some(model)).await;
        assert_eq!(status, StatusCode::OK, "{info}");
        let version = info["version"].as_str().unwrap().to_owned();
        let mut answers = Answers::new();
        for user in &chosen {
            let (status, reply) = server.post("/v1/recommend", &recommend_body(user, at)).await;
            assert_eq!(status, StatusCode::OK, "{reply}");
            assert_eq!(reply["model_version"], version.as_str());
            assert!(reply["fallback"].is_null(), "{reply}");
            answers.insert(user.to_string(), ranked(&reply));
        }
        expected.insert(version, answers);
    }
    assert_eq!(expected.len(), 2, "two versions");
    let versions: Vec<String> = expected.keys().cloned().collect();
    let differing = chosen
        .iter()
        .filter(|u| !same_answer(&expected[&versions[0]][**u], &expected[&versions[1]][**u]))
        .count();
    assert!(
        differing > chosen.len() / 2,
        "the two models answer alike for most users"
    );
    let history_before = server.get(&format!("/v1/users/{}/history", chosen[0])).await.1;

    // Load from 8 clients while 10 reloads alternate the two models.
    let expected = Arc::new(expected);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..8 {
        let (base, http) = (server.base.clone(), server.client.clone());
        let (expected, stop) = (expected.clone(), stop.clone());
        let chosen: Vec<String> = chosen.iter().map(|u| u.to_string()).collect();
        clients.push(tokio::spawn(async move {
            let mut served: HashMap<String, usize> = HashMap::new();
            let mut i = client;
            while !stop.load(Ordering::Relaxed) {
                let user = &chosen[i % chosen.len()];
                i += 7;
                let response = http
                    .post(format!("{base}/v1/recommend"))
                    .json(&recommend_body(user, at))
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let reply: Value = response.json().await.unwrap();
                assert_eq!(status, StatusCode::OK, "a request failed during the reloads: {reply}");
                let version = reply["model_version"].as_str().unwrap().to_owned();
                let answers = expected
                    .get(&version)
                    .unwrap_or_else(|| panic!("unknown version {version}"));
                assert!(
                    same_answer(&ranked(&reply), &answers[user]),
                    "{user}'s answer is not model {version}'s: {:?} vs {:?}",
                    ranked(&reply),
                    answers[user]
                );
                *served.entry(version).or_default() += 1;
            }
            served
        }));
    }
    for round in 0..10 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let model = if round % 2 == 0 { &other } else { &first };
        let (status, info) = reload(&server, Some(model)).await;
        assert_eq!(status, StatusCode::OK, "reload {round}: {info}");
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    stop.store(true, Ordering::Relaxed);
    let mut served: HashMap<String, usize> = HashMap::new();
    for client in clients {
        for (version, count) in client.await.unwrap() {
            *served.entry(version).or_default() += count;
        }
    }
    for version in &versions {
        assert!(
            served.get(version).copied().unwrap_or(0) > 0,
            "{version} never answered: {served:?}"
        );
    }

    // Histories and the store are untouched; the metrics name the model now serving.
    assert_eq!(
        server.get(&format!("/v1/users/{}/history", chosen[0])).await.1,
        history_before
    );
    let metrics = server.get("/metrics").await.1;
    let reloads = common::metric_value(&metrics, "xsrec_model_reloads_total{outcome=\"ok\"}");
    assert_eq!(reloads, 12.0);
    let (_, info) = server.get("/v1/model").await;
    let current: Value = serde_json::from_str(&info).unwrap();
    let current = current["version"].as_str().unwrap();
    assert!(metrics.contains(&format!(
        "xsrec_model_info{{arch=\"transformer\",version=\"{current}\"}} 1"
    )));
    assert_eq!(
        metrics.matches("xsrec_model_info{").count(),
        1,
        "only the serving model"
    );
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_other_event_types_is_refused_and_the_served_one_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let renamed = dir.path().join("renamed");
    sibling_model(&renamed, 3, Vocabulary::RenameEventType);
    let server = server_for(&fixture().model, &[]).await;
    let event = &fixture().events[0];
    server.ingest(&[event]).await;
    let (_, before) = server.get("/v1/model").await;
    let before: Value = serde_json::from_str(&before).unwrap();

    let (status, reply) = reload(&server, Some(&renamed)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{reply}");
    assert_eq!(reply["error"]["code"], "model_incompatible");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("event type vocabulary differs") && message.contains("index 1"),
        "{message}"
    );

    let missing = dir.path().join("no-such-model");
    let (status, reply) = reload(&server, Some(&missing)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"]["code"], "model_load_failed");
    assert!(reply["error"]["message"].as_str().unwrap().contains("no-such-model"));

    for bad in [json!({"path": ""}), json!({"path": 5}), json!({"model": "x"})] {
        let (status, reply) = server.post("/admin/v1/model", &bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {reply}");
        assert_eq!(reply["error"]["code"], "invalid_request", "{bad}");
    }
    // An empty body rereads the served model's directory: the same version.
    let response = server
        .client
        .post(format!("{}/admin/v1/model", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let reread: Value = response.json().await.unwrap();
    assert_eq!(reread["version"], before["version"]);

    let (status, reply) = server
        .post("/v1/recommend", &json!({"user_id": event.user_id, "k": 3}))
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["model_version"], before["version"]);
    let metrics = server.get("/metrics").await.1;
    for outcome in ["model_incompatible", "model_load_failed", "ok"] {
        assert!(
            metrics.contains(&format!("xsrec_model_reloads_total{{outcome=\"{outcome}\"}} 1")),
            "{outcome}"
        );
    }
    server.shut_down().await.unwrap();
}

/// After a reload to a model whose items differ (some retired, some new), the served histories
/// answer exactly as a server started on that model and fed the same events does (the oracle),
/// for users in memory and for users the memory budget evicted and reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_other_items_maps_histories_by_id_as_a_fresh_server_would_hold_them() {
    let dir = tempfile::tempdir().unwrap();
    let next = dir.path().join("next");
    sibling_model(&next, 5, Vocabulary::RenameEveryNthItem(4));
    let data = dir.path().join("data");
    let budget = ["--data-dir", data.to_str().unwrap(), "--max-memory-bytes", "2K"];
    let reloaded = server_for(&fixture().model, &budget).await;
    let oracle = server_for(&next, &[]).await;
    let by_user = users(&fixture().events);
    let chosen: Vec<&str> = by_user.keys().copied().skip(30).take(16).collect();
    let events: Vec<_> = chosen.iter().flat_map(|u| by_user[u].iter().copied()).collect();
    reloaded.ingest(&events).await;
    oracle.ingest(&events).await;
    let (status, info) = reload(&reloaded, Some(&next)).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    let at = events.iter().map(|e| e.timestamp).max().unwrap() + 600;
    // A new item (known only to the new model) after the reload, to both.
    let fresh = json!({"events": [{"user_id": chosen[0], "item_id": "i4-new", "timestamp": at - 1}]});
    for server in [&reloaded, &oracle] {
        let (status, reply) = server.post("/v1/events", &fresh).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        assert_eq!(reply["unknown_items"], 0, "i4-new is the new model's");
    }
    for user in &chosen {
        let (_, got) = reloaded.post("/v1/recommend", &recommend_body(user, at)).await;
        let (_, want) = oracle.post("/v1/recommend", &recommend_body(user, at)).await;
        assert_eq!(got["model_version"], want["model_version"]);
        assert_eq!(got["fallback"], want["fallback"], "{user}");
        assert!(
            same_answer(&ranked(&got), &ranked(&want)),
            "{user}: {:?} vs the oracle's {:?}",
            ranked(&got),
            ranked(&want)
        );
        let path = format!("/v1/users/{user}/history");
        assert_eq!(reloaded.get(&path).await.1, oracle.get(&path).await.1, "{user}");
    }
    let metrics = reloaded.get("/metrics").await.1;
    assert!(
        common::metric_value(&metrics, "xsrec_history_reloads_total") > 0.0,
        "nobody was read back"
    );
    reloaded.shut_down().await.unwrap();
    oracle.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (served, other) = (dir.path().join("served"), dir.path().join("other"));
    std::fs::create_dir(&served).unwrap();
    copy_files(&fixture().model, &served);
    sibling_model(&other, 11, Vocabulary::Same);
    let server = ServerProcess::spawn(&served, &[], &[]);
    let client = reqwest::Client::new();
    server.wait_ready(&client, Duration::from_secs(60)).await;
    let version = || async {
        let info = server.get_json(&client, "/v1/model").await;
        info["version"].as_str().unwrap().to_owned()
    };
    let before = version().await;
    // The operator's roll-out: new files in place, then SIGHUP.
    copy_files(&other, &served);
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let started = std::time::Instant::now();
    while version().await == before {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "SIGHUP did not reload the model"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.wait_for_line(&["model reloaded from"], Duration::from_secs(30));
    assert_eq!(
        client
            .get(format!("{}/health/ready", server.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}
