//! The HTTP layers around the core: gzip for clients that ask, CORS for the origins an operator
//! names, and the backstop that answers a request the core left waiting.
mod common;

use common::server;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::io::Read;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_are_gzipped_for_clients_that_ask_and_small_ones_are_not() {
    let server = server(&[]).await;
    let get = |path: &str, gzip: bool| {
        let request = server.client.get(format!("{}{path}", server.base));
        match gzip {
            true => request.header("accept-encoding", "gzip"),
            false => request,
        }
        .send()
    };
    let plain = get("/openapi.json", false).await.unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    let plain = plain.bytes().await.unwrap();
    let zipped = get("/openapi.json", true).await.unwrap();
    assert_eq!(zipped.status(), StatusCode::OK);
    assert_eq!(zipped.headers()["content-encoding"], "gzip");
    assert!(zipped.headers().contains_key("x-request-id"));
    let zipped = zipped.bytes().await.unwrap();
    assert!(
        zipped.len() * 3 < plain.len(),
        "{} of {} bytes",
        zipped.len(),
        plain.len()
    );
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&zipped[..])
        .read_to_end(&mut unzipped)
        .unwrap();
    assert_eq!(unzipped, plain, "the same answer, compressed");
    for small in ["/health/live", "/no/such/route"] {
        let answer = get(small, true).await.unwrap();
        assert!(answer.headers().get("content-encoding").is_none(), "{small}");
        let body: Value = answer.json().await.unwrap();
        assert!(body.is_object(), "{small}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflights_for_the_named_origins_only_and_is_off_by_default() {
    let allowed = "https://shop.example";
    let server = server(&["--cors-allow-origin", "https://shop.example,https://ads.example"]).await;
    let preflight = |server_base: &str, origin: &str| {
        reqwest::Client::new()
            .request(Method::OPTIONS, format!("{server_base}/v1/recommend"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization,x-request-id",
            )
            .send()
    };
    let answer = preflight(&server.base, allowed).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let headers = answer.headers();
    assert_eq!(headers["access-control-allow-origin"], allowed);
    assert!(headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let allowed_headers = headers["access-control-allow-headers"].to_str().unwrap();
    for header in ["content-type", "authorization", "x-request-id"] {
        assert!(allowed_headers.contains(header), "{allowed_headers}");
    }
    let other = preflight(&server.base, "https://elsewhere.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // A real call from an allowed page may read the request id.
    let answer = server
        .client
        .get(format!("{}/v1/model", server.base))
        .header("origin", allowed)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["access-control-allow-origin"], allowed);
    let exposed = answer.headers()["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");

    let plain = common::server(&[]).await;
    let answer = preflight(&plain.base, allowed).await.unwrap();
    assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(answer.headers().get("access-control-allow-origin").is_none());
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[cfg(feature = "failpoints")]
mod backstop {
    use std::time::{Duration, Instant};

    use super::common::{fixture, history_timestamps, ServerProcess};
    use reqwest::StatusCode;
    use serde_json::{json, Value};

    /// The journal's writer stalls for 3 s on its first commit (a failpoint standing in for a stuck
    /// disk): the ingest waiting on it gets the JSON 504 once the body's and the request's limits
    /// (200 + 300 ms) and the margin (1 s) have passed, not when the disk comes back; the event is
    /// still stored once it does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_left_waiting_gets_the_json_504_from_the_backstop() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        let server = ServerProcess::spawn(
            &fixture().model,
            &[
                "--data-dir",
                data_dir,
                "--fsync",
                "always",
                "--body-read-timeout-ms",
                "200",
                "--request-timeout-ms",
                "300",
            ],
            &[("FAILPOINTS", "journal-commit=1*sleep(3000)")],
        );
        let client = reqwest::Client::new();
        server.wait_ready(&client, Duration::from_secs(60)).await;
        let item = &fixture().events[0].item_id;
        let ingest = |timestamp: i64| {
            client
                .post(format!("{}/v1/events", server.base))
                .json(&json!({"events": [{"user_id": "stalled", "item_id": item, "timestamp": timestamp}]}))
                .send()
        };
        let sent = Instant::now();
        let answer = ingest(100).await.unwrap();
        let waited = sent.elapsed();
        assert_eq!(answer.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(
            waited >= Duration::from_millis(1400) && waited < Duration::from_millis(2800),
            "answered after {waited:?}"
        );
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], "deadline_exceeded", "{body}");
        assert!(body["error"]["request_id"].is_string(), "{body}");
        // Once the disk is back, the next call is acknowledged and both events are stored. Sent
        // before the 3 s stall is over, it raced that stall against its own 1.5 s backstop and got
        // a 504 about one run in four.
        tokio::time::sleep_until((sent + Duration::from_millis(3_200)).into()).await;
        let answer = ingest(200).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        let history = server.get_json(&client, "/v1/users/stalled/history").await;
        assert_eq!(history_timestamps(&history), [100, 200]);
    }
}
