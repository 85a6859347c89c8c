//! Route handlers: validate, touch the history store, ask the engine, shape the answer.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::types::*;
use super::{ApiError, ApiJson, AppState};
use crate::history::{HistorySnapshot, StoredEvent};
use crate::infer::{Answer, InferError, Query};

type ApiResult<T> = Result<Json<T>, ApiError>;

const OPENAPI: &str = include_str!("../../docs/openapi.json");

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn check_id(field: &str, value: &str, max_bytes: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > max_bytes {
        return Err(ApiError::InvalidRequest(format!(
            "`{field}` must be a non-blank string of at most {max_bytes} bytes (got {} bytes)",
            value.len()
        )));
    }
    Ok(())
}

fn check_range(field: &str, value: usize, max: usize) -> Result<(), ApiError> {
    if !(1..=max).contains(&value) {
        return Err(ApiError::InvalidRequest(format!(
            "`{field}` must be in 1..={max}, got {value}"
        )));
    }
    Ok(())
}

pub async fn ingest(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<EventsRequest>,
) -> ApiResult<EventsResponse> {
    let limits = &state.limits;
    if body.events.is_empty() || body.events.len() > limits.max_events_per_call {
        return Err(ApiError::InvalidRequest(format!(
            "`events` must hold 1..={} events, got {}",
            limits.max_events_per_call,
            body.events.len()
        )));
    }
    // Validate everything before storing anything: a bad event rejects the whole call.
    for (i, event) in body.events.iter().enumerate() {
        let field = |name: &str| format!("events[{i}].{name}");
        check_id(&field("user_id"), &event.user_id, limits.max_id_bytes)?;
        check_id(&field("item_id"), &event.item_id, limits.max_id_bytes)?;
        if event.timestamp < 0 {
            return Err(ApiError::InvalidRequest(format!(
                "`{}` must be >= 0, got {}",
                field("timestamp"),
                event.timestamp
            )));
        }
        if let Some(event_type) = &event.event_type {
            check_id(&field("event_type"), event_type, limits.max_id_bytes)?;
        }
    }
    let catalog = &state.catalog;
    let mut unknown_items = 0;
    let mut by_user: HashMap<&str, Vec<StoredEvent>> = HashMap::new();
    for event in &body.events {
        let item = catalog.items.get(&event.item_id).unwrap_or(0);
        let item_id = match item {
            0 => {
                unknown_items += 1;
                Arc::from(event.item_id.as_str())
            }
            known => catalog.item_ids[known as usize].clone(),
        };
        // Types the model never saw read as "untyped" (index 1), exactly as offline.
        let event_type = event
            .event_type
            .as_deref()
            .and_then(|t| catalog.event_types.get(t))
            .unwrap_or(1);
        by_user.entry(&event.user_id).or_default().push(StoredEvent {
            item,
            item_id,
            timestamp: event.timestamp,
            event_type,
        });
    }
    for (user, events) in by_user {
        state.store.append(user, events);
    }
    state.metrics.events_ingested.inc_by(body.events.len() as u64);
    Ok(Json(EventsResponse {
        accepted: body.events.len(),
        unknown_items,
    }))
}

/// Runs one query through the engine within the request deadline.
async fn ask(
    state: &AppState,
    user: &str,
    history: HistorySnapshot,
    at: i64,
    query: Query,
) -> Result<Answer, ApiError> {
    let timeout = state.limits.request_timeout;
    let deadline = Instant::now() + timeout;
    let answer = state
        .engine
        .infer(Arc::from(user), Arc::new(history), at, query, deadline);
    match tokio::time::timeout(timeout, answer).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(InferError::Stopped)) => Err(ApiError::ShuttingDown),
        Ok(Err(InferError::DeadlineExceeded)) | Err(_) => Err(ApiError::DeadlineExceeded(timeout.as_millis() as u64)),
    }
}

/// A history the model can read: at least one known item.
fn usable_history(state: &AppState, user: &str) -> Option<HistorySnapshot> {
    state.store.snapshot(user).filter(|h| !h.items.is_empty())
}

pub async fn recommend_one(state: &AppState, request: RecommendRequest) -> Result<RecommendResponse, ApiError> {
    let limits = &state.limits;
    check_id("user_id", &request.user_id, limits.max_id_bytes)?;
    check_range("k", request.k, limits.max_k)?;
    let catalog = &state.catalog;
    let mut unknown_candidates = Vec::new();
    let candidates = match &request.candidates {
        None => None,
        Some(list) => {
            if list.is_empty() || list.len() > limits.max_candidates {
                return Err(ApiError::InvalidRequest(format!(
                    "`candidates` must hold 1..={} items, got {}",
                    limits.max_candidates,
                    list.len()
                )));
            }
            let mut known = Vec::with_capacity(list.len());
            for (i, id) in list.iter().enumerate() {
                check_id(&format!("candidates[{i}]"), id, limits.max_id_bytes)?;
                match catalog.items.get(id) {
                    Some(index) => known.push(i64::from(index)),
                    None => unknown_candidates.push(id.clone()),
                }
            }
            known.sort_unstable();
            known.dedup();
            Some(known)
        }
    };
    let at = request.at.unwrap_or_else(now_secs);
    let history = usable_history(state, &request.user_id);
    let (ranked, fallback) = match history {
        _ if candidates.as_ref().is_some_and(Vec::is_empty) => (Vec::new(), None),
        None => (
            popular(state, &request, candidates.as_deref()),
            Some("popular".to_owned()),
        ),
        Some(history) => {
            let query = match candidates {
                Some(candidates) => Query::Candidates {
                    k: request.k,
                    candidates,
                },
                None => {
                    let exclude = if request.exclude_seen {
                        history.items.iter().map(|&i| i64::from(i)).collect()
                    } else {
                        Vec::new()
                    };
                    Query::TopK { k: request.k, exclude }
                }
            };
            match ask(state, &request.user_id, history, at, query).await? {
                Answer::Items(items) => (items, None),
                Answer::Categories(_) => unreachable!("item queries get item answers"),
            }
        }
    };
    Ok(RecommendResponse {
        user_id: request.user_id,
        items: ranked
            .into_iter()
            .map(|(item, score)| ScoredItem {
                item_id: catalog.items.id(item).to_owned(),
                score,
            })
            .collect(),
        model_version: state.model_version.clone(),
        fallback,
        unknown_candidates,
    })
}

