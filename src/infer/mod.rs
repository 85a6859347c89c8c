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
pub mod rank;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::health::Health;
use crate::history::HistorySnapshot;
use crate::metrics::Metrics;
use crate::model::Artifact;
use limit::AdaptiveLimit;
pub use limit::LimitConfig;
pub use worker::{ServingModel, WorkerConfig};

/// Names one model the worker holds. Every request carries the slot of the model it was
/// prepared for (its item indices are that model's), and the worker keeps a model while anyone
/// holds its slot: a request admitted before a reload runs on the model it was admitted with.
#[derive(Debug)]
pub struct ModelSlot {
    number: u64,
}

impl ModelSlot {
    fn next() -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Self {
            number: NEXT.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn number(&self) -> u64 {
        self.number
    }
}

/// What to compute from a user's next-item scores.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// The best `k` items of the catalogue; with `exclude_seen`, those the user had
    /// ([`HistorySnapshot::had_items`](crate::history::HistorySnapshot::had_items)) left out.
    TopK { k: usize, exclude_seen: bool },
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
    pub model: Arc<ModelSlot>,
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
    Control(Control),
}

/// What the worker does between batches.
pub enum Control {
    /// Drop anything cached about a user (erasure), and never cache a state computed from a
    /// history older than `erased_at` (a request queued before the erasure may still run).
    Forget { user: Arc<str>, erased_at: u64 },
    /// Hold `model` (warmed up already) under `slot`, beside the models still in use.
    Install {
        slot: std::sync::Weak<ModelSlot>,
        /// Boxed: the queue's entries are mostly small requests.
        model: Box<ServingModel>,
        installed: oneshot::Sender<()>,
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
    worker: Arc<WorkerConfig>,
}

impl Engine {
    /// Starts the worker thread (which owns `artifact`'s model from here on). `ready` fires
    /// once the worker has warmed up; the slot names the model in requests.
    pub fn start(
        artifact: Artifact,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> (Self, oneshot::Receiver<()>, Arc<ModelSlot>) {
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
        let slot = ModelSlot::next();
        let worker = Arc::new(config.worker);
        let first = (Arc::downgrade(&slot), artifact);
        worker::InferenceWorker::spawn(first, (*worker).clone(), batcher, ready_tx, metrics.clone(), health);
        let engine = Self {
            queue,
            limit,
            metrics,
            worker,
        };
        (engine, ready, slot)
    }

    /// Loads `artifact`'s model beside the ones serving, warms it up off the worker thread, and
    /// hands it to the worker between two batches; the slot names it in requests from then on.
    /// The models serving go on meanwhile.
    pub async fn install(&self, artifact: Artifact) -> Result<Arc<ModelSlot>, InferError> {
        let config = self.worker.clone();
        let warm = tokio::task::spawn_blocking(move || {
            let model = ServingModel::new(artifact, config.device, config.retrieval);
            tch::no_grad(|| model.warm_up(&config.warmup_batch_sizes, config.device));
            model
        });
        let model = warm
            .await
            .map_err(|e| InferError::Failed(format!("warming the new model up failed: {e}")))?;
        let slot = ModelSlot::next();
        let (installed, done) = oneshot::channel();
        let install = Control::Install {
            slot: Arc::downgrade(&slot),
            model: Box::new(model),
            installed,
        };
        self.queue
            .send(WorkerInput::Control(install))
            .map_err(|_| InferError::Stopped)?;
        done.await.map_err(|_| InferError::Stopped)?;
        Ok(slot)
    }

    pub async fn infer(
        &self,
        model: Arc<ModelSlot>,
        user: Arc<str>,
        history: Arc<HistorySnapshot>,
        at: i64,
        query: Query,
        deadline: Instant,
    ) -> Result<Answer, InferError> {
        let _place = self.limit.try_enter().ok_or(InferError::Overloaded)?;
        let (reply, answer) = oneshot::channel();
        let request = InferRequest {
            model,
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
        let _ = self
            .queue
            .send(WorkerInput::Control(Control::Forget { user, erased_at }));
    }
}
