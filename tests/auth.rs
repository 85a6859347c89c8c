//! API keys over both front ends: a key is needed for every /v1 call once keys are configured,
//! each key can do exactly its scopes, health and metrics stay open, and no token is ever
//! written to the server's output.
mod common;

use std::time::Duration;

use common::{fixture, server, ServerProcess};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tonic::Code;
use xsrec::grpc::pb;
use xsrec::grpc::pb::recommender_client::RecommenderClient;

const READER: &str = "reader-key-5c1d0e7f2a9b";
const WRITER: &str = "writer-key-8e4f6a1b3c7d";
const BOTH: &str = "both-key-2b9e7c4d1f0a6";
const ADMIN: &str = "admin-key-7d3a9f1c5e8b";

async fn call(
    server: &common::Server,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value, Option<String>) {
    let mut request = server.client.request(method, format!("{}{path}", server.base));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null), challenge)
}

/// `message` with the `authorization` metadata entry of `key`, if any.
fn with_key<T>(key: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_grant_exactly_their_scopes_over_rest_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        format!("# who may do what\n{READER} read\n{WRITER} write\n{BOTH} read,write\n{ADMIN} admin\n"),
    )
    .unwrap();
    let server = server(&["--api-keys-file", keys.to_str().unwrap()]).await;
    let events = json!({"events": [{"user_id": "u1", "item_id": fixture().events[0].item_id, "timestamp": 100}]});
    let recommend = json!({"user_id": "u1", "k": 3});
    use reqwest::Method;

    // No key, or a wrong one: 401 with a Bearer challenge, on every /v1 route.
    for key in [None, Some("not-a-key-at-all-000000"), Some(&READER[..READER.len() - 1])] {
        let (status, body, challenge) =
            call(&server, Method::POST, "/v1/recommend", key, Some(recommend.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(body["error"]["code"], "unauthenticated");
        assert_eq!(challenge.as_deref(), Some("Bearer"));
    }
    for (method, path) in [
        (Method::GET, "/v1/model"),
        (Method::GET, "/v1/users/u1/history"),
        (Method::DELETE, "/v1/users/u1"),
    ] {
        assert_eq!(
            call(&server, method, path, None, None).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    // Health, metrics and the spec stay open.
    for path in ["/health/live", "/health/ready", "/metrics", "/openapi.json"] {
        assert_eq!(server.get(path).await.0, StatusCode::OK, "{path}");
    }

    // Each key does exactly what its scopes allow.
    let (status, body, _) = call(&server, Method::POST, "/v1/events", Some(READER), Some(events.clone())).await;
    assert_eq!(body["error"]["code"], "forbidden", "{status}");
    let cases = [
        (Method::POST, "/v1/events", READER, Some(&events), StatusCode::FORBIDDEN),
        (Method::POST, "/v1/events", WRITER, Some(&events), StatusCode::OK),
        (Method::POST, "/v1/recommend", READER, Some(&recommend), StatusCode::OK),
        (
            Method::POST,
            "/v1/recommend",
            WRITER,
            Some(&recommend),
            StatusCode::FORBIDDEN,
        ),
        (Method::GET, "/v1/users/u1/history", READER, None, StatusCode::OK),
        (Method::GET, "/v1/users/u1/history", WRITER, None, StatusCode::FORBIDDEN),
        (Method::DELETE, "/v1/users/u1", READER, None, StatusCode::FORBIDDEN),
        (Method::GET, "/v1/model", BOTH, None, StatusCode::OK),
        // A reload (of the served model's own directory) is the admin scope's alone.
        (Method::POST, "/admin/v1/model", BOTH, None, StatusCode::FORBIDDEN),
        (Method::POST, "/admin/v1/model", ADMIN, None, StatusCode::OK),
        (
            Method::POST,
            "/v1/recommend",
            ADMIN,
            Some(&recommend),
            StatusCode::FORBIDDEN,
        ),
    ];
    for (method, path, key, body, expected) in cases {
        let (status, reply, _) = call(&server, method.clone(), path, Some(key), body.cloned()).await;
        assert_eq!(status, expected, "{method} {path} with the {} key: {reply}", &key[..6]);
    }

    // The same over gRPC, through the `authorization` metadata entry.
    let addr = server.running.grpc_addr.unwrap();
    let mut grpc = RecommenderClient::connect(format!("http://{addr}")).await.unwrap();
    let ask = pb::RecommendRequest {
        user_id: "u1".into(),
        k: Some(3),
        ..Default::default()
    };
    let refused = grpc.recommend(with_key(None, ask.clone())).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let ingest = pb::IngestEventsRequest {
        events: vec![pb::Event {
            user_id: "u2".into(),
            item_id: fixture().events[0].item_id.clone(),
            timestamp: 100,
            event_type: None,
        }],
    };
    let refused = grpc
        .ingest_events(with_key(Some(READER), ingest.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(refused.metadata().get("xsrec-code").unwrap(), "forbidden");
    grpc.ingest_events(with_key(Some(WRITER), ingest)).await.unwrap();
    grpc.recommend(with_key(Some(READER), ask.clone())).await.unwrap();
    let refused = grpc.recommend(with_key(Some(WRITER), ask)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let reload = pb::ReloadModelRequest::default();
    let refused = grpc
        .reload_model(with_key(Some(BOTH), reload.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    grpc.reload_model(with_key(Some(ADMIN), reload)).await.unwrap();

    // The key is checked before a message is decoded: without one, a message that would not
    // decode, or is over --max-body-bytes (1 MiB), is refused for the key alone.
    let no_key = |bytes: Vec<u8>| {
        common::grpc_call_with(
            &server,
            "/xsrec.v1.Recommender/IngestEvents",
            None,
            tokio_stream::iter([bytes]),
        )
    };
    for bytes in [vec![0xff; 8], vec![b'x'; 2 << 20]] {
        let refused = no_key(bytes).await;
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert_eq!(refused.metadata().get("xsrec-code").unwrap(), "unauthenticated");
    }
    server.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_servers_output_and_bad_key_files_refuse_to_start() {
    let secret = "env-key-9d8c7b6a5f4e3d2c";
    let mut server = ServerProcess::spawn(&fixture().model, &[], &[("XSREC_API_KEYS", &format!("{secret} read"))]);
    let client = reqwest::Client::new();
    // Readiness is open; then a refused and an accepted call, both naming keys.
    server.wait_ready(&client, Duration::from_secs(60)).await;
    for key in ["wrong-key-but-logged-maybe-0001", secret] {
        client
            .post(format!("{}/v1/recommend", server.base))
            .bearer_auth(key)
            .json(&json!({"user_id": "nobody", "k": 2}))
            .send()
            .await
            .unwrap();
    }
    server.kill();
    let output = [server.startup.clone(), server.stderr_to_end()].concat().join("\n");
    assert!(
        output.contains("ApiKeys(1 keys)"),
        "the configuration is printed, the keys counted"
    );
    assert!(
        !output.contains(secret) && !output.contains("wrong-key-but"),
        "{output}"
    );

    // A key file with a bad entry: the server refuses to start, naming the entry, not the token.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{READER} read\n{WRITER} superuser\n")).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_xsrec"))
        .args([
            "serve",
            "--model",
            fixture().model.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ])
        .args(["--grpc-addr", "off", "--api-keys-file", keys.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!status.status.success());
    let said = String::from_utf8_lossy(&status.stderr);
    assert!(said.contains("entry 2") && said.contains("superuser"), "{said}");
    assert!(!said.contains(WRITER), "{said}");
}
