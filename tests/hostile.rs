//! Clients that do not play fair: slow senders, idle connections, more connections than allowed.
mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends on `stream` until it closes it (at most `limit` to wait).
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept a stalled connection open past {limit:?}");
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_hold_no_admission_permit_and_are_cut_off() {
    let server = server(&[
        "--max-concurrent-requests",
        "4",
        "--body-read-timeout-ms",
        "400",
        "--header-read-timeout-ms",
        "400",
    ])
    .await;
    let fx = fixture();
    let by_user = users(&fx.events);
    let (user, events) = by_user.iter().next().unwrap();
    server.ingest(events).await;

    // Five times as many body tricklers as admission permits, and as many header tricklers.
    let addr = server.running.addr;
    let mut body_stalled = Vec::new();
    let mut head_stalled = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
            .await
            .unwrap();
        body_stalled.push(stream);
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        head_stalled.push(stream);
    }
    // Give the server time to take every one of them in before the real client arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, reply) = server.post("/v1/recommend", &json!({"user_id": user, "k": 3})).await;
    assert_eq!(status, StatusCode::OK, "a real client got through: {reply}");

    for mut stream in body_stalled {
        let response = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
        assert!(response.contains("body_timeout"), "{response}");
    }
    for mut stream in head_stalled {
        let response = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(!response.contains("200 OK"), "{response}");
    }
    let cut = server
        .metric("xsrec_request_failures_total{reason=\"body_timeout\",route=\"/v1/recommend\"}")
        .await;
    assert_eq!(cut, 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let mut server = server(&["--max-connections", "3", "--header-read-timeout-ms", "60000"]).await;
    // The readiness wait left a pooled keep-alive connection open: close it to start from none.
    server.client = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(server.running.addr).await.unwrap());
    }
    let live = format!("{}/health/live", server.base);
    let waiting = tokio::spawn({
        let live = live.clone();
        async move { reqwest::get(live).await.map(|r| r.status()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a fourth connection was served while three were open"
    );

    drop(idle.pop());
    let status = tokio::time::timeout(Duration::from_secs(10), waiting).await;
    assert_eq!(
        status.expect("served once a slot freed").unwrap().unwrap(),
        StatusCode::OK
    );
}

/// The gRPC port has the same two limits: silent connections are closed after the header read
/// timeout, and a client past the connection cap waits for a slot instead of being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_are_capped_and_silent_ones_cut_off() {
    let server = server(&["--max-connections", "2", "--header-read-timeout-ms", "800"]).await;
    let addr = server.running.grpc_addr.expect("gRPC is on in tests");
    let mut silent = vec![
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    let opened = std::time::Instant::now();
    let call = tokio::spawn(async move {
        let mut client = xsrec::grpc::pb::recommender_client::RecommenderClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client
            .model_info(xsrec::grpc::pb::ModelInfoRequest {})
            .await
            .map(|_| opened.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !call.is_finished(),
        "a third gRPC connection was served while two were open"
    );
    for stream in &mut silent {
        read_until_closed(stream, Duration::from_secs(5)).await;
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(800),
        "closed before the timeout"
    );
    let served_after = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("served once the silent connections were cut")
        .unwrap()
        .expect("the call succeeded");
    assert!(
        served_after >= Duration::from_millis(800),
        "served after {served_after:?}"
    );
}

/// Oversized request targets and headers get the API's JSON 414 and 431 (up to the sizes where
/// hyper answers itself), with the request id, and the connection is closed or kept usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_targets_and_headers_get_json_errors() {
    let server = server(&[]).await;
    let long_id = "a".repeat(20_000);
    let big_header = "b".repeat(40_000);
    let cases = [
        (
            format!("GET /v1/users/{long_id}/history HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
            "414",
            "uri_too_long",
        ),
        (
            format!("GET /health/live?{long_id} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
            "414",
            "uri_too_long",
        ),
        (
            format!("GET /health/live HTTP/1.1\r\nhost: x\r\nx-big: {big_header}\r\nconnection: close\r\n\r\n"),
            "431",
            "headers_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let mut stream = TcpStream::connect(server.running.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let response = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{}",
            &response[..80]
        );
        let body = response.split("\r\n\r\n").nth(1).unwrap();
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], code);
        assert!(body["error"]["request_id"].is_string());
        assert!(body.to_string().len() < 400, "the error does not echo the input");
    }
    // Just under the limits: served.
    let fits = format!("{}/health/live?{}", server.base, "q".repeat(8000));
    assert_eq!(server.client.get(fits).send().await.unwrap().status(), StatusCode::OK);
}

/// Any JSON value, a few levels deep, with the numbers and strings that break parsers.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from("u".repeat(300))),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bodies for `route`: its own fields with values of any type, plus garbage around them.
fn body_for(route: &'static str) -> BoxedStrategy<Vec<u8>> {
    let fields: &[&str] = match route {
        "/v1/events" => &["events"],
        "/v1/recommend" => &["user_id", "k", "at", "candidates", "exclude_seen"],
        "/v1/recommend/batch" => &["requests"],
        _ => &["user_id", "top", "at"],
    };
    let event = prop::collection::btree_map(
        prop::sample::select(vec!["user_id", "item_id", "timestamp", "event_type", "extra"]),
        any_json(),
        0..5,
    )
    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
    let value = prop_oneof![
        3 => any_json(),
        2 => prop::collection::vec(event, 0..4).prop_map(Value::Array),
    ];
    let object = prop::collection::btree_map(prop::sample::select(fields.to_vec()), value, 0..5)
        .prop_map(|m| serde_json::to_vec(&m).unwrap());
    prop_oneof![
        4 => object,
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]
    .boxed()
}

#[test]
fn any_request_body_gets_a_json_answer_and_never_a_server_error() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(server(&[]));
    let fx = fixture();
    let by_user = users(&fx.events);
    let (user, events) = by_user.iter().next().unwrap();
    runtime.block_on(server.ingest(events));
    let known_codes: Vec<&str> = xsrec::api::ApiError::all_codes().collect();
    let routes = prop::sample::select(vec![
        "/v1/events",
        "/v1/recommend",
        "/v1/recommend/batch",
        "/v1/interests",
    ]);
    let case = routes.prop_flat_map(|route| (Just(route), body_for(route)));
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&case, |(route, body)| {
            let (status, text) = runtime.block_on(async {
                let response = server
                    .client
                    .post(format!("{}{route}", server.base))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                (response.status(), response.text().await.unwrap())
            });
            prop_assert!(
                [200, 400, 404, 413, 422].contains(&status.as_u16()),
                "{route} {} → {status}: {text}",
                String::from_utf8_lossy(&body)
            );
            if status != StatusCode::OK {
                let reply: Value = serde_json::from_str(&text).unwrap();
                let code = reply["error"]["code"].as_str().unwrap_or_default();
                prop_assert!(known_codes.contains(&code), "{code}: {text}");
                prop_assert!(text.len() < 2048, "the error echoes too much: {} bytes", text.len());
            }
            Ok(())
        })
        .unwrap();
    // The one user stored before is untouched by whatever was refused.
    let (status, history) = runtime.block_on(server.get(&format!("/v1/users/{user}/history")));
    assert_eq!(status, StatusCode::OK);
    assert!(history.contains(&events.last().unwrap().item_id));
}

/// Clients that send a request with a large answer and close the connection at once: writing
/// the answer to a closed socket raises SIGPIPE, whose default action ended the whole server
/// (exit 141, nothing logged) after a few dozen such clients. The served process must ignore
/// the signal, so that the write fails and only that connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_hang_up_before_the_answer_cannot_end_the_server() {
    let fx = fixture();
    let mut server = ServerProcess::spawn(&fx.model, &[], &[]);
    let client = reqwest::Client::new();
    server.wait_ready(&client, Duration::from_secs(60)).await;
    let ignored = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let sig_ign = ignored.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap().trim();
    let mask = u64::from_str_radix(sig_ign, 16).unwrap();
    assert_ne!(
        mask & (1 << (libc::SIGPIPE - 1)),
        0,
        "the server does not ignore SIGPIPE: {sig_ign}"
    );

    // Half a megabyte of answer each: more than the socket buffers take before the close.
    let requests: Vec<Value> = (0..256)
        .map(|i| json!({"user_id": format!("hangup{i}"), "k": 1000}))
        .collect();
    let body = json!({ "requests": requests }).to_string();
    let request = format!(
        "POST /v1/recommend/batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let addr = server.base.trim_start_matches("http://").to_string();
    for _ in 0..60 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        drop(stream);
    }
    // Answered after the others (one batcher queue), so every hang-up has been written to.
    let last = client
        .post(format!("{}/v1/recommend/batch", server.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let answered = last.as_ref().is_ok_and(|a| a.status() == StatusCode::OK);
    std::thread::sleep(Duration::from_millis(200));
    assert!(answered, "{last:?}; the server: {:?}", server.child.try_wait());
    let answer = client.get(format!("{}/health/live", server.base)).send().await;
    assert!(
        answer.is_ok_and(|a| a.status() == StatusCode::OK),
        "the server stopped answering: {:?}",
        server.child.try_wait()
    );
    server.kill();
}
