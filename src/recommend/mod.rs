//! The transport-free core: validation, admission, history, fallback and health behind typed
//! operations. REST (`api/`) and gRPC are thin adapters over a [`Recommender`]; nothing here
//! knows HTTP, and nothing here touches a tensor (the engine does).
pub mod auth;
pub mod catalog;
pub mod error;
pub mod request_id;
pub mod served;
pub mod types;

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use auth::{ApiKeys, Scope};
pub use catalog::Catalog;
pub use error::CoreError;
pub use served::{ModelLoader, ReloadError, ServedModel};
use types::*;

use crate::data::unix_now;
use crate::health::{Health, Readiness};
use crate::history::{Commit, HistorySnapshot, HistoryStore, NewEvent};
use crate::infer::{Answer, Engine, InferError, Query};
use crate::metrics::Metrics;

use crate::data::in_range_as_milliseconds;
pub use crate::data::MAX_TIMESTAMP;

/// The core's operations, as admission and authorization see them (every front end maps its
/// routes or methods onto these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Ingest,
    Recommend,
    RecommendBatch,
    Interests,
    History,
    Forget,
    ModelInfo,
    ReloadModel,
}

impl Operation {
    /// The scope an API key needs for it.
    pub fn scope(self) -> Scope {
        match self {
            Self::Ingest | Self::Forget => Scope::Write,
            Self::ReloadModel => Scope::Admin,
            _ => Scope::Read,
        }
    }

    /// Whether it waits in the inference engine's queue.
    fn uses_engine(self) -> bool {
        matches!(self, Self::Recommend | Self::RecommendBatch | Self::Interests)
    }
}

/// Request limits, all configurable at start.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_events_per_call: usize,
    pub max_id_chars: usize,
    pub max_k: usize,
    pub max_candidates: usize,
    pub max_batch_requests: usize,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
}

/// What an ingest stored that the served model does not know.
#[derive(Debug, Default)]
struct UnknownCounts {
    items: usize,
    event_types: usize,
}

/// When a request must be answered: the server's `--request-timeout-ms` from its arrival, or
/// sooner when the client says so (gRPC's `grpc-timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    /// The whole allowance, for the error message.
    pub budget: Duration,
}

pub struct Recommender {
    pub store: Arc<dyn HistoryStore>,
    pub engine: Engine,
    /// The model new requests get (see [`served`]). Held for reading while a request resolves
    /// ids and reads or writes a history, and for writing while a reload remaps the histories,
    /// so that a request's indices and its model always agree.
    pub served: RwLock<Arc<ServedModel>>,
    /// The catalog whose item indices memory holds: what the history store resolves users it
    /// reads back with (it follows reloads).
    pub memory_catalog: Arc<RwLock<Arc<Catalog>>>,
    pub loader: ModelLoader,
    /// One reload at a time.
    pub reloading: tokio::sync::Mutex<()>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Permits for requests in flight (`--max-concurrent-requests`).
    pub admission: Arc<Semaphore>,
    /// One scrape at a time brings the read-off counters up to date.
    pub scrape: std::sync::Mutex<()>,
    /// Empty: authentication is off.
    pub api_keys: ApiKeys,
}

fn reload_error(error: ReloadError) -> CoreError {
    match error {
        ReloadError::Load { .. } => CoreError::ModelLoadFailed(error.to_string()),
        ReloadError::Incompatible { .. } => CoreError::ModelIncompatible(error.to_string()),
    }
}

fn invalid(message: String) -> CoreError {
    CoreError::InvalidRequest(message)
}

/// Ids must be non-blank, bounded, and free of control characters (which would break the
/// tab-separated logs that `xsrec history export` writes for training). Counted in characters,
/// as JSON Schema's `maxLength` counts, so that the API's schema ([`types::Id`]) says exactly
/// what is accepted.
/// `field` is formatted only into an error: checked per event and per candidate, names built
/// eagerly were a tenth of an ingest handler's `perf` samples (calls of 100 events).
fn check_id(field: impl Display, value: &str, max_chars: usize) -> Result<(), CoreError> {
    let chars = value.chars().count();
    if value.trim().is_empty() || chars > max_chars || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "`{field}` must be a non-blank string of at most {max_chars} characters without control characters (got {chars} characters)"
        )));
    }
    Ok(())
}

