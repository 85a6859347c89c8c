//! Inference: a bounded queue drained by the batching task into whole batches, which one
//! inference worker thread per device turns into scores with libtorch.
//!
//! ```text
//! Engine::infer ──▶ queue ──▶ batching_task ──▶ (one batch in flight) ──▶ InferenceWorker ──▶ reply
//! ```
//! The batcher closes a batch at `max_batch_size` requests or once its oldest request has waited
//! `max_batch_delay`, and while the worker runs the current batch the next one keeps growing
//! (up to `max_batch_size`) until the worker is free.
pub mod batcher;
pub mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::health::Health;
use crate::history::HistorySnapshot;
use crate::metrics::Metrics;
use crate::model::Artifact;
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

/// Commands the worker thread executes in order.
pub enum WorkerCommand {
    /// A batch to run; the permit marks the worker busy until the batch is done.
    Batch(Vec<InferRequest>, OwnedSemaphorePermit),
    /// Drop anything cached about a user (erasure), and never cache a state computed from a
    /// history older than `erased_at` (a request queued before the erasure may still run).
    Forget { user: Arc<str>, erased_at: u64 },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    pub queue_capacity: usize,
    pub worker: WorkerConfig,
}

/// Cheap, cloneable handle used by request handlers.
#[derive(Clone)]
pub struct Engine {
    queue: mpsc::Sender<InferRequest>,
    commands: mpsc::Sender<WorkerCommand>,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Starts the worker thread (which owns `artifact`'s model from here on) and the batching
    /// task. `ready` fires once the worker has warmed up.
    pub fn start(
        artifact: Artifact,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> (Self, oneshot::Receiver<()>) {
        let (queue, requests) = mpsc::channel(config.queue_capacity);
        let (commands, worker_commands) = mpsc::channel(1);
        let (ready_tx, ready) = oneshot::channel();
        worker::InferenceWorker::spawn(
            artifact,
            config.worker.clone(),
            worker_commands,
            ready_tx,
            metrics.clone(),
            health,
        );
        tokio::spawn(batcher::batching_task(
            requests,
            commands.clone(),
            Arc::new(Semaphore::new(1)),
            config,
            metrics.clone(),
        ));
        (
            Self {
                queue,
                commands,
                metrics,
            },
            ready,
        )
    }

    pub async fn infer(
        &self,
        user: Arc<str>,
        history: Arc<HistorySnapshot>,
        at: i64,
        query: Query,
        deadline: Instant,
    ) -> Result<Answer, InferError> {
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
        if self.queue.send(request).await.is_err() {
            self.metrics.queue_depth.dec();
            return Err(InferError::Stopped);
        }
        answer.await.unwrap_or(Err(InferError::Stopped))
    }

    pub async fn forget(&self, user: Arc<str>, erased_at: u64) {
        // A stopped worker holds no cache to clear.
        let _ = self.commands.send(WorkerCommand::Forget { user, erased_at }).await;
    }
}
