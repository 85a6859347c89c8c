//! Inference: a queue, bounded by an adaptive limit, that one inference worker thread per
//! device drains in whole batches and turns into scores with libtorch.
//!
//! ```text
//! Engine::infer ──▶ AdaptiveLimit ──▶ queue ──▶ InferenceWorker (Batcher, then libtorch) ──▶ reply
//! ```
//! A batch is everything waiting when the worker is free, up to `max_batch_size` (optionally
//! held up to `max_batch_delay` for more); while the worker runs one batch the next one grows.
pub mod batcher;
pub mod limit;
pub mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::health::Health;
use crate::history::HistorySnapshot;
use crate::metrics::Metrics;
use crate::model::Artifact;
use limit::AdaptiveLimit;
pub use limit::LimitConfig;
pub use worker::WorkerConfig;

/// What to compute from a user's next-item scores.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// The best `k` items of the catalogue, `exclude` (item indices) left out.
    TopK { k: usize, exclude: Vec<i64> },
    /// The best `k` of the given item indices.
    Candidates { k: usize, candidates: Vec<i64> },
    /// The `top` categories by next-item probability mass.
    Interests { top: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// (item index, score), best first.
    Items(Vec<(u32, f32)>),
    /// (category index, probability mass), largest first.
    Categories(Vec<(usize, f32)>),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    /// The engine holds as many requests as its adaptive limit allows (a standing queue).
    #[error("the inference queue is full")]
    Overloaded,
    #[error("the request's deadline passed before it was served")]
    DeadlineExceeded,
    #[error("the inference worker has stopped")]
    Stopped,
    /// The batch this request was in failed (a libtorch error or a panic); the worker goes on.
    #[error("{0}")]
    Failed(String),
}

pub struct InferRequest {
    pub user: Arc<str>,
    pub history: Arc<HistorySnapshot>,
    /// Moment of prediction (Unix seconds).
    pub at: i64,
    pub query: Query,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<Answer, InferError>>,
}

/// What the worker thread takes from its queue, in order.
pub enum WorkerInput {
    Request(InferRequest),
    /// Drop anything cached about a user (erasure), and never cache a state computed from a
    /// history older than `erased_at` (a request queued before the erasure may still run).
    Forget {
        user: Arc<str>,
        erased_at: u64,
    },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Bounds the queue too: every queued request holds a place under the limit.
    pub limit: LimitConfig,
    pub worker: WorkerConfig,
}

/// Cheap, cloneable handle used by request handlers.
#[derive(Clone)]
pub struct Engine {
    /// Unbounded as a channel; the limit bounds what is in it.
    queue: std::sync::mpsc::Sender<WorkerInput>,
    limit: Arc<AdaptiveLimit>,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Starts the worker thread (which owns `artifact`'s model from here on). `ready` fires
    /// once the worker has warmed up.
    pub fn start(
        artifact: Artifact,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> (Self, oneshot::Receiver<()>) {
        let (queue, inputs) = std::sync::mpsc::channel();
        let (ready_tx, ready) = oneshot::channel();
        let limit = AdaptiveLimit::new(config.limit.clone());
        let batcher = batcher::Batcher {
            inputs,
            max_batch_size: config.max_batch_size,
            max_batch_delay: config.max_batch_delay,
            limit: limit.clone(),
            metrics: metrics.clone(),
        };
        worker::InferenceWorker::spawn(artifact, config.worker, batcher, ready_tx, metrics.clone(), health);
        (Self { queue, limit, metrics }, ready)
    }

    pub async fn infer(
        &self,
        user: Arc<str>,
        history: Arc<HistorySnapshot>,
        at: i64,
        query: Query,
        deadline: Instant,
    ) -> Result<Answer, InferError> {
        let _place = self.limit.try_enter().ok_or(InferError::Overloaded)?;
        let (reply, answer) = oneshot::channel();
        let request = InferRequest {
            user,
            history,
            at,
            query,
            enqueued: Instant::now(),
            deadline,
            reply,
        };
        self.metrics.queue_depth.inc();
        if self.queue.send(WorkerInput::Request(request)).is_err() {
            self.metrics.queue_depth.dec();
            return Err(InferError::Stopped);
        }
        answer.await.unwrap_or(Err(InferError::Stopped))
    }

    /// Whether the engine would take a request now (see [`AdaptiveLimit::has_room`]).
    pub fn has_room(&self) -> bool {
        self.limit.has_room()
    }

    pub fn forget(&self, user: Arc<str>, erased_at: u64) {
        // A stopped worker holds no cache to clear.
        let _ = self.queue.send(WorkerInput::Forget { user, erased_at });
    }
}
