//! The service over real HTTP on an ephemeral port, with a real model trained on a synthetic log.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{fixture, ranked, server, server_for, users, Server, ServerProcess};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tch::Device;
use xsrec::data::split::{build_sequences, SequenceSet, UserSequence};
use xsrec::data::Event;
use xsrec::model::artifact::Artifact;

fn assert_same_ranking(a: &[(String, f64)], b: &[(String, f64)]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0, "{a:?} vs {b:?}");
        assert!((x.1 - y.1).abs() < 1e-5, "{} vs {}", x.1, y.1);
    }
}

/// The test-target top-20 of `xsrec eval` (seen items excluded), per user id.
fn offline_top(artifact: &Artifact, set: &SequenceSet, exclude_seen: bool) -> BTreeMap<String, Vec<(String, f64)>> {
    let cfg = &artifact.model.config;
    let opts = xsrec::eval::EvalOptions {
        target: xsrec::data::split::Target::Test,
        exclude_seen,
        batch_size: 256,
        max_len: cfg.max_len,
        session_gap_secs: cfg.session_gap_secs,
        device: Device::Cpu,
        // A server that appends computes a user's first window its own way.
        window: match artifact.model.net.can_append() {
            true => xsrec::model::WindowPolicy::FirstVisit,
            false => xsrec::model::WindowPolicy::Newest,
        },
    };
    xsrec::eval::evaluate(&artifact.model, set, &opts)
        .into_iter()
        .map(|case| {
            let top = case
                .top
                .iter()
                .map(|&(i, s)| (set.items.id(i as u32).to_owned(), f64::from(s)))
                .collect();
            (set.users[case.user].user_id.clone(), top)
        })
        .collect()
}