/// The popularity ranking (score = training count), for users the model cannot read.
fn popular(state: &AppState, request: &RecommendRequest, candidates: Option<&[i64]>) -> Vec<(u32, f32)> {
    let catalog = &state.catalog;
    let count = |item: u32| catalog.item_counts[item as usize] as f32;
    match candidates {
        Some(candidates) => {
            let mut ranked: Vec<(u32, f32)> = candidates.iter().map(|&i| (i as u32, count(i as u32))).collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            ranked.truncate(request.k);
            ranked
        }
        None => {
            let seen: HashSet<u32> = match (request.exclude_seen, state.store.snapshot(&request.user_id)) {
                (true, Some(history)) => history.events.iter().map(|e| e.item).collect(),
                _ => HashSet::new(),
            };
            catalog
                .popular
                .iter()
                .filter(|i| !seen.contains(i))
                .take(request.k)
                .map(|&i| (i, count(i)))
                .collect()
        }
    }
}

pub async fn recommend(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<RecommendRequest>,
) -> ApiResult<RecommendResponse> {
    recommend_one(&state, body).await.map(Json)
}

pub async fn recommend_batch(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<BatchRecommendRequest>,
) -> ApiResult<BatchRecommendResponse> {
    let max = state.limits.max_batch_requests;
    if body.requests.is_empty() || body.requests.len() > max {
        return Err(ApiError::InvalidRequest(format!(
            "`requests` must hold 1..={max} requests, got {}",
            body.requests.len()
        )));
    }
    // All at once: the batcher turns them into as few forward passes as it can.
    let pending = body.requests.into_iter().map(|request| recommend_one(&state, request));
    let results = futures_util::future::join_all(pending).await;
    let mut out = Vec::with_capacity(results.len());
    for (i, result) in results.into_iter().enumerate() {
        out.push(result.map_err(|e| match e {
            ApiError::InvalidRequest(message) => ApiError::InvalidRequest(format!("requests[{i}]: {message}")),
            other => other,
        })?);
    }
    Ok(Json(BatchRecommendResponse { results: out }))
}

pub async fn interests(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<InterestsRequest>,
) -> ApiResult<InterestsResponse> {
    check_id("user_id", &body.user_id, state.limits.max_id_bytes)?;
    let catalog = &state.catalog;
    if catalog.categories.is_empty() {
        return Err(ApiError::CategoriesUnavailable);
    }
    check_range("top", body.top, catalog.categories.len())?;
    let (ranked, fallback) = match usable_history(&state, &body.user_id) {
        None => (
            catalog.popular_interests.iter().take(body.top).copied().collect(),
            Some("popular".to_owned()),
        ),
        Some(history) => {
            let at = body.at.unwrap_or_else(now_secs);
            match ask(&state, &body.user_id, history, at, Query::Interests { top: body.top }).await? {
                Answer::Categories(ranked) => (ranked, None),
                Answer::Items(_) => unreachable!("interest queries get category answers"),
            }
        }
    };
    Ok(Json(InterestsResponse {
        user_id: body.user_id,
        interests: ranked
            .into_iter()
            .map(|(c, score)| CategoryScore {
                category: catalog.categories[c].clone(),
                score,
            })
            .collect(),
        model_version: state.model_version.clone(),
        fallback,
    }))
}

pub async fn history(State(state): State<Arc<AppState>>, Path(user): Path<String>) -> ApiResult<HistoryResponse> {
    let snapshot = state
        .store
        .snapshot(&user)
        .ok_or_else(|| ApiError::UserNotFound(user.clone()))?;
    let types = &state.catalog.event_types;
    let events = snapshot
        .events
        .iter()
        .map(|e| HistoryEvent {
            item_id: e.item_id.to_string(),
            timestamp: e.timestamp,
            event_type: Some(types.id(e.event_type))
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
            known_item: e.item != 0,
        })
        .collect();
    Ok(Json(HistoryResponse { user_id: user, events }))
}

pub async fn forget(State(state): State<Arc<AppState>>, Path(user): Path<String>) -> Result<StatusCode, ApiError> {
    if !state.store.remove(&user) {
        return Err(ApiError::UserNotFound(user));
    }
    state.engine.forget(Arc::from(user.as_str())).await;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn model(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({"version": state.model_version, "config": state.model_config}))
}

pub async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "live"}))
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    if state.is_ready() {
        Ok(Json(json!({"status": "ready", "model_version": state.model_version})))
    } else {
        Err(ApiError::NotReady)
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let stats = state.store.stats();
    let metrics = &state.metrics;
    metrics.users.set(stats.users as i64);
    metrics.events_held.set(stats.events as i64);
    metrics.history_bytes.set(stats.bytes as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render())
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}
