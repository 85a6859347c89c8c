//! Measurements of the inference path: hardware ceilings, forward/top-k time by batch size set
//! against the floor those ceilings imply, CPU-versus-device agreement, and an HTTP load
//! generator (`xsrec bench …`; `scripts/gpu-check.sh` runs them all on a GPU machine).
pub mod ceilings;
pub mod cost;
pub mod forward;
pub mod load;
pub mod parity;
pub mod plot;
pub mod recall;

use std::borrow::Borrow;
use std::time::Instant;

use rand::Rng;
use tch::Device;

use crate::infer::rank::Catalogue;
use crate::model::{Batch, EncodedSeq, SeqModel};

/// Waits for queued device work, so that host clocks measure the device.
pub fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Median seconds of `run` over `iters` timed calls, after `warmup` untimed ones.
pub fn median_seconds(device: Device, warmup: usize, iters: usize, mut run: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        run();
    }
    synchronize(device);
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let started = Instant::now();
            run();
            synchronize(device);
            started.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut times)
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The stages of serving one batch, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Index batch (padding-only columns dropped) host → device.
    CopyIn,
    /// Embeddings and encoder up to the newest position's hidden state.
    Forward,
    /// Scores against the item table, seen items masked, `topk`, winners device → host.
    RankOut,
}

/// What the inference worker does for a batch of top-k requests whose hidden states are not
/// cached, with `stage_done` called after each stage (benchmarks synchronise and time there).
pub fn rank_batch<R: Borrow<EncodedSeq>, E: AsRef<[i64]>>(
    model: &SeqModel,
    catalogue: &Catalogue,
    rows: &[R],
    exclude: &[E],
    k: usize,
    mut stage_done: impl FnMut(Stage),
) -> Vec<Vec<(u32, f32)>> {
    tch::no_grad(|| {
        let batch = Batch::trimmed(rows, model.device());
        stage_done(Stage::CopyIn);
        let hidden = model.last_hidden(&batch);
        stage_done(Stage::Forward);
        let ranked = catalogue.rank(&hidden, exclude, &vec![k; rows.len()]);
        stage_done(Stage::RankOut);
        ranked
    })
}

/// A plausible cross-session history: bursts of events minutes apart, separated by gaps of
/// hours to days. Items are uniform over `1..num_items`.
pub fn synthetic_history(rng: &mut impl Rng, len: usize, num_items: usize, start: i64) -> (Vec<u32>, Vec<i64>) {
    let mut at = start;
    let mut items = Vec::with_capacity(len);
    let mut timestamps = Vec::with_capacity(len);
    for _ in 0..len {
        at += if rng.gen_bool(0.15) {
            rng.gen_range(3_600..3 * 86_400)
        } else {
            rng.gen_range(10..600)
        };
        items.push(rng.gen_range(1..num_items as u32));
        timestamps.push(at);
    }
    (items, timestamps)
}