fn check_range(field: &str, value: usize, max: usize) -> Result<(), CoreError> {
    if !(1..=max).contains(&value) {
        return Err(invalid(format!("`{field}` must be in 1..={max}, got {value}")));
    }
    Ok(())
}

fn check_time(field: impl Display, value: i64) -> Result<(), CoreError> {
    if !(0..=MAX_TIMESTAMP).contains(&value) {
        let hint = match value > MAX_TIMESTAMP && in_range_as_milliseconds(value as f64) {
            true => " (milliseconds? send seconds)",
            false => "",
        };
        return Err(invalid(format!(
            "`{field}` must be Unix seconds in 0..={MAX_TIMESTAMP}, got {value}{hint}"
        )));
    }
    Ok(())
}

/// The rules every stored event meets, whichever way it arrives (ingest, import).
pub fn check_event(
    field: impl Display,
    user_id: &str,
    item_id: &str,
    timestamp: i64,
    event_type: Option<&str>,
    max_id_chars: usize,
) -> Result<(), CoreError> {
    check_id(format_args!("{field}.user_id"), user_id, max_id_chars)?;
    check_id(format_args!("{field}.item_id"), item_id, max_id_chars)?;
    check_time(format_args!("{field}.timestamp"), timestamp)?;
    match event_type {
        Some(event_type) => check_id(format_args!("{field}.event_type"), event_type, max_id_chars),
        None => Ok(()),
    }
}

/// Longest user, item or type id accepted, in characters.
pub const MAX_ID_CHARS: usize = 256;
/// Longest model directory a reload accepts, in characters.
pub const MAX_PATH_CHARS: usize = 4096;

impl Recommender {
    /// The deadline of a request arriving now, `client` being the client's own allowance.
    pub fn deadline(&self, client: Option<Duration>) -> Deadline {
        let budget = client.map_or(self.limits.request_timeout, |c| c.min(self.limits.request_timeout));
        Deadline {
            at: Instant::now() + budget,
            budget,
        }
    }

    /// Readiness from everything that can make the service unable to answer correctly.
    pub fn readiness(&self) -> Readiness {
        match (self.health.readiness(), self.store.health()) {
            (Readiness::Ready, Err(error)) => Readiness::Failed(error.to_string()),
            (readiness, _) => readiness,
        }
    }

    /// Whether the caller's API key (the `Authorization` value) may run `operation`.
    pub fn authorize(&self, operation: Operation, authorization: Option<&str>) -> Result<(), CoreError> {
        self.api_keys.authorize(authorization, operation.scope())
    }

    /// A permit for one request, or why there is none: the caller's API key (`authorization`,
    /// the `Authorization` value) first, then readiness, then room. Refused at once rather than
    /// queued, so that overload cannot grow latency without bound; work for the inference engine
    /// is turned away here already while the engine is full, before anything is decoded or
    /// looked up: under overload a refusal must cost as little as possible.
    pub fn admit(&self, operation: Operation, authorization: Option<&str>) -> Result<OwnedSemaphorePermit, CoreError> {
        self.authorize(operation, authorization)?;
        self.admit_authorized(operation)
    }

