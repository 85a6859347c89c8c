//! The HTTP API: router, shared state, request validation and the mapping of every failure to a
//! JSON error with a status. Handlers never touch tensors; they talk to the history store and
//! the inference engine.
pub mod error;
mod handlers;
pub mod types;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use crate::data::vocab::Vocab;
use crate::history::HistoryStore;
use crate::infer::Engine;
use crate::metrics::Metrics;
pub use error::{ApiError, FailureReason};

/// Request limits, all configurable at start.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_events_per_call: usize,
    pub max_id_bytes: usize,
    pub max_k: usize,
    pub max_candidates: usize,
    pub max_batch_requests: usize,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
}

/// What the API knows about items without asking the model.
pub struct Catalog {
    pub items: Vocab,
    /// External id per item index, shared with stored events.
    pub item_ids: Vec<Arc<str>>,
    pub event_types: Vocab,
    /// Item indices by descending training popularity (the fallback ranking).
    pub popular: Vec<u32>,
    pub item_counts: Vec<u64>,
    /// Category names; the inference worker's category index `c` is `categories[c]`.
    pub categories: Vec<String>,
    /// Category mass of the popularity distribution, largest first (the interests fallback).
    pub popular_interests: Vec<(usize, f32)>,
}

pub struct AppState {
    pub store: Arc<HistoryStore>,
    pub engine: Engine,
    pub catalog: Catalog,
    pub model_version: String,
    /// `config.json` of the loaded model, served by `GET /v1/model`.
    pub model_config: serde_json::Value,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    /// Permits for `/v1` requests in flight (`--max-concurrent-requests`).
    pub admission: Arc<Semaphore>,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
}

/// Routes under `/v1` pass admission control; health, metrics and the spec never wait.
pub const V1_ROUTES: [&str; 7] = [
    "/v1/events",
    "/v1/recommend",
    "/v1/recommend/batch",
    "/v1/interests",
    "/v1/users/{id}/history",
    "/v1/users/{id}",
    "/v1/model",
];
pub const OPS_ROUTES: [&str; 4] = ["/health/live", "/health/ready", "/metrics", "/openapi.json"];

pub fn router(state: Arc<AppState>) -> Router {
    // Every route's request counter exists before any traffic, so dashboards see zeros.
    for route in V1_ROUTES.iter().chain(&OPS_ROUTES) {
        state.metrics.requests.with_label_values(&[route, "200"]);
    }
    for code in ApiError::ALL_CODES {
        state
            .metrics
            .request_failures
            .with_label_values(&["/v1/recommend", code]);
    }
    let v1 = Router::new()
        .route("/v1/events", post(handlers::ingest))
        .route("/v1/recommend", post(handlers::recommend))
        .route("/v1/recommend/batch", post(handlers::recommend_batch))
        .route("/v1/interests", post(handlers::interests))
        .route("/v1/users/{id}/history", get(handlers::history))
        .route("/v1/users/{id}", axum::routing::delete(handlers::forget))
        .route("/v1/model", get(handlers::model))
        .route_layer(middleware::from_fn_with_state(state.clone(), admit));
    Router::new()
        .merge(v1)
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// Admission control: a request beyond `max_concurrent_requests` is refused at once with 429
/// rather than queued, so that overload cannot grow latency without bound.
async fn admit(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if !state.is_ready() {
        return ApiError::NotReady.into_response();
    }
    match state.admission.clone().try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ApiError::Overloaded.into_response(),
    }
}

async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .request_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    if let Some(FailureReason(reason)) = response.extensions().get::<FailureReason>() {
        metrics
            .request_failures
            .with_label_values(&[route.as_str(), reason])
            .inc();
    }
    response
}

/// `Json<T>` whose rejections are [`ApiError`]s, so malformed bodies get the API's error shape.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::InvalidRequest(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(e)) => Err(ApiError::UnsupportedMediaType(e.body_text())),
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::PayloadTooLarge),
            Err(e) => Err(ApiError::MalformedJson(e.body_text())),
        }
    }
}
