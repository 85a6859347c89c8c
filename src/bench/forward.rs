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
use crate::model::{encode, HistoryView, SeqModel};

#[derive(Debug, Clone, Serialize)]
pub struct ForwardRow {
    pub batch_size: usize,
    pub seq_len: usize,
    pub copy_in_ms: f64,
    pub forward_ms: f64,
    pub rank_out_ms: f64,
    /// Median of whole batches (not the sum of the stage medians).
    pub total_ms: f64,
    pub sequences_per_sec: f64,
    pub flops: f64,
    pub bytes: f64,
    pub floor_ms: f64,
    /// floor ÷ measured: 1.0 would be a perfect implementation.
    pub floor_fraction: f64,
}

/// Full-length synthetic histories (the most expensive case), seen items excluded as the API does
/// by default, top-10.
pub fn measure(
    model: &SeqModel,
    ceilings: &Ceilings,
    batch_sizes: &[usize],
    iters: usize,
    seed: u64,
) -> Vec<ForwardRow> {
    let config = &model.config;
    let device = model.device();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let largest = batch_sizes.iter().copied().max().unwrap_or(1);
    let (rows, exclude): (Vec<_>, Vec<_>) = (0..largest)
        .map(|_| {
            let (items, timestamps) = synthetic_history(&mut rng, config.max_len, config.num_items, 1_700_000_000);
            let types = vec![1u32; items.len()];
            let at = timestamps[timestamps.len() - 1] + 60;
            let row = encode(
                HistoryView::new(&items, &timestamps, &types),
                at,
                config.max_len,
                config.session_gap_secs,
            );
            let seen: Vec<i64> = std::iter::once(0).chain(items.iter().map(|&i| i64::from(i))).collect();
            (row, seen)
        })
        .unzip();
    let kind = model.net.item_table().kind();
    let element_bytes = kind.elt_size_in_bytes() as f64;
    let progress = ProgressBar::new(batch_sizes.len() as u64)
        .with_style(ProgressStyle::with_template("{elapsed_precise} [{bar:30}] batch size {msg}").expect("template"));
    let mut out = Vec::new();
    for &size in batch_sizes {
        progress.set_message(size.to_string());
        let (rows, exclude) = (&rows[..size], &exclude[..size]);
        let mut stages: [Vec<f64>; 3] = Default::default();
        let mut totals = Vec::new();
        for iteration in 0..iters.max(1) + 3 {
            synchronize(device);
            let started = Instant::now();
            let mut last = started;
            rank_batch(model, rows, exclude, 10, |stage| {
                synchronize(device);
                let now = Instant::now();
                stages[stage as usize].push(now.duration_since(last).as_secs_f64());
                last = now;
            });
            if iteration < 3 {
                // Warm-up: allocator growth and kernel selection for this shape.
                stages.iter_mut().for_each(Vec::clear);
            } else {
                totals.push(started.elapsed().as_secs_f64());
            }
        }
        let ms = |values: &mut Vec<f64>| median(values) * 1e3;
        let cost = batch_cost(config, size, config.max_len, element_bytes);
        let floor = cost.floor_seconds(ceilings.matmul_flops(kind), ceilings.copy_bytes_per_sec);
        let total_ms = ms(&mut totals);
        out.push(ForwardRow {
            batch_size: size,
            seq_len: config.max_len,
            copy_in_ms: ms(&mut stages[Stage::CopyIn as usize]),
            forward_ms: ms(&mut stages[Stage::Forward as usize]),
            rank_out_ms: ms(&mut stages[Stage::RankOut as usize]),
            total_ms,
            sequences_per_sec: size as f64 / (total_ms / 1e3),
            flops: cost.flops,
            bytes: cost.bytes,
            floor_ms: floor * 1e3,
            floor_fraction: floor * 1e3 / total_ms,
        });
        progress.inc(1);
    }
    progress.finish_and_clear();
    out
}