    /// [`Recommender::admit`] for a caller whose key was already judged by
    /// [`Recommender::authorize`] (gRPC judges it before the message is read).
    pub fn admit_authorized(&self, operation: Operation) -> Result<OwnedSemaphorePermit, CoreError> {
        match self.readiness() {
            Readiness::Ready => {}
            Readiness::Draining => return Err(CoreError::ShuttingDown),
            Readiness::Starting(reason) => return Err(CoreError::NotReady(reason.to_owned())),
            Readiness::Failed(reason) => return Err(CoreError::NotReady(reason)),
        }
        if operation.uses_engine() && !self.engine.has_room() {
            return Err(CoreError::Overloaded);
        }
        self.admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| CoreError::Overloaded)
    }

    pub async fn ingest(&self, request: EventsRequest) -> Result<EventsResponse, CoreError> {
        let limits = &self.limits;
        if request.events.is_empty() || request.events.len() > limits.max_events_per_call {
            return Err(invalid(format!(
                "`events` must hold 1..={} events, got {}",
                limits.max_events_per_call,
                request.events.len()
            )));
        }
        // Validate everything before storing anything: a bad event rejects the whole call.
        for (i, event) in request.events.iter().enumerate() {
            check_event(
                format_args!("events[{i}]"),
                &event.user_id,
                &event.item_id,
                event.timestamp,
                event.event_type.as_deref(),
                limits.max_id_chars,
            )?;
        }
        let accepted = request.events.len();
        let (commit, unknown) = self.append_events(request.events);
        commit
            .wait()
            .await
            .map_err(|e| CoreError::StorageFailed(e.to_string()))?;
        self.metrics.events_ingested.inc_by(accepted as u64);
        Ok(EventsResponse {
            accepted,
            unknown_items: unknown.items,
            unknown_event_types: unknown.event_types,
        })
    }

    /// Resolves validated events with the served model and adds them to memory (the commit says
    /// when they are durable); also counts what the model does not know.
    fn append_events(&self, events: Vec<EventIn>) -> (Commit, UnknownCounts) {
        let mut unknown = UnknownCounts::default();
        let mut by_user: HashMap<String, Vec<NewEvent>> = HashMap::new();
        // Held until memory has the events: no reload remaps in between.
        let served = self.served.read().unwrap_or_else(|e| e.into_inner());
        let catalog = &served.catalog;
        for event in events {
            let known_type = event.event_type.as_deref().and_then(|t| catalog.event_types.get(t));
            let mut stored = catalog.resolve_typed(&event.item_id, known_type);
            stored.timestamp = event.timestamp;
            unknown.items += usize::from(stored.item == 0);
            let type_id = event.event_type.map(|t| match known_type {
                Some(known) => catalog.event_type_ids[known as usize].clone(),
                None => {
                    unknown.event_types += 1;
                    Arc::from(t)
                }
            });
            by_user
                .entry(event.user_id)
                .or_default()
                .push(NewEvent { event: stored, type_id });
        }
        let writes = by_user
            .into_iter()
            .map(|(user, events)| (Arc::from(user), events))
            .collect();
        (self.store.append(writes), unknown)
    }

    /// Runs one query through the engine within the request's deadline.
    async fn ask(
        &self,
        served: &ServedModel,
        user: &str,
        history: HistorySnapshot,
        at: i64,
        query: Query,
        deadline: Deadline,
    ) -> Result<Answer, CoreError> {
        let exceeded = || CoreError::DeadlineExceeded(deadline.budget.as_millis() as u64);
        // Already past it (a tiny client budget): no queue, no timer.
        if Instant::now() >= deadline.at {
            return Err(exceeded());
        }
        let answer = self.engine.infer(
            served.slot.clone(),
            Arc::from(user),
            Arc::new(history),
            at,
            query,
            deadline.at,
        );
        match tokio::time::timeout_at(deadline.at.into(), answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(InferError::Stopped)) => Err(CoreError::ShuttingDown),
            Ok(Err(InferError::Overloaded)) => Err(CoreError::Overloaded),
            Ok(Err(InferError::Failed(reason))) => Err(CoreError::InferenceFailed(reason)),
            Ok(Err(InferError::DeadlineExceeded)) | Err(_) => Err(exceeded()),
        }
    }

    /// The served model and the user's history (read back from the store if the memory budget
    /// evicted it), read together: the history's item indices are that model's.
    fn served_with_history(&self, user: &str) -> Result<(Arc<ServedModel>, Option<HistorySnapshot>), CoreError> {
        let served = self.served.read().unwrap_or_else(|e| e.into_inner());
        let history = self
            .store
            .snapshot(user)
            .map_err(|e| CoreError::StorageFailed(format!("reading the history back: {e}")))?;
        Ok((served.clone(), history))
    }

    pub async fn recommend(
        &self,
        request: RecommendRequest,
        deadline: Deadline,
    ) -> Result<RecommendResponse, CoreError> {
        let limits = &self.limits;
        check_id("user_id", &request.user_id, limits.max_id_chars)?;
        check_range("k", request.k, limits.max_k)?;
        if let Some(at) = request.at {
            check_time("at", at)?;
        }
        if let Some(list) = &request.candidates {
            if list.is_empty() || list.len() > limits.max_candidates {
                return Err(invalid(format!(
                    "`candidates` must hold 1..={} items, got {}",
                    limits.max_candidates,
                    list.len()
                )));
            }
            for (i, id) in list.iter().enumerate() {
                check_id(format_args!("candidates[{i}]"), id, limits.max_id_chars)?;
            }
        }
        // Only a valid request reads the history (which may read it back from disk).
        let (served, history) = self.served_with_history(&request.user_id)?;
        let catalog = &served.catalog;
        let mut unknown_candidates = Vec::new();
        let candidates = match &request.candidates {
            None => None,
            Some(list) => {
                let mut known = Vec::with_capacity(list.len());
                // Each unknown id once, in the order given, as known ones are ranked once.
                let mut unknown_seen = HashSet::new();
                for id in list {
                    match catalog.items.get(id) {
                        Some(index) => known.push(i64::from(index)),
                        None if unknown_seen.insert(id.as_str()) => unknown_candidates.push(id.clone()),
                        None => {}
                    }
                }
                known.sort_unstable();
                known.dedup();
                Some(known)
            }
        };
        let at = request.at.unwrap_or_else(unix_now);
        let (ranked, fallback) = match history {
            _ if candidates.as_ref().is_some_and(Vec::is_empty) => (Vec::new(), None),
            Some(history) if !history.items.is_empty() => {
                let query = match candidates {
                    Some(candidates) => Query::Candidates {
                        k: request.k,
                        candidates,
                    },
                    None => Query::TopK {
                        k: request.k,
                        exclude_seen: request.exclude_seen,
                    },
                };
                match self
                    .ask(&served, &request.user_id, history, at, query, deadline)
                    .await?
                {
                    Answer::Items(items) => (items, None),
                    Answer::Categories(_) => unreachable!("item queries get item answers"),
                }
            }
            // No history the model can read: popularity answers (seen items left out when asked).
            snapshot => {
                let seen: HashSet<u32> = match (request.exclude_seen, snapshot) {
                    (true, Some(history)) => {
                        let in_memory = history.events.iter().map(|e| e.item);
                        in_memory.chain(history.earlier_items.iter().copied()).collect()
                    }
                    _ => HashSet::new(),
                };
                let ranked = catalog.popular_items(request.k, candidates.as_deref(), &seen);
                (ranked, Some("popular".to_owned()))
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
            model_version: served.version.clone(),
            fallback,
            unknown_candidates,
        })
    }

    pub async fn recommend_batch(
        &self,
        request: BatchRecommendRequest,
        deadline: Deadline,
    ) -> Result<BatchRecommendResponse, CoreError> {
        let max = self.limits.max_batch_requests;
        if request.requests.is_empty() || request.requests.len() > max {
            return Err(invalid(format!(
                "`requests` must hold 1..={max} requests, got {}",
                request.requests.len()
            )));
        }
        // All at once: the batcher turns them into as few forward passes as it can.
        let pending = request
            .requests
            .into_iter()
            .map(|request| self.recommend(request, deadline));
        let results = futures_util::future::join_all(pending).await;
        let mut out = Vec::with_capacity(results.len());
        for (i, result) in results.into_iter().enumerate() {
            out.push(result.map_err(|e| match e {
                CoreError::InvalidRequest(message) => invalid(format!("requests[{i}]: {message}")),
                other => other,
            })?);
        }
        Ok(BatchRecommendResponse { results: out })
    }

    pub async fn interests(
        &self,
        request: InterestsRequest,
        deadline: Deadline,
    ) -> Result<InterestsResponse, CoreError> {
        check_id("user_id", &request.user_id, self.limits.max_id_chars)?;
        check_range("top", request.top, types::MAX_TOP)?;
        if let Some(at) = request.at {
            check_time("at", at)?;
        }
        let (served, history) = self.served_with_history(&request.user_id)?;
        let catalog = &served.catalog;
        if catalog.categories.is_empty() {
            return Err(CoreError::CategoriesUnavailable);
        }
        // Asking for more categories than the model has gets them all, as a large k gets the
        // whole catalogue.
        let top = request.top.min(catalog.categories.len());
        // Only a history with a known item is one the model can read.
        let (ranked, fallback) = match history.filter(|h| !h.items.is_empty()) {
            None => (
                catalog.popular_interests.iter().take(top).copied().collect(),
                Some("popular".to_owned()),
            ),
            Some(history) => {
                let at = request.at.unwrap_or_else(unix_now);
                let query = Query::Interests { top };
                match self
                    .ask(&served, &request.user_id, history, at, query, deadline)
                    .await?
                {
                    Answer::Categories(ranked) => (ranked, None),
                    Answer::Items(_) => unreachable!("interest queries get category answers"),
                }
            }
        };
        Ok(InterestsResponse {
            user_id: request.user_id,
            interests: ranked
                .into_iter()
                .map(|(c, score)| CategoryScore {
                    category: catalog.categories[c].clone(),
                    score,
                })
                .collect(),
            model_version: served.version.clone(),
            fallback,
        })
    }

    pub fn history(&self, user: &str) -> Result<HistoryResponse, CoreError> {
        check_id("user_id", user, self.limits.max_id_chars)?;
        let (served, snapshot) = self.served_with_history(user)?;
        let snapshot = snapshot.ok_or_else(|| CoreError::UserNotFound(user.to_owned()))?;
        let types = &served.catalog.event_types;
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
        Ok(HistoryResponse {
            user_id: user.to_owned(),
            events,
        })
    }

    /// Erases a user from memory, the inference cache and the journal; returns once the erasure
    /// is as durable as an ingest would be.
    pub async fn forget(&self, user: &str) -> Result<(), CoreError> {
        check_id("user_id", user, self.limits.max_id_chars)?;
        let (erased_at, commit) = self
            .store
            .remove(user)
            .ok_or_else(|| CoreError::UserNotFound(user.to_owned()))?;
        self.engine.forget(Arc::from(user), erased_at);
        commit.wait().await.map_err(|e| CoreError::StorageFailed(e.to_string()))
    }

    /// A reload's model directory as a client gave it: non-blank, bounded, no control characters.
    pub fn check_model_path(&self, path: String) -> Result<PathBuf, CoreError> {
        check_id("path", &path, MAX_PATH_CHARS)?;
        Ok(PathBuf::from(path))
    }

    /// The model new requests get.
    pub fn served(&self) -> Arc<ServedModel> {
        self.served.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn model(&self) -> types::ModelInfo {
        self.served().info()
    }

    /// Replaces the served model with the one in `dir` (the served model's own directory, read
    /// again, when `None`) without stopping: it is loaded and warmed up beside the served one,
    /// then new requests get it, while requests already admitted finish on the old one.
    /// Histories and the store are kept (their items mapped to the new model's by id); states
    /// cached from the old model are not used again. Refused, with the served model left in
    /// place, before the service is ready, or when the new model cannot be read or numbers event
    /// types differently. Returns the new model.
    pub async fn reload(&self, dir: Option<PathBuf>) -> Result<Arc<ServedModel>, CoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        // Recovery fills memory with the first model's indices; a remap must come after it.
        if let Readiness::Starting(reason) = self.readiness() {
            return Err(CoreError::NotReady(reason.to_owned()));
        }
        let started = Instant::now();
        let outcome = self.replace_model(dir).await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(error) => error.code(),
        };
        self.metrics.model_reloads.with_label_values(&[label]).inc();
        match &outcome {
            Ok(served) => tracing::info!(
                "model reloaded from {} in {:.2} s: version {}",
                served.dir.display(),
                started.elapsed().as_secs_f64(),
                served.version
            ),
            Err(error) => tracing::warn!("model reload refused ({}): {error}", error.code()),
        }
        outcome
    }

    async fn replace_model(&self, dir: Option<PathBuf>) -> Result<Arc<ServedModel>, CoreError> {
        let current = self.served();
        let dir = dir.unwrap_or_else(|| current.dir.clone());
        let loader = self.loader.clone();
        let reading = dir.clone();
        let loaded = tokio::task::spawn_blocking(move || loader.load(&reading))
            .await
            .map_err(|e| CoreError::ModelLoadFailed(format!("loading the model from {}: {e}", dir.display())))?;
        let (artifact, version) = loaded.map_err(reload_error)?;
        let catalog = Arc::new(Catalog::new(&artifact));
        served::check_compatible(&current.catalog, &catalog, &dir).map_err(reload_error)?;
        let config = serde_json::to_value(&artifact.config)
            .map_err(|e| CoreError::ModelLoadFailed(format!("{}: its config: {e}", dir.display())))?;
        let arch = artifact.config.model.arch;
        let slot = self.engine.install(artifact).await.map_err(|e| match e {
            InferError::Stopped => CoreError::ShuttingDown,
            other => CoreError::ModelLoadFailed(format!("{}: {other}", dir.display())),
        })?;
        let remap = current.catalog.item_ids != catalog.item_ids;
        let next = Arc::new(ServedModel {
            version,
            config,
            catalog,
            dir,
            slot,
        });
        {
            // Requests wait here for the moment of the remap (no await while it is held).
            let mut served = self.served.write().unwrap_or_else(|e| e.into_inner());
            if remap {
                let started = Instant::now();
                let catalog = next.catalog.clone();
                // First, so that a user read back from the store meanwhile is resolved anew.
                *self.memory_catalog.write().unwrap_or_else(|e| e.into_inner()) = catalog.clone();
                let events = self.store.remap_items(&|id: &str| catalog.known_item(id));
                let change = served::vocabulary_change(&current.catalog, &catalog);
                tracing::info!(
                    "model reload: {change}; {events} events in memory remapped in {:.3} s",
                    started.elapsed().as_secs_f64()
                );
            }
            *served = next.clone();
        }
        self.metrics.set_serving_model(&next.version, arch);
        Ok(next)
    }

    /// Brings the gauges that are read rather than counted up to date (before a scrape).
    pub fn refresh_gauges(&self) {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let stats = self.store.stats();
        self.metrics.users.set(stats.users as i64);
        self.metrics.events_held.set(stats.events as i64);
        self.metrics.history_bytes.set(stats.bytes as i64);
        let (m, memory) = (&self.metrics, stats.memory);
        // Counters only move forward: add what the store's totals gained since last time.
        m.evictions.inc_by(memory.evictions.saturating_sub(m.evictions.get()));
        m.reloads.inc_by(memory.reloads.saturating_sub(m.reloads.get()));
        m.reload_seconds
            .inc_by((memory.reload_seconds - m.reload_seconds.get()).max(0.0));
        self.metrics.ready.set(i64::from(self.readiness() == Readiness::Ready));
        if let Some(journal) = stats.journal {
            m.journal_batches
                .inc_by(journal.batches.saturating_sub(m.journal_batches.get()));
            m.journal_events
                .inc_by(journal.events.saturating_sub(m.journal_events.get()));
            m.journal_fsyncs
                .inc_by(journal.fsyncs.saturating_sub(m.journal_fsyncs.get()));
            m.journal_fsync_seconds
                .inc_by((journal.fsync_seconds - m.journal_fsync_seconds.get()).max(0.0));
            m.journal_disk_bytes.set(journal.disk_bytes as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Characters at the edges of the rule: control, Unicode white space of every kind, and
    /// ordinary ones of 1 to 4 bytes.
    const EDGES: &[char] = &[
        '\u{0}', '\t', '\n', '\u{1f}', ' ', 'a', 'Z', '7', '-', '\u{7f}', '\u{85}', '\u{9f}', '\u{a0}', '\u{a1}', 'é',
        '\u{1680}', '\u{2000}', '\u{200a}', '\u{200b}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}',
        '\u{feff}', '語', '🦀',
    ];

    proptest! {
        /// The OpenAPI document's id schema (length and pattern) accepts exactly what the core
        /// accepts.
        #[test]
        fn the_documented_id_schema_is_the_cores_rule(
            picks in proptest::collection::vec(0..EDGES.len(), 0..12),
            padding in 0usize..260,
        ) {
            let pattern = regex::Regex::new(types::ID_PATTERN).unwrap();
            let core: String = picks.iter().map(|&i| EDGES[i]).collect();
            for id in [core.clone(), format!("{}{core}", "x".repeat(padding))] {
                let documented = (1..=MAX_ID_CHARS).contains(&id.chars().count()) && pattern.is_match(&id);
                prop_assert_eq!(check_id("id", &id, MAX_ID_CHARS).is_ok(), documented, "{:?}", id);
            }
        }
    }
}
