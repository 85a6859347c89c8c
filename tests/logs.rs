//! Request ids and logs: every answer, REST or gRPC, success or error, carries the request's id
//! (the client's when sensible, else a new one), error bodies too; every failed or shed request
//! is one log line naming that id, in text or JSON; a panicking handler is a JSON 500 and the
//! server goes on.
mod common;

use std::time::Duration;

use common::{fixture, server, ServerProcess};
use reqwest::StatusCode;
use serde_json::{json, Value};
use xsrec::grpc::pb;
use xsrec::grpc::pb::recommender_client::RecommenderClient;

async fn post_with_id(
    server: &common::Server,
    path: &str,
    id: Option<&str>,
    body: &Value,
) -> (StatusCode, String, Value) {
    let mut request = server.client.post(format!("{}{path}", server.base)).json(body);
    if let Some(id) = id {
        request = request.header("x-request-id", id);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let echoed = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    (status, echoed, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_the_request_id_and_error_bodies_too() {
    let server = server(&[]).await;
    let event = &fixture().events[0];
    server.ingest(&[event]).await;
    let good = json!({"user_id": event.user_id, "k": 3});
    let bad = json!({"user_id": event.user_id, "k": 0});

    let (status, echoed, _) = post_with_id(&server, "/v1/recommend", Some("client-id-1"), &good).await;
    assert_eq!((status, echoed.as_str()), (StatusCode::OK, "client-id-1"));
    let (status, echoed, body) = post_with_id(&server, "/v1/recommend", Some("client-id-2"), &bad).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(echoed, "client-id-2");
    assert_eq!(body["error"]["request_id"], "client-id-2");
    // None, or one that is no sensible token: a fresh UUID, the same in header and body.
    for offered in [None, Some("has spaces in it"), Some(&*"x".repeat(200))] {
        let (_, echoed, body) = post_with_id(&server, "/v1/recommend", offered, &bad).await;
        assert!(uuid::Uuid::parse_str(&echoed).is_ok(), "{offered:?} -> {echoed}");
        assert_eq!(body["error"]["request_id"], echoed.as_str());
    }
    let (_, first, _) = post_with_id(&server, "/v1/recommend", None, &good).await;
    let (_, second, _) = post_with_id(&server, "/v1/recommend", None, &good).await;
    assert_ne!(first, second);
    // Outside the routes too: a wrong path.
    let response = server
        .client
        .get(format!("{}/v2/nothing", server.base))
        .send()
        .await
        .unwrap();
    let echoed = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "route_not_found");
    assert_eq!(body["error"]["request_id"], echoed.as_str());

    // gRPC: in the response metadata, success or error.
    let addr = server.running.grpc_addr.unwrap();
    let mut grpc = RecommenderClient::connect(format!("http://{addr}")).await.unwrap();
    let mut ask = tonic::Request::new(pb::RecommendRequest {
        user_id: event.user_id.clone(),
        k: Some(3),
        ..Default::default()
    });
    ask.metadata_mut().insert("x-request-id", "grpc-id-1".parse().unwrap());
    let reply = grpc.recommend(ask).await.unwrap();
    assert_eq!(reply.metadata().get("x-request-id").unwrap(), "grpc-id-1");
    let refused = grpc
        .recommend(pb::RecommendRequest {
            user_id: "nobody-at-all".into(),
            k: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let id = refused.metadata().get("x-request-id").unwrap().to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    server.shut_down().await.unwrap();
}

/// The JSON lines of a server's stderr so far (all of them must be JSON).
fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_shed_requests_are_one_json_log_line_each_and_a_panic_is_a_json_500() {
    let server = ServerProcess::spawn(
        &fixture().model,
        // One permit, held for the 50 ms a batch waits for company: of many requests at once,
        // all but a few are shed.
        &[
            "--log-format",
            "json",
            "--max-concurrent-requests",
            "1",
            "--max-batch-delay-us",
            "50000",
        ],
        &[("FAILPOINTS", "api-model=1*panic")],
    );
    let client = reqwest::Client::new();
    server.wait_ready(&client, Duration::from_secs(60)).await;
    let post = |id: &'static str, body: Value| {
        let client = client.clone();
        let url = format!("{}/v1/recommend", server.base);
        async move {
            let response = client
                .post(url)
                .header("x-request-id", id)
                .json(&body)
                .send()
                .await
                .unwrap();
            response.status()
        }
    };
    let event = &fixture().events[0];
    let events = json!({"events": [{"user_id": "u", "item_id": event.item_id, "timestamp": event.timestamp}]});
    let stored = server.post(&client, "/v1/events", &events).await;
    assert_eq!(stored.status(), StatusCode::OK);
    assert_eq!(
        post("bad-k-7", json!({"user_id": "u", "k": 0})).await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(post("fine-1", json!({"user_id": "u", "k": 3})).await, StatusCode::OK);
    let burst = (0..64).map(|_| post("burst", json!({"user_id": "u", "k": 3})));
    let statuses = futures_util::future::join_all(burst).await;
    let shed = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert!(shed > 0, "{statuses:?}");

    // The failpoint panics inside the handler once: a JSON 500, and the server goes on.
    let response = client
        .get(format!("{}/v1/model", server.base))
        .header("x-request-id", "panic-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal_error");
    assert_eq!(body["error"]["request_id"], "panic-1");
    let again = client.get(format!("{}/v1/model", server.base)).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);

    // The log writer is a thread of its own; the panic's failure line is the last one written.
    let logged = server.wait_for_line(&["request failed", "panic-1"], Duration::from_secs(30));
    let lines = json_lines(&[server.startup.clone(), logged].concat());
    let failures: Vec<&Value> = lines.iter().filter(|l| l["message"] == "request failed").collect();
    let of = |id: &str| failures.iter().filter(|l| l["request_id"] == id).count();
    assert_eq!(of("bad-k-7"), 1);
    assert_eq!(of("fine-1"), 0, "successes are not failure lines");
    assert_eq!(of("burst"), shed, "one line per shed request");
    assert_eq!(of("panic-1"), 1);
    let bad = failures.iter().find(|l| l["request_id"] == "bad-k-7").unwrap();
    assert_eq!(bad["level"], "WARN");
    assert_eq!(bad["code"], "invalid_request");
    assert_eq!(bad["status"], "422");
    assert_eq!(bad["operation"], "POST /v1/recommend");
    let panicked = failures.iter().find(|l| l["request_id"] == "panic-1").unwrap();
    assert_eq!(panicked["level"], "ERROR");
    let start = lines
        .iter()
        .find(|l| l["message"].as_str().unwrap().starts_with("xsrec serve ServeConfig"));
    assert_eq!(start.expect("the configuration is logged at start")["level"], "INFO");
}
