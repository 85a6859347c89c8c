//! Route handlers: decode, call the core, encode. Nothing here decides anything.
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::{ApiError, ApiJson, ApiPath};
use crate::health::Readiness;
use crate::recommend::error::quote;
use crate::recommend::types::*;
use crate::recommend::{CoreError, Recommender};

type ApiResult<T> = Result<Json<T>, ApiError>;

const OPENAPI: &str = include_str!("../../docs/openapi.json");

pub async fn ingest(
    State(core): State<Arc<Recommender>>,
    ApiJson(body): ApiJson<EventsRequest>,
) -> ApiResult<EventsResponse> {
    Ok(Json(core.ingest(body).await?))
}

pub async fn recommend(
    State(core): State<Arc<Recommender>>,
    ApiJson(body): ApiJson<RecommendRequest>,
) -> ApiResult<RecommendResponse> {
    Ok(Json(core.recommend(body, core.deadline(None)).await?))
}

pub async fn recommend_batch(
    State(core): State<Arc<Recommender>>,
    ApiJson(body): ApiJson<BatchRecommendRequest>,
) -> ApiResult<BatchRecommendResponse> {
    Ok(Json(core.recommend_batch(body, core.deadline(None)).await?))
}

pub async fn interests(
    State(core): State<Arc<Recommender>>,
    ApiJson(body): ApiJson<InterestsRequest>,
) -> ApiResult<InterestsResponse> {
    Ok(Json(core.interests(body, core.deadline(None)).await?))
}

pub async fn history(
    State(core): State<Arc<Recommender>>,
    ApiPath(user): ApiPath<String>,
) -> ApiResult<HistoryResponse> {
    Ok(Json(core.history(&user)?))
}

pub async fn forget(
    State(core): State<Arc<Recommender>>,
    ApiPath(user): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    core.forget(&user).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn model(State(core): State<Arc<Recommender>>) -> Json<serde_json::Value> {
    // Lets tests make a handler panic (FAILPOINTS=api-model=panic, failpoints builds only).
    fail::fail_point!("api-model");
    Json(core.model())
}

pub async fn reload(State(core): State<Arc<Recommender>>, body: axum::body::Bytes) -> ApiResult<serde_json::Value> {
    let request: ReloadRequest = match body.iter().all(u8::is_ascii_whitespace) {
        true => ReloadRequest::default(),
        false => serde_json::from_slice(&body).map_err(|e| {
            CoreError::InvalidRequest(format!(
                "the body must be empty or {{\"path\": \"MODEL_DIR\"}}: {}",
                quote(&e.to_string())
            ))
        })?,
    };
    let path = request.path.map(|path| core.check_model_path(path)).transpose()?;
    Ok(Json(core.reload(path).await?.info()))
}

pub async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "live"}))
}

pub async fn ready(State(core): State<Arc<Recommender>>) -> Result<Json<serde_json::Value>, ApiError> {
    match core.readiness() {
        Readiness::Ready => Ok(Json(json!({"status": "ready", "model_version": core.served().version}))),
        Readiness::Draining => Err(CoreError::ShuttingDown.into()),
        Readiness::Starting(reason) => Err(CoreError::NotReady(reason.to_owned()).into()),
        Readiness::Failed(reason) => Err(CoreError::NotReady(reason).into()),
    }
}

pub async fn metrics(State(core): State<Arc<Recommender>>) -> impl IntoResponse {
    core.refresh_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        core.metrics.render(),
    )
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

pub async fn route_not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(uri.path().to_owned(), method.to_string())
}
