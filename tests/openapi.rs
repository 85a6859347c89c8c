//! The OpenAPI document against the code and the running server: the committed copy is the one
//! the code generates, every route is documented and every documented operation is routed, and
//! every answer to a family of good, bad and hostile requests has a documented status whose
//! documented codes name the one in its body.
mod common;

use common::{fixture, server, users, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use xsrec::api::error::ApiError;
use xsrec::api::{openapi, DOCS_UI, OPS_ROUTES, V1_ROUTES};
use xsrec::recommend::types::{DEFAULT_K, DEFAULT_TOP, MAX_K, MAX_TOP};

fn spec() -> Value {
    serde_json::from_str(&openapi::document()).unwrap()
}

#[test]
fn the_committed_document_is_the_one_the_code_generates() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    assert!(
        committed == openapi::document(),
        "docs/openapi.json is stale: run `cargo run --release -- openapi > docs/openapi.json`"
    );
}

#[test]
fn routes_codes_and_limits_in_the_document_are_the_codes() {
    let spec = spec();
    let documented: Vec<&str> = spec["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    let mut routed: Vec<&str> = V1_ROUTES.iter().chain(&OPS_ROUTES).copied().collect();
    routed.sort_unstable();
    let mut sorted = documented.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, routed, "documented paths vs the router's");

    // Routes under admission name the key scheme, which exists; health, metrics and the spec
    // are open.
    let schemes = spec["components"]["securitySchemes"].as_object().unwrap();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let named: Vec<&String> = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|requirement| requirement.as_object().unwrap().keys())
                .collect();
            assert!(
                named.iter().all(|name| schemes.contains_key(*name)),
                "{method} {path}: {named:?}"
            );
            let admitted = V1_ROUTES.contains(&path.as_str());
            assert_eq!(!named.is_empty(), admitted, "{method} {path}: security {named:?}");
        }
    }

    let codes = &spec["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["enum"];
    let mut codes: Vec<&str> = codes.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let mut all: Vec<&str> = ApiError::all_codes().collect();
    codes.sort_unstable();
    all.sort_unstable();
    assert_eq!(codes, all);

    let schemas = &spec["components"]["schemas"];
    let k = &schemas["RecommendRequest"]["properties"]["k"];
    assert_eq!(k["maximum"], json!(MAX_K));
    assert_eq!(k["default"], json!(DEFAULT_K));
    let top = &schemas["InterestsRequest"]["properties"]["top"];
    assert_eq!(top["default"], json!(DEFAULT_TOP));
    assert_eq!(top["maximum"], json!(MAX_TOP));
    // The list limits are the server's defaults (a server started with others says so itself).
    let defaults = common::config(&fixture().model, &[]);
    let max_items = |schema: &str, field: &str| schemas[schema]["properties"][field]["maxItems"].clone();
    assert_eq!(
        max_items("EventsRequest", "events"),
        json!(defaults.max_events_per_call)
    );
    assert_eq!(
        max_items("BatchRecommendRequest", "requests"),
        json!(defaults.max_batch_requests)
    );
    assert_eq!(
        max_items("RecommendRequest", "candidates"),
        json!(defaults.max_candidates)
    );
}

/// Bodies for each JSON operation: a good one, and ones that must be refused.
fn bodies(path: &str, user: &str, item: &str) -> Vec<Value> {
    let good = match path {
        "/v1/events" => json!({"events": [{"user_id": "openapi-new", "item_id": item, "timestamp": 1_000}]}),
        "/v1/recommend" => json!({"user_id": user, "k": 3}),
        "/v1/recommend/batch" => json!({"requests": [{"user_id": user}, {"user_id": "nobody", "k": 2}]}),
        "/v1/interests" => json!({"user_id": user}),
        "/admin/v1/model" => json!({"path": "/nonexistent/model"}),
        _ => json!({}),
    };
    vec![
        good,
        json!({}),
        json!(null),
        json!([1, 2]),
        json!({"user_id": "u", "k": 0}),
        json!({"user_id": "u", "k": MAX_K + 1}),
        json!({"user_id": "u", "unknown_field": true}),
        json!({"events": [{"user_id": "", "item_id": "x", "timestamp": -1}]}),
        json!({"user_id": "x".repeat(10_000)}),
    ]
}

/// `status` is documented for the operation, and an error's code is one its description names.
fn assert_documented(operation: &Value, what: &str, status: StatusCode, body: &str) {
    let response = &operation["responses"][status.as_str()];
    assert!(
        response.is_object(),
        "{what} answered {status}, which is not documented: {body}"
    );
    if status.is_client_error() || status.is_server_error() {
        let body: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: {status} body {body}"));
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {body}"));
        let description = response["description"].as_str().unwrap();
        assert!(
            description.contains(&format!("`{code}`")),
            "{what} answered {status} {code}, documented as {description}"
        );
    } else if let Some(schema) = response["content"]["application/json"]["schema"]["$ref"].as_str() {
        let name = schema.rsplit('/').next().unwrap();
        let body: Value = serde_json::from_str(body).unwrap();
        for field in spec()["components"]["schemas"][name]["required"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let field = field.as_str().unwrap();
            assert!(body.get(field).is_some(), "{what}: {name}.{field} missing from {body}");
        }
    }
}

async fn send(server: &Server, method: &Method, path: &str, body: Option<(&str, String)>) -> (StatusCode, String) {
    let mut request = server.client.request(method.clone(), format!("{}{path}", server.base));
    if let Some((content_type, body)) = body {
        request = request.header("content-type", content_type).body(body);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_the_server_has_a_documented_status_and_code() {
    let server = server(&[]).await;
    let fx = fixture();
    let by_user = users(&fx.events);
    let user = by_user.keys().next().unwrap().to_string();
    server.ingest(&by_user[user.as_str()]).await;
    let item = fx.events[0].item_id.clone();
    let spec = spec();
    let mut answers = 0;
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let what = format!("{method} {path}");
            let targets: Vec<String> = match path.contains("{id}") {
                true => [user.as_str(), "nobody", "%FF%FE", "a%2Fb", "%01x", "%20"]
                    .iter()
                    .map(|id| path.replace("{id}", id))
                    .collect(),
                false => vec![path.clone()],
            };
            let mut requests: Vec<Option<(&str, String)>> = vec![None];
            if operation.get("requestBody").is_some() {
                for body in bodies(path, &user, &item) {
                    requests.push(Some(("application/json", body.to_string())));
                }
                requests.push(Some(("application/json", "{\"user_id\": ".into())));
                requests.push(Some(("text/plain", "{}".into())));
            }
            for target in &targets {
                for request in &requests {
                    let (status, body) = send(&server, &method, target, request.clone()).await;
                    assert_ne!(
                        status,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "{what} is documented but not routed"
                    );
                    if status == StatusCode::NOT_FOUND {
                        assert!(!body.contains("route_not_found"), "{what} is documented but not routed");
                    }
                    assert_documented(operation, &what, status, &body);
                    answers += 1;
                }
            }
        }
    }
    assert!(answers >= 70, "{answers}");
    assert_eq!(server.get("/openapi.json").await.1, openapi::document());
    // The browsable copy.
    let (status, page) = server.get(&format!("{DOCS_UI}/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("swagger-ui"), "{page}");
}
