//! JSON request and response bodies (documented in `docs/openapi.json`).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    pub user_id: String,
    pub item_id: String,
    /// Unix seconds.
    pub timestamp: i64,
    pub event_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    pub events: Vec<EventIn>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventsResponse {
    pub accepted: usize,
    pub unknown_items: usize,
}

/// Items recommended when a request does not say (REST and gRPC alike).
pub const DEFAULT_K: usize = 10;
/// Categories returned by an interests request that does not say.
pub const DEFAULT_TOP: usize = 5;

fn default_k() -> usize {
    DEFAULT_K
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    pub user_id: String,
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default = "default_true")]
    pub exclude_seen: bool,
    /// Rank only these items (e.g. the ads on offer).
    pub candidates: Option<Vec<String>>,
    /// Moment of prediction, Unix seconds; default now.
    pub at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoredItem {
    pub item_id: String,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecommendResponse {
    pub user_id: String,
    pub items: Vec<ScoredItem>,
    pub model_version: String,
    /// `"popular"` when the user had no usable history and popularity answered instead.
    pub fallback: Option<String>,
    /// Candidates the model does not know, left out of the ranking.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown_candidates: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRecommendRequest {
    pub requests: Vec<RecommendRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchRecommendResponse {
    pub results: Vec<RecommendResponse>,
}

fn default_top() -> usize {
    DEFAULT_TOP
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterestsRequest {
    pub user_id: String,
    #[serde(default = "default_top")]
    pub top: usize,
    pub at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CategoryScore {
    pub category: String,
    /// Probability that the next item belongs to the category (multi-category items split evenly).
    pub score: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InterestsResponse {
    pub user_id: String,
    pub interests: Vec<CategoryScore>,
    pub model_version: String,
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEvent {
    pub item_id: String,
    pub timestamp: i64,
    pub event_type: Option<String>,
    /// Whether the model knows the item (unknown items are stored but not model input).
    pub known_item: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryResponse {
    pub user_id: String,
    pub events: Vec<HistoryEvent>,
}

/// `POST /admin/v1/model` (an empty body is the same as `{}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// Model directory on the server's machine; absent: the served model's directory, read again.
    pub path: Option<String>,
}
