//! Time to serve one uncached batch, by batch size and stage, against the floor from
//! [`super::cost`] and the measured [`Ceilings`].
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::ceilings::Ceilings;
use super::cost::batch_cost;
use super::{median, rank_batch, synchronize, synthetic_history, Stage};
use crate::infer::rank::{Catalogue, Retrieval};
use crate::model::{encode, item_indices, EncodedSeq, HistoryView, SeqModel};

#[derive(Debug, Clone, Serialize)]
pub struct ForwardRow {
    pub batch_size: usize,
    pub seq_len: usize,
    /// Histories → input rows on the host (the inference worker does this too).
    pub encode_ms: f64,
    pub copy_in_ms: f64,
    pub forward_ms: f64,
    pub rank_out_ms: f64,
    /// Index batch in to winners out: median over batches (not the sum of the stage medians).
    pub device_ms: f64,
    pub sequences_per_sec: f64,
    pub flops: f64,
    pub bytes: f64,
    pub floor_ms: f64,
    /// floor ÷ device time: 1.0 would be a perfect implementation.
    pub floor_fraction: f64,
}

/// Full-length synthetic histories (the most expensive case), encoded afresh for every batch as
/// the worker does on a cache miss, seen items excluded as the API does by default, top-10.
pub fn measure(
    model: &SeqModel,
    ceilings: &Ceilings,
    batch_sizes: &[usize],
    iters: usize,
    seed: u64,
    retrieval: Retrieval,
) -> Vec<ForwardRow> {
    let config = &model.config;
    let device = model.device();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let largest = batch_sizes.iter().copied().max().unwrap_or(1);
    let histories: Vec<(Vec<u32>, Vec<i64>)> = (0..largest)
        .map(|_| synthetic_history(&mut rng, config.max_len, config.num_items, 1_700_000_000))
        .collect();
    let types = vec![1u32; config.max_len];
    let encode_all = |histories: &[(Vec<u32>, Vec<i64>)]| -> Vec<EncodedSeq> {
        histories
            .iter()
            .map(|(items, timestamps)| {
                let at = timestamps[timestamps.len() - 1] + 60;
                let view = HistoryView::new(items, timestamps, &types);
                encode(view, at, config.max_len, config.session_gap_secs)
            })
            .collect()
    };
    let exclude: Vec<Vec<i64>> = histories.iter().map(|(items, _)| item_indices(items)).collect();
    let kind = model.net.item_table().kind();
    let element_bytes = kind.elt_size_in_bytes() as f64;
    let progress = ProgressBar::new(batch_sizes.len() as u64)
        .with_style(ProgressStyle::with_template("{elapsed_precise} [{bar:30}] batch size {msg}").expect("template"));
    let catalogue = Catalogue::new(model.net.item_table(), retrieval);
    let mut out = Vec::new();
    for &size in batch_sizes {
        progress.set_message(size.to_string());
        let mut encodes = Vec::new();
        let mut stages: [Vec<f64>; 3] = Default::default();
        let mut totals = Vec::new();
        for iteration in 0..iters.max(1) + 3 {
            synchronize(device);
            let started = Instant::now();
            let rows = encode_all(&histories[..size]);
            let encoded = Instant::now();
            encodes.push(encoded.duration_since(started).as_secs_f64());
            let mut last = encoded;
            rank_batch(model, &catalogue, &rows, &exclude[..size], 10, |stage| {
                synchronize(device);
                let now = Instant::now();
                stages[stage as usize].push(now.duration_since(last).as_secs_f64());
                last = now;
            });
            if iteration < 3 {
                // Warm-up: allocator growth and kernel selection for this shape.
                stages.iter_mut().for_each(Vec::clear);
                encodes.clear();
            } else {
                totals.push(encoded.elapsed().as_secs_f64());
            }
        }
        let ms = |values: &mut Vec<f64>| median(values) * 1e3;
        let cost = batch_cost(config, size, config.max_len, element_bytes);
        let floor = cost.floor_seconds(ceilings.matmul_flops(kind), ceilings.copy_bytes_per_sec);
        let device_ms = ms(&mut totals);
        let encode_ms = ms(&mut encodes);
        out.push(ForwardRow {
            batch_size: size,
            seq_len: config.max_len,
            encode_ms,
            copy_in_ms: ms(&mut stages[Stage::CopyIn as usize]),
            forward_ms: ms(&mut stages[Stage::Forward as usize]),
            rank_out_ms: ms(&mut stages[Stage::RankOut as usize]),
            device_ms,
            sequences_per_sec: size as f64 / ((encode_ms + device_ms) / 1e3),
            flops: cost.flops,
            bytes: cost.bytes,
            floor_ms: floor * 1e3,
            floor_fraction: floor * 1e3 / device_ms,
        });
        progress.inc(1);
    }
    progress.finish_and_clear();
    out
}
