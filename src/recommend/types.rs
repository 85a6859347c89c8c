//! Request and response bodies that every front end shares; their JSON shapes are the REST
//! API's, and their schemas in `docs/openapi.json` are derived from these definitions.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    pub user_id: String,
    pub item_id: String,
    /// Unix seconds.
    pub timestamp: i64,
    /// One of the model's event types (e.g. `view`, `cart`, `purchase`); absent: the first.
    pub event_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    pub events: Vec<EventIn>,
}

/// What an ingest stored.

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct EventsResponse {
    pub accepted: usize,
    /// Accepted events whose item the model does not know (stored, not model input).
    pub unknown_items: usize,
}

/// Items recommended when a request does not say (REST and gRPC alike).
pub const DEFAULT_K: usize = 10;
/// Categories returned by an interests request that does not say.
pub const DEFAULT_TOP: usize = 5;
/// The most items one recommendation may ask for.
pub const MAX_K: usize = 1000;

fn default_k() -> usize {
    DEFAULT_K
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    pub user_id: String,
    #[serde(default = "default_k")]
    #[schema(default = 10, minimum = 1, maximum = 1000)]
    pub k: usize,
    /// Leave the user's own items out of a full-catalogue ranking.
    #[serde(default = "default_true")]
    #[schema(default = true)]
    pub exclude_seen: bool,
    /// Rank only these items (e.g. the ads on offer).
    pub candidates: Option<Vec<String>>,
    /// Moment of prediction, Unix seconds; default now.
    pub at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ScoredItem {
    pub item_id: String,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct RecommendResponse {
    pub user_id: String,
    /// Best first.
    pub items: Vec<ScoredItem>,
    /// The version of the model that computed the answer.
    pub model_version: String,
    /// `"popular"` when the user had no usable history and popularity answered instead.
    pub fallback: Option<String>,
    /// Candidates the model does not know, left out of the ranking.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown_candidates: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRecommendRequest {
    pub requests: Vec<RecommendRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BatchRecommendResponse {
    pub results: Vec<RecommendResponse>,
}

fn default_top() -> usize {
    DEFAULT_TOP
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InterestsRequest {
    pub user_id: String,
    /// Categories to return.
    #[serde(default = "default_top")]
    #[schema(default = 5, minimum = 1)]
    pub top: usize,
    /// Moment of prediction, Unix seconds; default now.
    pub at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CategoryScore {
    pub category: String,
    /// Probability that the next item belongs to the category (multi-category items split evenly).
    pub score: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct InterestsResponse {
    pub user_id: String,
    /// Most likely first.
    pub interests: Vec<CategoryScore>,
    pub model_version: String,
    /// `"popular"` when the user had no usable history and popularity answered instead.
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct HistoryEvent {
    pub item_id: String,
    pub timestamp: i64,
    pub event_type: Option<String>,
    /// Whether the model knows the item (unknown items are stored but not model input).
    pub known_item: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct HistoryResponse {
    pub user_id: String,
    /// Oldest first: the events memory serves the model from (the newest `--history-cap`).
    pub events: Vec<HistoryEvent>,
}

/// `POST /admin/v1/model` (an empty body is the same as `{}`).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// Model directory on the server's machine; absent: the served model's directory, read again.
    pub path: Option<String>,
}

/// The served model (`GET /v1/model`, and the answer to a reload).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelInfo {
    /// A digest of the model's files; every answer names the version that computed it.
    pub version: String,
    /// The artifact's `config.json`: architecture, features, training data and metrics.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
}
