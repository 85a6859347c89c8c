//! Any request to the API (route chosen by the first byte, the rest as its body) is answered
//! with 2xx or a 4xx carrying a known error code, never a 5xx or a panic, and the error body
//! stays small whatever was sent. Runs the real router and core over the committed default model.
#![no_main]
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const ROUTES: [(&str, &str); 6] = [
    ("POST", "/v1/events"),
    ("POST", "/v1/recommend"),
    ("POST", "/v1/recommend/batch"),
    ("POST", "/v1/interests"),
    ("GET", "/v1/users/u1/history"),
    ("DELETE", "/v1/users/u1"),
];

struct Target {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/default");
        let router = runtime.block_on(async {
            let flags = [
                "--model",
                model,
                "--addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "off",
                "--device",
                "cpu",
            ];
            let config = xsrec::serve::ServeConfig::from_args(&flags).unwrap();
            let server = xsrec::serve::start(config, std::future::pending()).await.unwrap();
            while server.core.readiness() != xsrec::health::Readiness::Ready {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            xsrec::api::router(
                server.core.clone(),
                &xsrec::api::HttpOptions {
                    body_read_timeout: std::time::Duration::from_secs(1),
                    with_metrics: true,
                    cors_allow_origins: Vec::new(),
                },
            )
        });
        Target { runtime, router }
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&route, body)) = input.split_first() else {
        return;
    };
    let (method, path) = ROUTES[route as usize % ROUTES.len()];
    let target = target();
    let request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .unwrap();
    let response = target.runtime.block_on(target.router.clone().oneshot(request)).unwrap();
    let status = response.status();
    let bytes = target
        .runtime
        .block_on(axum::body::to_bytes(response.into_body(), 1 << 20))
        .unwrap();
    assert!(
        status.is_success() || status.is_client_error(),
        "{method} {path} {:?} → {status}: {}",
        String::from_utf8_lossy(body),
        String::from_utf8_lossy(&bytes)
    );
    if !status.is_success() {
        let reply: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON error body");
        let code = reply["error"]["code"].as_str().expect("an error code");
        assert!(xsrec::api::ApiError::all_codes().any(|known| known == code), "{code}");
        assert!(bytes.len() < 2048, "the error echoes too much: {} bytes", bytes.len());
    }
});
