//! Clients that do not play fair: slow senders, idle connections, more connections than allowed.
mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
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
