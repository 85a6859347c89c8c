//! The batching task: owns the request queue and cuts it into batches.
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use super::{EngineConfig, InferRequest, WorkerCommand};
use crate::metrics::Metrics;

/// Runs until the queue's senders are gone and the queue is empty, then stops the worker by
/// dropping its command channel.
pub async fn batching_task(
    mut queue: mpsc::Receiver<InferRequest>,
    worker: mpsc::Sender<WorkerCommand>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) {
    let max_batch = config.max_batch_size.max(1);
    while let Some(first) = queue.recv().await {
        // The delay runs from when the oldest request arrived, not from when we looked.
        let close_at = tokio::time::Instant::from_std(first.enqueued + config.max_batch_delay);
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(request) => {
                    batch.push(request);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if tokio::time::Instant::now() >= close_at => break,
                Err(TryRecvError::Empty) => {}
            }
            tokio::select! {
                request = queue.recv() => match request {
                    Some(request) => batch.push(request),
                    None => break,
                },
                _ = tokio::time::sleep_until(close_at) => break,
            }
        }
        metrics.queue_depth.sub(batch.len() as i64);
        if worker.send(WorkerCommand::Batch(batch)).await.is_err() {
            break;
        }
    }
}