/// Recommending at the test event's time returns offline evaluation's top-20, with and without
/// seen items. (Offline keeps a repeated target in the ranking, which a live request cannot
/// know about, so the seen-excluded comparison skips users whose test item is a repeat.)
async fn assert_online_equals_offline(
    server: &Server,
    seq: &UserSequence,
    offline: &[BTreeMap<String, Vec<(String, f64)>>; 2],
) {
    let target = seq.len() - 1;
    for (exclude_seen, expected) in [false, true].into_iter().zip(offline) {
        if exclude_seen && seq.items[..target].contains(&seq.items[target]) {
            continue;
        }
        let body = json!({"user_id": seq.user_id, "k": 20, "at": seq.timestamps[target], "exclude_seen": exclude_seen});
        let (status, reply) = server.post("/v1/recommend", &body).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        assert_eq!(reply["fallback"], Value::Null);
        assert_same_ranking(&ranked(&reply), &expected[&seq.user_id]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_recommendations_equal_offline_scoring() {
    let fx = fixture();
    let server = server(&["--history-cap", "1000"]).await;
    let artifact = Artifact::load(&fx.model, Device::Cpu).unwrap();
    let set = build_sequences(&fx.events, artifact.items.clone(), artifact.event_types.clone(), false);
    let offline = [false, true].map(|exclude_seen| offline_top(&artifact, &set, exclude_seen));
    for seq in set.users.iter().filter(|u| u.len() >= 3).take(25) {
        let target = seq.len() - 1;
        // Everything before the test event, sent newest first: the store must restore time order.
        let mut history: Vec<&Event> = fx.events.iter().filter(|e| e.user_id == seq.user_id).collect();
        history.truncate(target);
        history.reverse();
        server.ingest(&history).await;
        assert_online_equals_offline(&server, seq, &offline).await;
    }
}

/// With each first stage (a shortlist barely above k, so that the first stage decides), the
/// server answers exactly what the offline path with the same first stage answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shortlisted_recommendations_equal_the_offline_path_with_the_same_first_stage() {
    use xsrec::bench::parity::{rank_cases, Case};
    use xsrec::infer::rank::{Retrieval, Scan};
    let fx = fixture();
    let artifact = Artifact::load(&fx.model, Device::Cpu).unwrap();
    let model = &artifact.model;
    let set = build_sequences(&fx.events, artifact.items.clone(), artifact.event_types.clone(), false);
    let by_user = users(&fx.events);
    let chosen: Vec<&UserSequence> = set
        .users
        .iter()
        .filter(|u| u.len() <= model.config.max_len)
        .take(20)
        .collect();
    let cases: Vec<Case> = chosen
        .iter()
        .map(|u| {
            let at = u.timestamps[u.len() - 1] + 60;
            Case::new(&u.items, &u.timestamps, &u.types, at, model)
        })
        .collect();
    let mut ranking_bytes = Vec::new();
    for scan in [Scan::ProductQuantized, Scan::Int8, Scan::Bf16] {
        let server = server(&["--retrieval", &scan.to_string(), "--shortlist", "12"]).await;
        ranking_bytes.push(server.metric("xsrec_ranking_bytes").await);
        let offline = rank_cases(model, &cases, 10, 7, Retrieval::Shortlist { scan, shortlist: 12 });
        for (seq, offline) in chosen.iter().zip(offline) {
            server.ingest(&by_user[seq.user_id.as_str()]).await;
            let at = seq.timestamps[seq.len() - 1] + 60;
            let (status, reply) = server
                .post("/v1/recommend", &json!({"user_id": seq.user_id, "k": 10, "at": at}))
                .await;
            assert_eq!(status, StatusCode::OK, "{scan}: {reply}");
            let expected: Vec<(String, f64)> = offline
                .iter()
                .map(|&(item, score)| (set.items.id(item).to_owned(), f64::from(score)))
                .collect();
            assert_same_ranking(&ranked(&reply), &expected);
        }
    }
    // Where the host kernels run, the copies are reported: int8 a quarter of fp32's bytes per
    // value (plus a scale per item), bf16 half.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let (items, dim) = (model.config.num_items as f64, model.config.d_model as f64);
        let [_, int8, bf16] = ranking_bytes[..] else {
            unreachable!()
        };
        assert!(
            int8 >= items * (dim + 4.0) && int8 < 1.1 * items * (dim + 4.0) + 4096.0,
            "{int8}"
        );
        assert!(
            bf16 >= items * dim * 2.0 && bf16 < 1.1 * items * dim * 2.0 + 4096.0,
            "{bf16}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_match_one_by_one_answers() {
    let fx = fixture();
    // No cache, so that both rounds run the Transformer; a wide batching window.
    let server = server(&[
        "--cache-capacity",
        "0",
        "--max-batch-delay-us",
        "20000",
        "--max-batch-size",
        "64",
    ])
    .await;
    let by_user = users(&fx.events);
    let chosen: Vec<&str> = by_user.keys().copied().take(64).collect();
    for user in &chosen {
        server.ingest(&by_user[user]).await;
    }
    let request = |user: &str| json!({"user_id": user, "k": 10, "at": 1_700_000_000});
    let mut alone = Vec::new();
    for user in &chosen {
        alone.push(ranked(&server.post("/v1/recommend", &request(user)).await.1));
    }
    let executions_before = server.metric("xsrec_batch_executions_total").await;
    let bodies: Vec<Value> = chosen.iter().map(|user| request(user)).collect();
    let together = futures_util::future::join_all(bodies.iter().map(|body| server.post("/v1/recommend", body))).await;
    for ((status, reply), expected) in together.iter().zip(&alone) {
        assert_eq!(*status, StatusCode::OK);
        assert_same_ranking(&ranked(reply), expected);
    }
    let executions = server.metric("xsrec_batch_executions_total").await - executions_before;
    assert!(
        executions < 64.0 / 2.0,
        "64 concurrent requests took {executions} batches"
    );
    assert!(server.metric("xsrec_batch_size_bucket{le=\"1\"}").await < server.metric("xsrec_batch_size_count").await);

    // The batch endpoint gives the same answers as one by one.
    let (status, reply) = server
        .post(
            "/v1/recommend/batch",
            &json!({"requests": chosen.iter().map(|u| request(u)).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for (result, expected) in reply["results"].as_array().unwrap().iter().zip(&alone) {
        assert_same_ranking(&ranked(result), expected);
    }
}

/// Memory holds only each user's newest events, but "seen" is everything the user had: with seen
/// items left out, the ranking is the full ranking less every item of the whole history, for
/// the model and for the popularity fallback alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seen_items_stay_excluded_after_the_cap_pushes_them_out_of_memory() {
    const CAP: usize = 5;
    let fx = fixture();
    let server = server(&["--history-cap", &CAP.to_string()]).await;
    let by_user = users(&fx.events);
    let long: Vec<&Vec<&Event>> = by_user
        .values()
        .filter(|events| events.len() > 3 * CAP)
        .take(8)
        .collect();
    assert_eq!(long.len(), 8);
    let ids = |reply: &Value| -> Vec<String> { ranked(reply).into_iter().map(|(item, _)| item).collect() };
    let mut only_before_memory = 0;
    for events in long {
        server.ingest(events).await;
        let user = &events[0].user_id;
        let had: std::collections::HashSet<&str> = events.iter().map(|e| e.item_id.as_str()).collect();
        let mut by_time = events.clone();
        by_time.sort_by_key(|e| e.timestamp);
        let in_memory: std::collections::HashSet<&str> = by_time[by_time.len() - CAP..]
            .iter()
            .map(|e| e.item_id.as_str())
            .collect();
        only_before_memory += had.difference(&in_memory).count();
        let (all, unseen) = all_and_unseen(&server, user).await;
        let expected: Vec<String> = ids(&all)
            .into_iter()
            .filter(|item| !had.contains(item.as_str()))
            .collect();
        assert_eq!(ids(&unseen), expected, "user {user}");
    }
    assert!(only_before_memory > 0, "some items must have left memory");

    // A user whose memory holds only items the model does not know gets popular items, less
    // the known ones it had before them.
    let mut events = by_user.values().find(|events| events.len() > 3).unwrap()[..3].to_vec();
    let unknown: Vec<Event> = (0..CAP)
        .map(|i| Event {
            user_id: "fallback-user".into(),
            item_id: format!("not-in-the-catalogue-{i}"),
            timestamp: events.iter().map(|e| e.timestamp).max().unwrap() + 1 + i as i64,
            ..events[0].clone()
        })
        .collect();
    let renamed: Vec<Event> = events
        .iter()
        .map(|e| Event {
            user_id: "fallback-user".into(),
            ..(*e).clone()
        })
        .collect();
    events = renamed.iter().chain(&unknown).collect();
    server.ingest(&events).await;
    let (all, unseen) = all_and_unseen(&server, "fallback-user").await;
    assert_eq!(
        (&all["fallback"], &unseen["fallback"]),
        (&json!("popular"), &json!("popular"))
    );
    let had: Vec<&str> = renamed.iter().map(|e| e.item_id.as_str()).collect();
    let expected: Vec<String> = ids(&all)
        .into_iter()
        .filter(|item| !had.contains(&item.as_str()))
        .collect();
    assert!(
        expected.len() < ids(&all).len(),
        "the known items are in the full popularity ranking"
    );
    assert_eq!(ids(&unseen), expected);
}

/// The user's whole ranking with seen items, then without.
async fn all_and_unseen(server: &Server, user: &str) -> (Value, Value) {
    let mut replies = Vec::new();
    for exclude_seen in [false, true] {
        let body = json!({"user_id": user, "k": 1000, "exclude_seen": exclude_seen});
        let (status, reply) = server.post("/v1/recommend", &body).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        replies.push(reply);
    }
    let unseen = replies.pop().unwrap();
    (replies.pop().unwrap(), unseen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidate_scores_are_the_full_scores_restricted_to_the_candidates() {
    let fx = fixture();
    let server = server(&[]).await;
    let by_user = users(&fx.events);
    let user = by_user.keys().next().unwrap();
    server.ingest(&by_user[user]).await;
    let full = ranked(
        &server
            .post(
                "/v1/recommend",
                &json!({"user_id": user, "k": 1000, "exclude_seen": false}),
            )
            .await
            .1,
    );
    let full: BTreeMap<String, f64> = full.into_iter().collect();
    // Duplicates, known and unknown, count once.
    let candidates = ["i3", "i10", "missing-ad", "i44", "i7", "i10", "missing-ad"];
    let (status, reply) = server
        .post(
            "/v1/recommend",
            &json!({"user_id": user, "k": 3, "candidates": candidates}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let got = ranked(&reply);
    let mut expected: Vec<(String, f64)> = candidates
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter_map(|c| full.get(*c).map(|s| (c.to_string(), *s)))
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));
    expected.truncate(3);
    assert_same_ranking(&got, &expected);
    assert_eq!(reply["unknown_candidates"], json!(["missing-ad"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_interests_fallback_and_erasure() {
    let server = server(&[]).await;
    let events = json!({"events": [
        {"user_id": "42", "item_id": "i5", "timestamp": 2000, "event_type": "click"},
        {"user_id": "42", "item_id": "brand-new", "timestamp": 1000},
        {"user_id": "42", "item_id": "i9", "timestamp": 1500, "event_type": "never-seen-type"}
    ]});
    let (status, reply) = server.post("/v1/events", &events).await;
    assert_eq!(
        (status, reply),
        (
            StatusCode::OK,
            json!({"accepted": 3, "unknown_items": 1, "unknown_event_types": 1})
        )
    );
    let (status, history) = server.get("/v1/users/42/history").await;
    assert_eq!(status, StatusCode::OK);
    let history: Value = serde_json::from_str(&history).unwrap();
    let items: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["item_id"].as_str().unwrap())
        .collect();
    assert_eq!(items, ["brand-new", "i9", "i5"]);
    assert_eq!(history["events"][0]["known_item"], false);
    assert_eq!(history["events"][2]["event_type"], "click");
    // The model reads a type it does not know as untyped (the store keeps the name).
    assert_eq!(history["events"][1]["event_type"], Value::Null);

    let (status, reply) = server.post("/v1/interests", &json!({"user_id": "42", "top": 3})).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let scores: Vec<f64> = reply["interests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), 3);
    assert!(
        (scores.iter().sum::<f64>() - 1.0).abs() < 1e-4,
        "three categories hold all the mass: {scores:?}"
    );
    assert!(scores.windows(2).all(|w| w[0] >= w[1]));

    let (status, _) = server.get("/v1/users/42").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let deleted = server
        .client
        .delete(format!("{}/v1/users/42", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(server.get("/v1/users/42/history").await.0, StatusCode::NOT_FOUND);
    let (status, reply) = server.post("/v1/recommend", &json!({"user_id": "42", "k": 5})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["fallback"], "popular");
    assert_eq!(reply["items"].as_array().unwrap().len(), 5);
    assert_eq!(server.metric("xsrec_users").await, 0.0);
}

async fn expect_error(server: &Server, path: &str, body: &Value, status: StatusCode, code: &str) {
    let (got, reply) = server.post(path, body).await;
    assert_eq!(got, status, "{path} {body}: {reply}");
    assert_eq!(reply["error"]["code"], code, "{reply}");
    assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_status_and_code() {
    let server = server(&["--max-events-per-call", "3", "--max-body-bytes", "2000"]).await;
    let raw = server
        .client
        .post(format!("{}/v1/recommend", server.base))
        .header("content-type", "application/json");
    let reply = raw.body("{\"user_id\": ").send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
    assert_eq!(reply.json::<Value>().await.unwrap()["error"]["code"], "malformed_json");
    let reply = server
        .client
        .post(format!("{}/v1/recommend", server.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Wrong routes, wrong methods and undecodable path ids get the same JSON error shape.
    for (method, path, status, code) in [
        (
            reqwest::Method::GET,
            "/v1/nope",
            StatusCode::NOT_FOUND,
            "route_not_found",
        ),
        (reqwest::Method::GET, "/", StatusCode::NOT_FOUND, "route_not_found"),
        (
            reqwest::Method::GET,
            "/v1/recommend",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            reqwest::Method::PUT,
            "/health/ready",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            reqwest::Method::GET,
            "/v1/users/%FF%FE/history",
            StatusCode::BAD_REQUEST,
            "malformed_path",
        ),
    ] {
        let reply = server
            .client
            .request(method.clone(), format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), status, "{method} {path}");
        assert_eq!(
            reply.json::<Value>().await.unwrap()["error"]["code"],
            code,
            "{method} {path}"
        );
    }

    let invalid = StatusCode::UNPROCESSABLE_ENTITY;
    let event = json!({"user_id": "u", "item_id": "i1", "timestamp": 5});
    let cases = [
        (
            "/v1/recommend",
            json!({"user_id": "u", "k": 0}),
            invalid,
            "invalid_request",
        ),
        (
            "/v1/recommend",
            json!({"user_id": "u", "k": 1001}),
            invalid,
            "invalid_request",
        ),
        (
            "/v1/recommend",
            json!({"user_id": "", "k": 5}),
            invalid,
            "invalid_request",
        ),
        (
            "/v1/recommend",
            json!({"user_id": "x".repeat(300)}),
            invalid,
            "invalid_request",
        ),
        (
            "/v1/recommend",
            json!({"user_id": "u", "kk": 5}),
            invalid,
            "invalid_request",
        ),
        (
            "/v1/recommend",
            json!({"user_id": "u", "candidates": []}),
            invalid,
            "invalid_request",
        ),
        (
            "/v1/recommend/batch",
            json!({"requests": []}),
            invalid,
            "invalid_request",
        ),
        ("/v1/events", json!({"events": []}), invalid, "invalid_request"),
        (
            "/v1/events",
            json!({"events": [event, event, event, event]}),
            invalid,
            "invalid_request",
        ),
        (
            "/v1/events",
            json!({"events": [event, {"user_id": "u", "item_id": "i1", "timestamp": -1}]}),
            invalid,
            "invalid_request",
        ),
        (
            "/v1/interests",
            json!({"user_id": "u", "top": 0}),
            invalid,
            "invalid_request",
        ),
        (
            "/v1/recommend",
            json!({"user_id": "u", "candidates": vec!["i1"; 1000]}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (path, body, status, code) in &cases {
        expect_error(&server, path, body, *status, code).await;
    }
    // A client counting milliseconds is told so.
    let millis = json!({"events": [{"user_id": "u", "item_id": "i1", "timestamp": 1_700_000_000_123i64}]});
    let (status, reply) = server.post("/v1/events", &millis).await;
    assert_eq!(status, invalid);
    assert_eq!(
        reply["error"]["message"],
        "`events[0].timestamp` must be Unix seconds in 0..=253402300799, got 1700000000123 (milliseconds? send seconds)"
    );
    assert_eq!(
        server.get("/v1/users/u/history").await.0,
        StatusCode::NOT_FOUND,
        "rejected calls store nothing"
    );
    let (status, body) = server.get("/v1/users/nobody/history").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("user_not_found"));

    let failures = server
        .metric("xsrec_request_failures_total{reason=\"invalid_request\",route=\"/v1/recommend\"}")
        .await;
    assert!(failures >= 6.0, "{failures}");

    // A drain turns readiness off at once; liveness stays.
    server.running.core.health.start_draining();
    expect_error(
        &server,
        "/v1/recommend",
        &json!({"user_id": "u"}),
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
    )
    .await;
    assert_eq!(server.get("/health/ready").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.get("/health/live").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_limit_and_deadline() {
    let full = server(&["--max-concurrent-requests", "0"]).await;
    let response = full
        .client
        .post(format!("{}/v1/recommend", full.base))
        .json(&json!({"user_id": "u"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "overloaded");

    // Requests wait 200 ms for their batch but may only live 20 ms.
    let slow = server(&["--request-timeout-ms", "20", "--max-batch-delay-us", "200000"]).await;
    let fx = fixture();
    let by_user = users(&fx.events);
    let user = by_user.keys().next().unwrap();
    slow.ingest(&by_user[user]).await;
    expect_error(
        &slow,
        "/v1/recommend",
        &json!({"user_id": user}),
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_model_info_are_there_before_any_traffic() {
    let server = server(&[]).await;
    let (status, text) = server.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for name in [
        "xsrec_requests_total",
        "xsrec_request_failures_total",
        "xsrec_request_duration_seconds",
        "xsrec_queue_wait_seconds",
        "xsrec_inference_duration_seconds",
        "xsrec_topk_duration_seconds",
        "xsrec_batch_size",
        "xsrec_inference_requests_total",
        "xsrec_batch_executions_total",
        "xsrec_queue_depth",
        "xsrec_users",
        "xsrec_history_events",
        "xsrec_history_bytes",
        "xsrec_events_ingested_total",
        "xsrec_cache_hits_total",
        "xsrec_cache_misses_total",
        "xsrec_model_info",
        "xsrec_device_info",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics"
        );
    }
    let (_, model) = server.get("/v1/model").await;
    let model: Value = serde_json::from_str(&model).unwrap();
    assert_eq!(model["config"]["model"]["max_len"], 30);
    assert_eq!(model["version"].as_str().unwrap().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_cleanly() {
    let mut server = ServerProcess::spawn(
        &fixture().model,
        &["--max-batch-delay-us", "600000", "--max-batch-size", "64"],
        &[],
    );
    let client = reqwest::Client::new();
    server.wait_ready(&client, Duration::from_secs(60)).await;
    let base = server.base.clone();
    let body = json!({"events": [{"user_id": "7", "item_id": "i1", "timestamp": 10}]});
    let ingested = client
        .post(format!("{base}/v1/events"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(ingested.status().is_success());
    // This request sits in the batcher for 600 ms; the signal arrives once it is queued.
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/v1/recommend");
        async move { client.post(url).json(&json!({"user_id": "7"})).send().await }
    });
    let started = std::time::Instant::now();
    loop {
        let metrics = server.metrics(&client).await;
        if metrics.lines().any(|l| l == "xsrec_queue_depth 1") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Draining: readiness turns off as soon as the signal is handled (or the listener is already
    // closed); polled, because the signal is handled asynchronously.
    let signalled = std::time::Instant::now();
    loop {
        let ready = client.get(format!("{base}/health/ready")).send().await;
        if ready.is_err() || ready.unwrap().status() == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_millis(500),
            "still ready after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let response = in_flight.await.unwrap().expect("in-flight request answered");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap()["user_id"], "7");
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit(Duration::from_secs(30));
        (status, server.stderr_to_end())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit status {}", status.0);
    assert!(
        status.1.iter().any(|l| l.contains("shut down cleanly")),
        "{:?}",
        status.1
    );
}

/// The committed default model on real ml-100k histories (`make test` fetches the data first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_preloads_users_and_reads_the_servers_batching_back() {
    let server = server(&["--cache-capacity", "0"]).await;
    let target = xsrec::bench::load::Target::new(&server.base, 8).unwrap();
    common::check_load_generator(&server, target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_serving_answers_and_says_so_in_metrics() {
    let server = server(&["--precision", "bf16"]).await;
    let user: Vec<&Event> = fixture()
        .events
        .iter()
        .filter(|e| e.user_id == fixture().events[0].user_id)
        .collect();
    server.ingest(&user).await;
    let (status, reply) = server
        .post(
            "/v1/recommend",
            &json!({"user_id": fixture().events[0].user_id, "k": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(ranked(&reply).len(), 5);
    assert_eq!(
        server
            .metric("xsrec_device_info{device=\"cpu\",precision=\"bf16\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_model_serves_ml100k_histories_exactly_as_offline_eval_scores_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("data/ml-100k/ml-100k.inter");
    assert!(data.exists(), "{} is missing: run `make data`", data.display());
    let model = root.join("models/default");
    let loaded = xsrec::data::formats::load_events(&data, &Default::default()).unwrap();
    let artifact = Artifact::load(&model, Device::Cpu).unwrap();
    let set = build_sequences(
        &loaded.events,
        artifact.items.clone(),
        artifact.event_types.clone(),
        false,
    );
    let server = server_for(&model, &["--history-cap", "1000"]).await;
    let offline = [false, true].map(|exclude_seen| offline_top(&artifact, &set, exclude_seen));
    for seq in set.users.iter().step_by(37) {
        let target = seq.len() - 1;
        let events: Vec<Event> = (0..target)
            .map(|i| Event {
                user_id: seq.user_id.clone(),
                item_id: set.items.id(seq.items[i]).to_owned(),
                timestamp: seq.timestamps[i],
                event_type: None,
            })
            .collect();
        server.ingest(&events.iter().collect::<Vec<_>>()).await;
        assert_online_equals_offline(&server, seq, &offline).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_from_any_directory_on_the_built_in_default_model() {
    let elsewhere = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::spawn_in(elsewhere.path(), &[], &[]);
    let client = reqwest::Client::new();
    server.wait_ready(&client, Duration::from_secs(60)).await;
    let model = server.get_json(&client, "/v1/model").await;
    // The committed model's files, byte for byte: the same version as served from the repo.
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    let files: Vec<Vec<u8>> = ["config.json", "items.tsv", "model.safetensors"]
        .iter()
        .map(|file| std::fs::read(committed.join(file)).unwrap())
        .collect();
    let expected = format!("{:016x}", xsrec::model::artifact::content_hash(files.iter().flatten()));
    assert_eq!(model["version"], expected.as_str());
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_address_takes_the_metrics_off_the_api_address() {
    let server = server(&["--admin-addr", "127.0.0.1:0"]).await;
    let admin = format!("http://{}", server.running.admin_addr.expect("bound"));
    let (status, body) = server.get("/metrics").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("route_not_found"));
    let metrics = server.client.get(format!("{admin}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(metrics.text().await.unwrap().contains("# TYPE xsrec_ready "));
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(server.get(path).await.0, StatusCode::OK, "{path} on the API address");
        let there = server.client.get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(there.status(), StatusCode::OK, "{path} on the admin address");
    }
    // The admin address serves nothing of the API.
    let api = server
        .client
        .post(format!("{admin}/v1/recommend"))
        .json(&json!({"user_id": "u"}))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), StatusCode::NOT_FOUND);
    server.shut_down().await.unwrap();
}

/// The monitoring kit in docker/ (alert rules, Grafana dashboard) names only metrics this server
/// exports, so a renamed metric cannot leave a silent dashboard or an alert that never fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alert_rules_name_only_metrics_the_server_exports() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&["--data-dir", dir.path().to_str().unwrap(), "--max-memory-bytes", "64M"]).await;
    let (_, exposition) = server.get("/metrics").await;
    let exported: std::collections::HashSet<&str> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("grafana/dashboards/xsrec.json")).unwrap()).unwrap();
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().clone())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(queries.len() >= 15, "{} queries", queries.len());
    queries.push(std::fs::read_to_string(root.join("prometheus/alerts.yml")).unwrap());
    let mut named = 0;
    for text in &queries {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("xsrec_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|base| exported.contains(base)))
                .unwrap_or(&name);
            assert!(exported.contains(base), "{name} is not exported: {text}");
            named += 1;
        }
    }
    assert!(named >= 30, "only {named} metric names found");
}
