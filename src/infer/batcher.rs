//! Batching, on the inference worker's own thread: the worker blocks on the request queue, and
//! when it is free takes everything waiting (up to `max_batch_size`) as its next batch. While
//! it computes, the next batch grows in the queue, so under load batches grow instead of
//! queueing behind one another, and an idle worker starts on a lone request at once. Nothing
//! here waits on the async runtime: however busy the HTTP side is, the worker picks up work the
//! moment it is free, and the queue delay it reports is its own.
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::limit::AdaptiveLimit;
use super::{Control, InferRequest, WorkerInput};
use crate::metrics::Metrics;

pub struct Batcher {
    pub inputs: Receiver<WorkerInput>,
    pub max_batch_size: usize,
    /// How long the oldest request may wait for more to join it while the worker is idle.
    pub max_batch_delay: Duration,
    pub limit: Arc<AdaptiveLimit>,
    pub metrics: Arc<Metrics>,
}

impl Batcher {
    /// The next batch, applying erasures and model installs met on the way as they come;
    /// `None` once every sender is gone and the queue is empty.
    pub fn next_batch(&mut self, mut control: impl FnMut(Control)) -> Option<Vec<InferRequest>> {
        let first = loop {
            match self.inputs.recv().ok()? {
                WorkerInput::Request(request) => break request,
                WorkerInput::Control(command) => control(command),
            }
        };
        // The delay runs from when the oldest request arrived, not from when we looked.
        let close_at = first.enqueued + self.max_batch_delay;
        let mut batch = vec![first];
        while batch.len() < self.max_batch_size.max(1) {
            let input = match self.inputs.try_recv() {
                Ok(input) => input,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= close_at {
                        break;
                    }
                    match self.inputs.recv_timeout(close_at - now) {
                        Ok(input) => input,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            match input {
                WorkerInput::Request(request) => batch.push(request),
                WorkerInput::Control(command) => control(command),
            }
        }
        self.metrics.queue_depth.sub(batch.len() as i64);
        let now = Instant::now();
        if let Some(youngest) = batch.iter().map(|r| r.enqueued).max() {
            self.limit.observe(now.saturating_duration_since(youngest), now);
            self.metrics.inference_limit.set(self.limit.limit() as i64);
        }
        Some(batch)
    }
}
