//! The batching task: owns the request queue and cuts it into batches.
use std::sync::Arc;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, Semaphore};

use super::{EngineConfig, InferRequest, WorkerCommand};
use crate::metrics::Metrics;

/// Runs until the queue's senders are gone and the queue is empty, then stops the worker by
/// dropping its command channel.
///
/// A batch closes when it is full or its oldest request has waited `max_batch_delay`, and is
/// handed over once the worker is free (`worker_free` holds one permit, which travels with the
/// batch and returns when the worker is done). While the worker is still busy the closed batch
/// keeps taking requests up to `max_batch_size`: under load batches grow instead of queueing
/// behind one another, and with a delay of 0 an idle worker gets each request at once.
pub async fn batching_task(
    mut queue: mpsc::Receiver<InferRequest>,
    worker: mpsc::Sender<WorkerCommand>,
    worker_free: Arc<Semaphore>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) {
    let max_batch = config.max_batch_size.max(1);
    let mut open = true;
    while let Some(first) = queue.recv().await {
        // The delay runs from when the oldest request arrived, not from when we looked.
        let close_at = tokio::time::Instant::from_std(first.enqueued + config.max_batch_delay);
        let mut batch = vec![first];
        while open && batch.len() < max_batch {
            match queue.try_recv() {
                Ok(request) => {
                    batch.push(request);
                    continue;
                }
                Err(TryRecvError::Disconnected) => open = false,
                Err(TryRecvError::Empty) if tokio::time::Instant::now() >= close_at => break,
                Err(TryRecvError::Empty) => tokio::select! {
                    request = queue.recv() => match request {
                        Some(request) => batch.push(request),
                        None => open = false,
                    },
                    _ = tokio::time::sleep_until(close_at) => break,
                },
            }
        }
        let permit = loop {
            if !open || batch.len() >= max_batch {
                break worker_free.clone().acquire_owned().await;
            }
            tokio::select! {
                biased;
                permit = worker_free.clone().acquire_owned() => break permit,
                request = queue.recv() => match request {
                    Some(request) => batch.push(request),
                    None => open = false,
                },
            }
        };
        let Ok(permit) = permit else { break };
        metrics.queue_depth.sub(batch.len() as i64);
        if worker.send(WorkerCommand::Batch(batch, permit)).await.is_err() {
            break;
        }
    }
}
