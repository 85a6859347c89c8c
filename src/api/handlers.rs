//! Route handlers: decode, call the core, encode. Nothing here decides anything.
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use std::sync::LazyLock;
use utoipa::ToSchema;

use super::openapi::{
    AdmittedErrors, AnyRequestErrors, ForgetErrors, HistoryErrors, IngestErrors, InterestsErrors, ReadinessErrors,
    RecommendErrors, ReloadErrors,
};
use super::{ApiError, ApiJson, ApiPath};
use crate::health::Readiness;
use crate::recommend::error::quote;
use crate::recommend::types::*;
use crate::recommend::{CoreError, Recommender};

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A health check's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `live` or `ready`.
    pub status: &'static str,
    /// The served model's version (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
}

/// Stores a user's events (acknowledged once durable under `--fsync always`).
#[utoipa::path(post, path = "/v1/events", tag = "events", request_body = EventsRequest,
    responses((status = 200, description = "stored", body = EventsResponse), IngestErrors),
    security(("apiKey" = [])))]
pub async fn ingest(
    State(core): State<Arc<Recommender>>,
    ApiJson(body): ApiJson<EventsRequest>,
) -> ApiResult<EventsResponse> {
    Ok(Json(core.ingest(body).await?))
}

/// Top-k next items for a user, or the best of `candidates`.
#[utoipa::path(post, path = "/v1/recommend", tag = "recommendations", request_body = RecommendRequest,
    responses((status = 200, description = "ranked, best first", body = RecommendResponse), RecommendErrors),
    security(("apiKey" = [])))]
pub async fn recommend(
    State(core): State<Arc<Recommender>>,
    ApiJson(body): ApiJson<RecommendRequest>,
) -> ApiResult<RecommendResponse> {
    Ok(Json(core.recommend(body, core.deadline(None)).await?))
}

/// Several recommendations in one call, answered in order.
#[utoipa::path(post, path = "/v1/recommend/batch", tag = "recommendations", request_body = BatchRecommendRequest,
    responses((status = 200, description = "one result per request, in order", body = BatchRecommendResponse), RecommendErrors),
    security(("apiKey" = [])))]
pub async fn recommend_batch(
    State(core): State<Arc<Recommender>>,
    ApiJson(body): ApiJson<BatchRecommendRequest>,
) -> ApiResult<BatchRecommendResponse> {
    Ok(Json(core.recommend_batch(body, core.deadline(None)).await?))
}

/// The categories the user's next item is likely to come from.
#[utoipa::path(post, path = "/v1/interests", tag = "recommendations", request_body = InterestsRequest,
    responses((status = 200, description = "most likely first", body = InterestsResponse), InterestsErrors),
    security(("apiKey" = [])))]
pub async fn interests(
    State(core): State<Arc<Recommender>>,
    ApiJson(body): ApiJson<InterestsRequest>,
) -> ApiResult<InterestsResponse> {
    Ok(Json(core.interests(body, core.deadline(None)).await?))
}

/// The events memory holds for a user.
#[utoipa::path(get, path = "/v1/users/{id}/history", tag = "users", params(("id" = Id, Path, description = "the user's id")),
    responses((status = 200, description = "oldest first", body = HistoryResponse), HistoryErrors),
    security(("apiKey" = [])))]
pub async fn history(
    State(core): State<Arc<Recommender>>,
    ApiPath(user): ApiPath<String>,
) -> ApiResult<HistoryResponse> {
    Ok(Json(core.history(&user)?))
}

/// Erases a user: memory, the store and cached state.
#[utoipa::path(delete, path = "/v1/users/{id}", tag = "users", params(("id" = Id, Path, description = "the user's id")),
    responses((status = 204, description = "erased"), ForgetErrors),
    security(("apiKey" = [])))]
pub async fn forget(
    State(core): State<Arc<Recommender>>,
    ApiPath(user): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    core.forget(&user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The served model.
#[utoipa::path(get, path = "/v1/model", tag = "model",
    responses((status = 200, description = "the served model", body = ModelInfo), AdmittedErrors),
    security(("apiKey" = [])))]
pub async fn model(State(core): State<Arc<Recommender>>) -> Json<ModelInfo> {
    // Lets tests make a handler panic (FAILPOINTS=api-model=panic, failpoints builds only).
    fail::fail_point!("api-model");
    Json(core.model())
}

/// Loads a model beside the served one and switches to it between batches (needs `admin`).
#[utoipa::path(post, path = "/admin/v1/model", tag = "model", request_body(content = Option<ReloadRequest>,
        description = "empty, or the directory of the model to serve"),
    responses((status = 200, description = "the model now served", body = ModelInfo), ReloadErrors),
    security(("apiKey" = [])))]
pub async fn reload(State(core): State<Arc<Recommender>>, body: axum::body::Bytes) -> ApiResult<ModelInfo> {
    let request: ReloadRequest = match body.iter().all(u8::is_ascii_whitespace) {
        true => ReloadRequest::default(),
        false => serde_json::from_slice::<Option<ReloadRequest>>(&body)
            .map_err(|e| {
                CoreError::InvalidRequest(format!(
                    "the body must be empty, null or {{\"path\": \"MODEL_DIR\"}}: {}",
                    quote(&e.to_string())
                ))
            })?
            .unwrap_or_default(),
    };
    let path = request.path.map(|path| core.check_model_path(path)).transpose()?;
    Ok(Json(core.reload(path).await?.info()))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "live", body = Health), AnyRequestErrors))]
pub async fn live() -> Json<Health> {
    Json(Health {
        status: "live",
        model_version: None,
    })
}

/// Readiness: the model is warm, the worker and the store work, the server is not draining.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses((status = 200, description = "ready", body = Health), ReadinessErrors))]
pub async fn ready(State(core): State<Arc<Recommender>>) -> Result<Json<Health>, ApiError> {
    match core.readiness() {
        Readiness::Ready => Ok(Json(Health {
            status: "ready",
            model_version: Some(core.served().version.clone()),
        })),
        Readiness::Draining => Err(CoreError::ShuttingDown.into()),
        Readiness::Starting(reason) => Err(CoreError::NotReady(reason.to_owned()).into()),
        Readiness::Failed(reason) => Err(CoreError::NotReady(reason).into()),
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "the Prometheus text exposition", content_type = "text/plain", body = String), AnyRequestErrors))]
pub async fn metrics(State(core): State<Arc<Recommender>>) -> impl IntoResponse {
    core.refresh_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        core.metrics.render(),
    )
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "the OpenAPI document", body = Object), AnyRequestErrors))]
pub async fn openapi() -> impl IntoResponse {
    static DOCUMENT: LazyLock<String> = LazyLock::new(super::openapi::document);
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT.as_str())
}

pub async fn route_not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(uri.path().to_owned(), method.to_string())
}
